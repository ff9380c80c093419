package memfile

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

const page = 4096

// writeSparse creates a file of size bytes with the given pages filled with
// their fill byte and every other page a hole.
func writeSparse(t *testing.T, path string, size int64, pages map[int64]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for idx, fill := range pages {
		if _, err := f.WriteAt(bytes.Repeat([]byte{fill}, page), idx*page); err != nil {
			t.Fatal(err)
		}
	}
}

func holesSupported(t *testing.T, dir string) {
	t.Helper()
	path := filepath.Join(dir, "probe")
	writeSparse(t, path, 64*page, map[int64]byte{10: 1})
	f, _ := os.Open(path)
	defer f.Close()
	ext, err := DataExtents(f)
	if err != nil || len(ext) != 1 || ext[0].Length >= 64*page {
		t.Skipf("the filesystem of %s does not report holes (extents %v, %v); run the test on ext4, xfs or tmpfs", dir, ext, err)
	}
}

func TestDataExtents(t *testing.T) {
	dir := t.TempDir()
	holesSupported(t, dir)
	path := filepath.Join(dir, "mem")
	writeSparse(t, path, 256*page, map[int64]byte{0: 1, 1: 2, 100: 3, 255: 4})
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ext, err := DataExtents(f)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, e := range ext {
		total += e.Length
	}
	if len(ext) < 3 || ext[0].Offset != 0 || ext[len(ext)-1].End() != 256*page {
		t.Errorf("extents = %v, want data at pages 0-1, 100 and 255", ext)
	}
	// Filesystems may round extents up to their block size, but never to
	// the whole file.
	if total >= 256*page {
		t.Errorf("extents cover %d bytes, the whole file", total)
	}
}

func TestMergeChain(t *testing.T) {
	dir := t.TempDir()
	holesSupported(t, dir)
	size := int64(64 * page)
	base := filepath.Join(dir, "base")
	diff1 := filepath.Join(dir, "diff1")
	diff2 := filepath.Join(dir, "diff2")
	writeSparse(t, base, size, map[int64]byte{0: 'a', 1: 'a', 2: 'a', 40: 'a'})
	writeSparse(t, diff1, size, map[int64]byte{1: 'b', 50: 'b'})
	writeSparse(t, diff2, size, map[int64]byte{2: 'c', 50: 'c'})

	out := filepath.Join(dir, "merged")
	if err := Merge(out, base, diff1, diff2); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want := map[int64]byte{0: 'a', 1: 'b', 2: 'c', 3: 0, 40: 'a', 50: 'c', 63: 0}
	for idx, fill := range want {
		if !bytes.Equal(got[idx*page:(idx+1)*page], bytes.Repeat([]byte{fill}, page)) {
			t.Errorf("page %d = %q..., want all %q", idx, got[idx*page], fill)
		}
	}
	if _, err := os.Stat(out + ".partial"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}
}

func TestMergeRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base")
	small := filepath.Join(dir, "small")
	writeSparse(t, base, 16*page, map[int64]byte{0: 1})
	writeSparse(t, small, 8*page, map[int64]byte{0: 2})
	out := filepath.Join(dir, "out")

	tests := []struct {
		name  string
		base  string
		chain []string
		want  error
	}{
		{"size mismatch", base, []string{small}, ErrSizeMismatch},
		{"missing diff", base, []string{filepath.Join(dir, "nope")}, os.ErrNotExist},
		{"missing base", filepath.Join(dir, "nope"), nil, os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Merge(out, tt.base, tt.chain...)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Merge error = %v, want %v", err, tt.want)
			}
			for _, p := range []string{out, out + ".partial"} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("%s exists after a failed merge", p)
				}
			}
		})
	}
}

func TestMergerInPlace(t *testing.T) {
	dir := t.TempDir()
	holesSupported(t, dir)
	size := int64(32 * page)
	dst := filepath.Join(dir, "flat")
	diff1 := filepath.Join(dir, "diff1")
	diff2 := filepath.Join(dir, "diff2")
	writeSparse(t, dst, size, map[int64]byte{0: 'a', 1: 'a', 20: 'a'})
	writeSparse(t, diff1, size, map[int64]byte{1: 'b', 30: 'b'})
	writeSparse(t, diff2, size, map[int64]byte{20: 'c', 30: 'c'})

	ctx := context.Background()
	for _, diff := range []string{diff1, diff2} {
		if err := (Merger{}).MergeMemory(ctx, dst, diff); err != nil {
			t.Fatalf("MergeMemory %s: %v", diff, err)
		}
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != size {
		t.Fatalf("merged file is %d bytes, want %d", len(got), size)
	}
	want := map[int64]byte{0: 'a', 1: 'b', 2: 0, 20: 'c', 30: 'c', 31: 0}
	for idx, fill := range want {
		if !bytes.Equal(got[idx*page:(idx+1)*page], bytes.Repeat([]byte{fill}, page)) {
			t.Errorf("page %d = %q..., want all %q", idx, got[idx*page], fill)
		}
	}
}

func TestMergerRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "flat")
	diff := filepath.Join(dir, "diff")
	small := filepath.Join(dir, "small")
	writeSparse(t, dst, 16*page, map[int64]byte{0: 1})
	writeSparse(t, diff, 16*page, map[int64]byte{3: 2})
	writeSparse(t, small, 8*page, map[int64]byte{0: 2})
	before, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()

	tests := []struct {
		name      string
		ctx       context.Context
		dst, diff string
		want      error
	}{
		{"size mismatch", context.Background(), dst, small, ErrSizeMismatch},
		{"missing diff", context.Background(), dst, filepath.Join(dir, "nope"), os.ErrNotExist},
		{"missing destination", context.Background(), filepath.Join(dir, "nope"), diff, os.ErrNotExist},
		{"cancelled", cancelled, dst, diff, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := (Merger{}).MergeMemory(tt.ctx, tt.dst, tt.diff)
			if !errors.Is(err, tt.want) {
				t.Fatalf("MergeMemory error = %v, want %v", err, tt.want)
			}
			after, err := os.ReadFile(dst)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(before, after) {
				t.Errorf("a rejected merge changed %s", dst)
			}
			if _, err := os.Stat(filepath.Join(dir, "nope")); !os.IsNotExist(err) {
				t.Errorf("a rejected merge created a file: %v", err)
			}
		})
	}
}
