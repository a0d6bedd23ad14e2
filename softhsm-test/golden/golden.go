// Package golden reads, and with -update writes, the golden files of
// keyward's long-lived formats (docs/formats.md): a test makes its vectors
// from fixed inputs, and compares them with what the file holds. A vector
// that changed is a format change (a new version, with a migration), not a
// test to update. Tests only: it lives with the other test fixtures.
package golden

import (
	"encoding/json"
	"flag"
	"os"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/ with what the tests make (a format change)")

// Update reports whether the test binary runs with -update.
func Update() bool { return *update }

// File returns what path holds, after writing made there if -update.
func File(t testing.TB, path string, made []byte) []byte {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, made, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden file: %v (go test -update writes it)", err)
	}
	return b
}

// JSON returns what path holds, read as JSON into a T, after writing made
// there (indented JSON) if -update.
func JSON[T any](t testing.TB, path string, made T) T {
	t.Helper()
	var b []byte
	if *update {
		m, err := json.MarshalIndent(made, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		b = append(m, '\n')
	}
	var out T
	if err := json.Unmarshal(File(t, path, b), &out); err != nil {
		t.Fatalf("golden file %s: %v", path, err)
	}
	return out
}
