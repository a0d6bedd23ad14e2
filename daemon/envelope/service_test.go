package envelope

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

func setup(t testing.TB) (*Service, *keys.Manager) {
	return setupWith(t, Options{}, nil)
}

// setupWith is setup with options and, if wrap is set, the sealer it
// makes of the HSM. The keys are kek, other, sig, and decoy, which no
// ciphertext names.
func setupWith(t testing.TB, o Options, wrap func(Sealer) Sealer) (*Service, *keys.Manager) {
	t.Helper()
	h, _ := hsmtest.Open(t)
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	km, err := keys.New(st, h, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, s := range []keys.Spec{{Name: "kek", Purpose: keys.Encrypt}, {Name: "other", Purpose: keys.Encrypt}, {Name: "sig", Purpose: keys.Sign}, {Name: "decoy", Purpose: keys.Encrypt}} {
		if _, err := km.Create(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	var sl Sealer = h
	if wrap != nil {
		sl = wrap(h)
	}
	return New(km, sl, o), km
}

var appCtx = map[string]string{"app": "billing", "tenant": "42"}

func TestDataKeys(t *testing.T) {
	s, _ := setup(t)
	ctx := context.Background()
	dk, wrapped, err := s.GenerateDataKey(ctx, "kek", 0, appCtx)
	if err != nil {
		t.Fatal(err)
	}
	if len(dk) != 32 || bytes.Contains(wrapped, dk) {
		t.Fatalf("data key of %d bytes, or in clear inside the wrapped one", len(dk))
	}
	h, err := s.Header(wrapped)
	if err != nil || h != (Header{"kek", 1}) {
		t.Fatalf("Header = %+v, %v", h, err)
	}
	got, h, err := s.Decrypt(ctx, wrapped, map[string]string{"tenant": "42", "app": "billing"})
	if err != nil || !bytes.Equal(got, dk) || h.KeyName != "kek" {
		t.Fatalf("Decrypt = %x, %+v, %v", got, h, err)
	}
	dk2, _, _ := s.GenerateDataKey(ctx, "kek", 16, nil)
	if len(dk2) != 16 || bytes.Equal(dk2, dk[:16]) {
		t.Fatal("a 16-byte data key repeats or has the wrong size")
	}
	if _, _, err := s.GenerateDataKey(ctx, "kek", 20, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("size 20: %v", err)
	}
	if _, _, err := s.GenerateDataKey(ctx, "sig", 0, nil); !errors.Is(err, keys.ErrWrongPurpose) {
		t.Fatalf("signing key: %v", err)
	}
	if _, _, err := s.GenerateDataKey(ctx, "nope", 0, nil); !errors.Is(err, keys.ErrNotFound) {
		t.Fatalf("missing key: %v", err)
	}
}

// TestContextAndTampering: a wrong, partial, extra or missing context fails
// with the same error as a changed ciphertext; so does every flipped byte,
// each with an error, never a plaintext.
func TestContextAndTampering(t *testing.T) {
	s, _ := setup(t)
	ctx := context.Background()
	ct, err := s.Encrypt(ctx, "kek", []byte("the secret"), appCtx)
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]map[string]string{
		"missing": nil,
		"partial": {"app": "billing"},
		"extra":   {"app": "billing", "tenant": "42", "x": "y"},
		"changed": {"app": "billing", "tenant": "43"},
		"renamed": {"app": "billing", "tenanT": "42"},
	} {
		if _, _, err := s.Decrypt(ctx, ct, c); !errors.Is(err, ErrDecrypt) || !errors.Is(err, ErrNotOpened) {
			t.Errorf("%s context: %v, want ErrDecrypt", name, err)
		}
	}
	for i := range ct {
		for _, bit := range []byte{0x01, 0x80} {
			bad := bytes.Clone(ct)
			bad[i] ^= bit
			pt, _, err := s.Decrypt(ctx, bad, appCtx)
			if err == nil || pt != nil {
				t.Fatalf("byte %d flipped (%#x): decrypted to %q", i, bit, pt)
			}
		}
	}
	// Past the header, a flipped byte is indistinguishable from a wrong context.
	bad := bytes.Clone(ct)
	bad[len(bad)-20] ^= 1
	if _, _, err := s.Decrypt(ctx, bad, appCtx); !errors.Is(err, ErrDecrypt) || err.Error() != ErrDecrypt.Error() {
		t.Fatalf("flipped sealed byte: %v", err)
	}
	// Moving a ciphertext to another key name of the same length fails.
	moved := bytes.Replace(bytes.Clone(ct), []byte("kek"), []byte("kez"), 1)
	if _, _, err := s.Decrypt(ctx, moved, appCtx); err == nil {
		t.Fatal("a ciphertext opened under another key name")
	}
	big := make([]byte, MaxPlaintext+1)
	if _, err := s.Encrypt(ctx, "kek", big, nil); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversize: %v", err)
	}
	if _, err := s.Encrypt(ctx, "kek", big[:MaxPlaintext], nil); err != nil {
		t.Fatalf("64 KiB: %v", err)
	}
	if _, err := s.Encrypt(ctx, "kek", nil, map[string]string{"": "x"}); !errors.Is(err, ErrContext) {
		t.Fatalf("bad context: %v", err)
	}
}

// TestRotation: old ciphertexts decrypt until the minimum decryption version
// passes them; ReEncrypt moves them to the newest version or another key.
func TestRotation(t *testing.T) {
	s, km := setup(t)
	ctx := context.Background()
	old, _ := s.Encrypt(ctx, "kek", []byte("v1 data"), appCtx)
	km.Rotate(ctx, "kek")
	fresh, _ := s.Encrypt(ctx, "kek", []byte("v2 data"), appCtx)
	if h, _ := s.Header(fresh); h.KeyVersion != 2 {
		t.Fatalf("after rotation encrypting with v%d", h.KeyVersion)
	}
	re, from, err := s.ReEncrypt(ctx, old, appCtx, "", nil)
	if err != nil || from.KeyVersion != 1 {
		t.Fatalf("ReEncrypt = %+v, %v", from, err)
	}
	if h, _ := s.Header(re); h.KeyVersion != 2 {
		t.Fatalf("re-encrypted under v%d", h.KeyVersion)
	}
	km.SetMinDecryptionVersion("kek", 2)
	if _, _, err := s.Decrypt(ctx, old, appCtx); !errors.Is(err, keys.ErrVersion) {
		t.Fatalf("v1 below the minimum: %v", err)
	}
	if pt, _, err := s.Decrypt(ctx, re, appCtx); err != nil || string(pt) != "v1 data" {
		t.Fatalf("the re-encrypted copy: %q, %v", pt, err)
	}
	moved, _, err := s.ReEncrypt(ctx, fresh, appCtx, "other", map[string]string{"app": "x"})
	if err != nil {
		t.Fatal(err)
	}
	if pt, h, err := s.Decrypt(ctx, moved, map[string]string{"app": "x"}); err != nil || string(pt) != "v2 data" || h.KeyName != "other" {
		t.Fatalf("moved to another key: %q %+v %v", pt, h, err)
	}
	km.SetEnabled("kek", false)
	if _, _, err := s.Decrypt(ctx, re, appCtx); !errors.Is(err, keys.ErrDisabled) {
		t.Fatalf("disabled key: %v", err)
	}
}

// TestConcurrentRotate: encryptions, decryptions, rotations and minimum
// changes at once; every ciphertext decrypts exactly when its version is
// allowed. Run with -race.
func TestConcurrentRotate(t *testing.T) {
	s, km := setup(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for w := range 4 {
		wg.Go(func() {
			for i := range 30 {
				if w == 0 && i%10 == 9 {
					if _, err := km.Rotate(ctx, "kek"); err != nil {
						errs <- err
					}
					k, _ := km.Get("kek")
					if _, err := km.SetMinDecryptionVersion("kek", k.Latest()-1); err != nil {
						errs <- err
					}
					continue
				}
				msg := []byte(strings.Repeat("m", i))
				ct, err := s.Encrypt(ctx, "kek", msg, appCtx)
				if err != nil {
					errs <- err
					continue
				}
				h, _ := s.Header(ct)
				pt, _, err := s.Decrypt(ctx, ct, appCtx)
				k, _ := km.Get("kek")
				allowed := h.KeyVersion >= k.MinDecryptionVersion
				switch {
				case err == nil && !bytes.Equal(pt, msg):
					errs <- errors.New("wrong plaintext")
				case err != nil && !errors.Is(err, keys.ErrVersion):
					errs <- err
				case err != nil && allowed:
					// The minimum only rises here, so a version refused
					// before stays below it.
					errs <- fmt.Errorf("v%d refused though the minimum is %d", h.KeyVersion, k.MinDecryptionVersion)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// countingSealer is the HSM, counting the decryptions under each key
// version.
type countingSealer struct {
	Sealer
	mu  sync.Mutex
	got map[hsm.KeyID]int
}

func (c *countingSealer) Decrypt(ctx context.Context, id hsm.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	c.mu.Lock()
	c.got[id]++
	c.mu.Unlock()
	return c.Sealer.Decrypt(ctx, id, nonce, ciphertext, aad)
}

// TestNotOpened: every failure to open a ciphertext matches ErrNotOpened
// and keeps its own reason; a bad context and a failure to seal again do
// not. A ciphertext naming a key or version that cannot decrypt costs the
// HSM one decryption under the decoy key, as a failed tag check costs one
// under the key named.
func TestNotOpened(t *testing.T) {
	decoy := hsm.KeyID{Name: "decoy", Version: 1}
	cs := &countingSealer{got: map[hsm.KeyID]int{}}
	s, km := setupWith(t, Options{Decoy: decoy}, func(h Sealer) Sealer { cs.Sealer = h; return cs })
	ctx := context.Background()
	ct, err := s.Encrypt(ctx, "kek", []byte("the secret"), appCtx)
	if err != nil {
		t.Fatal(err)
	}
	km.Rotate(ctx, "other")
	km.SetMinDecryptionVersion("other", 2)
	rename := func(name string, v uint32) []byte {
		c, err := Parse(ct)
		if err != nil {
			t.Fatal(err)
		}
		c.Header = Header{KeyName: name, KeyVersion: v}
		b, err := c.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tampered := bytes.Clone(ct)
	tampered[len(tampered)-1] ^= 1
	for _, tc := range []struct {
		name   string
		ct     []byte
		reason error
		hsmKey hsm.KeyID // the key the HSM decrypts under
	}{
		{"malformed", ct[:10], ErrFormat, hsm.KeyID{}},
		{"tampered", tampered, ErrDecrypt, hsm.KeyID{Name: "kek", Version: 1}},
		{"unknown key", rename("nope", 1), keys.ErrNotFound, decoy},
		{"unknown version", rename("kek", 9), keys.ErrVersion, decoy},
		{"below the minimum", rename("other", 1), keys.ErrVersion, decoy},
		{"signing key", rename("sig", 1), keys.ErrWrongPurpose, decoy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clear(cs.got)
			_, _, err := s.Decrypt(ctx, tc.ct, appCtx)
			if !errors.Is(err, ErrNotOpened) || !errors.Is(err, tc.reason) || strings.HasPrefix(err.Error(), ErrNotOpened.Error()) {
				t.Fatalf("Decrypt: %v; want ErrNotOpened with the reason %v, and the reason's message", err, tc.reason)
			}
			if _, _, err := s.ReEncrypt(ctx, tc.ct, appCtx, "", nil); !errors.Is(err, ErrNotOpened) || !errors.Is(err, tc.reason) {
				t.Fatalf("ReEncrypt: %v", err)
			}
			want := map[hsm.KeyID]int{}
			if tc.hsmKey != (hsm.KeyID{}) {
				want[tc.hsmKey] = 2
			}
			if fmt.Sprint(cs.got) != fmt.Sprint(want) {
				t.Fatalf("HSM decryptions %v; want %v", cs.got, want)
			}
		})
	}
	if _, err := s.Header(ct[:3]); !errors.Is(err, ErrNotOpened) || !errors.Is(err, ErrFormat) {
		t.Fatalf("Header of a malformed ciphertext: %v", err)
	}
	// The caller's context is refused first, whatever the ciphertext.
	for _, c := range [][]byte{ct, rename("nope", 1), ct[:2]} {
		if _, _, err := s.Decrypt(ctx, c, map[string]string{"": "x"}); !errors.Is(err, ErrContext) || errors.Is(err, ErrNotOpened) {
			t.Fatalf("a bad context: %v", err)
		}
	}
	// Sealing again is not opening.
	if _, _, err := s.ReEncrypt(ctx, ct, appCtx, "nope", nil); !errors.Is(err, keys.ErrNotFound) || errors.Is(err, ErrNotOpened) {
		t.Fatalf("ReEncrypt to a missing key: %v", err)
	}
	// Without a decoy, nothing else is decrypted.
	plain := New(km, cs, Options{})
	clear(cs.got)
	if _, _, err := plain.Decrypt(ctx, rename("nope", 1), appCtx); !errors.Is(err, keys.ErrNotFound) || len(cs.got) != 0 {
		t.Fatalf("without a decoy: %v, HSM decryptions %v", err, cs.got)
	}
}

// BenchmarkDecryptRefused measures a ciphertext that does not open, by
// reason, with and without the decoy: without it, a ciphertext naming an
// unknown key or version is answered tens of times faster than one whose
// tag fails, which tells a caller which keys exist.
func BenchmarkDecryptRefused(b *testing.B) {
	ctx := context.Background()
	var h Sealer
	s, km := setupWith(b, Options{}, func(s Sealer) Sealer { h = s; return s })
	ct, err := s.Encrypt(ctx, "kek", make([]byte, 32), appCtx)
	if err != nil {
		b.Fatal(err)
	}
	tag := bytes.Clone(ct)
	tag[len(tag)-1] ^= 1
	ver := bytes.Clone(ct)
	ver[5+3+3] = 9 // version 9
	for _, decoy := range []bool{false, true} {
		o := Options{}
		if decoy {
			o.Decoy = hsm.KeyID{Name: "decoy", Version: 1}
		}
		s := New(km, h, o)
		for _, c := range []struct {
			name string
			ct   []byte
		}{{"opens", ct}, {"tag", tag}, {"unknown-key", bytes.Replace(bytes.Clone(ct), []byte("kek"), []byte("kez"), 1)}, {"unknown-version", ver}} {
			b.Run(fmt.Sprintf("decoy=%v/%s", decoy, c.name), func(b *testing.B) {
				for b.Loop() {
					s.Decrypt(ctx, c.ct, appCtx)
				}
			})
		}
	}
}
