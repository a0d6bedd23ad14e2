package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/plugins/conformance"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

// fleetNode is one keywardd process of a fleet.
type fleetNode struct {
	name  string
	bin   string
	files *daemontest.Files
	proc  *daemontest.Process
	*client.Client
}

// startFleet starts n keywardd processes on the etcd cluster c, sharing
// one SoftHSM2 token, one after the other; configure (if not nil) changes
// node i's store.etcd.
func startFleet(t testing.TB, c *etcdtest.Cluster, n int, configure func(i int, e *daemon.EtcdConfig), more ...func(*daemon.Config)) []*fleetNode {
	t.Helper()
	bin := daemontest.Build(t)
	tok := softhsmtest.New(t)
	nodes := make([]*fleetNode, n)
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i+1)
		f := daemontest.NewFiles(t, daemontest.SharedToken(tok), daemontest.Policy(fleetPolicy()), daemontest.Configure(func(cfg *daemon.Config) {
			cfg.Store.Etcd = &daemon.EtcdConfig{Endpoints: c.Endpoints(), Prefix: "/keyward-fleet"}
			if configure != nil {
				configure(i, cfg.Store.Etcd)
			}
			cfg.Node = name
			for _, fn := range more {
				fn(cfg)
			}
		}))
		nodes[i] = &fleetNode{name: name, files: f, bin: bin}
		nodes[i].start(t)
	}
	return nodes
}

// start starts (or starts again) the node's process, and connects to it.
func (n *fleetNode) start(t testing.TB) {
	t.Helper()
	n.proc = daemontest.Exec(t, n.bin, n.files)
	cl, err := client.Dial(n.files.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	n.Client = cl
}

// leader waits for exactly one node of n to say it leads, and returns it.
func leader(t testing.TB, n []*fleetNode) *fleetNode {
	t.Helper()
	var found *fleetNode
	within(t, "not exactly one node leads the fleet", func() (bool, string) {
		found = nil
		var leaders, live []string
		said := map[string]*keywardv1.FleetStatus{}
		for _, node := range n {
			if node.proc.Exited() {
				continue
			}
			st, err := node.Status.GetStatus(context.Background(), &keywardv1.GetStatusRequest{})
			if err != nil {
				return false, err.Error()
			}
			live = append(live, node.name)
			said[node.name] = st.GetFleet()
			if st.GetFleet().GetLeader() {
				leaders = append(leaders, node.name)
				found = node
			}
		}
		if len(leaders) != 1 {
			return false, fmt.Sprint("leaders: ", leaders)
		}
		// Every node names the live nodes (a killed one's campaign lasts
		// until its lease ends) and the leader (GetStatus's
		// FleetStatus.nodes and leader_node, counted every second).
		for name, f := range said {
			for _, l := range live {
				if !slices.Contains(f.GetNodes(), l) || f.GetLeaderNode() != leaders[0] {
					return false, fmt.Sprintf("%s says the fleet is %v led by %q; want %v among them, led by %s", name, f.GetNodes(), f.GetLeaderNode(), live, leaders[0])
				}
			}
		}
		return true, ""
	})
	return found
}

// fleetPolicy grants the test every operation, and tokens for "orders".
func fleetPolicy() string {
	return fmt.Sprintf(`version: 1
roles:
  all:
    permissions:
      - operations: ["*"]
        keys: ["*"]
    tokens:
      audiences: [orders]
bindings:
  - role: all
    callers:
      - uid: %d
`, os.Getuid())
}

// within waits up to 10 s for cond, and says how long it took.
func within(t testing.TB, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	return withinFor(t, 10*time.Second, what, cond)
}

// withinFor waits up to d for cond.
func withinFor(t testing.TB, d time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, last := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("after %v, %s: %s", d, what, last)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestFleet: three keywardd processes on a 3-member etcd cluster share
// one state. An API key made on node 1 verifies on node 3 and, revoked on
// node 2, is refused on node 3; a token minted on node 1 verifies on node
// 2 and, revoked on node 3, is refused on node 2; a key rotated on node 1
// encrypts under its new version on node 2, which node 3 decrypts; each
// node's audit log names the node.
func TestFleet(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	n := startFleet(t, c, 3, nil)
	ctx := context.Background()
	leader(t, n)

	// Watchers on nodes 1 and 3, for revocations made on node 2.
	type seen struct {
		node string
		id   string
		err  error
	}
	revocations := make(chan seen, 16)
	for _, node := range []*fleetNode{n[0], n[2]} {
		wctx, cancel := context.WithCancel(ctx)
		t.Cleanup(cancel)
		started := make(chan struct{})
		go func() {
			err := node.Watch(wctx, client.WatchOptions{Kinds: []string{"api_key"}}, func(ch client.Change) error {
				if ch.Start {
					close(started)
				}
				if ch.Event != nil {
					select { // the bulk revocation's events are not read
					case revocations <- seen{node: node.name, id: ch.Event.GetId()}:
					default:
					}
				}
				return nil
			})
			select {
			case revocations <- seen{node: node.name, err: err}:
			default:
			}
		}()
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatalf("the watch on %s did not start", node.name)
		}
	}

	// API keys.
	created, err := n[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "orders", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func(node *fleetNode, want keywardv1.APIKeyCode) func() (bool, string) {
		return func() (bool, string) {
			resp, err := node.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: created.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
			if err != nil {
				return false, err.Error()
			}
			return resp.Code == want, resp.Code.String() + " " + resp.Reason
		}
	}
	took := within(t, "node 3 does not know the key node 1 made", verify(n[2], keywardv1.APIKeyCode_API_KEY_CODE_VALID))
	t.Logf("node 3 verified the key %v after node 1 made it", took)
	if _, err := n[1].APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: created.Key.Id}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	took = within(t, "node 3 still accepts the key node 2 revoked", verify(n[2], keywardv1.APIKeyCode_API_KEY_CODE_REVOKED))
	t.Logf("node 3 refused the key %v after node 2 revoked it", took)
	// The revocation on node 2 reaches the watchers of nodes 1 and 3.
	for got := map[string]bool{}; len(got) < 2; {
		select {
		case sn := <-revocations:
			if sn.err != nil || sn.id != created.Key.Id {
				t.Fatalf("the watch on %s: %q, %v; want the revocation of %s", sn.node, sn.id, sn.err, created.Key.Id)
			}
			got[sn.node] = true
			t.Logf("the watcher on %s had node 2's revocation %v after it", sn.node, time.Since(revoked).Round(time.Millisecond))
		case <-time.After(10 * time.Second):
			t.Fatalf("node 2's revocation reached the watchers of %v only", got)
		}
	}

	// A bulk revocation of more keys than one etcd transaction takes (128
	// operations by default): revoked in batches, refused everywhere.
	const bulk = 150
	var last string
	for i := range bulk {
		k, err := n[i%3].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-bulk", Name: fmt.Sprintf("k%d", i), Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		last = k.Secret
	}
	rv, err := n[1].APIKeys.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Owner: "team-bulk"})
	if err != nil || rv.Count != bulk {
		t.Fatalf("RevokeAPIKeys of %d keys on etcd's default limits: %v, %v", bulk, rv, err)
	}
	within(t, "node 3 accepts a key of a bulk revocation on node 2", func() (bool, string) {
		resp, err := n[2].APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: last, Environment: "prod", Permissions: []string{"orders:read"}})
		return err == nil && resp.Code == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, fmt.Sprint(resp.GetCode(), err)
	})

	// Tokens.
	if _, err := n[0].Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "sessions", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	var tok *keywardv1.MintTokenResponse
	within(t, "node 1 cannot mint with its new key", func() (bool, string) {
		tok, err = n[0].Tokens.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "sessions", Audiences: []string{"orders"}})
		return err == nil, fmt.Sprint(err)
	})
	verifyToken := func(node *fleetNode, want keywardv1.TokenFailure) func() (bool, string) {
		return func() (bool, string) {
			resp, err := node.Tokens.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: tok.Token, Audience: "orders"})
			if err != nil {
				return false, err.Error()
			}
			return resp.Valid == (want == keywardv1.TokenFailure_TOKEN_FAILURE_UNSPECIFIED) && resp.Failure == want, resp.Failure.String() + " " + resp.Reason
		}
	}
	within(t, "node 2 does not verify node 1's token", verifyToken(n[1], keywardv1.TokenFailure_TOKEN_FAILURE_UNSPECIFIED))
	if _, err := n[2].Tokens.RevokeToken(ctx, &keywardv1.RevokeTokenRequest{Token: tok.Token}); err != nil {
		t.Fatal(err)
	}
	took = within(t, "node 2 does not refuse the token node 3 revoked as revoked", verifyToken(n[1], keywardv1.TokenFailure_TOKEN_FAILURE_REVOKED))
	t.Logf("node 2 refused the token %v after node 3 revoked it", took)

	// Envelope keys, rotated.
	if _, err := n[0].Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	var dk *keywardv1.GenerateDataKeyResponse
	within(t, "node 2 cannot use node 1's new key", func() (bool, string) {
		dk, err = n[1].Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "orders"})
		return err == nil, fmt.Sprint(err)
	})
	if _, err := n[0].Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders"}); err != nil {
		t.Fatal(err)
	}
	within(t, "node 2 does not encrypt under the version node 1 rotated to", func() (bool, string) {
		dk, err = n[1].Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "orders"})
		return err == nil && dk.KeyVersion == 2, fmt.Sprint(dk.GetKeyVersion(), err)
	})
	within(t, "node 3 cannot decrypt what node 2 wrapped under version 2", func() (bool, string) {
		pt, err := n[2].Envelope.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey})
		return err == nil && string(pt.GetPlaintext()) == string(dk.Plaintext), fmt.Sprint(err)
	})

	// One key rotated on two nodes at once: each rotation a version of
	// its own (the fleet's lock of the key), every one usable everywhere.
	const each = 4
	errs := make(chan error, 2*each)
	var wg sync.WaitGroup
	for _, node := range n[:2] {
		wg.Go(func() {
			for range each {
				_, err := node.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders"})
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a rotation on two nodes at once: %v", err)
		}
	}
	const latest = 2 + 2*each
	within(t, "node 3 does not encrypt under the last of the concurrent rotations", func() (bool, string) {
		dk, err = n[2].Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "orders"})
		return err == nil && dk.KeyVersion == latest, fmt.Sprint(dk.GetKeyVersion(), err)
	})
	if pt, err := n[0].Envelope.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey}); err != nil || string(pt.Plaintext) != string(dk.Plaintext) {
		t.Errorf("node 1 decrypting version %d: %v", latest, err)
	}

	limitsAcrossFleet(t, n)
	windowsAcrossFleet(t, n)

	// Each node's own audit log, its name in every record.
	for _, node := range n {
		f, err := os.Open(filepath.Join(node.files.DataDir, "audit.log"))
		if err != nil {
			t.Fatal(err)
		}
		records := 0
		err = audit.Records(f, func(r audit.Record) error {
			records++
			if r.Node != node.name {
				return fmt.Errorf("a record of %s names the node %q: %+v", r.Op, r.Node, r)
			}
			return nil
		})
		f.Close()
		if err != nil || records == 0 {
			t.Errorf("%s's audit log (%d records): %v", node.name, records, err)
		}
		if st, err := node.Status.GetStatus(ctx, &keywardv1.GetStatusRequest{}); err != nil || st.GetFleet().GetNode() != node.name || st.GetStore().GetError() != "" {
			t.Errorf("%s's status: %v, %v", node.name, st, err)
		}
		if strings.Contains(node.proc.Log(), created.Secret) {
			t.Errorf("%s logged an API key's secret", node.name)
		}
	}
}

// limitsAcrossFleet: a key's rate limit and its quota hold across the
// fleet's nodes, hammered on all of them at once, within the bound
// daemon/apikeys/fleet.go states (N·b over, in a window with no refill to
// speak of), and the nodes write to etcd a block at a time, not a
// verification at a time.
func limitsAcrossFleet(t *testing.T, n []*fleetNode) {
	ctx := context.Background()
	const limit, per, tries = 240, 4 * 150, 150 // per node: 4 callers, 150 tries each
	b := apikeys.FleetBlock(limit, len(n))
	for _, tc := range []struct {
		name    string
		req     *keywardv1.CreateAPIKeyRequest
		refused keywardv1.APIKeyCode
	}{
		{"rate limit", &keywardv1.CreateAPIKeyRequest{RateLimits: []*keywardv1.RateLimit{{Limit: limit, Per: durationpb.New(24 * time.Hour), Burst: limit}}},
			keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED},
		{"quota", &keywardv1.CreateAPIKeyRequest{Unlimited: true, Quota: &keywardv1.Quota{Remaining: limit}},
			keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED},
	} {
		req := tc.req
		req.Owner, req.Name, req.Environment, req.Permissions = "team-limits", tc.name, "prod", []string{"orders:read"}
		k, err := n[0].APIKeys.CreateAPIKey(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		var onShare atomic.Int64 // admitted on a node's own share: etcd was slow
		verify := func(node *fleetNode, env string) (keywardv1.APIKeyCode, error) {
			resp, err := node.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: env, Permissions: []string{"orders:read"}})
			if resp.GetCode() == keywardv1.APIKeyCode_API_KEY_CODE_VALID && resp.GetReason() == apikeys.OnNodeShare {
				onShare.Add(1)
			}
			return resp.GetCode(), err
		}
		for _, node := range n { // known everywhere, nothing spent (the environment is checked first)
			within(t, node.name+" does not know the key", func() (bool, string) {
				code, err := verify(node, "staging")
				return code == keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT, fmt.Sprint(code, err)
			})
		}
		revision := func() int64 {
			st, err := n[0].Status.GetStatus(ctx, &keywardv1.GetStatusRequest{})
			if err != nil {
				t.Fatal(err)
			}
			return st.GetFleet().GetRevision()
		}
		rev := revision()
		var valid atomic.Int64
		var wg sync.WaitGroup
		for _, node := range n {
			for range per / tries {
				wg.Go(func() {
					for range tries {
						code, err := verify(node, "prod")
						switch {
						case err != nil:
							t.Errorf("%s: %v", node.name, err)
							return
						case code == keywardv1.APIKeyCode_API_KEY_CODE_VALID:
							valid.Add(1)
						case code != tc.refused && code != keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED:
							t.Errorf("%s answered %v", node.name, code)
							return
						}
					}
				})
			}
		}
		wg.Wait()
		got, writes, verifications, shared := int(valid.Load()), revision()-rev, len(n)*per, int(onShare.Load())
		t.Logf("%s of %d across %d nodes: %d admitted of %d verifications (b = %d; %d on a node's own share, etcd slow), %d etcd revisions meanwhile",
			tc.name, limit, len(n), got, verifications, b, shared, writes)
		// The bound; and, where etcd was slow enough for a node to answer
		// on its own share (a loaded machine), what the nodes said they
		// admitted so.
		if got > limit+len(n)*b+shared || got < limit-2*len(n)*b {
			t.Errorf("%s of %d: the fleet admitted %d; the bound is %d to %d (+%d on nodes' own shares)", tc.name, limit, got, limit-2*len(n)*b, limit+len(n)*b, shared)
		}
		if writes > int64(verifications/5) {
			t.Errorf("%s: %d etcd revisions for %d verifications: not a write a block", tc.name, writes, verifications)
		}
	}
}

// windowsAcrossFleet: a limit window scheduled on one node applies on
// every node, and its cancellation on another node too: each node takes
// the others' writes from its change feed.
func windowsAcrossFleet(t *testing.T, n []*fleetNode) {
	ctx := context.Background()
	k, err := n[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-windows", Name: "sale", Environment: "prod",
		Permissions: []string{"orders:read"}, RateLimits: []*keywardv1.RateLimit{{Limit: 1000, Per: durationpb.New(24 * time.Hour), Burst: 1000}}})
	if err != nil {
		t.Fatal(err)
	}
	limitOn := func(node *fleetNode) (uint32, string) {
		v, err := node.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil || len(v.GetRateLimits()) == 0 {
			return 0, fmt.Sprint(v.GetCode(), err)
		}
		l := v.GetRateLimits()[0].GetLimit().GetLimit()
		return l, fmt.Sprint(v.GetCode(), " limit ", l)
	}
	w, err := n[1].APIKeys.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "team-windows", Factor: 2,
		EndTime: timestamppb.New(time.Now().Add(time.Hour)), Reason: "launch"})
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range n {
		took := within(t, node.name+" applies the window scheduled on "+n[1].name, func() (bool, string) {
			l, s := limitOn(node)
			return l == 2000, s
		})
		t.Logf("%s: the window applied within %v", node.name, took)
	}
	if _, err := n[2].APIKeys.CancelLimitWindow(ctx, &keywardv1.CancelLimitWindowRequest{Id: w.GetWindow().GetId()}); err != nil {
		t.Fatal(err)
	}
	for _, node := range n {
		within(t, node.name+" drops the window cancelled on "+n[2].name, func() (bool, string) {
			l, s := limitOn(node)
			return l == 1000, s
		})
	}
}

// TestFleetFaults: with one etcd member of three down, writes go on; the
// leader killed with SIGKILL, another node takes the jobs within the
// leader's lease, and the killed node, started again, has what was
// written meanwhile; with quorum lost, writes answer UNAVAILABLE,
// verifications go on from the local copy until the staleness bound and
// are then refused (status says why), and all serve again once etcd
// heals.
func TestFleetFaults(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	const bound = 5 * time.Second
	n := startFleet(t, c, 3, func(_ int, e *daemon.EtcdConfig) {
		e.Staleness = bound
		e.LeaderTTL = 2 * time.Second
		e.Timeout = 2 * time.Second
	})
	ctx := context.Background()
	create := func(node *fleetNode, name string) (*keywardv1.CreateAPIKeyResponse, error) {
		return node.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: name, Environment: "prod", Permissions: []string{"orders:read"}})
	}
	verify := func(node *fleetNode, key string) (keywardv1.APIKeyCode, error) {
		resp, err := node.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod", Permissions: []string{"orders:read"}})
		return resp.GetCode(), err
	}

	// One member of three down (the leader, even): writes go on.
	c.Kill(c.Leader())
	var k1 *keywardv1.CreateAPIKeyResponse
	within(t, "no write with one etcd member of three down", func() (bool, string) {
		var err error
		k1, err = create(n[0], "one-down")
		return err == nil, fmt.Sprint(err)
	})
	c.Heal()

	// The leader killed: another leads within its lease.
	first := leader(t, n)
	first.proc.Kill()
	killed := time.Now()
	second := leader(t, n)
	t.Logf("%s took over the fleet's jobs %v after %s was killed", second.name, time.Since(killed).Round(time.Millisecond), first.name)
	k2, err := create(second, "while-away")
	if err != nil {
		t.Fatal(err)
	}
	first.start(t)
	for _, k := range []*keywardv1.CreateAPIKeyResponse{k1, k2} {
		if code, err := verify(first, k.Secret); code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Errorf("%s, started again, verifies %s: %v, %v", first.name, k.Key.Name, code, err)
		}
	}

	// Quorum lost: served from the copy within the bound (the loss takes
	// a second or more: the members stop), writes refused, then every
	// call. What must hold however loaded the machine: no verification is
	// served once the bound is past (a second's slack for the check's
	// period); and one is served within it, when the test gets to ask.
	lost := time.Now()
	c.LoseQuorum()
	served, asked := 0, 0
	var last error
	check := func() bool {
		code, err := verify(n[2], k1.Secret)
		if err == nil && code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("without quorum: %v", code)
		}
		if since := time.Since(lost); err == nil && since > bound+time.Second {
			t.Errorf("a verification served %v after quorum began to be lost; the bound is %v", since, bound)
		}
		if time.Since(lost) < bound-time.Second {
			asked++
			if err == nil {
				served++
			}
		}
		last = err
		return err != nil
	}
	check()
	if _, err := create(n[2], "no-quorum"); status.Code(err) != codes.Unavailable {
		t.Errorf("a write without quorum: %v, want UNAVAILABLE", err)
	}
	within(t, "verifications never refused without quorum", func() (bool, string) {
		time.Sleep(20 * time.Millisecond) // within the key's rate limit
		return check(), fmt.Sprint(last)
	})
	t.Logf("verifications refused %v after quorum began to be lost (bound %v): %v", time.Since(lost).Round(time.Millisecond), bound, last)
	if status.Code(last) != codes.Unavailable || !strings.Contains(last.Error(), "staleness bound") {
		t.Errorf("a verification past the bound: %v, want UNAVAILABLE naming the staleness bound", last)
	}
	if asked > 0 && served == 0 {
		t.Errorf("no verification was served from the local copy within the bound (%d asked)", asked)
	}
	st, err := n[2].Status.GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil || !strings.Contains(st.GetStore().GetError(), "staleness bound") {
		t.Errorf("status past the bound: %v, %v; want the store's error", st.GetStore(), err)
	}
	c.Heal()
	for _, node := range n {
		within(t, node.name+" does not serve again after etcd healed", func() (bool, string) {
			code, err := verify(node, k2.Secret)
			return err == nil && code == keywardv1.APIKeyCode_API_KEY_CODE_VALID, fmt.Sprint(code, err)
		})
	}
}

// TestFleetPartition: a node cut off from etcd (the one member it knows
// stopped; the cluster keeps its quorum) goes on accepting a key revoked
// elsewhere for at most the staleness bound, then refuses every call; once
// it reaches etcd again it catches up and refuses the key as REVOKED.
func TestFleetPartition(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	const bound = 3 * time.Second
	n := startFleet(t, c, 2, func(i int, e *daemon.EtcdConfig) {
		e.Staleness = bound
		e.Timeout = time.Second
		if i == 1 {
			e.Endpoints = c.Endpoints()[2:] // node 2 knows member 2 only
		}
	})
	ctx := context.Background()
	k, err := n[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "p", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func() (keywardv1.APIKeyCode, error) {
		v, err := n[1].APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
		return v.GetCode(), err
	}
	within(t, "node 2 does not know the key", func() (bool, string) {
		code, err := verify()
		return code == keywardv1.APIKeyCode_API_KEY_CODE_VALID, fmt.Sprint(code, err)
	})
	cut := time.Now()
	c.Kill(2)
	// Node 1's client may have been on the killed member: a write fails
	// UNAVAILABLE until it moves to another, and is tried again. And node
	// 2 may have held the fleet's write lock (a usage flush) when it was
	// cut off: every node's writes then wait for its session's lease to
	// expire (etcdstore.DefaultSessionTTL, 10 s; docs/fleet.md).
	withinFor(t, 20*time.Second, "node 1 cannot revoke with one member of three down", func() (bool, string) {
		_, err := n[0].APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id})
		return err == nil, fmt.Sprint(err)
	})
	t.Logf("the revocation on node 1 returned %v after the member was killed", time.Since(cut).Round(time.Millisecond))
	var last error
	within(t, "the cut-off node never refused", func() (bool, string) {
		time.Sleep(20 * time.Millisecond) // within the key's rate limit
		code, err := verify()
		if err == nil && code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("the cut-off node answered %v: it cannot know of the revocation", code)
		}
		if since := time.Since(cut); err == nil && since > bound+time.Second {
			t.Errorf("the cut-off node accepted a revoked key %v after it was cut off; the bound is %v", since, bound)
		}
		last = err
		return err != nil, fmt.Sprint(code)
	})
	t.Logf("the cut-off node served until %v after it was cut off (bound %v), then: %v", time.Since(cut).Round(time.Millisecond), bound, last)
	if status.Code(last) != codes.Unavailable {
		t.Errorf("past the bound: %v, want UNAVAILABLE", last)
	}
	c.Start(2)
	within(t, "the node, back in touch, does not refuse the revoked key", func() (bool, string) {
		code, err := verify()
		return err == nil && code == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, fmt.Sprint(code, err)
	})
}

// TestFleetFirstStartTogether: three nodes making a fleet's first start at
// the same moment make keywardd's own keys once (the HSM's check for a key
// there is per process; the fleet's locks make it fleet-wide), and serve
// one state.
func TestFleetFirstStartTogether(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	bin := daemontest.Build(t)
	tok := softhsmtest.New(t)
	nodes := make([]*fleetNode, 3)
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i+1)
		f := daemontest.NewFiles(t, daemontest.SharedToken(tok), daemontest.Policy(fleetPolicy()), daemontest.Configure(func(cfg *daemon.Config) {
			cfg.Store.Etcd = &daemon.EtcdConfig{Endpoints: c.Endpoints(), Prefix: "/keyward-fleet"}
			cfg.Node = name
		}))
		nodes[i] = &fleetNode{name: name, files: f, bin: bin}
	}
	// Started as systemd starts them (docs/systemd/keywardd.service): again
	// after an exit it restarts (Restart=on-failure, but for the codes of
	// RestartPreventExitStatus), within its start limit. SoftHSM2's file
	// store can hide the token from a process that opens it while another
	// writes it (ExitTokenMissing, 69), or change an object under a read
	// (CKR_BUFFER_TOO_SMALL three times over, exit 1); a network HSM does
	// not.
	prevented := []int{64, 65, 77, 78, 243}
	var wg sync.WaitGroup
	for _, nd := range nodes {
		wg.Go(func() {
			for tries := 1; ; tries++ {
				p, err := daemontest.TryExec(t, nd.bin, nd.files)
				var exit *daemontest.ExitError
				if errors.As(err, &exit) && exit.Code() > 0 && !slices.Contains(prevented, exit.Code()) && tries < 3 {
					t.Logf("%s exited %d (a supervisor starts it again): %s", nd.name, exit.Code(), lastLine(exit.Log))
					continue
				}
				if err != nil {
					t.Errorf("%s: %v", nd.name, err)
					return
				}
				nd.proc = p
				break
			}
			cl, err := client.Dial(nd.files.Socket)
			if err != nil {
				t.Error(err)
				return
			}
			t.Cleanup(func() { cl.Close() })
			nd.Client = cl
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	ctx := context.Background()
	k, err := nodes[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "x", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, nd := range nodes {
		within(t, nd.name+" does not verify the key", func() (bool, string) {
			v, err := nd.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
			return err == nil && v.Code == keywardv1.APIKeyCode_API_KEY_CODE_VALID, fmt.Sprint(v.GetCode(), err)
		})
	}
	leader(t, nodes)
}

// lastLine is the last non-empty line of log.
func lastLine(log string) string {
	lines := strings.Split(strings.TrimSpace(log), "\n")
	return lines[len(lines)-1]
}

// TestFleetEvents: with the webhook plugin on every node, the revocations
// made on any node reach it once each (delivered by the elected node), in
// the order they were made.
func TestFleetEvents(t *testing.T) {
	kf := filepath.Join(t.TempDir(), "webhook-key")
	os.WriteFile(kf, []byte("0123456789abcdef0123456789abcdef-fleet"), 0o600)
	var (
		mu  sync.Mutex
		ids []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m struct {
			Type string
			Data map[string]string
		}
		json.NewDecoder(r.Body).Decode(&m)
		mu.Lock()
		ids = append(ids, m.Data["id"])
		mu.Unlock()
	}))
	defer srv.Close()
	bin := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-webhook")
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	plugin := daemon.PluginConfig{Name: "webhook", Path: bin, SHA256: hex.EncodeToString(sum[:]),
		Env: map[string]string{"KEYWARD_WEBHOOK_URL": srv.URL, "KEYWARD_WEBHOOK_KEY_FILE": kf, "KEYWARD_WEBHOOK_EVENTS": "api_key"}}
	c := etcdtest.NewCluster(t, 3)
	n := startFleet(t, c, 3, nil, func(cfg *daemon.Config) { cfg.Plugins = []daemon.PluginConfig{plugin} })
	ctx := context.Background()
	var want []string
	for i := range 9 {
		k, err := n[i%3].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: fmt.Sprintf("k%d", i), Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := n[(i+1)%3].APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
			t.Fatal(err)
		}
		want = append(want, k.Key.Id)
	}
	within(t, "the revocations did not all reach the webhook", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return len(ids) >= len(want), fmt.Sprint(len(ids), " of ", len(want))
	})
	time.Sleep(2 * time.Second) // a second delivery would come within the outbox's round (1 s)
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(ids, want) {
		t.Errorf("the webhook got %v, want each revocation once, in order: %v", ids, want)
	}
}

// TestFleetAnomalyRetry: anomaly.revoke names new_network, and the use
// from a new network comes while etcd has lost its quorum. The node that
// saw it refuses the key at once (the use itself too); the revocation
// cannot be written then, and keywardd tries again until it is: once etcd
// heals, the key is revoked on every node, and the audit log says the
// first try failed and a later one did it.
func TestFleetAnomalyRetry(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	n := startFleet(t, c, 2, func(_ int, e *daemon.EtcdConfig) {
		e.Staleness = time.Minute
		e.Timeout = time.Second
	}, func(cfg *daemon.Config) {
		cfg.Anomaly = anomaly.Config{Enabled: true, Learn: time.Second, NewNetworks: true, Revoke: []string{anomaly.NewNetwork}}
	})
	ctx := context.Background()
	k, err := n[0].APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "watched", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func(node *fleetNode, ip string) (keywardv1.APIKeyCode, error) {
		r, err := node.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: ip})
		return r.GetCode(), err
	}
	if code, err := verify(n[0], "10.0.0.1"); code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Fatalf("the first use: %v, %v", code, err)
	}
	time.Sleep(1100 * time.Millisecond) // past anomaly.learn, from the first use

	c.LoseQuorum()
	if code, err := verify(n[0], "198.51.100.7"); code != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Fatalf("the use from a new network, etcd without quorum: %v, %v; want REVOKED", code, err)
	}
	if code, err := verify(n[0], "10.0.0.1"); code != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Errorf("node 1 after the anomaly, its revocation not yet written: %v, %v; want it refused", code, err)
	}
	auditLog := filepath.Join(n[0].files.Config.DataDir, "audit.log")
	within(t, "the failed action is not audited", func() (bool, string) {
		b, _ := os.ReadFile(auditLog)
		return strings.Contains(string(b), "keywardd tries again until it is done"), lastLine(string(b))
	})

	c.Heal()
	// The retries back off (1 s, 2 s, 4 s, ...), and a try made before
	// etcd has a leader again waits for the store's timeout: on a loaded
	// machine the one that succeeds can come well after 10 s.
	withinFor(t, 40*time.Second, "node 2 does not refuse the key after etcd healed", func() (bool, string) {
		time.Sleep(100 * time.Millisecond) // within the key's rate limit
		code, err := verify(n[1], "10.0.0.1")
		return code == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, fmt.Sprint(code, err)
	})
	within(t, "the later try is not audited", func() (bool, string) {
		b, _ := os.ReadFile(auditLog)
		return strings.Contains(string(b), "keywardd revoked the key (anomaly.revoke names new_network) (on a later try: the first failed)"), lastLine(string(b))
	})
}
