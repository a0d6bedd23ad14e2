package main

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/plugins/conformance"
)

// TestCredentialCLI: keyward credential against keywardd running the file
// plugin: the secret comes out on standard output or in a 0600 file, and
// agrees with the plugin's file after a rotation.
func TestCredentialCLI(t *testing.T) {
	bin := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-file")
	b, _ := os.ReadFile(bin)
	sum := sha256.Sum256(b)
	dir := t.TempDir()
	_, cfg, _ := daemonForWith(t, "      - operations: [\"*\"]\n        keys: [\"*\"]", func(c *daemon.Config) {
		c.Plugins = []daemon.PluginConfig{{Name: "file", Path: bin, SHA256: hex.EncodeToString(sum[:]), Env: map[string]string{"KEYWARD_FILE_DIRS": dir}}}
	})
	sock := cfg.Socket.Path
	path := filepath.Join(dir, "app-password")
	r := ok(t, keyward(t, sock, "", "credential", "register", "-name", "app-db", "-plugin", "file", "-config", `{"path": "`+path+`"}`, "-rotation-period", "720h", "-overlap", "1h"))
	if !strings.HasPrefix(r.stdout, "app-db\tfile\tactive\t") {
		t.Fatalf("register: %q", r.stdout)
	}
	r = ok(t, keyward(t, sock, "", "credential", "get", "-name", "app-db"))
	if file, _ := os.ReadFile(path); r.stdout != string(file) || len(file) != 32 {
		t.Fatal("credential get and the plugin's file disagree")
	}
	first := r.stdout
	ok(t, keyward(t, sock, "", "credential", "rotate", "-name", "app-db"))
	ok(t, keyward(t, sock, "", "credential", "get", "-name", "app-db", "-out", filepath.Join(dir, "out")))
	got, _ := os.ReadFile(filepath.Join(dir, "out"))
	if file, _ := os.ReadFile(path); string(got) != string(file) || string(got) == first {
		t.Fatal("after rotate: -out and the file disagree, or nothing changed")
	}
	if fi, _ := os.Stat(filepath.Join(dir, "out")); fi.Mode().Perm() != 0o600 {
		t.Errorf("-out mode %04o", fi.Mode().Perm())
	}
	r = ok(t, keyward(t, sock, "", "credential", "list"))
	if !strings.Contains(r.stdout, "app-db") || strings.Contains(r.stdout, first) {
		t.Fatalf("list:\n%s", r.stdout)
	}
	ok(t, keyward(t, sock, "", "credential", "revoke", "-name", "app-db"))
	if r := keyward(t, sock, "", "credential", "get", "-name", "app-db"); r.code != exitUnusable || !strings.Contains(r.stderr, "revoked") {
		t.Errorf("get of a revoked credential: %+v", r)
	}
	if r := keyward(t, sock, "", "credential", "get"); r.code != exitUsage {
		t.Errorf("get without -name: %+v", r)
	}
}
