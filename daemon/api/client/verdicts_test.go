package client_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestVerdictCache: a VALID verdict is answered from the cache (keywardd
// audits one verification for two), dropped as the key's revocation
// arrives on the stream, never kept for a key with rate limits, and not
// used while the stream is broken (keywardd restarting).
func TestVerdictCache(t *testing.T) {
	in, c := started(t)
	ctx := context.Background()
	mk := func(unlimited bool) *keywardv1.CreateAPIKeyResponse {
		k, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}, Unlimited: unlimited})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	plain, limited := mk(true), mk(false) // the second with its role's default rate limits
	vc := c.NewVerdictCache(client.VerdictCacheOptions{})
	defer vc.Close()
	waitLive(t, vc, true)
	verifies := func() int {
		b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
		return strings.Count(string(b), `"op":"APIKeyService.VerifyAPIKey"`)
	}
	req := func(k *keywardv1.CreateAPIKeyResponse) *keywardv1.VerifyAPIKeyRequest {
		return &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: "192.0.2.1"}
	}
	code := func(k *keywardv1.CreateAPIKeyResponse) keywardv1.APIKeyCode {
		r, err := vc.Verify(ctx, req(k))
		if err != nil {
			t.Fatal(err)
		}
		return r.GetCode()
	}
	before := verifies()
	for range 3 {
		if got := code(plain); got != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("%v", got)
		}
	}
	if n := verifies() - before; n != 1 {
		t.Errorf("three verifications of a key without limits: keywardd answered %d; want 1, the others from the cache", n)
	}
	before = verifies()
	for range 3 {
		code(limited)
	}
	if n := verifies() - before; n != 3 {
		t.Errorf("three verifications of a key with rate limits: keywardd answered %d; want 3 (every use counted)", n)
	}
	// Unless the application takes the rate limits on itself.
	vl := c.NewVerdictCache(client.VerdictCacheOptions{CacheLimited: true})
	defer vl.Close()
	waitLive(t, vl, true)
	before = verifies()
	for range 3 {
		if r, err := vl.Verify(ctx, req(limited)); err != nil || r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("%v, %v", r, err)
		}
	}
	if n := verifies() - before; n != 1 {
		t.Errorf("with CacheLimited, three verifications of a key with rate limits: keywardd answered %d; want 1", n)
	}

	// Revoked: the event drops the verdict.
	if _, err := c.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: plain.Key.Id}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	for code(plain) != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		if time.Since(revoked) > 5*time.Second {
			t.Fatal("the cache still answers VALID 5 s after the revocation")
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("the cache answered REVOKED %v after the revocation's answer", time.Since(revoked))

	// The stream broken: nothing from the cache until it is open again.
	other := mk(true)
	code(other)
	in.Stop()
	waitLive(t, vc, false)
	if _, err := vc.Verify(ctx, req(other)); err == nil {
		t.Error("keywardd stopped, the stream broken, and the cache still answered")
	}
	in.Restart()
	waitLive(t, vc, true)
	before = verifies()
	code(other)
	if n := verifies() - before; n != 1 {
		t.Errorf("after the stream came back, the first verification: keywardd answered %d; want 1 (the cache was dropped)", n)
	}
}

// started is a keywardd for the test and a client of it.
func started(t *testing.T, opts ...daemontest.Option) (*daemontest.Daemon, *client.Client) {
	t.Helper()
	in := daemontest.Start(t, opts...)
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return in, c
}

func waitLive(t *testing.T, vc *client.VerdictCache, want bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		live, err := vc.Live()
		if err != nil {
			t.Fatalf("the cache stopped: %v", err)
		}
		if live == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache is not live=%v after 10 s", want)
		}
	}
}

// TestVerdictCacheUnwatched: a verdict of a key whose owner the caller may
// not watch is never kept (its revocation would never reach the cache).
func TestVerdictCacheUnwatched(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  gateway:
    permissions:
      - operations: [EventService.Watch]
        keys: ["shop-a"]
      - operations: [APIKeyService.*]
        keys: ["*"]
bindings:
  - role: gateway
    callers:
      - uid: %d
`, os.Getuid())))
	ctx := context.Background()
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop-b", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}, Unlimited: true})
	if err != nil {
		t.Fatal(err)
	}
	vc := c.NewVerdictCache(client.VerdictCacheOptions{})
	defer vc.Close()
	waitLive(t, vc, true)
	req := &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}}
	if r, err := vc.Verify(ctx, req); err != nil || r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID || r.GetWatched() {
		t.Fatalf("%v, %v", r, err)
	}
	if _, err := c.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
		t.Fatal(err)
	}
	if r, err := vc.Verify(ctx, req); err != nil || r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Fatalf("right after the revocation of a key the cache cannot watch: %v, %v; want REVOKED", r.GetCode(), err)
	}
}
