package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/schedule"
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

// TestRotationPlan: keyward rotation plan shows keywardd's schedule: keys
// by a configured rule or their own period, soonest first, each with its
// policy; -within leaves out the later ones; keywardd's own keys are not in
// it.
func TestRotationPlan(t *testing.T) {
	_, cfg, _ := daemonForWith(t, "      - operations: [\"*\"]\n        keys: [\"*\"]", func(c *daemon.Config) {
		c.Rotation.Keys = []schedule.KeyRule{{Match: "pay-*", Policy: "high"}}
	})
	sock := cfg.Socket.Path
	ok(t, keyward(t, sock, "", "key", "create", "-name", "slow", "-purpose", "encrypt", "-rotation-period", "2160h"))
	ok(t, keyward(t, sock, "", "key", "create", "-name", "pay-eu", "-purpose", "encrypt"))
	ok(t, keyward(t, sock, "", "key", "create", "-name", "never", "-purpose", "encrypt"))
	r := ok(t, keyward(t, sock, "", "-output", "json", "rotation", "plan"))
	var plan []planned
	if err := json.Unmarshal([]byte(r.stdout), &plan); err != nil {
		t.Fatal(err)
	}
	if len(plan) != 2 || plan[0].Name != "pay-eu" || plan[0].Policy != "high" || plan[0].Period != 720*time.Hour || plan[0].Overlap != 24*time.Hour ||
		plan[1].Name != "slow" || plan[1].Policy != "custom" || plan[0].Late || plan[0].Due.Before(time.Now().Add(719*time.Hour)) {
		t.Fatalf("plan: %+v", plan)
	}
	r = ok(t, keyward(t, sock, "", "rotation", "plan", "-limit", "1"))
	if !strings.Contains(r.stdout, "pay-eu") || strings.Contains(r.stdout, "slow") || !strings.Contains(r.stderr, "the 1 soonest of 2") {
		t.Errorf("plan -limit 1: %+v", r)
	}
	if r := keyward(t, sock, "", "rotation", "plan", "-limit", "20000"); r.code != exitInvalid || !strings.Contains(r.stderr, "at most 10000") {
		t.Errorf("plan -limit 20000: %+v", r)
	}
	r = ok(t, keyward(t, sock, "", "rotation", "plan", "-within", "800h"))
	if !strings.Contains(r.stdout, "pay-eu") || !strings.Contains(r.stdout, "high (720h0m0s)") || strings.Contains(r.stdout, "slow") {
		t.Errorf("plan -within 800h:\n%s", r.stdout)
	}
}

// TestPanicRotate: keyward panic-rotate on a signing key: the dry run
// counts and changes nothing; the real one makes a token signed before it
// refused, leaves the JWKS with the new version alone, says how long it
// took, and is audited.
func TestPanicRotate(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]\n    tokens:\n      audiences: [orders]")
	sock := cfg.Socket.Path
	ok(t, keyward(t, sock, "", "key", "create", "-name", "jwt", "-purpose", "sign", "-algorithm", "ed25519"))
	tok := strings.TrimSpace(ok(t, keyward(t, sock, "", "token", "mint", "-key", "jwt", "-audience", "orders")).stdout)
	ok(t, keyward(t, sock, tok, "token", "verify", "-audience", "orders"))
	before := ok(t, keyward(t, sock, "", "token", "jwks")).stdout
	r := ok(t, keyward(t, sock, "", "panic-rotate", "jwt", "-dry-run"))
	if !strings.Contains(r.stdout, "would make version 2") || !strings.Contains(r.stdout, "versions [1] would stop") || strings.Contains(r.stderr, "in effect") {
		t.Fatalf("dry run: %+v", r)
	}
	ok(t, keyward(t, sock, tok, "token", "verify", "-audience", "orders")) // the dry run changed nothing
	r = ok(t, keyward(t, sock, "", "panic-rotate", "jwt"))
	if !strings.Contains(r.stdout, "did make version 2") || !strings.Contains(r.stdout, "every token they signed is refused") || !strings.Contains(r.stderr, "in effect") {
		t.Fatalf("panic-rotate: %+v", r)
	}
	if r := keyward(t, sock, tok, "token", "verify", "-audience", "orders"); r.code == exitOK {
		t.Fatal("a token of the compromised version still verifies")
	}
	jwks := ok(t, keyward(t, sock, "", "token", "jwks")).stdout
	if strings.Count(jwks, `"kid"`) != 1 || jwks == before {
		t.Errorf("JWKS after the panic: %s", jwks)
	}
	fresh := strings.TrimSpace(ok(t, keyward(t, sock, "", "token", "mint", "-key", "jwt", "-audience", "orders")).stdout)
	ok(t, keyward(t, sock, fresh, "token", "verify", "-audience", "orders"))
	if r := keyward(t, sock, "", "panic-rotate", "keyward-audit"); r.code == exitOK {
		t.Error("panic-rotate of keywardd's own key was accepted")
	}
	audit, _ := os.ReadFile(filepath.Join(cfg.DataDir, "audit.log"))
	if n := strings.Count(string(audit), `"op":"RotationService.PanicRotate"`); n != 3 {
		t.Errorf("%d PanicRotate records, want 3 (dry run, panic, refusal)", n)
	}
}

// TestReviewAudit: keyward review -audit reads keywardd's audit log for
// denied calls by caller and callers whose calls fail far more often than
// the others', within -window.
func TestReviewAudit(t *testing.T) {
	_, cfg, _ := daemonFor(t, "      - operations: [\"*\"]\n        keys: [\"*\"]")
	var log strings.Builder
	seq := 0
	rec := func(age time.Duration, uid int, exe, op, outcome string) {
		seq++
		body, _ := json.Marshal(map[string]any{"time": time.Now().Add(-age), "caller": map[string]any{"uid": uid, "gid": uid, "exe": exe}, "op": op, "outcome": outcome})
		fmt.Fprintf(&log, `{"seq":%d,"prev":"","kind":"record","body":%s,"hash":""}`+"\n", seq, body)
	}
	for i := range 40 {
		outcome := "ok"
		if i < 2 {
			outcome = "denied"
		}
		rec(time.Hour, 1000, "/usr/bin/shop", "KeyService.CreateKey", outcome)
	}
	for i := range 25 {
		outcome := "ok"
		if i < 15 {
			outcome = "error"
		}
		rec(time.Hour, 1001, "/usr/bin/batch", "EnvelopeService.Decrypt", outcome)
	}
	for range 5 {
		rec(90*24*time.Hour, 1002, "/usr/bin/old", "KeyService.GetKey", "denied") // before the window
	}
	rec(time.Hour, 0, "/usr/sbin/keywardd", "keywardd.RotateKey", "error") // keywardd's own
	fmt.Fprintf(&log, `{"seq":%d,"prev":"","kind":"checkpoint","body":{"key":"keyward-audit v1","mac":"00"},"hash":""}`+"\n", seq+1)
	path := filepath.Join(t.TempDir(), "audit.log")
	os.WriteFile(path, []byte(log.String()), 0o600)

	r := ok(t, keyward(t, cfg.Socket.Path, "", "review", "-format", "json", "-audit", path, "-window", "720h"))
	var fs []finding
	if err := json.Unmarshal([]byte(r.stdout), &fs); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, f := range fs {
		if f.Check == "denied calls by caller" || f.Check == "error-rate outlier" {
			got[f.Check+" "+f.Subject] = f.Detail
		}
	}
	if d := got["denied calls by caller uid 1000 /usr/bin/shop"]; !strings.Contains(d, "2 of 40 calls denied") || !strings.Contains(d, "KeyService.CreateKey 2") {
		t.Errorf("denied calls: %v", got)
	}
	if d := got["error-rate outlier uid 1001 /usr/bin/batch"]; !strings.Contains(d, "15 of 25 calls failed") {
		t.Errorf("outlier: %v", got)
	}
	if len(got) != 2 {
		t.Errorf("findings from the audit log: %v; want the two above only", got)
	}
	os.WriteFile(path, []byte("not json\n"), 0o600)
	if r := keyward(t, cfg.Socket.Path, "", "review", "-audit", path); r.code == exitOK || !strings.Contains(r.stderr, "line 1") {
		t.Errorf("a broken audit log: %+v", r)
	}
}
