package qemu

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/embervm/ember/vm"
)

func TestConsoleRing(t *testing.T) {
	cases := []struct {
		name     string
		maxBytes int
		maxLines int
		writes   []string
		want     string
	}{
		{"under both bounds", 100, 10, []string{"a\n", "b\n"}, "a\nb\n"},
		{"line bound drops oldest lines", 100, 2, []string{"1\n2\n", "3\n4\n"}, "3\n4\n"},
		{"partial last line is kept", 100, 2, []string{"1\n2\n3"}, "2\n3"},
		{"byte bound drops whole lines", 6, 10, []string{"aa\nbb\ncc\n"}, "bb\ncc\n"},
		{"long line is cut to the byte bound", 4, 10, []string{"abcdefgh"}, "efgh"},
		{"long line after short ones", 5, 10, []string{"x\n", "0123456789\n"}, "6789\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newConsoleRing(tc.maxBytes, tc.maxLines)
			for _, w := range tc.writes {
				if n, err := r.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("write %q: %d, %v", w, n, err)
				}
			}
			if got := string(r.Bytes()); got != tc.want {
				t.Errorf("ring = %q, want %q", got, tc.want)
			}
		})
	}
}

func FuzzConsoleRing(f *testing.F) {
	f.Add([]byte("hello\nworld\n"), uint8(3), uint8(8), uint8(2))
	f.Add([]byte("\n\n\n\n"), uint8(1), uint8(1), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, chunk, maxBytes, maxLines uint8) {
		if chunk == 0 || maxBytes == 0 || maxLines == 0 {
			return
		}
		r := newConsoleRing(int(maxBytes), int(maxLines))
		for rest := data; len(rest) > 0; {
			n := min(int(chunk), len(rest))
			r.Write(rest[:n])
			rest = rest[n:]
		}
		got := r.Bytes()
		if len(got) > int(maxBytes) {
			t.Fatalf("ring holds %d bytes, bound %d", len(got), maxBytes)
		}
		lines := bytes.Count(got, []byte{'\n'})
		if len(got) > 0 && got[len(got)-1] != '\n' {
			lines++
		}
		if lines > int(maxLines) {
			t.Fatalf("ring holds %d lines, bound %d", lines, maxLines)
		}
		if !bytes.HasSuffix(data, got) {
			t.Fatalf("ring %q is not the end of the output %q", got, data)
		}
		if r.lines != bytes.Count(got, []byte{'\n'}) {
			t.Fatalf("line count %d, buffer has %d", r.lines, bytes.Count(got, []byte{'\n'}))
		}
	})
}

// elfWithNote returns a minimal x86-64 ELF file with one PT_NOTE segment
// containing notes.
func elfWithNote(machine elf16, notes []byte) []byte {
	const ehSize, phSize = 64, 56
	b := make([]byte, ehSize+phSize)
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1 // 64-bit, little endian, version 1
	le := binary.LittleEndian
	le.PutUint16(b[16:], 2) // ET_EXEC
	le.PutUint16(b[18:], uint16(machine))
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], ehSize) // e_phoff
	le.PutUint16(b[52:], ehSize)
	le.PutUint16(b[54:], phSize)
	le.PutUint16(b[56:], 1) // e_phnum
	ph := b[ehSize:]
	le.PutUint32(ph[0:], 4)                   // PT_NOTE
	le.PutUint64(ph[8:], ehSize+phSize)       // p_offset
	le.PutUint64(ph[32:], uint64(len(notes))) // p_filesz
	le.PutUint64(ph[40:], uint64(len(notes))) // p_memsz
	return append(b, notes...)
}

type elf16 uint16

const (
	emX86_64  elf16 = 62
	emAArch64 elf16 = 183
)

func note(name string, typ uint32, desc []byte) []byte {
	le := binary.LittleEndian
	n := append([]byte(name), 0)
	b := make([]byte, 12)
	le.PutUint32(b[0:], uint32(len(n)))
	le.PutUint32(b[4:], uint32(len(desc)))
	le.PutUint32(b[8:], typ)
	b = append(b, n...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	b = append(b, desc...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func TestCheckPVHKernel(t *testing.T) {
	dir := t.TempDir()
	pvh := note("Xen", xenELFNotePhys32Entry, []byte{0, 0, 0x10, 0})
	cases := []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"pvh kernel", elfWithNote(emX86_64, append(note("GNU", 3, []byte("id")), pvh...)), ""},
		{"no pvh note", elfWithNote(emX86_64, note("GNU", 3, []byte("id"))), "no PVH entry point note"},
		{"other xen note", elfWithNote(emX86_64, note("Xen", 5, []byte("linux"))), "no PVH entry point note"},
		{"arm64", elfWithNote(emAArch64, pvh), "must be x86-64"},
		{"not elf", []byte("MZ this is a bzImage or something"), "is not an ELF vmlinux"},
		{"truncated notes", elfWithNote(emX86_64, pvh)[:130], "truncated"},
		{"empty", nil, "is not an ELF vmlinux"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			err := checkPVHKernel(path)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("err = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
	if err := checkPVHKernel(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: err = %v", err)
	}
	if err := checkPVHKernel(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing: err = %v", err)
	}
}

func FuzzHasNote(f *testing.F) {
	f.Add(note("Xen", xenELFNotePhys32Entry, []byte{1, 2, 3, 4}))
	f.Add(append(note("GNU", 1, nil), note("Xen", 18, nil)...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 18, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		got := hasNote(data, "Xen", xenELFNotePhys32Entry)
		// Appending a well-formed note after a well-formed prefix must
		// always be found; a malformed prefix may hide it.
		if got && !hasNote(append(data, note("GNU", 1, nil)...), "Xen", xenELFNotePhys32Entry) {
			t.Fatalf("note found in %x but not after appending another note", data)
		}
	})
}

func TestParseCPUInfoTSC(t *testing.T) {
	cases := []struct {
		name string
		info string
		want int
	}{
		{"known constant tsc", "processor\t: 0\ncpu MHz\t\t: 2596.136\nflags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq\n\nprocessor\t: 1\n", 2596136},
		{"frequency not known", "cpu MHz\t\t: 2596.136\nflags\t\t: constant_tsc\n", 0},
		{"tsc not constant", "cpu MHz\t\t: 2596.136\nflags\t\t: tsc_known_freq\n", 0},
		{"no mhz", "flags\t\t: constant_tsc tsc_known_freq\n", 0},
		{"bad mhz", "cpu MHz : fast\nflags : constant_tsc tsc_known_freq\n", 0},
		{"only the first processor counts", "flags : constant_tsc\n\ncpu MHz : 1000\nflags : constant_tsc tsc_known_freq\n", 0},
		{"empty", "", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseCPUInfoTSC(strings.NewReader(tc.info)); got != tc.want {
				t.Errorf("parseCPUInfoTSC = %d, want %d", got, tc.want)
			}
		})
	}
}

func FuzzParseCPUInfoTSC(f *testing.F) {
	f.Add("cpu MHz : 2596.136\nflags : constant_tsc tsc_known_freq\n")
	f.Add("cpu MHz : 1e308\nflags : constant_tsc tsc_known_freq\n")
	f.Fuzz(func(t *testing.T, info string) {
		if got := parseCPUInfoTSC(strings.NewReader(info)); got < 0 || got >= 1e9 {
			t.Fatalf("parseCPUInfoTSC = %d, want 0 or a plausible kHz value", got)
		}
	})
}

func TestWithTSCHint(t *testing.T) {
	cases := []struct {
		args string
		khz  int
		want string
	}{
		{"console=ttyS0", 2000000, "console=ttyS0 tsc_early_khz=2000000"},
		{"console=ttyS0 tsc_early_khz=5", 2000000, "console=ttyS0 tsc_early_khz=5"},
		{"console=ttyS0", 0, "console=ttyS0"},
		{"", 1000, "tsc_early_khz=1000"},
	}
	for _, tc := range cases {
		if got := withTSCHint(tc.args, tc.khz); got != tc.want {
			t.Errorf("withTSCHint(%q, %d) = %q, want %q", tc.args, tc.khz, got, tc.want)
		}
	}
}

// FuzzReadSnapshot feeds arbitrary machine.json contents to the snapshot
// reader. It must reject them with ErrSnapshotCorrupt or
// ErrSnapshotIncompatible, or return metadata that passes every check the
// restore relies on.
func FuzzReadSnapshot(f *testing.F) {
	good, _ := json.Marshal(snapshotMeta{
		Format: snapshotFormat, Backend: backendName, QEMUVersion: "7.2.22", Accel: AccelTCG, ID: "s", VMID: "v",
		Machine:   machine{VCPUCount: 1, MemSizeMiB: 64, Kernel: "/k", BootArgs: "x", Drives: []machineDrive{{ID: "rootfs", Path: "/r"}}},
		StateSize: 10, Drives: []snapshotDrive{{Copy: "0-rootfs.img", Size: 5}},
	})
	f.Add(good)
	f.Add([]byte(`{"format":1,"backend":"qemu","machine":{"vcpu_count":0}}`))
	f.Add([]byte(`{"format":1,"backend":"qemu","machine":{"vcpu_count":1,"mem_size_mib":1,"kernel":"/k"},"drives":[{"copy":"../x"}]}`))
	f.Add([]byte(`not json`))
	root := f.TempDir()
	p := &Provider{snapshotDir: root}
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := filepath.Join(root, "v", "s")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, snapshotMetaName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		meta, err := p.readSnapshot("v", "s")
		if err != nil {
			if !errors.Is(err, ErrSnapshotCorrupt) && !errors.Is(err, vm.ErrSnapshotIncompatible) {
				t.Fatalf("err = %v, want ErrSnapshotCorrupt or ErrSnapshotIncompatible", err)
			}
			return
		}
		if err := meta.Machine.validate(); err != nil {
			t.Fatalf("accepted machine fails validation: %v", err)
		}
		if len(meta.Drives) != len(meta.Machine.Drives) {
			t.Fatalf("accepted %d drive records for %d drives", len(meta.Drives), len(meta.Machine.Drives))
		}
		for _, d := range meta.Drives {
			if d.Copy != "" && filepath.Base(d.Copy) != d.Copy {
				t.Fatalf("accepted drive copy name %q", d.Copy)
			}
		}
	})
}

func TestDeleteSnapshotRemovesVMDir(t *testing.T) {
	root := t.TempDir()
	p := &Provider{snapshotDir: root}
	vmDir := filepath.Join(root, "web")
	for _, id := range []string{"s1", "s2"} {
		if err := os.MkdirAll(filepath.Join(vmDir, id), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(vmDir, id, snapshotMetaName), []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	ctx := t.Context()
	if err := p.DeleteSnapshot(ctx, "web", "missing"); !errors.Is(err, vm.ErrSnapshotNotFound) {
		t.Fatalf("delete of a missing snapshot: err = %v, want ErrSnapshotNotFound", err)
	}

	if err := p.DeleteSnapshot(ctx, "web", "s1"); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(vmDir)
	if err != nil {
		t.Fatalf("after deleting s1: %v", err)
	}
	if len(entries) != 1 || entries[0].Name() != "s2" {
		t.Fatalf("after deleting s1: entries %v, want only s2", entries)
	}

	if err := p.DeleteSnapshot(ctx, "web", "s2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(vmDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the VM's snapshot directory survived its last snapshot: %v", err)
	}

	// A new snapshot directory can be made again afterwards.
	tmp, err := mkdirTempIn(vmDir, ".s3.tmp-")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(tmp) != vmDir {
		t.Fatalf("temporary directory %s is not in %s", tmp, vmDir)
	}
}

func TestMakeRunDir(t *testing.T) {
	root := t.TempDir()
	cases := []struct {
		name    string
		pidFile string // content of qemu.pid in an existing directory; "-" for no directory
		wantErr error
	}{
		{"new directory", "-", nil},
		{"stale directory without pid file", "", nil},
		{"stale directory of a dead qemu", "2147483646", nil},
		{"garbage pid file", "not a pid", nil},
		{"directory of a live qemu", strconv.Itoa(os.Getpid()), vm.ErrAlreadyExists},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(root, strconv.Itoa(i))
			if tc.pidFile != "-" {
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				writeFile(t, filepath.Join(dir, "leftover"), nil)
				if tc.pidFile != "" {
					writeFile(t, filepath.Join(dir, pidFileName), []byte(tc.pidFile+"\n"))
				}
			}
			err := makeRunDir(dir)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("makeRunDir: err = %v, want %v", err, tc.wantErr)
			}
			_, leftover := os.Stat(filepath.Join(dir, "leftover"))
			if tc.wantErr == nil && leftover == nil {
				t.Errorf("stale file survived")
			}
			if tc.wantErr != nil && leftover != nil {
				t.Errorf("the live vm's directory was changed: %v", leftover)
			}
		})
	}
}

func validRecord() vmRecord {
	return vmRecord{
		Format: recordFormat, ID: "vm1", PID: 42, Accel: AccelTCG,
		Config:  vm.Config{ID: "vm1", Kernel: "/k", VCPUCount: 1, MemSizeMiB: 64},
		Machine: machine{VCPUCount: 1, MemSizeMiB: 64, Kernel: "/k", BootArgs: "x"},
	}
}

func TestRecordRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vm1")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeRecord(dir, validRecord()); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := readRecord(dir)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if got.ID != "vm1" || got.PID != 42 || got.Machine.MemSizeMiB != 64 || got.Config.Kernel != "/k" {
		t.Errorf("record = %+v", got)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only vm.json", len(entries))
	}

	cases := []struct {
		name   string
		mutate func(*vmRecord)
		want   string
	}{
		{"other format", func(r *vmRecord) { r.Format = 2 }, "format"},
		{"id of another directory", func(r *vmRecord) { r.ID = "vm2" }, "run directory"},
		{"invalid id", func(r *vmRecord) { r.ID = "a/b" }, "id"},
		{"no pid", func(r *vmRecord) { r.PID = 0 }, "pid"},
		{"unknown accelerator", func(r *vmRecord) { r.Accel = AccelAuto }, "accelerator"},
		{"invalid machine", func(r *vmRecord) { r.Machine.VCPUCount = 0 }, "machine"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := validRecord()
			tc.mutate(&rec)
			b, _ := json.Marshal(rec)
			writeFile(t, filepath.Join(dir, recordName), b)
			if _, err := readRecord(dir); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("readRecord: err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// FuzzReadRecord feeds arbitrary vm.json contents to the record reader,
// which must reject them or return a record that adoption can rely on.
func FuzzReadRecord(f *testing.F) {
	good, _ := json.Marshal(validRecord())
	f.Add(good)
	f.Add([]byte(`{"format":1,"id":"vm1","pid":-1}`))
	f.Add([]byte(`[]`))
	root := f.TempDir()
	dir := filepath.Join(root, "vm1")
	if err := os.Mkdir(dir, 0o700); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, recordName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		rec, err := readRecord(dir)
		if err != nil {
			return
		}
		if rec.ID != "vm1" || rec.PID <= 0 || rec.Format != recordFormat || (rec.Accel != AccelKVM && rec.Accel != AccelTCG) {
			t.Fatalf("accepted record %+v", rec)
		}
		if err := rec.Machine.validate(); err != nil {
			t.Fatalf("accepted machine fails validation: %v", err)
		}
	})
}
