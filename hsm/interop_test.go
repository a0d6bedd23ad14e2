package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"testing"

	"github.com/ThalesGroup/crypto11"

	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// TestInteropCrypto11 checks keyward's keys with an independent PKCS#11
// client, crypto11: it finds them by label, reads the same public key,
// makes signatures keyward's public key verifies, and opens and makes
// AES-GCM ciphertexts keyward opens: the two agree on CKA_EC_POINT and on
// CK_GCM_PARAMS.
func TestInteropCrypto11(t *testing.T) {
	tok := softhsmtest.New(t)
	cfg := hsm.Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile}
	ctx := context.Background()
	sigID, kekID := hsm.KeyID{Name: "sig", Version: 1}, hsm.KeyID{Name: "kek", Version: 1}
	aad := []byte("context")

	h, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for id, alg := range map[hsm.KeyID]hsm.Algorithm{sigID: hsm.ECDSAP256, kekID: hsm.AES256GCM} {
		if err := h.CreateKey(ctx, id, alg); err != nil {
			t.Fatal(err)
		}
	}
	pub, err := h.PublicKey(ctx, sigID)
	if err != nil {
		t.Fatal(err)
	}
	nonce, ct, err := h.Encrypt(ctx, kekID, []byte("from keyward"), aad)
	if err != nil {
		t.Fatal(err)
	}
	h.Close() // crypto11 refuses a library someone else initialized

	c11, err := crypto11.Configure(&crypto11.Config{Path: tok.Module, TokenLabel: tok.Label, Pin: tok.PIN, MaxSessions: 4, GCMIVLength: hsm.NonceSize})
	if err != nil {
		t.Fatal(err)
	}
	signer, err := c11.FindKeyPair(nil, []byte("keyward/sig/v1"))
	if err != nil || signer == nil {
		t.Fatalf("crypto11 does not find the signing key: %v", err)
	}
	if !signer.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("crypto11 reads another public key than keyward")
	}
	digest := sha256.Sum256([]byte("signed by crypto11"))
	sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("keyward's public key does not verify crypto11's signature")
	}
	kek, err := c11.FindKey(nil, []byte("keyward/kek/v1"))
	if err != nil || kek == nil {
		t.Fatalf("crypto11 does not find the KEK: %v", err)
	}
	aead, err := kek.NewGCM()
	if err != nil {
		t.Fatal(err)
	}
	pt, err := aead.Open(nil, nonce, ct, aad)
	if err != nil || string(pt) != "from keyward" {
		t.Fatalf("crypto11 cannot open keyward's ciphertext: %q, %v", pt, err)
	}
	nonce2 := bytes.Repeat([]byte{9}, hsm.NonceSize)
	ct2 := aead.Seal(nil, nonce2, []byte("from crypto11"), aad)
	c11.Close()

	h, err = hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	pt, err = h.Decrypt(ctx, kekID, nonce2, ct2, aad)
	if err != nil || string(pt) != "from crypto11" {
		t.Fatalf("keyward cannot open crypto11's ciphertext: %q, %v", pt, err)
	}
}
