package etcdstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

func openNode(t *testing.T, o NodeOptions) *Node {
	t.Helper()
	if o.Key == nil {
		o.Key = storetest.Key
	}
	n, err := OpenNode(o)
	if err != nil {
		t.Fatalf("OpenNode: %v", err)
	}
	return n
}

// TestNodeConformance: a node (reads from its local copy, writes through
// etcd) keeps every promise of the store's contract, read-your-writes
// included.
func TestNodeConformance(t *testing.T) {
	c := etcdtest.New(t, etcdtest.Config{Members: 3, MaxTxnOps: bigOps, MaxRequestBytes: bigBytes})
	cli := client(t, c)
	storetest.Run(t, func(t *testing.T) func() store.Backend {
		o := NodeOptions{
			Options: Options{Client: cli, Prefix: prefix(t), MaxTxnOps: bigOps, MaxRequestBytes: bigBytes, Timeout: bigTimeout},
			Path:    filepath.Join(t.TempDir(), "copy.db"),
		}
		return func() store.Backend { return openNode(t, o) }
	})
}

// logs is a logger whose records a test reads.
type logs struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logs) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.buf.Write(p)
	}), nil))
}

func (l *logs) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.buf.String(), s)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

const loaded = "the local copy was loaded from etcd"

// eventually waits up to 10 s for cond.
func eventually(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("after 10 s: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

// TestNodeFollows: what one node writes, another reads from its own copy
// soon after, and is told which buckets changed; a node started again
// resumes from its file's revision instead of reloading, and catches up
// with what was written while it was away.
func TestNodeFollows(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	p := prefix(t)
	dir := t.TempDir()
	var changed sync.Map
	var lb logs
	bo := NodeOptions{Options: Options{Client: client(t, c, c.Endpoint(1)), Prefix: p}, Path: filepath.Join(dir, "b.db"), Logger: lb.logger(),
		Changed: func(bucket string, changes []Change) {
			for _, c := range changes {
				changed.Store(bucket+"/"+c.Key, string(c.Rec))
			}
		}}
	a := openNode(t, NodeOptions{Options: Options{Client: client(t, c, c.Endpoint(0)), Prefix: p}, Path: filepath.Join(dir, "a.db")})
	defer a.Close()
	b := openNode(t, bo)
	put(t, a, store.BucketKeys, "k", "1")
	took := eventually(t, "node b never saw node a's write", func() bool {
		rec, err := b.Get(store.BucketKeys, "k")
		return err == nil && string(rec) == "1"
	})
	t.Logf("node b saw node a's write %v after it returned", took)
	eventually(t, "node b's Changed was not told k is 1", func() bool {
		rec, _ := changed.Load(store.BucketKeys + "/k")
		return rec == "1"
	})
	if b.Writes() != a.Writes() {
		t.Errorf("Writes: node a %d, node b %d", a.Writes(), b.Writes())
	}

	// Away: b's file stays at its revision while a writes and deletes.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	put(t, a, store.BucketKeys, "k", "2")
	put(t, a, store.BucketKeys, "new", "3")
	if err := a.Update(store.BucketKeys, "k", func([]byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	b = openNode(t, bo)
	defer b.Close()
	if n := lb.count(loaded); n != 1 {
		t.Errorf("node b loaded the prefix %d times; once (when new), then it resumes from its revision", n)
	}
	eventually(t, "node b did not catch up", func() bool {
		rec, err := b.Get(store.BucketKeys, "new")
		_, gone := b.Get(store.BucketKeys, "k")
		return err == nil && string(rec) == "3" && errors.Is(gone, store.ErrNotFound)
	})
}

func put(t *testing.T, b store.Backend, bucket, key, v string) {
	t.Helper()
	if err := b.Update(bucket, key, func([]byte) ([]byte, error) { return []byte(v), nil }); err != nil {
		t.Fatalf("Update %s: %v", key, err)
	}
}

// TestNodeCompacted: a node started again after etcd compacted the history
// it needs reloads the prefix and has every record, the deleted gone.
func TestNodeCompacted(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	cli := client(t, c)
	p := prefix(t)
	var lb logs
	o := NodeOptions{Options: Options{Client: cli, Prefix: p}, Path: filepath.Join(t.TempDir(), "copy.db"), Logger: lb.logger()}
	n := openNode(t, o)
	put(t, n, store.BucketKeys, "gone", "x")
	n.Close()
	w := open(t, Options{Client: cli, Prefix: p})
	put(t, w, store.BucketKeys, "k", "1")
	if err := w.Update(store.BucketKeys, "gone", func([]byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(t.Context(), "x")
	if err != nil {
		t.Fatal(err)
	}
	c.Compact(resp.Header.Revision)
	w.Close()
	n = openNode(t, o)
	defer n.Close()
	if got := lb.count(loaded); got != 2 {
		t.Errorf("the prefix was loaded %d times; want 2 (new, then compacted past)", got)
	}
	if rec, err := n.Get(store.BucketKeys, "k"); err != nil || string(rec) != "1" {
		t.Errorf("k: %q, %v", rec, err)
	}
	if _, err := n.Get(store.BucketKeys, "gone"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a record deleted while the node was away: %v, want ErrNotFound", err)
	}
}

// TestNodeStale: with quorum lost, a node reads from its copy until the
// staleness bound, then refuses (fail closed), and reads again once the
// cluster heals.
func TestNodeStale(t *testing.T) {
	c := etcdtest.NewCluster(t, 3)
	const bound = 5 * time.Second
	n := openNode(t, NodeOptions{Options: Options{Client: client(t, c, c.Endpoint(2)), Prefix: prefix(t), Timeout: time.Second},
		Path: filepath.Join(t.TempDir(), "copy.db"), Staleness: bound})
	defer n.Close()
	put(t, n, store.BucketKeys, "k", "1")
	before := time.Now()
	c.LoseQuorum() // about a second: the members stop
	if _, err := n.Get(store.BucketKeys, "k"); err != nil && time.Since(before) < bound-time.Second {
		t.Fatalf("a read %v after quorum was lost, within the bound: %v", time.Since(before), err)
	}
	var err error
	eventually(t, "reads never refused", func() bool {
		_, err = n.Get(store.BucketKeys, "k")
		return err != nil
	})
	refused := time.Now()
	var stale *StaleError
	if !errors.Is(err, store.ErrUnavailable) || !errors.As(err, &stale) {
		t.Fatalf("a read past the bound: %v, want a StaleError", err)
	}
	t.Logf("reads refused %v after quorum began to be lost: %v", refused.Sub(before), err)
	// Refused once the bound is past the moment the copy was last known
	// current, not before, and soon after (the reads poll every
	// millisecond; slack for a loaded machine).
	fresh := n.FreshAt()
	if fresh.After(before) {
		t.Errorf("the copy was known current at %v, after quorum began to be lost at %v", fresh, before)
	}
	if age := refused.Sub(fresh); age < bound || age > bound+time.Second {
		t.Errorf("reads refused %v after the copy was last known current; the bound is %v", age, bound)
	}
	if err := n.ForEach(store.BucketKeys, "", func(string, []byte) error { return nil }); !errors.As(err, &stale) {
		t.Errorf("a walk past the bound: %v, want a StaleError", err)
	}
	c.Heal()
	eventually(t, "reads not served again after healing", func() bool {
		_, err := n.Get(store.BucketKeys, "k")
		return err == nil
	})
}

// TestNodeCopyTampered: a value changed in the local copy's file is
// refused as one changed in etcd is.
func TestNodeCopyTampered(t *testing.T) {
	c := etcdtest.NewCluster(t, 1)
	cli := client(t, c)
	path := filepath.Join(t.TempDir(), "copy.db")
	o := NodeOptions{Options: Options{Client: cli, Prefix: prefix(t)}, Path: path}
	n := openNode(t, o)
	put(t, n, store.BucketKeys, "a", "1")
	put(t, n, store.BucketKeys, "b", "2")
	n.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		kv := tx.Bucket(copyKV[0])
		if kv == nil {
			kv = tx.Bucket(copyKV[1])
		}
		return kv.Put([]byte("b/"+store.BucketKeys+"/a"), kv.Get([]byte("b/"+store.BucketKeys+"/b")))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	var lb logs
	o.Logger = lb.logger()
	n = openNode(t, o)
	defer n.Close()
	if v, err := n.Get(store.BucketKeys, "a"); err != nil || string(v) != "1" {
		t.Fatalf("a value swapped in the local copy: %q, %v; want the copy loaded again from etcd", v, err)
	}
	if lb.count("do not add up") != 1 {
		t.Error("the reload of a changed copy is not logged")
	}
}

// TestNodeRecordPutBack: a record's older sealed value put back in etcd
// (the key before its revocation), or a record deleted, by anything but
// keywardd, is found at the revision that brings it: the node refuses
// every call, and a node loading the prefix refuses it too.
func TestNodeRecordPutBack(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tamper func(cli *clientv3.Client, key string, old, oldMeta *clientv3.GetResponse) error
	}{
		{"put back", func(cli *clientv3.Client, key string, old, _ *clientv3.GetResponse) error {
			_, err := cli.Put(context.Background(), key, string(old.Kvs[0].Value))
			return err
		}},
		{"deleted", func(cli *clientv3.Client, key string, _, _ *clientv3.GetResponse) error {
			_, err := cli.Delete(context.Background(), key)
			return err
		}},
		{"put back with its meta record", func(cli *clientv3.Client, key string, old, oldMeta *clientv3.GetResponse) error {
			_, err := cli.Txn(context.Background()).Then(clientv3.OpPut(key, string(old.Kvs[0].Value)),
				clientv3.OpPut(string(oldMeta.Kvs[0].Key), string(oldMeta.Kvs[0].Value))).Commit()
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := etcdtest.NewCluster(t, 1)
			cli := client(t, c)
			o := NodeOptions{Options: Options{Client: cli, Prefix: prefix(t)}, Path: filepath.Join(t.TempDir(), "copy.db")}
			n := openNode(t, o)
			defer n.Close()
			key := o.Prefix + "/b/" + store.BucketAPIKeys + "/ak_1"
			put(t, n, store.BucketAPIKeys, "ak_1", `{"state":"active"}`)
			old, err := cli.Get(context.Background(), key)
			if err != nil || len(old.Kvs) != 1 {
				t.Fatal(old, err)
			}
			oldMeta, err := cli.Get(context.Background(), o.Prefix+"/meta")
			if err != nil || len(oldMeta.Kvs) != 1 {
				t.Fatal(oldMeta, err)
			}
			put(t, n, store.BucketAPIKeys, "ak_1", `{"state":"revoked"}`)
			put(t, n, store.BucketAPIKeys, "ak_2", `{"state":"active"}`)
			if err := tc.tamper(cli, key, old, oldMeta); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for n.Err() == nil && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if err := n.Err(); !errors.Is(err, store.ErrDamaged) || !strings.Contains(err.Error(), "do not add up") && !strings.Contains(err.Error(), "older state") {
				t.Fatalf("after a record was %s in etcd the node says %v", tc.name, n.Err())
			}
			if _, err := n.Get(store.BucketAPIKeys, "ak_2"); !errors.Is(err, store.ErrDamaged) {
				t.Fatalf("a read after the state was found changed: %v", err)
			}
			o = n.o // with its key
			o.Path = filepath.Join(t.TempDir(), "fresh.db")
			if m, err := OpenNode(o); !errors.Is(err, store.ErrDamaged) {
				if m != nil {
					m.Close()
				}
				t.Fatalf("a new node on the changed state: %v", err)
			}
		})
	}
}

// TestNodeAheadOfEtcd: a copy at a later revision than etcd's (etcd
// restored from an older snapshot, same cluster) is loaded again, not
// trusted: another node's writes reach it, and its own are read back.
func TestNodeAheadOfEtcd(t *testing.T) {
	c := etcdtest.NewCluster(t, 1)
	cli := client(t, c)
	var lb logs
	o := NodeOptions{Options: Options{Client: cli, Prefix: prefix(t)}, Path: filepath.Join(t.TempDir(), "copy.db"), Logger: lb.logger()}
	n := openNode(t, o)
	put(t, n, store.BucketKeys, "k", "1")
	n.Close()
	db, err := bolt.Open(o.Path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(copyState).Put([]byte("rev"), binary.BigEndian.AppendUint64(nil, 1_000_000))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	n = openNode(t, o)
	defer n.Close()
	if got := lb.count(loaded); got != 2 {
		t.Errorf("the copy was loaded %d times; want 2 (new, then ahead of etcd)", got)
	}
	w := open(t, Options{Client: cli, Prefix: prefix(t)})
	defer w.Close()
	put(t, w, store.BucketKeys, "k", "2")
	eventually(t, "another writer's change never reached the node", func() bool {
		rec, err := n.Get(store.BucketKeys, "k")
		return err == nil && string(rec) == "2"
	})
	put(t, n, store.BucketKeys, "own", "3")
	if rec, err := n.Get(store.BucketKeys, "own"); err != nil || string(rec) != "3" {
		t.Errorf("the node's own write read back: %q, %v", rec, err)
	}
}

// twoNodes are two nodes of one fleet on a new 3-member cluster, each on a
// member of its own, closed when t ends.
func twoNodes(t *testing.T) (a, b *Node) {
	t.Helper()
	c := etcdtest.NewCluster(t, 3)
	p, dir := prefix(t), t.TempDir()
	a = openNode(t, NodeOptions{Options: Options{Client: client(t, c, c.Endpoint(0)), Prefix: p}, Path: filepath.Join(dir, "a.db")})
	t.Cleanup(func() { a.Close() })
	b = openNode(t, NodeOptions{Options: Options{Client: client(t, c, c.Endpoint(1)), Prefix: p}, Path: filepath.Join(dir, "b.db")})
	t.Cleanup(func() { b.Close() })
	return a, b
}

// TestNodeLock: the fleet's lock of a name is one node's at a time; a
// waiter gives up at its deadline, leaving no place in the queue; the next
// holder reads at once what the last one wrote under the lock.
func TestNodeLock(t *testing.T) {
	a, b := twoNodes(t)
	var _ store.Locker = a

	release, err := a.Lock(t.Context(), "keys/k")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	_, err = b.Lock(ctx, "keys/k")
	cancel()
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("a second node's lock of a held name: %v, want ErrUnavailable at its deadline", err)
	}
	if other, err := b.Lock(t.Context(), "keys/other"); err != nil {
		t.Fatalf("another name: %v", err)
	} else {
		other()
	}
	for i := range 20 {
		put(t, a, store.BucketKeys, "k", strconv.Itoa(i))
		release()
		// Well within the lease's TTL (10 s): a place the failed wait left
		// in the queue would hold the lock until it expired.
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		release, err = b.Lock(ctx, "keys/k")
		cancel()
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		// Under the lock, b's copy has a's last write, with no wait.
		if rec, err := b.Get(store.BucketKeys, "k"); err != nil || string(rec) != strconv.Itoa(i) {
			t.Fatalf("round %d: the next holder reads %q, %v", i, rec, err)
		}
		a, b = b, a
	}
	release()
}

// TestNodeSync: after Sync, a node reads every write committed anywhere
// before it, at once.
func TestNodeSync(t *testing.T) {
	a, b := twoNodes(t)
	var _ store.Syncer = b
	for i := range 50 {
		k := strconv.Itoa(i)
		put(t, a, store.BucketKeys, k, k)
		if err := b.Sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if rec, err := b.Get(store.BucketKeys, k); err != nil || string(rec) != k {
			t.Fatalf("after Sync, node b reads %s as %q, %v", k, rec, err)
		}
	}
}

// TestNodeLoadsInHalves: without etcd's stream, a prefix of many more
// records than a few pages is loaded by halving its range (etcd counts a
// whole range at every page): every record arrives once, whatever the
// split, and the digest adds up. (Every other test loads by the stream.)
func TestNodeLoadsInHalves(t *testing.T) {
	defer func(p int64, s bool) { reloadPage, streamReload = p, s }(reloadPage, streamReload)
	reloadPage, streamReload = 7, false // as with an etcd before 3.7, which does not stream
	c := etcdtest.NewCluster(t, 1)
	cli := client(t, c)
	w := open(t, Options{Client: cli, Prefix: prefix(t)})
	const n = 600
	for lo := 0; lo < n; lo += 100 {
		var keys []string
		for i := lo; i < lo+100; i++ {
			keys = append(keys, fmt.Sprintf("ak_%06x", i*7919%(1<<24)))
		}
		if err := w.UpdateEach(store.BucketAPIKeys, keys, func(k string, _ []byte) ([]byte, error) { return []byte(k), nil }); err != nil {
			t.Fatal(err)
		}
	}
	node := openNode(t, NodeOptions{Options: w.o, Path: filepath.Join(t.TempDir(), "copy.db")})
	defer node.Close()
	got := 0
	if err := node.ForEach(store.BucketAPIKeys, "", func(k string, v []byte) error {
		if string(v) != k {
			return fmt.Errorf("%s holds %q", k, v)
		}
		got++
		return nil
	}); err != nil || got != n {
		t.Fatalf("loaded %d of %d records: %v", got, n, err)
	}
}

func TestMidKey(t *testing.T) {
	for _, tc := range [][2]string{{"a", "b"}, {"/k/b/", "/k/b0"}, {"ak_00", "ak_ff"}, {"x", "x\x00\x01"}, {"", "\xff"}} {
		m := midKey(tc[0], tc[1])
		if !(m >= tc[0] && m < tc[1]) {
			t.Errorf("midKey(%q, %q) = %q: not in the range", tc[0], tc[1], m)
		}
	}
	if m := midKey("a", "b"); m == "a" {
		t.Errorf("midKey(a, b) did not split")
	}
}

// TestNodeCopyBroken: a local copy that bbolt cannot open (a power cut
// while a reload wrote it without syncs) is moved aside and loaded again.
func TestNodeCopyBroken(t *testing.T) {
	c := etcdtest.NewCluster(t, 1)
	cli := client(t, c)
	dir := t.TempDir()
	o := NodeOptions{Options: Options{Client: cli, Prefix: prefix(t)}, Path: filepath.Join(dir, "copy.db")}
	n := openNode(t, o)
	put(t, n, store.BucketKeys, "k", "1")
	n.Close()
	if err := os.WriteFile(o.Path, []byte("not a bbolt file, but long enough to be read as one's first page...."), 0o600); err != nil {
		t.Fatal(err)
	}
	n = openNode(t, o)
	defer n.Close()
	if v, err := n.Get(store.BucketKeys, "k"); err != nil || string(v) != "1" {
		t.Fatalf("after the copy broke: %q, %v", v, err)
	}
	if aside, _ := filepath.Glob(o.Path + ".broken-*"); len(aside) != 1 {
		t.Errorf("the broken copy was not kept aside: %v", aside)
	}
}
