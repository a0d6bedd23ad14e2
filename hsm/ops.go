package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/miekg/pkcs11"
)

const (
	// NonceSize is the AES-GCM nonce size keyward uses: 96 bits, made by
	// keyward for every encryption and never by the token.
	NonceSize = 12
	// TagSize is the AES-GCM tag size: 128 bits.
	TagSize = 16
	// MaxRandom is the most bytes one Random call returns.
	MaxRandom = 1 << 16
)

// Encrypt seals plaintext with AES-256-GCM under the key inside the token,
// with aad authenticated alongside. It makes a fresh random 96-bit nonce
// for every call and returns it with the ciphertext (which ends in the
// 16-byte tag). With random nonces a key version should seal at most 2^32
// messages; rotate well before that.
func (h *HSM) Encrypt(ctx context.Context, id KeyID, plaintext, aad []byte) (nonce, ciphertext []byte, err error) {
	nonce = make([]byte, NonceSize)
	rand.Read(nonce) // never fails; crashes the program if the kernel's generator does
	err = h.withKey(ctx, "encrypt", id, pkcs11.CKO_SECRET_KEY, AES256GCM, func(s pkcs11.SessionHandle, k *keyEntry) error {
		var err error
		ciphertext, err = h.sealGCM(s, k.handle, nonce, plaintext, aad)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return nonce, ciphertext, nil
}

// Decrypt opens an AES-256-GCM ciphertext made by Encrypt. Any change to the
// nonce, ciphertext, tag or aad gives ErrDecrypt.
func (h *HSM) Decrypt(ctx context.Context, id KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	if len(nonce) != NonceSize {
		return nil, &Error{Op: "decrypt", Key: id.String(), Err: ErrDecrypt, Detail: fmt.Sprintf("nonce is %d bytes, not %d", len(nonce), NonceSize)}
	}
	if len(ciphertext) < TagSize {
		return nil, &Error{Op: "decrypt", Key: id.String(), Err: ErrDecrypt, Detail: fmt.Sprintf("ciphertext is %d bytes, shorter than the %d-byte tag", len(ciphertext), TagSize)}
	}
	var plaintext []byte
	err := h.withKey(ctx, "decrypt", id, pkcs11.CKO_SECRET_KEY, AES256GCM, func(s pkcs11.SessionHandle, k *keyEntry) error {
		var err error
		plaintext, err = h.openGCM(s, k.handle, nonce, ciphertext, aad)
		return err
	})
	return plaintext, err
}

// HMACSHA256 computes HMAC-SHA256 of msg under the key inside the token.
// Compare MACs with hmac.Equal, never with ==.
func (h *HSM) HMACSHA256(ctx context.Context, id KeyID, msg []byte) ([]byte, error) {
	var mac []byte
	err := h.withKey(ctx, "hmac", id, pkcs11.CKO_SECRET_KEY, HMACSHA256, func(s pkcs11.SessionHandle, k *keyEntry) error {
		var err error
		mac, err = h.hmac(s, k.handle, HMACSHA256, msg)
		return err
	})
	return mac, err
}

// HMAC computes the MAC of msg under an HMAC key inside the token, with the
// key's own hash: HMAC-SHA256 or HMAC-SHA384. It returns the algorithm
// used. Compare MACs with hmac.Equal, never with ==.
func (h *HSM) HMAC(ctx context.Context, id KeyID, msg []byte) ([]byte, Algorithm, error) {
	var mac []byte
	var alg Algorithm
	err := h.withKey(ctx, "hmac", id, pkcs11.CKO_SECRET_KEY, 0, func(s pkcs11.SessionHandle, k *keyEntry) error {
		if _, ok := hmacMechs[k.alg]; !ok {
			return &Error{Err: ErrWrongAlgorithm, Detail: fmt.Sprintf("the key is %v; hmac needs %v or %v", k.alg, HMACSHA256, HMACSHA384)}
		}
		var err error
		alg = k.alg
		mac, err = h.hmac(s, k.handle, k.alg, msg)
		return err
	})
	return mac, alg, err
}

// sealGCM encrypts with AES-GCM under the key object, with keyward's nonce.
func (h *HSM) sealGCM(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, nonce, plaintext, aad []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(nonce, aad, TagSize*8)
	defer params.Free()
	if err := h.mod.ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key); err != nil {
		return nil, err
	}
	out, err := h.mod.ctx.Encrypt(s, plaintext)
	if err != nil {
		return nil, err
	}
	// A token that used another IV than ours, or no tag, would break what
	// the caller relies on; refuse its output.
	if len(out) != len(plaintext)+TagSize || (params.IV() != nil && !bytes.Equal(params.IV(), nonce)) {
		return nil, &Error{Err: ErrToken, Detail: "the token's AES-GCM output does not match the nonce and tag size keyward asked for"}
	}
	return out, nil
}

// openGCM decrypts with AES-GCM under the key object.
func (h *HSM) openGCM(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, nonce, ciphertext, aad []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(nonce, aad, TagSize*8)
	defer params.Free()
	if err := h.mod.ctx.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key); err != nil {
		return nil, err
	}
	pt, err := h.mod.ctx.Decrypt(s, ciphertext)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)) && h.softHSM.Load() {
		// SoftHSM2 reports a failed tag check as CKR_GENERAL_ERROR; on
		// other tokens it stays a token fault, not a forgery. The session
		// is dropped either way, as after any general error.
		return nil, &Error{Err: ErrDecrypt, Code: pkcs11.CKR_GENERAL_ERROR}
	}
	return pt, err
}

// hmacMechs are the mechanisms of the HMAC algorithms, and their MACs' sizes.
var hmacMechs = map[Algorithm]struct {
	mech uint
	size int
}{HMACSHA256: {pkcs11.CKM_SHA256_HMAC, 32}, HMACSHA384: {pkcs11.CKM_SHA384_HMAC, 48}}

// hmac computes the HMAC of alg under the key object.
func (h *HSM) hmac(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, alg Algorithm, msg []byte) ([]byte, error) {
	m := hmacMechs[alg]
	if err := h.mod.ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(m.mech, nil)}, key); err != nil {
		return nil, err
	}
	out, err := h.mod.ctx.Sign(s, msg)
	if err != nil {
		return nil, err
	}
	if len(out) != m.size {
		return nil, &Error{Err: ErrToken, Detail: fmt.Sprintf("the token returned a %d-byte %v, not %d", len(out), alg, m.size)}
	}
	return out, nil
}

// Random returns n bytes from the token's random number generator.
func (h *HSM) Random(ctx context.Context, n int) ([]byte, error) {
	if n < 1 || n > MaxRandom {
		return nil, &Error{Op: "random", Err: ErrInvalidInput, Detail: fmt.Sprintf("asked for %d bytes; ask for 1 to %d", n, MaxRandom)}
	}
	var out []byte
	err := h.do(ctx, "random", "", func(s pkcs11.SessionHandle) error {
		b, err := h.mod.ctx.GenerateRandom(s, n)
		if err != nil {
			return err
		}
		if len(b) != n {
			return &Error{Err: ErrToken, Detail: fmt.Sprintf("the token returned %d random bytes, not %d", len(b), n)}
		}
		out = b
		return nil
	})
	return out, err
}

// PublicKey returns the public half of a signing key: *ecdsa.PublicKey or
// ed25519.PublicKey.
func (h *HSM) PublicKey(ctx context.Context, id KeyID) (crypto.PublicKey, error) {
	s, err := h.Signer(ctx, id)
	if err != nil {
		return nil, err
	}
	return s.Public(), nil
}

// Signer returns the signing key id as a crypto.Signer whose private half
// stays in the token.
func (h *HSM) Signer(ctx context.Context, id KeyID) (*Signer, error) {
	var sg *Signer
	err := h.withKey(ctx, "load signing key", id, pkcs11.CKO_PRIVATE_KEY, 0, func(_ pkcs11.SessionHandle, k *keyEntry) error {
		sg = &Signer{h: h, id: id, alg: k.alg, pub: k.public}
		return nil
	})
	return sg, err
}

// Signer is a signing key in the token. ECDSA signatures are ASN.1 DER, as
// crypto.Signer requires; Ed25519 signatures are the 64 bytes of RFC 8032.
type Signer struct {
	h   *HSM
	id  KeyID
	alg Algorithm
	pub crypto.PublicKey
}

// Public returns the public key: *ecdsa.PublicKey or ed25519.PublicKey.
func (g *Signer) Public() crypto.PublicKey { return g.pub }

// Algorithm says which kind of key this is.
func (g *Signer) Algorithm() Algorithm { return g.alg }

// Sign implements crypto.Signer. rand is ignored: the token makes its own
// randomness.
func (g *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return g.SignContext(context.Background(), digest, opts)
}

// SignContext signs like Sign, waiting for a session no longer than ctx allows.
// For ECDSA, digest is a hash of the size opts names; for Ed25519 it is the
// whole message and opts.HashFunc() must be 0 (pure Ed25519, no context).
func (g *Signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	switch g.alg {
	case ECDSAP256, ECDSAP384:
		if opts == nil || opts.HashFunc() == 0 || len(digest) != opts.HashFunc().Size() {
			return nil, &Error{Op: "sign", Key: g.id.String(), Err: ErrInvalidInput, Detail: "ECDSA signs a digest whose length matches the hash named in opts"}
		}
	case Ed25519:
		if opts != nil && opts.HashFunc() != 0 {
			return nil, &Error{Op: "sign", Key: g.id.String(), Err: ErrInvalidInput, Detail: "Ed25519 signs the whole message; Ed25519ph is not supported"}
		}
		if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
			return nil, &Error{Op: "sign", Key: g.id.String(), Err: ErrInvalidInput, Detail: "Ed25519ctx is not supported"}
		}
	}
	var sig []byte
	err := g.h.withKey(ctx, "sign", g.id, pkcs11.CKO_PRIVATE_KEY, g.alg, func(s pkcs11.SessionHandle, k *keyEntry) error {
		raw, err := g.h.signRaw(s, k.handle, g.alg, digest)
		if err != nil {
			return err
		}
		if g.alg == Ed25519 {
			sig = raw
			return nil
		}
		sig, err = asn1.Marshal(ecdsaRS(raw))
		return err
	})
	return sig, err
}

// sigSizes are the sizes of the token's raw signatures: r‖s for ECDSA.
var sigSizes = map[Algorithm]int{ECDSAP256: 64, ECDSAP384: 96, Ed25519: ed25519.SignatureSize}

// signRaw signs data (a digest for ECDSA, the message for Ed25519) with the
// private key object and checks the size of what the token returns.
func (h *HSM) signRaw(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, alg Algorithm, data []byte) ([]byte, error) {
	mech := uint(pkcs11.CKM_ECDSA)
	if alg == Ed25519 {
		mech = ckmEdDSA
	}
	if err := h.mod.ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, key); err != nil {
		return nil, err
	}
	raw, err := h.mod.ctx.Sign(s, data)
	if err != nil {
		return nil, err
	}
	if len(raw) != sigSizes[alg] {
		return nil, &Error{Err: ErrToken, Detail: fmt.Sprintf("the token returned a %d-byte %v signature, not %d", len(raw), alg, sigSizes[alg])}
	}
	return raw, nil
}

// ecdsaRS splits the token's r‖s; asn1.Marshal of it is the DER form
// crypto.Signer returns.
func ecdsaRS(raw []byte) struct{ R, S *big.Int } {
	n := len(raw) / 2
	return struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:])}
}

// provePair signs a random challenge with a pair's private half and checks
// it with the public half, so that keyward never publishes a public key that
// is not its private key's.
func (h *HSM) provePair(s pkcs11.SessionHandle, e *keyEntry) error {
	challenge := make([]byte, sigSizes[e.alg]/2)
	rand.Read(challenge)
	raw, err := h.signRaw(s, e.handle, e.alg, challenge)
	if err != nil {
		return err
	}
	ok := false
	switch pub := e.public.(type) {
	case *ecdsa.PublicKey:
		rs := ecdsaRS(raw)
		ok = ecdsa.Verify(pub, challenge, rs.R, rs.S)
	case ed25519.PublicKey:
		ok = ed25519.Verify(pub, challenge, raw)
	}
	if !ok {
		return &Error{Err: ErrWeakKey, Detail: "the public half on the token does not belong to the private half"}
	}
	return nil
}

// withKey runs fn with the checked key id of the given class. want, if not
// zero, is the algorithm the operation needs.
func (h *HSM) withKey(ctx context.Context, op string, id KeyID, class uint, want Algorithm, fn func(pkcs11.SessionHandle, *keyEntry) error) error {
	if err := id.Check(); err != nil {
		return &Error{Op: op, Err: ErrInvalidInput, Detail: err.Error()}
	}
	return h.do(ctx, op, id.String(), func(s pkcs11.SessionHandle) error {
		k, err := h.key(s, id, class)
		if err != nil {
			return err
		}
		if want != 0 && k.alg != want {
			return &Error{Err: ErrWrongAlgorithm, Detail: fmt.Sprintf("the key is %v; %s needs %v", k.alg, op, want)}
		}
		err = fn(s, k)
		if classify(err) == classHandle {
			h.lookAgain(keyRef{id.label(), class}, k)
		}
		return err
	})
}
