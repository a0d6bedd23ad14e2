package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
)

// issueQuota issues a key of team-a's, for live, with orders:read and the
// quota q, and returns its secret.
func issueQuota(t *testing.T, ts *testServer, name string, q *apikeys.Quota) string {
	t.Helper()
	secret, _, err := ts.apiKeys.Create(context.Background(), apikeys.Spec{Owner: "team-a", Name: name, Environment: "live",
		Permissions: []string{"orders:read"}, Quota: q})
	if err != nil {
		t.Fatal(err)
	}
	return secret
}

// TestAuthRequestQuota: a key over its quota gets 429 through the
// auth_request endpoint, with Retry-After, the RateLimit-* headers of its
// quota and the body of a 429 (usage, limit, reset time, retry delay);
// once refilled it passes again. A quota that never refills gets 429 with
// no Retry-After and a body that says it never refills.
func TestAuthRequestQuota(t *testing.T) {
	pol := withAdmin(`  gateway:
    permissions:
      - operations: [APIKeyService.VerifyAPIKey]
        keys: ["team-a"]
`, fmt.Sprintf("  - role: gateway\n    callers: [{uid: %d}]\n", os.Getuid()))
	ts := newTestServer(t, pol)
	c := serveAuthRequest(t, ts)
	create := func(name string, q *apikeys.Quota) string { return issueQuota(t, ts, name, q) }
	ask := func(secret string) (*http.Response, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://keywardd"+AuthRequestPath, nil)
		req.Header.Set("X-API-Key", secret)
		req.Header.Set(HeaderEnvironment, "live")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var body map[string]any
		if resp.StatusCode != 200 {
			if err := json.Unmarshal(b, &body); err != nil {
				t.Fatalf("status %d, body %q: %v", resp.StatusCode, b, err)
			}
		}
		return resp, body
	}

	daily := create("daily", &apikeys.Quota{Remaining: 2, Refill: 2, RefillEvery: time.Hour})
	for i := range 2 {
		if resp, body := ask(daily); resp.StatusCode != 200 {
			t.Fatalf("use %d of 2: %d %v", i+1, resp.StatusCode, body)
		}
	}
	resp, body := ask(daily)
	ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	if resp.StatusCode != 429 || err != nil || ra <= 0 || ra > 3600 {
		t.Fatalf("over the quota: %d, Retry-After %q; want 429 and at most an hour", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	reset, err := time.Parse(time.RFC3339, fmt.Sprint(body["reset_time"]))
	if body["error"] != "quota exceeded" || body["current_usage"] != 2.0 || body["limit"] != 2.0 || body["retry_after"] != float64(ra) ||
		err != nil || !reset.Equal(ts.clock.now().Add(time.Duration(ra)*time.Second)) {
		t.Errorf("over the quota: body %v; want usage 2, limit 2, retry_after %d and reset_time that far on", body, ra)
	}
	if h := resp.Header; h.Get("RateLimit-Limit") != "2" || h.Get("RateLimit-Remaining") != "0" || h.Get("RateLimit-Reset") != strconv.Itoa(ra) ||
		h.Get(HeaderBody) == "" {
		t.Errorf("over the quota: headers %v", h)
	}
	// The client that waits as told is let through.
	ts.clock.mu.Lock()
	ts.clock.t = ts.clock.t.Add(time.Duration(ra) * time.Second)
	ts.clock.mu.Unlock()
	if resp, body := ask(daily); resp.StatusCode != 200 {
		t.Fatalf("after Retry-After: %d %v; want the refilled quota to pass", resp.StatusCode, body)
	}

	once := create("once", &apikeys.Quota{Remaining: 1})
	ask(once)
	resp, body = ask(once)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "" || body["refills"] != false || body["remaining"] != 0.0 {
		t.Fatalf("a spent quota that never refills: %d, Retry-After %q, body %v; want 429, none, and refills false", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
}
