package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	daemontest.RemoveBuilt()
	os.Exit(code)
}

// TestFleet is make fleet as a new user meets it: three nodes serve, the
// printed sockets are theirs, what it says to try works (a key made on
// node 1 verifies on node 3 and, revoked on node 2, is refused there),
// and Ctrl-C stops it all and removes its directory.
func TestFleet(t *testing.T) {
	bin := filepath.Dir(daemontest.Build(t))
	dir := filepath.Join(t.TempDir(), "fleet")
	var out daemontest.Log // what run prints, read while it runs
	stop := make(chan os.Signal, 1)
	done := make(chan error, 1)
	go func() { done <- run(bin, dir, 3, &out, stop) }()
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(out.String(), "Try, in another terminal") {
		select {
		case err := <-done:
			t.Fatalf("run returned before the fleet served: %v\n%s", err, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fleet did not serve within 2 minutes:\n%s", out.String())
		}
	}
	var nodes []*client.Client
	for i := range 3 {
		sock := filepath.Join(dir, "node-"+string(rune('1'+i)), "keyward.sock")
		if !strings.Contains(out.String(), sock) {
			t.Fatalf("the printed instructions do not name %s:\n%s", sock, out.String())
		}
		c, err := client.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		nodes = append(nodes, c)
	}
	ctx := context.Background()
	k, err := nodes[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "demo", Name: "try", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func(want keywardv1.APIKeyCode) {
		t.Helper()
		for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
			v, err := nodes[2].APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
			if err == nil && v.Code == want {
				return
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("node 3: %v, %v; want %v", v.GetCode(), err, want)
			}
		}
	}
	verify(keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	if _, err := nodes[1].APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
		t.Fatal(err)
	}
	verify(keywardv1.APIKeyCode_API_KEY_CODE_REVOKED)

	stop <- os.Interrupt
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the fleet did not stop within a minute of Ctrl-C")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the fleet's directory is still there: %v", err)
	}
}
