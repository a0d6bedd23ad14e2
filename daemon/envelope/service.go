package envelope

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/keyward/keyward/hsm"
)

// Limits of the service.
const (
	// MaxPlaintext is the most Encrypt seals directly; larger data is
	// encrypted locally under a data key.
	MaxPlaintext = 64 << 10
	// DefaultDataKeySize is the size of the data keys GenerateDataKey makes
	// unless told otherwise, in bytes.
	DefaultDataKeySize = 32
)

// Errors of the service.
var (
	// ErrDecrypt: the ciphertext does not authenticate under its key with
	// the given encryption context. A changed ciphertext and a wrong or
	// missing context give this same error, on purpose.
	ErrDecrypt = errors.New("envelope: the ciphertext or the encryption context does not match")
	// ErrTooLarge: the plaintext is over MaxPlaintext.
	ErrTooLarge = errors.New("envelope: plaintext too large")
	// ErrInvalid: an argument is out of range.
	ErrInvalid = errors.New("envelope: invalid argument")
)

// Keys is what the service needs of the key manager: which version to
// encrypt with, and whether a version may decrypt.
type Keys interface {
	ForEncryption(ctx context.Context, name string) (hsm.KeyID, error)
	ForDecryption(name string, version uint32) (hsm.KeyID, error)
}

// Sealer seals and opens with AES-256-GCM inside the HSM.
type Sealer interface {
	Encrypt(ctx context.Context, id hsm.KeyID, plaintext, aad []byte) (nonce, ciphertext []byte, err error)
	Decrypt(ctx context.Context, id hsm.KeyID, nonce, ciphertext, aad []byte) ([]byte, error)
}

// Service does envelope encryption.
type Service struct {
	keys   Keys
	sealer Sealer
}

// New returns a Service.
func New(k Keys, s Sealer) *Service { return &Service{keys: k, sealer: s} }

// seal seals plaintext under the newest version of the named key.
func (s *Service) seal(ctx context.Context, keyName string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	id, err := s.keys.ForEncryption(ctx, keyName)
	if err != nil {
		return nil, err
	}
	h := Header{KeyName: id.Name, KeyVersion: id.Version}
	aad, err := AAD(h, encCtx)
	if err != nil {
		return nil, err
	}
	nonce, sealed, err := s.sealer.Encrypt(ctx, id, plaintext, aad)
	if err != nil {
		return nil, err
	}
	return (&Ciphertext{Header: h, Nonce: nonce, Sealed: sealed}).Marshal()
}

// GenerateDataKey makes a fresh data key of size bytes (16, 24 or 32; 0
// means 32) and returns it in plaintext, to be used once and forgotten, and
// sealed under the named key, to be stored beside the data.
func (s *Service) GenerateDataKey(ctx context.Context, keyName string, size int, encCtx map[string]string) (plaintext, wrapped []byte, err error) {
	if size == 0 {
		size = DefaultDataKeySize
	}
	if size != 16 && size != 24 && size != 32 {
		return nil, nil, fmt.Errorf("%w: data key size %d; use 16, 24 or 32 bytes", ErrInvalid, size)
	}
	if _, err := CanonicalContext(encCtx); err != nil {
		return nil, nil, err
	}
	dk := make([]byte, size)
	rand.Read(dk)
	wrapped, err = s.seal(ctx, keyName, dk, encCtx)
	if err != nil {
		clear(dk)
		return nil, nil, err
	}
	return dk, wrapped, nil
}

// Encrypt seals up to MaxPlaintext bytes directly under the named key.
func (s *Service) Encrypt(ctx context.Context, keyName string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	if len(plaintext) > MaxPlaintext {
		return nil, fmt.Errorf("%w: %d bytes; Encrypt takes at most %d: encrypt larger data locally under a data key", ErrTooLarge, len(plaintext), MaxPlaintext)
	}
	return s.seal(ctx, keyName, plaintext, encCtx)
}

// Header reads which key version a ciphertext names, without opening it:
// for the policy check before Decrypt.
func (s *Service) Header(ciphertext []byte) (Header, error) {
	c, err := Parse(ciphertext)
	if err != nil {
		return Header{}, err
	}
	return c.Header, nil
}

// Decrypt opens a ciphertext made by Encrypt or GenerateDataKey, under the
// key version it names, with the encryption context it was sealed with.
func (s *Service) Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, Header, error) {
	c, err := Parse(ciphertext)
	if err != nil {
		return nil, Header{}, err
	}
	id, err := s.keys.ForDecryption(c.KeyName, c.KeyVersion)
	if err != nil {
		return nil, c.Header, err
	}
	aad, err := AAD(c.Header, encCtx)
	if err != nil {
		return nil, c.Header, err
	}
	pt, err := s.sealer.Decrypt(ctx, id, c.Nonce, c.Sealed, aad)
	if errors.Is(err, hsm.ErrDecrypt) {
		return nil, c.Header, ErrDecrypt
	}
	return pt, c.Header, err
}

// ReEncrypt opens a ciphertext and seals its plaintext again under the
// newest version of toKey (empty: the same key) with toCtx (nil: the same
// context), without the plaintext leaving the daemon.
func (s *Service) ReEncrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string, toKey string, toCtx map[string]string) ([]byte, Header, error) {
	pt, from, err := s.Decrypt(ctx, ciphertext, encCtx)
	if err != nil {
		return nil, from, err
	}
	defer clear(pt)
	if toKey == "" {
		toKey = from.KeyName
	}
	if toCtx == nil {
		toCtx = encCtx
	}
	out, err := s.seal(ctx, toKey, pt, toCtx)
	return out, from, err
}
