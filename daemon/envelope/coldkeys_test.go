package envelope

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// coldKeys is a token with 150 other keys beside the decoy and four
// versions of tenant-a, and a store that names them; probes[v-1] is a
// ciphertext under tenant-a version v whose tag fails, unknown one naming
// version 99, which does not exist.
type coldKeys struct {
	cfg     hsm.Config
	st      *store.Store
	faults  *softhsmtest.Faults // counts the HSM calls, if asked for
	probes  [][]byte
	unknown []byte
}

const coldVersions = 4

func newColdKeys(tb testing.TB, counted bool) *coldKeys {
	tb.Helper()
	ctx := context.Background()
	tok := softhsmtest.New(tb)
	c := &coldKeys{cfg: hsm.Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile}}
	if counted {
		c.faults = softhsmtest.NewFaults(tb, tok)
		c.cfg.Module = c.faults.Module
	}
	h, err := hsm.Open(c.cfg)
	if err != nil {
		tb.Fatal(err)
	}
	defer h.Close()
	if c.st, err = store.Open(filepath.Join(tb.TempDir(), "keyward.db"), storetest.Options()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.st.Close() })
	km, err := keys.New(c.st, h, keys.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	for _, s := range []keys.Spec{{Name: "decoy", Purpose: keys.Encrypt}, {Name: "tenant-a", Purpose: keys.Encrypt}} {
		if _, err := km.Create(ctx, s); err != nil {
			tb.Fatal(err)
		}
	}
	for i := range 150 {
		if err := h.CreateKey(ctx, hsm.KeyID{Name: fmt.Sprint("other-", i), Version: 1}, hsm.AES256GCM); err != nil {
			tb.Fatal(err)
		}
	}
	s := New(km, h, Options{})
	for v := 1; v <= coldVersions; v++ {
		if v > 1 {
			if _, err := km.Rotate(ctx, "tenant-a"); err != nil {
				tb.Fatal(err)
			}
		}
		ct, err := s.Encrypt(ctx, "tenant-a", []byte("a data key"), appCtx)
		if err != nil {
			tb.Fatal(err)
		}
		ct[len(ct)-1] ^= 1
		c.probes = append(c.probes, ct)
	}
	c.unknown = withVersion(c.probes[0], 99)
	return c
}

// withVersion is ct with the key version in its header replaced.
func withVersion(ct []byte, v uint32) []byte {
	out := append([]byte{}, ct...)
	binary.BigEndian.PutUint32(out[5+int(ct[4]):], v)
	return out
}

// start opens the HSM as keywardd does at start, and the service on it,
// with the decoy.
func (c *coldKeys) start(tb testing.TB) (*Service, *hsm.HSM) {
	tb.Helper()
	h, err := hsm.Open(c.cfg)
	if err != nil {
		tb.Fatal(err)
	}
	km, err := keys.New(c.st, h, keys.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	return New(km, h, Options{Decoy: hsm.KeyID{Name: "decoy", Version: 1}}), h
}

// TestNoOracleFromColdKeys: a ciphertext that names a version that exists
// but was not used since keywardd started, or since the HSM reconnected,
// is refused with the same HSM work as one naming a version that does not
// exist (the decoy decryption): no search of the token. Such a search reads
// every object (milliseconds with 150 other keys), so one probe would tell
// a caller that the version exists. Searches are counted, not timed;
// BenchmarkDecryptNotOpened shows the times.
func TestNoOracleFromColdKeys(t *testing.T) {
	c := newColdKeys(t, true)
	s, h := c.start(t)
	defer func() { h.Close() }()
	ctx := context.Background()
	searches := func(ct []byte) uint64 {
		t.Helper()
		before := c.faults.Counts()["C_FindObjects"].Calls
		if _, _, err := s.Decrypt(ctx, ct, appCtx); !errors.Is(err, ErrNotOpened) {
			t.Fatalf("a probe: %v, want ErrNotOpened", err)
		}
		return c.faults.Counts()["C_FindObjects"].Calls - before
	}
	probe := func(when string, v int) {
		t.Helper()
		unknown, first, again := searches(c.unknown), searches(c.probes[v-1]), searches(c.probes[v-1])
		if first != unknown || again != unknown {
			t.Errorf("%s: a version that does not exist costs %d searches, v%d costs %d the first time and %d again: one probe tells that it exists",
				when, unknown, v, first, again)
		}
	}
	probe("after a start", 1)
	probe("after a start", 2)

	// The token resets: keyward logs in again and reads its keys anew.
	logins := c.faults.Calls("C_Login")
	if err := h.Health(ctx); err != nil { // a call served, so the reset is met by an immediate reconnect
		t.Fatal(err)
	}
	c.faults.Set("C_GetTokenInfo 0x32 once", "C_GetSessionInfo 0x32 once") // CKR_DEVICE_REMOVED, and the anchor agrees
	if err := h.Health(ctx); err != nil {
		t.Fatalf("health across a reconnect: %v", err)
	}
	c.faults.Set()
	if c.faults.Calls("C_Login") != logins+1 {
		t.Fatal("keyward did not reconnect")
	}
	probe("after a reconnect", 3)
	probe("after a reconnect", 4)
}

// BenchmarkDecryptNotOpened times what a caller probing for versions sees
// after keywardd started (each run opens the HSM afresh and makes one
// refused call, untimed, as keywardd's own traffic warms the decoy): a
// ciphertext naming a version that does not exist (the decoy decryption)
// and one naming a version that exists and was not used since. The rows
// should be alike; a cold handle used to cost a search of the token.
func BenchmarkDecryptNotOpened(b *testing.B) {
	c := newColdKeys(b, false)
	ctx := context.Background()
	for _, p := range []struct {
		name string
		ct   []byte
	}{{"version=unknown", c.unknown}, {"version=exists-unused", c.probes[0]}} {
		b.Run(p.name, func(b *testing.B) {
			// Each sample opens the HSM afresh (tens of milliseconds,
			// untimed), so a fixed number of them is taken, whatever b.N
			// is: -benchtime 1s would ask for thousands.
			var took time.Duration
			const samples = 200
			for range samples {
				s, h := c.start(b)
				if _, _, err := s.Decrypt(ctx, withVersion(c.unknown, 98), appCtx); !errors.Is(err, ErrNotOpened) {
					b.Fatal(err)
				}
				t0 := time.Now()
				if _, _, err := s.Decrypt(ctx, p.ct, appCtx); !errors.Is(err, ErrNotOpened) {
					b.Fatal(err)
				}
				took += time.Since(t0)
				h.Close()
			}
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(float64(took.Microseconds())/samples, "µs/refusal")
		})
	}
}
