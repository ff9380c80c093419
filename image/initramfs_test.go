package image

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"
)

func testInitramfsContents() InitramfsContents {
	return InitramfsContents{
		Agent:         []byte("\x7fELF stand-in agent"),
		KernelRelease: "6.1.0-test",
		Modules: []InitramfsModule{
			{Path: "kernel/drivers/virtio/virtio_ring.ko", Data: []byte("ring")},
			{Path: "kernel/drivers/virtio/virtio.ko", Data: []byte("virtio")},
			{Path: "kernel/drivers/virtio/virtio_mmio.ko", Data: []byte("mmio")},
		},
	}
}

func initramfsDigest(t *testing.T, c InitramfsContents) [32]byte {
	t.Helper()
	var b bytes.Buffer
	if err := WriteInitramfs(&b, c); err != nil {
		t.Fatalf("WriteInitramfs: %v", err)
	}
	return sha256.Sum256(b.Bytes())
}

func TestInitramfsDeterministic(t *testing.T) {
	c := testInitramfsContents()
	first := initramfsDigest(t, c)
	if second := initramfsDigest(t, c); second != first {
		t.Fatalf("same contents gave digests %x and %x", first, second)
	}

	changes := map[string]func(c *InitramfsContents){
		"agent":          func(c *InitramfsContents) { c.Agent = []byte("another agent") },
		"module data":    func(c *InitramfsContents) { c.Modules[1].Data = []byte("virtio2") },
		"module order":   func(c *InitramfsContents) { c.Modules[0], c.Modules[1] = c.Modules[1], c.Modules[0] },
		"kernel release": func(c *InitramfsContents) { c.KernelRelease = "6.1.0-other" },
		"no modules":     func(c *InitramfsContents) { c.Modules = nil },
	}
	for name, change := range changes {
		t.Run(name, func(t *testing.T) {
			c := testInitramfsContents()
			change(&c)
			if initramfsDigest(t, c) == first {
				t.Fatalf("changing the %s left the digest unchanged", name)
			}
		})
	}
}

func TestInitramfsLayout(t *testing.T) {
	c := testInitramfsContents()
	var b bytes.Buffer
	if err := WriteInitramfs(&b, c); err != nil {
		t.Fatal(err)
	}
	records, contents := readInitramfs(t, b.Bytes())

	byName := make(map[string]cpio.Record)
	var names []string
	for _, r := range records {
		byName[r.Name] = r
		names = append(names, r.Name)
		if r.MTime != 0 || r.UID != 0 || r.GID != 0 {
			t.Errorf("%s: mtime %d uid %d gid %d, want all 0", r.Name, r.MTime, r.UID, r.GID)
		}
	}

	// Parents come before children, and the order is sorted.
	for i := 1; i < len(names); i++ {
		if names[i-1] >= names[i] {
			t.Errorf("entries out of order: %q before %q", names[i-1], names[i])
		}
	}
	for _, n := range names {
		for d := parentDir(n); d != ""; d = parentDir(d) {
			if _, ok := byName[d]; !ok {
				t.Errorf("%s has no parent directory entry %s", n, d)
			}
		}
	}

	checks := []struct {
		name           string
		mode           uint64
		rmajor, rminor uint64
	}{
		{"init", cpio.S_IFREG | 0o755, 0, 0},
		{"sbin/ember-agent", cpio.S_IFLNK | 0o777, 0, 0},
		{"dev/console", cpio.S_IFCHR | 0o600, 5, 1},
		{"dev/null", cpio.S_IFCHR | 0o666, 1, 3},
		{"tmp", cpio.S_IFDIR | 0o1777, 0, 0},
		{"newroot", cpio.S_IFDIR | 0o755, 0, 0},
		{"proc", cpio.S_IFDIR | 0o755, 0, 0},
		{"sys", cpio.S_IFDIR | 0o755, 0, 0},
		{"run", cpio.S_IFDIR | 0o755, 0, 0},
		{"etc/ember/modules", cpio.S_IFREG | 0o644, 0, 0},
	}
	for _, c := range checks {
		r, ok := byName[c.name]
		if !ok {
			t.Errorf("missing entry %s", c.name)
			continue
		}
		if r.Mode != c.mode || r.Rmajor != c.rmajor || r.Rminor != c.rminor {
			t.Errorf("%s: mode %#o dev %d:%d, want %#o %d:%d", c.name, r.Mode, r.Rmajor, r.Rminor, c.mode, c.rmajor, c.rminor)
		}
	}
	if string(contents["init"]) != string(c.Agent) {
		t.Errorf("/init content differs from the agent")
	}
	if string(contents["sbin/ember-agent"]) != "/init" {
		t.Errorf("/sbin/ember-agent points at %q", contents["sbin/ember-agent"])
	}

	wantList := "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko\n" +
		"/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko\n" +
		"/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_mmio.ko\n"
	if got := string(contents["etc/ember/modules"]); got != wantList {
		t.Errorf("module list:\n%s\nwant:\n%s", got, wantList)
	}
	if got := string(contents["lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko"]); got != "virtio" {
		t.Errorf("virtio.ko content = %q", got)
	}
}

func parentDir(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return ""
	}
	return p[:i]
}

func TestInitramfsRejects(t *testing.T) {
	tests := []struct {
		name   string
		change func(c *InitramfsContents)
		want   error
	}{
		{"empty agent", func(c *InitramfsContents) { c.Agent = nil }, ErrAgentNotFound},
		{"absolute module path", func(c *InitramfsContents) { c.Modules[0].Path = "/kernel/a.ko" }, nil},
		{"module path with ..", func(c *InitramfsContents) { c.Modules[0].Path = "../../init" }, nil},
		{"compressed module path", func(c *InitramfsContents) { c.Modules[0].Path = "kernel/a.ko.xz" }, nil},
		{"unclean module path", func(c *InitramfsContents) { c.Modules[0].Path = "kernel//a.ko" }, nil},
		{"duplicate module", func(c *InitramfsContents) { c.Modules[1] = c.Modules[0] }, nil},
		{"release with slash", func(c *InitramfsContents) { c.KernelRelease = "../etc" }, nil},
		{"no release", func(c *InitramfsContents) { c.KernelRelease = "" }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testInitramfsContents()
			tt.change(&c)
			var b bytes.Buffer
			err := WriteInitramfs(&b, c)
			if err == nil {
				t.Fatalf("WriteInitramfs accepted the contents")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("WriteInitramfs error = %v, want %v", err, tt.want)
			}
			if b.Len() != 0 {
				t.Errorf("WriteInitramfs wrote %d bytes before failing", b.Len())
			}
		})
	}
}
