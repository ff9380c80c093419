package qemu

import (
	"bufio"
	"io"
	"os"
	"strconv"
	"strings"
)

// tscParam is the kernel parameter that gives the guest its TSC frequency
// in kHz and skips the early calibration.
const tscParam = "tsc_early_khz="

// Why a TCG guest needs the TSC frequency: the microvm machine has no HPET
// and no ACPI PM timer, so a Linux guest can calibrate its TSC only against
// the PIT. Under TCG, on a busy host, the vCPU thread is descheduled during
// that calibration often enough that it fails ("tsc: Unable to calibrate
// against PIT"). The kernel then has no clock and hangs in the delay-loop
// and APIC timer calibration. Measured with Debian's 6.1 cloud kernel on
// QEMU 7.2: six guests booted at once on two busy cores all hung without
// the parameter, and booted with it.
//
// Under TCG the guest's TSC is the host's TSC (QEMU returns the host
// counter, plus an offset, for RDTSC), so the host's TSC frequency is the
// right value.

// withTSCHint returns bootArgs with tsc_early_khz=khz appended, unless
// khz is 0 or bootArgs already sets the parameter.
func withTSCHint(bootArgs string, khz int) string {
	if khz <= 0 {
		return bootArgs
	}
	for _, f := range strings.Fields(bootArgs) {
		if strings.HasPrefix(f, tscParam) {
			return bootArgs
		}
	}
	return strings.TrimSpace(bootArgs + " " + tscParam + strconv.Itoa(khz))
}

// hostTSCKHz returns the host's TSC frequency in kHz from /proc/cpuinfo,
// or 0 when it is not known.
func hostTSCKHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	return parseCPUInfoTSC(f)
}

// parseCPUInfoTSC reads the first processor's entry of a /proc/cpuinfo
// listing. It trusts "cpu MHz" as the TSC frequency only when the flags
// include constant_tsc (the TSC ticks at a fixed rate) and tsc_known_freq
// (the kernel read the TSC frequency from the CPU or hypervisor instead of
// estimating it). On
// other hosts "cpu MHz" can be the current, scaled core clock, so it
// returns 0.
func parseCPUInfoTSC(r io.Reader) int {
	var mhz float64
	var constant, known bool
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break // end of the first processor's entry
		}
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		key = strings.TrimSpace(key)
		value = strings.TrimSpace(value)
		switch key {
		case "cpu MHz":
			v, err := strconv.ParseFloat(value, 64)
			if err == nil && v > 0 && v < 1e6 {
				mhz = v
			}
		case "flags":
			for _, flag := range strings.Fields(value) {
				constant = constant || flag == "constant_tsc"
				known = known || flag == "tsc_known_freq"
			}
		}
	}
	if mhz == 0 || !constant || !known {
		return 0
	}
	return int(mhz * 1000)
}
