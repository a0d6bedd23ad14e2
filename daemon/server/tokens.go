package server

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
)

// TokenConfig is the daemon's side of tokens.
type TokenConfig struct {
	Issuer     string        // iss of every token; default "keyward"
	DefaultTTL time.Duration // default 5 minutes
	MaxTTL     time.Duration // the ceiling, whatever a role allows; default 1 hour
	Leeway     time.Duration // clock skew Verify allows; default 30 s, at most 60 s
	// NoCache turns off reusing a token for repeated identical mints by the
	// same caller (see mintCache).
	NoCache bool
}

// mintCache lets a busy client that asks for the same token again and again
// (same caller, key, audiences, scopes, claims, lifetime, subject) get the
// one it got before, until half its lifetime has passed, instead of an HSM
// signature each time. Only after every check of the call (policy, grant,
// key state) and never for a revoked token. Bounded: it is emptied when full.
type mintCache struct {
	mu sync.Mutex
	m  map[string]mintEntry
}

type mintEntry struct {
	resp    *keywardv1.MintTokenResponse
	minted  time.Time
	reuseTo time.Time
}

const mintCacheMax = 10000

func (c *mintCache) get(key string, now time.Time) *keywardv1.MintTokenResponse {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return nil
	}
	if !now.Before(e.reuseTo) {
		delete(c.m, key)
		return nil
	}
	return e.resp
}

func (c *mintCache) put(key string, r *keywardv1.MintTokenResponse, now time.Time, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= mintCacheMax {
		clear(c.m)
	}
	c.m[key] = mintEntry{resp: r, minted: now, reuseTo: now.Add(ttl / 2)}
}

func (c *TokenConfig) defaults() {
	if c.Issuer == "" {
		c.Issuer = "keyward"
	}
	if c.DefaultTTL <= 0 {
		c.DefaultTTL = 5 * time.Minute
	}
	if c.MaxTTL <= 0 {
		c.MaxTTL = time.Hour
	}
	if c.Leeway <= 0 {
		c.Leeway = 30 * time.Second
	}
}

// tokenKeys caches the tokens.Key of each signing key version: a version's
// public key never changes, and versions are never reused.
type tokenKeys struct {
	mu sync.Mutex
	m  map[hsm.KeyID]*tokens.Key
}

func (s *Server) tokenKey(ctx context.Context, id hsm.KeyID) (*tokens.Key, error) {
	s.tkeys.mu.Lock()
	k := s.tkeys.m[id]
	s.tkeys.mu.Unlock()
	if k != nil {
		return k, nil
	}
	sg, err := s.cfg.HSM.Signer(ctx, id)
	if err != nil {
		return nil, err
	}
	if k, err = tokens.NewKey(sg, id); err != nil {
		return nil, err
	}
	s.tkeys.mu.Lock()
	s.tkeys.m[id] = k
	s.tkeys.mu.Unlock()
	return k, nil
}

// signingKey checks that name is a usable signing key.
func signingKey(k *keys.Key) error {
	switch {
	case k.Purpose != keys.Sign:
		return fmt.Errorf("%w: %q is a %s key, not a signing key", keys.ErrWrongPurpose, k.Name, k.Purpose)
	case k.State == keys.Disabled:
		return fmt.Errorf("%w: %q", keys.ErrDisabled, k.Name)
	case k.State == keys.PendingDeletion:
		return fmt.Errorf("%w: %q", keys.ErrPendingDeletion, k.Name)
	}
	return nil
}

func (s *Server) MintToken(ctx context.Context, r *keywardv1.MintTokenRequest) (*keywardv1.MintTokenResponse, error) {
	c := callFrom(ctx)
	if err := s.allow(ctx, "TokenService.MintToken", r.GetKeyName()); err != nil {
		return nil, err
	}
	ttl := s.cfg.Tokens.DefaultTTL
	if r.GetTtl() != nil {
		ttl = r.GetTtl().AsDuration()
	}
	if ttl <= 0 || ttl > s.cfg.Tokens.MaxTTL {
		return nil, fmt.Errorf("%w: a lifetime of %v; keywardd mints tokens of up to %v", errInvalid, ttl, s.cfg.Tokens.MaxTTL)
	}
	custom := r.GetClaims().AsMap()
	names := make([]string, 0, len(custom))
	for n := range custom {
		names = append(names, n)
	}
	slices.Sort(names)
	grant := s.policy.Load().Tokens(subject(c.caller))
	if err := grant.Check(r.GetAudiences(), r.GetScopes(), names, ttl, r.GetSubject() != ""); err != nil {
		return nil, err
	}
	sub := r.GetSubject()
	if sub == "" {
		sub = fmt.Sprintf("uid:%d", c.caller.UID)
	}
	k, err := s.cfg.Keys.Cached(r.GetKeyName())
	if err != nil {
		return nil, err
	}
	if err := signingKey(k); err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	v, ok := k.Signing(now)
	if !ok {
		return nil, fmt.Errorf("%w: %q has no version signing now", keys.ErrVersion, k.Name)
	}
	if !v.RemoveAt.IsZero() && now.Add(ttl).After(v.RemoveAt) {
		// Cannot happen while the keep-published time covers the ceiling.
		return nil, fmt.Errorf("%w: a token of %v would outlive the publication of %q v%d", keys.ErrVersion, ttl, k.Name, v.Number)
	}
	id := hsm.KeyID{Name: k.Name, Version: v.Number}
	c.version = id.Version
	var cacheKey string
	if !s.cfg.Tokens.NoCache {
		ck, _ := json.Marshal([]any{c.caller.UID, c.caller.GID, c.caller.ExeSHA256, id, r.GetAudiences(), r.GetScopes(), custom, ttl, sub})
		cacheKey = string(ck)
		if hit := s.mints.get(cacheKey, now); hit != nil && !s.cfg.Revoked.Is(hit.GetTokenId()) {
			return hit, nil
		}
	}
	tk, err := s.tokenKey(ctx, id)
	if err != nil {
		return nil, err
	}
	m, err := tokens.Mint(ctx, tk, tokens.Spec{Issuer: s.cfg.Tokens.Issuer, Subject: sub, Audience: r.GetAudiences(),
		TTL: ttl, Scopes: r.GetScopes(), Custom: custom}, now)
	if err != nil {
		return nil, err
	}
	resp := &keywardv1.MintTokenResponse{Token: m.Token, TokenId: m.ID, ExpireTime: timestamppb.New(m.Expires),
		KeyName: id.Name, KeyVersion: id.Version, Kid: m.KID}
	if cacheKey != "" {
		s.mints.put(cacheKey, resp, now, ttl)
	}
	return resp, nil
}

// published returns the tokens.Keys of every published signing key version.
func (s *Server) published(ctx context.Context, now time.Time) ([]*tokens.Key, error) {
	all, err := s.cfg.Keys.List()
	if err != nil {
		return nil, err
	}
	var out []*tokens.Key
	for _, k := range all {
		if k.Purpose != keys.Sign || k.State == keys.PendingDeletion {
			continue
		}
		for _, v := range k.Published(now) {
			tk, err := s.tokenKey(ctx, hsm.KeyID{Name: k.Name, Version: v.Number})
			if err != nil {
				return nil, err
			}
			out = append(out, tk)
		}
	}
	return out, nil
}

// verifier returns a Verifier over the keys published now, and the
// generation it belongs to. It is built again when a key changed or a second
// has passed (versions activate and leave the JWKS as time goes by).
func (s *Server) verifier(ctx context.Context, now time.Time) (*tokens.Verifier, uint64, error) {
	gen := s.cfg.Keys.Generation()
	sec := now.Unix()
	s.vmu.Lock()
	if s.vcache != nil && s.vgen == gen && s.vsec == sec {
		v := s.vcache
		s.vmu.Unlock()
		return v, gen, nil
	}
	s.vmu.Unlock()
	pub, err := s.published(ctx, now)
	if err != nil {
		return nil, 0, err
	}
	v := &tokens.Verifier{Keys: map[string]*tokens.Key{}, Issuer: s.cfg.Tokens.Issuer, Leeway: s.cfg.Tokens.Leeway, Revoked: s.cfg.Revoked.Is}
	for _, k := range pub {
		v.Keys[k.KID] = k
	}
	s.vmu.Lock()
	s.vcache, s.vgen, s.vsec = v, gen, sec
	s.vmu.Unlock()
	return v, gen, nil
}

var failures = []struct {
	err error
	f   keywardv1.TokenFailure
}{
	{tokens.ErrAlgorithm, keywardv1.TokenFailure_TOKEN_FAILURE_ALGORITHM},
	{tokens.ErrHeader, keywardv1.TokenFailure_TOKEN_FAILURE_HEADER},
	{tokens.ErrUnknownKey, keywardv1.TokenFailure_TOKEN_FAILURE_UNKNOWN_KEY},
	{tokens.ErrSignature, keywardv1.TokenFailure_TOKEN_FAILURE_SIGNATURE},
	{tokens.ErrExpired, keywardv1.TokenFailure_TOKEN_FAILURE_EXPIRED},
	{tokens.ErrNotYet, keywardv1.TokenFailure_TOKEN_FAILURE_NOT_YET_VALID},
	{tokens.ErrIssuedAt, keywardv1.TokenFailure_TOKEN_FAILURE_NOT_YET_VALID},
	{tokens.ErrMissing, keywardv1.TokenFailure_TOKEN_FAILURE_MISSING_CLAIM},
	{tokens.ErrAudience, keywardv1.TokenFailure_TOKEN_FAILURE_AUDIENCE},
	{tokens.ErrIssuer, keywardv1.TokenFailure_TOKEN_FAILURE_ISSUER},
	{tokens.ErrRevoked, keywardv1.TokenFailure_TOKEN_FAILURE_REVOKED},
	{tokens.ErrMalformed, keywardv1.TokenFailure_TOKEN_FAILURE_MALFORMED},
}

func (s *Server) VerifyToken(ctx context.Context, r *keywardv1.VerifyTokenRequest) (*keywardv1.VerifyTokenResponse, error) {
	if err := s.allow(ctx, "TokenService.VerifyToken", ""); err != nil {
		return nil, err
	}
	if r.GetAudience() == "" {
		return nil, fmt.Errorf("%w: the audience to verify for is required", errInvalid)
	}
	now := s.cfg.Now()
	v, gen, err := s.verifier(ctx, now)
	if err != nil {
		return nil, err
	}
	got, err := s.verified.Verify(v, publishedGen(gen, v), r.GetToken(), r.GetAudience(), now)
	if err != nil {
		out := &keywardv1.VerifyTokenResponse{Failure: keywardv1.TokenFailure_TOKEN_FAILURE_MALFORMED, Reason: err.Error()}
		for _, f := range failures {
			if errors.Is(err, f.err) {
				out.Failure = f.f
				break
			}
		}
		return out, nil
	}
	claims, err := structpb.NewStruct(got.Custom)
	if err != nil {
		return nil, err
	}
	callFrom(ctx).key, callFrom(ctx).version = got.Key.Name, got.Key.Version
	return &keywardv1.VerifyTokenResponse{Valid: true, Subject: got.Claims.Subject, Audiences: got.Claims.Audience,
		Scopes: got.Scopes, Claims: claims, TokenId: got.Claims.ID, ExpireTime: timestamppb.New(got.Claims.Expiry.Time()), Kid: got.KID}, nil
}

func (s *Server) GetJWKS(ctx context.Context, _ *keywardv1.GetJWKSRequest) (*keywardv1.GetJWKSResponse, error) {
	if err := s.allow(ctx, "TokenService.GetJWKS", ""); err != nil {
		return nil, err
	}
	pub, err := s.published(ctx, s.cfg.Now())
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(tokens.JWKS(pub...))
	if err != nil {
		return nil, err
	}
	return &keywardv1.GetJWKSResponse{Jwks: b}, nil
}

func (s *Server) RevokeToken(ctx context.Context, r *keywardv1.RevokeTokenRequest) (*keywardv1.RevokeTokenResponse, error) {
	// A caller granted revocation on no key at all learns nothing about
	// the token; the grant on its key is checked once it is known.
	if err := s.allow(ctx, "TokenService.RevokeToken", ""); err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	if id := r.GetTokenId(); id != "" {
		if r.GetToken() != "" {
			return nil, fmt.Errorf("%w: give the token or its ID, not both", errInvalid)
		}
		// Without the token, its key and expiry are unknown: revoke for the
		// longest a token can live, on the grant for every key.
		if err := s.policy.Load().AllowEveryKey(subject(callFrom(ctx).caller), "TokenService.RevokeToken"); err != nil {
			return nil, err
		}
		exp := now.Add(s.cfg.Tokens.MaxTTL)
		if err := s.cfg.Revoked.Revoke(id, exp); err != nil {
			return nil, err
		}
		return &keywardv1.RevokeTokenResponse{TokenId: id, ExpireTime: timestamppb.New(exp)}, nil
	}
	v, _, err := s.verifier(ctx, now)
	if err != nil {
		return nil, err
	}
	got, err := v.Own(r.GetToken(), now)
	if errors.Is(err, tokens.ErrRevoked) {
		return nil, fmt.Errorf("%w: the token is revoked already", errInvalid)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: not a valid keyward token (%v); one that does not verify needs no revocation", errInvalid, err)
	}
	c := callFrom(ctx)
	c.key = ""
	if err := s.allow(ctx, "TokenService.RevokeToken", got.Key.Name); err != nil {
		return nil, err
	}
	c.version = got.Key.Version
	exp := got.Claims.Expiry.Time()
	if err := s.cfg.Revoked.Revoke(got.Claims.ID, exp); err != nil {
		return nil, err
	}
	return &keywardv1.RevokeTokenResponse{TokenId: got.Claims.ID, ExpireTime: timestamppb.New(exp)}, nil
}

func (s *Server) ListSigningKeys(ctx context.Context, _ *keywardv1.ListSigningKeysRequest) (*keywardv1.ListSigningKeysResponse, error) {
	if err := s.allow(ctx, "TokenService.ListSigningKeys", ""); err != nil {
		return nil, err
	}
	all, err := s.cfg.Keys.List()
	if err != nil {
		return nil, err
	}
	out := &keywardv1.ListSigningKeysResponse{}
	sub := subject(callFrom(ctx).caller)
	for _, k := range all {
		if k.Purpose == keys.Sign && s.policy.Load().Allow(sub, "KeyService.GetKey", k.Name) == nil {
			out.Keys = append(out.Keys, toKey(k))
		}
	}
	return out, nil
}

// publishedGen names the published key set for the verification cache: the
// keys' generation and the set of key IDs (which changes as time activates
// or removes versions, without a key change).
func publishedGen(gen uint64, v *tokens.Verifier) uint64 {
	kids := make([]string, 0, len(v.Keys))
	for kid := range v.Keys {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	h := sha256.New()
	fmt.Fprint(h, gen, kids)
	var b [8]byte
	copy(b[:], h.Sum(nil))
	return binary.BigEndian.Uint64(b[:])
}
