package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"
)

// MaxSpecSize bounds the size of a spec document DecodeSpec accepts.
const MaxSpecSize = 1 << 20

// DecodeSpec parses a spec with [ParseSpec] and validates it with
// [ValidateSpec]. Problems from both come in one [*ValidationError].
func DecodeSpec(data []byte) (Spec, error) {
	return DecodeSpecIn(data, "")
}

// DecodeSpecIn is [DecodeSpec] for a spec file in directory dir: relative
// host paths are resolved against dir (see [Spec.ResolvePaths]) before
// validation. An empty dir leaves them as they are.
func DecodeSpecIn(data []byte, dir string) (Spec, error) {
	s, err := ParseSpec(data)
	var parsed *ValidationError
	if err != nil && !errors.As(err, &parsed) {
		return s, err
	}
	if dir != "" {
		s.ResolvePaths(dir)
	}
	verr := ValidateSpec(&s)
	if parsed == nil {
		return s, verr
	}
	// A value of the wrong type leaves its field half decoded, as a zero,
	// so a validation problem of that field only repeats the type problem.
	var ve *ValidationError
	if errors.As(verr, &ve) {
		var remaining []FieldError
		for _, p := range ve.Problems {
			if !slices.ContainsFunc(parsed.Problems, func(q FieldError) bool { return q.Field == withoutIndexes(p.Field) }) {
				remaining = append(remaining, p)
			}
		}
		verr = nil
		if len(remaining) > 0 {
			verr = &ValidationError{Problems: remaining}
		}
	}
	return s, JoinProblems(parsed, verr)
}

// withoutIndexes drops the list indexes from a field path, the form of
// the paths in encoding/json's type errors: network_interfaces[0].mtu
// becomes network_interfaces.mtu.
func withoutIndexes(field string) string {
	var b strings.Builder
	depth := 0
	for _, r := range field {
		switch {
		case r == '[':
			depth++
		case r == ']' && depth > 0:
			depth--
		case depth == 0:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// ParseSpec parses a spec in JSON or YAML (JSON is a subset of YAML)
// without validating its values. Unknown fields and a value of the wrong
// type come as a [*ValidationError] with their field paths, together with
// the spec holding every field that could be decoded, so that a caller
// can validate those too. Syntax errors and trailing data are plain
// errors.
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
	// encoding/json stops at the first unknown key but goes on after a
	// value of the wrong type, so the document is decoded without the
	// unknown-key check, and fieldProblems lists the unknown keys and the
	// wrong types.
	dec := json.NewDecoder(bytes.NewReader(js))
	var typeErr *json.UnmarshalTypeError
	if err := dec.Decode(&s); err != nil {
		if !errors.As(err, &typeErr) {
			// YAML specs are decoded as JSON, so drop the decoder's "json: "
			// prefix that would only confuse a YAML author.
			return Spec{}, fmt.Errorf("decode spec: %s", strings.TrimPrefix(err.Error(), "json: "))
		}
		if typeErr.Field == "" {
			return Spec{}, fmt.Errorf("decode spec: %s", typeProblem(typeErr))
		}
	}
	if err := dec.Decode(new(json.RawMessage)); !errors.Is(err, io.EOF) {
		return Spec{}, errors.New("decode spec: unexpected data after the spec")
	}
	problems := fieldProblems(js)
	// fieldProblems finds every value of the wrong type, so it names the
	// decoder's first one too, unless the two disagree on a type.
	if typeErr != nil && !slices.ContainsFunc(problems, func(p FieldError) bool { return withoutIndexes(p.Field) == typeErr.Field }) {
		problems = append(problems, FieldError{Field: typeErr.Field, Problem: typeProblem(typeErr)})
	}
	if len(problems) > 0 {
		return s, &ValidationError{Problems: problems}
	}
	return s, nil
}

// typeProblem describes a JSON value of the wrong type for its field.
func typeProblem(e *json.UnmarshalTypeError) string {
	got := e.Value
	switch got {
	case "array", "object":
		got = "an " + got
	case "string", "number", "bool":
		got = "a " + got
	}
	return fmt.Sprintf("got %s, want %s", got, expectedKind(e.Type))
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
