// Package fcemu is a strict emulator of the Firecracker API for tests. It is
// a test helper, not part of Ember's product.
//
// A [Server] behaves like one Firecracker process of a chosen version: it
// rejects unknown body fields with Firecracker's 400 reply, enforces
// pre-boot-only endpoints, allows snapshot creation only while paused and
// snapshot loading only on a fresh process, and exits after a failed load.
// It runs no guest. Its "guest" prints GUEST-READY on its console when
// started, then TICK lines from a counter that snapshots save and restores
// continue, like the fcprobe test kernel does. Snapshot files are the
// emulator's own format, not Firecracker's.
//
// Tests run it as a fake firecracker binary through the helper-process
// trick: the test binary's TestMain calls [Main] when [EnvVersion] is set,
// so a provider spawns, waits for and tracks it exactly as it would the real
// binary.
package fcemu

//lint:file-ignore ST1005 fault messages copy the capitalized text real Firecracker sends

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
)

// Environment variables that make a test binary act as the emulator.
const (
	// EnvVersion selects the emulated Firecracker version, such as 1.14.1.
	EnvVersion = "FCEMU_VERSION"
	// EnvCrashAfterStart makes the emulator exit with status 3 this long
	// after InstanceStart (a Go duration), to test crash detection.
	EnvCrashAfterStart = "FCEMU_CRASH_AFTER_START"
)

// TickInterval is how often a running emulated guest prints a TICK line.
const TickInterval = 100 * time.Millisecond

// Options configures a Server.
type Options struct {
	Version fcapi.Version
	ID      string
	// Console receives the emulated guest's serial output.
	Console io.Writer
	// MetricsPath, when set, receives one JSON line per FlushMetrics.
	MetricsPath string
	// Exit is called when the emulated process ends, with its exit status:
	// after a failed snapshot load, and after a guest power-off.
	Exit func(code int)
	// CrashAfterStart, when positive, exits with status 3 this long after
	// InstanceStart.
	CrashAfterStart time.Duration
}

// Server is one emulated Firecracker process.
type Server struct {
	opts Options

	mu sync.Mutex
	// started is true after InstanceStart or a successful snapshot load.
	started bool
	paused  bool
	// bootConfigured is true once a boot-specific resource was set, which
	// makes /snapshot/load fail.
	bootConfigured bool
	exited         bool
	machine        fcapi.MachineConfig
	boot           *fcapi.BootSource
	drives         []fcapi.Drive
	nics           []fcapi.NetworkInterface
	vsock          *fcapi.Vsock
	vsockListener  net.Listener
	ticks          uint64
	metricsFlushes int
	stopTicker     chan struct{}
	// uffd is the guest memory of a load with the Uffd backend.
	uffd *uffdMemory
}

// New returns an emulated Firecracker process of version opts.Version.
func New(opts Options) *Server {
	if opts.Console == nil {
		opts.Console = io.Discard
	}
	if opts.Exit == nil {
		opts.Exit = func(int) {}
	}
	return &Server{opts: opts, machine: fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 128}}
}

// Main runs the emulator as a fake firecracker binary with Firecracker's
// command-line flags and returns its exit status. It serves until it is
// signalled or its emulated guest powers off.
func Main(args []string) int {
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	apiSock := fs.String("api-sock", "/run/firecracker.socket", "")
	id := fs.String("id", "anonymous-instance", "")
	logPath := fs.String("log-path", "", "")
	metricsPath := fs.String("metrics-path", "", "")
	fs.String("level", "", "")
	fs.Bool("show-level", false, "")
	fs.Bool("show-log-origin", false, "")
	if err := fs.Parse(args); err != nil {
		return 1
	}
	version, err := fcapi.ParseVersion(os.Getenv(EnvVersion))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fcemu:", err)
		return 1
	}
	var crash time.Duration
	if s := os.Getenv(EnvCrashAfterStart); s != "" {
		crash, _ = time.ParseDuration(s)
	}
	if *logPath != "" {
		if f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND, 0); err == nil {
			fmt.Fprintf(f, "fcemu %s [%s] running\n", version, *id)
			f.Close()
		}
	}

	ln, err := net.Listen("unix", *apiSock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fcemu:", err)
		return 1
	}
	exit := make(chan int, 1)
	srv := New(Options{
		Version: version, ID: *id, Console: os.Stdout, MetricsPath: *metricsPath,
		CrashAfterStart: crash,
		Exit: func(code int) {
			select {
			case exit <- code:
			default:
			}
		},
	})
	httpSrv := &http.Server{Handler: srv}
	go httpSrv.Serve(ln)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case code = <-exit:
	case <-signals:
		code = 0
	}
	os.Remove(*apiSock)
	srv.close()
	return code
}

func (s *Server) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopTickerLocked()
	if s.vsockListener != nil {
		s.vsockListener.Close()
		os.Remove(s.vsock.UDSPath)
	}
	if s.uffd != nil {
		s.uffd.release()
		s.uffd = nil
	}
}

// ServeHTTP routes one API request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 51200))
	if err != nil {
		fault(w, http.StatusBadRequest, "could not read the request body")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exited {
		fault(w, http.StatusInternalServerError, "the process is exiting")
		return
	}

	path := strings.TrimPrefix(r.URL.Path, "/")
	endpoint, resourceID, _ := strings.Cut(path, "/")
	if endpoint == "snapshot" {
		endpoint, resourceID = path, ""
	}
	switch {
	case r.Method == http.MethodGet && path == "":
		s.describeLocked(w)
		return
	case r.Method == http.MethodGet && path == "version":
		reply(w, fcapi.VersionInfo{FirecrackerVersion: s.opts.Version.String()})
		return
	}

	schema := schemaFor(s.opts.Version, endpoint)
	wantMethod := http.MethodPut
	if endpoint == "vm" {
		wantMethod = http.MethodPatch
	}
	if schema == nil || r.Method != wantMethod {
		fault(w, http.StatusBadRequest, "Invalid request method and/or path: "+r.Method+" /"+path+".")
		return
	}
	if msg := checkFields(schema, body); msg != "" {
		fault(w, http.StatusBadRequest, msg)
		return
	}

	switch endpoint {
	case "logger", "metrics":
		w.WriteHeader(http.StatusNoContent)
	case "machine-config", "boot-source", "drives", "network-interfaces", "vsock":
		s.configureLocked(w, endpoint, resourceID, body)
	case "actions":
		var a fcapi.InstanceAction
		json.Unmarshal(body, &a)
		s.actionLocked(w, a.ActionType)
	case "vm":
		var st fcapi.VMState
		json.Unmarshal(body, &st)
		s.patchVMLocked(w, st.State)
	case "snapshot/create":
		var p fcapi.SnapshotCreateParams
		json.Unmarshal(body, &p)
		s.createSnapshotLocked(w, p)
	case "snapshot/load":
		var p fcapi.SnapshotLoadParams
		json.Unmarshal(body, &p)
		s.loadSnapshotLocked(w, p)
	}
}

func (s *Server) describeLocked(w http.ResponseWriter) {
	state := fcapi.InstanceNotStarted
	if s.started {
		state = fcapi.InstanceRunning
		if s.paused {
			state = fcapi.InstancePaused
		}
	}
	reply(w, fcapi.InstanceInfo{AppName: "Firecracker", ID: s.opts.ID, State: state, VMMVersion: s.opts.Version.String()})
}

const notAfterStart = "The requested operation is not supported after starting the microVM."
const notBeforeStart = "The requested operation is not supported before starting the microVM."

func (s *Server) configureLocked(w http.ResponseWriter, endpoint, resourceID string, body []byte) {
	if s.started {
		fault(w, http.StatusBadRequest, notAfterStart)
		return
	}
	switch endpoint {
	case "machine-config":
		var m fcapi.MachineConfig
		json.Unmarshal(body, &m)
		if m.VCPUCount < 1 || m.VCPUCount > 32 || m.MemSizeMiB < 1 {
			fault(w, http.StatusBadRequest, "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
			return
		}
		s.machine = m
	case "boot-source":
		var b fcapi.BootSource
		json.Unmarshal(body, &b)
		if _, err := os.Stat(b.KernelImagePath); err != nil {
			fault(w, http.StatusBadRequest, "The kernel file cannot be opened: "+osMessage(err))
			return
		}
		s.boot = &b
	case "drives":
		var d fcapi.Drive
		json.Unmarshal(body, &d)
		if d.DriveID != resourceID {
			fault(w, http.StatusBadRequest, "The id from the path does not match the id from the body!")
			return
		}
		if _, err := os.Stat(d.PathOnHost); err != nil {
			fault(w, http.StatusBadRequest, "Unable to create the block device: "+osMessage(err))
			return
		}
		s.drives = append(s.drives, d)
	case "network-interfaces":
		var n fcapi.NetworkInterface
		json.Unmarshal(body, &n)
		if n.IfaceID != resourceID {
			fault(w, http.StatusBadRequest, "The id from the path does not match the id from the body!")
			return
		}
		s.nics = append(s.nics, n)
	case "vsock":
		var v fcapi.Vsock
		json.Unmarshal(body, &v)
		if err := s.bindVsockLocked(v.UDSPath); err != nil {
			fault(w, http.StatusBadRequest, "Cannot create backend for vsock device: "+err.Error())
			return
		}
		s.vsock = &v
	}
	s.bootConfigured = true
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) actionLocked(w http.ResponseWriter, action string) {
	switch action {
	case fcapi.ActionInstanceStart:
		if s.started {
			fault(w, http.StatusBadRequest, notAfterStart)
			return
		}
		if s.boot == nil {
			fault(w, http.StatusBadRequest, "Start microvm error: Cannot start microvm without kernel configuration.")
			return
		}
		s.started = true
		fmt.Fprintln(s.opts.Console, "GUEST-READY")
		s.startTickerLocked()
		if s.opts.CrashAfterStart > 0 {
			time.AfterFunc(s.opts.CrashAfterStart, func() { s.exit(3) })
		}
	case fcapi.ActionSendCtrlAltDel:
		if !s.started {
			fault(w, http.StatusBadRequest, notBeforeStart)
			return
		}
		// The guest reacts by rebooting, which Firecracker turns into an
		// exit with status 0.
		time.AfterFunc(20*time.Millisecond, func() { s.exit(0) })
	case fcapi.ActionFlushMetrics:
		if err := s.flushMetricsLocked(); err != nil {
			fault(w, http.StatusBadRequest, "Failed to write metrics: "+err.Error())
			return
		}
	default:
		fault(w, http.StatusBadRequest, deserializeError(fmt.Sprintf("unknown variant `%s`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`", action)))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) patchVMLocked(w http.ResponseWriter, state string) {
	if !s.started {
		fault(w, http.StatusBadRequest, notBeforeStart)
		return
	}
	switch state {
	case fcapi.VMPaused:
		s.paused = true
		s.stopTickerLocked()
	case fcapi.VMResumed:
		s.paused = false
		s.startTickerLocked()
	default:
		fault(w, http.StatusBadRequest, deserializeError(fmt.Sprintf("unknown variant `%s`, expected `Paused` or `Resumed`", state)))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// exit ends the emulated process once.
func (s *Server) exit(code int) {
	s.mu.Lock()
	if s.exited {
		s.mu.Unlock()
		return
	}
	s.exited = true
	s.stopTickerLocked()
	s.mu.Unlock()
	s.opts.Exit(code)
}

func (s *Server) startTickerLocked() {
	if s.stopTicker != nil {
		return
	}
	stop := make(chan struct{})
	s.stopTicker = stop
	go func() {
		t := time.NewTicker(TickInterval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				s.mu.Lock()
				s.ticks++
				n := s.ticks
				s.mu.Unlock()
				fmt.Fprintf(s.opts.Console, "TICK %d\n", n)
			}
		}
	}()
}

func (s *Server) stopTickerLocked() {
	if s.stopTicker != nil {
		close(s.stopTicker)
		s.stopTicker = nil
	}
}

// bindVsockLocked listens on the vsock device's host socket. A host-side
// connection sends "CONNECT <port>\n", gets "OK <port>\n" and then talks to
// an echo service that stands in for the guest.
func (s *Server) bindVsockLocked(path string) error {
	if s.vsockListener != nil {
		s.vsockListener.Close()
		os.Remove(s.vsock.UDSPath)
		s.vsockListener = nil
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) && errno == syscall.EADDRINUSE {
			return errors.New("Address in use (os error 98)")
		}
		return err
	}
	s.vsockListener = ln
	go serveVsock(ln)
	return nil
}

func serveVsock(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			r := bufio.NewReader(conn)
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			var port uint32
			if _, err := fmt.Sscanf(line, "CONNECT %d\n", &port); err != nil {
				return
			}
			fmt.Fprintf(conn, "OK %d\n", 1073741824+port)
			io.Copy(conn, r)
		}()
	}
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func fault(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(fcapi.Fault{FaultMessage: msg})
}

// osMessage formats err the way Rust's io::Error does, such as "No such
// file or directory (os error 2)".
func osMessage(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		s := errno.Error()
		return strings.ToUpper(s[:1]) + s[1:] + fmt.Sprintf(" (os error %d)", int(errno))
	}
	return err.Error()
}
