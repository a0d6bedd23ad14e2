package server

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
)

// issuer manages team-a's API keys (the policy's globs match owners);
// gate only verifies them.
var apiKeysPolicy = withAdmin(`  issuer:
    permissions:
      - operations: ["APIKeyService.*"]
        keys: ["team-a"]
  gate:
    permissions:
      - operations: [APIKeyService.VerifyAPIKey]
        keys: ["team-a"]
`, `  - role: issuer
    callers: [{uid: 2000}]
  - role: gate
    callers: [{uid: 4000}]
`)

// noKey is an API key ID of the right form that names no key.
const noKey = "ak_000000000000000000000000"

const (
	issuer = 2000
	gate   = 4000
)

// issue makes an API key before the cases run; it returns the secret and
// the key's ID.
func issue(t *testing.T, ts *testServer, owner, name string) (string, string) {
	t.Helper()
	secret, rec, err := ts.apiKeys.Create(context.Background(), apikeys.Spec{Owner: owner, Name: name, Environment: "live", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	return secret, rec.ID
}

// verified checks VerifyAPIKey's answer and its audit record: the verdict,
// and the key's ID on record once the key is known.
func verified(code keywardv1.APIKeyCode, id string) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
		t.Helper()
		r := resp.(*keywardv1.VerifyAPIKeyResponse)
		if r.GetCode() != code || r.GetKeyId() != id || rec.Result != strings.TrimPrefix(code.String(), "API_KEY_CODE_") || rec.APIKey != id {
			t.Errorf("verdict %v for %q (%s), audited %s for %q; want %v for %q", r.GetCode(), r.GetKeyId(), r.GetReason(), rec.Result, rec.APIKey, code, id)
		}
	}
}

func TestAPIKeyService(t *testing.T) {
	ts := newTestServer(t, apiKeysPolicy)
	secretA, idA := issue(t, ts, "team-a", "web")
	secretDoomed, idDoomed := issue(t, ts, "team-a", "old")
	secretB, idB := issue(t, ts, "team-b", "batch")
	_, idRotated := issue(t, ts, "team-a", "ci")
	mask := func(p ...string) *fieldmaskpb.FieldMask { return &fieldmaskpb.FieldMask{Paths: p} }
	// An hour of idRotated's use as keyward stored it before it measured
	// latency.
	hour := ts.clock.now().UTC().Truncate(time.Hour).Add(-2 * time.Hour)
	old := fmt.Sprintf(`{"hour":%q,"counts":{"VALID":3},"last":%[1]q}`, hour.Format(time.RFC3339))
	if err := ts.st.Update(store.BucketAPIKeyUsage, fmt.Sprintf("%s/%010d", idRotated, hour.Unix()), func([]byte) ([]byte, error) { return []byte(old), nil }); err != nil {
		t.Fatal(err)
	}
	var created string // the secret CreateAPIKey answered
	run(t, ts, []serviceCase{
		{name: "create", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req: &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"orders:read"},
				Ttl: durationpb.New(24 * time.Hour), AllowedIps: []string{"10.0.0.0/8"}},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				r := resp.(*keywardv1.CreateAPIKeyResponse)
				created = r.GetSecret()
				if rec.APIKey != r.GetKey().GetId() || !r.GetKey().GetExpireTime().AsTime().Equal(ts.clock.now().Add(24*time.Hour)) {
					t.Errorf("audited key %q; answered %q expiring %v", rec.APIKey, r.GetKey().GetId(), r.GetKey().GetExpireTime().AsTime())
				}
			}},
		{name: "create for an owner not granted", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req:  &keywardv1.CreateAPIKeyRequest{Owner: "team-b", Name: "new", Environment: "live", Permissions: []string{"orders:read"}},
			code: codes.PermissionDenied, msg: `not granted APIKeyService.CreateAPIKey on key "team-b"`,
			audit: wantAudit{outcome: "denied", key: "team-b"}},
		{name: "create with an expiry and a ttl", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req: &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"orders:read"},
				Ttl: durationpb.New(time.Hour), ExpireTime: timestamppb.New(time.Now().Add(time.Hour))},
			code: codes.InvalidArgument, msg: "give expire_time or ttl, not both", audit: wantAudit{outcome: "error", key: "team-a"}},
		{name: "create unlimited with rate limits", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req: &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"orders:read"}, Unlimited: true,
				RateLimits: []*keywardv1.RateLimit{{Limit: 10, Per: durationpb.New(time.Second)}}},
			code: codes.InvalidArgument, msg: "unlimited and rate_limits contradict each other", audit: wantAudit{outcome: "error", key: "team-a"}},
		{name: "create with a rate limit of no period", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req: &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"orders:read"},
				RateLimits: []*keywardv1.RateLimit{{Limit: 10}}},
			code: codes.InvalidArgument, msg: "rate_limits[0] has no valid period (per: 1s, 60s, 3600s or 86400s)",
			audit: wantAudit{outcome: "error", key: "team-a"}},
		{name: "create with a bad allowlist", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req:  &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"orders:read"}, AllowedIps: []string{"10.0.0.0/33"}},
			code: codes.InvalidArgument, msg: "10.0.0.0/33", audit: wantAudit{outcome: "error", key: "team-a"}},
		{name: "create with a bad permission", uid: issuer, method: "APIKeyService/CreateAPIKey",
			req:  &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "new", Environment: "live", Permissions: []string{"Orders"}},
			code: codes.InvalidArgument, msg: "Orders", audit: wantAudit{outcome: "error", key: "team-a"}},
		{name: "verify", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretA, Permissions: []string{"orders:read"}, SourceIp: "192.0.2.1"},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_VALID, idA)},
		{name: "verify for a permission the key has not", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretA, Permissions: []string{"orders:write"}},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_FORBIDDEN, idA)},
		{name: "verify a key of an owner not granted", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretB, Permissions: []string{"orders:read"}},
			code: codes.OK, audit: wantAudit{outcome: "ok"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_NOT_FOUND, "")},
		{name: "verify what is no key", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: "hello", Permissions: []string{"orders:read"}},
			code: codes.OK, audit: wantAudit{outcome: "ok"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_MALFORMED, "")},
		{name: "verify from an address with a port", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretA, Permissions: []string{"orders:read"}, SourceIp: "192.0.2.1:443"},
			code: codes.InvalidArgument, msg: "source_ip is not an IP address; pass the client's address without a port",
			audit: wantAudit{outcome: "error"}},
		{name: "verify denied", uid: stranger, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretA, Permissions: []string{"orders:read"}},
			code: codes.PermissionDenied, msg: "not granted APIKeyService.VerifyAPIKey", audit: wantAudit{outcome: "denied"}},
		{name: "get", uid: issuer, method: "APIKeyService/GetAPIKey",
			req: &keywardv1.GetAPIKeyRequest{Id: idA}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				if k := resp.(*keywardv1.GetAPIKeyResponse).GetKey(); k.GetOwner() != "team-a" || k.GetName() != "web" || rec.APIKey != idA {
					t.Errorf("got %s/%s, audited %q", k.GetOwner(), k.GetName(), rec.APIKey)
				}
			}},
		{name: "get a key of an owner not granted", uid: issuer, method: "APIKeyService/GetAPIKey",
			req:  &keywardv1.GetAPIKeyRequest{Id: idB},
			code: codes.PermissionDenied, msg: "not granted APIKeyService.GetAPIKey on this key's owner",
			// The owner goes on record, not to the caller.
			audit: wantAudit{outcome: "denied", key: "team-b"},
			after: func(t *testing.T, _ *testServer, _ any, rec audit.Record) {
				if rec.APIKey != idB {
					t.Errorf("audited API key %q; want %q", rec.APIKey, idB)
				}
			}},
		{name: "get not found", uid: issuer, method: "APIKeyService/GetAPIKey",
			req: &keywardv1.GetAPIKeyRequest{Id: noKey}, code: codes.NotFound, msg: `no such key: "ak_000000000000000000000000"`, audit: wantAudit{outcome: "error"}},
		{name: "get with a malformed ID", uid: issuer, method: "APIKeyService/GetAPIKey",
			req: &keywardv1.GetAPIKeyRequest{Id: "web"}, code: codes.InvalidArgument, msg: "not a key ID (ak_ and 24 hex digits; the ID, never the key itself)",
			audit: wantAudit{outcome: "error"}},
		{name: "get with the secret in place of the ID", uid: issuer, method: "APIKeyService/GetAPIKey",
			req: &keywardv1.GetAPIKeyRequest{Id: secretA}, code: codes.InvalidArgument, msg: "the ID, never the key itself", audit: wantAudit{outcome: "error"},
			after: func(t *testing.T, ts *testServer, _ any, rec audit.Record) {
				if rec.APIKey != "" {
					t.Errorf("audited API key %q for a secret", rec.APIKey)
				}
			}},
		{name: "get denied", uid: gate, method: "APIKeyService/GetAPIKey",
			req: &keywardv1.GetAPIKeyRequest{Id: idA}, code: codes.PermissionDenied, msg: "not granted APIKeyService.GetAPIKey",
			audit: wantAudit{outcome: "denied"}},
		{name: "list: the owners granted", uid: issuer, method: "APIKeyService/ListAPIKeys",
			req: &keywardv1.ListAPIKeysRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				ks := resp.(*keywardv1.ListAPIKeysResponse).GetKeys()
				for _, k := range ks {
					if k.GetOwner() != "team-a" {
						t.Errorf("listed a key of %s", k.GetOwner())
					}
				}
				if len(ks) != 4 || rec.Items != 4 {
					t.Errorf("listed %d keys, audited %d; want team-a's 4", len(ks), rec.Items)
				}
			}},
		{name: "list a page too large", uid: issuer, method: "APIKeyService/ListAPIKeys",
			req: &keywardv1.ListAPIKeysRequest{PageSize: apikeys.MaxPageSize + 1}, code: codes.InvalidArgument,
			msg: "page_size is at most", audit: wantAudit{outcome: "error"}},
		{name: "update: narrow", uid: issuer, method: "APIKeyService/UpdateAPIKey",
			req:  &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: idA, AllowedIps: []string{"192.0.2.0/24"}}, UpdateMask: mask("allowed_ips")},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if ips := resp.(*keywardv1.UpdateAPIKeyResponse).GetKey().GetAllowedIps(); len(ips) != 1 || ips[0] != "192.0.2.0/24" {
					t.Errorf("allowed IPs %v", ips)
				}
			}},
		{name: "update naming no field", uid: issuer, method: "APIKeyService/UpdateAPIKey",
			req:  &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: idA}},
			code: codes.InvalidArgument, msg: "update_mask names no field; name some of permissions, rate_limits, allowed_ips, allowed_countries, expire_time, state",
			audit: wantAudit{outcome: "error"}},
		{name: "update a field that does not change", uid: issuer, method: "APIKeyService/UpdateAPIKey",
			req:  &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: idA, Owner: "team-b"}, UpdateMask: mask("owner")},
			code: codes.InvalidArgument, msg: `update_mask path "owner": UpdateAPIKey changes permissions`,
			audit: wantAudit{outcome: "error"}},
		{name: "update a key of an owner not granted", uid: issuer, method: "APIKeyService/UpdateAPIKey",
			req:  &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: idB, State: keywardv1.APIKeyState_API_KEY_STATE_DISABLED}, UpdateMask: mask("state")},
			code: codes.PermissionDenied, msg: "on this key's owner", audit: wantAudit{outcome: "denied", key: "team-b"}},
		{name: "rotate", uid: issuer, method: "APIKeyService/RotateAPIKey",
			req: &keywardv1.RotateAPIKeyRequest{Id: idRotated, Overlap: durationpb.New(time.Hour)}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				r := resp.(*keywardv1.RotateAPIKeyResponse)
				res := ts.apiKeys.Verify(context.Background(), r.GetSecret(), apikeys.Request{Environment: "live", Permissions: []string{"orders:read"}})
				if res.Code != apikeys.Valid || !r.GetOldSecretNotAfter().AsTime().Equal(ts.clock.now().Add(time.Hour)) {
					t.Errorf("the new secret verifies %s; the old one ends %v", res.Code, r.GetOldSecretNotAfter().AsTime())
				}
			}},
		{name: "rotate not found", uid: issuer, method: "APIKeyService/RotateAPIKey",
			req: &keywardv1.RotateAPIKeyRequest{Id: noKey}, code: codes.NotFound, msg: `no such key: "ak_000000000000000000000000"`, audit: wantAudit{outcome: "error"}},
		{name: "revoke", uid: issuer, method: "APIKeyService/RevokeAPIKey",
			req: &keywardv1.RevokeAPIKeyRequest{Id: idDoomed}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"}},
		{name: "verify a revoked key", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretDoomed, Permissions: []string{"orders:read"}},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, idDoomed)},
		{name: "revoke a key of an owner not granted", uid: issuer, method: "APIKeyService/RevokeAPIKey",
			req: &keywardv1.RevokeAPIKeyRequest{Id: idB}, code: codes.PermissionDenied, msg: "on this key's owner",
			audit: wantAudit{outcome: "denied", key: "team-b"},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				if rec, _ := ts.apiKeys.Get(idB); rec.State != apikeys.Active {
					t.Errorf("team-b's key is %s", rec.State)
				}
			}},
		{name: "revoke many, a dry run", uid: issuer, method: "APIKeyService/RevokeAPIKeys",
			req: &keywardv1.RevokeAPIKeysRequest{Owner: "team-a", DryRun: true}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "team-a", detail: "dry run true"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				if n := resp.(*keywardv1.RevokeAPIKeysResponse).GetCount(); n != 3 || rec.Items != 3 {
					t.Errorf("would revoke %d, audited %d; want team-a's 3 active keys", n, rec.Items)
				}
			}},
		{name: "revoke many of an owner not granted", uid: issuer, method: "APIKeyService/RevokeAPIKeys",
			req: &keywardv1.RevokeAPIKeysRequest{Owner: "team-b"}, code: codes.PermissionDenied,
			msg: `not granted APIKeyService.RevokeAPIKeys on key "team-b"`, audit: wantAudit{outcome: "denied", key: "team-b"}},
		{name: "usage", uid: issuer, method: "APIKeyService/GetAPIKeyUsage",
			req: &keywardv1.GetAPIKeyUsageRequest{Id: idA}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				// This test's verifications of the key: VALID, FORBIDDEN.
				r := resp.(*keywardv1.GetAPIKeyUsageResponse)
				if c := r.GetTotal().GetCounts(); c["VALID"] != 1 || c["FORBIDDEN"] != 1 {
					t.Errorf("usage counts %v", c)
				}
				usageLatency(t, r, 2)
			}},
		{name: "usage partly recorded before latency was", uid: issuer, method: "APIKeyService/GetAPIKeyUsage",
			req: &keywardv1.GetAPIKeyUsageRequest{Id: idRotated}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				// 3 stored two hours ago without latency, and the
				// verification of its new secret.
				r := resp.(*keywardv1.GetAPIKeyUsageResponse)
				if c := r.GetTotal().GetCounts(); c["VALID"] != 4 || len(r.GetHours()) != 2 {
					t.Fatalf("usage counts %v in %d hours, want 4 VALID in two", c, len(r.GetHours()))
				}
				if l := r.GetHours()[0].GetUsage().GetLatencyCounts(); l != nil {
					t.Errorf("the hour stored without latency has latency counts %v", l)
				}
				usageLatency(t, r, 1)
			}},
	})
	// No secret reaches the audit log, whichever call it went through.
	log, err := os.ReadFile(ts.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{secretA, secretB, secretDoomed, created} {
		if s == "" || strings.Contains(string(log), s) {
			t.Errorf("the audit log holds an API key's secret %q (or the test lost it)", s)
		}
	}
}

// usageLatency checks the latency GetAPIKeyUsage answered: the bounds are
// apikeys.LatencyBounds, the total counts n verifications (none: no
// latency counts at all), and no hour counts more than its outcomes.
func usageLatency(t *testing.T, r *keywardv1.GetAPIKeyUsageResponse, n int64) {
	t.Helper()
	bounds := r.GetLatencyBounds()
	if len(bounds) != len(apikeys.LatencyBounds) {
		t.Fatalf("%d latency bounds, want %d", len(bounds), len(apikeys.LatencyBounds))
	}
	for i, b := range bounds {
		if b.AsDuration() != apikeys.LatencyBounds[i] {
			t.Errorf("latency bound %d is %v, want %v", i, b.AsDuration(), apikeys.LatencyBounds[i])
		}
	}
	sum := func(counts []int64) (n int64) {
		for _, c := range counts {
			n += c
		}
		return n
	}
	total := r.GetTotal().GetLatencyCounts()
	if n == 0 && total != nil || n > 0 && len(total) != apikeys.LatencyBuckets || sum(total) != n {
		t.Errorf("latency counts %v, want %d verifications in %d buckets (none if 0)", total, n, apikeys.LatencyBuckets)
	}
	var hours int64
	for _, h := range r.GetHours() {
		got, outcomes := sum(h.GetUsage().GetLatencyCounts()), sum(slices.Collect(maps.Values(h.GetUsage().GetCounts())))
		if got > outcomes {
			t.Errorf("hour %v: latency counts %d verifications, its outcomes %d", h.GetHour().AsTime(), got, outcomes)
		}
		hours += got
	}
	if hours != n {
		t.Errorf("the hours' latency counts %d verifications, the total %d", hours, n)
	}
	if _, ok := apikeys.LatencyQuantile(apikeys.LatencyBounds[:], total, 0.5); ok != (n > 0) {
		t.Errorf("a median from %v: %v", total, ok)
	}
}
