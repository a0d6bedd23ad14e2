package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/faults"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/tokens"
)

// TokenService is what the token calls use: daemon/tokens.Service.
type TokenService interface {
	Lifetime(requested time.Duration) (time.Duration, error)
	Mint(ctx context.Context, r tokens.MintRequest) (*tokens.MintedBy, error)
	Verify(ctx context.Context, token, audience string) (*tokens.Verified, error)
	Own(ctx context.Context, token string) (*tokens.Verified, error)
	Revoke(id string, exp time.Time, keyName string) error
	RevokeUnknown(id string) (time.Time, error)
	JWKS(ctx context.Context) ([]byte, error)
}

func (s *Server) MintToken(ctx context.Context, r *keywardv1.MintTokenRequest) (*keywardv1.MintTokenResponse, error) {
	c := callFrom(ctx)
	if err := s.allow(ctx, "TokenService.MintToken", r.GetKeyName()); err != nil {
		return nil, err
	}
	var asked time.Duration
	if r.GetTtl() != nil {
		if asked = r.GetTtl().AsDuration(); asked <= 0 {
			return nil, fmt.Errorf("%w: a lifetime of %v; give a positive ttl, or none for the default", errInvalid, asked)
		}
	}
	ttl, err := s.cfg.Tokens.Lifetime(asked)
	if err != nil {
		return nil, err
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
	m, err := s.cfg.Tokens.Mint(ctx, tokens.MintRequest{Key: r.GetKeyName(), Subject: sub, Audiences: r.GetAudiences(),
		Scopes: r.GetScopes(), Custom: custom, TTL: ttl,
		Caller: fmt.Sprintf("%d:%d:%s", c.caller.UID, c.caller.GID, c.caller.ExeSHA256)})
	if m != nil {
		c.version = m.Key.Version
	}
	if err != nil {
		return nil, err
	}
	return &keywardv1.MintTokenResponse{Token: m.Token, TokenId: m.ID, ExpireTime: timestamppb.New(m.Expires),
		KeyName: m.Key.Name, KeyVersion: m.Key.Version, Kid: m.KID}, nil
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
	got, err := s.cfg.Tokens.Verify(ctx, r.GetToken(), r.GetAudience())
	if err != nil {
		out := &keywardv1.VerifyTokenResponse{Failure: keywardv1.TokenFailure_TOKEN_FAILURE_MALFORMED, Reason: err.Error()}
		matched := false
		for _, f := range failures {
			if errors.Is(err, f.err) {
				out.Failure, matched = f.f, true
				break
			}
		}
		if !matched && faults.Of(err) != faults.None {
			return nil, err // not the token's fault: the keys could not be read
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
	b, err := s.cfg.Tokens.JWKS(ctx)
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
	if id := r.GetTokenId(); id != "" {
		if r.GetToken() != "" {
			return nil, fmt.Errorf("%w: give the token or its ID, not both", errInvalid)
		}
		// Without the token, its key and expiry are unknown: revoke for the
		// longest a token can live, on the grant for every key.
		if err := s.policy.Load().AllowEveryKey(subject(callFrom(ctx).caller), "TokenService.RevokeToken"); err != nil {
			return nil, err
		}
		exp, err := s.cfg.Tokens.RevokeUnknown(id)
		if err != nil {
			return nil, err
		}
		return &keywardv1.RevokeTokenResponse{TokenId: id, ExpireTime: timestamppb.New(exp)}, nil
	}
	got, err := s.cfg.Tokens.Own(ctx, r.GetToken())
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
	if err := s.cfg.Tokens.Revoke(got.Claims.ID, exp, got.Key.Name); err != nil {
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
			out.Keys = append(out.Keys, s.toKey(k))
		}
	}
	return out, nil
}
