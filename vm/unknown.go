package vm

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
)

// fieldProblems returns a problem, with its field path, for every key in
// the JSON document js that has no field in a Spec and for every value of
// the wrong type. An unknown key's problem names the defined field with
// the most similar name, if one is close. encoding/json stops at the
// first unknown key and reports only the first wrong type, and a spec
// author wants them all. Keys match field names without regard to case,
// as encoding/json does.
func fieldProblems(js []byte) []FieldError {
	var doc any
	if err := json.Unmarshal(js, &doc); err != nil {
		return nil
	}
	var problems []FieldError
	walkFields("", doc, reflect.TypeFor[Spec](), &problems)
	return problems
}

// wrongType returns what t needs when the decoded JSON value v cannot be
// decoded into it, and "" when it can.
func wrongType(v any, t reflect.Type) string {
	n, isNumber := v.(float64)
	integral := isNumber && n == math.Trunc(n)
	var fits bool
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		lo, hi := -math.Pow(2, float64(t.Bits()-1)), math.Pow(2, float64(t.Bits()-1))
		fits = integral && n >= lo && n < hi
		if integral && !fits {
			return fmt.Sprintf("an integer from %.0f to %.0f", lo, hi-1)
		}
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		hi := math.Pow(2, float64(t.Bits()))
		fits = integral && n >= 0 && n < hi
		if integral && n >= hi {
			return fmt.Sprintf("an integer from 0 to %.0f", hi-1)
		}
	case reflect.Float32, reflect.Float64:
		fits = isNumber
	case reflect.Bool:
		_, fits = v.(bool)
	case reflect.String:
		_, fits = v.(string)
	case reflect.Slice, reflect.Array:
		_, fits = v.([]any)
	case reflect.Struct, reflect.Map:
		_, fits = v.(map[string]any)
	default:
		fits = true
	}
	if fits {
		return ""
	}
	return expectedKind(t)
}

// expectedKind describes the JSON values that decode into t, for problem
// messages.
func expectedKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "an integer"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer of 0 or more"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Struct, reflect.Map:
		return "a mapping of fields"
	}
	return t.String()
}

// describeJSON names a decoded JSON value for a problem message: its kind,
// and a number's value.
func describeJSON(v any) string {
	switch v := v.(type) {
	case float64:
		format := byte('f')
		if math.Abs(v) >= 1e21 {
			format = 'g'
		}
		return "number " + strconv.FormatFloat(v, format, -1, 64)
	case string:
		return "a string"
	case bool:
		return "a bool"
	case []any:
		return "a list"
	case map[string]any:
		return "a mapping"
	}
	return fmt.Sprintf("%T", v)
}

var jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()

// walkFields checks the decoded JSON value v against the Go type t and
// appends a problem for each object key that t does not define and for
// each value of the wrong type. A JSON null is never wrong: encoding/json
// leaves the field unset.
func walkFields(path string, v any, t reflect.Type, problems *[]FieldError) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if v == nil || reflect.PointerTo(t).Implements(jsonUnmarshaler) {
		return
	}
	if want := wrongType(v, t); want != "" && path != "" {
		*problems = append(*problems, FieldError{Field: path, Problem: fmt.Sprintf("got %s, want %s", describeJSON(v), want)})
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return
		}
		fields := jsonFields(t)
		for _, key := range slices.Sorted(maps.Keys(obj)) {
			field := joinFieldPath(path, key)
			ft, ok := lookupJSONField(fields, key)
			if !ok {
				*problems = append(*problems, FieldError{Field: field, Problem: unknownFieldProblem(key, fields)})
				continue
			}
			walkFields(field, obj[key], ft, problems)
		}
	case reflect.Slice, reflect.Array:
		list, ok := v.([]any)
		if !ok {
			return
		}
		for i, elem := range list {
			walkFields(fmt.Sprintf("%s[%d]", path, i), elem, t.Elem(), problems)
		}
	case reflect.Map:
		obj, ok := v.(map[string]any)
		if !ok {
			return
		}
		for _, key := range slices.Sorted(maps.Keys(obj)) {
			walkFields(joinFieldPath(path, key), obj[key], t.Elem(), problems)
		}
	}
}

// jsonFields maps the JSON names of t's exported fields to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	fields := make(map[string]reflect.Type, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch name {
		case "-":
			continue
		case "":
			name = f.Name
		}
		fields[name] = f.Type
	}
	return fields
}

// lookupJSONField finds key among fields, preferring an exact match and
// then one that differs only in case.
func lookupJSONField(fields map[string]reflect.Type, key string) (reflect.Type, bool) {
	if t, ok := fields[key]; ok {
		return t, true
	}
	for name, t := range fields {
		if strings.EqualFold(name, key) {
			return t, true
		}
	}
	return nil, false
}

// joinFieldPath appends key to a field path. A key that is empty or has
// characters no field name has is quoted, so that the path stays readable.
func joinFieldPath(path, key string) string {
	plain := key != "" && !strings.ContainsFunc(key, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-')
	})
	if !plain {
		key = strconv.Quote(key)
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

// maxSuggestKey is the longest key that SuggestName compares with the
// names. No field or key name comes near it.
const maxSuggestKey = 64

// unknownFieldProblem describes an unknown key, naming the closest defined
// field when there is one.
func unknownFieldProblem(key string, fields map[string]reflect.Type) string {
	if best := SuggestName(key, slices.Sorted(maps.Keys(fields))); best != "" {
		return fmt.Sprintf("unknown field, did you mean %q?", best)
	}
	return "unknown field"
}

// SuggestName returns the name in names that a misspelled key most likely
// meant, for a "did you mean" hint, or "" when none is close. A name that
// has the key as one of its underscore-separated words is closest ("mac"
// for "guest_mac"), then one a few edits away (about one edit per three
// bytes) or sharing its first four characters with the key. Ties go to
// the earlier name.
func SuggestName(key string, names []string) string {
	if len(key) > maxSuggestKey {
		return ""
	}
	lower := strings.ToLower(key)
	best, bestScore := "", -1
	for _, name := range names {
		score := -1
		if slices.Contains(strings.Split(name, "_"), lower) {
			score = 0
		} else if d := editDistance(lower, name); d <= max(1, len(lower)/3) ||
			(len(lower) >= 4 && len(name) >= 4 && lower[:4] == name[:4]) {
			score = 1 + d
		}
		if score >= 0 && (bestScore < 0 || score < bestScore) {
			best, bestScore = name, score
		}
	}
	return best
}

// editDistance returns the Levenshtein distance between a and b, counted
// in bytes. Field names are ASCII.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
