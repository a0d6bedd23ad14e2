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
	// The plugin as it is shipped: one zipapp of the example and the SDK,
	// run isolated (-I: no PYTHONPATH, no user site), in a directory as
	// keywardd wants a plugin's.
	dir := t.TempDir()
	build := filepath.Join(dir, "build")
	if err := os.MkdirAll(build, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-r", filepath.Join(sdk, "keyward_plugin"), build).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if out, err := exec.Command("cp", filepath.Join(sdk, "example_plugin.py"), filepath.Join(build, "__main__.py")).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	pyz := filepath.Join(dir, "example-py.pyz")
	if out, err := exec.Command(python, "-m", "zipapp", build, "-o", pyz).CombinedOutput(); err != nil {
		t.Fatalf("zipapp: %v: %s", err, out)
	}
	if err := os.Chmod(pyz, 0o644); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(dir, "revocations")
	conformance.Run(t, conformance.Config{
		Binary: pyz, Interpreter: python, InterpreterArgs: []string{"-I"}, Name: "example-py",
		Env:         map[string]string{"PYTHONPATH": "/nonexistent", "EXAMPLE_REVOCATIONS": record},
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

// TestPythonSDKScrubs: the Python SDK keeps a request's secret out of its
// errors and logs, and redacts secret-named attributes at any depth, as
// the Go SDK does.
func TestPythonSDKScrubs(t *testing.T) {
	sdk, err := filepath.Abs(filepath.Join("..", "sdk", "python"))
	if err != nil {
		t.Fatal(err)
	}
	code := `
import json, keyward_plugin as kp
from keyward_plugin import plugin_pb2 as pb
r = pb.TestRequest(operation_id="op", secret=b"S3CRET-hunter2")
print(kp._scrub("login refused for password S3CRET-hunter2 (b'S3CRET-hunter2')", r))
print(json.dumps(kp._redact({"cfg": {"password": "x", "name": "n"}, "api_key": "y", "key_id": "ak_1"}), sort_keys=True))
`
	cmd := exec.Command("/usr/bin/python3", "-c", code)
	cmd.Env = []string{"PYTHONPATH=" + sdk, "PYTHONDONTWRITEBYTECODE=1"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := "login refused for password [redacted] ([redacted])\n" +
		`{"api_key": "[redacted]", "cfg": {"name": "n", "password": "[redacted]"}, "key_id": "ak_1"}` + "\n"
	if string(out) != want {
		t.Errorf("the SDK's scrubbing:\n%s\nwant:\n%s", out, want)
	}
}
