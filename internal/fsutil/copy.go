package fsutil

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// CopyFile copies src to dst, a file it creates, and returns the size. It
// shares the blocks (FICLONE) where the file system can, and otherwise
// copies only the data regions of a sparse file so that holes stay holes.
// The copy is fsynced before CopyFile returns. On failure dst is removed,
// and an existing dst fails with an error matching [fs.ErrExist].
func CopyFile(dst, src string) (size int64, err error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return 0, err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()

	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) != nil {
		if err := copyDataRegions(out, in); err != nil {
			return 0, err
		}
		if err := out.Truncate(st.Size()); err != nil {
			return 0, err
		}
	}
	return st.Size(), out.Sync()
}

// copyDataRegions copies the data regions of in to the same offsets of
// out.
func copyDataRegions(out, in *os.File) error {
	extents, err := DataExtents(in)
	if err != nil {
		return err
	}
	for _, e := range extents {
		if _, err := io.Copy(io.NewOffsetWriter(out, e.Offset), io.NewSectionReader(in, e.Offset, e.Length)); err != nil {
			return err
		}
	}
	return nil
}

// Extent is a data region of a file: Length bytes at Offset.
type Extent struct {
	Offset, Length int64
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// DataExtents returns the data regions of f in offset order, found with
// lseek SEEK_DATA and SEEK_HOLE. It moves f's offset.
func DataExtents(f *os.File) ([]Extent, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("find data regions of %s: %w", f.Name(), err)
	}
	size := fi.Size()
	var out []Extent
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return nil, fmt.Errorf("find data regions of %s: seek data at %d: %w", f.Name(), off, err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("find data regions of %s: seek hole at %d: %w", f.Name(), start, err)
		}
		if end > size {
			end = size
		}
		if end <= start {
			break
		}
		out = append(out, Extent{Offset: start, Length: end - start})
		off = end
	}
	return out, nil
}
