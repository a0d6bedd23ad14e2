package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/plugins/conformance"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

// TestFleetMigrate: a keywardd that ran on one host (API keys, one of them
// revoked, a root key rotated, a token revoked) is moved into etcd with
// keyward store migrate. A first run cut short leaves a state no node
// serves; run again, it goes on from its cursor and finishes; run once
// more, it says it is done. Then the host's keywardd and
// two new nodes serve the state as a fleet: every key, revocation and
// version as it was, and the host's audit log goes on.
func TestFleetMigrate(t *testing.T) {
	const keys = 1000
	bin := daemontest.Build(t)
	tok := softhsmtest.New(t)
	c := etcdtest.NewCluster(t, 1)
	ctx := context.Background()
	named := func(name string) daemontest.Option {
		return daemontest.Configure(func(cfg *daemon.Config) { cfg.Node = name })
	}
	one := daemontest.NewFiles(t, daemontest.SharedToken(tok), daemontest.Policy(fleetPolicy()), named("node-1"))

	// One host's state.
	p := daemontest.Exec(t, bin, one)
	cl, err := client.Dial(one.Socket)
	if err != nil {
		t.Fatal(err)
	}
	secrets := make([]string, keys)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < keys; i += 4 {
				k, err := cl.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-m", Name: fmt.Sprint("k", i), Environment: "prod", Permissions: []string{"orders:read"}})
				if err != nil {
					t.Error(err)
					return
				}
				secrets[i] = k.Secret
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	revoked, err := cl.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-m", Name: "revoked", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: revoked.Key.Id}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	dk, err := cl.Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "orders"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "sessions", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	tokn, err := cl.Tokens.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "sessions", Audiences: []string{"orders"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Tokens.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: tokn.Token}); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}

	// The host's configuration names the fleet's etcd from now on.
	one.Config.Store.Etcd = &daemon.EtcdConfig{Endpoints: c.Endpoints(), Prefix: "/keyward-fleet"}
	b, err := daemontest.MarshalConfig(one.Config)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(one.ConfigFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// A first run, cut after 20 transactions (the cursor moved at 16).
	cut, cancel := context.WithCancel(ctx)
	n := 0
	first, err := daemon.Migrate(cut, one.Config, daemon.MigrateOptions{Progress: func(daemon.MigrateProgress) {
		if n++; n == 20 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("the migration cut short: %+v, %v", first, err)
	}
	if _, err := daemontest.TryExec(t, bin, one); err == nil || !strings.Contains(err.Error(), "migration") {
		t.Fatalf("keywardd on a state half migrated: %v", err)
	}
	// keyward store migrate finishes it.
	kw := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward")
	out, err := exec.Command(kw, "store", "migrate", "-config", one.ConfigFile, "--output", "json").Output()
	if err != nil {
		t.Fatalf("keyward store migrate: %v\n%s", err, out)
	}
	var rep struct {
		Records, Total int64
		Resumed        bool
	}
	if err := json.Unmarshal(out, &rep); err != nil || !rep.Resumed || rep.Records >= rep.Total || rep.Records == 0 {
		t.Fatalf("the second run: %s (%v); want it resumed, copying less than all", out, err)
	}
	t.Logf("the second run copied %d of %d records", rep.Records, rep.Total)
	if again, err := daemon.Migrate(ctx, one.Config, daemon.MigrateOptions{}); err != nil || !again.Done {
		t.Fatalf("the migration run again once done: %+v, %v; want it to say it is done", again, err)
	}

	// The fleet: the host's keywardd, on its own data directory (its audit
	// log holds the bbolt store's count), and two new nodes.
	nodes := []*fleetNode{{name: "node-1", files: one, bin: bin}}
	for i := 2; i <= 3; i++ {
		f := daemontest.NewFiles(t, daemontest.SharedToken(tok), daemontest.Policy(fleetPolicy()), named(fmt.Sprint("node-", i)),
			daemontest.Configure(func(cfg *daemon.Config) { cfg.Store.Etcd = one.Config.Store.Etcd }))
		nodes = append(nodes, &fleetNode{name: fmt.Sprint("node-", i), files: f, bin: bin})
	}
	for _, node := range nodes {
		node.start(t)
	}
	last := nodes[2]
	verify := func(key string) keywardv1.APIKeyCode {
		r, err := last.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		return r.Code
	}
	for i, k := range secrets {
		if got := verify(k); got != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("key %d of %d made on one host, on node 3: %v", i, keys, got)
		}
	}
	if got := verify(revoked.Secret); got != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Errorf("the key revoked on one host, on node 3: %v", got)
	}
	if v, err := last.Tokens.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: tokn.Token, Audience: "orders"}); err != nil || v.Failure != keywardv1.TokenFailure_TOKEN_FAILURE_REVOKED {
		t.Errorf("the token revoked on one host, on node 3: %v, %v", v, err)
	}
	if pt, err := last.Envelope.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey}); err != nil || string(pt.Plaintext) != string(dk.Plaintext) {
		t.Errorf("a data key wrapped on one host, on node 3: %v", err)
	}
	if g, err := last.Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "orders"}); err != nil || g.KeyVersion != 2 {
		t.Errorf("the key rotated on one host, on node 3: version %d, %v", g.GetKeyVersion(), err)
	}
	// A migration while nodes run is refused.
	if _, err := daemon.Migrate(ctx, one.Config, daemon.MigrateOptions{}); err == nil || !strings.Contains(err.Error(), "stop every node") {
		t.Errorf("a migration while the fleet runs: %v", err)
	}
	// A write on the host's node goes on from the bbolt store's count.
	if _, err := nodes[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-m", Name: "after", Environment: "prod", Permissions: []string{"orders:read"}}); err != nil {
		t.Errorf("a write on the migrated host's node: %v", err)
	}
}
