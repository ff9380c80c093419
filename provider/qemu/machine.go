package qemu

import (
	"crypto/sha256"
	"fmt"
	"net"

	"github.com/embervm/ember/vm"
)

// machine is everything QEMU's command line is built from: the machine shape
// and the device list. A cold boot derives it from a vm.Config, and a
// snapshot stores it next to the migration stream, because QEMU can only
// load a stream into a machine whose devices match the source's.
type machine struct {
	VCPUCount  int    `json:"vcpu_count"`
	MemSizeMiB int    `json:"mem_size_mib"`
	Kernel     string `json:"kernel"`
	Initrd     string `json:"initrd,omitempty"`
	BootArgs   string `json:"boot_args"`
	// Drives are in attach order, root drive first. The guest names them
	// vda, vdb and so on in this order.
	Drives []machineDrive `json:"drives,omitempty"`
	NICs   []machineNIC   `json:"nics,omitempty"`
	// VsockCID is the guest context id of a vhost-vsock device; 0 means
	// none.
	VsockCID uint32 `json:"vsock_cid,omitempty"`
}

type machineDrive struct {
	ID          string          `json:"drive_id"`
	Path        string          `json:"path"`
	ReadOnly    bool            `json:"read_only,omitempty"`
	RateLimiter *vm.RateLimiter `json:"rate_limiter,omitempty"`
}

type machineNIC struct {
	IfaceID string `json:"iface_id"`
	TAP     string `json:"tap"`
	MAC     string `json:"mac"`
	MTU     int    `json:"mtu,omitempty"`
}

// machineFromConfig derives the machine of a cold boot. It rejects what
// QEMU cannot do: NIC rate limiters, and vsock on a host without
// /dev/vhost-vsock.
func machineFromConfig(cfg *vm.Config, haveVhostVsock bool) (machine, error) {
	m := machine{
		VCPUCount:  cfg.VCPUCount,
		MemSizeMiB: cfg.MemSizeMiB,
		Kernel:     cfg.Kernel,
		Initrd:     cfg.Initrd,
		BootArgs:   cfg.BootArgs,
	}
	for _, d := range cfg.Drives() {
		m.Drives = append(m.Drives, machineDrive{
			ID:          d.ID,
			Path:        d.PathOnHost,
			ReadOnly:    d.IsReadOnly,
			RateLimiter: d.RateLimiter.Clone(),
		})
	}
	for _, n := range cfg.NetworkInterfaces {
		if limited(n.RxRateLimiter) || limited(n.TxRateLimiter) {
			return machine{}, &vm.UnsupportedError{Feature: "network rate limiters", Backend: backendName}
		}
		mac := n.GuestMAC
		if mac == "" {
			mac = derivedMAC(cfg.ID, n.IfaceID)
		}
		m.NICs = append(m.NICs, machineNIC{IfaceID: n.IfaceID, TAP: n.HostDevName, MAC: mac, MTU: n.MTU})
	}
	if cfg.Vsock != nil {
		if !haveVhostVsock {
			return machine{}, &vm.UnsupportedError{Feature: "vsock without /dev/vhost-vsock", Backend: backendName}
		}
		// NOTE: vhost-vsock joins the guest to the host's AF_VSOCK
		// address family, so no Unix socket appears at uds_path. This path
		// is untested: the project's machines have no /dev/vhost-vsock.
		m.VsockCID = cfg.Vsock.GuestCID
	}
	return m, nil
}

func limited(r *vm.RateLimiter) bool {
	return r != nil && (r.Bandwidth.Enabled() || r.Ops.Enabled())
}

// derivedMAC returns a stable, locally administered unicast MAC for a NIC
// that has none. QEMU's own default is the same 52:54:00:12:34:56 for every
// VM, which breaks as soon as two guests share a bridge.
func derivedMAC(vmID, ifaceID string) string {
	sum := sha256.Sum256([]byte(vmID + "/" + ifaceID))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&0xfe | 0x02
	return mac.String()
}

// config returns the parts of a vm.Config that m describes, used to report
// the configuration of a restored VM.
func (m *machine) config(id string) vm.Config {
	cfg := vm.Config{
		ID:         id,
		Kernel:     m.Kernel,
		Initrd:     m.Initrd,
		VCPUCount:  m.VCPUCount,
		MemSizeMiB: m.MemSizeMiB,
		BootArgs:   m.BootArgs,
	}
	for _, d := range m.Drives {
		if d.ID == vm.RootDriveID {
			cfg.Rootfs = d.Path
			cfg.RootfsReadOnly = d.ReadOnly
			cfg.RootfsRateLimit = d.RateLimiter.Clone()
			continue
		}
		cfg.ExtraDrives = append(cfg.ExtraDrives, vm.Drive{
			ID: d.ID, PathOnHost: d.Path, IsReadOnly: d.ReadOnly, RateLimiter: d.RateLimiter.Clone(),
		})
	}
	for _, n := range m.NICs {
		cfg.NetworkInterfaces = append(cfg.NetworkInterfaces, vm.NetworkInterface{
			IfaceID: n.IfaceID, HostDevName: n.TAP, GuestMAC: n.MAC, MTU: n.MTU,
		})
	}
	return cfg
}

func (m *machine) driveIDs() []string {
	ids := make([]string, len(m.Drives))
	for i, d := range m.Drives {
		ids[i] = d.ID
	}
	return ids
}

func (m *machine) ifaceIDs() []string {
	ids := make([]string, len(m.NICs))
	for i, n := range m.NICs {
		ids[i] = n.IfaceID
	}
	return ids
}

// validate checks a machine read from a snapshot, which may have been
// edited or damaged on disk.
func (m *machine) validate() error {
	if m.VCPUCount < vm.MinVCPUCount || m.VCPUCount > vm.MaxVCPUCount {
		return fmt.Errorf("vcpu_count %d is invalid", m.VCPUCount)
	}
	if m.MemSizeMiB < 1 || m.MemSizeMiB > vm.MaxMemSizeMiB {
		return fmt.Errorf("mem_size_mib %d is invalid", m.MemSizeMiB)
	}
	cfg := m.config("snapshot")
	if err := cfg.Validate(); err != nil {
		return err
	}
	return nil
}
