package client_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/gateway"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestGate: the net/http middleware admits a request with a valid key,
// with the key's ID and owner for the service (a client's own are
// removed) and the rate-limit headers; refuses an absent, unknown or
// revoked key (401), one without the permission (403), one over its limit
// (429, Retry-After and the JSON body); and fails closed (503) without
// keywardd.
func TestGate(t *testing.T) {
	in, c := started(t)
	ctx := context.Background()
	k, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "gw", Environment: "prod", Permissions: []string{"orders:read"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 3, Per: durationpb.New(time.Hour), Burst: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	var seen http.Header
	upstream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = r.Header.Clone()
		io.WriteString(w, "upstream")
	})
	perm := "orders:read"
	srv := httptest.NewServer(client.Gate(c, client.GateOptions{Environment: "prod", Route: func(*http.Request) []string { return []string{perm} }})(upstream))
	defer srv.Close()
	do := func(auth string, spoof bool) (*http.Response, string) {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		if spoof {
			req.Header.Add(gateway.HeaderOwner, "someone-else")
			req.Header["Keyward_owner"] = []string{"someone-else"}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}

	resp, body := do("Bearer "+k.Secret, true)
	if resp.StatusCode != 200 || body != "upstream" || seen.Get(gateway.HeaderKeyID) != k.Key.Id || len(seen.Values(gateway.HeaderOwner)) != 1 ||
		seen.Get(gateway.HeaderOwner) != "shop" || seen["Keyward_owner"] != nil {
		t.Fatalf("a valid key: %d %q, upstream saw %v", resp.StatusCode, body, seen)
	}
	if resp.Header.Get("RateLimit-Limit") != "3" || resp.Header.Get("RateLimit-Remaining") != "2" || resp.Header.Get("RateLimit-Reset") == "" {
		t.Errorf("rate-limit headers %v", resp.Header)
	}
	do("Bearer "+k.Secret, false)
	resp, _ = do("Bearer "+k.Secret, false)
	if resp.StatusCode != 200 || resp.Header.Get(gateway.HeaderNearLimit) != "true" || resp.Header.Get("RateLimit-Remaining") != "0" {
		t.Errorf("the third of three: %d, near limit %q, remaining %q", resp.StatusCode, resp.Header.Get(gateway.HeaderNearLimit), resp.Header.Get("RateLimit-Remaining"))
	}
	resp, body = do("Bearer "+k.Secret, false)
	var over struct {
		Error        string `json:"error"`
		CurrentUsage int64  `json:"current_usage"`
		Limit        int64  `json:"limit"`
		ResetTime    string `json:"reset_time"`
		RetryAfter   int64  `json:"retry_after"`
	}
	if err := json.Unmarshal([]byte(body), &over); err != nil || resp.StatusCode != 429 || over.Error != "rate limit exceeded" || over.Limit != 3 ||
		over.CurrentUsage != 3 || over.RetryAfter <= 0 || resp.Header.Get("Retry-After") != strconv.FormatInt(over.RetryAfter, 10) {
		t.Errorf("over the limit: %d %s %v (%v)", resp.StatusCode, body, resp.Header, err)
	}
	if _, err := time.Parse(time.RFC3339, over.ResetTime); err != nil {
		t.Errorf("reset_time %q: %v", over.ResetTime, err)
	}

	other, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "gw2", Environment: "prod", Permissions: []string{"orders:read"}, Unlimited: true})
	if err != nil {
		t.Fatal(err)
	}
	perm = "orders:write"
	if resp, _ := do("Bearer "+other.Secret, false); resp.StatusCode != 403 {
		t.Errorf("without the permission: %d; want 403", resp.StatusCode)
	}
	perm = "orders:read"
	c.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: other.Key.Id})
	for _, auth := range []string{"", "Basic xyz", "Bearer " + other.Secret, "Bearer kw_notakey"} {
		if resp, _ := do(auth, false); resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("Authorization %.12q: %d; want 401 with WWW-Authenticate", auth, resp.StatusCode)
		}
	}
	in.Stop()
	if resp, _ := do("Bearer "+k.Secret, false); resp.StatusCode != 503 {
		t.Errorf("keywardd stopped: %d; want 503", resp.StatusCode)
	}
}
