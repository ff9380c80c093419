package fcapi

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrBadVersion is returned by [ParseVersion] for text that is not a
// Firecracker version.
var ErrBadVersion = errors.New("invalid firecracker version")

// Version is a Firecracker release number. The zero value is "unknown".
type Version struct {
	Major, Minor, Patch int
}

// V returns the version major.minor.patch.
func V(major, minor, patch int) Version { return Version{major, minor, patch} }

// ParseVersion parses the forms Firecracker reports: "1.14.1" from
// GET /version, "v1.7.0" from --version, and either with a build suffix such
// as "1.10.1-dev", which is ignored.
func ParseVersion(s string) (Version, error) {
	text := strings.TrimSpace(s)
	text = strings.TrimPrefix(text, "Firecracker ")
	text = strings.TrimPrefix(text, "v")
	if i := strings.IndexAny(text, "-+ "); i >= 0 {
		text = text[:i]
	}
	parts := strings.Split(text, ".")
	if len(parts) != 3 {
		return Version{}, fmt.Errorf("parse %q: %w: want major.minor.patch", s, ErrBadVersion)
	}
	var nums [3]int
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 9999 || p == "" || (len(p) > 1 && p[0] == '0') {
			return Version{}, fmt.Errorf("parse %q: %w: component %q is not a number", s, ErrBadVersion, p)
		}
		nums[i] = n
	}
	return Version{nums[0], nums[1], nums[2]}, nil
}

// MustParse is ParseVersion for constants; it panics on invalid text.
func MustParse(s string) Version {
	v, err := ParseVersion(s)
	if err != nil {
		panic(err)
	}
	return v
}

// String formats v as major.minor.patch.
func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
}

// IsZero reports whether v is the unknown version.
func (v Version) IsZero() bool { return v == Version{} }

// Compare returns -1, 0 or +1 as v is older than, equal to or newer than w.
func (v Version) Compare(w Version) int {
	for _, d := range [3]int{v.Major - w.Major, v.Minor - w.Minor, v.Patch - w.Patch} {
		if d < 0 {
			return -1
		}
		if d > 0 {
			return 1
		}
	}
	return 0
}

// AtLeast reports whether v is w or newer.
func (v Version) AtLeast(w Version) bool { return v.Compare(w) >= 0 }

// SameMinor reports whether v and w share major and minor version. Snapshot
// files load only on the minor version that wrote them.
func (v Version) SameMinor(w Version) bool {
	return v.Major == w.Major && v.Minor == w.Minor
}
