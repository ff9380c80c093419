package firecracker

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// This file is a minimal hand-written Firecracker driver that the overhead
// benchmark compares Ember with. It uses no Ember code: its own HTTP/1.1
// client over the API socket and a plain child process.
//
// An earlier hand-written driver hung on its first iteration. Run without
// --log-path, Firecracker (1.14.1 tested) writes its own log to stdout,
// which is also the guest's serial console. A log line from the API thread
// can then land inside a line of guest output, so the console reads
// "G<log line>UEST-READY" and a search for GUEST-READY waits forever while
// the guest runs. This driver sends the log to a file, as Ember does.
// Two other mistakes would hang it as well, and both are avoided:
// Firecracker keeps an API connection open after each reply, so a reply
// must be read by its Content-Length and never to EOF, and the console
// pipe must be read for the process's whole life.

// rawAPI is one kept-alive connection to a Firecracker API socket.
type rawAPI struct {
	conn net.Conn
	r    *bufio.Reader
}

func dialRawAPI(path string) (*rawAPI, error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return nil, err
	}
	return &rawAPI{conn: conn, r: bufio.NewReader(conn)}, nil
}

func (c *rawAPI) Close() error { return c.conn.Close() }

// call sends one request and returns the status code and body of the
// reply. A status outside 2xx is an error that contains the body.
func (c *rawAPI) call(method, path, body string) (int, string, error) {
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n", method, path)
	if body != "" {
		req += fmt.Sprintf("Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	req += "\r\n" + body
	if _, err := io.WriteString(c.conn, req); err != nil {
		return 0, "", fmt.Errorf("%s %s: write: %w", method, path, err)
	}
	status, length, err := c.readHead()
	if err != nil {
		return 0, "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	reply := make([]byte, length)
	if _, err := io.ReadFull(c.r, reply); err != nil {
		return status, "", fmt.Errorf("%s %s: read body: %w", method, path, err)
	}
	if status < 200 || status > 299 {
		return status, string(reply), fmt.Errorf("%s %s: status %d: %s", method, path, status, reply)
	}
	return status, string(reply), nil
}

// readHead reads the status line and headers of a reply and returns the
// status code and the Content-Length (0 when absent).
func (c *rawAPI) readHead() (int, int, error) {
	line, err := c.r.ReadString('\n')
	if err != nil {
		return 0, 0, fmt.Errorf("read status line: %w", err)
	}
	status, ok := parseStatusLine(strings.TrimRight(line, "\r\n"))
	if !ok {
		return 0, 0, fmt.Errorf("invalid status line %q", line)
	}
	length := 0
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, 0, fmt.Errorf("read headers: %w", err)
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			return status, length, nil
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			return 0, 0, fmt.Errorf("invalid header line %q", line)
		}
		if strings.EqualFold(strings.TrimSpace(name), "Content-Length") {
			length, err = strconv.Atoi(strings.TrimSpace(value))
			if err != nil || length < 0 || length > 1<<20 {
				return 0, 0, fmt.Errorf("invalid Content-Length %q", value)
			}
		}
	}
}

// parseStatusLine returns the status code of an HTTP/1.x status line
// such as "HTTP/1.1 204 " or "HTTP/1.1 400 Bad Request". The version,
// the single space after it and a three-digit code in 100–599 are
// required. The reason phrase may be empty.
func parseStatusLine(line string) (int, bool) {
	version, rest, ok := strings.Cut(line, " ")
	if !ok || len(version) != len("HTTP/1.x") || !strings.HasPrefix(version, "HTTP/1.") ||
		version[7] < '0' || version[7] > '9' {
		return 0, false
	}
	code, _, _ := strings.Cut(rest, " ")
	if len(code) != 3 {
		return 0, false
	}
	status := 0
	for _, c := range []byte(code) {
		if c < '0' || c > '9' {
			return 0, false
		}
		status = status*10 + int(c-'0')
	}
	if status < 100 || status > 599 {
		return 0, false
	}
	return status, true
}

// rawVM is a Firecracker process started without Ember.
type rawVM struct {
	cmd  *exec.Cmd
	api  *rawAPI
	sock string

	mu sync.Mutex
	// console is the output so far; waiters are woken when it grows.
	console bytes.Buffer
	grew    chan struct{}
	// drained is closed when stdout reached EOF.
	drained chan struct{}
}

// startRawVM starts bin with its API socket at sock and its log in
// sock+".log", and waits until the socket accepts connections.
func startRawVM(bin, sock, id string) (*rawVM, error) {
	os.Remove(sock)
	logPath := sock + ".log"
	if err := os.WriteFile(logPath, nil, 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--api-sock", sock, "--id", id, "--log-path", logPath, "--level", "Warning")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	v := &rawVM{cmd: cmd, sock: sock, grew: make(chan struct{}), drained: make(chan struct{})}
	go v.drain(stdout)

	deadline := time.Now().Add(5 * time.Second)
	for {
		api, err := dialRawAPI(sock)
		if err == nil {
			v.api = api
			return v, nil
		}
		if time.Now().After(deadline) {
			v.kill()
			return nil, fmt.Errorf("api socket %s: timed out: %w", sock, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// drain reads the console until the process closes it.
func (v *rawVM) drain(r io.Reader) {
	defer close(v.drained)
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			v.mu.Lock()
			v.console.Write(buf[:n])
			close(v.grew)
			v.grew = make(chan struct{})
			v.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// waitFor waits until the console contains marker or timeout passes.
func (v *rawVM) waitFor(marker string, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		v.mu.Lock()
		found := bytes.Contains(v.console.Bytes(), []byte(marker))
		grew := v.grew
		v.mu.Unlock()
		if found {
			return nil
		}
		select {
		case <-grew:
		case <-v.drained:
			return fmt.Errorf("console closed before %q", marker)
		case <-t.C:
			v.mu.Lock()
			defer v.mu.Unlock()
			return fmt.Errorf("console lacks %q after %s: %q", marker, timeout, v.console.String())
		}
	}
}

// kill stops the process, reaps it and removes its socket.
func (v *rawVM) kill() {
	if v.api != nil {
		v.api.Close()
	}
	v.cmd.Process.Kill()
	<-v.drained
	v.cmd.Wait()
	os.Remove(v.sock)
	os.Remove(v.sock + ".log")
}

// bootRaw cold-boots a guest with the same API calls Ember sends.
func bootRaw(bin, sock, kernel, rootfs string) (*rawVM, error) {
	v, err := startRawVM(bin, sock, "raw")
	if err != nil {
		return nil, err
	}
	calls := []struct{ method, path, body string }{
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":64}`},
		{"PUT", "/boot-source", fmt.Sprintf(`{"kernel_image_path":%q,"boot_args":"console=ttyS0 reboot=k panic=1"}`, kernel)},
		{"PUT", "/drives/rootfs", fmt.Sprintf(`{"drive_id":"rootfs","path_on_host":%q,"is_root_device":true,"is_read_only":true}`, rootfs)},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`},
	}
	for _, c := range calls {
		if _, _, err := v.api.call(c.method, c.path, c.body); err != nil {
			v.kill()
			return nil, err
		}
	}
	return v, nil
}

// restoreRaw loads a snapshot into a new process and resumes it.
func restoreRaw(bin, sock, state, memory string) (*rawVM, error) {
	v, err := startRawVM(bin, sock, "raw")
	if err != nil {
		return nil, err
	}
	body := fmt.Sprintf(`{"snapshot_path":%q,"mem_backend":{"backend_type":"File","backend_path":%q},"resume_vm":true}`, state, memory)
	if _, _, err := v.api.call("PUT", "/snapshot/load", body); err != nil {
		v.kill()
		return nil, err
	}
	return v, nil
}
