//go:build linux

// Command testinit is the /init of the guest that most of the qemu
// provider's tests boot. It is not the Ember guest agent: it serves a tiny
// line protocol that lets the tests read the guest's devices and identity
// without depending on the agent's protocol.
//
// At boot it mounts /proc, /sys and /dev and loads the modules listed in
// /etc/ember/modules (an Ember image's list), then every other module under
// /lib/modules. The Debian cloud kernel builds virtio, virtio_mmio,
// virtio_console, virtio_blk, virtio_net, the ACPI button and evdev as
// modules. It then prints [ReadyMarker] on the console and serves the
// virtio-serial port named "ember.agent". It powers the machine off when the
// ACPI power button is pressed or when asked to over the port.
//
// Protocol: one request line, one reply line.
//
//	ping              -> pong
//	hostname NAME     -> ok (sets the hostname)
//	whoami            -> the hostname
//	drives            -> "name:ro,name:rw" for each virtio disk
//	nics              -> "name=mac,..." for each non-loopback interface
//	write-drive NAME  -> ok after writing "ember" at offset 0 of /dev/NAME
//	poweroff          -> ok, then the guest powers off
package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// ReadyMarker is printed on the console once the modules are loaded.
const ReadyMarker = "EMBER-TESTINIT-READY"

const portName = "ember.agent"

// sysFinitModule is finit_module(2) on x86-64; package syscall lacks it.
const sysFinitModule = 313

func main() {
	mountAll()
	if list, err := os.ReadFile("/etc/ember/modules"); err == nil {
		loadModuleList(strings.Fields(string(list)))
	}
	loadModules("/lib/modules")
	fmt.Printf("%s\n", ReadyMarker)
	go watchPowerButton()
	servePort()
}

func mountAll() {
	for _, m := range []struct{ src, dst, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := syscall.Mount(m.src, m.dst, m.fstype, 0, ""); err != nil && err != syscall.EBUSY {
			fmt.Printf("testinit: mount %s: %v\n", m.dst, err)
		}
	}
}

// loadModuleList loads the modules of an Ember image's module list, in
// its order.
func loadModuleList(paths []string) {
	for _, path := range paths {
		if strings.HasPrefix(path, "/") {
			loadModule(path)
		}
	}
}

// loadModules loads every .ko under root. Modules depend on each other, so
// it repeats passes until a pass loads nothing new.
func loadModules(root string) {
	var pending []string
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".ko") {
			pending = append(pending, path)
		}
		return nil
	})
	for len(pending) > 0 {
		var failed []string
		for _, path := range pending {
			if err := loadModule(path); err != nil && err != syscall.EEXIST {
				failed = append(failed, path)
			}
		}
		if len(failed) == len(pending) {
			for _, path := range failed {
				fmt.Printf("testinit: module %s: %v\n", filepath.Base(path), loadModule(path))
			}
			return
		}
		pending = failed
	}
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	params := []byte{0}
	_, _, errno := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&params[0])), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// watchPowerButton powers off on KEY_POWER from any input device, which is
// how an ACPI power-button press reaches user space.
func watchPowerButton() {
	const evKey, keyPower = 1, 116
	seen := map[string]bool{}
	for {
		paths, _ := filepath.Glob("/dev/input/event*")
		for _, p := range paths {
			if seen[p] {
				continue
			}
			seen[p] = true
			go func() {
				f, err := os.Open(p)
				if err != nil {
					return
				}
				// struct input_event on 64-bit: 16 bytes of time, then
				// type (u16), code (u16), value (s32).
				buf := make([]byte, 24)
				for {
					if _, err := f.Read(buf); err != nil {
						return
					}
					typ := binary.LittleEndian.Uint16(buf[16:])
					code := binary.LittleEndian.Uint16(buf[18:])
					if typ == evKey && code == keyPower {
						powerOff()
					}
				}
			}()
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func powerOff() {
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
}

// findPort returns the /dev node of the virtio-serial port with the given
// name. Without udev there is no /dev/virtio-ports symlink, so it reads the
// names from sysfs.
func findPort(name string) string {
	dirs, _ := filepath.Glob("/sys/class/virtio-ports/vport*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(d)
		}
	}
	return ""
}

func servePort() {
	var dev string
	for dev == "" {
		dev = findPort(portName)
		if dev == "" {
			time.Sleep(50 * time.Millisecond)
		}
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		fmt.Printf("testinit: open %s: %v\n", dev, err)
		select {}
	}
	var line []byte
	buf := make([]byte, 4096)
	for {
		n, err := f.Read(buf)
		if n == 0 || err != nil {
			// The host side is not connected: the port reads EOF until a
			// client connects to QEMU's socket.
			line = line[:0]
			time.Sleep(5 * time.Millisecond)
			continue
		}
		line = append(line, buf[:n]...)
		for {
			i := bytes.IndexByte(line, '\n')
			if i < 0 {
				break
			}
			req := string(line[:i])
			line = line[i+1:]
			reply, off := handle(req)
			f.Write([]byte(reply + "\n"))
			if off {
				powerOff()
			}
		}
	}
}

func handle(req string) (reply string, powerOff bool) {
	cmd, arg, _ := strings.Cut(strings.TrimSpace(req), " ")
	switch cmd {
	case "ping":
		return "pong", false
	case "hostname":
		if err := syscall.Sethostname([]byte(arg)); err != nil {
			return "error: " + err.Error(), false
		}
		return "ok", false
	case "whoami":
		name, _ := os.Hostname()
		return name, false
	case "drives":
		return listDrives(), false
	case "nics":
		return listNICs(), false
	case "write-drive":
		return writeDrive(arg), false
	case "poweroff":
		return "ok", true
	}
	return "error: unknown request " + cmd, false
}

func listDrives() string {
	dirs, _ := filepath.Glob("/sys/block/vd*")
	sort.Strings(dirs)
	var out []string
	for _, d := range dirs {
		ro, _ := os.ReadFile(filepath.Join(d, "ro"))
		mode := "rw"
		if strings.TrimSpace(string(ro)) == "1" {
			mode = "ro"
		}
		out = append(out, filepath.Base(d)+":"+mode)
	}
	return strings.Join(out, ",")
}

func listNICs() string {
	dirs, _ := filepath.Glob("/sys/class/net/*")
	sort.Strings(dirs)
	var out []string
	for _, d := range dirs {
		name := filepath.Base(d)
		if name == "lo" {
			continue
		}
		mac, _ := os.ReadFile(filepath.Join(d, "address"))
		out = append(out, name+"="+strings.TrimSpace(string(mac)))
	}
	return strings.Join(out, ",")
}

func writeDrive(name string) string {
	f, err := os.OpenFile("/dev/"+filepath.Base(name), os.O_WRONLY, 0)
	if err != nil {
		return "error: " + err.Error()
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("ember"), 0); err != nil {
		return "error: " + err.Error()
	}
	if err := f.Sync(); err != nil {
		return "error: " + err.Error()
	}
	return "ok"
}
