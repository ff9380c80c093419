// Package fcapi is a small client for the Firecracker API: HTTP/1.1 over the
// Unix socket that a Firecracker process serves with --api-sock.
//
// Firecracker parses request bodies strictly: a field that the running
// version does not know fails the whole request with HTTP 400. The package
// therefore keeps one table of version-gated features ([Supports],
// [Require]) and builds the version-dependent bodies ([NewLoadParams]) so
// that an unsupported request fails before anything is sent, with a
// [*vm.UnsupportedError]. Every non-2xx reply becomes a [*vm.APIError] that
// carries the status and Firecracker's fault_message.
//
// Firecracker keeps connections open and the client reads each reply by its
// Content-Length, never to EOF. Every call has a deadline: the caller's, or
// [Client.Timeout] when the caller's context has none.
//
//	c := fcapi.New("/run/ember/web-1/api.sock")
//	v, err := c.Version(ctx)
//	...
//	err = c.PutMachineConfig(ctx, fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 128})
package fcapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/embervm/ember/vm"
)

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 10 * time.Second

// maxReplySize bounds the reply body read from Firecracker.
const maxReplySize = 1 << 20

// Client talks to one Firecracker API socket. It is safe for concurrent use.
type Client struct {
	// Timeout bounds each call whose context has no deadline; 0 means
	// DefaultTimeout.
	Timeout time.Duration

	socketPath string
	http       *http.Client
}

// New returns a client for the API socket at socketPath. It does not connect.
func New(socketPath string) *Client {
	dialer := &net.Dialer{}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", socketPath)
		},
		DisableCompression:  true,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	return &Client{socketPath: socketPath, http: &http.Client{Transport: transport}}
}

// SocketPath returns the API socket path.
func (c *Client) SocketPath() string { return c.socketPath }

// Close drops idle connections.
func (c *Client) Close() {
	c.http.CloseIdleConnections()
}

// Do sends one request with body encoded as JSON (nil sends none) and
// decodes a 2xx reply into out (nil discards it). A non-2xx reply returns a
// [*vm.APIError].
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		timeout := c.Timeout
		if timeout <= 0 {
			timeout = DefaultTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}

	var reader io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("firecracker api %s %s: encode body: %w", method, path, err)
		}
		reader = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, reader)
	if err != nil {
		return fmt.Errorf("firecracker api %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}

	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker api %s %s on %s: %w", method, path, c.socketPath, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxReplySize))
	if err != nil {
		return fmt.Errorf("firecracker api %s %s: read reply: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return &vm.APIError{Method: method, Path: path, StatusCode: resp.StatusCode, FaultMessage: ParseFault(data)}
	}
	if out == nil || len(data) == 0 {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("firecracker api %s %s: decode reply: %w", method, path, err)
	}
	return nil
}

// ParseFault extracts fault_message from an error reply body. A body that
// is not Firecracker's error shape is returned as trimmed text.
func ParseFault(body []byte) string {
	var f Fault
	if err := json.Unmarshal(body, &f); err == nil && f.FaultMessage != "" {
		return f.FaultMessage
	}
	text := strings.TrimSpace(string(body))
	if len(text) > 512 {
		text = text[:512]
	}
	return text
}

// Version reads the Firecracker version with GET /version and falls back to
// the vmm_version of GET / when that endpoint is missing.
func (c *Client) Version(ctx context.Context) (Version, error) {
	var info VersionInfo
	err := c.Do(ctx, http.MethodGet, "/version", nil, &info)
	if err == nil {
		return ParseVersion(info.FirecrackerVersion)
	}
	var apiErr *vm.APIError
	if !errors.As(err, &apiErr) {
		return Version{}, err
	}
	inst, err := c.DescribeInstance(ctx)
	if err != nil {
		return Version{}, err
	}
	return ParseVersion(inst.VMMVersion)
}

// DescribeInstance returns GET /.
func (c *Client) DescribeInstance(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.Do(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// PutMachineConfig sets vCPUs, memory and dirty-page tracking. Pre-boot only.
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.Do(ctx, http.MethodPut, "/machine-config", m, nil)
}

// PutBootSource sets kernel, initrd and command line. Pre-boot only.
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.Do(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutDrive attaches a block device. Pre-boot only.
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	return c.Do(ctx, http.MethodPut, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PutNetworkInterface attaches a virtio-net device. Pre-boot only.
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	return c.Do(ctx, http.MethodPut, "/network-interfaces/"+url.PathEscape(n.IfaceID), n, nil)
}

// PutVsock attaches the vsock device. Pre-boot only.
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.Do(ctx, http.MethodPut, "/vsock", v, nil)
}

// PutLogger configures Firecracker's own log.
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.Do(ctx, http.MethodPut, "/logger", l, nil)
}

// PutMetrics configures the metrics file.
func (c *Client) PutMetrics(ctx context.Context, m Metrics) error {
	return c.Do(ctx, http.MethodPut, "/metrics", m, nil)
}

// Action sends PUT /actions with one of the Action* types.
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.Do(ctx, http.MethodPut, "/actions", InstanceAction{ActionType: actionType}, nil)
}

// PatchVM pauses (VMPaused) or resumes (VMResumed) the guest.
func (c *Client) PatchVM(ctx context.Context, state string) error {
	return c.Do(ctx, http.MethodPatch, "/vm", VMState{State: state}, nil)
}

// CreateSnapshot writes a snapshot of a paused VM.
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotCreateParams) error {
	return c.Do(ctx, http.MethodPut, "/snapshot/create", p, nil)
}

// LoadSnapshot loads a snapshot into a fresh Firecracker process. Build p
// with [NewLoadParams]. A failed load ends the Firecracker process.
func (c *Client) LoadSnapshot(ctx context.Context, p SnapshotLoadParams) error {
	return c.Do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}
