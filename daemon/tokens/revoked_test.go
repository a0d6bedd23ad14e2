package tokens

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

// TestRevokedSurvivesRestart: revocations are in the store before Revoke
// returns, come back after a restart until their token expires, and are
// swept after.
func TestRevokedSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyward.db")
	s, err := store.Open(path, storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	r, err := LoadRevoked(s, func() time.Time { return t0 })
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Revoke("soon", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := r.Revoke("later", t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := r.Revoke("", t0); err == nil {
		t.Fatal("an empty jti was revoked")
	}
	if !r.Is("soon") || !r.Is("later") || r.Is("other") {
		t.Fatal("Is disagrees with Revoke")
	}
	s.Close()

	s, _ = store.Open(path, storetest.Options())
	// Within the leeway after its exp a verifier may still accept the
	// token, so the revocation must still be there, after a restart too.
	// A clock run ahead by less than ClockMargin and set back: the
	// revocation is kept.
	now := t0.Add(time.Minute + MaxLeeway + ClockMargin - time.Second)
	r, err = LoadRevoked(s, func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	if !r.Is("soon") || !r.Is("later") {
		t.Fatal("a revocation was forgotten within the leeway and margin after its token's exp")
	}
	if n, _ := r.Sweep(); n != 0 || !r.Is("soon") {
		t.Fatal("Sweep forgot a revocation within the leeway and margin")
	}
	s.Close()
	s, _ = store.Open(path, storetest.Options())
	defer s.Close()
	now = t0.Add(2*time.Minute + ClockMargin + time.Second) // "soon" is past exp + leeway + margin
	r, err = LoadRevoked(s, func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	if !r.Is("later") {
		t.Fatal("after a restart: a live revocation lost")
	}
	r.Revoke("soon2", t0.Add(3*time.Minute))
	now = t0.Add(5*time.Minute + ClockMargin)
	if n, err := r.Sweep(); err != nil || n != 2 || r.Is("soon2") || r.Is("soon") {
		t.Fatalf("Sweep = %d, %v", n, err)
	}
	n := 0
	s.ForEach(store.BucketRevokedTokens, "", func(string, []byte) error { n++; return nil })
	if n != 1 { // "later": "soon" and "soon2" went at the sweep
		t.Fatalf("%d records in the store, want 1", n)
	}
}
