package tokens

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	kw "github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

// TestRotationUnderLoad: signing keys rotate while tokens are minted and
// verified at once (on a clock that runs through many rotations); no token
// fails verification before it expires. Run with -race.
func TestRotationUnderLoad(t *testing.T) {
	h, _ := hsmtest.Open(t)
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var mu sync.Mutex
	clock := t0
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	const maxTTL = 10 * time.Minute
	km, _ := kw.New(st, h, kw.Options{Now: now, SignPrePublish: 2 * time.Minute, SignKeepPublished: maxTTL + MaxLeeway})
	ctx := context.Background()
	if _, err := km.Create(ctx, kw.Spec{Name: "jwt", Purpose: kw.Sign}); err != nil {
		t.Fatal(err)
	}
	var tkMu sync.Mutex
	cache := map[hsm.KeyID]*Key{}
	key := func(id hsm.KeyID) *Key {
		tkMu.Lock()
		defer tkMu.Unlock()
		if k := cache[id]; k != nil {
			return k
		}
		s, err := h.Signer(ctx, id)
		if err != nil {
			t.Error(err)
			return nil
		}
		k, _ := NewKey(s, id)
		cache[id] = k
		return k
	}
	type minted struct {
		token    string
		iat, exp time.Time
	}
	var mintedMu sync.Mutex
	var all []minted
	var wg sync.WaitGroup
	stop := make(chan struct{})
	// The clock runs 30 s per step; a rotation every 3 minutes.
	wg.Go(func() {
		for i := range 200 {
			mu.Lock()
			clock = clock.Add(30 * time.Second)
			mu.Unlock()
			if i%6 == 0 {
				if _, err := km.Rotate(ctx, "jwt"); err != nil {
					t.Error(err)
				}
			}
			time.Sleep(time.Millisecond)
		}
		close(stop)
	})
	for range 3 {
		wg.Go(func() { // minters
			for {
				select {
				case <-stop:
					return
				default:
				}
				at := now()
				k, err := km.Get("jwt")
				if err != nil {
					t.Error(err)
					return
				}
				v, ok := k.Signing(at)
				if !ok {
					t.Error("no version signs at", at)
					return
				}
				ttl := time.Duration(1+rand.IntN(10)) * time.Minute
				m, err := Mint(ctx, key(hsm.KeyID{Name: "jwt", Version: v.Number}), Spec{Issuer: "keyward", Subject: "s", Audience: []string{"a"}, TTL: ttl}, at)
				if err != nil {
					t.Error(err)
					return
				}
				mintedMu.Lock()
				all = append(all, minted{m.Token, at, m.Expires})
				mintedMu.Unlock()
			}
		})
	}
	for range 2 {
		wg.Go(func() { // verifiers: every token minted so far that has not expired must verify now
			for {
				select {
				case <-stop:
					return
				default:
				}
				at := now()
				k, _ := km.Get("jwt")
				v := &Verifier{Keys: map[string]*Key{}, Issuer: "keyward"}
				for _, pv := range k.Published(at) {
					tk := key(hsm.KeyID{Name: "jwt", Version: pv.Number})
					v.Keys[tk.KID] = tk
				}
				mintedMu.Lock()
				sample := append([]minted(nil), all...)
				mintedMu.Unlock()
				for _, m := range sample {
					if !at.Before(m.exp) || at.Before(m.iat) { // expired, or minted on a later clock than this check's
						continue
					}
					if _, err := v.Verify(m.token, "a", at); err != nil {
						t.Errorf("a token valid until %s fails at %s: %v", m.exp.Format(time.TimeOnly), at.Format(time.TimeOnly), err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	k, _ := km.Get("jwt")
	if len(all) < 50 || k.Latest() < 30 {
		t.Fatalf("%d tokens over %d versions: the test did not exercise rotation", len(all), k.Latest())
	}
}
