package client_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// python is Debian's python3 with grpc and protobuf, and the client's
// directory for PYTHONPATH; a test that needs them fails without them
// (make deps installs them).
func python(t *testing.T) (string, string) {
	t.Helper()
	if out, err := exec.Command("/usr/bin/python3", "-c", "import grpc, google.protobuf, cryptography").CombinedOutput(); err != nil {
		t.Fatalf("/usr/bin/python3 lacks grpc, protobuf or cryptography (make deps installs python3-grpcio, python3-protobuf, python3-cryptography): %s", out)
	}
	dir, err := filepath.Abs("python")
	if err != nil {
		t.Fatal(err)
	}
	return "/usr/bin/python3", dir
}

// TestPythonClient: the Python client against a real keywardd: a data key
// opens again to its plaintext, bound to its context; a message seals and
// opens; a token minted verifies; an API key verifies, and a revoked one
// is refused; a refusal is an Error with keywardd's code.
func TestPythonClient(t *testing.T) {
	py, dir := python(t)
	d := daemontest.Start(t, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  all:
    permissions:
      - operations: ["*"]
        keys: ["*"]
    tokens:
      audiences: [orders]
      scopes: ["orders:read"]
      claims: [tenant]
bindings:
  - role: all
    callers:
      - uid: %d
`, os.Getuid())))
	ctx := context.Background()
	keys := keywardv1.NewKeyServiceClient(d.Conn)
	for name, purpose := range map[string]keywardv1.KeyPurpose{"orders": keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT, "jwt": keywardv1.KeyPurpose_KEY_PURPOSE_SIGN} {
		if _, err := keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: purpose}); err != nil {
			t.Fatal(err)
		}
	}
	ak := keywardv1.NewAPIKeyServiceClient(d.Conn)
	k, err := ak.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "n", Environment: "prod", Permissions: []string{"orders:read"},
		Metadata: map[string]string{"plan": "gold"}})
	if err != nil {
		t.Fatal(err)
	}
	revoked, err := ak.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "old", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ak.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: revoked.Key.Id}); err != nil {
		t.Fatal(err)
	}
	script := `
import json, os, sys
import keyward_client as kw
c = kw.Client()
c.ping()
out = {}
dk = c.generate_data_key("orders", {"tenant": "42"})
out["datakey"] = c.decrypt(dk.wrapped, {"tenant": "42"}) == dk.plaintext and len(dk.plaintext) == 32
try:
    c.decrypt(dk.wrapped, {"tenant": "43"})
    out["wrong_context"] = "opened"
except kw.Error as e:
    out["wrong_context"] = e.code
out["message"] = c.decrypt(c.encrypt("orders", b"hello", {"a": "b"}), {"a": "b"}).decode()
t = c.mint_token("jwt", ["orders"], scopes=["orders:read"], claims={"tenant": "42"}, ttl=300)
v = c.verify_token(t.token, "orders")
out["token"] = [v.valid, v.scopes, v.claims.get("tenant")]
a = c.verify_api_key(sys.stdin.readline().strip(), environment="prod", permissions=["orders:read"], source_ip="192.0.2.1")
out["apikey"] = [a.valid, a.code, a.owner, a.metadata]
r = c.verify_api_key(sys.stdin.readline().strip(), environment="prod", permissions=["orders:read"])
out["revoked"] = [r.valid, r.code]
try:
    c.generate_data_key("no-such-key")
except kw.Error as e:
    out["missing"] = [e.code, "no-such-key" in e.message]
print(json.dumps(out))
`
	cmd := exec.Command(py, "-c", script)
	cmd.Env = []string{"PYTHONPATH=" + dir, "PYTHONDONTWRITEBYTECODE=1", "KEYWARD_SOCKET=" + d.Socket}
	cmd.Stdin = strings.NewReader(k.Secret + "\n" + revoked.Secret + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the Python client: %v\n%s", err, out)
	}
	var got map[string]any
	if err := json.Unmarshal(bytes.TrimSpace(out), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := map[string]any{
		"datakey": true, "wrong_context": "INVALID_ARGUMENT", "message": "hello",
		"token":   []any{true, []any{"orders:read"}, "42"},
		"apikey":  []any{true, "VALID", "shop", map[string]any{"plan": "gold"}},
		"revoked": []any{false, "REVOKED"},
		"missing": []any{"NOT_FOUND", true},
	}
	for k, w := range want {
		if fmt.Sprint(got[k]) != fmt.Sprint(w) {
			t.Errorf("%s: %v; want %v", k, got[k], w)
		}
	}
}

// TestPythonClientLimited: a caller over its call rate gets an Error that
// says so (limited) and how long keywardd said to wait, read from the
// status details keywardd sends; another refusal is not limited.
func TestPythonClientLimited(t *testing.T) {
	py, dir := python(t)
	d := daemontest.Start(t, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  all:
    limits:
      rate: [{limit: 2, per: 1m, burst: 2}]
    permissions:
      - operations: ["*"]
        keys: ["*"]
bindings:
  - role: all
    callers:
      - uid: %d
`, os.Getuid())))
	script := `
import json
import keyward_client as kw
c = kw.Client()
out = []
for _ in range(3):
    try:
        c.generate_data_key("no-such-key")
    except kw.Error as e:
        out.append([e.code, e.limited, e.retry_after])
print(json.dumps(out))
`
	cmd := exec.Command(py, "-c", script)
	cmd.Env = []string{"PYTHONPATH=" + dir, "PYTHONDONTWRITEBYTECODE=1", "KEYWARD_SOCKET=" + d.Socket}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the Python client: %v\n%s", err, out)
	}
	var got [][]any
	if err := json.Unmarshal(bytes.TrimSpace(out), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(got) != 3 || fmt.Sprint(got[0]) != "[NOT_FOUND false 0]" || fmt.Sprint(got[1]) != "[NOT_FOUND false 0]" {
		t.Fatalf("the first two calls: %v; want NOT_FOUND, not limited", got)
	}
	if got[2][0] != "RESOURCE_EXHAUSTED" || got[2][1] != true {
		t.Fatalf("the third call: %v; want RESOURCE_EXHAUSTED, limited", got[2])
	}
	if wait, _ := got[2][2].(float64); wait <= 0 || wait > 60 {
		t.Errorf("retry_after %v; want a wait of up to the minute's budget", got[2][2])
	}
}

// TestPythonExampleApp: the example application admits a request with a
// valid API key only, and gives back what it sealed.
func TestPythonExampleApp(t *testing.T) {
	py, dir := python(t)
	d := daemontest.Start(t)
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(d.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "notes", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	k, err := keywardv1.NewAPIKeyServiceClient(d.Conn).CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "app", Name: "n", Environment: "prod",
		Permissions: []string{"notes:read", "notes:write"}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := keywardv1.NewAPIKeyServiceClient(d.Conn).CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "other", Name: "n", Environment: "prod",
		Permissions: []string{"notes:read"}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	app := exec.Command(py, filepath.Join(dir, "example_app.py"), fmt.Sprint(port))
	app.Env = []string{"PYTHONPATH=" + dir, "PYTHONDONTWRITEBYTECODE=1", "KEYWARD_SOCKET=" + d.Socket}
	var logs bytes.Buffer
	app.Stdout, app.Stderr = &logs, &logs
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Process.Kill(); app.Wait() })
	base := fmt.Sprintf("http://127.0.0.1:%d/notes/first", port)
	do := func(method, key, body string) (int, string) {
		req, _ := http.NewRequest(method, base, strings.NewReader(body))
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if code, _ := do("GET", "", ""); code != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the example app did not answer:\n%s", logs.String())
		}
	}
	if code, _ := do("POST", k.Secret, "a note"); code != http.StatusNoContent {
		t.Fatalf("POST with the key: %d\n%s", code, logs.String())
	}
	if code, body := do("GET", k.Secret, ""); code != 200 || body != "a note" {
		t.Errorf("GET with the key: %d %q", code, body)
	}
	if code, _ := do("GET", "", ""); code != http.StatusUnauthorized {
		t.Errorf("GET without a key: %d", code)
	}
	if code, body := do("GET", other.Secret, ""); code != http.StatusNotFound || body == "a note" {
		t.Errorf("another owner's key read the note: %d %q", code, body)
	}
	if code, _ := do("POST", other.Secret, "x"); code != http.StatusForbidden {
		t.Errorf("POST with a key lacking notes:write: %d; want 403", code)
	}
	if code, _ := do("GET", k.Secret[:len(k.Secret)-2]+"zz", ""); code != http.StatusUnauthorized {
		t.Errorf("GET with a wrong key: %d", code)
	}
}
