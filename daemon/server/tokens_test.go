package server

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/tokens"
)

// web mints and verifies tokens under the jwt* keys, for the audience
// orders only, with the scope orders:read and the claim tenant, for 15
// minutes at most. admin may call everything but has no token grant.
var tokensPolicy = withAdmin(`  web:
    permissions:
      - operations: ["TokenService.*"]
        keys: ["jwt*"]
    tokens:
      audiences: [orders]
      scopes: ["orders:read"]
      claims: [tenant]
      max_ttl: 15m
`, `  - role: web
    callers: [{uid: 2000}]
`)

const web = 2000

// mint is a token web minted under key, before the cases run.
func mint(t *testing.T, ts *testServer, key string) string {
	t.Helper()
	m, err := ts.tokens.Mint(context.Background(), tokens.MintRequest{Key: key, Subject: "uid:2000", Audiences: []string{"orders"}, TTL: 10 * time.Minute, Caller: "2000:2000:"})
	if err != nil {
		t.Fatal(err)
	}
	return m.Token
}

// verdict checks VerifyToken's answer: valid, or the failure it names.
func verdict(valid bool, f keywardv1.TokenFailure) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
		t.Helper()
		r := resp.(*keywardv1.VerifyTokenResponse)
		if r.GetValid() != valid || r.GetFailure() != f {
			t.Errorf("valid %v, failure %v (%s); want %v, %v", r.GetValid(), r.GetFailure(), r.GetReason(), valid, f)
		}
	}
}

func TestTokenService(t *testing.T) {
	ts := newTestServer(t, tokensPolicy)
	mustCreate(t, ts, keys.Spec{Name: "jwt", Purpose: keys.Sign}, keys.Spec{Name: "jwt-off", Purpose: keys.Sign},
		keys.Spec{Name: "jwt-enc", Purpose: keys.Encrypt}, keys.Spec{Name: "other-jwt", Purpose: keys.Sign})
	if _, err := ts.keys.SetEnabled("jwt-off", false); err != nil {
		t.Fatal(err)
	}
	good, doomed, byID := mint(t, ts, "jwt"), mint(t, ts, "jwt"), mint(t, ts, "jwt")
	ttl := func(d time.Duration) *durationpb.Duration { return durationpb.New(d) }
	tenant, _ := structpb.NewStruct(map[string]any{"tenant": "a"})
	run(t, ts, []serviceCase{
		{name: "mint", uid: web, method: "TokenService/MintToken",
			req: &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:read"},
				Claims: tenant, Ttl: ttl(10 * time.Minute)},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "jwt"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				r := resp.(*keywardv1.MintTokenResponse)
				v, err := ts.tokens.Verify(context.Background(), r.GetToken(), "orders")
				if err != nil || v.Claims.Subject != "uid:2000" || v.Custom["tenant"] != "a" || r.GetKeyVersion() != 1 || rec.Version != 1 {
					t.Errorf("minted %+v (%v), version %d, audited version %d", v, err, r.GetKeyVersion(), rec.Version)
				}
				if strings.Contains(rec.Detail, r.GetToken()) {
					t.Error("the token is in the audit record")
				}
			}},
		{name: "mint on a key not granted", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "other-jwt", Audiences: []string{"orders"}},
			code: codes.PermissionDenied, msg: `not granted TokenService.MintToken on key "other-jwt"`,
			audit: wantAudit{outcome: "denied", key: "other-jwt"}},
		{name: "mint for an audience not granted", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"billing"}},
			code: codes.PermissionDenied, msg: `not granted a token for audience "billing"`,
			audit: wantAudit{outcome: "denied", key: "jwt", detail: "billing"}},
		{name: "mint with no token grant", uid: admin, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}},
			code: codes.PermissionDenied, msg: `not granted a token for audience "orders"`,
			audit: wantAudit{outcome: "denied", key: "jwt"}},
		{name: "mint with a scope not granted", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:write"}},
			code: codes.PermissionDenied, msg: `not granted a token with scope "orders:write"`,
			audit: wantAudit{outcome: "denied", key: "jwt"}},
		{name: "mint naming its subject", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Subject: "alice"},
			code: codes.PermissionDenied, msg: "a subject of its choosing",
			audit: wantAudit{outcome: "denied", key: "jwt"}},
		{name: "mint for longer than the role allows", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Ttl: ttl(20 * time.Minute)},
			code: codes.PermissionDenied, msg: "a token living 20m0s (at most 15m0s)",
			audit: wantAudit{outcome: "denied", key: "jwt"}},
		{name: "mint for longer than keywardd mints", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Ttl: ttl(2 * time.Hour)},
			code: codes.InvalidArgument, msg: "keywardd mints tokens of up to 1h0m0s",
			audit: wantAudit{outcome: "error", key: "jwt"}},
		{name: "mint with a negative lifetime", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Ttl: ttl(-time.Minute)},
			code: codes.InvalidArgument, msg: "give a positive ttl, or none for the default",
			audit: wantAudit{outcome: "error", key: "jwt"}},
		{name: "mint under a disabled key", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt-off", Audiences: []string{"orders"}},
			code: codes.FailedPrecondition, msg: "disabled", audit: wantAudit{outcome: "error", key: "jwt-off"}},
		{name: "mint under an encryption key", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt-enc", Audiences: []string{"orders"}},
			code: codes.FailedPrecondition, msg: "jwt-enc", audit: wantAudit{outcome: "error", key: "jwt-enc"}},
		{name: "mint under no key", uid: web, method: "TokenService/MintToken",
			req:  &keywardv1.MintTokenRequest{KeyName: "jwt-none", Audiences: []string{"orders"}},
			code: codes.NotFound, msg: "jwt-none", audit: wantAudit{outcome: "error", key: "jwt-none"}},
		{name: "verify", uid: web, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: good, Audience: "orders"},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "jwt"}, after: verdict(true, keywardv1.TokenFailure_TOKEN_FAILURE_UNSPECIFIED)},
		{name: "verify for another audience", uid: web, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: good, Audience: "billing"},
			code: codes.OK, audit: wantAudit{outcome: "ok"}, after: verdict(false, keywardv1.TokenFailure_TOKEN_FAILURE_AUDIENCE)},
		{name: "verify what is no token", uid: web, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: "not.a.token", Audience: "orders"},
			code: codes.OK, audit: wantAudit{outcome: "ok"}, after: verdict(false, keywardv1.TokenFailure_TOKEN_FAILURE_MALFORMED)},
		{name: "verify without an audience", uid: web, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: good},
			code: codes.InvalidArgument, msg: "the audience to verify for is required", audit: wantAudit{outcome: "error"}},
		{name: "verify denied", uid: stranger, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: good, Audience: "orders"},
			code: codes.PermissionDenied, msg: "not granted TokenService.VerifyToken", audit: wantAudit{outcome: "denied"}},
		{name: "JWKS", uid: web, method: "TokenService/GetJWKS",
			req: &keywardv1.GetJWKSRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if b := string(resp.(*keywardv1.GetJWKSResponse).GetJwks()); !strings.Contains(b, `"keys"`) || !strings.Contains(b, `"kid"`) {
					t.Errorf("JWKS %s", b)
				}
			}},
		{name: "list signing keys: only those the caller may get", uid: web, method: "TokenService/ListSigningKeys",
			req: &keywardv1.ListSigningKeysRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if ks := resp.(*keywardv1.ListSigningKeysResponse).GetKeys(); len(ks) != 0 {
					t.Errorf("listed %d keys to a caller granted KeyService.GetKey on none", len(ks))
				}
			}},
		{name: "list signing keys", uid: admin, method: "TokenService/ListSigningKeys",
			req: &keywardv1.ListSigningKeysRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if got := keyNames(resp.(*keywardv1.ListSigningKeysResponse).GetKeys()); got != "jwt jwt-off other-jwt" {
					t.Errorf("listed %s; want the signing keys jwt jwt-off other-jwt", got)
				}
			}},
		{name: "revoke", uid: web, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{Token: doomed}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "jwt"},
			after: func(t *testing.T, ts *testServer, _ any, rec audit.Record) {
				if _, err := ts.tokens.Verify(context.Background(), doomed, "orders"); err == nil || rec.Version != 1 {
					t.Errorf("the revoked token verifies (%v), audited version %d", err, rec.Version)
				}
			}},
		{name: "verify a revoked token", uid: web, method: "TokenService/VerifyToken",
			req:  &keywardv1.VerifyTokenRequest{Token: doomed, Audience: "orders"},
			code: codes.OK, audit: wantAudit{outcome: "ok"}, after: verdict(false, keywardv1.TokenFailure_TOKEN_FAILURE_REVOKED)},
		{name: "revoke again", uid: web, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{Token: doomed}, code: codes.InvalidArgument, msg: "the token is revoked already",
			audit: wantAudit{outcome: "error"}},
		{name: "revoke what is no token", uid: web, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{Token: "not.a.token"}, code: codes.InvalidArgument,
			msg: "not a valid keyward token", audit: wantAudit{outcome: "error"}},
		{name: "revoke a token and an ID", uid: admin, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{Token: byID, TokenId: "some-id"}, code: codes.InvalidArgument,
			msg: "give the token or its ID, not both", audit: wantAudit{outcome: "error"}},
		{name: "revoke by ID without the grant on every key", uid: web, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{TokenId: "some-id"}, code: codes.PermissionDenied,
			msg: "TokenService.RevokeToken", audit: wantAudit{outcome: "denied"}},
		{name: "revoke by ID", uid: admin, method: "TokenService/RevokeToken",
			req: &keywardv1.RevokeTokenRequest{TokenId: tokenID(t, ts, byID)}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				if _, err := ts.tokens.Verify(context.Background(), byID, "orders"); err == nil {
					t.Error("the token revoked by ID verifies")
				}
			}},
	})
}

// tokenID is a token's ID (jti).
func tokenID(t *testing.T, ts *testServer, token string) string {
	t.Helper()
	v, err := ts.tokens.Verify(context.Background(), token, "orders")
	if err != nil {
		t.Fatal(err)
	}
	return v.Claims.ID
}
