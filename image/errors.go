package image

import "errors"

// Sentinel errors for kinds of failure. Functions wrap them with the file or
// name involved, so callers test with [errors.Is].
var (
	// ErrNotBzImage means a file lacks the x86 setup header magic "HdrS" or
	// has a header too short or too old to locate its compressed payload.
	ErrNotBzImage = errors.New("not a bzImage")
	// ErrUnknownCompression means a payload starts with no magic number
	// that the builder can decompress.
	ErrUnknownCompression = errors.New("unknown compression")
	// ErrUnsupportedCompression means a payload uses a format the builder
	// recognizes but cannot decompress: LZO, or xz with a BCJ filter.
	ErrUnsupportedCompression = errors.New("unsupported compression")
	// ErrNotVmlinux means a kernel image is not a 64-bit x86 ELF executable
	// with a PVH entry note or a 64-bit entry point.
	ErrNotVmlinux = errors.New("not a bootable vmlinux")
	// ErrInvalidDeb means a file is not a Debian binary package that the
	// builder can read.
	ErrInvalidDeb = errors.New("invalid debian package")
	// ErrModuleNotFound means a required kernel module is neither in the
	// module tree nor built into the kernel.
	ErrModuleNotFound = errors.New("kernel module not found")
	// ErrAgentNotFound means no ember-agent binary was given or found.
	ErrAgentNotFound = errors.New("ember-agent binary not found")
	// ErrInvalidModulesDep means a modules.dep line is malformed.
	ErrInvalidModulesDep = errors.New("invalid modules.dep")
)
