package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// daemonFor starts keywardd with a policy for the test's uid and returns
// its socket and a way to stop it.
func daemonFor(t *testing.T, rules string) (*softhsmtest.Token, *daemon.Config, func()) {
	t.Helper()
	return daemonForWith(t, rules, nil)
}

// daemonForWith is daemonFor with a change to the configuration first.
func daemonForWith(t *testing.T, rules string, mod func(*daemon.Config)) (*softhsmtest.Token, *daemon.Config, func()) {
	t.Helper()
	tok := softhsmtest.New(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o750)
	cfg := &daemon.Config{DataDir: filepath.Join(dir, "data"), PolicyFile: filepath.Join(dir, "policy.yaml")}
	cfg.Socket.Path = filepath.Join(dir, "run", "k.sock")
	cfg.HSM.Module, cfg.HSM.Token, cfg.HSM.PINFile = tok.Module, tok.Label, tok.PINFile
	if mod != nil {
		mod(cfg)
	}
	policy := fmt.Sprintf("version: 1\nroles:\n  r:\n    permissions:\n%s\nbindings:\n  - role: r\n    callers:\n      - uid: %d\n", rules, os.Getuid())
	os.WriteFile(cfg.PolicyFile, []byte(policy), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	ready, errc := make(chan struct{}), make(chan error, 1)
	go func() {
		errc <- daemon.Run(ctx, cfg, daemon.Options{Ready: ready, Log: slog.New(slog.NewJSONHandler(&bytes.Buffer{}, nil))})
	}()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-errc
		}
	}
	t.Cleanup(stop)
	return tok, cfg, stop
}

type result struct {
	code           int
	stdout, stderr string
}

// ok fails the test unless the command exited 0.
func ok(t *testing.T, r result) result {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	return r
}

func keyward(t *testing.T, sock, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), append([]string{"-socket", sock}, args...), strings.NewReader(stdin), &out, &errb)
	return result{code, out.String(), errb.String()}
}

func TestCLI(t *testing.T) {
	tok, cfg, stop := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	sock := cfg.Socket.Path
	dir := t.TempDir()
	ok(t, keyward(t, sock, "", "key", "create", "-name", "orders", "-purpose", "encrypt", "-label", "team=shop"))
	r := ok(t, keyward(t, sock, "", "-output", "json", "key", "get", "-name", "orders"))
	var k struct {
		Name, Purpose, State string
		LatestVersion        int
		Labels               map[string]string
	}
	if err := json.Unmarshal([]byte(r.stdout), &k); err != nil || k.Name != "orders" || k.Purpose != "KEY_PURPOSE_ENCRYPT" || k.LatestVersion != 1 || k.Labels["team"] != "shop" {
		t.Fatalf("key get -output json: %s (%v)", r.stdout, err)
	}
	r = ok(t, keyward(t, sock, "", "key", "list"))
	found := false
	for _, line := range strings.Split(r.stdout, "\n") {
		if f := strings.Fields(line); len(f) > 5 && f[0] == "orders" {
			found = strings.Join(f[:6], " ") == "orders encrypt aes256-gcm enabled 1 1"
		}
	}
	if !found {
		t.Fatalf("key list:\n%s", r.stdout)
	}

	// Data through stdin and files, never argv.
	ok(t, keyward(t, sock, "the order book", "encrypt", "-key", "orders", "-context", "shop=1", "-out", filepath.Join(dir, "ct")))
	if fi, _ := os.Stat(filepath.Join(dir, "ct")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("output mode %04o", fi.Mode().Perm())
	}
	r = ok(t, keyward(t, sock, "", "decrypt", "-context", "shop=1", "-in", filepath.Join(dir, "ct")))
	if r.stdout != "the order book" {
		t.Fatalf("decrypt: %q", r.stdout)
	}
	ct, _ := os.ReadFile(filepath.Join(dir, "ct"))
	r = keyward(t, sock, string(ct), "decrypt", "-context", "shop=2")
	if r.code != exitInvalid || !strings.Contains(r.stderr, "the ciphertext or the encryption context does not match") {
		t.Fatalf("wrong context: %+v", r)
	}
	r = ok(t, keyward(t, sock, "", "datakey", "-key", "orders", "-context", "shop=1"))
	var dk struct {
		Plaintext string `json:"plaintext"`
		Wrapped   string `json:"wrapped_key"`
	}
	json.Unmarshal([]byte(r.stdout), &dk)
	wrapped, _ := base64.StdEncoding.DecodeString(dk.Wrapped)
	pt, _ := base64.StdEncoding.DecodeString(dk.Plaintext)
	r = ok(t, keyward(t, sock, string(wrapped), "decrypt", "-context", "shop=1"))
	if len(pt) != 32 || r.stdout != string(pt) {
		t.Fatal("the data key does not decrypt to its plaintext")
	}
	r = ok(t, keyward(t, sock, "", "datakey", "-key", "orders", "-without-plaintext"))
	if strings.Contains(r.stdout, "plaintext") || !strings.Contains(r.stdout, "wrapped_key") {
		t.Fatalf("datakey -without-plaintext: %s", r.stdout)
	}
	ok(t, keyward(t, sock, "", "datakey", "-key", "orders", "-plaintext-out", filepath.Join(dir, "dk"), "-wrapped-out", filepath.Join(dir, "dk.kw")))
	if b, _ := os.ReadFile(filepath.Join(dir, "dk")); len(b) != 32 {
		t.Fatalf("plaintext-out holds %d bytes", len(b))
	}
	ok(t, keyward(t, sock, "", "key", "rotate", "-name", "orders"))
	r = ok(t, keyward(t, sock, string(ct), "reencrypt", "-context", "shop=1"))
	r2 := ok(t, keyward(t, sock, r.stdout, "decrypt", "-context", "shop=1"))
	if r2.stdout != "the order book" {
		t.Fatal("reencrypted data does not decrypt")
	}
	r = ok(t, keyward(t, sock, "", "status"))
	if !strings.Contains(r.stdout, "healthy") || !strings.Contains(r.stdout, tok.Label) {
		t.Fatalf("status:\n%s", r.stdout)
	}

	// Exit codes.
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"key", "get", "-name", "nope"}, exitNotFound, `key not found: "nope"`},
		{[]string{"key", "create", "-name", "orders", "-purpose", "encrypt"}, exitExists, "already exists"},
		{[]string{"key", "create", "-name", "x"}, exitUsage, "needs -purpose"},
		{[]string{"encrypt", "-key", "orders", "secret-on-argv"}, exitUsage, "never arguments"},
		{[]string{"key", "disable", "-name", "orders"}, exitOK, ""},
		{[]string{"datakey", "-key", "orders"}, exitUnusable, "key is disabled"},
		{[]string{"key", "frob", "-name", "x"}, exitUsage, "unknown key command"},
	} {
		r := keyward(t, sock, "", tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("keyward %v: exit %d %q; want %d %q", tc.args, r.code, r.stderr, tc.code, tc.msg)
		}
	}
	r = keyward(t, filepath.Join(dir, "no.sock"), "", "status")
	if r.code != exitUnavailable {
		t.Errorf("no daemon: exit %d %q", r.code, r.stderr)
	}

	// The audit log verifies, with the HSM, once the daemon is stopped.
	stop()
	logPath := filepath.Join(cfg.DataDir, "audit.log")
	r = ok(t, keyward(t, "", "", "audit", "verify", logPath, "-module", tok.Module, "-token", tok.Label, "-pin-file", tok.PINFile))
	if !strings.Contains(r.stdout, "every record is covered by a checked MAC") {
		t.Fatalf("audit verify: %s", r.stdout)
	}
	b, _ := os.ReadFile(logPath)
	lines := strings.SplitAfter(string(b), "\n")
	lines[3] = strings.Replace(lines[3], `"outcome":"ok"`, `"outcome":"OK"`, 1)
	os.WriteFile(logPath, []byte(strings.Join(lines, "")), 0o600)
	r = keyward(t, "", "", "audit", "verify", logPath)
	if r.code != exitError || !strings.Contains(r.stderr, "line 4: its hash does not match its content") {
		t.Fatalf("tampered audit log: %+v", r)
	}
}

// TestCLIDenied: a refused call exits 3 and says which permission is
// missing.
func TestCLIDenied(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [KeyService.ListKeys]\n        keys: [\"*\"]")
	r := keyward(t, cfg.Socket.Path, "", "key", "create", "-name", "x", "-purpose", "encrypt")
	if r.code != exitDenied || !strings.Contains(r.stderr, `not granted KeyService.CreateKey on key "x"`) {
		t.Fatalf("denied: %+v", r)
	}
}

// TestCLITokens: mint, verify, revoke and the JWKS through the CLI; the
// token goes through standard input, never an argument.
func TestCLITokens(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"TokenService.*\", \"KeyService.*\"]\n        keys: [\"*\"]\n    tokens:\n      audiences: [orders]\n      claims: [tenant]")
	sock := cfg.Socket.Path
	ok(t, keyward(t, sock, "", "key", "create", "-name", "jwt", "-purpose", "sign", "-algorithm", "ed25519"))
	tok := strings.TrimSpace(ok(t, keyward(t, sock, "", "token", "mint", "-key", "jwt", "-audience", "orders", "-claim", "tenant=42")).stdout)
	if strings.Count(tok, ".") != 2 {
		t.Fatalf("minted %q", tok)
	}
	r := ok(t, keyward(t, sock, tok, "token", "verify", "-audience", "orders"))
	if !strings.Contains(r.stdout, "valid: sub uid:") {
		t.Fatalf("verify: %s", r.stdout)
	}
	if r := keyward(t, sock, tok, "token", "verify", "-audience", "billing"); r.code != exitError || !strings.Contains(r.stderr, "wrong audience") {
		t.Fatalf("verify for another audience: %+v", r)
	}
	if r := ok(t, keyward(t, sock, "", "token", "jwks")); !strings.Contains(r.stdout, `"alg":"EdDSA"`) {
		t.Fatalf("jwks: %s", r.stdout)
	}
	ok(t, keyward(t, sock, tok, "token", "revoke"))
	if r := keyward(t, sock, tok, "token", "verify", "-audience", "orders"); r.code != exitError || !strings.Contains(r.stderr, "revoked") {
		t.Fatalf("verify after revoke: %+v", r)
	}
	var minted struct {
		TokenID string `json:"tokenId"`
		Token   string `json:"token"`
	}
	json.Unmarshal([]byte(ok(t, keyward(t, sock, "", "-output", "json", "token", "mint", "-key", "jwt", "-audience", "orders", "-ttl", "1m")).stdout), &minted)
	ok(t, keyward(t, sock, "", "token", "revoke", "-id", minted.TokenID))
	if r := keyward(t, sock, minted.Token, "token", "verify", "-audience", "orders"); r.code != exitError || !strings.Contains(r.stderr, "revoked") {
		t.Fatalf("verify after revoke by ID: %+v", r)
	}
	if r := keyward(t, sock, "", "token", "mint", "-key", "jwt", "-audience", "admin"); r.code != exitDenied {
		t.Fatalf("mint beyond the grant: %+v", r)
	}
	ok(t, keyward(t, sock, "", "signing-key", "rotate", "-name", "jwt"))
	if r := ok(t, keyward(t, sock, "", "signing-key", "list")); !strings.Contains(r.stdout, "v1  active") || !strings.Contains(r.stdout, "v2  pending") {
		t.Fatalf("signing-key list:\n%s", r.stdout)
	}
}
