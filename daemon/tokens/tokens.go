// Package tokens mints and verifies keyward's short-lived tokens: JWTs (RFC
// 7519) signed as JWS (RFC 7515) by keys that never leave the HSM, whose
// public halves are published as a JWK set (RFC 7517) with RFC 7638
// thumbprints as key IDs. go-jose does the JWS and the signature checks
// (the claims are marshalled here, once: claimsJSON says why); this
// package adds what JWT libraries leave to their callers: the
// algorithm is pinned per key (the token's header never chooses it), only
// keyward's key IDs are looked up, a header with anything but alg, kid and
// typ is refused (so jku, x5u, jwk, x5c and crit never count), and exp, iat,
// aud, iss and jti are required.
package tokens

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/keyward/keyward/hsm"
)

// Errors Verify returns, each saying why a token failed. Match with errors.Is.
var (
	ErrMalformed  = errors.New("tokens: not a JWS compact token keyward accepts")
	ErrAlgorithm  = errors.New("tokens: algorithm not allowed")
	ErrHeader     = errors.New("tokens: header not allowed")
	ErrUnknownKey = errors.New("tokens: unknown key ID")
	ErrSignature  = errors.New("tokens: bad signature")
	ErrExpired    = errors.New("tokens: expired")
	ErrNotYet     = errors.New("tokens: not valid yet")
	ErrIssuedAt   = errors.New("tokens: issued in the future")
	ErrMissing    = errors.New("tokens: a required claim is missing")
	ErrAudience   = errors.New("tokens: wrong audience")
	ErrIssuer     = errors.New("tokens: wrong issuer")
	ErrRevoked    = errors.New("tokens: revoked")
	ErrInvalid    = errors.New("tokens: invalid argument")
)

// MaxLeeway is the most clock skew Verify may allow.
const MaxLeeway = 60 * time.Second

// algs maps keyward's signing algorithms to JWS ones.
var algs = map[hsm.Algorithm]jose.SignatureAlgorithm{
	hsm.ECDSAP256: jose.ES256,
	hsm.ECDSAP384: jose.ES384,
	hsm.Ed25519:   jose.EdDSA,
}

// allowed are the only algorithms a token may name.
var allowed = []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.EdDSA}

// Key is a signing key version: its JWS algorithm, its public key and its
// key ID, the RFC 7638 SHA-256 thumbprint of the public key.
type Key struct {
	ID     hsm.KeyID
	Alg    jose.SignatureAlgorithm
	KID    string
	Public crypto.PublicKey
	signer *hsm.Signer // nil for a key that only verifies
}

// NewKey makes a Key of an HSM signing key.
func NewKey(s *hsm.Signer, id hsm.KeyID) (*Key, error) {
	alg, ok := algs[s.Algorithm()]
	if !ok {
		return nil, fmt.Errorf("%w: %v keys do not sign tokens", ErrInvalid, s.Algorithm())
	}
	k, err := VerifyKey(id, alg, s.Public())
	if err != nil {
		return nil, err
	}
	k.signer = s
	return k, nil
}

// VerifyKey makes a Key that only verifies.
func VerifyKey(id hsm.KeyID, alg jose.SignatureAlgorithm, pub crypto.PublicKey) (*Key, error) {
	fits := false
	switch p := pub.(type) {
	case *ecdsa.PublicKey:
		fits = (alg == jose.ES256 && p.Curve == elliptic.P256()) || (alg == jose.ES384 && p.Curve == elliptic.P384())
	case ed25519.PublicKey:
		fits = alg == jose.EdDSA
	}
	if !fits {
		return nil, fmt.Errorf("%w: a %T is not a key for %s", ErrInvalid, pub, alg)
	}
	jwk := jose.JSONWebKey{Key: pub}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("tokens: thumbprint: %w", err)
	}
	return &Key{ID: id, Alg: alg, KID: base64.RawURLEncoding.EncodeToString(tp), Public: pub}, nil
}

// JWK is the key's public JWK, as published.
func (k *Key) JWK() jose.JSONWebKey {
	return jose.JSONWebKey{Key: k.Public, KeyID: k.KID, Algorithm: string(k.Alg), Use: "sig"}
}

// JWKS is the JWK set of the given keys.
func JWKS(keys ...*Key) jose.JSONWebKeySet {
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	for _, k := range keys {
		set.Keys = append(set.Keys, k.JWK())
	}
	return set
}

// opaque signs JWS payloads in the HSM, in the form JWS wants: r‖s for
// ECDSA, not crypto.Signer's DER.
type opaque struct {
	ctx context.Context
	k   *Key
}

func (o opaque) Public() *jose.JSONWebKey { j := o.k.JWK(); return &j }

func (o opaque) Algs() []jose.SignatureAlgorithm { return []jose.SignatureAlgorithm{o.k.Alg} }

func (o opaque) SignPayload(payload []byte, alg jose.SignatureAlgorithm) ([]byte, error) {
	if alg != o.k.Alg {
		return nil, fmt.Errorf("%w: key %s signs %s, not %s", ErrAlgorithm, o.k.KID, o.k.Alg, alg)
	}
	switch alg {
	case jose.EdDSA:
		return o.k.signer.SignContext(o.ctx, payload, crypto.Hash(0))
	case jose.ES256:
		d := sha256.Sum256(payload)
		return o.ecdsa(d[:], crypto.SHA256, 32)
	case jose.ES384:
		d := sha512.Sum384(payload)
		return o.ecdsa(d[:], crypto.SHA384, 48)
	}
	return nil, fmt.Errorf("%w: %s", ErrAlgorithm, alg)
}

func (o opaque) ecdsa(digest []byte, h crypto.Hash, size int) ([]byte, error) {
	der, err := o.k.signer.SignContext(o.ctx, digest, h)
	if err != nil {
		return nil, err
	}
	var rs struct{ R, S *big.Int }
	if rest, err := asn1.Unmarshal(der, &rs); err != nil || len(rest) > 0 {
		return nil, errors.New("tokens: the HSM's signature does not parse")
	}
	// One signature per token: s above n/2 is replaced by n−s, which
	// verifies the same, and Verify accepts only the low form.
	n := o.k.Public.(*ecdsa.PublicKey).Curve.Params().N
	if rs.S.Cmp(new(big.Int).Rsh(n, 1)) > 0 {
		rs.S.Sub(n, rs.S)
	}
	out := make([]byte, 2*size)
	rs.R.FillBytes(out[:size])
	rs.S.FillBytes(out[size:])
	return out, nil
}

// Spec is what a token says.
type Spec struct {
	Issuer   string
	Subject  string
	Audience []string
	TTL      time.Duration
	Scopes   []string
	Custom   map[string]any // more claims; none of the registered names
}

var customName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

// reserved claim names that Custom may not set.
var reserved = []string{"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope"}

// Minted is a token and what it says.
type Minted struct {
	Token   string
	ID      string // jti
	Expires time.Time
	KID     string
}

// Mint signs a token with k, valid from now for s.TTL.
func Mint(ctx context.Context, k *Key, s Spec, now time.Time) (*Minted, error) {
	switch {
	case k.signer == nil:
		return nil, fmt.Errorf("%w: key %s only verifies", ErrInvalid, k.KID)
	case s.Issuer == "" || s.Subject == "" || len(s.Audience) == 0:
		return nil, fmt.Errorf("%w: a token needs an issuer, a subject and an audience", ErrInvalid)
	case s.TTL <= 0:
		return nil, fmt.Errorf("%w: the lifetime must be positive", ErrInvalid)
	}
	for _, a := range s.Audience {
		if a == "" {
			return nil, fmt.Errorf("%w: an empty audience", ErrInvalid)
		}
	}
	for name := range s.Custom {
		// Lower-case ASCII names only: other JSON decoders match names
		// case-insensitively and by Unicode folding ("ſub" is "sub" to Go's
		// encoding/json), so a look-alike could pass for a registered claim.
		if !customName.MatchString(name) || slices.Contains(reserved, name) {
			return nil, fmt.Errorf("%w: custom claim %q: use lower-case letters, digits and _, and none of %v", ErrInvalid, name, reserved)
		}
	}
	id := make([]byte, 16)
	rand.Read(id)
	now = now.UTC().Truncate(time.Second)
	exp := now.Add(s.TTL)
	reg := jwt.Claims{
		Issuer: s.Issuer, Subject: s.Subject, Audience: jwt.Audience(s.Audience),
		Expiry: jwt.NewNumericDate(exp), NotBefore: jwt.NewNumericDate(now), IssuedAt: jwt.NewNumericDate(now),
		ID: base64.RawURLEncoding.EncodeToString(id),
	}
	payload, err := claimsJSON(reg, s)
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.Alg, Key: opaque{ctx: ctx, k: k}},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), k.KID))
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		return nil, fmt.Errorf("tokens: signing: %w", err)
	}
	tok, err := jws.CompactSerialize()
	if err != nil {
		return nil, fmt.Errorf("tokens: signing: %w", err)
	}
	return &Minted{Token: tok, ID: reg.ID, Expires: exp, KID: k.KID}, nil
}

// claimsJSON is a token's claims as one JSON object, marshalled once.
// go-jose's jwt builder marshals the registered claims, decodes them into a
// map, merges the other sets and marshals the whole again (about a tenth
// of an uncached MintToken's CPU, HSM included); the registered claims and
// the scopes are one struct here, and custom claims, whose names Mint has
// checked are none of those (TestReservedNames holds the list to
// jwt.Claims'), are spliced in after them. Numbers are written as Go
// writes them (1000000, where the builder wrote 1e+06): the same values.
func claimsJSON(reg jwt.Claims, s Spec) ([]byte, error) {
	b, err := json.Marshal(struct {
		jwt.Claims
		Scope []string `json:"scope,omitempty"`
	}{reg, s.Scopes})
	if err != nil || len(s.Custom) == 0 {
		return b, err
	}
	c, err := json.Marshal(s.Custom)
	if err != nil {
		return nil, fmt.Errorf("%w: custom claims: %v (values are strings, finite numbers, booleans, null, lists and objects)", ErrInvalid, err)
	}
	if len(b) == 2 { // {}: no registered claim to follow
		return c, nil
	}
	// Both are objects with members: {"iss":…} and {"x":…} join as {"iss":…,"x":…}.
	b[len(b)-1] = ','
	return append(b, c[1:]...), nil
}

// Verifier checks tokens against a set of keys.
type Verifier struct {
	Keys     map[string]*Key // by KID
	Issuer   string
	Leeway   time.Duration // at most MaxLeeway
	Revoked  func(jti string) bool
	MaxBytes int // longest token read; default 8 KiB
}

// Verified is what a valid token says.
type Verified struct {
	Claims jwt.Claims
	Scopes []string
	Custom map[string]any
	KID    string
	Key    hsm.KeyID // the signing key version
}

// headerNames are the only header parameters a keyward token has. Any other
// is refused: an embedded key (jwk, x5c) or a key URL (jku, x5u) is never
// trusted, and an extension a verifier must understand (crit) is not one
// keyward has.
var headerNames = []string{"alg", "kid", "typ"}

// checkHeader reads the protected header before go-jose does and refuses
// any parameter but alg, kid and typ.
func checkHeader(token string) error {
	if !compactForm.MatchString(token) {
		return fmt.Errorf("%w: not three dot-separated base64url parts", ErrMalformed)
	}
	// One spelling per token: go-jose checks the signature over a new
	// encoding of the decoded parts, so loose base64 (stray low bits, line
	// breaks) would let one token be written many ways.
	parts := strings.Split(token, ".")
	for _, p := range parts[1:] {
		if _, err := base64.RawURLEncoding.Strict().DecodeString(p); err != nil {
			return fmt.Errorf("%w: a part is not canonical base64url", ErrMalformed)
		}
	}
	raw, err := base64.RawURLEncoding.Strict().DecodeString(parts[0])
	if err != nil {
		return fmt.Errorf("%w: the header is not canonical base64url", ErrMalformed)
	}
	var h map[string]json.RawMessage
	if err := json.Unmarshal(raw, &h); err != nil {
		return fmt.Errorf("%w: the header is not a JSON object", ErrMalformed)
	}
	for name := range h {
		if !slices.Contains(headerNames, name) {
			return fmt.Errorf("%w: %q", ErrHeader, name)
		}
	}
	if t, ok := h["typ"]; ok && string(t) != `"JWT"` {
		return fmt.Errorf("%w: typ %s", ErrHeader, t)
	}
	var alg string
	if err := json.Unmarshal(h["alg"], &alg); err != nil || !slices.Contains(allowed, jose.SignatureAlgorithm(alg)) {
		return fmt.Errorf("%w: %s; keyward tokens are ES256, ES384 or EdDSA", ErrAlgorithm, h["alg"])
	}
	return nil
}

var compactForm = regexp.MustCompile(`^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$`)

var kidForm = regexp.MustCompile(`^[A-Za-z0-9_-]{43}$`) // a base64url SHA-256 thumbprint

// Verify checks a token for audience at time now, and says why it fails.
func (v *Verifier) Verify(token, audience string, now time.Time) (*Verified, error) {
	if audience == "" {
		return nil, fmt.Errorf("%w: a verifier needs an audience", ErrInvalid)
	}
	return v.verify(token, audience, now)
}

// Own checks that a token is one of the verifier's keys' own and still
// valid at now, for whatever audience: for revoking it.
func (v *Verifier) Own(token string, now time.Time) (*Verified, error) {
	return v.verify(token, "", now)
}

func (v *Verifier) verify(token, audience string, now time.Time) (*Verified, error) {
	maxBytes := v.MaxBytes
	if maxBytes == 0 {
		maxBytes = 8 << 10
	}
	if len(token) > maxBytes {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, maxBytes)
	}
	if v.Leeway < 0 || v.Leeway > MaxLeeway {
		return nil, fmt.Errorf("%w: leeway %v; at most %v", ErrInvalid, v.Leeway, MaxLeeway)
	}
	if v.Issuer == "" {
		return nil, fmt.Errorf("%w: a verifier needs an issuer", ErrInvalid)
	}
	if err := checkHeader(token); err != nil {
		return nil, err
	}
	tok, err := jwt.ParseSigned(token, allowed)
	if err != nil {
		if errors.Is(err, jose.ErrUnsupportedAlgorithm) {
			return nil, fmt.Errorf("%w: %v", ErrAlgorithm, err)
		}
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if len(tok.Headers) != 1 {
		return nil, fmt.Errorf("%w: %d signatures", ErrMalformed, len(tok.Headers))
	}
	h := tok.Headers[0]
	if !kidForm.MatchString(h.KeyID) {
		return nil, fmt.Errorf("%w: the kid is not a keyward key ID", ErrUnknownKey)
	}
	k, ok := v.Keys[h.KeyID]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownKey, h.KeyID)
	}
	if jose.SignatureAlgorithm(h.Algorithm) != k.Alg {
		return nil, fmt.Errorf("%w: key %s signs %s, the token says %s", ErrAlgorithm, k.KID, k.Alg, h.Algorithm)
	}
	if pub, ok := k.Public.(*ecdsa.PublicKey); ok {
		sig, _ := base64.RawURLEncoding.Strict().DecodeString(token[strings.LastIndexByte(token, '.')+1:])
		n := pub.Curve.Params().N
		if len(sig)%2 != 0 || new(big.Int).SetBytes(sig[len(sig)/2:]).Cmp(new(big.Int).Rsh(n, 1)) > 0 {
			return nil, fmt.Errorf("%w: not the low-S form keyward signs", ErrSignature)
		}
	}
	var reg jwt.Claims
	var extra map[string]any
	if err := tok.Claims(k.Public, &reg, &extra); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSignature, err)
	}
	switch {
	case reg.Expiry == nil:
		return nil, fmt.Errorf("%w: exp", ErrMissing)
	case reg.IssuedAt == nil:
		return nil, fmt.Errorf("%w: iat", ErrMissing)
	case len(reg.Audience) == 0:
		return nil, fmt.Errorf("%w: aud", ErrMissing)
	case reg.ID == "":
		return nil, fmt.Errorf("%w: jti", ErrMissing)
	case reg.Issuer == "":
		return nil, fmt.Errorf("%w: iss", ErrMissing)
	}
	want := jwt.Expected{Issuer: v.Issuer, Time: now}
	if audience != "" {
		want.AnyAudience = jwt.Audience{audience}
	}
	err = reg.ValidateWithLeeway(want, v.Leeway)
	switch {
	case errors.Is(err, jwt.ErrExpired):
		return nil, fmt.Errorf("%w: at %s", ErrExpired, reg.Expiry.Time().UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrNotValidYet):
		return nil, fmt.Errorf("%w: from %s", ErrNotYet, reg.NotBefore.Time().UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrIssuedInTheFuture):
		return nil, ErrIssuedAt
	case errors.Is(err, jwt.ErrInvalidAudience):
		return nil, fmt.Errorf("%w: not for %q", ErrAudience, audience)
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return nil, fmt.Errorf("%w: %q", ErrIssuer, reg.Issuer)
	case err != nil:
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if v.Revoked != nil && v.Revoked(reg.ID) {
		return nil, fmt.Errorf("%w: jti %s", ErrRevoked, reg.ID)
	}
	out := &Verified{Claims: reg, KID: k.KID, Key: k.ID, Custom: map[string]any{}}
	for name, val := range extra {
		if name == "scope" {
			if list, ok := val.([]any); ok {
				for _, s := range list {
					if str, ok := s.(string); ok {
						out.Scopes = append(out.Scopes, str)
					}
				}
			}
			continue
		}
		if !slices.Contains(reserved, name) {
			out.Custom[name] = val
		}
	}
	return out, nil
}
