package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
	"github.com/keyward/keyward/plugins/sdk"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// request is one golden POST: its event ID and signature headers and its
// body, as a receiver gets them.
type request struct {
	Name      string `json:"name"`
	EventID   string `json:"keyward_event_id"`
	Signature string `json:"keyward_signature"`
	Body      string `json:"body"`
}

// goldenNow is the webhook's clock for the golden requests; goldenKey its
// HMAC key.
var (
	goldenNow = time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	goldenKey = []byte("0123456789abcdef0123456789abcdef-golden")
)

// goldenCalls are the calls keywardd makes of the webhook plugin that
// post: a revocation or notice of every kind, and the steps of a rotation
// that post (Create and Test post nothing).
func goldenCalls() []struct {
	name string
	call func(context.Context, *Hook) error
} {
	at := time.Date(2026, 11, 29, 23, 59, 59, 0, time.UTC)
	type call = struct {
		name string
		call func(context.Context, *Hook) error
	}
	var out []call
	for i, e := range []sdk.Event{
		{Kind: pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED, ID: "ak_000102030405060708090a0b", Subject: "team-a", Time: at},
		{Kind: pluginv1.EventKind_EVENT_KIND_TOKEN_REVOKED, ID: "AAECAwQFBgcICQoLDA0ODw", Subject: "uid:1000", Time: at},
		{Kind: pluginv1.EventKind_EVENT_KIND_KEY_VERSION_REVOKED, ID: "payments/v3", Subject: "payments", Time: at},
		{Kind: pluginv1.EventKind_EVENT_KIND_CREDENTIAL_REVOKED, ID: "db-main", Subject: "db-main", Time: at},
		{Kind: pluginv1.EventKind_EVENT_KIND_ROTATION_DUE, ID: "api_key/ak_000102030405060708090a0b", Subject: "team-a", Time: at,
			Detail: "policy every 90 days; due 2026-12-01T00:00:00Z"},
		{Kind: pluginv1.EventKind_EVENT_KIND_ANOMALY, ID: "ak_000102030405060708090a0b", Subject: "team-a <ops@example.com>", Time: at,
			Detail: "1 200 requests a minute against a baseline of 40 & rising; keywardd disabled the key"},
		{Kind: pluginv1.EventKind_EVENT_KIND_KEY_VERSION_RETIRED, ID: "payments/v3", Subject: "payments", Time: at},
		{Kind: pluginv1.EventKind_EVENT_KIND_API_KEY_LEAKED, ID: "ak_000102030405060708090a0b", Subject: "team-a", Time: at,
			Detail: "found by github:content as keyward_api_key at https://github.com/o/r/blob/1/.env: the key's current secret; keywardd revoked the key (leaks.action: revoke): issue a new one"},
	} {
		op := fmt.Sprintf("evt-%020d-9f86d081884c7d6%d", 42+i, i)
		out = append(out, call{strings.ToLower(strings.TrimPrefix(e.Kind.String(), "EVENT_KIND_")), func(ctx context.Context, h *Hook) error { return h.Revoke(ctx, op, e) }})
	}
	cred := sdk.Credential{Name: "db-main", Config: json.RawMessage(`{}`)}
	return append(out,
		call{"credential rotated", func(ctx context.Context, h *Hook) error {
			return h.Activate(ctx, sdk.ActivateRequest{OperationID: "rot-db-main-2", Credential: cred, Handle: "rot-db-main-2", PreviousHandle: "rot-db-main-1"})
		}},
		call{"credential retired", func(ctx context.Context, h *Hook) error {
			return h.Retire(ctx, sdk.RetireRequest{OperationID: "rot-db-main-3", Credential: cred, Handle: "rot-db-main-1"})
		}},
	)
}

// posted makes each golden call of a Hook whose clock is goldenNow, and
// returns the requests a real HTTP receiver got.
func posted(t *testing.T) []request {
	t.Helper()
	var mu sync.Mutex
	var got []request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, request{EventID: r.Header.Get("Keyward-Event-Id"), Signature: r.Header.Get("Keyward-Signature"), Body: string(body)})
		mu.Unlock()
	}))
	defer srv.Close()
	h := &Hook{URL: srv.URL, Key: goldenKey, Client: srv.Client(), now: func() time.Time { return goldenNow }}
	calls := goldenCalls()
	for i, c := range calls {
		if err := c.call(context.Background(), h); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		mu.Lock()
		if len(got) != i+1 {
			t.Fatalf("%s posted %d requests, want 1", c.name, len(got)-i)
		}
		got[i].Name = c.name
		mu.Unlock()
	}
	return got
}

// TestGolden: the webhook plugin posts testdata/golden.json's requests
// byte for byte from the golden calls (headers and body), and a receiver
// that follows the documentation verifies each golden request with today's
// Verify and reads its members. A change here is a change of what every
// webhook receiver parses: a new event type or version, not a test update.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	made := posted(t)
	want := golden.JSON(t, path, made)
	if len(want) != len(made) {
		t.Fatalf("%s holds %d requests, the test makes %d (go test -update rewrites it)", path, len(want), len(made))
	}
	for i, v := range want {
		t.Run(v.Name, func(t *testing.T) {
			got := made[i]
			for _, f := range []struct{ name, got, want string }{
				{"name", got.Name, v.Name}, {"Keyward-Event-Id", got.EventID, v.EventID}, {"Keyward-Signature", got.Signature, v.Signature}, {"body", got.Body, v.Body},
			} {
				if f.got != f.want {
					t.Errorf("the webhook's format changed: %s of %q%s:\n got %s\nwant %s\n(a change in %s is a format change; go test -update rewrites it)",
						f.name, v.Name, bodyMembers(f.name, f.got, f.want), f.got, f.want, path)
				}
			}
			receive(t, v)
		})
	}
}

// receive checks a golden request as a receiver does: the signature over
// the body at its time, the members the package doc lists, and the id in
// the body equal to the header's; a changed body does not verify.
func receive(t *testing.T, r request) {
	t.Helper()
	if err := Verify(goldenKey, r.Signature, []byte(r.Body), goldenNow.Add(30*time.Second), time.Minute); err != nil {
		t.Fatalf("today's Verify refuses the golden request: %v", err)
	}
	if Verify(goldenKey, r.Signature, []byte(strings.Replace(r.Body, `"id":"`, `"id":"x`, 1)), goldenNow, time.Minute) == nil {
		t.Fatal("a changed golden body verifies")
	}
	var body struct {
		ID   string            `json:"id"`
		Type string            `json:"type"`
		Time time.Time         `json:"time"`
		Data map[string]string `json:"data"`
	}
	if err := json.Unmarshal([]byte(r.Body), &body); err != nil {
		t.Fatalf("the golden body is not {id, type, time, data}: %v", err)
	}
	if body.ID != r.EventID || !body.Time.Equal(goldenNow) || body.Type == "" || len(body.Data) == 0 {
		t.Fatalf("the golden body %s: id %q (header %q), time %v, type %q", r.Body, body.ID, r.EventID, body.Time, body.Type)
	}
}

// bodyMembers names the members of two bodies that differ (data.NAME for
// data's), or says that only their order or spacing does.
func bodyMembers(field, got, want string) string {
	var g, w map[string]any
	if field != "body" || json.Unmarshal([]byte(got), &g) != nil || json.Unmarshal([]byte(want), &w) != nil {
		return ""
	}
	flat := func(m map[string]any) map[string]any {
		out := map[string]any{}
		for k, v := range m {
			if d, ok := v.(map[string]any); ok && k == "data" {
				for dk, dv := range d {
					out["data."+dk] = dv
				}
			} else {
				out[k] = v
			}
		}
		return out
	}
	fg, fw := flat(g), flat(w)
	var names []string
	for k := range fg {
		if !reflect.DeepEqual(fg[k], fw[k]) {
			names = append(names, k)
		}
	}
	for k := range fw {
		if _, ok := fg[k]; !ok {
			names = append(names, k+" (gone)")
		}
	}
	if len(names) == 0 {
		return " (only in order or spacing: the same members and values)"
	}
	slices.Sort(names)
	return ", members " + strings.Join(names, ", ")
}
