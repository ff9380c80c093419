package image

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// DefaultModules lists the modules a guest needs on Ember's machines: the
// virtio-mmio transport, block, network and console devices, vsock with its
// virtio transport, and ext4 for the root filesystem. Modules built into the
// kernel are skipped, so the list fits kernels that build any of them in.
var DefaultModules = []string{
	"virtio_mmio",
	"virtio_blk",
	"virtio_net",
	"virtio_console",
	"vsock",
	"vmw_vsock_virtio_transport",
	"ext4",
}

// DefaultOptionalModules lists modules loaded when the kernel has them:
// the ACPI power button driver and evdev. The agent receives a power-button
// press (QEMU's system_powerdown) through them and shuts the guest down.
var DefaultOptionalModules = []string{"button", "evdev"}

// Module is one loadable kernel module.
type Module struct {
	// Name is the module name with '-' replaced by '_', as the kernel
	// reports it.
	Name string
	// Path is the module file relative to the module tree root
	// (lib/modules/<release>), possibly with a .xz, .zst or .gz suffix.
	Path string
}

// ModuleIndex maps module names to files and dependencies for one kernel's
// module tree (lib/modules/<release>).
//
// The index uses modules.dep when the tree has one. Debian's kernel
// packages ship no modules.dep, because depmod writes it when the package
// is installed, so without it the index reads the "depends=" and
// "softdep=" entries from each module's .modinfo ELF section instead.
type ModuleIndex struct {
	root string
	// paths maps module names to files relative to root.
	paths map[string]string
	// deps maps module names to dependency names. It is filled up front
	// from modules.dep, or on demand from .modinfo.
	deps map[string][]string
	// softPre maps module names to their optional "pre:" soft
	// dependencies, filled from .modinfo.
	softPre map[string][]string
	// builtin contains the names of modules built into the kernel.
	builtin map[string]bool
	// fromModulesDep reports whether deps came from modules.dep.
	fromModulesDep bool
}

// ModuleName returns the kernel's name for a module file or module name:
// the base name without .ko and compression suffixes, with '-' as '_'.
func ModuleName(s string) string {
	base := path.Base(filepath.ToSlash(s))
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		base = strings.TrimSuffix(base, ext)
	}
	base = strings.TrimSuffix(base, ".ko")
	return strings.ReplaceAll(base, "-", "_")
}

func isModuleFile(name string) bool {
	for _, ext := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
		if strings.HasSuffix(name, ext) {
			return true
		}
	}
	return false
}

// ParseModulesDep parses a modules.dep file. Each line is
// "path: dep1 dep2 ...", with paths relative to the module tree root, and
// lines that are empty or start with '#' are skipped. It returns the
// dependency paths of every module path.
func ParseModulesDep(r io.Reader) (map[string][]string, error) {
	deps := make(map[string][]string)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		mod = strings.TrimSpace(mod)
		if !ok || mod == "" || strings.ContainsAny(mod, " \t") {
			return nil, fmt.Errorf("parse modules.dep line %d %q: want \"path: deps...\": %w", lineNo, line, ErrInvalidModulesDep)
		}
		if !isModuleFile(mod) {
			return nil, fmt.Errorf("parse modules.dep line %d: %q is not a .ko file: %w", lineNo, mod, ErrInvalidModulesDep)
		}
		if _, dup := deps[mod]; dup {
			return nil, fmt.Errorf("parse modules.dep line %d: %q listed twice: %w", lineNo, mod, ErrInvalidModulesDep)
		}
		list := strings.Fields(rest)
		for _, d := range list {
			if !isModuleFile(d) {
				return nil, fmt.Errorf("parse modules.dep line %d: dependency %q is not a .ko file: %w", lineNo, d, ErrInvalidModulesDep)
			}
		}
		deps[mod] = list
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse modules.dep: %w: %w", ErrInvalidModulesDep, err)
	}
	return deps, nil
}

// LoadModuleIndex indexes the module tree at root, a lib/modules/<release>
// directory.
func LoadModuleIndex(root string) (*ModuleIndex, error) {
	ix := newModuleIndex(root)
	if err := ix.loadBuiltin(); err != nil {
		return nil, err
	}

	depFile, err := os.Open(filepath.Join(root, "modules.dep"))
	switch {
	case err == nil:
		defer depFile.Close()
		if err := ix.loadModulesDep(depFile); err != nil {
			return nil, fmt.Errorf("load module index %s: %w", root, err)
		}
		return ix, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("load module index %s: %w", root, err)
	}

	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && isModuleFile(d.Name()) {
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			ix.addPath(filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load module index %s: %w", root, err)
	}
	return ix, nil
}

func newModuleIndex(root string) *ModuleIndex {
	return &ModuleIndex{
		root:    root,
		paths:   make(map[string]string),
		deps:    make(map[string][]string),
		softPre: make(map[string][]string),
		builtin: make(map[string]bool),
	}
}

// addPath records a module file. When two files give the same name, the
// lexically first path wins, so the result does not depend on walk order.
func (ix *ModuleIndex) addPath(rel string) {
	name := ModuleName(rel)
	if old, ok := ix.paths[name]; ok && old < rel {
		return
	}
	ix.paths[name] = rel
}

func (ix *ModuleIndex) loadBuiltin() error {
	b, err := os.ReadFile(filepath.Join(ix.root, "modules.builtin"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load module index %s: %w", ix.root, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			ix.builtin[ModuleName(line)] = true
		}
	}
	return nil
}

func (ix *ModuleIndex) loadModulesDep(r io.Reader) error {
	deps, err := ParseModulesDep(r)
	if err != nil {
		return err
	}
	for mod := range deps {
		ix.addPath(mod)
	}
	for mod, list := range deps {
		names := make([]string, len(list))
		for i, d := range list {
			names[i] = ModuleName(d)
			// A dependency must have a line of its own, as depmod writes.
			if _, ok := deps[d]; !ok {
				return fmt.Errorf("modules.dep: %q depends on %q, which has no line: %w", mod, d, ErrInvalidModulesDep)
			}
		}
		ix.deps[ModuleName(mod)] = names
	}
	ix.fromModulesDep = true
	return nil
}

// Resolved is the result of [ModuleIndex.Closure].
type Resolved struct {
	// Load lists the modules to load, each after all of its dependencies.
	Load []Module
	// Builtin lists the requested names that are built into the kernel.
	Builtin []string
}

// Closure returns the modules that the required and optional names need,
// dependencies first. Names may use '-' or '_'. A name that is built into
// the kernel needs nothing. A required name that is neither a module nor
// built in fails with [ErrModuleNotFound], listing every such name, and a
// missing optional name is skipped. Optional "pre:" soft dependencies are
// loaded first when the tree has them.
func (ix *ModuleIndex) Closure(required, optional []string) (*Resolved, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := make(map[string]int)
	res := &Resolved{}
	var missing []string

	var visit func(name, from string, required bool) error
	visit = func(name, from string, required bool) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("resolve modules: dependency cycle through %q: %w", name, ErrInvalidModulesDep)
		}
		rel, ok := ix.paths[name]
		if !ok {
			state[name] = done
			switch {
			case ix.builtin[name]:
				if from == "" {
					res.Builtin = append(res.Builtin, name)
				}
			case required && from == "":
				missing = append(missing, name)
			case required:
				missing = append(missing, name+" (needed by "+from+")")
			}
			return nil
		}

		state[name] = visiting
		deps, soft, err := ix.dependencies(name, rel)
		if err != nil {
			return err
		}
		for _, d := range soft {
			if err := visit(d, name, false); err != nil {
				return err
			}
		}
		for _, d := range deps {
			if err := visit(d, name, true); err != nil {
				return err
			}
		}
		state[name] = done
		res.Load = append(res.Load, Module{Name: name, Path: rel})
		return nil
	}

	for _, n := range required {
		if err := visit(ModuleName(n), "", true); err != nil {
			return nil, err
		}
	}
	for _, n := range optional {
		if err := visit(ModuleName(n), "", false); err != nil {
			return nil, err
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("resolve modules in %s: %s: %w", ix.root, strings.Join(missing, ", "), ErrModuleNotFound)
	}
	return res, nil
}

// dependencies returns the hard and optional "pre:" soft dependencies of a
// module, reading its .modinfo section unless modules.dep supplied them.
func (ix *ModuleIndex) dependencies(name, rel string) (hard, soft []string, err error) {
	if ix.fromModulesDep {
		return ix.deps[name], nil, nil
	}
	if d, ok := ix.deps[name]; ok {
		return d, ix.softPre[name], nil
	}
	data, err := readModuleFile(filepath.Join(ix.root, filepath.FromSlash(rel)))
	if err != nil {
		return nil, nil, fmt.Errorf("resolve modules: %w", err)
	}
	info, err := parseModinfo(data)
	if err != nil {
		return nil, nil, fmt.Errorf("resolve modules: read .modinfo of %s: %w", rel, err)
	}
	for _, d := range strings.Split(info["depends"], ",") {
		if d = strings.TrimSpace(d); d != "" {
			hard = append(hard, ModuleName(d))
		}
	}
	soft = softPreDeps(info["softdep"])
	ix.deps[name] = hard
	ix.softPre[name] = soft
	return hard, soft, nil
}

// softPreDeps returns the names after "pre:" in a softdep value such as
// "pre: crc32c post: foo".
func softPreDeps(v string) []string {
	var out []string
	inPre := false
	for _, f := range strings.Fields(v) {
		switch f {
		case "pre:":
			inPre = true
		case "post:":
			inPre = false
		default:
			if inPre {
				out = append(out, ModuleName(f))
			}
		}
	}
	return out
}

// parseModinfo returns the key=value pairs of an ELF module's .modinfo
// section. Repeated keys (alias, for one) keep their last value, which is
// enough for depends and softdep, which appear once.
func parseModinfo(ko []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, err
	}
	info := make(map[string]string)
	for _, entry := range bytes.Split(data, []byte{0}) {
		k, v, ok := bytes.Cut(entry, []byte("="))
		if ok {
			info[string(k)] = string(v)
		}
	}
	return info, nil
}

// readModuleFile returns the contents of a module file, decompressed when
// its name ends in .xz, .zst or .gz.
func readModuleFile(p string) ([]byte, error) {
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var c Compression
	switch path.Ext(p) {
	case ".xz":
		c = CompressionXZ
	case ".zst":
		c = CompressionZstd
	case ".gz":
		c = CompressionGzip
	default:
		return data, nil
	}
	out, err := decompressAll(c, data)
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", p, err)
	}
	return out, nil
}

// uncompressedModulePath returns rel without a compression suffix, the
// name under which the initramfs stores the decompressed module.
func uncompressedModulePath(rel string) string {
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(rel, ".ko"+ext) {
			return strings.TrimSuffix(rel, ext)
		}
	}
	return rel
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
