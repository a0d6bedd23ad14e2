package file_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/plugins/conformance"
)

// TestConformance runs the file plugin, the real binary, through the
// conformance suite: after each rotation the file holds the new secret,
// mode 0600, and nothing is left beside it.
func TestConformance(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "db-password")
	conformance.Run(t, conformance.Config{
		Binary:    conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-file"),
		Name:      "file",
		Env:       map[string]string{"KEYWARD_FILE_DIRS": dir},
		Config:    []byte(`{"path": "` + path + `"}`),
		BadConfig: []byte(`{"path": "` + filepath.Join(t.TempDir(), "elsewhere") + `"}`),
		Current: func(t *testing.T, _ string, secret []byte) {
			b, err := os.ReadFile(path)
			if err != nil || string(b) != string(secret) {
				t.Fatalf("the file holds %d bytes (%v), not the new secret", len(b), err)
			}
			if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
				t.Errorf("mode %04o, want 0600", fi.Mode().Perm())
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("%d files in the directory, want the one", len(entries))
			}
		},
		Retired: func(t *testing.T, _ string, secret []byte) {
			if b, _ := os.ReadFile(path); string(b) == string(secret) {
				t.Error("the retired secret is still in the file")
			}
		},
	})
}
