package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/policy"
)

// serveAuthRequest serves ts's AuthRequest on a Unix socket until the test
// ends, and returns a client whose every request goes there.
func serveAuthRequest(t *testing.T, ts *testServer) *http.Client {
	t.Helper()
	sock := authRequestSocket(t, ts)
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
}

// authRequestSocket serves ts's AuthRequest on a Unix socket until the
// test ends, and returns the socket's path.
func authRequestSocket(t *testing.T, ts *testServer) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "gw.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := ts.s.AuthRequest()
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return sock
}

// TestAuthRequest: the endpoint for nginx's auth_request, over a real Unix
// socket, as this process's uid (the gateway the policy binds, or not):
// each request is a VerifyAPIKey call by the connection's caller, with its
// verdict's answer (gateway.AnswerOf) and one audit record; a call with no
// verdict (the gateway not allowed, a bad address from its configuration)
// is a 500 or 400 that says why, audited too.
func TestAuthRequest(t *testing.T) {
	me := os.Getuid()
	pol := withAdmin(`  gateway:
    permissions:
      - operations: [APIKeyService.VerifyAPIKey]
        keys: ["team-a"]
`, fmt.Sprintf("  - role: gateway\n    callers: [{uid: %d}]\n", me))
	ts := newTestServer(t, pol)
	secret, id := issue(t, ts, "team-a", "shop")
	other, _ := issue(t, ts, "team-b", "elsewhere")
	c := serveAuthRequest(t, ts)

	cases := []struct {
		name    string
		header  map[string]string
		status  int
		headers map[string]string // each exactly
		body    string            // the JSON body's "code"
		result  string            // the audit record's verdict
		outcome string
	}{
		{name: "valid", header: map[string]string{"Authorization": "Bearer " + secret, "X-Keyward-Environment": "live", "X-Keyward-Permission": "orders:read", "X-Real-IP": "192.0.2.7"},
			status: 200, headers: map[string]string{"Keyward-Owner": "team-a", "Keyward-Key-Id": id}, result: "VALID", outcome: "ok"},
		{name: "X-API-Key", header: map[string]string{"X-API-Key": secret, "X-Keyward-Environment": "live", "X-Keyward-Permission": "orders:read"},
			status: 200, headers: map[string]string{"Keyward-Owner": "team-a"}, result: "VALID", outcome: "ok"},
		{name: "no key", header: map[string]string{"X-Keyward-Environment": "live"}, status: 401, headers: map[string]string{"WWW-Authenticate": `Bearer realm="api"`}, body: "missing", result: "MALFORMED", outcome: "ok"},
		{name: "wrong environment", header: map[string]string{"X-API-Key": secret, "X-Keyward-Environment": "test"},
			status: 403, body: "wrong_environment", result: "WRONG_ENVIRONMENT", outcome: "ok"},
		{name: "a permission it lacks", header: map[string]string{"X-API-Key": secret, "X-Keyward-Environment": "live", "X-Keyward-Permission": "orders:read, orders:write"},
			status: 403, body: "forbidden", result: "FORBIDDEN", outcome: "ok"},
		{name: "an owner the gateway may not reach", header: map[string]string{"X-API-Key": other, "X-Keyward-Environment": "live"},
			status: 401, body: "not_found", result: "NOT_FOUND", outcome: "ok"},
		{name: "a bad address", header: map[string]string{"X-API-Key": secret, "X-Keyward-Environment": "live", "X-Real-IP": "192.0.2.7:443"},
			status: 400, body: "invalidargument", outcome: "error"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(ts.records(t))
			req, _ := http.NewRequest("GET", "http://keywardd"+AuthRequestPath, nil)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			for k, v := range tc.headers {
				if got := resp.Header.Values(k); !slices.Equal(got, []string{v}) {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
			if tc.status != 200 {
				var got map[string]any
				if err := json.Unmarshal(body, &got); err != nil || got["code"] != tc.body {
					t.Errorf("body %s, want code %q", body, tc.body)
				}
				if tc.status < 500 && tc.result != "" && resp.Header.Get(HeaderBody)+"\n" != string(body) {
					t.Errorf("%s %q is not the body %q", HeaderBody, resp.Header.Get(HeaderBody), body)
				}
			}
			recs := ts.records(t)[before:]
			if len(recs) != 1 {
				t.Fatalf("%d audit records, want 1: %+v", len(recs), recs)
			}
			if r := recs[0]; r.Op != "APIKeyService.VerifyAPIKey" || r.Caller.UID != uint32(me) || r.Result != tc.result || r.Outcome != tc.outcome {
				t.Errorf("audit record %+v; want VerifyAPIKey by uid %d, verdict %q, outcome %s", r, me, tc.result, tc.outcome)
			}
			if r := recs[0]; r.Outcome == "ok" && !strings.Contains(r.Detail, "auth_request endpoint") {
				t.Errorf("audit record's detail %q; want it to name the auth_request endpoint", r.Detail)
			}
		})
	}

	// A gateway the policy no longer grants VerifyAPIKey learns that, on
	// the connection it holds, and the refusal is audited.
	t.Run("not allowed", func(t *testing.T) {
		pol, err := policy.Parse([]byte(withAdmin("", "")), Ops())
		if err != nil {
			t.Fatal(err)
		}
		ts.s.SetPolicy(pol)
		before := len(ts.records(t))
		resp, err := c.Get("http://keywardd" + AuthRequestPath)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var got map[string]any
		if resp.StatusCode != 500 || json.Unmarshal(body, &got) != nil || got["code"] != "permissiondenied" {
			t.Fatalf("status %d, body %s; want 500 and permissiondenied", resp.StatusCode, body)
		}
		recs := ts.records(t)[before:]
		if len(recs) != 1 || recs[0].Op != "APIKeyService.VerifyAPIKey" || recs[0].Outcome != "denied" {
			t.Fatalf("audit records %+v; want one VerifyAPIKey, denied", recs)
		}
	})
}

func TestPermissions(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string
	}{
		{nil, nil},
		{[]string{"orders:read"}, []string{"orders:read"}},
		{[]string{"orders:read, orders:write", "admin"}, []string{"orders:read", "orders:write", "admin"}},
		{[]string{" , ,"}, nil},
	} {
		if got := permissions(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("permissions(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestAuthRequestBudget: the gateway's calls count against its role's
// budget as on the gRPC socket: over its call rate it is answered 503,
// saying which budget, and nothing is verified or audited.
func TestAuthRequestBudget(t *testing.T) {
	pol := withAdmin(`  gateway:
    limits:
      rate: [{limit: 1, per: 1h, burst: 1}]
    permissions:
      - operations: [APIKeyService.VerifyAPIKey]
        keys: ["team-a"]
`, fmt.Sprintf("  - role: gateway\n    callers: [{uid: %d}]\n", os.Getuid()))
	ts := newTestServer(t, pol)
	secret, _ := issue(t, ts, "team-a", "shop")
	c := serveAuthRequest(t, ts)
	var statuses []int
	for range 2 {
		req, _ := http.NewRequest("GET", "http://keywardd"+AuthRequestPath, nil)
		req.Header.Set("X-API-Key", secret)
		req.Header.Set("X-Keyward-Environment", "live")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		statuses = append(statuses, resp.StatusCode)
		if resp.StatusCode == 503 {
			var got map[string]any
			if json.Unmarshal(body, &got) != nil || got["code"] != "resourceexhausted" || !strings.Contains(got["error"].(string), "call rate") {
				t.Errorf("the refusal's body %s does not say the gateway is over its call rate", body)
			}
		}
	}
	if !slices.Equal(statuses, []int{200, 503}) {
		t.Fatalf("statuses %v, want 200 then 503", statuses)
	}
	if recs := ts.records(t); len(recs) != 1 || recs[0].Result != "VALID" {
		t.Fatalf("audit records %+v; want the one verification", recs)
	}
	// The connection held a slot of the gateway's budget, given back when
	// it closes.
	uid := uint32(os.Getuid())
	if n := ts.s.gate.Holds(uid); n != 1 {
		t.Fatalf("the gateway holds %d connections, want 1", n)
	}
	c.CloseIdleConnections()
	for deadline := time.Now().Add(10 * time.Second); ts.s.gate.Holds(uid) != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the gateway still holds %d connections after closing its one", ts.s.gate.Holds(uid))
		}
	}
}
