package image

import (
	"compress/gzip"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
)

// Paths inside the initramfs that the guest agent relies on.
const (
	// InitramfsModuleList is the file that lists the absolute paths of the
	// modules to load, one per line, dependencies first.
	InitramfsModuleList = "/etc/ember/modules"
	initramfsInit       = "init"
	initramfsAgentLink  = "sbin/ember-agent"
)

// initramfsDirs are the directories every initramfs has, even when empty,
// because the agent mounts file systems on them and the root filesystem on
// /newroot.
var initramfsDirs = []string{"proc", "sys", "dev", "tmp", "run", "newroot", "etc", "etc/ember", "sbin"}

// InitramfsModule is a kernel module stored in the initramfs.
type InitramfsModule struct {
	// Path is relative to lib/modules/<release>, without a compression
	// suffix, such as "kernel/drivers/virtio/virtio_mmio.ko".
	Path string
	// Data is the uncompressed module.
	Data []byte
}

// InitramfsContents describes what an initramfs contains.
type InitramfsContents struct {
	// Agent is the static ember-agent binary, stored as /init.
	Agent []byte
	// KernelRelease names the lib/modules directory, such as
	// "6.1.0-57-cloud-amd64". It may be empty only without modules.
	KernelRelease string
	// Modules are stored and listed in this order, which must be a load
	// order (dependencies first).
	Modules []InitramfsModule
}

// WriteInitramfs writes a gzip-compressed newc cpio archive with the agent
// at /init, /sbin/ember-agent as a symbolic link to it, the modules under
// /lib/modules/<release>, the module list at /etc/ember/modules, the empty
// directories the agent mounts on, and the device nodes /dev/console (5:1)
// and /dev/null (1:3). A cpio archive describes device nodes without
// creating them, so no privileges are needed.
//
// The output depends only on c: entries are sorted by path with every
// parent directory before its children, inode numbers follow that order,
// and all mtimes, uids and gids are 0.
func WriteInitramfs(w io.Writer, c InitramfsContents) error {
	records, err := initramfsRecords(c)
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}

	zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	cw := cpio.Newc.Writer(zw)
	for i, r := range records {
		r.Ino = uint64(i + 1)
		if err := cw.WriteRecord(r); err != nil {
			return fmt.Errorf("write initramfs entry %q: %w", r.Name, err)
		}
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return fmt.Errorf("write initramfs trailer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}

// initramfsRecords returns the archive's records, sorted and with every
// parent directory present.
func initramfsRecords(c InitramfsContents) ([]cpio.Record, error) {
	if len(c.Agent) == 0 {
		return nil, fmt.Errorf("agent binary is empty: %w", ErrAgentNotFound)
	}
	if len(c.Modules) > 0 && (c.KernelRelease == "" || strings.ContainsAny(c.KernelRelease, "/\x00") || c.KernelRelease == "." || c.KernelRelease == "..") {
		return nil, fmt.Errorf("invalid kernel release %q for the module directory", c.KernelRelease)
	}

	byName := make(map[string]cpio.Record)
	add := func(r cpio.Record) error {
		if _, dup := byName[r.Name]; dup {
			return fmt.Errorf("duplicate entry %q", r.Name)
		}
		byName[r.Name] = r
		return nil
	}
	addDirs := func(p string) {
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = cpio.Directory(d, 0o755)
			}
		}
	}

	for _, d := range initramfsDirs {
		byName[d] = cpio.Directory(d, 0o755)
	}
	tmp := byName["tmp"]
	tmp.Mode = cpio.S_IFDIR | 0o1777
	byName["tmp"] = tmp

	files := []cpio.Record{
		cpio.StaticRecord(c.Agent, cpio.Info{Name: initramfsInit, Mode: cpio.S_IFREG | 0o755}),
		cpio.Symlink(initramfsAgentLink, "/"+initramfsInit),
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.CharDev("dev/null", 0o666, 1, 3),
	}

	var list strings.Builder
	for _, m := range c.Modules {
		rel := path.Clean(m.Path)
		if rel != m.Path || path.IsAbs(rel) || strings.HasPrefix(rel, "../") || rel == ".." || !strings.HasSuffix(rel, ".ko") {
			return nil, fmt.Errorf("invalid module path %q: want a relative .ko path", m.Path)
		}
		name := path.Join("lib/modules", c.KernelRelease, rel)
		files = append(files, cpio.StaticRecord(m.Data, cpio.Info{Name: name, Mode: cpio.S_IFREG | 0o644}))
		list.WriteString("/" + name + "\n")
	}
	files = append(files, cpio.StaticRecord([]byte(list.String()),
		cpio.Info{Name: strings.TrimPrefix(InitramfsModuleList, "/"), Mode: cpio.S_IFREG | 0o644}))

	for _, f := range files {
		addDirs(f.Name)
		if err := add(f); err != nil {
			return nil, err
		}
	}

	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	// Plain byte order puts a directory before its children, because a
	// directory's name is a prefix of theirs.
	sort.Strings(names)
	records := make([]cpio.Record, len(names))
	for i, n := range names {
		r := byName[n]
		r.NLink = 1
		if r.Mode&cpio.S_IFMT == cpio.S_IFDIR {
			r.NLink = 2
		}
		records[i] = cpio.MakeReproducible(r)
	}
	return records, nil
}
