package server

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// TestInterceptAudits: the interceptor audits a call whose handler ran,
// even if its client went away while it ran, and neither runs nor audits
// one its client cancelled, or whose deadline passed, before it ran; the
// call ends in its caller's budget when the interceptor returns. Over a
// real audit log on a SoftHSM2 token; the end-to-end version, over the
// socket, is daemon's TestResetCallsNotAudited.
func TestInterceptAudits(t *testing.T) {
	tok := softhsmtest.New(t)
	h, err := hsm.Open(hsm.Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	key := hsm.KeyID{Name: ReservedPrefix + "audit", Version: 1}
	if err := h.CreateKey(ctx, key, hsm.HMACSHA256); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "audit.log")
	al, err := audit.Open(path, h, key, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Parse([]byte("version: 1\n"), Ops())
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), store.Options{Key: make([]byte, store.KeySize)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, _ := New(Config{Store: st, Audit: al, Policy: pol})
	caller := &identity.Caller{UID: 4242} // PID 0: nothing to check alive
	info := &grpc.UnaryServerInfo{FullMethod: "/keyward.v1.StatusService/Ping"}

	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	for _, tc := range []struct {
		name    string
		ctx     func() (context.Context, context.CancelFunc)
		during  bool // the client cancels while the handler runs
		code    codes.Code
		ran     bool
		audited bool
	}{
		{"cancelled before it ran", func() (context.Context, context.CancelFunc) {
			c, cancel := context.WithCancel(ctx)
			cancel()
			return c, cancel
		}, false, codes.Canceled, false, false},
		{"past its deadline before it ran", func() (context.Context, context.CancelFunc) { return expired, func() {} }, false, codes.DeadlineExceeded, false, false},
		{"cancelled while it ran", func() (context.Context, context.CancelFunc) { return context.WithCancel(ctx) }, true, codes.OK, true, true},
		{"ran", func() (context.Context, context.CancelFunc) { return context.WithCancel(ctx) }, false, codes.OK, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, cancel := tc.ctx()
			defer cancel()
			ended := 0
			c = context.WithValue(peer.NewContext(c, &peer.Peer{AuthInfo: AuthInfo{Caller: caller}}), endKey{}, func() { ended++ })
			before := records(t, path)
			ran := false
			_, err := s.intercept(c, nil, info, func(ctx context.Context, _ any) (any, error) {
				ran = true
				if tc.during {
					cancel()
				}
				callFrom(ctx).detail = tc.name
				return "answer", nil
			})
			if status.Code(err) != tc.code || ran != tc.ran || ended != 1 {
				t.Fatalf("got %v, handler ran %v, ended %d times; want %v, %v, once", err, ran, ended, tc.code, tc.ran)
			}
			if got := records(t, path) - before; got != map[bool]int{true: 1, false: 0}[tc.audited] {
				t.Fatalf("%d audit records, audited %v", got, tc.audited)
			}
		})
	}
	if err := al.Close(); err != nil {
		t.Fatal(err)
	}
}

// records counts the call records in the audit log at path.
func records(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	if err := audit.Records(f, func(r audit.Record) error {
		if r.Op == "StatusService.Ping" {
			n++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}
