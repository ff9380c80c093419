package fcapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/embervm/ember/vm"
)

func TestParseVersion(t *testing.T) {
	tests := []struct {
		in      string
		want    Version
		wantErr bool
	}{
		{in: "1.14.1", want: V(1, 14, 1)},
		{in: "v1.7.0", want: V(1, 7, 0)},
		{in: "Firecracker v1.10.1", want: V(1, 10, 1)},
		{in: "1.10.1-dev", want: V(1, 10, 1)},
		{in: " 1.16.0\n", want: V(1, 16, 0)},
		{in: "", wantErr: true},
		{in: "1.14", wantErr: true},
		{in: "1.x.0", wantErr: true},
		{in: "1.-1.0", wantErr: true},
		{in: "01.2.3", wantErr: true},
		{in: "1.2.3.4", wantErr: true},
		{in: "1..3", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseVersion(tt.in)
		if tt.wantErr {
			if !errors.Is(err, ErrBadVersion) {
				t.Errorf("ParseVersion(%q) error = %v, want ErrBadVersion", tt.in, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseVersion(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

func FuzzParseVersion(f *testing.F) {
	for _, s := range []string{"1.14.1", "v1.7.0", "1.10.1-dev", "", "1..", "99999.1.1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseVersion(s)
		if err != nil {
			if !errors.Is(err, ErrBadVersion) {
				t.Fatalf("error %v does not match ErrBadVersion", err)
			}
			return
		}
		again, err := ParseVersion(v.String())
		if err != nil || again != v {
			t.Fatalf("round trip of %v gave %v, %v", v, again, err)
		}
	})
}

func TestSupportsTable(t *testing.T) {
	tests := []struct {
		feature Feature
		version Version
		want    bool
	}{
		{FeatureNetworkOverrides, V(1, 7, 0), false},
		{FeatureNetworkOverrides, V(1, 10, 1), false},
		{FeatureNetworkOverrides, V(1, 12, 0), true},
		{FeatureNetworkOverrides, V(1, 16, 0), true},
		{FeatureLoadTrackDirtyPages, V(1, 12, 1), false},
		{FeatureLoadTrackDirtyPages, V(1, 13, 0), true},
		{FeatureVsockOverride, V(1, 15, 9), false},
		{FeatureVsockOverride, V(1, 16, 0), true},
		{FeatureClockRealtime, V(1, 14, 3), false},
		{FeatureClockRealtime, V(1, 14, 4), true},
		{FeatureClockRealtime, V(1, 15, 0), false},
		{FeatureClockRealtime, V(1, 15, 1), true},
		{FeatureClockRealtime, V(1, 13, 9), false},
		{FeatureClockRealtime, V(1, 16, 0), true},
		{FeatureClockRealtime, V(2, 0, 0), true},
		{FeatureHugePages, V(1, 7, 0), true},
		{FeatureHugePages, V(1, 6, 0), false},
		{FeatureACPI, V(1, 7, 0), false},
		{FeatureACPI, V(1, 8, 0), true},
		{FeatureDiffWithoutDirtyTracking, V(1, 10, 1), false},
		{FeatureDiffWithoutDirtyTracking, V(1, 14, 1), true},
		{FeatureNetworkMTU, V(1, 16, 0), false},
		{Feature("no such feature"), V(9, 0, 0), false},
	}
	for _, tt := range tests {
		if got := Supports(tt.version, tt.feature); got != tt.want {
			t.Errorf("Supports(%v, %q) = %v, want %v", tt.version, tt.feature, got, tt.want)
		}
	}
}

func TestRequireNamesVersions(t *testing.T) {
	err := Require(V(1, 10, 1), FeatureNetworkOverrides)
	var ue *vm.UnsupportedError
	if !errors.As(err, &ue) {
		t.Fatalf("Require error = %v, want *vm.UnsupportedError", err)
	}
	if !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("error does not match vm.ErrUnsupported")
	}
	if ue.Feature != "network_overrides" || ue.Version != "1.10.1" || ue.MinVersion != "1.12.0" {
		t.Errorf("error fields = %+v", ue)
	}

	err = Require(V(1, 15, 0), FeatureClockRealtime)
	if !errors.As(err, &ue) || ue.MinVersion != "1.14.4, 1.15.1 or 1.16.0" {
		t.Errorf("clock_realtime error = %v", err)
	}
	err = Require(V(1, 16, 0), FeatureNetworkMTU)
	if !errors.As(err, &ue) || ue.MinVersion != "" {
		t.Errorf("mtu error = %v", err)
	}
	if err := RequireSupported(V(1, 6, 0)); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("RequireSupported(1.6.0) = %v", err)
	}
	if err := RequireSupported(V(1, 7, 0)); err != nil {
		t.Errorf("RequireSupported(1.7.0) = %v", err)
	}
}

func TestNewLoadParams(t *testing.T) {
	base := LoadOptions{SnapshotPath: "/s/vmstate", MemFilePath: "/s/memory"}
	withDirty := base
	withDirty.TrackDirtyPages = true
	withNet := base
	withNet.NetworkOverrides = []NetworkOverride{{IfaceID: "eth0", HostDevName: "tap9"}}
	withVsock := base
	withVsock.VsockOverride = &VsockOverride{UDSPath: "/r/v.sock"}
	withClock := base
	withClock.ClockRealtime = true
	withUffd := base
	withUffd.UffdSocketPath = "/r/uffd.sock"

	tests := []struct {
		name       string
		version    Version
		opts       LoadOptions
		wantFields []string
		wantAbsent []string
		wantErr    Feature
	}{
		{"dirty old", V(1, 7, 0), withDirty, []string{"enable_diff_snapshots"}, []string{"track_dirty_pages"}, ""},
		{"dirty 1.12", V(1, 12, 1), withDirty, []string{"enable_diff_snapshots"}, []string{"track_dirty_pages"}, ""},
		{"dirty new", V(1, 13, 0), withDirty, []string{"track_dirty_pages"}, []string{"enable_diff_snapshots"}, ""},
		{"no dirty", V(1, 16, 0), base, nil, []string{"track_dirty_pages", "enable_diff_snapshots", "network_overrides", "vsock_override", "clock_realtime", "resume_vm"}, ""},
		{"net 1.10", V(1, 10, 1), withNet, nil, nil, FeatureNetworkOverrides},
		{"net 1.12", V(1, 12, 0), withNet, []string{"network_overrides"}, nil, ""},
		{"vsock 1.14", V(1, 14, 1), withVsock, nil, nil, FeatureVsockOverride},
		{"vsock 1.16", V(1, 16, 0), withVsock, []string{"vsock_override"}, nil, ""},
		{"clock 1.14.1", V(1, 14, 1), withClock, nil, nil, FeatureClockRealtime},
		{"clock 1.14.4", V(1, 14, 4), withClock, []string{"clock_realtime"}, nil, ""},
		{"uffd", V(1, 7, 0), withUffd, []string{"mem_backend"}, []string{"mem_file_path"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := NewLoadParams(tt.version, tt.opts)
			if tt.wantErr != "" {
				var ue *vm.UnsupportedError
				if !errors.As(err, &ue) || ue.Feature != string(tt.wantErr) {
					t.Fatalf("error = %v, want unsupported %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			data, _ := json.Marshal(p)
			var fields map[string]any
			json.Unmarshal(data, &fields)
			for _, f := range tt.wantFields {
				if _, ok := fields[f]; !ok {
					t.Errorf("body %s lacks %q", data, f)
				}
			}
			for _, f := range tt.wantAbsent {
				if _, ok := fields[f]; ok {
					t.Errorf("body %s has %q", data, f)
				}
			}
		})
	}
	if _, err := NewLoadParams(V(1, 14, 1), LoadOptions{SnapshotPath: "/s"}); err == nil {
		t.Errorf("NewLoadParams without memory: nil error")
	}
}

func TestCheckSnapshotCreate(t *testing.T) {
	diff := SnapshotCreateParams{SnapshotType: SnapshotDiff, SnapshotPath: "/s", MemFilePath: "/m"}
	if err := CheckSnapshotCreate(V(1, 10, 1), diff, false); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("diff without tracking on 1.10.1: %v", err)
	}
	if err := CheckSnapshotCreate(V(1, 10, 1), diff, true); err != nil {
		t.Errorf("diff with tracking on 1.10.1: %v", err)
	}
	if err := CheckSnapshotCreate(V(1, 14, 1), diff, false); err != nil {
		t.Errorf("diff without tracking on 1.14.1: %v", err)
	}
}

// serveUnix runs handler on a Unix socket in a temporary directory.
func serveUnix(t *testing.T, handler http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestClientErrorsAndVersion(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"firecracker_version":"1.14.1"}`)
	})
	mux.HandleFunc("PUT /machine-config", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if !strings.Contains(string(body), `"vcpu_count":2`) {
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"fault_message":"bad body"}`)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /actions", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"fault_message":"The requested operation is not supported before starting the microVM."}`)
	})
	mux.HandleFunc("PATCH /vm", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, "plain text")
	})
	c := New(serveUnix(t, mux))
	defer c.Close()
	ctx := context.Background()

	v, err := c.Version(ctx)
	if err != nil || v != V(1, 14, 1) {
		t.Fatalf("Version = %v, %v", v, err)
	}
	if err := c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 2, MemSizeMiB: 64}); err != nil {
		t.Errorf("PutMachineConfig: %v", err)
	}

	err = c.Action(ctx, ActionSendCtrlAltDel)
	var apiErr *vm.APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("Action error = %v, want *vm.APIError", err)
	}
	if apiErr.StatusCode != 400 || apiErr.Method != "PUT" || apiErr.Path != "/actions" ||
		!strings.HasPrefix(apiErr.FaultMessage, "The requested operation") {
		t.Errorf("APIError = %+v", apiErr)
	}
	err = c.PatchVM(ctx, VMPaused)
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 500 || apiErr.FaultMessage != "plain text" {
		t.Errorf("PatchVM error = %v", err)
	}
}

func TestClientVersionFallback(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"id":"a","state":"Not started","vmm_version":"1.7.0","app_name":"Firecracker"}`)
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"fault_message":"Invalid request method and/or path"}`)
	})
	c := New(serveUnix(t, mux))
	defer c.Close()
	v, err := c.Version(context.Background())
	if err != nil || v != V(1, 7, 0) {
		t.Fatalf("Version = %v, %v; want 1.7.0 from GET /", v, err)
	}
}

// TestClientKeepsConnectionOpen checks that a reply is read by its length:
// the server never closes the connection, as Firecracker does not.
func TestClientKeepsConnectionOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		buf := make([]byte, 4096)
		for range 2 {
			conn.Read(buf)
			io.WriteString(conn, "HTTP/1.1 204 No Content\r\n\r\n")
		}
		<-done
	}()
	c := New(path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for range 2 {
		if err := c.PatchVM(ctx, VMResumed); err != nil {
			t.Fatalf("PatchVM over a kept-open connection: %v", err)
		}
	}
}

func TestClientDeadline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			defer conn.Close()
			io.Copy(io.Discard, conn) // never replies
		}
	}()
	c := New(path)
	c.Timeout = 50 * time.Millisecond
	defer c.Close()
	err = c.PatchVM(context.Background(), VMPaused)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error = %v, want context.DeadlineExceeded", err)
	}
}

func TestClientNoSocket(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "missing.sock"))
	defer c.Close()
	_, err := c.Version(context.Background())
	var apiErr *vm.APIError
	if err == nil || errors.As(err, &apiErr) {
		t.Fatalf("error = %v, want a dial error", err)
	}
}

func FuzzParseFault(f *testing.F) {
	f.Add([]byte(`{"fault_message":"x"}`))
	f.Add([]byte(`not json`))
	f.Add([]byte(`{"fault_message":""}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		msg := ParseFault(body)
		if len(msg) > 512 && !json.Valid(body) {
			t.Fatalf("plain-text fault of %d bytes was not truncated", len(msg))
		}
	})
}
