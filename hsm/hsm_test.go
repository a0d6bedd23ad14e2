package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// openToken makes a fresh SoftHSM2 token and opens it.
func openToken(t *testing.T, tune ...func(*Config)) (*HSM, *softhsmtest.Token) {
	t.Helper()
	tok := softhsmtest.New(t)
	h, err := Open(tokenConfig(tok, tune...))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h, tok
}

func tokenConfig(tok *softhsmtest.Token, tune ...func(*Config)) Config {
	cfg := Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile}
	for _, f := range tune {
		f(&cfg)
	}
	return cfg
}

func mustCreate(t *testing.T, h *HSM, id KeyID, alg Algorithm) {
	t.Helper()
	if err := h.CreateKey(context.Background(), id, alg); err != nil {
		t.Fatalf("CreateKey(%v, %v): %v", id, alg, err)
	}
}

// raw runs fn on a session of h, outside the checks of the public API:
// for tests that plant objects keyward itself would never make.
func raw(t *testing.T, h *HSM, fn func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error) {
	t.Helper()
	if err := h.do(context.Background(), "test", "", func(s pkcs11.SessionHandle) error { return fn(h.mod.ctx, s) }); err != nil {
		t.Fatal(err)
	}
}

// reload loads keyward's keys from the token again, as Open and every
// reconnect do, for tests that plant objects under keyward's labels after
// keyward loaded them. Unlike a reconnect it keeps the sessions, so that a
// session object planted in one of them is still there to be seen.
func reload(t *testing.T, h *HSM) {
	t.Helper()
	raw(t, h, func(_ *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		keys, err := h.loadKeys(s)
		if err == nil {
			h.keysMu.Lock()
			h.keys = keys
			h.keysMu.Unlock()
		}
		return err
	})
}

// stale has keyward look the secret key id up by label at its next use, as
// after its cached handle failed.
func stale(h *HSM, id KeyID) {
	h.keysMu.Lock()
	h.keys[keyRef{id.label(), pkcs11.CKO_SECRET_KEY}] = &keyEntry{stale: true}
	h.keysMu.Unlock()
}

func TestEncryptDecrypt(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	kek := KeyID{"kek", 1}
	mustCreate(t, h, kek, AES256GCM)

	for _, tc := range []struct {
		name      string
		plaintext []byte
		aad       []byte
	}{
		{"empty", nil, nil},
		{"data key", bytes.Repeat([]byte{7}, 32), []byte(`{"app":"billing"}`)},
		{"64KiB", bytes.Repeat([]byte("x"), 64<<10), []byte("ctx")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nonce, ct, err := h.Encrypt(ctx, kek, tc.plaintext, tc.aad)
			if err != nil {
				t.Fatal(err)
			}
			if len(nonce) != NonceSize || len(ct) != len(tc.plaintext)+TagSize {
				t.Fatalf("nonce %d bytes, ciphertext %d bytes for %d bytes of plaintext", len(nonce), len(ct), len(tc.plaintext))
			}
			pt, err := h.Decrypt(ctx, kek, nonce, ct, tc.aad)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pt, tc.plaintext) {
				t.Fatal("decrypt did not return the plaintext")
			}
			// Every change is caught.
			flip := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 1; return c }
			for name, try := range map[string]func() ([]byte, error){
				"ciphertext": func() ([]byte, error) { return h.Decrypt(ctx, kek, nonce, flip(ct, 0), tc.aad) },
				"tag":        func() ([]byte, error) { return h.Decrypt(ctx, kek, nonce, flip(ct, len(ct)-1), tc.aad) },
				"nonce":      func() ([]byte, error) { return h.Decrypt(ctx, kek, flip(nonce, 3), ct, tc.aad) },
				"aad":        func() ([]byte, error) { return h.Decrypt(ctx, kek, nonce, ct, append(bytes.Clone(tc.aad), 'x')) },
				"short":      func() ([]byte, error) { return h.Decrypt(ctx, kek, nonce, ct[:TagSize-1], tc.aad) },
				"nonce size": func() ([]byte, error) { return h.Decrypt(ctx, kek, nonce[:8], ct, tc.aad) },
			} {
				if pt, err := try(); !errors.Is(err, ErrDecrypt) || pt != nil {
					t.Errorf("tampered %s: got %q, %v; want ErrDecrypt", name, pt, err)
				}
			}
		})
	}

	// Nonces are fresh: the same input never gives the same ciphertext.
	n1, c1, _ := h.Encrypt(ctx, kek, []byte("same"), nil)
	n2, c2, _ := h.Encrypt(ctx, kek, []byte("same"), nil)
	if bytes.Equal(n1, n2) || bytes.Equal(c1, c2) {
		t.Fatal("two encryptions repeated a nonce or a ciphertext")
	}
	// A version is its own key.
	mustCreate(t, h, KeyID{"kek", 2}, AES256GCM)
	if _, err := h.Decrypt(ctx, KeyID{"kek", 2}, n1, c1, nil); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("v1 ciphertext under v2: %v, want ErrDecrypt", err)
	}
}

func TestSigners(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	msg := []byte("keyward signs this")
	for _, tc := range []struct {
		alg  Algorithm
		hash crypto.Hash
	}{
		{ECDSAP256, crypto.SHA256},
		{ECDSAP384, crypto.SHA384},
		{Ed25519, 0},
	} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			id := KeyID{"sign-" + tc.alg.String(), 1}
			mustCreate(t, h, id, tc.alg)
			sg, err := h.Signer(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if sg.Algorithm() != tc.alg {
				t.Fatalf("Algorithm() = %v", sg.Algorithm())
			}
			var s crypto.Signer = sg
			switch pub := s.Public().(type) {
			case *ecdsa.PublicKey:
				var digest []byte
				if tc.hash == crypto.SHA256 {
					d := sha256.Sum256(msg)
					digest = d[:]
				} else {
					d := sha512.Sum384(msg)
					digest = d[:]
				}
				sig, err := s.Sign(nil, digest, tc.hash)
				if err != nil {
					t.Fatal(err)
				}
				if !ecdsa.VerifyASN1(pub, digest, sig) {
					t.Fatal("crypto/ecdsa does not verify the token's signature")
				}
				digest[0] ^= 1
				if ecdsa.VerifyASN1(pub, digest, sig) {
					t.Fatal("signature verifies for another digest")
				}
				if _, err := s.Sign(nil, digest[:20], tc.hash); !errors.Is(err, ErrInvalidInput) {
					t.Fatalf("short digest: %v, want ErrInvalidInput", err)
				}
			case ed25519.PublicKey:
				sig, err := s.Sign(nil, msg, crypto.Hash(0))
				if err != nil {
					t.Fatal(err)
				}
				if !ed25519.Verify(pub, msg, sig) {
					t.Fatal("crypto/ed25519 does not verify the token's signature")
				}
				if ed25519.Verify(pub, append(msg, '!'), sig) {
					t.Fatal("signature verifies for another message")
				}
				if _, err := s.Sign(nil, msg, crypto.SHA512); !errors.Is(err, ErrInvalidInput) {
					t.Fatalf("Ed25519ph: %v, want ErrInvalidInput", err)
				}
			default:
				t.Fatalf("public key is %T", pub)
			}
			pub, err := h.PublicKey(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(sg.Public()) {
				t.Fatal("PublicKey and Signer.Public differ")
			}
		})
	}
	// Two keys are two keys.
	a, _ := h.PublicKey(ctx, KeyID{"sign-ed25519", 1})
	mustCreate(t, h, KeyID{"sign-ed25519", 2}, Ed25519)
	b, _ := h.PublicKey(ctx, KeyID{"sign-ed25519", 2})
	if bytes.Equal(a.(ed25519.PublicKey), b.(ed25519.PublicKey)) {
		t.Fatal("two Ed25519 keys share a public key")
	}
}

func TestHMACAndRandom(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	k1, k2 := KeyID{"pepper", 1}, KeyID{"pepper", 2}
	mustCreate(t, h, k1, HMACSHA256)
	mustCreate(t, h, k2, HMACSHA256)
	m1, err := h.HMACSHA256(ctx, k1, []byte("kw_secret"))
	if err != nil {
		t.Fatal(err)
	}
	again, _ := h.HMACSHA256(ctx, k1, []byte("kw_secret"))
	other, _ := h.HMACSHA256(ctx, k2, []byte("kw_secret"))
	if len(m1) != 32 || !hmac.Equal(m1, again) || hmac.Equal(m1, other) {
		t.Fatal("HMAC is not deterministic per key, or two keys agree")
	}

	r1, err := h.Random(ctx, 32)
	if err != nil {
		t.Fatal(err)
	}
	r2, _ := h.Random(ctx, 32)
	if len(r1) != 32 || bytes.Equal(r1, r2) {
		t.Fatal("Random repeated itself or returned the wrong length")
	}
	for _, n := range []int{0, -1, MaxRandom + 1} {
		if _, err := h.Random(ctx, n); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("Random(%d): %v, want ErrInvalidInput", n, err)
		}
	}
}

// TestCrossCheckGoCrypto imports known keys (as keyward itself never does)
// and checks the token's AES-GCM and HMAC against Go's implementations: the
// nonce, AAD and tag handling are the standard ones.
func TestCrossCheckGoCrypto(t *testing.T) {
	h, _ := openToken(t)
	key := bytes.Repeat([]byte{0x42}, 32)
	var aesKey, macKey pkcs11.ObjectHandle
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		var err error
		aesKey, err = p.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, key),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keyward/imported/v1"),
		})
		if err != nil {
			return err
		}
		macKey, err = p.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, key),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		})
		return err
	})
	nonce := []byte("twelve bytes")
	aad := []byte("context")
	plaintext := []byte("a data key of thirty-two bytes!!")
	var ct, mac []byte
	raw(t, h, func(_ *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		var err error
		if ct, err = h.sealGCM(s, aesKey, nonce, plaintext, aad); err != nil {
			return err
		}
		mac, err = h.hmac(s, macKey, HMACSHA256, plaintext)
		return err
	})
	block, _ := aes.NewCipher(key)
	gcm, _ := cipher.NewGCM(block)
	got, err := gcm.Open(nil, nonce, ct, aad)
	if err != nil || !bytes.Equal(got, plaintext) {
		t.Fatalf("crypto/cipher cannot open the token's AES-GCM ciphertext: %v", err)
	}
	if want := gcm.Seal(nil, nonce, plaintext, aad); !bytes.Equal(want, ct) {
		t.Fatal("token and crypto/cipher disagree on AES-GCM")
	}
	m := hmac.New(sha256.New, key)
	m.Write(plaintext)
	if !hmac.Equal(m.Sum(nil), mac) {
		t.Fatal("token and crypto/hmac disagree on HMAC-SHA256")
	}

	// The imported key is refused by keyward's own API: it was not made
	// inside the token, so it may exist elsewhere.
	reload(t, h)
	_, _, err = h.Encrypt(context.Background(), KeyID{"imported", 1}, plaintext, nil)
	if !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), "CKA_ALWAYS_SENSITIVE is false") {
		t.Fatalf("imported key: %v, want ErrWeakKey naming CKA_ALWAYS_SENSITIVE", err)
	}
}

func TestKeyErrors(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	mustCreate(t, h, KeyID{"kek", 1}, AES256GCM)
	mustCreate(t, h, KeyID{"mac", 1}, HMACSHA256)
	mustCreate(t, h, KeyID{"sig", 1}, ECDSAP256)

	for _, tc := range []struct {
		name string
		err  error
		want error
		msg  string
	}{
		{"create existing", h.CreateKey(ctx, KeyID{"kek", 1}, AES256GCM), ErrKeyExists, `create key "kek" v1: key already exists`},
		{"create existing other alg", h.CreateKey(ctx, KeyID{"sig", 1}, HMACSHA256), ErrKeyExists, "never reused"},
		{"bad name", h.CreateKey(ctx, KeyID{"../etc", 1}, AES256GCM), ErrInvalidInput, "not allowed"},
		{"long name", h.CreateKey(ctx, KeyID{strings.Repeat("a", 65), 1}, AES256GCM), ErrInvalidInput, "1 to 64"},
		{"version 0", h.CreateKey(ctx, KeyID{"kek", 0}, AES256GCM), ErrInvalidInput, "start at 1"},
		{"bad algorithm", h.CreateKey(ctx, KeyID{"x", 1}, Algorithm(99)), ErrMechanismUnsupported, "unknown algorithm"},
		{"missing key", second(h.Decrypt(ctx, KeyID{"nope", 1}, make([]byte, 12), make([]byte, 16), nil)), ErrKeyNotFound, `decrypt "nope" v1: key not found`},
		{"missing version", third(h.Encrypt(ctx, KeyID{"kek", 9}, nil, nil)), ErrKeyNotFound, "key not found"},
		{"encrypt with hmac key", third(h.Encrypt(ctx, KeyID{"mac", 1}, nil, nil)), ErrWrongAlgorithm, "the key is hmac-sha256; encrypt needs aes256-gcm"},
		{"hmac with aes key", second(h.HMACSHA256(ctx, KeyID{"kek", 1}, nil)), ErrWrongAlgorithm, "hmac needs hmac-sha256"},
		{"sign with aes key", second(h.Signer(ctx, KeyID{"kek", 1})), ErrKeyNotFound, "key not found"},
		{"destroy missing", h.DestroyKey(ctx, KeyID{"nope", 1}), ErrKeyNotFound, "key not found"},
	} {
		if !errors.Is(tc.err, tc.want) || !strings.Contains(tc.err.Error(), tc.msg) {
			t.Errorf("%s: got %v; want %v containing %q", tc.name, tc.err, tc.want, tc.msg)
		}
	}

	// Destroy removes both halves; the name's version stays unusable.
	if err := h.DestroyKey(ctx, KeyID{"sig", 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Signer(ctx, KeyID{"sig", 1}); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("signer after destroy: %v", err)
	}
	raw(t, h, func(_ *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := h.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keyward/sig/v1")}, 5)
		if len(objs) != 0 {
			t.Errorf("%d objects left after destroy", len(objs))
		}
		return err
	})
}

func second[T any](_ T, err error) error        { return err }
func third[A, B any](_ A, _ B, err error) error { return err }

// TestDuplicateLabels plants a second object under a key's label, as
// another PKCS#11 client could: keyward refuses to guess which is meant.
func TestDuplicateLabels(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	id := KeyID{"twin", 1}
	mustCreate(t, h, id, AES256GCM)
	if _, _, err := h.Encrypt(ctx, id, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		tmpl := append([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.label()),
		}, append(protection(), usageTemplate(pkcs11.CKO_SECRET_KEY, pkcs11.CKA_ENCRYPT)...)...)
		_, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		return err
	})
	reconnect(t, h)
	if _, _, err := h.Encrypt(ctx, id, []byte("x"), nil); !errors.Is(err, ErrAmbiguous) {
		t.Fatalf("encrypt with two objects under one label: %v, want ErrAmbiguous", err)
	}
	if err := h.CreateKey(ctx, id, AES256GCM); !errors.Is(err, ErrKeyExists) {
		t.Fatalf("create over a duplicate: %v, want ErrKeyExists", err)
	}
}

// TestWeakKeysRefused plants keys with weaker templates under keyward
// labels; each is refused before first use, with the reason.
func TestWeakKeysRefused(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	aes := func(extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
		return append([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		}, extra...)
	}
	for _, tc := range []struct {
		name string
		tmpl []*pkcs11.Attribute
		want string
	}{
		{"extractable", aes(
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false)),
			"CKA_EXTRACTABLE is true"},
		{"not sensitive", aes(
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false)),
			"CKA_SENSITIVE is false"},
		{"also wraps (crypto11's default AES key)", aes(
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, true), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true)),
			"CKA_WRAP is true, CKA_UNWRAP is true"},
		{"modifiable (could gain a purpose later)", aes(
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, false), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false), pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false)),
			"CKA_MODIFIABLE is true; keyward"},
		{"session object", []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false)},
			"CKA_TOKEN is false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := KeyID{"weak-" + strings.Fields(tc.name)[0], 1}
			raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
				tmpl := append(tc.tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.label()))
				_, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
				return err
			})
			reload(t, h)
			_, _, err := h.Encrypt(ctx, id, []byte("x"), nil)
			if !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v; want ErrWeakKey saying %q", err, tc.want)
			}
		})
	}
}

// TestKeyAttributesOnToken reads the keys back as another program sees
// them: the key value cannot be read, the keys are not extractable, and an
// encryption key cannot wrap.
func TestKeyAttributesOnToken(t *testing.T) {
	h, tok := openToken(t)
	for _, a := range []Algorithm{AES256GCM, HMACSHA256, ECDSAP256, ECDSAP384, Ed25519} {
		mustCreate(t, h, KeyID{a.String(), 1}, a)
	}

	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		kek, err := h.key(s, KeyID{"aes256-gcm", 1}, pkcs11.CKO_SECRET_KEY)
		if err != nil {
			return err
		}
		for _, label := range []string{"keyward/aes256-gcm/v1", "keyward/hmac-sha256/v1"} {
			objs, _ := h.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}, 2)
			_, err := p.GetAttributeValue(s, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
			if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
				t.Errorf("reading CKA_VALUE of %s: %v, want CKR_ATTRIBUTE_SENSITIVE", label, err)
			}
		}
		sig, err := h.key(s, KeyID{"ecdsa-p256", 1}, pkcs11.CKO_PRIVATE_KEY)
		if err != nil {
			return err
		}
		_, err = p.GetAttributeValue(s, sig.handle, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
			t.Errorf("reading CKA_VALUE of the ECDSA private key: %v, want CKR_ATTRIBUTE_SENSITIVE", err)
		}
		// The KEK cannot wrap another key out, not even itself.
		_, err = p.WrapKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)}, kek.handle, kek.handle)
		if err == nil {
			t.Error("an encryption key wrapped a key")
		}
		// Nor can its attributes be changed to allow it.
		err = p.SetAttributeValue(s, kek.handle, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_WRAP, true)})
		if err == nil {
			t.Error("CKA_WRAP could be switched on")
		}
		_, err = p.CopyObject(s, kek.handle, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)})
		if err == nil {
			t.Error("the key could be copied")
		}
		return nil
	})

	// An independent client: OpenSC's pkcs11-tool lists the objects.
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Fatal("pkcs11-tool not found: install the Debian package opensc")
	}
	cmd := exec.Command(tool, "--module", tok.Module, "--token-label", tok.Label, "--login", "--pin", "env:KEYWARD_TEST_PIN", "--list-objects")
	cmd.Env = append(os.Environ(), "KEYWARD_TEST_PIN="+tok.PIN)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool: %v\n%s", err, out)
	}
	objects := map[string]string{} // "label|kind" -> the object's lines
	var kind string
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasSuffix(line, "Object; AES length 32"), strings.Contains(line, "Secret Key Object"):
			kind = "secret"
		case strings.HasPrefix(line, "Private Key Object"):
			kind = "private"
		case strings.HasPrefix(line, "Public Key Object"):
			kind = "public"
		case strings.Contains(line, "label:"):
			kind += "|" + strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
		case strings.Contains(line, "Usage:") || strings.Contains(line, "Access:"):
			objects[kind] += strings.TrimSpace(line) + "\n"
		}
	}
	for _, tc := range []struct{ obj, usage string }{
		{"secret|keyward/aes256-gcm/v1", "Usage:      encrypt, decrypt\n"},
		// pkcs11-tool lists only encrypt, decrypt, wrap and unwrap for
		// secret keys; CKA_SIGN of the HMAC key is checked by checkKey.
		{"secret|keyward/hmac-sha256/v1", "Usage:      none\n"},
		{"private|keyward/ecdsa-p256/v1", "Usage:      sign\n"},
		{"private|keyward/ecdsa-p384/v1", "Usage:      sign\n"},
		{"private|keyward/ed25519/v1", "Usage:      sign\n"},
	} {
		got, ok := objects[tc.obj]
		if !ok {
			t.Errorf("pkcs11-tool does not list %s; it printed:\n%s", tc.obj, out)
			continue
		}
		if !strings.Contains(got, tc.usage) {
			t.Errorf("%s: pkcs11-tool says %q, want %q", tc.obj, got, tc.usage)
		}
		for _, want := range []string{"sensitive", "always sensitive", "never extractable", "local"} {
			if !strings.Contains(got, want) {
				t.Errorf("%s: pkcs11-tool access %q lacks %q", tc.obj, got, want)
			}
		}
		if strings.Contains(got, " extractable") && !strings.Contains(got, "never extractable") {
			t.Errorf("%s is extractable: %q", tc.obj, got)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	tok := softhsmtest.New(t)
	dir := t.TempDir()
	notLib := filepath.Join(dir, "not-a-library.so")
	os.WriteFile(notLib, []byte("hello"), 0o644)
	worldPIN := filepath.Join(dir, "world.pin")
	os.WriteFile(worldPIN, []byte(tok.PIN), 0o644)
	emptyPIN := filepath.Join(dir, "empty.pin")
	os.WriteFile(emptyPIN, nil, 0o600)
	wrongPIN := filepath.Join(dir, "wrong.pin")
	os.WriteFile(wrongPIN, []byte("wrong-"+tok.PIN+"\n"), 0o600)
	t.Setenv("KEYWARD_TEST_PIN", tok.PIN)
	// A systemd credentials directory: systemd makes the files 0400.
	creds := filepath.Join(dir, "credentials")
	os.Mkdir(creds, 0o700)
	os.WriteFile(filepath.Join(creds, "keyward-pin"), []byte(tok.PIN), 0o400)
	os.WriteFile(filepath.Join(creds, "world-pin"), []byte(tok.PIN), 0o444)
	os.WriteFile(filepath.Join(creds, "wrong-pin"), []byte("wrong-"+tok.PIN), 0o400)
	credential := func(name string) func(*Config) {
		return func(c *Config) { c.PINFile, c.PINCredential = "", name }
	}

	for _, tc := range []struct {
		name  string
		cfg   func(*Config)
		want  error // the sentinel the error matches
		msg   string
		creds string // $CREDENTIALS_DIRECTORY, if set
	}{
		{"no module", func(c *Config) { c.Module = "" }, ErrConfig, "no PKCS#11 module given", ""},
		{"relative module", func(c *Config) { c.Module = "libsofthsm2.so" }, ErrConfig, "must be absolute", ""},
		{"missing module", func(c *Config) { c.Module = "/nonexistent/libvendor.so" }, ErrConfig, "does not exist: install the HSM vendor's PKCS#11 library", ""},
		{"not a library", func(c *Config) { c.Module = notLib }, ErrConfig, "could not be loaded", ""},
		{"wrong label", func(c *Config) { c.Token = "no-such-token" }, ErrTokenNotFound, `no token matches pkcs11:token=no-such-token`, ""},
		{"no token", func(c *Config) { c.Token = "" }, ErrConfig, "no token selected", ""},
		{"token and URI", func(c *Config) { c.URI = "pkcs11:token=x" }, ErrConfig, "not both", ""},
		{"wrong PIN", func(c *Config) { c.PINFile = wrongPIN }, ErrPINIncorrect, "does not retry a wrong PIN", ""},
		{"missing PIN file", func(c *Config) { c.PINFile = filepath.Join(dir, "nope") }, ErrConfig, "does not exist", ""},
		{"world-readable PIN file", func(c *Config) { c.PINFile = worldPIN }, ErrConfig, "chmod o-rwx", ""},
		{"empty PIN file", func(c *Config) { c.PINFile = emptyPIN }, ErrConfig, "is empty", ""},
		{"PIN file is a directory", func(c *Config) { c.PINFile = dir }, ErrConfig, "is not a regular file", ""},
		{"PIN variable unset", func(c *Config) { c.PINFile, c.PINEnv = "", "KEYWARD_TEST_NO_SUCH_VAR" }, ErrConfig, "is not set", ""},
		{"two PIN sources", func(c *Config) { c.PINEnv = "KEYWARD_TEST_PIN" }, ErrConfig, "exactly one way", ""},
		{"PIN file and credential", func(c *Config) { c.PINCredential = "keyward-pin" }, ErrConfig, "exactly one way", creds},
		{"credential without systemd", credential("keyward-pin"), ErrConfig, "$CREDENTIALS_DIRECTORY is not set: start keywardd from its systemd unit with LoadCredential=keyward-pin:", ""},
		{"credential relative directory", credential("keyward-pin"), ErrConfig, "is not an absolute path", "credentials"},
		{"credential not loaded", credential("other-pin"), ErrConfig, "PIN credential other-pin (" + creds + "/other-pin) does not exist: the unit must load it, with LoadCredential=other-pin:PATH", creds},
		{"credential name with a slash", credential("../world.pin"), ErrConfig, `PIN credential name "../world.pin": a file name`, creds},
		{"credential readable by others", credential("world-pin"), ErrConfig, "accessible to other users (mode 0444)", creds},
		{"wrong PIN in a credential", credential("wrong-pin"), ErrPINIncorrect, "does not retry a wrong PIN", creds},
		{"PIN in URI", func(c *Config) { c.Token, c.URI = "", "pkcs11:token="+tok.Label+"?pin-value=1234" }, ErrConfig, "must not carry pin-value", ""},
		{"sessions", func(c *Config) { c.Sessions = -1 }, ErrConfig, "out of range", ""},
		{"pin-source on another host", func(c *Config) {
			c.Token, c.PINFile, c.URI = "", "", "pkcs11:token="+tok.Label+"?pin-source=file://host/pin"
		}, ErrConfig, "must be an absolute file path", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CREDENTIALS_DIRECTORY", tc.creds) // restored after the subtest
			if tc.creds == "" {
				os.Unsetenv("CREDENTIALS_DIRECTORY")
			}
			h, err := Open(tokenConfig(tok, tc.cfg))
			if err == nil {
				h.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
			if tc.want != ErrConfig && errors.Is(err, ErrConfig) {
				t.Errorf("%v matches ErrConfig: the token answered, so the configuration was usable", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("got %q, want it to say %q", err, tc.msg)
			}
			if strings.Contains(err.Error(), tok.PIN) || strings.Contains(err.Error(), tok.SOPIN) {
				t.Errorf("the error shows a PIN: %q", err)
			}
		})
	}

	// The good ways in: by label with the PIN in a variable or a systemd
	// credential, by URI with serial and pin-source.
	t.Setenv("CREDENTIALS_DIRECTORY", creds)
	for _, cfg := range []Config{
		{Module: tok.Module, Token: tok.Label, PINEnv: "KEYWARD_TEST_PIN"},
		{Module: tok.Module, Token: tok.Label, PINCredential: "keyward-pin"},
		{Module: tok.Module, URI: "pkcs11:token=" + tok.Label + "?pin-source=file://" + tok.PINFile},
		{URI: (&URI{Token: tok.Label, Serial: tok.Serial, ModulePath: tok.Module, PINSource: "file:" + tok.PINFile}).String()},
	} {
		h, err := Open(cfg)
		if err != nil {
			t.Fatalf("Open(%+v): %v", cfg, err)
		}
		for _, format := range []string{"%v", "%+v", "%#v"} {
			if s := fmt.Sprintf(format, h); strings.Contains(s, tok.PIN) {
				h.Close()
				t.Fatalf("%s of the HSM shows the PIN", format)
			}
		}
		if got := h.Token(); got.Label != tok.Label || got.Serial != tok.Serial || got.Manufacturer != "SoftHSM project" {
			t.Errorf("Token() = %+v", got)
		}
		h.Close()
	}
}

// TestAmbiguousToken: two tokens with one label are refused until the
// serial picks one.
func TestAmbiguousToken(t *testing.T) {
	tok := softhsmtest.New(t)
	twin, err := softhsmtest.Prepare(tok.Dir, tok.Label, tok.SOPIN, tok.PIN)
	if err != nil {
		t.Fatal(err)
	}
	if err := twin.Init(); err != nil {
		t.Fatal(err)
	}
	_, err = Open(tokenConfig(tok))
	if !errors.Is(err, ErrAmbiguous) || !strings.Contains(err.Error(), "2 tokens match") || !strings.Contains(err.Error(), "serial=") {
		t.Fatalf("two tokens with one label: %v, want ErrAmbiguous asking for serial=", err)
	}
	h, err := Open(tokenConfig(tok, func(c *Config) { c.Token, c.URI = "", "pkcs11:token="+tok.Label+";serial="+tok.Serial }))
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
}

func TestPoolBusyAndClose(t *testing.T) {
	h, _ := openToken(t, func(c *Config) { c.Sessions = 1; c.SessionWait = 50e6 })
	ctx := context.Background()
	s, _, err := h.acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = h.Random(ctx, 8)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "all 1 sessions stayed busy for 50ms") {
		t.Fatalf("with the only session taken: %v, want ErrBusy", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := h.Random(cctx, 8); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v", err)
	}
	h.release(s, nil)
	if _, err := h.Random(ctx, 8); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Random(ctx, 8); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v, want ErrClosed", err)
	}
	if err := h.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
}
