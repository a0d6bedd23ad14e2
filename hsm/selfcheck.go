package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// CheckStep is one step of SelfCheck and how long it took.
type CheckStep struct {
	Name     string
	Duration time.Duration
}

// SelfCheck proves the token does everything keyward needs: it creates one
// key of each algorithm under a fresh throw-away name, round-trips an
// AES-GCM encryption, verifies each signature with Go's crypto packages,
// computes an HMAC twice, draws random bytes, and destroys the keys again
// (also when a step fails). It is meant for pointing keyward at a new HSM.
func (h *HSM) SelfCheck(ctx context.Context) ([]CheckStep, error) {
	var steps []CheckStep
	step := func(name string, fn func() error) error {
		start := time.Now()
		if err := fn(); err != nil {
			return fmt.Errorf("self-check %s: %w", name, err)
		}
		steps = append(steps, CheckStep{name, time.Since(start)})
		return nil
	}
	suffix, err := h.Random(ctx, 6)
	if err != nil {
		return nil, fmt.Errorf("self-check random: %w", err)
	}
	name := "keyward-selfcheck-" + hex.EncodeToString(suffix)
	algs := []Algorithm{AES256GCM, HMACSHA256, HMACSHA384, ECDSAP256, ECDSAP384, Ed25519}
	id := func(a Algorithm) KeyID { return KeyID{name + "-" + a.String(), 1} }
	var created []KeyID
	defer func() {
		for _, k := range created {
			_ = h.DestroyKey(context.WithoutCancel(ctx), k)
		}
	}()
	for _, a := range algs {
		if err := step("create "+a.String()+" key", func() error { return h.CreateKey(ctx, id(a), a) }); err != nil {
			return steps, err
		}
		created = append(created, id(a))
	}
	msg := []byte("keyward self-check")
	if err := step("AES-256-GCM round trip", func() error {
		nonce, ct, err := h.Encrypt(ctx, id(AES256GCM), msg, msg)
		if err != nil {
			return err
		}
		pt, err := h.Decrypt(ctx, id(AES256GCM), nonce, ct, msg)
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, msg) {
			return errors.New("decryption returned other bytes")
		}
		if _, err := h.Decrypt(ctx, id(AES256GCM), nonce, ct, nil); !errors.Is(err, ErrDecrypt) {
			return fmt.Errorf("a ciphertext opened without its additional data (%v)", err)
		}
		return nil
	}); err != nil {
		return steps, err
	}
	for _, a := range []Algorithm{HMACSHA256, HMACSHA384} {
		if err := step(strings.ToUpper(a.String()), func() error { return checkHMAC(ctx, h, id(a), msg) }); err != nil {
			return steps, err
		}
	}
	for _, a := range []Algorithm{ECDSAP256, ECDSAP384, Ed25519} {
		if err := step("sign and verify "+a.String(), func() error { return checkSignature(ctx, h, id(a), msg) }); err != nil {
			return steps, err
		}
	}
	if err := step("random", func() error {
		a, err := h.Random(ctx, 32)
		if err != nil {
			return err
		}
		b, err := h.Random(ctx, 32)
		if err != nil {
			return err
		}
		if bytes.Equal(a, b) {
			return errors.New("the generator repeated itself")
		}
		return nil
	}); err != nil {
		return steps, err
	}
	err = step("destroy keys", func() error {
		for len(created) > 0 {
			if err := h.DestroyKey(ctx, created[0]); err != nil {
				return err
			}
			created = created[1:]
		}
		return nil
	})
	return steps, err
}

// checkHMAC computes the MAC of msg twice with the key's own hash: the same
// MAC each time, of the hash's size, and another for another message.
func checkHMAC(ctx context.Context, h *HSM, id KeyID, msg []byte) error {
	a, alg, err := h.HMAC(ctx, id, msg)
	if err != nil {
		return err
	}
	b, _, err := h.HMAC(ctx, id, msg)
	if err != nil {
		return err
	}
	c, _, err := h.HMAC(ctx, id, append(msg, '.'))
	if err != nil {
		return err
	}
	switch {
	case !hmac.Equal(a, b):
		return errors.New("two MACs of one message differ")
	case hmac.Equal(a, c):
		return errors.New("two messages have one MAC")
	case len(a) != hmacMechs[alg].size:
		return fmt.Errorf("a %d-byte %v", len(a), alg)
	}
	return nil
}

// checkSignature signs msg with the token and verifies it with Go's crypto.
func checkSignature(ctx context.Context, h *HSM, id KeyID, msg []byte) error {
	s, err := h.Signer(ctx, id)
	if err != nil {
		return err
	}
	switch pub := s.Public().(type) {
	case *ecdsa.PublicKey:
		digest, hash := sha256.Sum256(msg), crypto.SHA256
		d := digest[:]
		if s.Algorithm() == ECDSAP384 {
			d384 := sha512.Sum384(msg)
			d, hash = d384[:], crypto.SHA384
		}
		sig, err := s.SignContext(ctx, d, hash)
		if err != nil {
			return err
		}
		if !ecdsa.VerifyASN1(pub, d, sig) {
			return errors.New("crypto/ecdsa rejects the token's signature")
		}
	case ed25519.PublicKey:
		sig, err := s.SignContext(ctx, msg, crypto.Hash(0))
		if err != nil {
			return err
		}
		if !ed25519.Verify(pub, msg, sig) {
			return errors.New("crypto/ed25519 rejects the token's signature")
		}
	}
	return nil
}
