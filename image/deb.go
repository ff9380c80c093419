package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// A Debian binary package is an ar archive: the global header "!<arch>\n",
// then members, each a 60-byte header followed by its data padded to an
// even length. The members are debian-binary, control.tar.* and
// data.tar.*, whose suffix names the compression.
const (
	arMagic      = "!<arch>\n"
	arHeaderSize = 60
)

// arMember is one member of an ar archive.
type arMember struct {
	Name string
	Size int64
}

// arReader reads the members of an ar archive in order.
type arReader struct {
	r *bufio.Reader
	// dataLeft is the unread data of the current member, and padLeft the
	// padding byte after it (0 or 1).
	dataLeft int64
	padLeft  int64
}

func newArReader(r io.Reader) (*arReader, error) {
	br := bufio.NewReader(r)
	magic := make([]byte, len(arMagic))
	if _, err := io.ReadFull(br, magic); err != nil {
		return nil, fmt.Errorf("read ar magic: %w: %w", ErrInvalidDeb, err)
	}
	if string(magic) != arMagic {
		return nil, fmt.Errorf("read ar magic: got %q: %w", magic, ErrInvalidDeb)
	}
	return &arReader{r: br}, nil
}

// Next skips the rest of the current member and returns the next member's
// header. It returns io.EOF after the last member.
func (a *arReader) Next() (*arMember, error) {
	if skip := a.dataLeft + a.padLeft; skip > 0 {
		if _, err := io.CopyN(io.Discard, a.r, skip); err != nil {
			return nil, fmt.Errorf("skip ar member: %w: %w", ErrInvalidDeb, err)
		}
		a.dataLeft, a.padLeft = 0, 0
	}

	var hdr [arHeaderSize]byte
	n, err := io.ReadFull(a.r, hdr[:])
	if err == io.EOF {
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("read ar header: %d of %d bytes: %w", n, arHeaderSize, ErrInvalidDeb)
	}
	if hdr[58] != '`' || hdr[59] != '\n' {
		return nil, fmt.Errorf("read ar header: bad terminator %q: %w", hdr[58:60], ErrInvalidDeb)
	}

	// GNU ar ends names with '/', and dpkg pads them with spaces.
	name := strings.TrimRight(string(hdr[0:16]), " ")
	name = strings.TrimSuffix(name, "/")
	sizeField := strings.TrimSpace(string(hdr[48:58]))
	size, err := strconv.ParseInt(sizeField, 10, 64)
	if err != nil || size < 0 {
		return nil, fmt.Errorf("read ar header of %q: bad size %q: %w", name, sizeField, ErrInvalidDeb)
	}
	a.dataLeft, a.padLeft = size, size%2
	return &arMember{Name: name, Size: size}, nil
}

// Read reads the data of the current member.
func (a *arReader) Read(p []byte) (int, error) {
	if a.dataLeft <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > a.dataLeft {
		p = p[:a.dataLeft]
	}
	n, err := a.r.Read(p)
	a.dataLeft -= int64(n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// debCompression maps a data.tar member's suffix to its compression.
func debCompression(member string) (Compression, bool) {
	switch path.Ext(member) {
	case ".xz":
		return CompressionXZ, true
	case ".zst":
		return CompressionZstd, true
	case ".gz":
		return CompressionGzip, true
	case ".bz2":
		return CompressionBzip2, true
	case ".tar":
		return CompressionNone, true
	default:
		return CompressionNone, false
	}
}

// extractDeb extracts the regular files of a .deb's data.tar whose paths
// (relative, without a leading "./") keep returns true into dest, creating
// directories as needed. It returns the extracted paths, relative to dest,
// in archive order. Paths that would leave dest are rejected. Symbolic
// links, devices and other special files are skipped, because the builder
// needs only the kernel image and module files.
func extractDeb(ctx context.Context, debPath, dest string, keep func(name string) bool) ([]string, error) {
	f, err := os.Open(debPath)
	if err != nil {
		return nil, fmt.Errorf("extract deb %s: %w", debPath, err)
	}
	defer f.Close()

	files, err := extractDebFrom(ctx, f, dest, keep)
	if err != nil {
		return nil, fmt.Errorf("extract deb %s: %w", debPath, err)
	}
	return files, nil
}

func extractDebFrom(ctx context.Context, r io.Reader, dest string, keep func(name string) bool) ([]string, error) {
	ar, err := newArReader(r)
	if err != nil {
		return nil, err
	}
	for {
		m, err := ar.Next()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("no data.tar member: %w", ErrInvalidDeb)
		}
		if err != nil {
			return nil, err
		}
		if !strings.HasPrefix(m.Name, "data.tar") {
			continue
		}
		c, ok := debCompression(m.Name)
		if !ok {
			return nil, fmt.Errorf("member %q: unsupported compression: %w", m.Name, ErrInvalidDeb)
		}
		var tr io.Reader = ar
		if c != CompressionNone {
			zr, err := NewDecompressor(c, ar)
			if err != nil {
				return nil, fmt.Errorf("member %q: %w: %w", m.Name, ErrInvalidDeb, err)
			}
			defer zr.Close()
			tr = zr
		}
		return extractTar(ctx, tar.NewReader(tr), dest, keep)
	}
}

func extractTar(ctx context.Context, tr *tar.Reader, dest string, keep func(name string) bool) ([]string, error) {
	var files []string
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read data.tar: %w: %w", ErrInvalidDeb, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		name := strings.TrimPrefix(h.Name, "./")
		if !filepath.IsLocal(name) {
			return nil, fmt.Errorf("data.tar entry %q: path leaves the archive root: %w", h.Name, ErrInvalidDeb)
		}
		name = path.Clean(name)
		if !keep(name) {
			continue
		}
		if err := writeFileFrom(filepath.Join(dest, filepath.FromSlash(name)), tr, h.FileInfo().Mode().Perm()); err != nil {
			return nil, fmt.Errorf("data.tar entry %q: %w", h.Name, err)
		}
		files = append(files, name)
	}
}

func writeFileFrom(dst string, r io.Reader, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm|0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, r); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// readArMembers lists the members of an ar archive. The fuzz target and
// tests use it to exercise the parser on its own.
func readArMembers(b []byte) ([]arMember, error) {
	ar, err := newArReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	var members []arMember
	for {
		m, err := ar.Next()
		if errors.Is(err, io.EOF) {
			return members, nil
		}
		if err != nil {
			return members, err
		}
		if _, err := io.Copy(io.Discard, ar); err != nil {
			return members, fmt.Errorf("read ar member %q: %w: %w", m.Name, ErrInvalidDeb, err)
		}
		members = append(members, *m)
	}
}
