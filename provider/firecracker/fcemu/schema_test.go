package fcemu

import (
	"strings"
	"testing"

	"github.com/embervm/ember/provider/firecracker/fcapi"
)

func TestLoadSchemaPerVersion(t *testing.T) {
	tests := []struct {
		version string
		field   string
		known   bool
	}{
		{"1.7.0", "network_overrides", false},
		{"1.12.1", "network_overrides", true},
		{"1.12.1", "track_dirty_pages", false},
		{"1.13.0", "track_dirty_pages", true},
		{"1.14.1", "clock_realtime", false},
		{"1.14.4", "clock_realtime", true},
		{"1.15.0", "clock_realtime", false},
		{"1.14.1", "vsock_override", false},
		{"1.16.0", "vsock_override", true},
	}
	for _, tt := range tests {
		body := `{"snapshot_path":"/s","` + tt.field + `":null}`
		msg := checkFields(schemaFor(fcapi.MustParse(tt.version), "snapshot/load"), []byte(body))
		if (msg == "") != tt.known {
			t.Errorf("%s %s: message %q, want known=%v", tt.version, tt.field, msg, tt.known)
		}
	}
}

func TestCheckFieldsNested(t *testing.T) {
	s := schemaFor(fcapi.V(1, 14, 1), "drives")
	msg := checkFields(s, []byte(`{"drive_id":"a","rate_limiter":{"bandwidth":{"size":1,"refill_time":1,"bogus":2}}}`))
	if !strings.Contains(msg, "unknown field `bogus`") || !strings.Contains(msg, "`one_time_burst`") {
		t.Errorf("nested unknown field message = %q", msg)
	}
	if msg := checkFields(s, []byte(`[1]`)); msg == "" {
		t.Errorf("a non-object body was accepted")
	}
}

func FuzzCheckFields(f *testing.F) {
	f.Add([]byte(`{"snapshot_path":"/s","network_overrides":[{"iface_id":"a","x":1}]}`))
	f.Add([]byte(`{"mem_backend":{"backend_type":"File"}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		checkFields(schemaFor(fcapi.V(1, 16, 0), "snapshot/load"), body)
	})
}
