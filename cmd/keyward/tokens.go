package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// The token verbs: a token is read from standard input or a file, never
// from arguments.

func tokenMint(f *flagSet) action {
	key := f.String("key", "", "the signing key")
	auds := f.StringArray("audience", nil, "audience (repeatable)")
	scopes := f.StringArray("scope", nil, "scope (repeatable)")
	claims := f.Pairs("claim", "custom claim k=v (repeatable)")
	ttl := f.Duration("ttl", 0, "lifetime (default 5m)")
	subject := f.String("subject", "", "sub claim (default: your own identity; needs a grant)")
	f.Required("key", "audience")
	return func(e *env, _ []string) error {
		req := &keywardv1.MintTokenRequest{KeyName: *key, Audiences: *auds, Scopes: *scopes, Subject: *subject}
		if *ttl > 0 {
			req.Ttl = durationpb.New(*ttl)
		}
		if len(claims) > 0 {
			m := map[string]any{}
			for k, v := range claims {
				m[k] = v
			}
			var err error
			if req.Claims, err = structpb.NewStruct(m); err != nil {
				return err
			}
		}
		r, err := e.api.Tokens.MintToken(e.ctx, req)
		if err != nil {
			return err
		}
		return e.showf(r, "%s\n", r.GetToken())
	}
}

// readToken reads a token from the file in, or standard input.
func (e *env) readToken(in string) (string, error) {
	b, err := e.readInput(in)
	return strings.TrimSpace(string(b)), err
}

func tokenVerify(f *flagSet) action {
	aud := f.String("audience", "", "the audience to verify for")
	in := f.String("in", "", "file holding the token (default standard input)")
	f.Required("audience")
	return func(e *env, _ []string) error {
		tok, err := e.readToken(*in)
		if err != nil {
			return err
		}
		r, err := e.api.Tokens.VerifyToken(e.ctx, &keywardv1.VerifyTokenRequest{Token: tok, Audience: *aud})
		if err != nil {
			return err
		}
		err = e.show(r, func(w io.Writer) error {
			if !r.GetValid() {
				return nil
			}
			_, err := fmt.Fprintf(w, "valid: sub %s, aud %s, scopes %v, expires %s, kid %s\n", r.GetSubject(), strings.Join(r.GetAudiences(), ","),
				r.GetScopes(), r.GetExpireTime().AsTime().Format(time.RFC3339), r.GetKid())
			return err
		})
		if err == nil && !r.GetValid() {
			err = fmt.Errorf("invalid token: %s", r.GetReason())
		}
		return err
	}
}

func tokenRevoke(f *flagSet) action {
	in := f.String("in", "", "file holding the token (default standard input)")
	id := f.String("id", "", "revoke by token ID (jti) alone, without the token; needs the grant on every key")
	return func(e *env, _ []string) error {
		req := &keywardv1.RevokeTokenRequest{TokenId: *id}
		if *id == "" {
			var err error
			if req.Token, err = e.readToken(*in); err != nil {
				return err
			}
		}
		r, err := e.api.Tokens.RevokeToken(e.ctx, req)
		if err != nil {
			return err
		}
		return e.showf(r, "revoked %s until %s\n", r.GetTokenId(), r.GetExpireTime().AsTime().Format(time.RFC3339))
	}
}

// tokenJWKS prints the JWKS, which is JSON (RFC 7517) in either output.
func tokenJWKS(f *flagSet) action {
	return func(e *env, _ []string) error {
		r, err := e.api.Tokens.GetJWKS(e.ctx, &keywardv1.GetJWKSRequest{})
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(e.stdout, string(r.GetJwks()))
		return err
	}
}

func signingKeyList(f *flagSet) action {
	return func(e *env, _ []string) error {
		r, err := e.api.Tokens.ListSigningKeys(e.ctx, &keywardv1.ListSigningKeysRequest{})
		if err != nil {
			return err
		}
		return e.show(messages(r.GetKeys()), func(w io.Writer) error { return printSigningKeys(w, r.GetKeys(), time.Now()) })
	}
}

func printSigningKeys(w io.Writer, keys []*keywardv1.Key, now time.Time) error {
	for _, k := range keys {
		fmt.Fprintf(w, "%s (%s)\n", k.GetName(), short(k.GetAlgorithm(), "KEY_ALGORITHM_"))
		for _, v := range k.GetVersions() {
			state := "active"
			switch {
			case v.GetRemoveTime() != nil && !now.Before(v.GetRemoveTime().AsTime()):
				state = "removed"
			case v.GetRetireTime() != nil && !now.Before(v.GetRetireTime().AsTime()):
				state = "retired"
			case v.GetActivateTime() != nil && now.Before(v.GetActivateTime().AsTime()):
				state = "pending"
			}
			fmt.Fprintf(w, "  v%d  %-8s published %s", v.GetNumber(), state, v.GetCreateTime().AsTime().Format(time.RFC3339))
			for _, t := range []struct {
				what string
				at   *timestamppb.Timestamp
			}{{"signs", v.GetActivateTime()}, {"retires", v.GetRetireTime()}, {"removed", v.GetRemoveTime()}} {
				if t.at != nil {
					fmt.Fprintf(w, ", %s %s", t.what, t.at.AsTime().Format(time.RFC3339))
				}
			}
			fmt.Fprintln(w)
		}
	}
	return nil
}
