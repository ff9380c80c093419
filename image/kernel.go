package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// DefaultKernelPackage is the Debian metapackage whose current versioned
// kernel package the builder downloads when no kernel is given.
const DefaultKernelPackage = "linux-image-cloud-amd64"

// kernelKind is the kind of file given as a kernel.
type kernelKind int

const (
	kernelUnknown kernelKind = iota
	kernelVmlinux
	kernelBzImage
	kernelDeb
)

func (k kernelKind) String() string {
	switch k {
	case kernelVmlinux:
		return "vmlinux"
	case kernelBzImage:
		return "bzImage"
	case kernelDeb:
		return "deb"
	default:
		return "unknown"
	}
}

// detectKernelKind identifies a vmlinux, a bzImage or a .deb by its first
// bytes.
func detectKernelKind(head []byte) kernelKind {
	switch {
	case bytes.HasPrefix(head, []byte("\x7fELF")):
		return kernelVmlinux
	case bytes.HasPrefix(head, []byte(arMagic)):
		return kernelDeb
	case len(head) >= offHeaderMagic+4 && bytes.Equal(head[offHeaderMagic:offHeaderMagic+4], headerMagic):
		return kernelBzImage
	default:
		return kernelUnknown
	}
}

// kernel is a kernel ready to go into a bundle.
type kernel struct {
	vmlinux []byte
	info    *VmlinuxInfo
	// release is the kernel release, such as "6.1.0-57-cloud-amd64".
	release string
	// moduleRoot is the lib/modules/<release> tree, or "" without one.
	moduleRoot string
}

// loadKernelFile reads a vmlinux, bzImage or .deb. A .deb is extracted
// below scratch. The returned kernel has a module tree only for a .deb.
func loadKernelFile(ctx context.Context, p, scratch string) (*kernel, error) {
	head := make([]byte, setupHeaderEnd)
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("load kernel %s: %w", p, err)
	}
	n, err := io.ReadFull(f, head)
	f.Close()
	if err != nil && err != io.ErrUnexpectedEOF {
		return nil, fmt.Errorf("load kernel %s: %w", p, err)
	}
	head = head[:n]

	switch kind := detectKernelKind(head); kind {
	case kernelVmlinux, kernelBzImage:
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("load kernel %s: %w", p, err)
		}
		k, err := kernelFromImage(data)
		if err != nil {
			return nil, fmt.Errorf("load kernel %s: %w", p, err)
		}
		return k, nil
	case kernelDeb:
		return kernelFromDeb(ctx, p, scratch)
	default:
		return nil, fmt.Errorf("load kernel %s: not a vmlinux (ELF), bzImage (\"HdrS\" header) or Debian package (ar archive): %w", p, ErrNotVmlinux)
	}
}

// kernelFromImage turns the contents of a vmlinux or bzImage into a
// verified vmlinux.
func kernelFromImage(data []byte) (*kernel, error) {
	k := &kernel{vmlinux: data}
	if detectKernelKind(data) == kernelBzImage {
		vmlinux, hdr, err := ExtractVmlinux(data)
		if err != nil {
			return nil, err
		}
		k.vmlinux = vmlinux
		k.release = releaseFromVersionString(hdr.KernelVersion)
	}
	info, err := VerifyVmlinux(bytes.NewReader(k.vmlinux))
	if err != nil {
		return nil, err
	}
	k.info = info
	if k.release == "" {
		k.release = kernelReleaseFromImage(k.vmlinux)
	}
	return k, nil
}

// kernelFromDeb extracts the kernel image and module tree of a Debian
// kernel package into scratch.
func kernelFromDeb(ctx context.Context, debPath, scratch string) (*kernel, error) {
	dest := filepath.Join(scratch, "deb")
	keep := func(name string) bool {
		return strings.HasPrefix(name, "boot/vmlinuz-") || strings.HasPrefix(name, "boot/vmlinux-") ||
			strings.HasPrefix(name, "lib/modules/") || strings.HasPrefix(name, "usr/lib/modules/")
	}
	files, err := extractDeb(ctx, debPath, dest, keep)
	if err != nil {
		return nil, err
	}

	var images, releases []string
	seen := make(map[string]bool)
	for _, f := range files {
		switch {
		case strings.HasPrefix(f, "boot/"):
			images = append(images, f)
		default:
			// lib/modules/<release>/... or usr/lib/modules/<release>/...
			rest := strings.TrimPrefix(strings.TrimPrefix(f, "usr/"), "lib/modules/")
			rel, _, ok := strings.Cut(rest, "/")
			if ok && !seen[rel] {
				seen[rel] = true
				releases = append(releases, f[:len(f)-len(rest)]+rel)
			}
		}
	}
	if len(images) != 1 {
		return nil, fmt.Errorf("load kernel %s: want one boot/vmlinuz-* or boot/vmlinux-*, found %d: %w", debPath, len(images), ErrInvalidDeb)
	}
	if len(releases) > 1 {
		return nil, fmt.Errorf("load kernel %s: module trees for several releases %v: %w", debPath, releases, ErrInvalidDeb)
	}

	data, err := os.ReadFile(filepath.Join(dest, filepath.FromSlash(images[0])))
	if err != nil {
		return nil, fmt.Errorf("load kernel %s: %w", debPath, err)
	}
	k, err := kernelFromImage(data)
	if err != nil {
		return nil, fmt.Errorf("load kernel %s from %s: %w", images[0], debPath, err)
	}
	base := path.Base(images[0])
	fileRelease := strings.TrimPrefix(strings.TrimPrefix(base, "vmlinuz-"), "vmlinux-")
	if len(releases) == 1 {
		k.moduleRoot = filepath.Join(dest, filepath.FromSlash(releases[0]))
		k.release = path.Base(releases[0])
	} else if fileRelease != "" {
		k.release = fileRelease
	}
	return k, nil
}

// debPackage is a Debian package as the apt cache describes it.
type debPackage struct {
	Name    string
	Version string
	SHA256  string
	Size    int64
}

// parseAptDepends returns the first dependency of pkg named with prefix in
// the output of `apt-cache depends pkg`, such as
// "linux-image-6.1.0-57-cloud-amd64" for the cloud kernel metapackage.
func parseAptDepends(out []byte, prefix string) (string, bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		// Alternatives are marked with '|' before "Depends".
		line = strings.TrimPrefix(line, "|")
		dep, ok := strings.CutPrefix(line, "Depends: ")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if strings.HasPrefix(dep, prefix) && !strings.HasPrefix(dep, "<") {
			return dep, true
		}
	}
	return "", false
}

// parseAptShow reads the first stanza of `apt-cache show --no-all-versions`.
func parseAptShow(out []byte) (*debPackage, error) {
	p := &debPackage{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" && p.Name != "" {
			break
		}
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			continue
		}
		switch k {
		case "Package":
			p.Name = v
		case "Version":
			p.Version = v
		case "SHA256":
			p.SHA256 = v
		case "Size":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("parse apt-cache show: size %q: %w", v, err)
			}
			p.Size = n
		}
	}
	if p.Name == "" || p.Version == "" {
		return nil, fmt.Errorf("parse apt-cache show: no Package and Version fields")
	}
	return p, nil
}

// resolveDebianKernel finds the versioned package that the metapackage
// depends on and its version and digest, from the local apt cache.
func resolveDebianKernel(ctx context.Context, metapackage string) (*debPackage, error) {
	out, err := runCommand(ctx, "", "apt-cache", "depends", metapackage)
	if err != nil {
		return nil, fmt.Errorf("resolve kernel package %s: %w (run apt-get update, or pass --kernel)", metapackage, err)
	}
	name, ok := parseAptDepends(out, "linux-image-")
	if !ok {
		return nil, fmt.Errorf("resolve kernel package %s: no linux-image-* dependency in apt-cache output (run apt-get update, or pass --kernel)", metapackage)
	}
	out, err = runCommand(ctx, "", "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return nil, fmt.Errorf("resolve kernel package %s: %w", name, err)
	}
	pkg, err := parseAptShow(out)
	if err != nil {
		return nil, fmt.Errorf("resolve kernel package %s: %w", name, err)
	}
	return pkg, nil
}

// downloadDebianPackage runs `apt-get download` in dir and returns the
// path of the downloaded file, after checking its SHA-256 against the apt
// cache's. It reports the bytes received so far through report.
func downloadDebianPackage(ctx context.Context, pkg *debPackage, dir string, report func(done int64)) (string, error) {
	stop := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				report(dirBytes(dir))
			}
		}
	}()
	_, err := runCommand(ctx, dir, "apt-get", "download", pkg.Name+"="+pkg.Version)
	close(stop)
	<-polled
	if err != nil {
		return "", fmt.Errorf("download %s=%s: %w", pkg.Name, pkg.Version, err)
	}

	matches, err := filepath.Glob(filepath.Join(dir, pkg.Name+"_*.deb"))
	if err != nil || len(matches) != 1 {
		return "", fmt.Errorf("download %s=%s: want one .deb in %s, found %d", pkg.Name, pkg.Version, dir, len(matches))
	}
	sum, err := fileSHA256(matches[0])
	if err != nil {
		return "", fmt.Errorf("download %s=%s: %w", pkg.Name, pkg.Version, err)
	}
	report(dirBytes(dir))
	if pkg.SHA256 != "" && sum != pkg.SHA256 {
		return "", fmt.Errorf("download %s=%s: sha256 %s, apt cache lists %s", pkg.Name, pkg.Version, sum, pkg.SHA256)
	}
	return matches[0], nil
}

// dirBytes returns the total size of the regular files directly in dir and
// in its partial/ subdirectory, where apt writes files being fetched.
func dirBytes(dir string) int64 {
	var total int64
	for _, d := range []string{dir, filepath.Join(dir, "partial")} {
		entries, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range entries {
			if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
				total += info.Size()
			}
		}
	}
	return total
}

// runCommand runs a program in dir with argv and no shell, and returns its
// standard output. A failure includes the end of its standard error.
func runCommand(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	return runCommandWith(ctx, dir, nil, name, args...)
}

// runCommandWith is runCommand with extra environment variables, which
// override the inherited ones.
func runCommandWith(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = "..." + msg[len(msg)-2000:]
		}
		if msg != "" {
			return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
		}
		return nil, fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return stdout.Bytes(), nil
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
