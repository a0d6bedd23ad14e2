package daemon_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// jumpClock runs with real time, set ahead or back by an offset a test
// changes at will: a clock that jumps.
type jumpClock struct{ offset atomic.Int64 }

func (c *jumpClock) now() time.Time      { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *jumpClock) set(d time.Duration) { c.offset.Store(int64(d)) }

// TestClockJumps: keywardd's one clock, jumped an hour forward and back.
// Rate limits neither hand out a fresh bucket nor refuse for the hour the
// clock went back; tokens live by the clock; calls' deadlines are not
// touched; and a key past its deletion date only for as long as the clock
// ran ahead is not deleted, while one past it on a steady clock is.
func TestClockJumps(t *testing.T) {
	clk := &jumpClock{}
	in := daemontest.Start(t, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  r:
    permissions:
      - operations: ["*"]
        keys: ["*"]
    tokens:
      audiences: [orders]
      max_ttl: 10m
bindings:
  - role: r
    callers:
      - uid: %d
`, os.Getuid())))
	in.Stop()
	in.Now, in.KeysEvery = clk.now, 300*time.Millisecond
	in.Restart()
	ctx := context.Background()

	// Rate limits.
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "web", Environment: "prod", Permissions: []string{"orders:read"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 3, Per: durationpb.New(time.Minute), Burst: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func() *keywardv1.VerifyAPIKeyResponse {
		t.Helper()
		v, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod"})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for range 3 {
		if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("within the limit: %v", v.Code)
		}
	}
	clk.set(-time.Hour)
	v := verify()
	if v.Code != keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED {
		t.Fatalf("an hour back, a used-up bucket: %v", v.Code)
	}
	if ra := v.RetryAfter.AsDuration(); ra <= 0 || ra > 20*time.Second {
		t.Fatalf("an hour back: retry after %v, want at most the 20 s one request costs", ra)
	}
	clk.set(time.Hour)
	for range 3 {
		if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("an hour ahead, the bucket is full again: %v", v.Code)
		}
	}
	if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED {
		t.Fatalf("an hour ahead, more than a burst passed: %v", v.Code)
	}

	// Tokens live by the clock, and deadlines do not care.
	clk.set(0)
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	tc := keywardv1.NewTokenServiceClient(in.Conn)
	m, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}})
	if err != nil {
		t.Fatal(err)
	}
	valid := func() keywardv1.TokenFailure {
		t.Helper()
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		r, err := tc.VerifyToken(dctx, &keywardv1.VerifyTokenRequest{Token: m.Token, Audience: "orders"})
		if err != nil {
			t.Fatalf("a call with a 5 s deadline while the clock jumped: %v", err)
		}
		return r.Failure
	}
	clk.set(time.Hour)
	if f := valid(); f != keywardv1.TokenFailure_TOKEN_FAILURE_EXPIRED {
		t.Fatalf("an hour ahead, a 5-minute token: %v", f)
	}
	clk.set(0)
	if f := valid(); f != keywardv1.TokenFailure_TOKEN_FAILURE_UNSPECIFIED {
		t.Fatalf("back again, the token within its lifetime: %v", f)
	}

	// Deletion: due only while the clock ran an hour ahead.
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "doomed", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.ScheduleKeyDeletion(ctx, &keywardv1.ScheduleKeyDeletionRequest{Name: "doomed", WaitingPeriod: durationpb.New(7 * 24 * time.Hour)}); err != nil {
		t.Fatal(err)
	}
	// keywardd looks every 300 ms, and deletes only after three looks in a
	// row on a steady clock: within the 500 ms the clock runs ahead it
	// looks once or twice, and would delete the key at once if it did not
	// wait.
	week := 7 * 24 * time.Hour
	clk.set(week - 30*time.Minute) // half an hour before the date, then steady
	time.Sleep(1500 * time.Millisecond)
	clk.set(week + 30*time.Minute) // an hour ahead: the date passed
	time.Sleep(500 * time.Millisecond)
	clk.set(week - 30*time.Minute) // and set right again
	time.Sleep(1500 * time.Millisecond)
	if _, err := kc.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "doomed"}); err != nil {
		t.Fatalf("a key was deleted while the clock ran an hour ahead: %v", err)
	}
	// The date passes on a steady clock: it goes.
	clk.set(week + 30*time.Minute)
	waitFor(t, func() bool {
		_, err := kc.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "doomed"})
		return err != nil
	})
}
