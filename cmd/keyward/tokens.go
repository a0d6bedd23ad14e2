package main

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(s string) error { *l = append(*l, s); return nil }

// tokenCommand is keyward token mint|verify|revoke|jwks. Tokens are read
// from standard input or a file, never from arguments.
func tokenCommand(e *env, sub string, args []string) error {
	fs := newFlags("token " + sub)
	var (
		key, subject, in, aud, id *string
		ttl                       *time.Duration
		auds, scopes              list
		claims                    = pairs{}
	)
	switch sub {
	case "mint":
		key = fs.String("key", "", "signing key")
		fs.Var(&auds, "audience", "audience (repeatable)")
		fs.Var(&scopes, "scope", "scope (repeatable)")
		fs.Var(claims, "claim", "custom claim k=v (repeatable)")
		ttl = fs.Duration("ttl", 0, "lifetime (default 5m)")
		subject = fs.String("subject", "", "sub claim (default: your own identity; needs a grant)")
	case "verify":
		aud = fs.String("audience", "", "the audience to verify for")
		in = fs.String("in", "", "file holding the token (default standard input)")
	case "revoke":
		in = fs.String("in", "", "file holding the token (default standard input)")
		id = fs.String("id", "", "revoke by token ID (jti) alone, without the token; needs the grant on every key")
	case "jwks":
	default:
		return usageError{fmt.Sprintf("unknown token command %q; run keyward help", sub)}
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	tc := c.Tokens
	readToken := func() (string, error) {
		b, err := e.readInput(*in)
		return strings.TrimSpace(string(b)), err
	}
	switch sub {
	case "mint":
		if *key == "" || len(auds) == 0 {
			return usageError{"token mint needs -key and at least one -audience"}
		}
		req := &keywardv1.MintTokenRequest{KeyName: *key, Audiences: auds, Scopes: scopes, Subject: *subject}
		if *ttl > 0 {
			req.Ttl = durationpb.New(*ttl)
		}
		if len(claims) > 0 {
			m := map[string]any{}
			for k, v := range claims {
				m[k] = v
			}
			if req.Claims, err = structpb.NewStruct(m); err != nil {
				return err
			}
		}
		r, err := tc.MintToken(e.ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		if e.json {
			return e.printJSON(r)
		}
		fmt.Fprintln(e.stdout, r.GetToken())
	case "verify":
		if *aud == "" {
			return usageError{"token verify needs -audience"}
		}
		tok, err := readToken()
		if err != nil {
			return err
		}
		r, err := tc.VerifyToken(e.ctx, &keywardv1.VerifyTokenRequest{Token: tok, Audience: *aud})
		if err != nil {
			return client.Wrap(err)
		}
		if e.json {
			if err := e.printJSON(r); err != nil {
				return err
			}
		} else if r.GetValid() {
			fmt.Fprintf(e.stdout, "valid: sub %s, aud %s, scopes %v, expires %s, kid %s\n", r.GetSubject(), strings.Join(r.GetAudiences(), ","),
				r.GetScopes(), r.GetExpireTime().AsTime().Format(time.RFC3339), r.GetKid())
		}
		if !r.GetValid() {
			return fmt.Errorf("invalid token: %s", r.GetReason())
		}
	case "revoke":
		req := &keywardv1.RevokeTokenRequest{TokenId: *id}
		if *id == "" {
			if req.Token, err = readToken(); err != nil {
				return err
			}
		}
		r, err := tc.RevokeToken(e.ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		fmt.Fprintf(e.stdout, "revoked %s until %s\n", r.GetTokenId(), r.GetExpireTime().AsTime().Format(time.RFC3339))
	case "jwks":
		r, err := tc.GetJWKS(e.ctx, &keywardv1.GetJWKSRequest{})
		if err != nil {
			return client.Wrap(err)
		}
		fmt.Fprintln(e.stdout, string(r.GetJwks()))
	}
	return nil
}

// signingKeyCommand is keyward signing-key list|rotate.
func signingKeyCommand(e *env, sub string, args []string) error {
	switch sub {
	case "rotate":
		return keyCommand(e, "rotate", args)
	case "list":
	default:
		return usageError{fmt.Sprintf("unknown signing-key command %q; run keyward help", sub)}
	}
	if err := parse(newFlags("signing-key list"), args); err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	r, err := c.Tokens.ListSigningKeys(e.ctx, &keywardv1.ListSigningKeysRequest{})
	if err != nil {
		return client.Wrap(err)
	}
	if e.json {
		return e.printJSON(r)
	}
	now := time.Now()
	for _, k := range r.GetKeys() {
		fmt.Fprintf(e.stdout, "%s (%s)\n", k.GetName(), short(k.GetAlgorithm(), "KEY_ALGORITHM_"))
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
			fmt.Fprintf(e.stdout, "  v%d  %-8s published %s", v.GetNumber(), state, v.GetCreateTime().AsTime().Format(time.RFC3339))
			for _, t := range []struct {
				what string
				at   *timestamppb.Timestamp
			}{{"signs", v.GetActivateTime()}, {"retires", v.GetRetireTime()}, {"removed", v.GetRemoveTime()}} {
				if t.at != nil {
					fmt.Fprintf(e.stdout, ", %s %s", t.what, t.at.AsTime().Format(time.RFC3339))
				}
			}
			fmt.Fprintln(e.stdout)
		}
	}
	return nil
}
