package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestReview: keyward review finds the API keys a review must look at:
// without expiry, admin-scoped, in prod without an allowlist, never used,
// and the top consumer; in table, JSON and markdown.
func TestReview(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	sock := cfg.Socket.Path
	ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "a", "-name", "wide", "-env", "prod", "-perm", "admin"))
	ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "b", "-name", "narrow", "-env", "prod", "-perm", "orders:read",
		"-allow-ip", "192.0.2.0/24", "-ttl", "720h", "-secret-out", t.TempDir()+"/k"))
	busy := strings.TrimSpace(ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "c", "-name", "busy", "-env", "dev", "-perm", "read-only")).stdout)
	for range 3 {
		ok(t, keyward(t, sock, busy, "apikey", "verify", "-env", "dev"))
	}
	r := ok(t, keyward(t, sock, "", "review", "-format", "json", "-unused", "0s"))
	var fs []finding
	if err := json.Unmarshal([]byte(r.stdout), &fs); err != nil {
		t.Fatalf("review -format json: %v\n%s", err, r.stdout)
	}
	has := func(check, name string) bool {
		for _, f := range fs {
			if f.Check == check && strings.Contains(f.Subject, name) {
				return true
			}
		}
		return false
	}
	for _, c := range []struct{ check, name string }{
		{"API key without expiry", "wide"}, {"admin-scoped API key", "wide"}, {"prod API key without an IP allowlist", "wide"},
		{"API key never used", "wide"}, {"API key never used", "narrow"},
	} {
		if !has(c.check, c.name) {
			t.Errorf("no %q for %s in %s", c.check, c.name, r.stdout)
		}
	}
	if has("API key without expiry", "narrow") || has("prod API key without an IP allowlist", "narrow") || has("API key never used", "busy") {
		t.Errorf("findings that are not: %s", r.stdout)
	}
	var top bool
	for _, f := range fs {
		top = top || f.Check == "top consumer" && strings.Contains(f.Detail, "3 valid")
	}
	if !top {
		t.Errorf("no top consumer with 3 verifications: %s", r.stdout)
	}
	if md := ok(t, keyward(t, sock, "", "review", "-format", "markdown")).stdout; !strings.HasPrefix(md, "# keyward review") || !strings.Contains(md, "| admin-scoped API key |") {
		t.Errorf("markdown:\n%s", md)
	}
	if tb := ok(t, keyward(t, sock, "", "review")).stdout; !strings.HasPrefix(tb, "CHECK") {
		t.Errorf("table:\n%s", tb)
	}
}

// TestEmergencyRevoke: keyward revoke -all: the dry run counts the keys,
// the revocation says when it took effect, and every key is refused after.
func TestEmergencyRevoke(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	sock := cfg.Socket.Path
	var keys []string
	for i := range 5 {
		keys = append(keys, strings.TrimSpace(ok(t, keyward(t, sock, "", "apikey", "create", "-owner", "o", "-name", "k", "-env", "prod", "-perm", "read-only", "-tag", []string{"a", "b"}[i%2])).stdout))
	}
	if r := ok(t, keyward(t, sock, "", "revoke", "-all", "-dry-run")); r.stdout != "would revoke 5 keys (dry run: nothing was revoked)\n" {
		t.Fatalf("dry run: %q", r.stdout)
	}
	ok(t, keyward(t, sock, keys[0], "apikey", "verify", "-env", "prod"))
	r := ok(t, keyward(t, sock, "", "revoke", "-all"))
	if r.stdout != "revoked 5 keys\n" || !strings.Contains(r.stderr, "in effect") {
		t.Fatalf("revoke -all: %q %q", r.stdout, r.stderr)
	}
	for _, k := range keys {
		if r := keyward(t, sock, k, "apikey", "verify", "-env", "prod"); !strings.HasPrefix(r.stdout, "REVOKED") {
			t.Errorf("after revoke -all: %q", r.stdout)
		}
	}
	if r := keyward(t, sock, "", "revoke", "-all", "-owner", "o"); r.code != exitUsage {
		t.Errorf("-all with -owner: %+v", r)
	}
}

// TestRotationPlan: keyward rotation plan lists the keys with a rotation
// period, soonest first, and -within leaves out the later ones.
func TestRotationPlan(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	sock := cfg.Socket.Path
	ok(t, keyward(t, sock, "", "key", "create", "-name", "slow", "-purpose", "encrypt", "-rotation-period", "2160h"))
	ok(t, keyward(t, sock, "", "key", "create", "-name", "fast", "-purpose", "encrypt", "-rotation-period", "720h"))
	ok(t, keyward(t, sock, "", "key", "create", "-name", "never", "-purpose", "encrypt"))
	r := ok(t, keyward(t, sock, "", "-output", "json", "rotation", "plan"))
	var plan []planned
	if err := json.Unmarshal([]byte(r.stdout), &plan); err != nil {
		t.Fatal(err)
	}
	if len(plan) != 2 || plan[0].Name != "fast" || plan[1].Name != "slow" || plan[0].Late || plan[0].Period != 720*time.Hour {
		t.Fatalf("plan: %+v", plan)
	}
	r = ok(t, keyward(t, sock, "", "rotation", "plan", "-within", "800h"))
	if !strings.Contains(r.stdout, "fast") || strings.Contains(r.stdout, "slow") {
		t.Errorf("plan -within 800h:\n%s", r.stdout)
	}
}
