package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// watcher reads a watch stream into a channel.
type watcher struct {
	items chan *keywardv1.WatchResponse
	errs  chan error
	stop  context.CancelFunc
}

func watch(t *testing.T, ec keywardv1.EventServiceClient, req *keywardv1.WatchRequest) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := ec.Watch(ctx, req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	w := &watcher{items: make(chan *keywardv1.WatchResponse, 1000), errs: make(chan error, 1), stop: cancel}
	t.Cleanup(cancel)
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				w.errs <- err
				return
			}
			w.items <- r
		}
	}()
	return w
}

// next is the stream's next item, within 5 s.
func (w *watcher) next(t *testing.T) *keywardv1.WatchResponse {
	t.Helper()
	select {
	case r := <-w.items:
		return r
	case err := <-w.errs:
		t.Fatalf("the stream ended: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5 s")
	}
	return nil
}

// none says nothing more comes within a short while.
func (w *watcher) none(t *testing.T) {
	t.Helper()
	select {
	case r := <-w.items:
		t.Fatalf("an item not expected: %v", r)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestWatch: a watcher sees, in order and at once, what happens to the API
// keys, tokens, keys and versions its policy grants, and nothing else;
// it resumes after the last cursor it got, across a reconnect and a
// restart of keywardd; a cursor that is not this keywardd's gets a resync
// marker; the stream is audited.
func TestWatch(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll+"\n    tokens:\n      audiences: [orders]")))
	ctx := context.Background()
	ec := keywardv1.NewEventServiceClient(in.Conn)
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	tc := keywardv1.NewTokenServiceClient(in.Conn)

	w := watch(t, ec, &keywardv1.WatchRequest{})
	start := w.next(t)
	if start.GetStart() == nil || start.GetCursor() == "" {
		t.Fatalf("the first item %v; want the start, with a cursor", start)
	}
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: k.Key.Id, State: keywardv1.APIKeyState_API_KEY_STATE_DISABLED},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"state"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: k.Key.Id}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	minted, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tc.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: minted.Token}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "jwt"}); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"api_key_disabled " + k.Key.Id + " shop",
		"api_key_rotated " + k.Key.Id + " shop",
		"api_key " + k.Key.Id + " shop",
		"token " + minted.TokenId + " jwt",
		"key_version_created jwt/v2 jwt",
	}
	var last string
	for _, wnt := range want {
		r := w.next(t)
		e := r.GetEvent()
		if got := fmt.Sprint(e.GetKind(), " ", e.GetId(), " ", e.GetSubject()); got != wnt || r.GetCursor() == "" || e.GetTime() == nil {
			t.Fatalf("event %q (cursor %q); want %q", got, r.GetCursor(), wnt)
		}
		last = r.GetCursor()
	}
	w.none(t)
	w.stop()

	// Resumed after a cursor: what came after it, and not before.
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "jwt"}); err != nil {
		t.Fatal(err)
	}
	in.Stop()
	in.Restart()
	ec = keywardv1.NewEventServiceClient(in.Conn)
	ac = keywardv1.NewAPIKeyServiceClient(in.Conn)
	kc = keywardv1.NewKeyServiceClient(in.Conn)
	w = watch(t, ec, &keywardv1.WatchRequest{Cursor: last})
	if r := w.next(t); r.GetStart() == nil || r.GetCursor() != last {
		t.Fatalf("resumed: %v; want the start, at the cursor given", r)
	}
	if e := w.next(t).GetEvent(); e.GetKind() != "key_version_created" || e.GetId() != "jwt/v3" {
		t.Fatalf("after a restart, resumed: %v; want jwt/v3's creation", e)
	}
	w.none(t)
	w.stop()

	// A kinds filter; a cursor of another store (its nonce differs): a
	// resync marker first, then the events from the newest on.
	w = watch(t, ec, &keywardv1.WatchRequest{Cursor: strings.SplitN(last, ".", 2)[0] + ".0123456789abcdef", Kinds: []string{"key_version_created"}})
	if r := w.next(t); r.GetResync() == nil || !strings.Contains(r.GetResync().GetReason(), "no longer kept") {
		t.Fatalf("a cursor of another store: %v; want a resync marker", r)
	}
	if _, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "m", Environment: "prod", Permissions: []string{"orders:read"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "jwt"}); err != nil {
		t.Fatal(err)
	}
	if e := w.next(t).GetEvent(); e.GetKind() != "key_version_created" || e.GetId() != "jwt/v4" {
		t.Fatalf("with kinds [key_version_created]: %v", e)
	}
	w.stop()

	// Bad requests.
	for _, tc := range []struct {
		req  *keywardv1.WatchRequest
		code codes.Code
		msg  string
	}{
		{&keywardv1.WatchRequest{Cursor: "nonsense"}, codes.InvalidArgument, "not a cursor"},
		{&keywardv1.WatchRequest{Kinds: []string{"everything"}}, codes.InvalidArgument, `kind "everything"`},
	} {
		st, err := ec.Watch(ctx, tc.req)
		if err == nil {
			_, err = st.Recv()
		}
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%v: %v; want %v saying %q", tc.req, err, tc.code, tc.msg)
		}
	}

	// On record: the stream's opening and its end.
	b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if n := strings.Count(string(b), `"detail":"watch opened, from now"`); n < 1 {
		t.Errorf("the watch's opening is not in the audit log")
	}
	if !strings.Contains(string(b), `"detail":"watch ended: 5 events sent, 0 resync markers"`) {
		t.Errorf("the first watch's end is not in the audit log")
	}
}

// TestWatchPolicy: a watcher granted Watch on owner shop-a and key
// billing sees their events only; one granted no Watch is refused; a
// caller holds at most events.max_watchers streams.
func TestWatchPolicy(t *testing.T) {
	pol := uidPolicy(`      - operations: [EventService.Watch]
        keys: ["shop-a", "billing"]
      - operations: [APIKeyService.*, KeyService.*, TokenService.*]
        keys: ["*"]`)
	in := daemontest.Start(t, daemontest.Policy(pol), daemontest.Configure(func(c *daemon.Config) { c.Events.MaxWatchers = 2 }))
	ctx := context.Background()
	ec := keywardv1.NewEventServiceClient(in.Conn)
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	w := watch(t, ec, &keywardv1.WatchRequest{})
	w.next(t) // the start
	var ids []string
	for _, owner := range []string{"shop-a", "shop-b"} {
		k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, k.Key.Id)
		if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"payroll", "billing"} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
			t.Fatal(err)
		}
		if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	if e := w.next(t).GetEvent(); e.GetKind() != "api_key" || e.GetId() != ids[0] {
		t.Fatalf("first: %v; want shop-a's key revoked", e)
	}
	if e := w.next(t).GetEvent(); e.GetKind() != "key_version_created" || e.GetId() != "billing/v2" {
		t.Fatalf("second: %v; want billing's new version (not shop-b's key, not payroll)", e)
	}
	// A token revoked by its ID alone names no key: a watcher granted
	// Watch on some keys only is not sent it.
	if _, err := keywardv1.NewTokenServiceClient(in.Conn).RevokeToken(ctx, &keywardv1.RevokeTokenRequest{TokenId: "jti-of-someone-else"}); err != nil {
		t.Fatal(err)
	}
	w.none(t)
	// VerifyAPIKey says whether the caller may watch the key's owner.
	for i, owner := range []string{"shop-a", "shop-b"} {
		k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "v", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		r, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil || r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID || r.GetWatched() != (i == 0) {
			t.Errorf("verify of %s's key: %v, watched %v, %v; want watched %v", owner, r.GetCode(), r.GetWatched(), err, i == 0)
		}
	}
	// A policy reload: every watcher gets a resync marker at its place.
	in.SetPolicy(pol)
	if r := w.next(t); r.GetResync() == nil || !strings.Contains(r.GetResync().GetReason(), "policy was reloaded") {
		t.Fatalf("after a policy reload: %v; want a resync", r)
	}
	// Two streams at most: the second open, a third refused.
	w2 := watch(t, ec, &keywardv1.WatchRequest{})
	w2.next(t)
	st, err := ec.Watch(ctx, &keywardv1.WatchRequest{})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "events.max_watchers") {
		t.Errorf("a third stream: %v; want RESOURCE_EXHAUSTED naming events.max_watchers", err)
	}
	// One closed: a new one may open.
	w2.stop()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st, err := ec.Watch(ctx, &keywardv1.WatchRequest{})
		if err == nil {
			if _, err = st.Recv(); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("after one stream closed, another is refused: %v", err)
		}
	}
}

// TestWatchDenied: a caller granted no Watch is refused.
func TestWatchDenied(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(`      - operations: [KeyService.*]
        keys: ["*"]`)))
	st, err := keywardv1.NewEventServiceClient(in.Conn).Watch(context.Background(), &keywardv1.WatchRequest{})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.PermissionDenied || errors.Is(err, io.EOF) {
		t.Fatalf("%v; want PERMISSION_DENIED", err)
	}
}
