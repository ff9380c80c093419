package firecracker

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/embervm/ember/vm"
)

func TestParseMetricsLine(t *testing.T) {
	flat, err := ParseMetricsLine([]byte(`{"utc_timestamp_ms":5,"net":{"tx_bytes_count":10,"eth0":{"x":1}},"latencies_us":{"load":3},"bad":-1,"s":"text"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{"utc_timestamp_ms": 5, "net.tx_bytes_count": 10, "net.eth0.x": 1, "latencies_us.load": 3}
	for k, v := range want {
		if flat[k] != v {
			t.Errorf("%s = %d, want %d", k, flat[k], v)
		}
	}
	if _, ok := flat["bad"]; ok {
		t.Errorf("negative value was kept")
	}
	if _, err := ParseMetricsLine([]byte("{")); err == nil {
		t.Errorf("truncated line parsed without error")
	}
}

func TestMetricsReaderTotals(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metrics.json")
	os.WriteFile(path, []byte(`{"utc_timestamp_ms":1,"net":{"tx_bytes_count":10},"latencies_us":{"load":7}}`+"\n"+`{"utc_timestamp_ms":2,"net":{"tx_bytes_count":5},"latencies_us":{"load":3}}`+"\n"+`{"net":{"tx_by`), 0o600)
	r := newMetricsReader(path)
	m, err := r.update()
	if err != nil {
		t.Fatal(err)
	}
	if m.Flushes != 2 || m.Net.TxBytes != 15 || m.Counters["utc_timestamp_ms"] != 2 || m.Counters["latencies_us.load"] != 3 {
		t.Errorf("totals = %+v", m)
	}
	// The partial line completes later and counts once.
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`tes_count":1}}` + "\n")
	f.Close()
	if m, _ = r.update(); m.Flushes != 3 || m.Net.TxBytes != 16 {
		t.Errorf("totals after the partial line = %+v", m)
	}
}

func FuzzParseMetricsLine(f *testing.F) {
	f.Add([]byte(`{"net":{"tx_bytes_count":10}}`))
	f.Add([]byte(`{"a":{"b":{"c":{"d":1}}}}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		flat, err := ParseMetricsLine(line)
		if err == nil && flat == nil {
			t.Fatal("nil map without error")
		}
	})
}

func TestDecodeMeta(t *testing.T) {
	good := snapshotMeta{Schema: metaSchema, Info: vm.SnapshotInfo{ID: "s1", VMID: "a", Type: vm.SnapshotFull, Backend: BackendName, VMMVersion: "1.14.1"}}
	diff := good
	diff.Info.Type, diff.Info.Parent, diff.ParentVMID = vm.SnapshotDiff, "s0", "a"
	badDiff := diff
	badDiff.ParentVMID = ""
	badSchema := good
	badSchema.Schema = 99
	badID := good
	badID.Info.ID = "../x"
	badType := good
	badType.Info.Type = "partial"
	for _, tt := range []struct {
		name string
		meta snapshotMeta
		ok   bool
	}{{"full", good, true}, {"diff", diff, true}, {"diff without parent vm", badDiff, false}, {"schema", badSchema, false}, {"id", badID, false}, {"type", badType, false}} {
		data, _ := json.Marshal(tt.meta)
		_, err := decodeMeta(data)
		if (err == nil) != tt.ok {
			t.Errorf("%s: err = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func FuzzDecodeMeta(f *testing.F) {
	f.Add([]byte(`{"schema":1,"info":{"id":"s","vm_id":"a","type":"full"}}`))
	f.Add([]byte(`{"schema":1,"info":{"id":"s","vm_id":"a","type":"diff","parent":"p"},"parent_vm_id":"a"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		meta, err := decodeMeta(data)
		if err != nil {
			return
		}
		if vm.ValidateSnapshotID(meta.Info.ID) != nil || vm.ValidateID(meta.Info.VMID) != nil {
			t.Fatalf("accepted invalid ids: %+v", meta.Info)
		}
	})
}
