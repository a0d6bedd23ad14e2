package webhook_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/webhook"
)

// receiver is a webhook endpoint that checks signatures and records what
// it took.
type receiver struct {
	key  []byte
	mu   sync.Mutex
	got  []map[string]any
	bad  int
	down bool
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	if err := webhook.Verify(r.key, req.Header.Get("Keyward-Signature"), body, time.Now(), time.Minute); err != nil {
		r.bad++
		http.Error(w, err.Error(), http.StatusUnauthorized)
		return
	}
	var m map[string]any
	if json.Unmarshal(body, &m) != nil || m["id"] != req.Header.Get("Keyward-Event-Id") || req.Header.Get("Content-Type") != "application/json" {
		r.bad++
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	r.got = append(r.got, m)
}

func (r *receiver) events() []map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]map[string]any(nil), r.got...)
}

// Setup is a receiver, its server and the plugin's environment.
func Setup(t *testing.T) (*receiver, map[string]string) {
	key := []byte("0123456789abcdef0123456789abcdef-test-key")
	kf := filepath.Join(t.TempDir(), "key")
	os.WriteFile(kf, key, 0o600)
	r := &receiver{key: key}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	return r, map[string]string{"KEYWARD_WEBHOOK_URL": srv.URL + "/keyward", "KEYWARD_WEBHOOK_KEY_FILE": kf}
}

// TestConformance: the webhook plugin, the real binary, passes the suite;
// every request it made was signed and well formed, and a retried step
// carried the same event ID.
func TestConformance(t *testing.T) {
	r, env := Setup(t)
	conformance.Run(t, conformance.Config{
		Binary: conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-webhook"),
		Name:   "webhook",
		Env:    env,
		Config: []byte(`{}`),
	})
	got := r.events()
	if r.bad != 0 || len(got) == 0 {
		t.Fatalf("%d bad requests, %d good", r.bad, len(got))
	}
	types := map[string]int{}
	ids := map[string]int{}
	for _, m := range got {
		types[m["type"].(string)]++
		ids[m["id"].(string)]++
	}
	for _, typ := range []string{"api_key.revoked", "token.revoked", "key_version.revoked", "credential.revoked", "credential.rotated", "credential.retired"} {
		if types[typ] == 0 {
			t.Errorf("no %s event: %v", typ, types)
		}
	}
	for id, n := range ids {
		if n != 2 { // the suite sends every step twice: the same ID both times
			t.Errorf("event %s arrived %d times, want 2 (once per try)", id, n)
		}
	}
}

func TestSignature(t *testing.T) {
	key := []byte("k")
	now := time.Unix(1764460800, 0)
	body := []byte(`{"id":"x"}`)
	h := webhook.Sign(key, now, body)
	if err := webhook.Verify(key, h, body, now.Add(30*time.Second), time.Minute); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		h    string
		body []byte
		at   time.Time
	}{
		"another body": {h, []byte(`{"id":"y"}`), now},
		"replayed":     {h, body, now.Add(2 * time.Minute)},
		"malformed":    {"v1=00", body, now},
	} {
		if webhook.Verify(key, c.h, c.body, c.at, time.Minute) == nil {
			t.Errorf("%s: verified", name)
		}
	}
}
