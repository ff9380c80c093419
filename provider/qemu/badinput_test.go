package qemu

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/embervm/ember/vm"
)

// TestBadInput creates VMs from bad input while another VM runs. Each case
// must fail with the expected typed error, leave no process or run
// directory behind, and leave the other VM replying to pings.
func TestBadInput(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	files := t.TempDir()

	if _, err := p.Create(ctx, testConfig(t, "bystander")); err != nil {
		t.Fatalf("create bystander: %v", err)
	}
	if err := p.Start(ctx, "bystander"); err != nil {
		t.Fatalf("start bystander: %v", err)
	}
	waitAgent(t, p, "bystander")

	// Two snapshots of one source VM: "good" stays intact, the others
	// are damaged below.
	if _, err := p.Create(ctx, testConfig(t, "source")); err != nil {
		t.Fatalf("create source: %v", err)
	}
	if err := p.Start(ctx, "source"); err != nil {
		t.Fatalf("start source: %v", err)
	}
	if err := p.Pause(ctx, "source"); err != nil {
		t.Fatalf("pause source: %v", err)
	}
	for _, id := range []string{"good", "truncated", "garbled", "kvm"} {
		if _, err := p.Snapshot(ctx, "source", vm.SnapshotOptions{ID: id}); err != nil {
			t.Fatalf("snapshot %s: %v", id, err)
		}
	}
	truncate(t, filepath.Join(p.snapshotDir, "source", "truncated", snapshotStateName))
	// "garbled" keeps a consistent size record, so only QEMU's load of the
	// stream can find the damage.
	garble(t, filepath.Join(p.snapshotDir, "source", "garbled"))
	editMeta(t, filepath.Join(p.snapshotDir, "source", "kvm"), func(m *snapshotMeta) { m.Accel = AccelKVM })

	kernel := testConfig(t, "x").Kernel
	notELF := filepath.Join(files, "not-elf")
	writeFile(t, notELF, []byte(strings.Repeat("not a kernel\n", 400)))
	truncatedKernel := filepath.Join(files, "truncated-vmlinux")
	writeFile(t, truncatedKernel, readHeader(t, kernel, 256<<10))
	missing := filepath.Join(files, "missing.img")
	restore := func(id string, ref vm.SnapshotRef) vm.Config {
		return vm.Config{ID: id, RestoreFrom: &ref}
	}

	cases := []struct {
		name string
		cfg  vm.Config
		want error
		// field is the validation problem's field, for ErrInvalid.
		field string
	}{
		{
			name: "missing kernel",
			cfg:  withConfig(t, "bad-1", func(c *vm.Config) { c.Kernel = filepath.Join(files, "no-vmlinux") }),
			want: vm.ErrInvalid, field: "kernel",
		},
		{
			name: "kernel is not ELF",
			cfg:  withConfig(t, "bad-2", func(c *vm.Config) { c.Kernel = notELF }),
			want: vm.ErrInvalid, field: "kernel",
		},
		{
			name: "truncated vmlinux",
			cfg:  withConfig(t, "bad-3", func(c *vm.Config) { c.Kernel = truncatedKernel }),
			want: vm.ErrInvalid, field: "kernel",
		},
		{
			name: "rootfs is a directory",
			cfg:  withConfig(t, "bad-4", func(c *vm.Config) { c.Rootfs = files }),
			want: vm.ErrInvalid, field: "rootfs",
		},
		{
			name: "drive path does not exist",
			cfg: withConfig(t, "bad-5", func(c *vm.Config) {
				c.ExtraDrives = []vm.Drive{{ID: "data", PathOnHost: missing}}
			}),
			want: vm.ErrInvalid, field: "extra_drives[0].path_on_host",
		},
		{
			name: "tap name too long",
			cfg: withConfig(t, "bad-6", func(c *vm.Config) {
				c.NetworkInterfaces = []vm.NetworkInterface{{IfaceID: "eth0", HostDevName: "tap-name-too-long-0"}}
			}),
			want: vm.ErrInvalid, field: "network_interfaces[0].host_dev_name",
		},
		{
			name: "vsock without vhost-vsock",
			cfg: withConfig(t, "bad-7", func(c *vm.Config) {
				c.Vsock = &vm.Vsock{GuestCID: 3, UDSPath: filepath.Join(files, "v.sock")}
			}),
			want: vm.ErrUnsupported,
		},
		{
			name: "network rate limiter",
			cfg: withConfig(t, "bad-8", func(c *vm.Config) {
				c.NetworkInterfaces = []vm.NetworkInterface{{
					IfaceID: "eth0", HostDevName: "tap0",
					TxRateLimiter: &vm.RateLimiter{Bandwidth: &vm.TokenBucket{Size: 1000, RefillTime: 100}},
				}}
			}),
			want: vm.ErrUnsupported,
		},
		{
			name: "truncated snapshot",
			cfg:  restore("bad-9", vm.SnapshotRef{VMID: "source", SnapshotID: "truncated"}),
			want: ErrSnapshotCorrupt,
		},
		{
			name: "snapshot stream qemu cannot load",
			cfg:  restore("bad-10", vm.SnapshotRef{VMID: "source", SnapshotID: "garbled"}),
			want: vm.ErrSnapshotIncompatible,
		},
		{
			name: "snapshot taken under another accelerator",
			cfg:  restore("bad-15", vm.SnapshotRef{VMID: "source", SnapshotID: "kvm"}),
			want: vm.ErrSnapshotIncompatible,
		},
		{
			name: "more memory than the snapshot",
			cfg: func() vm.Config {
				c := restore("bad-11", vm.SnapshotRef{VMID: "source", SnapshotID: "good"})
				c.MemSizeMiB = 2 * testMemMiB
				return c
			}(),
			want: vm.ErrSnapshotIncompatible,
		},
		{
			name: "unknown snapshot",
			cfg:  restore("bad-12", vm.SnapshotRef{VMID: "source", SnapshotID: "nope"}),
			want: vm.ErrSnapshotNotFound,
		},
		{
			name: "override of an interface the snapshot lacks",
			cfg: restore("bad-13", vm.SnapshotRef{VMID: "source", SnapshotID: "good",
				NetworkOverrides: []vm.NetworkOverride{{IfaceID: "eth9", HostDevName: "tap9"}}}),
			want: vm.ErrSnapshotIncompatible,
		},
		{
			name: "vsock override",
			cfg: restore("bad-14", vm.SnapshotRef{VMID: "source", SnapshotID: "good",
				VsockOverride: &vm.VsockOverride{UDSPath: filepath.Join(files, "v2.sock")}}),
			want: vm.ErrUnsupported,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.Create(ctx, tc.cfg)
			if !errors.Is(err, tc.want) {
				t.Fatalf("create: err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.cfg.ID) {
				t.Errorf("error %q does not name the vm %q", err, tc.cfg.ID)
			}
			if tc.field != "" {
				var ve *vm.ValidationError
				if !errors.As(err, &ve) {
					t.Fatalf("err = %T, want *vm.ValidationError", err)
				}
				if !slices.ContainsFunc(ve.Problems, func(f vm.FieldError) bool { return f.Field == tc.field }) {
					t.Errorf("problems %v do not name field %q", ve.Problems, tc.field)
				}
			}
			if _, err := p.Get(ctx, tc.cfg.ID); !errors.Is(err, vm.ErrNotFound) {
				t.Errorf("failed create left a vm: get err = %v", err)
			}
			if err := leaked(p, tc.cfg.ID); err != nil {
				t.Error(err)
			}
			if got := mustAsk(t, p, "bystander", "ping"); got != "pong" {
				t.Errorf("bystander replied %q to a ping", got)
			}
		})
	}

	// The intact snapshot still restores after all of that.
	info, err := p.Create(ctx, restore("survivor", vm.SnapshotRef{VMID: "source", SnapshotID: "good", ResumeImmediately: true}))
	if err != nil {
		t.Fatalf("restore the good snapshot: %v", err)
	}
	if info.State != vm.StateRunning {
		t.Errorf("restored state %s, want running", info.State)
	}
	list, err := p.ListSnapshots(ctx, "source")
	if err != nil || len(list) != 4 {
		t.Errorf("list snapshots: %d, %v; want 4", len(list), err)
	}
}

func withConfig(t *testing.T, id string, mutate func(*vm.Config)) vm.Config {
	cfg := testConfig(t, id)
	mutate(&cfg)
	return cfg
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// truncate cuts the file at path to half its size.
func truncate(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, st.Size()/2); err != nil {
		t.Fatal(err)
	}
}

// garble truncates the state file of the snapshot in dir and rewrites its
// metadata to the new size.
func garble(t *testing.T, dir string) {
	t.Helper()
	state := filepath.Join(dir, snapshotStateName)
	truncate(t, state)
	st, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	editMeta(t, dir, func(m *snapshotMeta) { m.StateSize = st.Size() })
}

// editMeta rewrites the metadata of the snapshot in dir with edit.
func editMeta(t *testing.T, dir string, edit func(*snapshotMeta)) {
	t.Helper()
	metaPath := filepath.Join(dir, snapshotMetaName)
	b, err := os.ReadFile(metaPath)
	if err != nil {
		t.Fatal(err)
	}
	var meta snapshotMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		t.Fatal(err)
	}
	edit(&meta)
	if b, err = json.Marshal(meta); err != nil {
		t.Fatal(err)
	}
	writeFile(t, metaPath, b)
}
