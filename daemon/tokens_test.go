package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

func tokenPolicy() string {
	return fmt.Sprintf(`version: 1
roles:
  app:
    permissions:
      - operations: ["TokenService.*", "KeyService.*"]
        keys: [jwt]
    tokens:
      audiences: [orders]
      scopes: ["orders:*"]
      claims: [tenant]
      max_ttl: 10m
bindings:
  - role: app
    callers:
      - uid: %d
`, os.Getuid())
}

// TestTokenService: tokens minted over the socket hold what the caller's
// grant allows and nothing more, verify with keywardd and with go-jose
// against the JWKS, and stay revoked across a restart.
func TestTokenService(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(tokenPolicy()))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	tc := keywardv1.NewTokenServiceClient(in.Conn)
	claims, _ := structpb.NewStruct(map[string]any{"tenant": "42"})
	m, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:read"}, Claims: claims})
	if err != nil {
		t.Fatal(err)
	}
	if ttl := time.Until(m.ExpireTime.AsTime()); ttl < 4*time.Minute || ttl > 5*time.Minute {
		t.Fatalf("default lifetime %v", ttl)
	}
	v, err := tc.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: m.Token, Audience: "orders"})
	if err != nil || !v.Valid || v.Subject != fmt.Sprintf("uid:%d", os.Getuid()) || v.Claims.AsMap()["tenant"] != "42" || v.Scopes[0] != "orders:read" || v.Kid != m.Kid {
		t.Fatalf("VerifyToken = %v, %v", v, err)
	}
	if v, _ := tc.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: m.Token, Audience: "billing"}); v.Valid || v.Failure != keywardv1.TokenFailure_TOKEN_FAILURE_AUDIENCE {
		t.Fatalf("another audience: %v", v)
	}

	// The same request again is served from the cache (half the lifetime),
	// a different one is not, and a revoked token is never served again.
	again, _ := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:read"}, Claims: claims})
	other, _ := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}})
	if again.GetToken() != m.Token || other.GetToken() == m.Token {
		t.Fatal("the mint cache did not reuse an identical request's token, or reused it for another")
	}
	cached, _ := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:write"}})
	if _, err := tc.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: cached.Token}); err != nil {
		t.Fatal(err)
	}
	fresh, _ := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"orders:write"}})
	if fresh.GetToken() == cached.Token {
		t.Fatal("the mint cache served a revoked token")
	}

	// Independent verification against the JWKS.
	jr, err := tc.GetJWKS(ctx, &keywardv1.GetJWKSRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jr.Jwks, &set); err != nil || len(set.Key(m.Kid)) != 1 {
		t.Fatalf("JWKS %s: %v", jr.Jwks, err)
	}
	tok, _ := jwt.ParseSigned(m.Token, []jose.SignatureAlgorithm{jose.ES256})
	var c jwt.Claims
	if err := tok.Claims(set.Key(m.Kid)[0].Key, &c); err != nil || c.ID != m.TokenId {
		t.Fatalf("go-jose with the JWKS: %v", err)
	}

	// Beyond the grant or the ceiling.
	for _, tc2 := range []struct {
		req  *keywardv1.MintTokenRequest
		code codes.Code
		msg  string
	}{
		{&keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"admin"}}, codes.PermissionDenied, `a token for audience "admin"`},
		{&keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Scopes: []string{"billing:read"}}, codes.PermissionDenied, `scope "billing:read"`},
		{&keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Ttl: durationpb.New(20 * time.Minute)}, codes.PermissionDenied, "at most 10m0s"},
		{&keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Ttl: durationpb.New(2 * time.Hour)}, codes.InvalidArgument, "up to 1h0m0s"},
		{&keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}, Subject: "root"}, codes.PermissionDenied, "subject of its choosing"},
		{&keywardv1.MintTokenRequest{KeyName: "other", Audiences: []string{"orders"}}, codes.PermissionDenied, `TokenService.MintToken on key "other"`},
	} {
		_, err := tc.MintToken(ctx, tc2.req)
		wantCode(t, err, tc2.code, tc2.msg)
	}

	// Rotation: the new version is published at once and signs later.
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "jwt"}); err != nil {
		t.Fatal(err)
	}
	jr, _ = tc.GetJWKS(ctx, &keywardv1.GetJWKSRequest{})
	json.Unmarshal(jr.Jwks, &set)
	m2, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}})
	if err != nil || len(set.Keys) != 2 || m2.KeyVersion != 1 {
		t.Fatalf("after rotation: %d keys published, minted with v%d (%v); want 2 and v1 until v2 activates", len(set.Keys), m2.KeyVersion, err)
	}
	ls, err := tc.ListSigningKeys(ctx, &keywardv1.ListSigningKeysRequest{})
	if err != nil || len(ls.Keys) != 1 || len(ls.Keys[0].Versions) != 2 || ls.Keys[0].Versions[0].RetireTime == nil || ls.Keys[0].Versions[1].ActivateTime == nil {
		t.Fatalf("ListSigningKeys = %v, %v", ls, err)
	}

	// Revocation, across a restart.
	if _, err := tc.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: m.Token}); err != nil {
		t.Fatal(err)
	}
	in.Stop()
	in.Restart()
	tc = keywardv1.NewTokenServiceClient(in.Conn)
	if v, _ := tc.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: m.Token, Audience: "orders"}); v.Valid || v.Failure != keywardv1.TokenFailure_TOKEN_FAILURE_REVOKED {
		t.Fatalf("a revoked token after a restart: %v", v)
	}
	if v, _ := tc.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: m2.Token, Audience: "orders"}); !v.Valid {
		t.Fatalf("another token after the restart: %v", v)
	}
	_, err = tc.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: "not.a.token"})
	wantCode(t, err, codes.InvalidArgument, "needs no revocation")
	// By ID alone needs the grant on every key; this caller has it on jwt only.
	_, err = tc.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{TokenId: m2.TokenId})
	wantCode(t, err, codes.PermissionDenied, `TokenService.RevokeToken on key "*"`)
	in.Stop()
	auditLog, _ := os.ReadFile(in.Config.DataDir + "/audit.log")
	if !strings.Contains(string(auditLog), `"op":"TokenService.MintToken","key":"jwt","version":1`) || !strings.Contains(string(auditLog), `"op":"TokenService.RevokeToken","key":"jwt"`) {
		t.Fatal("token calls are not audited with their key")
	}
	if strings.Contains(string(auditLog), m.Token) {
		t.Fatal("a token reached the audit log")
	}
}
