package fcapi

import (
	"fmt"

	"github.com/embervm/ember/vm"
)

// Feature is a request field or behaviour that only some Firecracker
// versions support.
type Feature string

// The version-gated features. The names are the API field names where there
// is one, so an error names what the caller set.
const (
	FeatureNetworkOverrides Feature = "network_overrides"
	// FeatureLoadTrackDirtyPages is track_dirty_pages on /snapshot/load.
	// Older versions take enable_diff_snapshots for the same purpose.
	FeatureLoadTrackDirtyPages Feature = "track_dirty_pages on snapshot load"
	FeatureVsockOverride       Feature = "vsock_override"
	FeatureClockRealtime       Feature = "clock_realtime"
	FeatureHugePages           Feature = "huge_pages"
	// FeatureACPI is device discovery through ACPI tables on x86. Before it,
	// the guest kernel finds virtio-mmio devices on its command line, which
	// needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
	FeatureACPI Feature = "ACPI device discovery"
	// FeatureDiffWithoutDirtyTracking is a Diff snapshot of a VM that runs
	// without dirty-page tracking.
	FeatureDiffWithoutDirtyTracking Feature = "diff snapshot without dirty page tracking"
	// FeatureNetworkMTU is an MTU on a network interface.
	FeatureNetworkMTU Feature = "mtu"
)

// MinSupported is the oldest Firecracker release Ember drives.
var MinSupported = V(1, 7, 0)

// support lists, for one feature, the version ranges that have it. Each
// entry is the first patch release of a minor line that has the feature,
// and the feature stays in every later minor line. An empty list means no
// release has it.
type support []Version

// featureTable is the one table of version-gated features. The provider
// checks it before sending a request, so an unsupported field fails with a
// typed error instead of Firecracker's HTTP 400.
var featureTable = map[Feature]support{
	// 1.10.1 and 1.7.0 answer 400 "unknown field `network_overrides`".
	FeatureNetworkOverrides:    {V(1, 12, 0)},
	FeatureLoadTrackDirtyPages: {V(1, 13, 0)},
	FeatureVsockOverride:       {V(1, 16, 0)},
	// clock_realtime was backported to the 1.14 and 1.15 lines.
	FeatureClockRealtime: {V(1, 14, 4), V(1, 15, 1), V(1, 16, 0)},
	FeatureHugePages:     {V(1, 7, 0)},
	FeatureACPI:          {V(1, 8, 0)},
	// NOTE: 1.14.1 accepts a Diff snapshot without dirty tracking and
	// 1.10.1 and 1.7.0 reject it. 1.11 to 1.13 were not tested, so they are
	// treated as rejecting it.
	FeatureDiffWithoutDirtyTracking: {V(1, 14, 0)},
	// Firecracker's NetworkInterface has no MTU field: 1.7.0 and 1.14.1
	// reject "mtu" as an unknown field.
	FeatureNetworkMTU: {},
}

// Supports reports whether Firecracker v has feature f. An unknown feature
// is unsupported.
func Supports(v Version, f Feature) bool {
	ranges, ok := featureTable[f]
	if !ok {
		return false
	}
	for i, first := range ranges {
		if i+1 < len(ranges) {
			// A backport: only the minor line of first counts.
			if v.SameMinor(first) && v.AtLeast(first) {
				return true
			}
			continue
		}
		if v.AtLeast(first) {
			return true
		}
	}
	return false
}

// MinVersion returns the first release that has f, or the zero Version when
// none has.
func MinVersion(f Feature) Version {
	ranges := featureTable[f]
	if len(ranges) == 0 {
		return Version{}
	}
	return ranges[0]
}

// Require returns nil when Firecracker v has f and otherwise a
// [*vm.UnsupportedError] naming f, v and the first version that has f.
func Require(v Version, f Feature) error {
	if Supports(v, f) {
		return nil
	}
	e := &vm.UnsupportedError{Feature: string(f), Backend: "firecracker", Version: v.String()}
	if min := MinVersion(f); !min.IsZero() {
		e.MinVersion = min.String()
		if ranges := featureTable[f]; len(ranges) > 1 {
			e.MinVersion = describeRanges(ranges)
		}
	}
	return e
}

// RequireSupported rejects versions older than [MinSupported].
func RequireSupported(v Version) error {
	if v.AtLeast(MinSupported) {
		return nil
	}
	return &vm.UnsupportedError{Feature: "firecracker release", Backend: "firecracker", Version: v.String(), MinVersion: MinSupported.String()}
}

// describeRanges formats a backported feature's releases, such as
// "1.14.4, 1.15.1 or 1.16.0".
func describeRanges(ranges support) string {
	s := ""
	for i, v := range ranges {
		switch {
		case i == 0:
			s = v.String()
		case i == len(ranges)-1:
			s += " or " + v.String()
		default:
			s += ", " + v.String()
		}
	}
	return s
}

// LoadOptions is what a snapshot load asks for, independent of version.
type LoadOptions struct {
	SnapshotPath string
	// MemFilePath is the memory file; ignored when UffdSocketPath is set.
	MemFilePath string
	// UffdSocketPath makes Firecracker hand guest memory to a userfaultfd
	// handler listening on this Unix socket.
	UffdSocketPath   string
	TrackDirtyPages  bool
	ResumeVM         bool
	NetworkOverrides []NetworkOverride
	VsockOverride    *VsockOverride
	ClockRealtime    bool
}

// NewLoadParams builds the /snapshot/load body for Firecracker v. It
// translates dirty-page tracking into the field v understands and returns a
// [*vm.UnsupportedError] for any option v lacks, before anything is sent.
func NewLoadParams(v Version, o LoadOptions) (SnapshotLoadParams, error) {
	if o.SnapshotPath == "" {
		return SnapshotLoadParams{}, fmt.Errorf("build snapshot load: snapshot path is empty")
	}
	p := SnapshotLoadParams{SnapshotPath: o.SnapshotPath, ResumeVM: o.ResumeVM}
	switch {
	case o.UffdSocketPath != "":
		p.MemBackend = &MemoryBackend{BackendType: BackendUffd, BackendPath: o.UffdSocketPath}
	case o.MemFilePath != "":
		p.MemBackend = &MemoryBackend{BackendType: BackendFile, BackendPath: o.MemFilePath}
	default:
		return SnapshotLoadParams{}, fmt.Errorf("build snapshot load %s: memory file path is empty", o.SnapshotPath)
	}
	if o.TrackDirtyPages {
		if Supports(v, FeatureLoadTrackDirtyPages) {
			p.TrackDirtyPages = true
		} else {
			p.EnableDiffSnapshots = true
		}
	}
	if len(o.NetworkOverrides) > 0 {
		if err := Require(v, FeatureNetworkOverrides); err != nil {
			return SnapshotLoadParams{}, err
		}
		p.NetworkOverrides = append([]NetworkOverride(nil), o.NetworkOverrides...)
	}
	if o.VsockOverride != nil {
		if err := Require(v, FeatureVsockOverride); err != nil {
			return SnapshotLoadParams{}, err
		}
		ov := *o.VsockOverride
		p.VsockOverride = &ov
	}
	if o.ClockRealtime {
		if err := Require(v, FeatureClockRealtime); err != nil {
			return SnapshotLoadParams{}, err
		}
		p.ClockRealtime = true
	}
	return p, nil
}

// CheckSnapshotCreate checks a /snapshot/create body against Firecracker v
// for a VM whose dirty-page tracking is trackDirty.
func CheckSnapshotCreate(v Version, p SnapshotCreateParams, trackDirty bool) error {
	if p.SnapshotType == SnapshotDiff && !trackDirty {
		return Require(v, FeatureDiffWithoutDirtyTracking)
	}
	return nil
}

// CheckMachineConfig checks a /machine-config body against Firecracker v.
func CheckMachineConfig(v Version, m MachineConfig) error {
	if m.HugePages != "" && m.HugePages != "None" {
		return Require(v, FeatureHugePages)
	}
	return nil
}
