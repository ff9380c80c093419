package qemu

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/embervm/ember/vm"
)

// recordName is the file in a run directory that lets a later Provider
// adopt the VM, for example in the next invocation of a command-line tool.
const recordName = "vm.json"

// recordFormat is the version of vm.json. Other versions are not adopted.
const recordFormat = 1

// vmRecord is vm.json.
type vmRecord struct {
	Format    int       `json:"format"`
	ID        string    `json:"id"`
	PID       int       `json:"pid"`
	Accel     Accel     `json:"accel"`
	Config    vm.Config `json:"config"`
	Machine   machine   `json:"machine"`
	CreatedAt time.Time `json:"created_at"`
	// Exit records how QEMU ended, once it has, so that a provider that
	// adopts the run directory later reports the true final state.
	Exit *exitRecord `json:"exit,omitempty"`
}

// exitRecord is the final state of a VM whose QEMU has exited.
type exitRecord struct {
	State  vm.State `json:"state"`
	Reason string   `json:"reason"`
}

// writeRecord replaces dir/vm.json atomically.
func writeRecord(dir string, rec vmRecord) error {
	rec.Format = recordFormat
	tmp, err := os.CreateTemp(dir, "."+recordName+".tmp-")
	if err != nil {
		return err
	}
	b, err := json.Marshal(rec)
	if err == nil {
		_, err = tmp.Write(b)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(dir, recordName))
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", recordName, err)
	}
	return nil
}

// readRecord reads and checks dir/vm.json.
func readRecord(dir string) (vmRecord, error) {
	b, err := os.ReadFile(filepath.Join(dir, recordName))
	if err != nil {
		return vmRecord{}, err
	}
	var rec vmRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return vmRecord{}, fmt.Errorf("decode %s: %w", recordName, err)
	}
	if rec.Format != recordFormat {
		return vmRecord{}, fmt.Errorf("%s has format %d, expected %d", recordName, rec.Format, recordFormat)
	}
	if err := vm.ValidateID(rec.ID); err != nil {
		return vmRecord{}, fmt.Errorf("%s: %w", recordName, err)
	}
	if rec.ID != filepath.Base(dir) {
		return vmRecord{}, fmt.Errorf("%s names vm %q but is in the run directory of %q", recordName, rec.ID, filepath.Base(dir))
	}
	if err := rec.Machine.validate(); err != nil {
		return vmRecord{}, fmt.Errorf("%s: machine: %w", recordName, err)
	}
	if rec.Accel != AccelKVM && rec.Accel != AccelTCG {
		return vmRecord{}, fmt.Errorf("%s: accelerator %q is invalid", recordName, rec.Accel)
	}
	if rec.PID <= 0 {
		return vmRecord{}, fmt.Errorf("%s: pid %d is invalid", recordName, rec.PID)
	}
	return rec, nil
}
