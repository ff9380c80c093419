package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// MaxSpecSize bounds the size of a spec document DecodeSpec accepts.
const MaxSpecSize = 1 << 20

// DecodeSpec parses a spec with [ParseSpec] and validates it with
// [ValidateSpec].
func DecodeSpec(data []byte) (Spec, error) {
	s, err := ParseSpec(data)
	if err != nil {
		return s, err
	}
	return s, ValidateSpec(&s)
}

// ParseSpec parses a spec in JSON or YAML (JSON is a subset of YAML)
// without validating its values. Unknown fields, trailing data and type
// mismatches are errors. Unknown fields come as a [*ValidationError] that
// lists every one of them with its field path.
func ParseSpec(data []byte) (Spec, error) {
	var s Spec
	if len(data) > MaxSpecSize {
		return s, fmt.Errorf("decode spec: %d bytes, the limit is %d", len(data), MaxSpecSize)
	}
	js := data
	if trimmed := bytes.TrimSpace(data); len(trimmed) == 0 || trimmed[0] != '{' {
		if yamlDocuments(data) > 1 {
			return s, errors.New("decode spec: more than one YAML document")
		}
		var err error
		js, err = yaml.YAMLToJSONStrict(data)
		if err != nil {
			return s, fmt.Errorf("decode spec: %w", err)
		}
		if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
			return s, nil
		}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		if strings.HasPrefix(err.Error(), "json: unknown field ") {
			if problems := unknownFields(js); len(problems) > 0 {
				return Spec{}, &ValidationError{Problems: problems}
			}
		}
		// YAML specs are decoded as JSON, so drop the decoder's "json: "
		// prefix that would only confuse a YAML author.
		return Spec{}, fmt.Errorf("decode spec: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if err := dec.Decode(new(json.RawMessage)); !errors.Is(err, io.EOF) {
		return Spec{}, errors.New("decode spec: unexpected data after the spec")
	}
	return s, nil
}

// ResolvePaths makes every relative host path in s absolute by joining it
// to base, the directory of the spec file. Empty paths stay empty.
func (s *Spec) ResolvePaths(base string) {
	abs := func(p *string) {
		if p != nil && *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	abs(s.Kernel)
	abs(s.Initrd)
	abs(s.Rootfs)
	abs(s.NetNS)
	for i := range s.ExtraDrives {
		abs(&s.ExtraDrives[i].PathOnHost)
	}
	if s.Vsock != nil {
		abs(&s.Vsock.UDSPath)
	}
	if s.RestoreFrom != nil && s.RestoreFrom.VsockOverride != nil {
		abs(&s.RestoreFrom.VsockOverride.UDSPath)
	}
}

// yamlDocuments counts the non-empty documents in a YAML stream separated
// by "---" lines.
func yamlDocuments(data []byte) int {
	n := 0
	for doc := range bytes.SplitSeq(data, []byte("\n---")) {
		if len(bytes.TrimSpace(doc)) > 0 && !bytes.Equal(bytes.TrimSpace(doc), []byte("---")) {
			n++
		}
	}
	return n
}
