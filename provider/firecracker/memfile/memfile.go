// Package memfile handles Firecracker guest memory files: it finds their
// data regions with SEEK_DATA and SEEK_HOLE and merges a diff snapshot's
// memory file onto its base.
//
// A diff snapshot's memory file has the guest's size but contains only the
// pages written since the previous snapshot; every other page is a hole.
// Copying only its data regions onto a copy of the base gives one complete
// memory file, so a chain of diffs can be restored as one full snapshot.
// The merge relies on the filesystem reporting holes (ext4, xfs, btrfs and
// tmpfs do). On a filesystem that does not, every byte counts as data and a
// diff overwrites all of its base, which is wrong; [Merge] cannot detect
// that case.
package memfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/embervm/ember/internal/fsutil"
)

// Extent is a data region of a file: Length bytes at Offset.
type Extent = fsutil.Extent

// DataExtents returns the data regions of f in offset order, found with
// lseek SEEK_DATA and SEEK_HOLE. It moves f's offset.
func DataExtents(f *os.File) ([]Extent, error) { return fsutil.DataExtents(f) }

// Apply copies the data regions of the diff memory file onto dst, which
// must already contain the diff's parent. It returns the number of bytes
// copied. Files of different sizes are rejected, because a diff applies
// only to memory of its own size.
func Apply(dst *os.File, diffPath string) (int64, error) {
	return apply(context.Background(), dst, diffPath)
}

// apply is Apply that stops between data regions when ctx ends.
func apply(ctx context.Context, dst *os.File, diffPath string) (int64, error) {
	diff, err := os.Open(diffPath)
	if err != nil {
		return 0, fmt.Errorf("apply diff %s: %w", diffPath, err)
	}
	defer diff.Close()
	dfi, err := diff.Stat()
	if err != nil {
		return 0, fmt.Errorf("apply diff %s: %w", diffPath, err)
	}
	bfi, err := dst.Stat()
	if err != nil {
		return 0, fmt.Errorf("apply diff %s: %w", diffPath, err)
	}
	if dfi.Size() != bfi.Size() {
		return 0, fmt.Errorf("apply diff %s: %w: diff is %d bytes, base is %d", diffPath, ErrSizeMismatch, dfi.Size(), bfi.Size())
	}
	extents, err := DataExtents(diff)
	if err != nil {
		return 0, fmt.Errorf("apply diff %s: %w", diffPath, err)
	}
	var copied int64
	for _, e := range extents {
		if err := ctx.Err(); err != nil {
			return copied, fmt.Errorf("apply diff %s: %w", diffPath, err)
		}
		n, err := copyRange(dst, diff, e)
		copied += n
		if err != nil {
			return copied, fmt.Errorf("apply diff %s at offset %d: %w", diffPath, e.Offset, err)
		}
	}
	return copied, nil
}

// ErrSizeMismatch means a diff and its base differ in size.
var ErrSizeMismatch = errors.New("memory file sizes differ")

func copyRange(dst, src *os.File, e Extent) (int64, error) {
	buf := make([]byte, min(e.Length, 1<<20))
	var done int64
	for done < e.Length {
		chunk := buf[:min(int64(len(buf)), e.Length-done)]
		n, err := src.ReadAt(chunk, e.Offset+done)
		if n > 0 {
			if _, werr := dst.WriteAt(chunk[:n], e.Offset+done); werr != nil {
				return done, werr
			}
			done += int64(n)
		}
		if err != nil && !(errors.Is(err, io.EOF) && done == e.Length) {
			return done, err
		}
	}
	return done, nil
}

// Merge writes to outPath the memory of the last diff in chain applied, in
// order, onto base. The output keeps the base's holes, so it stays sparse.
// outPath is written through a temporary file and renamed, so a failed merge
// leaves no partial output.
func Merge(outPath, base string, chain ...string) error {
	tmp := outPath + ".partial"
	// A partial file from an earlier merge that crashed is stale.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("merge memory into %s: %w", outPath, err)
	}
	if _, err := fsutil.CopyFile(tmp, base); err != nil {
		return fmt.Errorf("merge memory into %s: %w", outPath, err)
	}
	out, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("merge memory into %s: %w", outPath, err)
	}
	for _, diff := range chain {
		if _, err := Apply(out, diff); err != nil {
			out.Close()
			os.Remove(tmp)
			return fmt.Errorf("merge memory into %s: %w", outPath, err)
		}
	}
	if err := out.Sync(); err != nil {
		out.Close()
		os.Remove(tmp)
		return fmt.Errorf("merge memory into %s: %w", outPath, err)
	}
	out.Close()
	if err := os.Rename(tmp, outPath); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("merge memory into %s: %w", outPath, err)
	}
	return nil
}

// Merger merges Firecracker diff memory files in place. It implements the
// MemoryMerger interface of Ember's snapshot package, which flattens a
// chain of diff snapshots into one full snapshot. The zero value is ready
// to use.
type Merger struct{}

// MergeMemory applies the data regions of the diff memory file onto dst,
// which must already contain the merged memory of the diff's ancestors and
// have the diff's size. dst is changed in place: when MergeMemory fails or
// ctx ends part-way, dst is partly merged and the caller must discard it.
func (Merger) MergeMemory(ctx context.Context, dst, diff string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("merge memory %s into %s: %w", diff, dst, err)
	}
	out, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("merge memory %s into %s: %w", diff, dst, err)
	}
	if _, err := apply(ctx, out, diff); err != nil {
		out.Close()
		return fmt.Errorf("merge memory into %s: %w", dst, err)
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return fmt.Errorf("merge memory %s into %s: %w", diff, dst, err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("merge memory %s into %s: %w", diff, dst, err)
	}
	return nil
}
