package fcemu

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/embervm/ember/provider/firecracker/fcapi"
)

// object is the schema of one JSON object: its fields in Firecracker's
// declaration order (which is the order its "expected one of" message
// lists) and the schema of each field that is itself an object.
type object struct {
	fields []string
	nested map[string]*object
	// arrayOf holds, for array fields, the schema of each element.
	arrayOf map[string]*object
}

var tokenBucket = &object{fields: []string{"size", "one_time_burst", "refill_time"}}

var rateLimiter = &object{
	fields: []string{"bandwidth", "ops"},
	nested: map[string]*object{"bandwidth": tokenBucket, "ops": tokenBucket},
}

// schemaFor returns the request body schema of an endpoint for version v.
// The field lists were read from the 400 replies of Firecracker 1.7.0 and
// 1.14.1 to an unknown field, and extended by the version table for fields
// added in later releases.
func schemaFor(v fcapi.Version, endpoint string) *object {
	switch endpoint {
	case "machine-config":
		return &object{fields: []string{"vcpu_count", "mem_size_mib", "smt", "cpu_template", "track_dirty_pages", "huge_pages"}}
	case "boot-source":
		return &object{fields: []string{"kernel_image_path", "initrd_path", "boot_args"}}
	case "drives":
		return &object{
			fields: []string{"drive_id", "partuuid", "is_root_device", "cache_type", "is_read_only", "path_on_host", "rate_limiter", "io_engine", "socket"},
			nested: map[string]*object{"rate_limiter": rateLimiter},
		}
	case "network-interfaces":
		return &object{
			fields: []string{"iface_id", "host_dev_name", "guest_mac", "rx_rate_limiter", "tx_rate_limiter"},
			nested: map[string]*object{"rx_rate_limiter": rateLimiter, "tx_rate_limiter": rateLimiter},
		}
	case "vsock":
		return &object{fields: []string{"vsock_id", "guest_cid", "uds_path"}}
	case "logger":
		return &object{fields: []string{"log_path", "level", "show_level", "show_log_origin", "module"}}
	case "metrics":
		return &object{fields: []string{"metrics_path"}}
	case "actions":
		return &object{fields: []string{"action_type"}}
	case "vm":
		return &object{fields: []string{"state"}}
	case "snapshot/create":
		return &object{fields: []string{"snapshot_type", "snapshot_path", "mem_file_path"}}
	case "snapshot/load":
		return loadSchema(v)
	}
	return nil
}

func loadSchema(v fcapi.Version) *object {
	o := &object{
		fields: []string{"snapshot_path", "mem_file_path", "mem_backend", "enable_diff_snapshots"},
		nested: map[string]*object{
			"mem_backend": {fields: []string{"backend_type", "backend_path"}},
		},
		arrayOf: map[string]*object{},
	}
	if v.AtLeast(fcapi.V(1, 13, 0)) {
		o.fields = append(o.fields, "track_dirty_pages")
	}
	o.fields = append(o.fields, "resume_vm")
	if v.AtLeast(fcapi.V(1, 12, 0)) {
		o.fields = append(o.fields, "network_overrides")
		o.arrayOf["network_overrides"] = &object{fields: []string{"iface_id", "host_dev_name"}}
	}
	if (v.SameMinor(fcapi.V(1, 14, 0)) && v.Patch >= 4) || (v.SameMinor(fcapi.V(1, 15, 0)) && v.Patch >= 1) || v.AtLeast(fcapi.V(1, 16, 0)) {
		o.fields = append(o.fields, "clock_realtime")
	}
	if v.AtLeast(fcapi.V(1, 16, 0)) {
		o.fields = append(o.fields, "vsock_override")
		o.nested["vsock_override"] = &object{fields: []string{"uds_path"}}
	}
	return o
}

// checkFields returns Firecracker's deserialization message for the first
// field of body that schema does not know, or "" when every field is known.
// A body that is not a JSON object gets the same kind of message.
func checkFields(schema *object, body []byte) string {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		return deserializeError(err.Error())
	}
	return checkObject(schema, top)
}

func checkObject(schema *object, fields map[string]json.RawMessage) string {
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !slices.Contains(schema.fields, k) {
			return deserializeError(fmt.Sprintf("unknown field `%s`, expected one of %s", k, quoteFields(schema.fields)))
		}
		raw := fields[k]
		if sub, ok := schema.nested[k]; ok && string(raw) != "null" {
			var inner map[string]json.RawMessage
			if err := json.Unmarshal(raw, &inner); err != nil {
				return deserializeError(fmt.Sprintf("invalid type for `%s`: %v", k, err))
			}
			if msg := checkObject(sub, inner); msg != "" {
				return msg
			}
		}
		if sub, ok := schema.arrayOf[k]; ok {
			var items []map[string]json.RawMessage
			if err := json.Unmarshal(raw, &items); err != nil {
				return deserializeError(fmt.Sprintf("invalid type for `%s`: %v", k, err))
			}
			for _, item := range items {
				if msg := checkObject(sub, item); msg != "" {
					return msg
				}
			}
		}
	}
	return ""
}

func quoteFields(fields []string) string {
	quoted := make([]string, len(fields))
	for i, f := range fields {
		quoted[i] = "`" + f + "`"
	}
	return strings.Join(quoted, ", ")
}

func deserializeError(detail string) string {
	return "An error occurred when deserializing the json body of a request: " + detail + "."
}
