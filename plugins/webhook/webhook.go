// Package webhook is the webhook plugin's logic: it POSTs keyward's events
// (revocations, and the steps of managed credentials' rotations) as JSON to
// a URL, signed with HMAC-SHA256 so the receiver can tell they come from
// keyward and were not replayed.
//
// A request:
//
//	POST <url>
//	Content-Type: application/json
//	Keyward-Event-Id: evt-00000000000000000042-9f86d081884c7d65
//	Keyward-Signature: t=1764460800,v1=<hex HMAC-SHA256(key, "1764460800." + body)>
//
//	{"id": "evt-00000000000000000042-9f86d081884c7d65", "type": "api_key.revoked", "time": "2026-11-30T00:00:00Z",
//	 "data": {"id": "ak_...", "subject": "team-a"}}
//
// Types: api_key.revoked, token.revoked, key_version.revoked,
// credential.revoked (data: id, subject), and credential.rotated,
// credential.retired (data: credential, handle, previous_handle). The id is
// keyward's operation ID: the same event retried has the same id, so the
// receiver can drop duplicates (delivery is at least once); take it from
// the signed body, not the header. Redirects are not followed. Any 2xx answer
// is success; anything else, or no answer, is retried (three times within a
// call, then by keywardd with backoff).
//
// Configuration, in the plugin's environment: KEYWARD_WEBHOOK_URL (http on
// loopback, https elsewhere), KEYWARD_WEBHOOK_KEY_FILE (the HMAC key, at
// least 32 bytes, the file readable by keywardd's user alone),
// KEYWARD_WEBHOOK_EVENTS (a comma-separated list of the event kinds:
// api_key, token, key_version, key_version_retired, credential,
// rotation_due, anomaly, api_key_leaked; default all).
package webhook

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
	"github.com/keyward/keyward/plugins/sdk"
)

// Hook posts events.
type Hook struct {
	URL    string
	Key    []byte
	Events []pluginv1.EventKind
	Client *http.Client
	now    func() time.Time
}

var kinds = map[string]pluginv1.EventKind{
	"api_key": pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED, "token": pluginv1.EventKind_EVENT_KIND_TOKEN_REVOKED,
	"key_version": pluginv1.EventKind_EVENT_KIND_KEY_VERSION_REVOKED, "credential": pluginv1.EventKind_EVENT_KIND_CREDENTIAL_REVOKED,
	"rotation_due": pluginv1.EventKind_EVENT_KIND_ROTATION_DUE, "anomaly": pluginv1.EventKind_EVENT_KIND_ANOMALY,
	"key_version_retired": pluginv1.EventKind_EVENT_KIND_KEY_VERSION_RETIRED,
	"api_key_leaked":      pluginv1.EventKind_EVENT_KIND_API_KEY_LEAKED,
}

// FromEnv reads the configuration from the environment.
func FromEnv() (*Hook, error) {
	u, err := url.Parse(os.Getenv("KEYWARD_WEBHOOK_URL"))
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, errors.New("KEYWARD_WEBHOOK_URL must be an http(s) URL")
	}
	if ip := net.ParseIP(u.Hostname()); u.Scheme == "http" && (ip == nil || !ip.IsLoopback()) && u.Hostname() != "localhost" {
		return nil, errors.New("KEYWARD_WEBHOOK_URL: plain http only to loopback; use https")
	}
	path := os.Getenv("KEYWARD_WEBHOOK_KEY_FILE")
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("KEYWARD_WEBHOOK_KEY_FILE: %v", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("KEYWARD_WEBHOOK_KEY_FILE %s: readable by others (mode %04o); chmod 0600 it", path, fi.Mode().Perm())
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("KEYWARD_WEBHOOK_KEY_FILE: %v", err)
	}
	key = bytes.TrimSpace(key)
	if len(key) < 32 {
		return nil, errors.New("KEYWARD_WEBHOOK_KEY_FILE: the key must be at least 32 bytes")
	}
	h := &Hook{URL: u.String(), Key: key, now: time.Now, Client: &http.Client{Timeout: 5 * time.Second,
		// A redirect would re-send the signed body elsewhere, perhaps in
		// the clear: it is an answer that is not 2xx, and retried.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
	list := os.Getenv("KEYWARD_WEBHOOK_EVENTS")
	if list == "" {
		list = "api_key,token,key_version,key_version_retired,credential,rotation_due,anomaly,api_key_leaked"
	}
	for _, k := range strings.Split(list, ",") {
		kind, ok := kinds[strings.TrimSpace(k)]
		if !ok {
			return nil, fmt.Errorf("KEYWARD_WEBHOOK_EVENTS: %q is not api_key, token, key_version, key_version_retired, credential, rotation_due, anomaly or api_key_leaked", k)
		}
		h.Events = append(h.Events, kind)
	}
	return h, nil
}

// Sign is the Keyward-Signature header of body at time t.
func Sign(key []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	m := hmac.New(sha256.New, key)
	m.Write([]byte(ts + "."))
	m.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(m.Sum(nil))
}

// Verify checks a Keyward-Signature header: the MAC, and a time within
// tolerance of now (so a captured request cannot be replayed later). For
// receivers written in Go.
func Verify(key []byte, header string, body []byte, now time.Time, tolerance time.Duration) error {
	var ts, sig string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sig = v
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || sig == "" {
		return errors.New("webhook: a malformed signature header")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return errors.New("webhook: the signature is too old or from the future")
	}
	want := Sign(key, time.Unix(sec, 0), body)
	if !hmac.Equal([]byte(want), []byte("t="+ts+",v1="+sig)) {
		return errors.New("webhook: the signature does not match")
	}
	return nil
}

// post sends one event, trying three times within ctx.
func (h *Hook) post(ctx context.Context, id, typ string, data any) error {
	if h.now == nil {
		h.now = time.Now
	}
	body, err := json.Marshal(map[string]any{"id": id, "type": typ, "time": h.now().UTC().Format(time.RFC3339), "data": data})
	if err != nil {
		return err
	}
	var last error
	for try, wait := 0, 200*time.Millisecond; try < 3; try, wait = try+1, wait*2 {
		if try > 0 {
			select {
			case <-ctx.Done():
				return fmt.Errorf("%v (then %w)", last, ctx.Err())
			case <-time.After(wait):
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.URL, bytes.NewReader(body))
		if err != nil {
			return fmt.Errorf("%w: %v", sdk.ErrPermanent, err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Keyward-Event-Id", id)
		req.Header.Set("Keyward-Signature", Sign(h.Key, h.now(), body))
		resp, err := h.Client.Do(req)
		if err != nil {
			last = err
			continue
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		if resp.StatusCode/100 == 2 {
			return nil
		}
		last = fmt.Errorf("the webhook answered %s", resp.Status)
	}
	sdk.Logger().Warn("the webhook did not take an event; keywardd retries it", "event", id, "type", typ, "error", last.Error())
	return last
}

// Revoke posts a revocation or a notice.
func (h *Hook) Revoke(ctx context.Context, op string, e sdk.Event) error {
	typ := map[pluginv1.EventKind]string{
		pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED: "api_key.revoked", pluginv1.EventKind_EVENT_KIND_TOKEN_REVOKED: "token.revoked",
		pluginv1.EventKind_EVENT_KIND_KEY_VERSION_REVOKED: "key_version.revoked", pluginv1.EventKind_EVENT_KIND_CREDENTIAL_REVOKED: "credential.revoked",
		pluginv1.EventKind_EVENT_KIND_ROTATION_DUE: "rotation.due", pluginv1.EventKind_EVENT_KIND_ANOMALY: "api_key.anomaly",
		pluginv1.EventKind_EVENT_KIND_KEY_VERSION_RETIRED: "key_version.retired", pluginv1.EventKind_EVENT_KIND_API_KEY_LEAKED: "api_key.leaked",
	}[e.Kind]
	if typ == "" {
		return fmt.Errorf("an event of kind %v: %w", e.Kind, sdk.ErrPermanent)
	}
	body := map[string]string{"id": e.ID, "subject": e.Subject}
	if e.Detail != "" {
		body["detail"] = e.Detail
	}
	return h.post(ctx, op, typ, body)
}

// Create makes nothing: a webhook credential is a notice, not a secret the
// receiver holds. The handle is the operation.
func (h *Hook) Create(_ context.Context, r sdk.CreateRequest) (sdk.CreateResult, error) {
	return sdk.CreateResult{Handle: r.OperationID}, nil
}

// Test has nothing to test.
func (h *Hook) Test(context.Context, sdk.TestRequest) error { return nil }

// Activate posts credential.rotated: the receiver fetches the new secret
// from keywardd (GetCredential) if it may.
func (h *Hook) Activate(ctx context.Context, r sdk.ActivateRequest) error {
	return h.post(ctx, r.OperationID+"-activate", "credential.rotated", map[string]string{"credential": r.Credential.Name, "handle": r.Handle, "previous_handle": r.PreviousHandle})
}

// Retire posts credential.retired.
func (h *Hook) Retire(ctx context.Context, r sdk.RetireRequest) error {
	return h.post(ctx, r.OperationID, "credential.retired", map[string]string{"credential": r.Credential.Name, "handle": r.Handle})
}
