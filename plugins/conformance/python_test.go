package conformance_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/plugins/conformance"
)

// TestPythonExample: the Python SDK's example plugin, a script run by its
// pinned interpreter, passes the conformance suite under the real host,
// and records each revocation once.
func TestPythonExample(t *testing.T) {
	python, err := filepath.EvalSymlinks("/usr/bin/python3")
	if err != nil {
		t.Fatalf("the Python plugin test needs Debian's python3: %v", err)
	}
	if out, err := exec.Command(python, "-c", "import grpc, google.protobuf, cryptography").CombinedOutput(); err != nil {
		t.Fatalf("%s lacks grpc, protobuf or cryptography (make deps installs python3-grpcio, python3-protobuf, python3-cryptography): %s", python, out)
	}
	sdk, err := filepath.Abs(filepath.Join("..", "sdk", "python"))
	if err != nil {
		t.Fatal(err)
	}
	// The script as keywardd wants a plugin's file: not writable by others,
	// in a directory that is not either.
	dir := t.TempDir()
	b, err := os.ReadFile(filepath.Join(sdk, "example_plugin.py"))
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(dir, "example_plugin.py")
	if err := os.WriteFile(script, b, 0o644); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(dir, "revocations")
	conformance.Run(t, conformance.Config{
		Binary: script, Interpreter: python, Name: "example-py",
		Env:         map[string]string{"PYTHONPATH": sdk, "PYTHONDONTWRITEBYTECODE": "1", "EXAMPLE_REVOCATIONS": record},
		Config:      []byte(`{"label": "conformance"}`),
		BadConfig:   []byte(`{"label": 42}`),
		CallTimeout: 10 * time.Second,
	})
	got, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(got)), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "EVENT_KIND_API_KEY_REVOKED conformance conformance") || !strings.Contains(lines[1], "EVENT_KIND_TOKEN_REVOKED") {
		t.Errorf("the plugin's record of revocations (each sent twice): %q", lines)
	}
}
