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
	// ErrNotOpened is matched by every failure to open a ciphertext, from
	// Header, Decrypt, and ReEncrypt before it seals again: a malformed
	// ciphertext, one naming a key or version that cannot decrypt (unknown,
	// disabled, pending deletion, of another purpose, below the minimum
	// decryption version), one that fails authentication, or an HSM that
	// could not try. Such an error keeps its specific reason: its message is
	// the reason's, and errors.Is finds the reason's own sentinels. The
	// reason tells which keys and versions exist and in what state, so the
	// API layer decides who may read it.
	ErrNotOpened = errors.New("envelope: the ciphertext does not open")
)

// notOpened is a failure to open a ciphertext: ErrNotOpened, for the reason.
type notOpened struct{ reason error }

func (e *notOpened) Error() string   { return e.reason.Error() }
func (e *notOpened) Unwrap() []error { return []error{ErrNotOpened, e.reason} }

func notOpen(reason error) error { return &notOpened{reason} }

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

// Options tune a Service. The zero value is valid.
type Options struct {
	// Decoy is an AES-256-GCM key version in the HSM that Decrypt uses when
	// a ciphertext names a key or version that cannot decrypt: it tries to
	// open a decoy of the same size under it (a zero nonce and body, which
	// never authenticate), so that such a ciphertext takes the time and the
	// HSM work of one whose tag fails, and the time of an answer does not
	// tell whether the key exists. Zero: no decoy.
	Decoy hsm.KeyID
}

// Service does envelope encryption.
type Service struct {
	keys   Keys
	sealer Sealer
	decoy  hsm.KeyID
}

// New returns a Service.
func New(k Keys, s Sealer, o Options) *Service { return &Service{keys: k, sealer: s, decoy: o.Decoy} }

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
		return Header{}, notOpen(err)
	}
	return c.Header, nil
}

// Decrypt opens a ciphertext made by Encrypt or GenerateDataKey, under the
// key version it names, with the encryption context it was sealed with.
// Every failure to open it matches ErrNotOpened; an encryption context that
// breaks a limit gives ErrContext before anything else, whatever the
// ciphertext.
func (s *Service) Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, Header, error) {
	canon, err := CanonicalContext(encCtx)
	if err != nil {
		return nil, Header{}, err
	}
	c, err := Parse(ciphertext)
	if err != nil {
		return nil, Header{}, notOpen(err)
	}
	aad := append(c.Header.marshal(nil), canon...)
	id, err := s.keys.ForDecryption(c.KeyName, c.KeyVersion)
	if err != nil {
		if derr := s.tryDecoy(ctx, len(c.Sealed), aad); derr != nil {
			return nil, c.Header, notOpen(fmt.Errorf("%w (and the HSM could not try the decoy decryption: %w)", err, derr))
		}
		return nil, c.Header, notOpen(err)
	}
	pt, err := s.sealer.Decrypt(ctx, id, c.Nonce, c.Sealed, aad)
	if errors.Is(err, hsm.ErrDecrypt) {
		err = ErrDecrypt
	}
	if err != nil {
		return nil, c.Header, notOpen(err)
	}
	return pt, c.Header, nil
}

// tryDecoy does the HSM work of a failed tag check on a sealed part of n
// bytes, under the decoy key. It returns an error only if the HSM could
// not try, as it could not have tried with the key the ciphertext names.
func (s *Service) tryDecoy(ctx context.Context, n int, aad []byte) error {
	if s.decoy == (hsm.KeyID{}) {
		return nil
	}
	_, err := s.sealer.Decrypt(ctx, s.decoy, make([]byte, NonceSize), make([]byte, n), aad)
	if err == nil || errors.Is(err, hsm.ErrDecrypt) || errors.Is(err, hsm.ErrKeyNotFound) {
		return nil
	}
	return err
}

// ReEncrypt opens a ciphertext and seals its plaintext again under the
// newest version of toKey (empty: the same key) with toCtx (nil: the same
// context), without the plaintext leaving the daemon. A failure to open
// matches ErrNotOpened, a failure to seal again does not.
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
