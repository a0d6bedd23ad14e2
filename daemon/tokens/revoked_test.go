package tokens

import (
	"encoding/binary"
	"fmt"
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
	if err := r.Revoke("soon", t0.Add(time.Minute), "jwt"); err != nil {
		t.Fatal(err)
	}
	if err := r.Revoke("later", t0.Add(time.Hour), "jwt"); err != nil {
		t.Fatal(err)
	}
	if err := r.Revoke("", t0, "jwt"); err == nil {
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
	r.Revoke("soon2", t0.Add(3*time.Minute), "jwt")
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

// TestSweepInBatches: a sweep of more revocations than one transaction of
// the store's contract holds forgets them all, on a backend that refuses a
// larger transaction (as etcd's may).
func TestSweepInBatches(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n := store.MaxTxKeys + 7
	jtis := make([]string, n)
	for i := range jtis {
		jtis[i] = fmt.Sprintf("jti-%06d", i)
	}
	expired := binary.BigEndian.AppendUint64(nil, uint64(t0.Add(-48*time.Hour).Unix()))
	// Written at once (bbolt takes it), to sweep through the strict backend.
	if err := s.UpdateEach(store.BucketRevokedTokens, jtis, func(string, []byte) ([]byte, error) { return expired, nil }); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRevoked(storetest.Strict(s), func() time.Time { return t0 })
	if err != nil {
		t.Fatal(err)
	}
	if got, err := r.Sweep(); err != nil || got != n {
		t.Fatalf("Sweep: %d, %v; want %d forgotten", got, err, n)
	}
	left := 0
	s.ForEach(store.BucketRevokedTokens, "", func(string, []byte) error { left++; return nil })
	if left != 0 || r.Is(jtis[n-1]) {
		t.Fatalf("%d revocations left in the store after the sweep", left)
	}
}
