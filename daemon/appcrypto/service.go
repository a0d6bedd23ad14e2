// Package appcrypto is the signing, MAC and random-bytes service keywardd
// offers applications (keyward.v1.CryptoService): sign a message or a digest
// with the version of a signing key that signs now, verify a signature under
// a published version, export a version's public key, compute and verify
// HMAC-SHA256 or HMAC-SHA384 with an hmac key, and draw random bytes from
// the HSM.
//
// Private keys and MAC keys stay in the HSM; signatures are verified here
// with Go's crypto/ecdsa and crypto/ed25519 over the public half the HSM
// proved belongs to its private half (hsm.Signer), which needs no HSM
// session beyond loading the key. Who may call what is the policy's
// business, decided before these methods are called.
package appcrypto

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/hsm"
)

// Limits of the service.
const (
	// MaxMessage is the largest message Sign, Verify and the MAC calls take,
	// as Encrypt's plaintext: a larger one is hashed by the caller (Sign
	// takes a digest).
	MaxMessage = 64 << 10
	// MaxRandom is the most bytes Random returns in one call.
	MaxRandom = 1024
)

// Errors of the service.
var (
	// ErrInvalid: an argument is out of range or of the wrong form.
	ErrInvalid = errors.New("crypto: invalid argument")
	// ErrTooLarge: a message is over MaxMessage.
	ErrTooLarge = errors.New("crypto: message too large")
)

// Keys is what the service needs of the key manager: a key's record, from
// its cache.
type Keys interface {
	Cached(name string) (*keys.Key, error)
}

// HSM is what the service needs of the HSM.
type HSM interface {
	Signer(ctx context.Context, id hsm.KeyID) (*hsm.Signer, error)
	HMAC(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, hsm.Algorithm, error)
	Random(ctx context.Context, n int) ([]byte, error)
}

// Service does the calls of CryptoService.
type Service struct {
	keys Keys
	hsm  HSM
	now  func() time.Time

	mu      sync.Mutex
	signers map[signerID]*hsm.Signer
}

// signerID names a version's signer in the cache: its name and number, and
// when it was made, since a key deleted and made again under its name has
// versions of the same numbers (and maybe another algorithm), not the
// same keys.
type signerID struct {
	hsm.KeyID
	made int64
}

// maxSigners bounds the signers kept: past it, the map starts again.
const maxSigners = 4096

// signer is the HSM's signer of a key version, loaded once: Verify then
// needs no HSM session, and Sign one (the signature's) instead of two.
func (s *Service) signer(ctx context.Context, k *keys.Key, id hsm.KeyID) (*hsm.Signer, error) {
	cid := signerID{KeyID: id}
	for _, v := range k.Versions {
		if v.Number == id.Version {
			cid.made = v.Created.UnixNano()
		}
	}
	s.mu.Lock()
	sg := s.signers[cid]
	s.mu.Unlock()
	if sg != nil {
		return sg, nil
	}
	sg, err := s.hsm.Signer(ctx, id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if len(s.signers) >= maxSigners {
		clear(s.signers)
	}
	s.signers[cid] = sg
	s.mu.Unlock()
	return sg, nil
}

// New returns a Service; now is keywardd's clock (nil: time.Now), which says
// which signing version is active and which are published.
func New(k Keys, h HSM, now func() time.Time) *Service {
	if now == nil {
		now = time.Now
	}
	return &Service{keys: k, hsm: h, now: now, signers: map[signerID]*hsm.Signer{}}
}

// KeyID names a key version in the HSM.
type KeyID = hsm.KeyID

// Input is what is signed or verified: a message, or a digest the caller
// made (ECDSA only).
type Input struct {
	Data     []byte
	IsDigest bool
}

// Signature is a signature and the key version that made it.
type Signature struct {
	Signature []byte
	Key       hsm.KeyID
	Algorithm hsm.Algorithm
}

// key returns name's record if it is usable and of purpose p; op names the
// call for the message.
func (s *Service) key(name string, p keys.Purpose, op string) (*keys.Key, error) {
	k, err := s.keys.Cached(name)
	if err != nil {
		return nil, err
	}
	if k.Purpose != p {
		return nil, fmt.Errorf("%w: %q is a %s key; %s needs a key of purpose %s", keys.ErrWrongPurpose, name, k.Purpose, op, p)
	}
	if err := k.Usable(); err != nil {
		return nil, err
	}
	return k, nil
}

func checkMessage(msg []byte) error {
	switch {
	case len(msg) == 0:
		return fmt.Errorf("%w: an empty message; give 1 byte to %d KiB", ErrInvalid, MaxMessage>>10)
	case len(msg) > MaxMessage:
		return fmt.Errorf("%w: a message of %d bytes; the most is %d KiB: hash it and send the digest instead", ErrTooLarge, len(msg), MaxMessage>>10)
	}
	return nil
}

// hashOf is the hash an algorithm signs with; 0 for Ed25519, which signs
// the whole message.
func hashOf(alg hsm.Algorithm) crypto.Hash {
	switch alg {
	case hsm.ECDSAP256:
		return crypto.SHA256
	case hsm.ECDSAP384:
		return crypto.SHA384
	}
	return 0
}

// toSign is what the HSM signs for in under a key of alg: the digest, made
// here from a message, for ECDSA; the message for Ed25519.
func toSign(alg hsm.Algorithm, in Input) ([]byte, crypto.Hash, error) {
	h := hashOf(alg)
	if in.IsDigest {
		if h == 0 {
			return nil, 0, fmt.Errorf("%w: %v keys sign the message itself, not a digest; send the message", ErrInvalid, alg)
		}
		if len(in.Data) != h.Size() {
			return nil, 0, fmt.Errorf("%w: a %d-byte digest for a %v key; it takes a %d-byte %v digest", ErrInvalid, len(in.Data), alg, h.Size(), h)
		}
		return in.Data, h, nil
	}
	if err := checkMessage(in.Data); err != nil {
		return nil, 0, err
	}
	switch h {
	case crypto.SHA256:
		d := sha256.Sum256(in.Data)
		return d[:], h, nil
	case crypto.SHA384:
		d := sha512.Sum384(in.Data)
		return d[:], h, nil
	}
	return in.Data, 0, nil
}

// Sign signs in with the version of the signing key name that signs now.
func (s *Service) Sign(ctx context.Context, name string, in Input) (*Signature, error) {
	k, err := s.key(name, keys.Sign, "Sign")
	if err != nil {
		return nil, err
	}
	if k.Labels[keys.UseLabel] != keys.UseRaw {
		// A key that signs tokens signs nothing else: a signature of any
		// bytes with it would be a token of the signer's choosing, past
		// the token grants, verified by everyone who trusts the JWKS.
		return nil, fmt.Errorf("%w: %q may sign tokens; CryptoService.Sign signs only with a key made for it (created with the label %s=%s)", keys.ErrWrongPurpose, name, keys.UseLabel, keys.UseRaw)
	}
	v, ok := k.Signing(s.now())
	if !ok {
		return nil, fmt.Errorf("%w: %q has no version signing now", keys.ErrVersion, name)
	}
	id := hsm.KeyID{Name: name, Version: v.Number}
	sg, err := s.signer(ctx, k, id)
	if err != nil {
		return nil, err
	}
	data, h, err := toSign(sg.Algorithm(), in)
	if err != nil {
		return nil, err
	}
	sig, err := sg.SignContext(ctx, data, h)
	if err != nil {
		return nil, err
	}
	if pub, ok := sg.Public().(*ecdsa.PublicKey); ok {
		if sig, err = lowS(pub, sig); err != nil {
			return nil, err
		}
	}
	return &Signature{Signature: sig, Key: id, Algorithm: sg.Algorithm()}, nil
}

// published checks that version v of k is published now (0: every
// published version, newest first).
func (s *Service) published(k *keys.Key, v uint32) ([]uint32, error) {
	pub := k.Published(s.now())
	var out []uint32
	for i := len(pub) - 1; i >= 0; i-- {
		if v == 0 || pub[i].Number == v {
			out = append(out, pub[i].Number)
		}
	}
	switch {
	case len(out) > 0:
		return out, nil
	case v == 0:
		return nil, fmt.Errorf("%w: %q has no version published now", keys.ErrVersion, k.Name)
	case v > k.Latest():
		return nil, fmt.Errorf("%w: %q has no version %d", keys.ErrVersion, k.Name, v)
	}
	return nil, fmt.Errorf("%w: %q v%d is no longer published (below the minimum version %d, or past its publication)", keys.ErrVersion, k.Name, v, k.MinDecryptionVersion)
}

// Verify says whether sig is a signature of in by version v of the signing
// key name (0: by any version published now), and which version verified
// it. A signature that does not verify is not an error.
func (s *Service) Verify(ctx context.Context, name string, v uint32, in Input, sig []byte) (bool, uint32, error) {
	k, err := s.key(name, keys.Sign, "Verify")
	if err != nil {
		return false, 0, err
	}
	versions, err := s.published(k, v)
	if err != nil {
		return false, 0, err
	}
	for _, n := range versions {
		sg, err := s.signer(ctx, k, hsm.KeyID{Name: name, Version: n})
		if err != nil {
			return false, 0, err
		}
		data, _, err := toSign(sg.Algorithm(), in)
		if err != nil {
			return false, 0, err
		}
		var ok bool
		switch pub := sg.Public().(type) {
		case *ecdsa.PublicKey:
			// Low S only: a signature has one form (as the tokens'), so
			// that none is a second valid copy of another.
			ok = ecdsa.VerifyASN1(pub, data, sig) && isLowS(pub, sig)
		case ed25519.PublicKey:
			ok = ed25519.Verify(pub, data, sig)
		}
		if ok {
			return true, n, nil
		}
	}
	return false, 0, nil
}

// PublicKey is a signing key version's public key.
type PublicKey struct {
	PEM       string // "PUBLIC KEY": SubjectPublicKeyInfo
	Key       hsm.KeyID
	Algorithm hsm.Algorithm
}

// PublicKey returns the public key of version v of the signing key name
// (0: the newest published version).
func (s *Service) PublicKey(ctx context.Context, name string, v uint32) (*PublicKey, error) {
	k, err := s.key(name, keys.Sign, "GetPublicKey")
	if err != nil {
		return nil, err
	}
	versions, err := s.published(k, v)
	if err != nil {
		return nil, err
	}
	id := hsm.KeyID{Name: name, Version: versions[0]}
	sg, err := s.signer(ctx, k, id)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(sg.Public())
	if err != nil {
		return nil, fmt.Errorf("crypto: encoding the public key of %v: %w", id, err)
	}
	return &PublicKey{PEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), Key: id, Algorithm: sg.Algorithm()}, nil
}

// macVersion is the version of hmac key name a MAC is made or checked with
// (v 0: the newest), checked to be usable.
func (s *Service) macVersion(name string, v uint32, op string) (hsm.KeyID, error) {
	k, err := s.key(name, keys.MAC, op)
	if err != nil {
		return hsm.KeyID{}, err
	}
	if v == 0 {
		v = k.Latest()
	}
	if v < 1 || v > k.Latest() {
		return hsm.KeyID{}, fmt.Errorf("%w: %q has no version %d", keys.ErrVersion, name, v)
	}
	if v < k.MinDecryptionVersion {
		return hsm.KeyID{}, fmt.Errorf("%w: %q v%d is below the minimum version %d", keys.ErrVersion, name, v, k.MinDecryptionVersion)
	}
	return hsm.KeyID{Name: name, Version: v}, nil
}

// MAC is a MAC and the key version that made it.
type MAC struct {
	MAC       []byte
	Key       KeyID
	Algorithm hsm.Algorithm
}

// GenerateMAC computes the HMAC of msg with the newest version of the hmac
// key name, with the key's hash: HMAC-SHA256 or HMAC-SHA384. The answer's
// Key is set once the version is known, even with an error (for the audit
// record).
func (s *Service) GenerateMAC(ctx context.Context, name string, msg []byte) (*MAC, error) {
	if err := checkMessage(msg); err != nil {
		return &MAC{}, err
	}
	id, err := s.macVersion(name, 0, "GenerateMAC")
	if err != nil {
		return &MAC{}, err
	}
	mac, alg, err := s.hsm.HMAC(ctx, id, msg)
	return &MAC{MAC: mac, Key: id, Algorithm: alg}, err
}

// VerifyMAC says whether mac is the HMAC of msg under version v of
// the hmac key name (0: the newest), comparing in constant time. A MAC that
// does not match is not an error.
func (s *Service) VerifyMAC(ctx context.Context, name string, v uint32, msg, mac []byte) (bool, KeyID, error) {
	if err := checkMessage(msg); err != nil {
		return false, hsm.KeyID{}, err
	}
	id, err := s.macVersion(name, v, "VerifyMAC")
	if err != nil {
		return false, hsm.KeyID{}, err
	}
	want, _, err := s.hsm.HMAC(ctx, id, msg)
	if err != nil {
		return false, id, err
	}
	return hmac.Equal(want, mac), id, nil
}

// Random returns n bytes, 1 to MaxRandom, from the HSM's generator.
func (s *Service) Random(ctx context.Context, n int) ([]byte, error) {
	if n < 1 || n > MaxRandom {
		return nil, fmt.Errorf("%w: %d random bytes; ask for 1 to %d", ErrInvalid, n, MaxRandom)
	}
	return s.hsm.Random(ctx, n)
}

// ecdsaSig is an ECDSA signature's ASN.1 form.
type ecdsaSig struct{ R, S *big.Int }

// lowS is sig with s at most half the curve's order (n - s if not): both
// verify, and one form is the answer.
func lowS(pub *ecdsa.PublicKey, sig []byte) ([]byte, error) {
	var v ecdsaSig
	if _, err := asn1.Unmarshal(sig, &v); err != nil {
		return nil, fmt.Errorf("crypto: the HSM's signature does not parse: %w", err)
	}
	n := pub.Curve.Params().N
	if v.S.Cmp(new(big.Int).Rsh(n, 1)) > 0 {
		v.S = new(big.Int).Sub(n, v.S)
		return asn1.Marshal(v)
	}
	return sig, nil
}

// isLowS says whether sig's s is at most half the curve's order.
func isLowS(pub *ecdsa.PublicKey, sig []byte) bool {
	var v ecdsaSig
	if _, err := asn1.Unmarshal(sig, &v); err != nil {
		return false
	}
	return v.S.Cmp(new(big.Int).Rsh(pub.Curve.Params().N, 1)) <= 0
}
