package image

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

// ManifestSchemaVersion is the version of the manifest's JSON layout.
// Readers reject other versions.
const ManifestSchemaVersion = 1

// File names inside a bundle directory.
const (
	ManifestFile  = "manifest.json"
	VmlinuxFile   = "vmlinux"
	InitramfsFile = "initramfs.cpio.gz"
	RootfsFile    = "rootfs.ext4"
)

// Boot modes of the guest agent, the values of the ember.mode kernel
// command line key.
const (
	ModeInitramfs  = "initramfs"
	ModeSwitchRoot = "switchroot"
)

// FileInfo describes one file of a bundle.
type FileInfo struct {
	// Name is the file name inside the bundle directory.
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Manifest describes a guest bundle. It is stored as manifest.json in the
// bundle directory.
type Manifest struct {
	SchemaVersion int `json:"schema_version"`
	// KernelRelease is the release of the kernel, such as
	// "6.1.0-57-cloud-amd64", and names the module directory.
	KernelRelease string `json:"kernel_release"`
	// KernelSource is the kernel's origin: a Debian package as
	// "name=version", or a file path.
	KernelSource string `json:"kernel_source"`
	// PVHEntry is the kernel's PVH entry point as a hex string, or empty
	// when the kernel has no PVH note.
	PVHEntry  string   `json:"pvh_entry,omitempty"`
	Kernel    FileInfo `json:"kernel"`
	Initramfs FileInfo `json:"initramfs"`
	Rootfs    FileInfo `json:"rootfs"`
	// Modules lists the module names in the initramfs in load order.
	Modules []string `json:"modules"`
	// BuiltinModules lists requested modules the kernel has built in.
	BuiltinModules []string `json:"builtin_modules,omitempty"`
	// BootArgs maps each boot mode (ModeInitramfs, ModeSwitchRoot) to a
	// recommended kernel command line.
	BootArgs map[string]string `json:"boot_args"`
	// Inputs maps each input (kernel, modules, agent, rootfs, options) to
	// its SHA-256 digest.
	Inputs map[string]string `json:"inputs"`
	// InputsDigest is the SHA-256 of Inputs. Build reuses a bundle with
	// the same digest instead of rebuilding it.
	InputsDigest string `json:"inputs_digest"`
}

// Files returns the bundle's files.
func (m *Manifest) Files() []FileInfo { return []FileInfo{m.Kernel, m.Initramfs, m.Rootfs} }

// bootArgs returns the recommended kernel command lines. The serial
// console is ttyS0 on both Firecracker and QEMU microvm. reboot=k makes a
// guest reboot a triple fault, which ends the VMM, and panic=1 reboots a
// second after a panic, so a failed guest stops instead of hanging.
func bootArgs() map[string]string {
	const common = "console=ttyS0 reboot=k panic=1"
	return map[string]string{
		ModeInitramfs:  common + " ember.mode=" + ModeInitramfs,
		ModeSwitchRoot: common + " ember.mode=" + ModeSwitchRoot + " ember.root=/dev/vda ember.rootfstype=ext4",
	}
}

// ReadManifest reads and checks the manifest in a bundle directory.
func ReadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return nil, fmt.Errorf("read manifest in %s: %w", dir, err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read manifest in %s: %w", dir, err)
	}
	if m.SchemaVersion != ManifestSchemaVersion {
		return nil, fmt.Errorf("read manifest in %s: schema version %d, want %d", dir, m.SchemaVersion, ManifestSchemaVersion)
	}
	return &m, nil
}

// errBundleChanged means a bundle file's size or digest differs from the
// manifest.
var errBundleChanged = errors.New("bundle file differs from its manifest")

// VerifyBundle checks that every file the manifest in dir lists exists with
// the recorded size and SHA-256 digest.
func VerifyBundle(dir string) (*Manifest, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	for _, f := range m.Files() {
		if f.Name == "" || filepath.Base(f.Name) != f.Name {
			return nil, fmt.Errorf("verify bundle %s: invalid file name %q in manifest", dir, f.Name)
		}
		p := filepath.Join(dir, f.Name)
		info, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("verify bundle %s: %w", dir, err)
		}
		if info.Size() != f.Size {
			return nil, fmt.Errorf("verify bundle %s: %s is %d bytes, manifest records %d: %w", dir, f.Name, info.Size(), f.Size, errBundleChanged)
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, fmt.Errorf("verify bundle %s: %w", dir, err)
		}
		if sum != f.SHA256 {
			return nil, fmt.Errorf("verify bundle %s: %s has sha256 %s, manifest records %s: %w", dir, f.Name, sum, f.SHA256, errBundleChanged)
		}
	}
	return m, nil
}

// describeFile returns the FileInfo of a file in dir.
func describeFile(dir, name string) (FileInfo, error) {
	p := filepath.Join(dir, name)
	info, err := os.Stat(p)
	if err != nil {
		return FileInfo{}, err
	}
	sum, err := fileSHA256(p)
	if err != nil {
		return FileInfo{}, err
	}
	return FileInfo{Name: name, Size: info.Size(), SHA256: sum}, nil
}

// digestInputs returns the SHA-256 of the input digests, in key order.
func digestInputs(inputs map[string]string) string {
	h := sha256.New()
	for _, k := range sortedKeys(inputs) {
		fmt.Fprintf(h, "%s=%s\n", k, inputs[k])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// digestTree returns a SHA-256 over every entry under dir: its relative
// path, type and permission bits, and the target of a symbolic link or the
// digest of a regular file. Modification times are left out, so touching a
// file does not force a rebuild.
func digestTree(dir string) (string, error) {
	type entry struct{ rel, line string }
	var entries []entry
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%q %v", filepath.ToSlash(rel), info.Mode())
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" -> %q", target)
		case info.Mode().IsRegular():
			sum, err := fileSHA256(p)
			if err != nil {
				return err
			}
			line += " " + sum
		}
		entries = append(entries, entry{rel, line})
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("digest %s: %w", dir, err)
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].rel < entries[j].rel })
	h := sha256.New()
	for _, e := range entries {
		io.WriteString(h, e.line+"\n")
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func writeManifest(dir string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ManifestFile), append(b, '\n'), 0o644)
}
