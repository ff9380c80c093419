package fsutil

import (
	"errors"
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
		if err := copyDataRegions(out, in, st.Size()); err != nil {
			return 0, err
		}
		if err := out.Truncate(st.Size()); err != nil {
			return 0, err
		}
	}
	return st.Size(), out.Sync()
}

// copyDataRegions copies the data regions of in (size bytes) to the same
// offsets of out, found with SEEK_DATA and SEEK_HOLE.
func copyDataRegions(out, in *os.File, size int64) error {
	fd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole remains
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return nil
}
