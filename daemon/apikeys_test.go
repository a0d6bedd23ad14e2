package daemon_test

import (
	"context"
	"crypto/rand"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

type apiKeyCase struct {
	name string
	key  string
	req  *keywardv1.VerifyAPIKeyRequest
	want keywardv1.APIKeyCode
}

func verifyCode(t *testing.T, ac keywardv1.APIKeyServiceClient, key string, r *keywardv1.VerifyAPIKeyRequest, want keywardv1.APIKeyCode) *keywardv1.VerifyAPIKeyResponse {
	t.Helper()
	if r == nil {
		r = &keywardv1.VerifyAPIKeyRequest{Environment: "prod", Permissions: []string{"orders:read"}}
	}
	r.Key = key
	resp, err := ac.VerifyAPIKey(context.Background(), r)
	if err != nil {
		t.Fatalf("VerifyAPIKey: %v", err)
	}
	if resp.Code != want {
		t.Fatalf("VerifyAPIKey = %v (%s), want %v", resp.Code, resp.Reason, want)
	}
	return resp
}

// TestAPIKeysEndToEnd: the life of an API key through keywardd's socket,
// every verdict, and nothing secret in the audit log or the logs.
func TestAPIKeysEndToEnd(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	var secrets []string
	create := func(r *keywardv1.CreateAPIKeyRequest) (string, *keywardv1.APIKey) {
		t.Helper()
		if r.Owner == "" {
			r.Owner = "team-a"
		}
		if r.Name == "" {
			r.Name = "orders-api"
		}
		if r.Environment == "" {
			r.Environment = "prod"
		}
		if r.Permissions == nil {
			r.Permissions = []string{"orders:read", "orders:write"}
		}
		resp, err := ac.CreateAPIKey(ctx, r)
		if err != nil {
			t.Fatalf("CreateAPIKey: %v", err)
		}
		secrets = append(secrets, resp.Secret)
		return resp.Secret, resp.Key
	}

	key, k := create(&keywardv1.CreateAPIKeyRequest{Metadata: map[string]string{"customer": "42"}, Tags: []string{"ci"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 10, Per: durationpb.New(time.Minute), Burst: 3}, {Limit: 1000, Per: durationpb.New(time.Hour), Burst: 1000}}})
	if !strings.HasPrefix(key, "kw_") || !strings.HasPrefix(k.Id, "ak_") || k.State != keywardv1.APIKeyState_API_KEY_STATE_ACTIVE || len(k.Secrets) != 1 {
		t.Fatalf("created %q...: %v", key[:3], k)
	}
	ok := verifyCode(t, ac, key, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	if ok.KeyId != k.Id || ok.Owner != "team-a" || ok.Metadata["customer"] != "42" || len(ok.Permissions) != 2 ||
		len(ok.RateLimits) != 2 || ok.RateLimits[0].Remaining != 2 || ok.RateLimits[1].Remaining != 999 || ok.RetryAfter != nil {
		t.Fatalf("VALID answer: %v", ok)
	}
	verifyCode(t, ac, key, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	limited := verifyCode(t, ac, key, &keywardv1.VerifyAPIKeyRequest{Environment: "prod", Cost: 2}, keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED)
	if limited.RetryAfter == nil || limited.RetryAfter.AsDuration() <= 0 || !limited.RateLimits[0].Refused || limited.RateLimits[1].Refused {
		t.Fatalf("RATE_LIMITED answer: %v", limited)
	}
	// All or nothing: the refused request took nothing from the hour layer.
	if r := verifyCode(t, ac, key, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID); r.RateLimits[1].Remaining != 997 || !r.NearLimit {
		t.Fatalf("the hour layer has %d left after 3 accepted; a refused request took from it", r.RateLimits[1].Remaining)
	}

	typo := []byte(key)
	typo[10] ^= 1
	unlimited, _ := create(&keywardv1.CreateAPIKeyRequest{Unlimited: true, AllowedIps: []string{"192.0.2.0/24", "2001:db8::/48"}})
	quota, _ := create(&keywardv1.CreateAPIKeyRequest{Quota: &keywardv1.Quota{Remaining: 1}})
	beforeExpiring := time.Now()
	expiring, _ := create(&keywardv1.CreateAPIKeyRequest{Ttl: durationpb.New(time.Second)})
	verifyCode(t, ac, quota, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	if time.Since(beforeExpiring) < 500*time.Millisecond { // else too late to tell: the machine is slow
		verifyCode(t, ac, expiring, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	}
	unknown, err := apikeys.Generate(apikeys.DefaultPrefix, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []apiKeyCase{
		{"typo", string(typo), nil, keywardv1.APIKeyCode_API_KEY_CODE_MALFORMED},
		{"unknown", unknown, nil, keywardv1.APIKeyCode_API_KEY_CODE_NOT_FOUND},
		{"wrong environment", unlimited, &keywardv1.VerifyAPIKeyRequest{Environment: "staging", SourceIp: "192.0.2.9"}, keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT},
		{"forbidden", unlimited, &keywardv1.VerifyAPIKeyRequest{Environment: "prod", SourceIp: "192.0.2.9", Permissions: []string{"users:delete"}}, keywardv1.APIKeyCode_API_KEY_CODE_FORBIDDEN},
		{"other address", unlimited, &keywardv1.VerifyAPIKeyRequest{Environment: "prod", SourceIp: "198.51.100.1"}, keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED},
		{"no address", unlimited, &keywardv1.VerifyAPIKeyRequest{Environment: "prod"}, keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED},
		{"v6 allowed", unlimited, &keywardv1.VerifyAPIKeyRequest{Environment: "prod", SourceIp: "2001:db8:0:1::5"}, keywardv1.APIKeyCode_API_KEY_CODE_VALID},
		{"quota", quota, nil, keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED},
	} {
		t.Run(c.name, func(t *testing.T) { verifyCode(t, ac, c.key, c.req, c.want) })
	}
	other, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "x", Name: "x", Environment: "prod", Permissions: []string{"read-only"}})
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, other.Secret)
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: other.Key.Id}); err != nil {
		t.Fatal(err)
	}
	verifyCode(t, ac, other.Secret, &keywardv1.VerifyAPIKeyRequest{Environment: "prod"}, keywardv1.APIKeyCode_API_KEY_CODE_REVOKED)
	if _, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: k.Id, State: keywardv1.APIKeyState_API_KEY_STATE_DISABLED},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"state"}}}); err != nil {
		t.Fatal(err)
	}
	verifyCode(t, ac, key, nil, keywardv1.APIKeyCode_API_KEY_CODE_DISABLED)
	time.Sleep(time.Until(time.Now().Add(1100 * time.Millisecond)))
	verifyCode(t, ac, expiring, nil, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED)

	// Rotation: both secrets work in the overlap; with none, the old one
	// stops at once.
	rk, rrec := create(&keywardv1.CreateAPIKeyRequest{})
	rot, err := ac.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: rrec.Id, Risk: "high"})
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, rot.Secret)
	if d := time.Until(rot.OldSecretNotAfter.AsTime()); d < 23*time.Hour || d > 24*time.Hour {
		t.Errorf("a high-risk rotation keeps the old secret for %v, want 24h", d)
	}
	verifyCode(t, ac, rk, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	verifyCode(t, ac, rot.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	rot2, err := ac.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: rrec.Id, Overlap: durationpb.New(0)})
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, rot2.Secret)
	verifyCode(t, ac, rk, nil, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED)
	verifyCode(t, ac, rot.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED)
	verifyCode(t, ac, rot2.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)

	// Bulk revocation by tag: a dry run counts, the real one refuses them
	// all from the next verify.
	var tagged []string
	for range 20 {
		s, _ := create(&keywardv1.CreateAPIKeyRequest{Tags: []string{"leaked"}})
		tagged = append(tagged, s)
	}
	dry, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Tag: "leaked", DryRun: true})
	if err != nil || dry.Count != 20 || !dry.DryRun {
		t.Fatalf("dry run: %v, %v", dry, err)
	}
	verifyCode(t, ac, tagged[0], nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	if n, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Tag: "leaked"}); err != nil || n.Count != 20 {
		t.Fatalf("RevokeAPIKeys: %v, %v", n, err)
	}
	for _, s := range tagged {
		verifyCode(t, ac, s, nil, keywardv1.APIKeyCode_API_KEY_CODE_REVOKED)
	}

	// Get, List and Usage: data, never a secret.
	g, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: k.Id})
	if err != nil || g.Key.Owner != "team-a" || g.Key.State != keywardv1.APIKeyState_API_KEY_STATE_DISABLED {
		t.Fatalf("GetAPIKey: %v, %v", g, err)
	}
	page, err := ac.ListAPIKeys(ctx, &keywardv1.ListAPIKeysRequest{Tag: "leaked", PageSize: 15})
	if err != nil || len(page.Keys) != 15 || page.NextPageToken == "" {
		t.Fatalf("ListAPIKeys page 1: %d keys, next %q, %v", len(page.Keys), page.NextPageToken, err)
	}
	page, err = ac.ListAPIKeys(ctx, &keywardv1.ListAPIKeysRequest{Tag: "leaked", PageSize: 15, PageToken: page.NextPageToken})
	if err != nil || len(page.Keys) != 5 || page.NextPageToken != "" {
		t.Fatalf("ListAPIKeys page 2: %d keys, next %q, %v", len(page.Keys), page.NextPageToken, err)
	}
	u, err := ac.GetAPIKeyUsage(ctx, &keywardv1.GetAPIKeyUsageRequest{Id: k.Id, Window: durationpb.New(time.Hour)})
	if err != nil || u.Total.Counts["VALID"] != 3 || u.Total.Counts["RATE_LIMITED"] != 1 || u.Total.Counts["DISABLED"] != 1 || u.LastUsedTime == nil {
		t.Fatalf("GetAPIKeyUsage: %v, %v", u, err)
	}

	// Bad requests: clear errors, and the daemon keeps serving.
	for _, c := range []struct {
		call func() error
		code codes.Code
		msg  string
	}{
		{func() error { _, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key}); return err }, codes.InvalidArgument, "environment is required"},
		{func() error {
			_, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod", SourceIp: "10.0.0.1:443"})
			return err
		}, codes.InvalidArgument, "source_ip"},
		{func() error {
			_, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "a", Name: "b", Environment: "prod", Permissions: []string{"read-only"}, AllowedIps: []string{"10.0.0.1/8"}})
			return err
		}, codes.InvalidArgument, "write 10.0.0.0/8"},
		{func() error {
			_, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "a", Name: "b", Environment: "prod"})
			return err
		}, codes.InvalidArgument, "at least one permission"},
		{func() error {
			_, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: k.Id}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"owner"}}})
			return err
		}, codes.InvalidArgument, `path "owner"`},
		{func() error { _, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: key}); return err }, codes.InvalidArgument, "not a key ID"},
		{func() error {
			_, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: "ak_000000000000000000000000"})
			return err
		}, codes.NotFound, "no such key"},
		{func() error { _, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{}); return err }, codes.InvalidArgument, "name an owner, tag or environment, or all keys"},
		{func() error {
			_, err := ac.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: rrec.Id, Risk: "extreme"})
			return err
		}, codes.InvalidArgument, "use high"},
	} {
		wantCode(t, c.call(), c.code, c.msg)
	}
	verifyCode(t, ac, rot2.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)

	// The canary: no secret in the audit log, the logs, or any file keywardd
	// wrote.
	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}
	rep := verifyAudit(t, in)
	if rep.Records < 60 {
		t.Errorf("the audit log has %d records, want one per call", rep.Records)
	}
	files := map[string]string{"logs": in.Log.String()}
	filepath.Walk(in.Config.DataDir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			files[p] = string(b)
		}
		return nil
	})
	audited, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if !strings.Contains(string(audited), `"api_key":"`+k.Id+`"`) || !strings.Contains(string(audited), `"result":"RATE_LIMITED"`) {
		t.Errorf("the audit log does not name the API key and verdicts")
	}
	if !strings.Contains(string(audited), `tag \"leaked\"`) {
		t.Errorf("the audit record of the bulk revocation does not say what it revoked")
	}
	for _, s := range secrets {
		// The random part alone: a secret must not appear even cut up.
		for name, text := range files {
			if strings.Contains(text, s[3:30]) {
				t.Errorf("a secret appears in %s", name)
			}
		}
	}
}

// TestAPIKeysPolicy: the policy grants API key operations on owners; a
// caller sees only its owners' keys, and may widen a key only if it may
// issue that owner's keys.
func TestAPIKeysPolicy(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	mk := func(owner string) (string, string) {
		r, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		return r.Secret, r.Key.Id
	}
	aKey, aID := mk("team-a")
	bKey, bID := mk("team-b")

	os.WriteFile(in.Config.PolicyFile, []byte(uidPolicy(`      - operations: [APIKeyService.VerifyAPIKey, APIKeyService.GetAPIKey, APIKeyService.ListAPIKeys, APIKeyService.UpdateAPIKey, APIKeyService.RevokeAPIKeys]
        keys: ["team-a"]`)), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Contains(in.Log.String(), "policy reloaded") })

	verifyCode(t, ac, aKey, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	if r := verifyCode(t, ac, bKey, nil, keywardv1.APIKeyCode_API_KEY_CODE_NOT_FOUND); r.KeyId != "" || r.Owner != "" {
		t.Errorf("a key of another owner was named: %v", r)
	}
	_, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: bID})
	wantCode(t, err, codes.PermissionDenied, `not granted APIKeyService.GetAPIKey on this key's owner`)
	if strings.Contains(status.Convert(err).Message(), "team-b") {
		t.Errorf("the denial names the owner: %v", err)
	}
	if r := verifyCode(t, ac, bKey, nil, keywardv1.APIKeyCode_API_KEY_CODE_NOT_FOUND); r.Reason != "no such key" {
		t.Errorf("a key of another owner: reason %q, want no such key", r.Reason)
	}
	// A secret pasted as an ID is refused, and never reaches the audit log
	// (checked with the others in TestAPIKeysEndToEnd's canary).
	_, err = ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: bKey})
	wantCode(t, err, codes.PermissionDenied, "APIKeyService.RevokeAPIKey")
	_, err = ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	wantCode(t, err, codes.PermissionDenied, "APIKeyService.CreateAPIKey")
	list, err := ac.ListAPIKeys(ctx, &keywardv1.ListAPIKeysRequest{})
	if err != nil || len(list.Keys) != 1 || list.Keys[0].Id != aID {
		t.Fatalf("ListAPIKeys shows %v, %v; want team-a's key only", list, err)
	}
	// Narrowing is allowed, widening is not (no CreateAPIKey on team-a).
	perms := func(p ...string) *keywardv1.UpdateAPIKeyRequest {
		return &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: aID, Permissions: p}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"permissions"}}}
	}
	_, err = ac.UpdateAPIKey(ctx, perms("orders:write"))
	wantCode(t, err, codes.PermissionDenied, "widening a key needs the right to issue its owner's keys")
	_, err = ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: aID, AllowedIps: []string{"192.0.2.0/24"}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"allowed_ips"}}})
	if err != nil {
		t.Fatalf("narrowing the allowlist: %v", err)
	}
	// Bulk revocation reaches only the caller's owners.
	n, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Environment: "prod"})
	if err != nil || n.Count != 1 {
		t.Fatalf("RevokeAPIKeys = %v, %v; want team-a's one key", n, err)
	}
	os.WriteFile(in.Config.PolicyFile, []byte(uidPolicy(allowAll)), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Count(in.Log.String(), "policy reloaded") == 2 })
	verifyCode(t, ac, bKey, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	in.Stop()
	if b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log")); strings.Contains(string(b), bKey[3:30]) {
		t.Error("a secret pasted as a key ID reached the audit log")
	}
}

// TestAPIKeysHTTP: the client's HTTP mapping, as docs/apikeys.md shows it,
// in front of a real keywardd.
func TestAPIKeysHTTP(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	c, err := client.Dial(in.Config.Socket.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := c.APIKeys.CreateAPIKey(context.Background(), &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "n", Environment: "prod",
		Permissions: []string{"orders:read"}, RateLimits: []*keywardv1.RateLimit{{Limit: 1, Per: durationpb.New(time.Minute), Burst: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(requireAPIKey(c, "orders:read", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("orders"))
	})))
	defer srv.Close()
	get := func(key string) *http.Response {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	for i, want := range []struct {
		status    int
		remaining string
	}{{200, "1"}, {200, "0"}, {429, "0"}} {
		resp := get(r.Secret)
		if resp.StatusCode != want.status || resp.Header.Get("RateLimit-Remaining") != want.remaining || resp.Header.Get("RateLimit-Policy") != "1;w=60" {
			t.Fatalf("request %d: %d %v", i, resp.StatusCode, resp.Header)
		}
		if want.status == 429 && resp.Header.Get("Retry-After") == "" {
			t.Errorf("a 429 without Retry-After")
		}
	}
	if resp := get(""); resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("no key: %d %v", resp.StatusCode, resp.Header)
	}
	typo := "x" // the last character changed (a secret ending in x gets a y)
	if strings.HasSuffix(r.Secret, typo) {
		typo = "y"
	}
	if resp := get(r.Secret[:len(r.Secret)-1] + typo); resp.StatusCode != 401 {
		t.Errorf("a typo: %d", resp.StatusCode)
	}
}

// requireAPIKey is docs/apikeys.md's middleware.
func requireAPIKey(kw *client.Client, perm string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
			http.Error(w, "an API key is required", http.StatusUnauthorized)
			return
		}
		host, _, _ := strings.Cut(r.RemoteAddr, ":") // IPv4 here; use net.SplitHostPort in real code
		v, err := kw.VerifyAPIKey(r.Context(), &keywardv1.VerifyAPIKeyRequest{Key: key, Permissions: []string{perm}, SourceIp: host, Environment: "prod"})
		if err != nil {
			http.Error(w, "try again later", http.StatusServiceUnavailable)
			return
		}
		client.SetRateLimitHeaders(w.Header(), v)
		if st := client.APIKeyHTTPStatus(v.Code); st != http.StatusOK {
			if st == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
			}
			http.Error(w, http.StatusText(st), st)
			return
		}
		next.ServeHTTP(w, r)
	})
}
