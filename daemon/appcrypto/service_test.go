package appcrypto

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

// clock is a settable clock for the signing timeline.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// setup is a Service over a fresh SoftHSM2 token and store, with the keys
// named by specs, on a clock the test moves.
func setup(t testing.TB, specs ...keys.Spec) (*Service, *keys.Manager, *clock) {
	t.Helper()
	h, _ := hsmtest.Open(t)
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	km, err := keys.New(st, h, keys.Options{Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		if _, err := km.Create(context.Background(), s); err != nil {
			t.Fatal(err)
		}
	}
	return New(km, h, c.now), km, c
}

// TestSigningTimeline: Sign uses the version active now, not a pre-published
// one; Verify accepts a version while it is published, and not once it is
// removed or withdrawn below the minimum version.
func TestSigningTimeline(t *testing.T) {
	s, km, c := setup(t, keys.Spec{Name: "s", Purpose: keys.Sign, Algorithm: hsm.ECDSAP256, Labels: raw})
	ctx := context.Background()
	msg := Input{Data: []byte("hello")}
	sig1, err := s.Sign(ctx, "s", msg)
	if err != nil || sig1.Key.Version != 1 {
		t.Fatalf("Sign = %+v, %v", sig1, err)
	}
	if _, err := km.Rotate(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if sig, err := s.Sign(ctx, "s", msg); err != nil || sig.Key.Version != 1 {
		t.Fatalf("Sign while v2 is pre-published = %+v, %v; want v1", sig, err)
	}
	if pk, err := s.PublicKey(ctx, "s", 0); err != nil || pk.Key.Version != 2 {
		t.Fatalf("PublicKey(0) = %+v, %v; want v2, published ahead", pk, err)
	}
	c.add(11 * time.Minute)
	sig2, err := s.Sign(ctx, "s", msg)
	if err != nil || sig2.Key.Version != 2 {
		t.Fatalf("Sign once v2 is active = %+v, %v", sig2, err)
	}
	verify := func(v uint32, sig []byte) (bool, uint32, error) {
		t.Helper()
		return s.Verify(ctx, "s", v, msg, sig)
	}
	if ok, v, err := verify(0, sig1.Signature); !ok || v != 1 || err != nil {
		t.Fatalf("v1's signature while v1 is retired: %v v%d %v", ok, v, err)
	}
	if ok, v, err := verify(0, sig2.Signature); !ok || v != 2 || err != nil {
		t.Fatalf("v2's signature: %v v%d %v", ok, v, err)
	}
	c.add(2 * time.Hour)
	if ok, _, err := verify(0, sig1.Signature); ok || err != nil {
		t.Fatalf("v1's signature once v1 is removed: %v %v; want not valid", ok, err)
	}
	if _, _, err := verify(1, sig1.Signature); !errors.Is(err, keys.ErrVersion) {
		t.Fatalf("Verify under removed v1: %v; want ErrVersion", err)
	}
	if _, err := s.PublicKey(ctx, "s", 1); !errors.Is(err, keys.ErrVersion) {
		t.Fatalf("PublicKey(1) once removed: %v; want ErrVersion", err)
	}
	if _, err := km.SetEnabled("s", false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(ctx, "s", msg); !errors.Is(err, keys.ErrDisabled) {
		t.Fatalf("Sign with a disabled key: %v; want ErrDisabled", err)
	}
}

// TestMACVersions: each HMAC algorithm gives MACs of its size that verify
// under their version, and a version below the minimum no longer verifies.
func TestMACVersions(t *testing.T) {
	for _, tc := range []struct {
		alg  hsm.Algorithm
		size int
	}{{hsm.HMACSHA256, 32}, {hsm.HMACSHA384, 48}} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			s, km, _ := setup(t, keys.Spec{Name: "m", Purpose: keys.MAC, Algorithm: tc.alg})
			ctx := context.Background()
			msg := []byte("hello")
			m, err := s.GenerateMAC(ctx, "m", msg)
			if err != nil || m.Key.Version != 1 || m.Algorithm != tc.alg || len(m.MAC) != tc.size {
				t.Fatalf("GenerateMAC = %d bytes, %v %v, %v", len(m.MAC), m.Key, m.Algorithm, err)
			}
			if _, err := km.Rotate(ctx, "m"); err != nil {
				t.Fatal(err)
			}
			if ok, _, err := s.VerifyMAC(ctx, "m", 1, msg, m.MAC); !ok || err != nil {
				t.Fatalf("VerifyMAC under v1 = %v, %v", ok, err)
			}
			if ok, _, err := s.VerifyMAC(ctx, "m", 0, msg, m.MAC); ok || err != nil {
				t.Fatalf("VerifyMAC of v1's MAC under the newest, v2 = %v, %v; want not valid", ok, err)
			}
			if _, err := km.SetMinDecryptionVersion("m", 2); err != nil {
				t.Fatal(err)
			}
			if _, _, err := s.VerifyMAC(ctx, "m", 1, msg, m.MAC); !errors.Is(err, keys.ErrVersion) {
				t.Fatalf("VerifyMAC under v1 below the minimum: %v; want ErrVersion", err)
			}
		})
	}
}

// TestInputs: the sizes and forms Sign refuses before the HSM signs.
func TestInputs(t *testing.T) {
	s, _, _ := setup(t, keys.Spec{Name: "p384", Purpose: keys.Sign, Algorithm: hsm.ECDSAP384, Labels: raw},
		keys.Spec{Name: "ed", Purpose: keys.Sign, Algorithm: hsm.Ed25519, Labels: raw}, keys.Spec{Name: "e", Purpose: keys.Encrypt})
	ctx := context.Background()
	for _, tc := range []struct {
		name, key string
		in        Input
		want      error
	}{
		{"a SHA-256 digest for P-384", "p384", Input{Data: make([]byte, 32), IsDigest: true}, ErrInvalid},
		{"a SHA-384 digest for P-384", "p384", Input{Data: make([]byte, 48), IsDigest: true}, nil},
		{"a digest for Ed25519", "ed", Input{Data: make([]byte, 32), IsDigest: true}, ErrInvalid},
		{"an empty message", "ed", Input{}, ErrInvalid},
		{"64 KiB", "ed", Input{Data: make([]byte, MaxMessage)}, nil},
		{"over 64 KiB", "ed", Input{Data: make([]byte, MaxMessage+1)}, ErrTooLarge},
		{"an encryption key", "e", Input{Data: []byte("x")}, keys.ErrWrongPurpose},
		{"an unknown key", "nope", Input{Data: []byte("x")}, keys.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Sign(ctx, tc.key, tc.in)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("Sign: %v; want %v", err, tc.want)
			}
		})
	}
}

// BenchmarkCrypto measures each call on a SoftHSM2 token: Sign and Verify
// for each signing algorithm (from a 1 KiB message), GenerateMAC.
func BenchmarkCrypto(b *testing.B) {
	s, km, _ := setup(b)
	ctx := context.Background()
	msg := Input{Data: make([]byte, 1024)}
	for _, alg := range []hsm.Algorithm{hsm.ECDSAP256, hsm.ECDSAP384, hsm.Ed25519} {
		if _, err := km.Create(ctx, keys.Spec{Name: alg.String(), Purpose: keys.Sign, Algorithm: alg, Labels: raw}); err != nil {
			b.Fatal(err)
		}
		sig, err := s.Sign(ctx, alg.String(), msg)
		if err != nil {
			b.Fatal(err)
		}
		b.Run("sign-"+alg.String(), func(b *testing.B) {
			for b.Loop() {
				if _, err := s.Sign(ctx, alg.String(), msg); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("verify-"+alg.String(), func(b *testing.B) {
			for b.Loop() {
				if ok, _, err := s.Verify(ctx, alg.String(), 0, msg, sig.Signature); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
	if _, err := km.Create(ctx, keys.Spec{Name: "mac", Purpose: keys.MAC}); err != nil {
		b.Fatal(err)
	}
	b.Run("mac-hmac-sha256", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.GenerateMAC(ctx, "mac", msg.Data); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// raw is the label of a signing key made for CryptoService.Sign.
var raw = map[string]string{keys.UseLabel: keys.UseRaw}

// TestKeySeparationAndCache: a signing key that may sign tokens does not
// sign raw bytes (its signature of a JWS payload would be a token); a key
// deleted and made again under its name is not served from the signers
// kept of the old one; a signature has one form (low S).
func TestKeySeparationAndCache(t *testing.T) {
	ctx := context.Background()
	s, km, c := setup(t, keys.Spec{Name: "tok", Purpose: keys.Sign, Algorithm: hsm.ECDSAP256},
		keys.Spec{Name: "s", Purpose: keys.Sign, Algorithm: hsm.ECDSAP256, Labels: raw})
	if _, err := s.Sign(ctx, "tok", Input{Data: []byte("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJyb290In0")}); !errors.Is(err, keys.ErrWrongPurpose) {
		t.Errorf("Sign with a key that may sign tokens: %v; want ErrWrongPurpose", err)
	}

	msg := Input{Data: []byte("release 1.0")}
	for range 20 { // low S every time (an HSM's s is high half the time)
		sig, err := s.Sign(ctx, "s", msg)
		if err != nil {
			t.Fatal(err)
		}
		sg, err := s.signer(ctx, mustKey(t, km, "s"), sig.Key)
		if err != nil {
			t.Fatal(err)
		}
		if !isLowS(sg.Public().(*ecdsa.PublicKey), sig.Signature) {
			t.Fatal("a signature with a high S")
		}
	}

	// The old key's public key and signatures, then the key deleted and
	// made again under its name.
	old, err := s.PublicKey(ctx, "s", 0)
	if err != nil {
		t.Fatal(err)
	}
	oldSig, err := s.Sign(ctx, "s", msg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := km.ScheduleDeletion("s", keys.MinDeletionWait); err != nil {
		t.Fatal(err)
	}
	c.add(keys.MinDeletionWait + time.Hour)
	if done, err := km.DeleteDue(ctx, "s"); err != nil || !done {
		t.Fatalf("DeleteDue: %v, %v", done, err)
	}
	c.add(time.Second)
	if _, err := km.Create(ctx, keys.Spec{Name: "s", Purpose: keys.Sign, Algorithm: hsm.ECDSAP256, Labels: raw}); err != nil {
		t.Fatal(err)
	}
	now, err := s.PublicKey(ctx, "s", 0)
	if err != nil {
		t.Fatal(err)
	}
	if now.PEM == old.PEM {
		t.Errorf("the key made again answers with the deleted key's public key")
	}
	if ok, _, err := s.Verify(ctx, "s", 0, msg, oldSig.Signature); err != nil || ok {
		t.Errorf("the deleted key's signature verifies under the new key: %v, %v", ok, err)
	}
	sig, err := s.Sign(ctx, "s", msg)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := s.Verify(ctx, "s", 0, msg, sig.Signature); err != nil || !ok {
		t.Errorf("the new key's own signature does not verify: %v, %v", ok, err)
	}
}

func mustKey(t *testing.T, km *keys.Manager, name string) *keys.Key {
	t.Helper()
	k, err := km.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestMACPanic: after a panic rotation of a MAC key, a MAC made with a
// compromised version no longer verifies.
func TestMACPanic(t *testing.T) {
	ctx := context.Background()
	s, km, _ := setup(t, keys.Spec{Name: "hooks", Purpose: keys.MAC})
	m, err := s.GenerateMAC(ctx, "hooks", []byte("payload"))
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := s.VerifyMAC(ctx, "hooks", m.Key.Version, []byte("payload"), m.MAC); err != nil || !ok {
		t.Fatalf("before: %v, %v", ok, err)
	}
	p, err := km.PanicRotate(ctx, "hooks", false)
	if err != nil || !p.Withdrawn {
		t.Fatalf("panic-rotate: %+v, %v; want the versions withdrawn", p, err)
	}
	if ok, _, err := s.VerifyMAC(ctx, "hooks", m.Key.Version, []byte("payload"), m.MAC); err == nil && ok {
		t.Errorf("a MAC of the compromised version verifies after the panic rotation")
	}
}
