package hsm

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/miekg/pkcs11"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// lookups are the PKCS#11 calls that finding or checking a key makes.
var lookups = []string{"C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal", "C_GetAttributeValue"}

// TestFirstUseNeedsNoSearch: keyward reads every key on the token when it
// connects, so the first use of a key after a start or a reconnect, or
// after keyward made it, searches nothing and reads no attribute, like
// every later use and like a use of a key that is not there. A search
// reads every object on the token (milliseconds with the 150 other keys
// here): a first use that searched would tell anyone timing refused
// Decrypt calls which versions exist.
func TestFirstUseNeedsNoSearch(t *testing.T) {
	tok := softhsmtest.New(t)
	f := softhsmtest.NewFaults(t, tok)
	cfg := tokenConfig(tok, func(c *Config) { c.Module = f.Module })
	h, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	decoy := KeyID{"decoy", 1}
	mustCreate(t, h, decoy, AES256GCM)
	for v := uint32(1); v <= 4; v++ {
		mustCreate(t, h, KeyID{"tenant", v}, AES256GCM)
	}
	for i := range 150 {
		mustCreate(t, h, KeyID{fmt.Sprint("other-", i), 1}, AES256GCM)
	}
	h.Close()
	// As after a restart.
	if h, err = Open(cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ctx := context.Background()

	// probe decrypts a ciphertext that does not open under id and returns
	// the lookup calls it made.
	probe := func(id KeyID) (map[string]uint64, error) {
		t.Helper()
		before := f.Counts()
		_, err := h.Decrypt(ctx, id, make([]byte, NonceSize), make([]byte, 32), nil)
		after := f.Counts()
		made := map[string]uint64{}
		for _, name := range lookups {
			if n := after[name].Calls - before[name].Calls; n > 0 {
				made[name] = n
			}
		}
		return made, err
	}
	firstUse := func(when string, id KeyID) {
		t.Helper()
		for _, p := range []struct {
			what string
			id   KeyID
			want error
		}{
			{"a key that is not there", KeyID{"tenant", 99}, ErrKeyNotFound},
			{"the key used before", decoy, ErrDecrypt},
			{"the first use", id, ErrDecrypt},
		} {
			made, err := probe(p.id)
			if !errors.Is(err, p.want) {
				t.Fatalf("%s, %s (%v): %v, want %v", when, p.what, p.id, err, p.want)
			}
			if len(made) != 0 {
				t.Errorf("%s, %s (%v) made %v; keyward holds every key and looks none up", when, p.what, p.id, made)
			}
		}
	}
	firstUse("after a restart", KeyID{"tenant", 1})
	firstUse("after a restart", KeyID{"tenant", 2})

	logins := f.Calls("C_Login")
	reconnect(t, h)
	if f.Calls("C_Login") != logins+1 {
		t.Fatal("the reset did not make keyward log in again")
	}
	firstUse("after a reconnect", KeyID{"tenant", 3})
	firstUse("after a reconnect", KeyID{"tenant", 4})

	mustCreate(t, h, KeyID{"tenant", 5}, AES256GCM)
	firstUse("after keyward made it", KeyID{"tenant", 5})
}

// TestStaleHandleLookedUpAgain: when a cached handle fails (someone with
// the PIN destroyed the key behind keyward's back, or replaced it), keyward
// looks the key up by label once more: a replacement is checked and used,
// a key that is gone is not found, and nothing else is looked up again.
func TestStaleHandleLookedUpAgain(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	kek, other := KeyID{"kek", 1}, KeyID{"other", 1}
	mustCreate(t, h, kek, AES256GCM)
	mustCreate(t, h, other, AES256GCM)
	destroy := func(id KeyID) {
		t.Helper()
		raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
			objs, err := h.findObjects(s, ours(id.label()), 2)
			if err == nil && len(objs) != 1 {
				err = fmt.Errorf("%d objects under %s", len(objs), id.label())
			}
			if err != nil {
				return err
			}
			return p.DestroyObject(s, objs[0])
		})
	}
	cached := func(id KeyID) *keyEntry {
		h.keysMu.RLock()
		defer h.keysMu.RUnlock()
		return h.keys[keyRef{id.label(), pkcs11.CKO_SECRET_KEY}]
	}
	before := cached(other)

	destroy(kek)
	raw(t, h, func(_ *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, err := h.generate(s, specs[AES256GCM], kek.label())
		return err
	})
	nonce, ct, err := h.Encrypt(ctx, kek, []byte("x"), nil)
	if err != nil {
		t.Fatalf("encrypt under a replaced key: %v", err)
	}
	if _, err := h.Decrypt(ctx, kek, nonce, ct, nil); err != nil {
		t.Fatalf("decrypt under the replaced key: %v", err)
	}

	destroy(kek)
	if _, _, err := h.Encrypt(ctx, kek, []byte("x"), nil); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("encrypt under a destroyed key: %v, want ErrKeyNotFound", err)
	}
	if e := cached(kek); e != nil {
		t.Fatalf("a destroyed key stays cached: %+v", e)
	}
	if cached(other) != before {
		t.Fatal("another key was looked up again")
	}
}
