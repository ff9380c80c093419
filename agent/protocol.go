package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"
)

// ProtocolVersion is the only protocol version this package speaks.
const ProtocolVersion = 1

// DefaultMaxConcurrent is the number of requests that the agent runs at once
// on one connection unless it is configured otherwise.
const DefaultMaxConcurrent = 32

// DefaultWindow is the number of bytes that a stream's sender may send before
// the receiver grants more with a FrameWindow.
const DefaultWindow = 256 << 10

// Operation names, the Op of a [Request].
const (
	OpHealth      = "health"
	OpExec        = "exec"
	OpFilePut     = "file_put"
	OpFileGet     = "file_get"
	OpSetEnv      = "set_env"
	OpSetSecrets  = "set_secrets"
	OpNetwork     = "network_configure"
	OpClockSync   = "clock_sync"
	OpSetHostname = "set_hostname"
	OpShutdown    = "shutdown"
)

// Hello is the client's first frame on a connection.
type Hello struct {
	// Versions lists the protocol versions that the client speaks.
	Versions []int `json:"versions"`
	// MaxFrameSize is the largest payload, in bytes, the client accepts.
	MaxFrameSize uint32 `json:"max_frame_size"`
}

// HelloReply is the agent's answer to a [Hello].
type HelloReply struct {
	Version       int    `json:"version"`
	AgentVersion  string `json:"agent_version"`
	MaxFrameSize  uint32 `json:"max_frame_size"`
	MaxConcurrent int    `json:"max_concurrent"`
	Error         *Error `json:"error,omitempty"`
}

// Request is the payload of a FrameRequest.
type Request struct {
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is the payload of a FrameResponse: an error or a result.
type Response struct {
	Error  *Error          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

// Error codes sent in an [Error].
const (
	CodeBadRequest         = "bad_request"
	CodeUnknownOp          = "unknown_op"
	CodeInvalidArgument    = "invalid_argument"
	CodeFrameTooLarge      = "frame_too_large"
	CodeBusy               = "busy"
	CodeNotFound           = "not_found"
	CodeCanceled           = "canceled"
	CodeUnsupported        = "unsupported"
	CodeUnsupportedVersion = "unsupported_version"
	CodeInternal           = "internal"
	CodeFailed             = "failed"
)

// Sentinel errors that an [*Error] from the agent matches by its code.
var (
	ErrBadRequest         = errors.New("bad request")
	ErrUnknownOp          = errors.New("unknown operation")
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrBusy               = errors.New("too many concurrent requests")
	ErrNotFound           = errors.New("not found")
	ErrCanceled           = errors.New("request canceled")
	ErrUnsupported        = errors.New("unsupported by this agent")
	ErrUnsupportedVersion = errors.New("unsupported protocol version")
	ErrInternal           = errors.New("internal agent error")
	ErrFailed             = errors.New("operation failed in the guest")
)

var codeSentinels = map[string]error{
	CodeBadRequest:         ErrBadRequest,
	CodeUnknownOp:          ErrUnknownOp,
	CodeInvalidArgument:    ErrInvalidArgument,
	CodeFrameTooLarge:      ErrFrameTooLarge,
	CodeBusy:               ErrBusy,
	CodeNotFound:           ErrNotFound,
	CodeCanceled:           ErrCanceled,
	CodeUnsupported:        ErrUnsupported,
	CodeUnsupportedVersion: ErrUnsupportedVersion,
	CodeInternal:           ErrInternal,
	CodeFailed:             ErrFailed,
}

// Error is an error reply from the agent. It matches the sentinel for its
// Code with [errors.Is].
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return "agent: " + e.Message }

func (e *Error) Is(target error) bool {
	s, ok := codeSentinels[e.Code]
	return ok && s == target
}

// Errorf returns an [*Error] with the given code.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// HealthResult is the result of OpHealth.
type HealthResult struct {
	AgentVersion    string        `json:"agent_version"`
	ProtocolVersion int           `json:"protocol_version"`
	Uptime          time.Duration `json:"uptime_ns"`
	// BootID is the kernel's random id of this boot, from
	// /proc/sys/kernel/random/boot_id; empty when unavailable.
	BootID   string `json:"boot_id,omitempty"`
	Hostname string `json:"hostname,omitempty"`
}

// ExecRequest is the argument of OpExec.
type ExecRequest struct {
	// Argv is the program and its arguments. A program name without a slash
	// is looked up in PATH.
	Argv []string `json:"argv"`
	// Env is added to the agent's environment (as changed by OpSetEnv), as
	// KEY=value strings; a later entry wins.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory; empty means the agent's root directory.
	Dir string `json:"dir,omitempty"`
	// Stdin tells the agent to expect StreamStdin data frames. Without it the
	// process reads from an empty stdin.
	Stdin bool `json:"stdin,omitempty"`
	// Timeout kills the process after this long; zero means no timeout.
	Timeout time.Duration `json:"timeout_ns,omitempty"`
}

// ExecResult is the result of OpExec.
type ExecResult struct {
	// ExitCode is the process's exit status, or -1 when a signal ended it.
	ExitCode int `json:"exit_code"`
	// Signal names the signal that ended the process, such as "killed".
	Signal string `json:"signal,omitempty"`
	// TimedOut is true when the agent killed the process because its
	// timeout passed.
	TimedOut bool `json:"timed_out,omitempty"`
}

// FilePutRequest is the argument of OpFilePut. The content follows as
// StreamStdin data frames, and the agent replaces the file atomically once
// the stream ends.
type FilePutRequest struct {
	// Path is absolute; it must not contain ".." elements.
	Path string `json:"path"`
	// Mode holds the permission bits; 0 means 0644.
	Mode fs.FileMode `json:"mode,omitempty"`
	// MakeParents creates missing parent directories with mode 0755.
	MakeParents bool `json:"make_parents,omitempty"`
}

// FilePutResult is the result of OpFilePut.
type FilePutResult struct {
	Size int64 `json:"size"`
}

// FileGetRequest is the argument of OpFileGet. The content comes back as
// StreamStdout data frames before the response.
type FileGetRequest struct {
	Path string `json:"path"`
}

// FileInfo is the result of OpFileGet.
type FileInfo struct {
	Size    int64       `json:"size"`
	Mode    fs.FileMode `json:"mode"`
	ModTime time.Time   `json:"mod_time"`
}

// SetEnvRequest is the argument of OpSetEnv.
type SetEnvRequest struct {
	// Env sets variables for every later exec; an empty value is kept as an
	// empty variable.
	Env map[string]string `json:"env"`
	// Unset removes variables.
	Unset []string `json:"unset,omitempty"`
}

// SetSecretsRequest is the argument of OpSetSecrets. The agent writes each
// secret to a file of that name, mode 0600, in a directory of mode 0700, and
// never logs the values.
type SetSecretsRequest struct {
	Secrets map[string][]byte `json:"secrets"`
}

// NetworkConfig is the argument of OpNetwork.
type NetworkConfig struct {
	Interfaces []InterfaceConfig `json:"interfaces,omitempty"`
	// DNS, when set, replaces /etc/resolv.conf.
	DNS *DNSConfig `json:"dns,omitempty"`
}

// InterfaceConfig configures the guest interface with the given MAC address.
// The agent brings the link up, replaces its addresses and adds the routes.
type InterfaceConfig struct {
	MAC string `json:"mac"`
	// Addresses are in CIDR form, such as "10.0.0.2/24".
	Addresses []string `json:"addresses,omitempty"`
	Routes    []Route  `json:"routes,omitempty"`
	// MTU is left unchanged when zero.
	MTU int `json:"mtu,omitempty"`
}

// Route is one route through an interface.
type Route struct {
	// Destination is a CIDR prefix; "default" means 0.0.0.0/0 or ::/0,
	// matching the gateway's family.
	Destination string `json:"destination"`
	// Gateway is empty for an on-link route.
	Gateway string `json:"gateway,omitempty"`
}

// DNSConfig is the content of /etc/resolv.conf.
type DNSConfig struct {
	Nameservers []string `json:"nameservers,omitempty"`
	Search      []string `json:"search,omitempty"`
}

// ClockSyncRequest is the argument of OpClockSync.
type ClockSyncRequest struct {
	// UnixNano is the host's wall clock when it sent the request.
	UnixNano int64 `json:"unix_nano"`
}

// SetHostnameRequest is the argument of OpSetHostname.
type SetHostnameRequest struct {
	Hostname string `json:"hostname"`
}

// Shutdown actions.
const (
	ActionPowerOff = "poweroff"
	ActionReboot   = "reboot"
)

// ShutdownRequest is the argument of OpShutdown. The agent replies, syncs
// file systems and then powers off or reboots.
type ShutdownRequest struct {
	Action string `json:"action"`
}
