package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/embervm/ember/provider/firecracker/fcapi"
	"github.com/embervm/ember/vm"
)

// Metrics are running totals of one VM's Firecracker metrics.
//
// Firecracker writes one JSON object per flush (every 60 seconds, and on
// each FlushMetrics action). Most of its counters are deltas since the
// previous flush, so the totals here are sums over every flush read so far.
// Counters is every numeric field summed, keyed by its dotted path such as
// "net.tx_bytes_count". Fields that are values rather than deltas (the
// timestamp and everything under latencies_us) are kept as their latest
// value instead.
type Metrics struct {
	Flushes  int               `json:"flushes"`
	Net      NetMetrics        `json:"net"`
	Block    BlockMetrics      `json:"block"`
	VCPU     VCPUMetrics       `json:"vcpu"`
	Memory   MemoryMetrics     `json:"memory"`
	Counters map[string]uint64 `json:"counters"`
}

// NetMetrics are totals over every network interface.
type NetMetrics struct {
	RxBytes, TxBytes, RxPackets, TxPackets uint64
}

// BlockMetrics are totals over every drive.
type BlockMetrics struct {
	ReadBytes, WriteBytes, ReadCount, WriteCount uint64
}

// VCPUMetrics count vCPU exits by kind and failures.
type VCPUMetrics struct {
	ExitIOIn, ExitIOOut, ExitMMIORead, ExitMMIOWrite, Failures uint64
}

// MemoryMetrics count the balloon device's and the memory manager's events
// that Firecracker reports.
type MemoryMetrics struct {
	// DirtyPages is the "memory.dirty_pages" counter where the version
	// reports it.
	DirtyPages uint64
	// BalloonInflates and BalloonDeflates count balloon operations.
	BalloonInflates, BalloonDeflates uint64
}

// gauge reports whether a metric path is a value, not a delta.
func gauge(path string) bool {
	return path == "utc_timestamp_ms" || strings.HasPrefix(path, "latencies_us.")
}

// metricsReader reads new lines of a metrics file and keeps totals.
type metricsReader struct {
	path string

	mu     sync.Mutex
	offset int64
	// partial holds a line whose newline has not been written yet.
	partial []byte
	totals  Metrics
}

func newMetricsReader(path string) *metricsReader {
	return &metricsReader{path: path, totals: Metrics{Counters: map[string]uint64{}}}
}

// update reads the lines appended since the last call.
func (r *metricsReader) update() (Metrics, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, err := os.Open(r.path)
	if err != nil {
		return Metrics{}, err
	}
	defer f.Close()
	if _, err := f.Seek(r.offset, io.SeekStart); err != nil {
		return Metrics{}, err
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return Metrics{}, err
	}
	r.offset += int64(len(data))
	data = append(r.partial, data...)
	r.partial = nil
	var errs []error
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			r.partial = append([]byte(nil), data...)
			break
		}
		line := bytes.TrimSpace(data[:i])
		data = data[i+1:]
		if len(line) == 0 {
			continue
		}
		flat, err := ParseMetricsLine(line)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r.totals.add(flat)
	}
	return r.totals.clone(), errors.Join(errs...)
}

// ParseMetricsLine flattens one Firecracker metrics line into dotted paths
// and their values. Non-numeric and negative fields are skipped.
func ParseMetricsLine(line []byte) (map[string]uint64, error) {
	var obj map[string]any
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	if err := dec.Decode(&obj); err != nil {
		return nil, fmt.Errorf("parse metrics line: %w", err)
	}
	out := map[string]uint64{}
	flatten("", obj, out, 0)
	return out, nil
}

func flatten(prefix string, obj map[string]any, out map[string]uint64, depth int) {
	if depth > 8 {
		return
	}
	for k, v := range obj {
		path := k
		if prefix != "" {
			path = prefix + "." + k
		}
		switch val := v.(type) {
		case map[string]any:
			flatten(path, val, out, depth+1)
		case json.Number:
			var n uint64
			if _, err := fmt.Sscan(val.String(), &n); err == nil {
				out[path] = n
			}
		}
	}
}

func (m *Metrics) add(flat map[string]uint64) {
	m.Flushes++
	for path, v := range flat {
		if gauge(path) {
			m.Counters[path] = v
		} else {
			m.Counters[path] += v
		}
	}
	c := m.Counters
	m.Net = NetMetrics{RxBytes: c["net.rx_bytes_count"], TxBytes: c["net.tx_bytes_count"], RxPackets: c["net.rx_packets_count"], TxPackets: c["net.tx_packets_count"]}
	m.Block = BlockMetrics{ReadBytes: c["block.read_bytes"], WriteBytes: c["block.write_bytes"], ReadCount: c["block.read_count"], WriteCount: c["block.write_count"]}
	m.VCPU = VCPUMetrics{ExitIOIn: c["vcpu.exit_io_in"], ExitIOOut: c["vcpu.exit_io_out"], ExitMMIORead: c["vcpu.exit_mmio_read"], ExitMMIOWrite: c["vcpu.exit_mmio_write"], Failures: c["vcpu.failures"]}
	m.Memory = MemoryMetrics{DirtyPages: c["memory.dirty_pages"], BalloonInflates: c["balloon.inflate_count"], BalloonDeflates: c["balloon.deflate_count"]}
}

func (m Metrics) clone() Metrics {
	out := m
	out.Counters = make(map[string]uint64, len(m.Counters))
	for k, v := range m.Counters {
		out.Counters[k] = v
	}
	return out
}

// Metrics asks a running or paused VM to flush its metrics and returns the
// running totals of every flush read so far. For a VM that no longer runs
// it returns the totals of what was flushed before.
func (p *Provider) Metrics(ctx context.Context, id string) (Metrics, error) {
	m, err := p.lookup(id)
	if err != nil {
		return Metrics{}, fmt.Errorf("metrics: %w", err)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	state := m.info().State
	if state == vm.StateRunning || state == vm.StatePaused {
		if err := m.client.Action(ctx, fcapi.ActionFlushMetrics); err != nil {
			return Metrics{}, fmt.Errorf("metrics of vm %q: flush: %w", id, p.apiFailure(m, err))
		}
	}
	totals, err := m.metrics.update()
	if err != nil {
		return totals, fmt.Errorf("metrics of vm %q: %w", id, err)
	}
	return totals, nil
}
