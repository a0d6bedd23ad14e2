package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAPIKeyCLI: every apikey command against a real keywardd; secrets only
// on standard output or in a 0600 file, read back from standard input.
func TestAPIKeyCLI(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	sock := cfg.Socket.Path
	dir := t.TempDir()
	r := ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "team-a", "-name", "orders", "-env", "prod", "-perm", "orders:read",
		"-perm", "orders:write", "-limit", "10/m,burst=2", "-limit", "1000/h", "-allow-ip", "192.0.2.0/24", "-tag", "ci", "-meta", "customer=42",
		"-quota", "100", "-secret-out", filepath.Join(dir, "key")))
	if r.stdout != "" || !strings.Contains(r.stderr, "the secret is shown this once") {
		t.Fatalf("create -secret-out: stdout %q stderr %q", r.stdout, r.stderr)
	}
	id := strings.Fields(r.stderr)[1]
	if fi, err := os.Stat(filepath.Join(dir, "key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the secret file: %v %v", fi, err)
	}
	key, _ := os.ReadFile(filepath.Join(dir, "key"))
	if !strings.HasPrefix(string(key), "kw_") {
		t.Fatalf("the secret file holds %d bytes not starting kw_", len(key))
	}

	r = ok(t, keyward(t, sock, string(key), "apikey", "verify", "-env", "prod", "-perm", "orders:read", "-ip", "192.0.2.7"))
	if !strings.HasPrefix(r.stdout, "VALID: "+id) || !strings.Contains(r.stdout, "limit 10/1m0s,burst=2: 1 left") || !strings.Contains(r.stdout, "quota: 99 left") {
		t.Fatalf("verify:\n%s", r.stdout)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-env", "staging", "-ip", "192.0.2.7"}, "WRONG_ENVIRONMENT"},
		{[]string{"-env", "prod", "-ip", "198.51.100.1"}, "IP_NOT_ALLOWED"},
		{[]string{"-env", "prod", "-ip", "192.0.2.7", "-perm", "users:delete"}, "FORBIDDEN"},
		{[]string{"-env", "prod", "-ip", "192.0.2.7", "-cost", "2"}, "RATE_LIMITED"},
	} {
		r := keyward(t, sock, string(key), append([]string{"apikey", "verify"}, c.args...)...)
		if r.code != exitError || !strings.HasPrefix(r.stdout, c.want) || !strings.Contains(r.stderr, "the key is refused") {
			t.Errorf("verify %v: exit %d, %q %q; want %s", c.args, r.code, r.stdout, r.stderr, c.want)
		}
	}
	if r := keyward(t, sock, string(key[:20]), "apikey", "verify", "-env", "prod"); r.code != exitError || !strings.HasPrefix(r.stdout, "MALFORMED") {
		t.Errorf("a truncated key: %+v", r)
	}

	r = ok(t, keyward(t, sock, "", "apikey", "show", "-id", id))
	for _, want := range []string{"team-a", "orders:read, orders:write", "10/1m0s,burst=2, 1000/1h0m0s,burst=1000", "192.0.2.0/24", "99 left", "metadata customer  42"} {
		if !strings.Contains(strings.Join(strings.Fields(r.stdout), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("show lacks %q:\n%s", want, r.stdout)
		}
	}
	r = ok(t, keyward(t, sock, "", "apikey", "update", "-id", id, "-perm", "orders:read", "-no-allowlist"))
	// An admin may widen: the allowlist goes; the permissions narrow.
	if strings.Contains(r.stdout, "allowed ips") || strings.Contains(r.stdout, "orders:write") {
		t.Errorf("update -perm orders:read -no-allowlist:\n%s", r.stdout)
	}
	if r := keyward(t, sock, "", "apikey", "update", "-id", id, "-disable", "-enable"); r.code != exitUsage {
		t.Errorf("contradicting flags: %+v", r)
	}
	if r := keyward(t, sock, "", "apikey", "update", "-id", id, "-perm", "Orders"); r.code != exitInvalid || !strings.Contains(r.stderr, "resource:action") {
		t.Errorf("a bad permission: %+v", r)
	}

	// A -secret-out that cannot be written fails before the rotation.
	if r := keyward(t, sock, "", "apikey", "rotate", "-id", id, "-overlap", "0s", "-secret-out", filepath.Join(dir, "nope", "key")); r.code != exitError || !strings.Contains(r.stderr, "nothing was done") {
		t.Fatalf("rotate to an unwritable file: %+v", r)
	}
	if r := keyward(t, sock, "", "apikey", "create", "-h"); r.code != exitUsage || !strings.Contains(r.stderr, "-secret-out") {
		t.Errorf("create -h: %+v", r)
	}
	r = ok(t, keyward(t, sock, "", "apikey", "rotate", "-id", id, "-overlap", "0s"))
	newKey := strings.TrimSpace(r.stdout)
	if !strings.HasPrefix(newKey, "kw_") || newKey == strings.TrimSpace(string(key)) {
		t.Fatalf("rotate printed %d bytes", len(newKey))
	}
	if r := keyward(t, sock, string(key), "apikey", "verify", "-env", "prod"); !strings.HasPrefix(r.stdout, "EXPIRED") {
		t.Errorf("the old secret after rotate -overlap 0s: %q", r.stdout)
	}
	ok(t, keyward(t, sock, newKey, "apikey", "verify", "-env", "prod", "-perm", "orders:read"))

	r = ok(t, keyward(t, sock, "", "apikey", "usage", "-id", id))
	if !strings.Contains(r.stdout, "VALID=2") || !strings.Contains(r.stdout, "192.0.2.0/24=") {
		t.Errorf("usage:\n%s", r.stdout)
	}

	for range 3 {
		ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "team-b", "-name", "n", "-env", "dev", "-perm", "read-only"))
	}
	r = ok(t, keyward(t, sock, "", "-output", "json", "apikey", "list", "-page-size", "1"))
	var list struct{ Keys []struct{ Id, Owner string } }
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list.Keys) != 4 {
		t.Fatalf("list (pages of 1) = %d keys, %v", len(list.Keys), err)
	}
	if strings.Contains(r.stdout, "kw_") {
		t.Errorf("list shows a secret")
	}
	r = ok(t, keyward(t, sock, "", "apikey", "revoke", "-owner", "team-b", "-dry-run"))
	if r.stdout != "would revoke 3 keys (dry run: nothing was revoked)\n" {
		t.Errorf("dry run: %q", r.stdout)
	}
	r = ok(t, keyward(t, sock, "", "apikey", "list", "-state", "active", "-owner", "team-b"))
	if n := strings.Count(r.stdout, "team-b"); n != 3 {
		t.Errorf("after a dry run %d active keys of team-b, want 3", n)
	}
	r = ok(t, keyward(t, sock, "", "apikey", "revoke", "-owner", "team-b"))
	if r.stdout != "revoked 3 keys\n" {
		t.Errorf("bulk revoke: %q", r.stdout)
	}
	ok(t, keyward(t, sock, "", "apikey", "revoke", "-id", id))
	if r := keyward(t, sock, newKey, "apikey", "verify", "-env", "prod"); !strings.HasPrefix(r.stdout, "REVOKED") {
		t.Errorf("after revoke -id: %q", r.stdout)
	}
	if r := keyward(t, sock, "", "apikey", "revoke"); r.code != exitUsage {
		t.Errorf("revoke with nothing named: %+v", r)
	}
	if r := keyward(t, sock, "", "apikey", "create", "-owner", "a", "-name", "b", "-env", "prod", "-perm", "read-only", "kw_secret"); r.code != exitUsage || !strings.Contains(r.stderr, "never arguments") {
		t.Errorf("a secret as an argument: %+v", r)
	}
}
