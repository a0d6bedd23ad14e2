package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// unavailable is how a caller tells "etcd could not confirm this, try
// again later" from a refusal: the caller's deadline passed, or etcd
// answered with gRPC's Unavailable code (no leader, leader changed,
// request timed out, server stopped, unhealthy). It is what the etcd
// backend maps to store.ErrUnavailable.
func unavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var etcdErr rpctypes.EtcdError
	if errors.As(err, &etcdErr) {
		return etcdErr.Code() == codes.Unavailable
	}
	return status.Code(err) == codes.Unavailable
}

// tooLarge is how a caller tells that etcd refused a request for its
// size: a member checks the request against MaxRequestBytes
// (rpctypes.ErrRequestTooLarge), but gRPC itself refuses a message larger
// than MaxRequestBytes plus 512 KiB before etcd sees it
// (codes.ResourceExhausted).
func tooLarge(err error) bool {
	return errors.Is(err, rpctypes.ErrRequestTooLarge) || status.Code(err) == codes.ResourceExhausted
}

// put writes key=val through cli within 10 s, failing the test if it
// cannot.
func put(t *testing.T, cli *clientv3.Client, key, val string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Put(ctx, key, val)
	if err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
	return resp.Header.Revision
}

// get reads every key under prefix through cli (a linearizable read: it
// sees every write acknowledged before it), as key=value lines.
func get(t *testing.T, cli *clientv3.Client, prefix string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("get %s: %v", prefix, err)
	}
	var b strings.Builder
	for _, kv := range resp.Kvs {
		fmt.Fprintf(&b, "%s=%s\n", kv.Key, kv.Value)
	}
	return b.String()
}

// lines is what get answers for the given keys, each holding its own name.
func lines(keys ...string) string {
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s\n", k, k)
	}
	return b.String()
}

func TestEveryMemberServesPutAndGet(t *testing.T) {
	t.Parallel()
	c := NewCluster(t, 3)
	var keys []string
	for i := range c.Size() {
		key := fmt.Sprintf("every/%d", i)
		put(t, c.Client(t, c.Endpoint(i)), key, key)
		keys = append(keys, key)
	}
	for i := range c.Size() {
		if got, want := get(t, c.Client(t, c.Endpoint(i)), "every/"), lines(keys...); got != want {
			t.Errorf("member %d reads\n%swant\n%s", i, got, want)
		}
	}
}

// With one member of three down, stopped cleanly or killed, and the leader
// at that, writes go on; the member started again has every write.
func TestOneMemberDown(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		down func(c *Cluster, i int)
	}{
		{"stopped", (*Cluster).Stop},
		{"killed", (*Cluster).Kill},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := NewCluster(t, 3)
			cli := c.Client(t)
			put(t, cli, "one/before", "one/before")
			leader := c.Leader()
			tc.down(c, leader)
			if c.Running(leader) {
				t.Fatalf("member %d runs after going down", leader)
			}
			// A write during the election succeeds, or fails as
			// unavailable within its deadline; either way it may have
			// been applied.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := cli.Put(ctx, "one/election", "one/election")
			t.Logf("put during the election: %v", err)
			if err != nil && !unavailable(err) {
				t.Errorf("a put during the election failed with %v (code %v), not an unavailable error", err, status.Code(err))
			}
			c.WaitLeader()
			put(t, cli, "one/during", "one/during")
			c.Start(leader)
			put(t, cli, "one/after", "one/after")
			want := lines("one/after", "one/before", "one/during")
			got := strings.Replace(get(t, c.Client(t, c.Endpoint(leader)), "one/"), "one/election=one/election\n", "", 1)
			if got != want {
				t.Errorf("the member down and back reads\n%swant\n%s", got, want)
			}
		})
	}
}

// Without a quorum, a write fails within the caller's deadline, with an
// error that says "unavailable"; once the members are back, writes go on
// and every acknowledged one is there.
func TestQuorumLost(t *testing.T) {
	t.Parallel()
	c := NewCluster(t, 3)
	cli := c.Client(t)
	put(t, cli, "q/before", "q/before")
	stopped := c.LoseQuorum()
	if len(stopped) != 2 {
		t.Fatalf("LoseQuorum stopped %v, want 2 of 3", stopped)
	}

	for _, tc := range []struct {
		name string
		ctx  func(context.Context) context.Context
	}{
		// Just after the stop, the member left still follows the old
		// leader: it forwards the put and holds it until the deadline.
		{"plain", func(ctx context.Context) context.Context { return ctx }},
		// By now the member has given up its leader (an election timeout
		// passed). WithRequireLeader makes a member without a leader
		// answer at once, instead of holding the request.
		{"require leader", clientv3.WithRequireLeader},
		// What a put without WithRequireLeader gets from a member that
		// knows it has no leader.
		{"plain without a leader", func(ctx context.Context) context.Context { return ctx }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const deadline = 2 * time.Second
			ctx, cancel := context.WithTimeout(tc.ctx(context.Background()), deadline)
			defer cancel()
			start := time.Now()
			_, err := cli.Put(ctx, "q/during", "lost?")
			took := time.Since(start)
			t.Logf("put without quorum: %v after %v", err, took)
			if err == nil {
				t.Fatal("a put without quorum succeeded")
			}
			if !unavailable(err) {
				t.Errorf("a put without quorum failed with %v (%T, code %v), not an unavailable error", err, err, status.Code(err))
			}
			// The deadline bounds the wait (with room for a loaded machine).
			if took > deadline+5*time.Second {
				t.Errorf("a put without quorum took %v, past its %v deadline", took, deadline)
			}
		})
	}

	c.Heal()
	put(t, cli, "q/after", "q/after")
	// The failed puts may or may not have been applied (their commit was
	// never confirmed); what was acknowledged must be there.
	got := strings.Replace(get(t, cli, "q/"), "q/during=lost?\n", "", 1)
	if want := lines("q/after", "q/before"); got != want {
		t.Errorf("after healing the cluster reads\n%swant\n%s", got, want)
	}
}

func TestWatchResumesFromRevision(t *testing.T) {
	t.Parallel()
	c := NewCluster(t, 1)
	cli := c.Client(t)
	put(t, cli, "w/a", "1")
	from := put(t, cli, "w/b", "2")
	last := put(t, cli, "w/c", "3")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if got, want := watchUntil(t, cli.Watch(ctx, "w/", clientv3.WithPrefix(), clientv3.WithRev(from)), last), "w/b@2 w/c@3"; got != want {
		t.Errorf("watch from revision %d saw %q, want %q", from, got, want)
	}

	// A watcher that saw up to last resumes after it, and sees only
	// what came since.
	next := put(t, cli, "w/d", "4")
	if got, want := watchUntil(t, cli.Watch(ctx, "w/", clientv3.WithPrefix(), clientv3.WithRev(last+1)), next), "w/d@4"; got != want {
		t.Errorf("watch resumed after revision %d saw %q, want %q", last, got, want)
	}
}

// watchUntil reads events from wc until revision until, as "key@value"
// words.
func watchUntil(t *testing.T, wc clientv3.WatchChan, until int64) string {
	t.Helper()
	var seen []string
	for resp := range wc {
		if err := resp.Err(); err != nil {
			t.Fatalf("watch: %v", err)
		}
		for _, ev := range resp.Events {
			seen = append(seen, fmt.Sprintf("%s@%s", ev.Kv.Key, ev.Kv.Value))
			if ev.Kv.ModRevision >= until {
				return strings.Join(seen, " ")
			}
		}
	}
	t.Fatalf("watch ended after %v, before revision %d", seen, until)
	return ""
}

// A watch (or a read) from a revision that was compacted fails with
// rpctypes.ErrCompacted, and says the compaction's revision: a node that
// restarted past its history must reload.
func TestCompactedWatchFails(t *testing.T) {
	t.Parallel()
	c := NewCluster(t, 1)
	cli := c.Client(t)
	old := put(t, cli, "k/a", "1")
	put(t, cli, "k/a", "2")
	compacted := put(t, cli, "k/a", "3")
	c.Compact(compacted)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, ok := <-cli.Watch(ctx, "k/", clientv3.WithPrefix(), clientv3.WithRev(old))
	if !ok {
		t.Fatal("the watch from a compacted revision closed without an answer")
	}
	if err := resp.Err(); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Errorf("watch from compacted revision %d: %v, want %v", old, err, rpctypes.ErrCompacted)
	}
	if resp.CompactRevision != compacted {
		t.Errorf("watch says the history was compacted at %d, want %d", resp.CompactRevision, compacted)
	}
	if _, err := cli.Get(ctx, "k/a", clientv3.WithRev(old)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Errorf("get at compacted revision %d: %v, want %v", old, err, rpctypes.ErrCompacted)
	}
	// The compaction's own revision is kept.
	if got, want := watchUntil(t, cli.Watch(ctx, "k/", clientv3.WithPrefix(), clientv3.WithRev(compacted)), compacted), "k/a@3"; got != want {
		t.Errorf("watch from the compaction's revision saw %q, want %q", got, want)
	}
}

// etcd refuses a transaction of more than MaxTxnOps operations and a
// request of more than MaxRequestBytes, whole; a cluster takes other
// limits when a test sets them.
func TestLimits(t *testing.T) {
	t.Parallel()
	ops := func(n int) []clientv3.Op {
		out := make([]clientv3.Op, n)
		for i := range out {
			out[i] = clientv3.OpPut(fmt.Sprintf("l/%04d", i), "x")
		}
		return out
	}
	big := func(size int) []clientv3.Op { return []clientv3.Op{clientv3.OpPut("l/big", strings.Repeat("x", size))} }
	tooManyOps := func(err error) bool { return errors.Is(err, rpctypes.ErrTooManyOps) }
	for _, tc := range []struct {
		name    string
		cfg     Config
		ops     []clientv3.Op
		refused func(error) bool // nil: accepted
	}{
		{"128 ops by default", Config{}, ops(128), nil},
		{"129 ops refused by default", Config{}, ops(129), tooManyOps},
		{"129 ops with MaxTxnOps 200", Config{MaxTxnOps: 200}, ops(129), nil},
		{"1 MiB by default", Config{}, big(1 << 20), nil},
		{"1.5 MiB refused by default", Config{}, big(3 << 19), tooLarge},
		{"64 KiB refused with MaxRequestBytes 32 KiB", Config{MaxRequestBytes: 32 << 10}, big(64 << 10), tooLarge},
		{"1 MiB refused with MaxRequestBytes 32 KiB", Config{MaxRequestBytes: 32 << 10}, big(1 << 20), tooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.cfg.Members = 1
			cli := New(t, tc.cfg).Client(t)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := cli.Txn(ctx).Then(tc.ops...).Commit()
			t.Logf("txn: %v", err)
			want := int64(len(tc.ops))
			switch {
			case tc.refused == nil && err != nil:
				t.Fatalf("txn: %v, want it accepted", err)
			case tc.refused != nil && !tc.refused(err):
				t.Fatalf("txn: %v (code %v), want it refused", err, status.Code(err))
			case tc.refused != nil:
				want = 0 // all or nothing
			}
			n, err := cli.Get(ctx, "l/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				t.Fatal(err)
			}
			if n.Count != want {
				t.Errorf("%d keys written, want %d", n.Count, want)
			}
		})
	}
}

// BenchmarkNewCluster is what a test pays for a cluster: starting its
// members until they have a leader (ns/op), and then stopping them
// (stop-ms/op).
func BenchmarkNewCluster(b *testing.B) {
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			var stopping time.Duration
			for range b.N {
				c := NewCluster(b, n)
				b.StopTimer()
				start := time.Now()
				c.Close()
				stopping += time.Since(start)
				b.StartTimer()
			}
			b.ReportMetric(float64(stopping.Milliseconds())/float64(b.N), "stop-ms/op")
		})
	}
}

// NewCluster and Start retry on a port another process took; they can
// only if embed reports it as EADDRINUSE, for a peer and a client port.
func TestPortTakenIsAddrInUse(t *testing.T) {
	t.Parallel()
	for _, which := range []string{"peer", "client"} {
		t.Run(which, func(t *testing.T) {
			taken, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer taken.Close()
			ports, err := freePorts(1)
			if err != nil {
				t.Fatal(err)
			}
			free := net.JoinHostPort("127.0.0.1", ports[0])
			m := &member{name: "m0", dir: t.TempDir(),
				peerURL:   url.URL{Scheme: "http", Host: free},
				clientURL: url.URL{Scheme: "http", Host: taken.Addr().String()}}
			if which == "peer" {
				m.peerURL, m.clientURL = m.clientURL, m.peerURL
			}
			c := &Cluster{t: t, logger: testLogger(t)}
			e, err := embed.StartEtcd(c.embedConfig(m, m.name+"="+m.peerURL.String()))
			if err == nil {
				e.Close()
				t.Fatalf("etcd started on a taken %s port", which)
			}
			if !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("etcd on a taken %s port: %v, not EADDRINUSE", which, err)
			}
		})
	}
}
