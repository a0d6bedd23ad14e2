package server

import (
	"context"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
)

// reported checks ReportLeak's answer and its audit record.
func reported(truePositive, changed bool, id string, state keywardv1.APIKeyState) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
		t.Helper()
		r := resp.(*keywardv1.ReportLeakResponse)
		result := "FALSE_POSITIVE"
		if truePositive {
			result = "TRUE_POSITIVE"
		}
		if r.GetTruePositive() != truePositive || r.GetChanged() != changed || r.GetKey().GetId() != id || r.GetKey().GetState() != state ||
			rec.Result != result || rec.APIKey != id {
			t.Errorf("ReportLeak = %v; audited %s for %q; want true positive %v, changed %v, key %q %v", r, rec.Result, rec.APIKey, truePositive, changed, id, state)
		}
	}
}

func TestAPIKeyReportLeak(t *testing.T) {
	ts := newTestServer(t, apiKeysPolicy)
	secretA, idA := issue(t, ts, "team-a", "web")
	secretB, _ := issue(t, ts, "team-b", "batch")
	malformed := secretA[:len(secretA)-1] + "!"
	const url = "https://git.example.com/shop/web/-/blob/main/.env"
	run(t, ts, []serviceCase{
		{name: "not granted at all", uid: gate, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{Secret: secretA},
			code: codes.PermissionDenied, msg: "not granted APIKeyService.ReportLeak", audit: wantAudit{outcome: "denied"}},
		{name: "empty", uid: issuer, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{},
			code: codes.InvalidArgument, msg: "secret is empty", audit: wantAudit{outcome: "error"}},
		{name: "a key of an owner not granted", uid: issuer, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{Secret: secretB, Source: "grep"},
			code: codes.PermissionDenied, msg: "APIKeyService.ReportLeak on this key's owner", audit: wantAudit{outcome: "denied", key: "team-b"}},
		{name: "malformed", uid: issuer, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{Secret: malformed, Source: "grep"},
			code: codes.OK, audit: wantAudit{outcome: "ok", detail: "not an API key"},
			after: reported(false, false, "", keywardv1.APIKeyState_API_KEY_STATE_UNSPECIFIED)},
		{name: "true positive", uid: issuer, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{Secret: secretA, Source: "a colleague", Url: url},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a", detail: "found by a colleague (reported by uid 2000) at " + url},
			after: reported(true, true, idA, keywardv1.APIKeyState_API_KEY_STATE_REVOKED)},
		{name: "reported again", uid: issuer, method: "APIKeyService/ReportLeak",
			req:  &keywardv1.ReportLeakRequest{Secret: secretA},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a", detail: "already revoked"},
			after: reported(true, false, idA, keywardv1.APIKeyState_API_KEY_STATE_REVOKED)},
		{name: "verify after", uid: gate, method: "APIKeyService/VerifyAPIKey",
			req:  &keywardv1.VerifyAPIKeyRequest{Environment: "live", Key: secretA, Permissions: []string{"orders:read"}},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "team-a"}, after: verified(keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, idA)},
	})
	if v := ts.apiKeys.Verify(context.Background(), secretB, apikeys.Request{Environment: "live", Permissions: []string{"orders:read"}}); v.Code != apikeys.Valid {
		t.Fatalf("team-b's key, reported by a caller not granted it: %s", v.Code)
	}
	raw, err := os.ReadFile(ts.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{secretA, secretB, malformed} {
		if strings.Contains(string(raw), s) {
			t.Fatal("a reported string is in the audit log")
		}
	}
}
