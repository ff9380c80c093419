package fcemu

//lint:file-ignore ST1005 fault messages copy the capitalized text real Firecracker sends

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/embervm/ember/provider/firecracker/fcapi"
)

// The emulated guest memory: page 0 contains the tick counter (8 bytes,
// little endian) and page 1 contains baseMarker. A full snapshot writes
// both pages. A diff snapshot writes only page 0, because the counter is
// the only memory the emulated guest dirties, so a diff restores only when
// it has been merged onto its base.
const (
	pageSize   = 4096
	baseMarker = "FCEMU-GUEST-MEMORY\n"
)

// vmState is the emulator's snapshot state file.
type vmState struct {
	Format  string                   `json:"format"`
	Version string                   `json:"version"`
	Machine fcapi.MachineConfig      `json:"machine"`
	Drives  []fcapi.Drive            `json:"drives,omitempty"`
	NICs    []fcapi.NetworkInterface `json:"nics,omitempty"`
	Vsock   *fcapi.Vsock             `json:"vsock,omitempty"`
}

const stateFormat = "fcemu-vmstate-1"

func (s *Server) createSnapshotLocked(w http.ResponseWriter, p fcapi.SnapshotCreateParams) {
	if !s.started {
		fault(w, http.StatusBadRequest, notBeforeStart)
		return
	}
	if !s.paused {
		fault(w, http.StatusBadRequest, "Create snapshot error: Cannot save the microVM state: the microVM is not paused.")
		return
	}
	diff := p.SnapshotType == fcapi.SnapshotDiff
	if diff && !s.machine.TrackDirtyPages && !s.opts.Version.AtLeast(fcapi.V(1, 14, 0)) {
		fault(w, http.StatusBadRequest, "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
		return
	}

	state := vmState{
		Format: stateFormat, Version: s.opts.Version.String(), Machine: s.machine,
		Drives: s.drives, NICs: s.nics, Vsock: s.vsock,
	}
	data, _ := json.Marshal(state)
	if err := os.WriteFile(p.SnapshotPath, data, 0o600); err != nil {
		fault(w, http.StatusBadRequest, "Create snapshot error: Cannot write the microVM state: "+osMessage(err))
		return
	}
	if err := s.writeMemoryLocked(p.MemFilePath, diff); err != nil {
		fault(w, http.StatusBadRequest, "Create snapshot error: Cannot write the memory file: "+osMessage(err))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) writeMemoryLocked(path string, diff bool) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(int64(s.machine.MemSizeMiB) << 20); err != nil {
		return err
	}
	page := make([]byte, pageSize)
	binary.LittleEndian.PutUint64(page, s.ticks)
	if _, err := f.WriteAt(page, 0); err != nil {
		return err
	}
	if !diff {
		marker := make([]byte, pageSize)
		copy(marker, baseMarker)
		if _, err := f.WriteAt(marker, pageSize); err != nil {
			return err
		}
	}
	return f.Sync()
}

// errLoadFailed marks load failures after which Firecracker exits.
var errLoadFailed = errors.New("load failed")

func (s *Server) loadSnapshotLocked(w http.ResponseWriter, p fcapi.SnapshotLoadParams) {
	if s.started || s.bootConfigured {
		fault(w, http.StatusBadRequest, "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.")
		return
	}
	if p.MemBackend == nil {
		fault(w, http.StatusBadRequest, "Load snapshot error: missing mem_backend")
		return
	}
	data, err := os.ReadFile(p.SnapshotPath)
	if err != nil {
		fault(w, http.StatusBadRequest, "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: "+osMessage(err))
		return
	}

	if err := s.restoreLocked(data, p); err != nil {
		fault(w, http.StatusBadRequest, "Load snapshot error: Failed to restore from snapshot: "+err.Error())
		// Firecracker exits after a load that failed past this point.
		s.exited = true
		s.stopTickerLocked()
		go s.opts.Exit(1)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) restoreLocked(data []byte, p fcapi.SnapshotLoadParams) error {
	var st vmState
	if err := json.Unmarshal(data, &st); err != nil || st.Format != stateFormat {
		return fmt.Errorf("Failed to get snapshot state from file: invalid snapshot state: %w", errLoadFailed)
	}
	written, err := fcapi.ParseVersion(st.Version)
	if err != nil || !written.SameMinor(s.opts.Version) {
		return fmt.Errorf("Invalid snapshot version: the snapshot was written by %s and cannot be loaded by %s: %w", st.Version, s.opts.Version, errLoadFailed)
	}

	memSize := int64(st.Machine.MemSizeMiB) << 20
	var mem []byte
	switch p.MemBackend.BackendType {
	case fcapi.BackendFile:
		mem, err = readMemoryFile(p.MemBackend.BackendPath, memSize)
	case fcapi.BackendUffd:
		mem, err = s.readMemoryUffd(p.MemBackend.BackendPath, memSize)
	default:
		err = fmt.Errorf("unknown backend_type %q", p.MemBackend.BackendType)
	}
	if err != nil {
		return fmt.Errorf("Failed to load guest memory: %v: %w", err, errLoadFailed)
	}
	if !bytes.HasPrefix(mem[pageSize:], []byte(baseMarker)) {
		return fmt.Errorf("Failed to load guest memory: the memory file lacks the guest's base pages: %w", errLoadFailed)
	}

	nics := slices.Clone(st.NICs)
	for _, o := range p.NetworkOverrides {
		i := slices.IndexFunc(nics, func(n fcapi.NetworkInterface) bool { return n.IfaceID == o.IfaceID })
		if i < 0 {
			return fmt.Errorf("Invalid network override: no interface %q in the snapshot: %w", o.IfaceID, errLoadFailed)
		}
		nics[i].HostDevName = o.HostDevName
	}
	if st.Vsock != nil {
		v := *st.Vsock
		if p.VsockOverride != nil {
			v.UDSPath = p.VsockOverride.UDSPath
		}
		if err := s.bindVsockLocked(v.UDSPath); err != nil {
			return fmt.Errorf("Cannot restore vsock device: %v: %w", err, errLoadFailed)
		}
		s.vsock = &v
	}

	s.machine = st.Machine
	s.machine.TrackDirtyPages = p.TrackDirtyPages || p.EnableDiffSnapshots
	s.drives = st.Drives
	s.nics = nics
	s.ticks = binary.LittleEndian.Uint64(mem[:8])
	s.started = true
	s.paused = !p.ResumeVM
	if p.ResumeVM {
		s.startTickerLocked()
		if s.opts.CrashAfterStart > 0 {
			time.AfterFunc(s.opts.CrashAfterStart, func() { s.exit(3) })
		}
	}
	return nil
}

// readMemoryFile reads the two emulated pages of a memory file of memSize
// bytes.
func readMemoryFile(path string, memSize int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open memory file: %s", osMessage(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() < memSize {
		return nil, fmt.Errorf("memory file is %d bytes, the guest has %d", fi.Size(), memSize)
	}
	mem := make([]byte, 2*pageSize)
	if _, err := f.ReadAt(mem, 0); err != nil {
		return nil, err
	}
	return mem, nil
}

// Counters of one metrics flush. Firecracker reports most counters as
// deltas since the previous flush; the emulator does the same with fixed
// increments, so after n flushes the totals are n times these.
const (
	MetricsNetTxBytes  = 1000
	MetricsNetRxBytes  = 2000
	MetricsBlockReadB  = 4096
	MetricsVcpuExitsIO = 7
)

func (s *Server) flushMetricsLocked() error {
	if s.opts.MetricsPath == "" {
		return errors.New("metrics are not configured")
	}
	s.metricsFlushes++
	line := map[string]any{
		"utc_timestamp_ms": time.Now().UnixMilli(),
		"net":              map[string]any{"tx_bytes_count": MetricsNetTxBytes, "rx_bytes_count": MetricsNetRxBytes, "tx_packets_count": 1, "rx_packets_count": 2},
		"block":            map[string]any{"read_bytes": MetricsBlockReadB, "write_bytes": 0, "read_count": 1, "write_count": 0},
		"vcpu":             map[string]any{"exit_io_in": MetricsVcpuExitsIO, "exit_io_out": 0, "exit_mmio_read": 0, "exit_mmio_write": 0, "failures": 0},
		"balloon":          map[string]any{"activate_fails": 0},
	}
	data, _ := json.Marshal(line)
	f, err := os.OpenFile(s.opts.MetricsPath, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Write(append(data, '\n'))
	return err
}
