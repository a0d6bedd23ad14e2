package etcdstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon/store"
)

// NodeOptions say where a node's local copy is, and how stale it may get.
type NodeOptions struct {
	Options
	// Path is the local copy's file (created 0600 if absent). It is a
	// cache of etcd: deleting it costs a reload, nothing else.
	Path string
	// Staleness is how long reads go on from the local copy after it was
	// last known current (etcd reached with quorum, every write up to then
	// applied); past it, every read fails with store.ErrUnavailable (fail
	// closed). Default DefaultStaleness.
	Staleness time.Duration
	// Logger receives what the node's watch goes through (nil: discarded).
	Logger *slog.Logger
	// Changed, if set, is called as the local copy takes a change (this
	// node's writes and every other node's), for each bucket changed, with
	// its records as they are now, in order, from the one goroutine that
	// feeds the copy, before a write waiting for the change returns: where
	// caches above the store drop or update what they hold. A reload,
	// which may change anything, calls it with nil changes for every
	// bucket. It must neither call the node nor wait for a lock held
	// across a write (the write waits for the copy, which waits for it).
	Changed func(bucket string, changes []Change)
}

// Change is a record the local copy saw change: Rec is the record now
// (checked), nil if it was deleted.
type Change struct {
	Key string
	Rec []byte
}

// DefaultStaleness is the staleness bound of NodeOptions.
const DefaultStaleness = 30 * time.Second

// The buckets of the local copy's file.
var (
	copyState = []byte("state") // active, rev, cluster, prefix
	copyKV    = [2][]byte{[]byte("kv0"), []byte("kv1")}
)

// Node is a fleet node's store.Backend: writes go to etcd through Backend
// (fenced, one writer at a time); reads are served from a local copy in a
// bbolt file, fed by a watch on the prefix, and refused once the copy was
// last known current longer ago than the staleness bound.
//
// The copy holds etcd's values as etcd holds them, sealed: a read opens
// (checks) the record as Backend does, so a value changed in the file is
// refused as one changed in etcd is. The file records the revision it
// reflects; a node started again resumes its watch there, and one whose
// revision etcd compacted away reloads the whole prefix into the other of
// two buckets and swaps it in, so that readers see one revision or the
// other, never a mix.
type Node struct {
	o      NodeOptions
	w      *Backend
	db     *bolt.DB
	seal   *store.Sealer
	prefix string // o.Prefix + "/"

	applied atomic.Int64 // every event up to it is in the file
	// freshAt is when the copy was last known current, as nanoseconds
	// since base plus one (0: never): on the monotonic clock, so that a
	// wall clock set back serves a stale copy no longer.
	base      time.Time
	freshAt   atomic.Int64
	freshWall atomic.Int64 // the same moment on the wall clock (unix ns), for a host that was suspended
	// rewound is set when etcd's revision is found below the copy's (etcd
	// restored from an older snapshot): the copy is of another history,
	// and is loaded again.
	rewound atomic.Bool
	writes  atomic.Uint64
	failed  atomic.Pointer[error]
	// digest is the XOR of the elements of every record in the copy
	// (store.Sealer.Element), and sealed the last meta record's digest:
	// after every revision the copy takes they must be equal, or records
	// changed in etcd that keywardd did not write. Only the watch's
	// goroutine (and start, before it) touches them.
	digest, sealed [32]byte

	// progress is the watch under way, to ask etcd for a progress
	// notification on (nil between watches).
	progress atomic.Pointer[progressor]

	amu     sync.Mutex
	advance *sync.Cond // signalled on every change of applied

	life   sync.RWMutex
	closed bool
	stop   context.CancelFunc
	done   sync.WaitGroup
}

var _ store.Backend = (*Node)(nil)

// OpenNode opens (or creates) the local copy at o.Path, brings it up to
// etcd's current revision, and starts following etcd. It returns once the
// copy is current: a new node reads the whole prefix first.
func OpenNode(o NodeOptions) (*Node, error) {
	if o.Path == "" {
		return nil, errors.New("etcdstore: a node needs the path of its local copy")
	}
	if o.Staleness <= 0 {
		o.Staleness = DefaultStaleness
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	w, err := Open(o.Options)
	if err != nil {
		return nil, err
	}
	db, err := bolt.Open(o.Path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil && !errors.Is(err, bolterrors.ErrTimeout) {
		// The copy is a cache: one that does not open (a power cut during
		// a reload, which writes without syncs) is moved aside and loaded
		// again from etcd.
		aside := fmt.Sprintf("%s.broken-%d", o.Path, time.Now().Unix())
		o.Logger.Warn("the local copy does not open: moved aside, and loaded again from etcd", "copy", o.Path, "aside", aside, "error", err.Error())
		if rerr := os.Rename(o.Path, aside); rerr == nil {
			db, err = bolt.Open(o.Path, 0o600, &bolt.Options{Timeout: time.Second})
		}
	}
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("etcdstore: the local copy %s: %w", o.Path, err)
	}
	o.Options = w.o // with its defaults
	n := &Node{o: o, w: w, db: db, seal: w.seal, prefix: o.Prefix + "/", base: time.Now()}
	n.advance = sync.NewCond(&n.amu)
	ctx, stop := context.WithCancel(context.Background())
	n.stop = stop
	if err := n.start(ctx); err != nil {
		stop()
		db.Close()
		w.Close()
		return nil, err
	}
	n.done.Add(2)
	go n.follow(ctx)
	go n.keepFresh(ctx)
	if err := n.waitFresh(o.Timeout); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// start reads the file's state, and reloads the prefix when the file is
// new or of another cluster or prefix.
func (n *Node) start(ctx context.Context) error {
	var rev int64
	var cluster uint64
	var prefix string
	err := n.db.Update(func(tx *bolt.Tx) error {
		st, err := tx.CreateBucketIfNotExists(copyState)
		if err != nil {
			return err
		}
		if v := st.Get([]byte("rev")); len(v) == 8 {
			rev = int64(binary.BigEndian.Uint64(v))
		}
		if v := st.Get([]byte("cluster")); len(v) == 8 {
			cluster = binary.BigEndian.Uint64(v)
		}
		prefix = string(st.Get([]byte("prefix")))
		_, err = tx.CreateBucketIfNotExists(copyKV[active(tx)])
		return err
	})
	if err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	id, now := n.clusterID(ctx)
	if now < rev && id == cluster {
		n.o.Logger.Warn("etcd is at an older revision than the local copy (restored from an older snapshot?): loading the copy again", "etcd", now, "copy", rev)
	}
	if rev == 0 || prefix != n.o.Prefix || id != cluster || now < rev {
		return n.reload(ctx)
	}
	n.setApplied(rev)
	if err := n.loadDigest(); errors.Is(err, errCopyDigest) {
		// The copy is a cache: etcd's own digest is checked as it loads.
		n.o.Logger.Warn("the local copy's records do not add up to its digest (the file was changed): loading it again from etcd", "copy", n.o.Path)
		return n.reload(ctx)
	} else if err != nil {
		return err
	}
	if err := n.loadWrites(); err != nil {
		return err
	}
	// etcd restored from an older snapshot, then written past the copy's
	// revision: its write count says it is behind the copy.
	if had := n.writes.Load(); n.w.Writes() < had {
		n.o.Logger.Warn("etcd's write count is below the local copy's (restored from an older snapshot?): loading the copy again", "etcd", n.w.Writes(), "copy", had)
		return n.reload(ctx)
	}
	return nil
}

// clusterID is the etcd cluster's ID and its current revision, read
// linearizably (0, 0 if they cannot be read: a reload, which says why).
func (n *Node) clusterID(ctx context.Context) (id uint64, rev int64) {
	ctx, cancel := context.WithTimeout(ctx, n.o.Timeout)
	defer cancel()
	resp, err := n.w.cli.Get(clientv3.WithRequireLeader(ctx), n.w.metaKey(), clientv3.WithCountOnly())
	if err != nil {
		return 0, 0
	}
	return resp.Header.ClusterId, resp.Header.Revision
}

// reload reads every record under the prefix at one revision, page by
// page, into the bucket readers do not use, then swaps it in with the
// revision, in one transaction.
func (n *Node) reload(ctx context.Context) error {
	var next int
	err := n.db.Update(func(tx *bolt.Tx) error {
		next = 1 - active(tx)
		if tx.Bucket(copyKV[next]) != nil {
			if err := tx.DeleteBucket(copyKV[next]); err != nil {
				return err
			}
		}
		_, err := tx.CreateBucket(copyKV[next])
		return err
	})
	if err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	// The new bucket is not read until the swap, which is synced: its
	// pages need no sync of their own (a crash before the swap leaves the
	// copy as it was, and the next start reloads).
	n.db.NoSync = true
	defer func() { n.db.NoSync = false }()
	// The first read is a linearizable read: the copy is current as of
	// the moment it was asked for; the rest read at its revision.
	asked := time.Now()
	var rev int64
	var cluster uint64
	var digest, sealed [32]byte
	records := 0
	get := func(from, to string, limit int64) (*clientv3.GetResponse, error) {
		cctx, cancel := context.WithTimeout(ctx, n.o.Timeout)
		defer cancel()
		opts := []clientv3.OpOption{clientv3.WithRange(to), clientv3.WithLimit(limit)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := n.w.cli.Get(clientv3.WithRequireLeader(cctx), from, opts...)
		if err != nil {
			return nil, fmt.Errorf("etcdstore: reloading the local copy: %w", mapErr(err))
		}
		if rev == 0 {
			rev, cluster = resp.Header.Revision, resp.Header.ClusterId
		}
		return resp, nil
	}
	put := func(kvs []*mvccpb.KeyValue) error {
		return n.db.Update(func(tx *bolt.Tx) error {
			kv := tx.Bucket(copyKV[next])
			kv.FillPercent = 0.95 // keys come in order: pages filled, not split in half
			for _, e := range kvs {
				k, ok := n.copyKey(e.Key)
				if !ok {
					continue
				}
				if err := kv.Put(k, e.Value); err != nil {
					return err
				}
				if string(k) == "meta" {
					m, err := n.w.openMeta([]*mvccpb.KeyValue{e})
					if err != nil {
						return err
					}
					sealed = m.digest
				} else {
					xor(&digest, n.seal.Element(e.Value))
				}
				records++
			}
			return nil
		})
	}
	// etcd counts every key of a range it is asked for, however few it
	// returns: paging through a million keys from one end would visit
	// them half a million times over. So a range of many keys is halved
	// until each holds a few pages, and those are paged through.
	var load func(from, to string) error
	load = func(from, to string) error {
		resp, err := get(from, to, reloadPage)
		if err != nil {
			return err
		}
		if resp.Count > 4*reloadPage && len(resp.Kvs) > 0 {
			// Halved between the range's first and last keys, not its
			// bounds: the keys share long prefixes (PREFIX/b/apikeys/ak_).
			cctx, cancel := context.WithTimeout(ctx, n.o.Timeout)
			last, err := n.w.cli.Get(clientv3.WithRequireLeader(cctx), from, clientv3.WithRange(to), clientv3.WithRev(rev),
				clientv3.WithLimit(1), clientv3.WithKeysOnly(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
			cancel()
			if err != nil {
				return fmt.Errorf("etcdstore: reloading the local copy: %w", mapErr(err))
			}
			hi := to
			if len(last.Kvs) == 1 {
				hi = string(last.Kvs[0].Key)
			}
			if m := midKey(string(resp.Kvs[0].Key), hi); m > from && m < to {
				if err := load(from, m); err != nil {
					return err
				}
				return load(m, to)
			}
		}
		for {
			if err := put(resp.Kvs); err != nil {
				return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
			}
			if !resp.More || len(resp.Kvs) == 0 {
				return nil
			}
			if resp, err = get(string(resp.Kvs[len(resp.Kvs)-1].Key)+"\x00", to, reloadPage); err != nil {
				return err
			}
		}
	}
	// etcd from 3.7 streams a range without counting it: one request.
	streamed := false
	if streamReload {
		var err error
		if streamed, err = n.stream(ctx, put, func(r int64, c uint64) { rev, cluster = r, c }); err != nil {
			return err
		}
	}
	if !streamed {
		if err := load(n.prefix, clientv3.GetPrefixRangeEnd(n.prefix)); err != nil {
			return err
		}
	}
	n.db.NoSync = false
	if err := n.db.Sync(); err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	err = n.db.Update(func(tx *bolt.Tx) error {
		st := tx.Bucket(copyState)
		if err := st.Put([]byte("active"), []byte{byte(next)}); err != nil {
			return err
		}
		if err := st.Put([]byte("prefix"), []byte(n.o.Prefix)); err != nil {
			return err
		}
		if err := st.Put([]byte("cluster"), binary.BigEndian.AppendUint64(nil, cluster)); err != nil {
			return err
		}
		if err := st.Put([]byte("rev"), binary.BigEndian.AppendUint64(nil, uint64(rev))); err != nil {
			return err
		}
		if digest != sealed {
			return n.fail(errDigest(rev))
		}
		if old := copyKV[1-next]; tx.Bucket(old) != nil {
			return tx.DeleteBucket(old)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	n.digest, n.sealed = digest, sealed
	n.rewound.Store(false)
	n.writes.Store(0) // the new copy's meta says (loadWrites)
	// Logged before it counts as fresh: whoever waits for that finds the
	// load said.
	n.o.Logger.Info("the local copy was loaded from etcd", "records", records, "revision", rev, "took", time.Since(asked).Round(time.Millisecond).String())
	n.markFresh(asked)
	if n.o.Changed != nil {
		for _, b := range store.Buckets() {
			n.o.Changed(b, nil)
		}
	}
	n.resetApplied(rev)
	return n.loadWrites()
}

// records is the bucket of records tx sees: the one its own state names,
// so that a read that began before a reload's swap reads the records as
// they were before it, whole.
func records(tx *bolt.Tx) *bolt.Bucket { return tx.Bucket(copyKV[active(tx)]) }

// active is which of copyKV holds the records, as tx sees it.
func active(tx *bolt.Tx) int {
	if v := tx.Bucket(copyState).Get([]byte("active")); len(v) == 1 && v[0] == 1 {
		return 1
	}
	return 0
}

// stream reads the prefix with etcd's RangeStream (etcd 3.7 and later),
// handing put the records a few thousand at a time and at its end the
// revision and cluster it read at. It says false, having read nothing,
// when etcd does not stream.
func (n *Node) stream(ctx context.Context, put func([]*mvccpb.KeyValue) error, at func(int64, uint64)) (bool, error) {
	sctx, cancel := context.WithTimeout(ctx, reloadStreamTimeout)
	defer cancel()
	// A member that stops sending for a request's timeout ends the
	// stream (the next try may reach another).
	idle := time.AfterFunc(n.o.Timeout, cancel)
	defer idle.Stop()
	ch, err := n.w.cli.GetStream(clientv3.WithRequireLeader(sctx), n.prefix, clientv3.WithRange(clientv3.GetPrefixRangeEnd(n.prefix)))
	if status.Code(err) == codes.Unimplemented {
		return false, nil
	}
	if err != nil {
		return true, fmt.Errorf("etcdstore: reloading the local copy: %w", mapErr(err))
	}
	fail := func(err error) (bool, error) {
		cancel()
		for range ch { // the client's goroutine ends once it has sent all
		}
		return true, err
	}
	var batch []*mvccpb.KeyValue
	got := false
	var rev int64
	for r := range ch {
		idle.Reset(n.o.Timeout)
		if err := r.Err(); err != nil {
			if !got && status.Code(err) == codes.Unimplemented {
				for range ch {
				}
				return false, nil
			}
			return fail(fmt.Errorf("etcdstore: reloading the local copy: %w", mapErr(err)))
		}
		got = true
		batch = append(batch, r.Kvs...)
		if len(batch) >= int(reloadPage) {
			if err := put(batch); err != nil {
				return fail(fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err))
			}
			batch = batch[:0]
		}
		if r.Header != nil && r.Header.Revision != 0 {
			rev = r.Header.Revision
			at(rev, r.Header.ClusterId)
		}
	}
	if !got || rev == 0 {
		return true, fmt.Errorf("etcdstore: reloading the local copy: the stream of %s ended without its revision", n.prefix)
	}
	if err := put(batch); err != nil {
		return true, fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	return true, nil
}

// streamReload: a reload streams when etcd can (tests turn it off to
// page, as with an older etcd).
var streamReload = true

// reloadStreamTimeout bounds a reload's stream: a few minutes for a few
// million records.
const reloadStreamTimeout = 10 * time.Minute

// midKey is a key between from and to (from < to), as the halfway point
// of the two read as base-256 fractions; from if there is none.
func midKey(from, to string) string {
	n := max(len(from), len(to)) + 1
	a := new(big.Int).SetBytes(append([]byte(from), make([]byte, n-len(from))...))
	b := new(big.Int).SetBytes(append([]byte(to), make([]byte, n-len(to))...))
	m := a.Add(a, b).Rsh(a, 1).Bytes()
	out := make([]byte, n) // left-padded back to n bytes
	copy(out[n-len(m):], m)
	return strings.TrimRight(string(out), "\x00")
}

// reloadPage is how many records a reload reads per request (about
// 1 KiB each: a few MiB an answer).
var reloadPage int64 = 5000

// copyKey is the key in the copy of etcd's key k: what follows the prefix,
// for the records and the meta record; ok is false for what the copy does
// not keep (the write lock, and whatever else lives under the prefix).
func (n *Node) copyKey(k []byte) ([]byte, bool) {
	rest, ok := bytes.CutPrefix(k, []byte(n.prefix))
	if !ok || !(bytes.HasPrefix(rest, []byte("b/")) || string(rest) == "meta") {
		return nil, false
	}
	return rest, true
}

// errDigest: the records at rev do not add up to the meta record's digest.
func errDigest(rev int64) error {
	return fmt.Errorf("%w: at etcd revision %d the records under the prefix do not add up to the digest keywardd wrote with them: a record was removed, or an older one put back, by something other than keywardd (restore etcd from a backup; docs/fleet.md, \"Integrity\")", store.ErrDamaged, rev)
}

// errCopyDigest: the copy's records do not add up to its meta record.
var errCopyDigest = errors.New("the local copy does not add up to its digest")

// loadDigest computes the copy's digest and checks it against the copy's
// meta record (errCopyDigest): a record of the copy removed, changed or
// put back in the file is found here, as one in etcd is at the revision
// that brings it.
func (n *Node) loadDigest() error {
	return n.db.View(func(tx *bolt.Tx) error {
		var digest, sealed [32]byte
		err := records(tx).ForEach(func(k, v []byte) error {
			if string(k) != "meta" {
				xor(&digest, n.seal.Element(v))
				return nil
			}
			m, err := n.w.readMeta([]*mvccpb.KeyValue{{Value: v}})
			sealed = m.digest
			if err != nil {
				return errCopyDigest // the copy's: loaded again
			}
			return nil
		})
		if err != nil {
			return err
		}
		if digest != sealed {
			return errCopyDigest
		}
		n.digest, n.sealed = digest, sealed
		return nil
	})
}

// loadWrites sets Writes from the copy's meta record.
func (n *Node) loadWrites() error {
	return n.db.View(func(tx *bolt.Tx) error {
		return n.noteMeta(records(tx).Get([]byte("meta")))
	})
}

// noteMeta takes the write count of a sealed meta record v (nil: none yet).
func (n *Node) noteMeta(v []byte) error {
	if v == nil {
		return nil
	}
	m, err := n.w.openMeta([]*mvccpb.KeyValue{{Value: v}})
	if err != nil {
		return n.fail(err)
	}
	if m.writes > n.writes.Load() {
		n.writes.Store(m.writes)
	}
	return nil
}

func (n *Node) setApplied(rev int64) {
	n.amu.Lock()
	if rev > n.applied.Load() {
		n.applied.Store(rev)
	}
	n.amu.Unlock()
	n.advance.Broadcast()
}

// resetApplied sets the copy's revision to rev, even below what it was
// (a reload of a history etcd rewound).
func (n *Node) resetApplied(rev int64) {
	n.amu.Lock()
	n.applied.Store(rev)
	n.amu.Unlock()
	n.advance.Broadcast()
}

// EtcdWrites is the fleet's write count as etcd had it when the node was
// opened (or at its last write): what the audit log's count is checked
// against, the copy's own being possibly of a history etcd lost.
func (n *Node) EtcdWrites() uint64 { return n.w.Writes() }

// waitApplied waits until the copy reflects rev, or d passed.
func (n *Node) waitApplied(rev int64, d time.Duration) bool {
	if n.applied.Load() >= rev {
		return true
	}
	deadline := time.Now().Add(d) // before the timer: its wake-up is past it
	t := time.AfterFunc(d, n.advance.Broadcast)
	defer t.Stop()
	n.amu.Lock()
	defer n.amu.Unlock()
	for n.applied.Load() < rev {
		if !time.Now().Before(deadline) {
			return false
		}
		n.advance.Wait()
	}
	return true
}

// follow applies what the watch delivers, from the copy's revision on, for
// as long as the node is open: it watches again after a broken watch, and
// reloads when etcd compacted past the copy.
func (n *Node) follow(ctx context.Context) {
	defer n.done.Done()
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := n.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errCompacted) || n.rewound.Load() {
			n.o.Logger.Warn("etcd compacted the history the local copy needs, or is behind it; reloading", "revision", n.applied.Load())
			if err = n.reload(ctx); err == nil {
				backoff = 100 * time.Millisecond
				continue
			}
		}
		if errors.Is(err, store.ErrDamaged) {
			return // the node has stopped (Err says why)
		}
		n.o.Logger.Warn("the watch on etcd broke; watching again", "error", err, "after", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

var errCompacted = errors.New("compacted")

// watch follows one watch until it breaks.
func (n *Node) watch(ctx context.Context) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	watcher := clientv3.NewWatcher(n.w.cli)
	defer watcher.Close()
	n.progress.Store(&progressor{watcher, wctx, cancel})
	defer n.progress.Store(nil)
	ch := watcher.Watch(wctx, n.prefix, clientv3.WithPrefix(), clientv3.WithRev(n.applied.Load()+1))
	for resp := range ch {
		if resp.CompactRevision != 0 {
			return errCompacted
		}
		if err := resp.Err(); err != nil {
			return err
		}
		if err := n.apply(resp); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("the watch ended")
}

// apply writes one watch response's events and the revision they bring
// the copy to, in one transaction. etcd sends all of a revision's events
// in one response, but a response's header revision is not the copy's:
// a watch catching up gets its events in batches, each under the current
// revision. So the copy reflects the last event's revision, or, for a
// progress notification (sent only to a watch that has caught up), the
// header's.
func (n *Node) apply(resp clientv3.WatchResponse) error {
	if resp.IsProgressNotify() {
		n.setApplied(resp.Header.Revision)
		return nil
	}
	if len(resp.Events) == 0 {
		return nil // the watch was created
	}
	rev := resp.Events[len(resp.Events)-1].Kv.ModRevision
	if !slices.ContainsFunc(resp.Events, func(e *clientv3.Event) bool { _, ok := n.copyKey(e.Kv.Key); return ok }) {
		// Only locks and the election moved: nothing to write (the file's
		// revision may lag; a restart watches again from it).
		n.setApplied(rev)
		return nil
	}
	var meta []byte
	changed := map[string][]Change{}
	var order []string
	digest, sealed := n.digest, n.sealed
	writes := n.writes.Load()
	err := n.db.Update(func(tx *bolt.Tx) error {
		kv := records(tx)
		at := int64(0) // the revision whose events are being taken
		for _, e := range resp.Events {
			k, ok := n.copyKey(e.Kv.Key)
			if !ok {
				continue
			}
			if e.Kv.ModRevision != at {
				if at != 0 && digest != sealed {
					return n.fail(errDigest(at))
				}
				at = e.Kv.ModRevision
			}
			if string(k) == "meta" {
				if e.Type == clientv3.EventTypeDelete {
					return n.fail(fmt.Errorf("%w: the meta record was deleted at etcd revision %d, not by keywardd", store.ErrDamaged, at))
				}
				m, err := n.w.openMeta([]*mvccpb.KeyValue{e.Kv})
				if err != nil {
					return err
				}
				if m.writes <= writes {
					// Every write moves the count on: an older meta record
					// put back (the state rolled back with it) does not.
					return n.fail(fmt.Errorf("%w: at etcd revision %d the meta record went from write %d to write %d: an older state was put back, by something other than keywardd", store.ErrDamaged, at, writes, m.writes))
				}
				writes = m.writes
				sealed = m.digest
			} else {
				if old := kv.Get(k); old != nil {
					xor(&digest, n.seal.Element(old))
				}
				if e.Type != clientv3.EventTypeDelete {
					xor(&digest, n.seal.Element(e.Kv.Value))
				}
			}
			if rest, ok := bytes.CutPrefix(k, []byte("b/")); ok && n.o.Changed != nil {
				b, key, _ := bytes.Cut(rest, []byte("/"))
				c := Change{Key: string(key)}
				if e.Type != clientv3.EventTypeDelete {
					var err error
					if c.Rec, err = n.seal.Open(string(b), c.Key, e.Kv.Value); err != nil {
						return n.fail(err)
					}
				}
				if _, seen := changed[string(b)]; !seen {
					order = append(order, string(b))
				}
				changed[string(b)] = append(changed[string(b)], c)
			}
			if e.Type == clientv3.EventTypeDelete {
				if err := kv.Delete(k); err != nil {
					return err
				}
				continue
			}
			if string(k) == "meta" {
				meta = e.Kv.Value
			}
			if err := kv.Put(k, e.Kv.Value); err != nil {
				return err
			}
		}
		if digest != sealed {
			return n.fail(errDigest(at))
		}
		return tx.Bucket(copyState).Put([]byte("rev"), binary.BigEndian.AppendUint64(nil, uint64(rev)))
	})
	if err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	n.digest, n.sealed = digest, sealed
	if err := n.noteMeta(meta); err != nil {
		return err
	}
	// Caches drop what changed before a write waiting for this revision
	// returns.
	if n.o.Changed != nil {
		for _, b := range order {
			n.o.Changed(b, changed[b])
		}
	}
	n.setApplied(rev)
	return nil
}

// progressor asks a watch's stream for a progress notification: its
// context's metadata names the stream.
type progressor struct {
	w      clientv3.Watcher
	ctx    context.Context
	cancel context.CancelFunc // ends the watch
}

// keepFresh establishes, about every Staleness/10 (at least every second,
// at most every 100 ms), that the copy is current: it reads etcd's
// revision with a linearizable read (which needs a quorum: a member cut
// off from it cannot vouch for itself), asks the watch for its progress,
// and once the copy reflects that revision, records the time the read
// started. Reads are refused once that time is older than Staleness.
func (n *Node) keepFresh(ctx context.Context) {
	defer n.done.Done()
	every := min(max(n.o.Staleness/10, 100*time.Millisecond), time.Second)
	for {
		n.checkFresh(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// checkFresh is one round of keepFresh.
func (n *Node) checkFresh(ctx context.Context) {
	start := time.Now()
	// A linearizable read's revision is at least every revision committed
	// before it was asked, the copy's among them; the copy may move past
	// it meanwhile (writes go on), so only what it had before counts.
	had := n.applied.Load()
	rev, err := n.catchUp(ctx)
	if rev != 0 && rev < had {
		// etcd is behind the copy: restored from an older snapshot. What
		// the copy holds past rev is of another history; reload it.
		n.o.Logger.Error("etcd is at an older revision than the local copy (restored from an older snapshot?): loading the copy again; calls are refused meanwhile", "etcd", rev, "copy", had)
		n.rewound.Store(true)
		n.freshAt.Store(0)
		n.freshWall.Store(0)
		if p := n.progress.Load(); p != nil {
			p.cancel()
		}
		return
	}
	if err == nil {
		n.markFresh(start)
	}
}

// catchUp reads etcd's revision with a linearizable read and waits until
// the copy reflects it; it returns the revision (0 if it could not be
// read).
func (n *Node) catchUp(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, n.o.Timeout)
	defer cancel()
	resp, err := n.w.cli.Get(clientv3.WithRequireLeader(ctx), n.w.metaKey(), clientv3.WithCountOnly())
	if err != nil {
		return 0, mapErr(err)
	}
	rev := resp.Header.Revision
	if n.applied.Load() >= rev {
		return rev, nil
	}
	// Nothing of the prefix may have changed since: the watch says so when
	// asked.
	if p := n.progress.Load(); p != nil {
		p.w.RequestProgress(p.ctx)
	}
	if !n.waitApplied(rev, n.o.Timeout) {
		return rev, fmt.Errorf("%w: this node's local copy did not reach etcd's revision %d within %v", store.ErrUnavailable, rev, n.o.Timeout)
	}
	return rev, nil
}

// markFresh records that the copy was current at t, unless it was known
// current later already.
func (n *Node) markFresh(t time.Time) {
	v := int64(t.Sub(n.base)) + 1
	for {
		old := n.freshAt.Load()
		if old >= v {
			return
		}
		if n.freshAt.CompareAndSwap(old, v) {
			n.freshWall.Store(t.UnixNano())
			return
		}
	}
}

// waitFresh waits until the copy was found current, for at most d.
func (n *Node) waitFresh(d time.Duration) error {
	deadline := time.Now().Add(d)
	for n.freshAt.Load() == 0 {
		if err := n.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: the local copy could not be brought up to etcd's revision within %v", store.ErrUnavailable, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// FreshAt is when the copy was last known current (zero: never).
func (n *Node) FreshAt() time.Time {
	if v := n.freshAt.Load(); v != 0 {
		return n.base.Add(time.Duration(v - 1)) // with the monotonic reading
	}
	return time.Time{}
}

// TxLimits are the cluster's limits of one transaction (store.TxLimiter).
func (n *Node) TxLimits() (ops, bytes int) { return n.w.TxLimits() }

// Staleness is the bound past which reads are refused.
func (n *Node) Staleness() time.Duration { return n.o.Staleness }

// Revision is the etcd revision the copy reflects.
func (n *Node) Revision() int64 { return n.applied.Load() }

// fail stops the node with err (a record that does not verify).
func (n *Node) fail(err error) error {
	n.failed.CompareAndSwap(nil, &err)
	return n.Err()
}

// Err says why the node stopped serving, or nil.
func (n *Node) Err() error {
	if p := n.failed.Load(); p != nil {
		return *p
	}
	return n.w.Err()
}

// Writes is the fleet's write count as of the copy's revision, or of this
// node's last write if later.
func (n *Node) Writes() uint64 { return max(n.writes.Load(), n.w.Writes()) }

// enter starts a call, as Backend.enter does.
func (n *Node) enter() error {
	n.life.RLock()
	if n.closed {
		n.life.RUnlock()
		return closedError{}
	}
	if err := n.Err(); err != nil {
		n.life.RUnlock()
		return err
	}
	return nil
}

// enterRead starts a read: it also fails once the copy is staler than the
// bound.
func (n *Node) enterRead() error {
	if err := n.enter(); err != nil {
		return err
	}
	if err := n.Fresh(); err != nil {
		n.life.RUnlock()
		return err
	}
	return nil
}

// Fresh is a *StaleError once the copy was last known current longer ago
// than the staleness bound, or nil.
//
// The age is the larger of the monotonic clock's (which a wall clock set
// back does not shorten) and the wall clock's (which counts the time a
// suspended host slept, which the monotonic clock does not).
func (n *Node) Fresh() error {
	age := time.Since(n.FreshAt())
	if wall := n.freshWall.Load(); wall != 0 {
		age = max(age, time.Duration(time.Now().UnixNano()-wall))
	}
	if age > n.o.Staleness {
		return &StaleError{Age: age, Bound: n.o.Staleness}
	}
	return nil
}

// StaleError is a read's error once the local copy is staler than the
// bound: it matches store.ErrUnavailable.
type StaleError struct{ Age, Bound time.Duration }

func (e *StaleError) Error() string {
	return fmt.Sprintf("etcdstore: the local copy was last known current %v ago, past the staleness bound of %v: etcd cannot be reached with a quorum, so reads are refused until it can", e.Age.Round(time.Millisecond), e.Bound)
}

func (e *StaleError) Is(target error) bool { return target == store.ErrUnavailable }

// Get returns a copy of the record under key from the local copy.
func (n *Node) Get(bucket, key string) ([]byte, error) {
	if err := n.enterRead(); err != nil {
		return nil, err
	}
	defer n.life.RUnlock()
	if err := checkBucket(bucket); err != nil {
		return nil, err
	}
	if err := checkKey(key); err != nil {
		return nil, err
	}
	var rec []byte
	err := n.db.View(func(tx *bolt.Tx) error {
		v := records(tx).Get([]byte("b/" + bucket + "/" + key))
		if v == nil {
			return store.ErrNotFound
		}
		var err error
		rec, err = n.seal.Open(bucket, key, v)
		if err != nil {
			return n.fail(err)
		}
		return nil
	})
	return rec, err
}

// ForEach calls fn for every record of the local copy whose key starts
// with prefix, in key order, in one read of the copy.
func (n *Node) ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error {
	bp := "b/" + bucket + "/"
	return n.walk(bucket, []byte(bp+prefix), []byte(bp+prefix), fn)
}

// ForEachAfter calls fn for every record of the local copy whose key sorts
// after the given one ("" for all), in key order, in one read of the copy.
func (n *Node) ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error {
	bp := "b/" + bucket + "/"
	from := []byte(bp)
	if after != "" {
		from = []byte(bp + after + "\x00")
	}
	return n.walk(bucket, from, []byte(bp), fn)
}

// walk visits the keys from from on that start with within.
func (n *Node) walk(bucket string, from, within []byte, fn func(key string, rec []byte) error) error {
	if err := n.enterRead(); err != nil {
		return err
	}
	defer n.life.RUnlock()
	if err := checkBucket(bucket); err != nil {
		return err
	}
	bp := len("b/" + bucket + "/")
	return n.db.View(func(tx *bolt.Tx) error {
		c := records(tx).Cursor()
		for k, v := c.Seek(from); k != nil && bytes.HasPrefix(k, within); k, v = c.Next() {
			key := string(k[bp:])
			rec, err := n.seal.Open(bucket, key, v)
			if err != nil {
				return n.fail(err)
			}
			if err := fn(key, rec); err != nil {
				return err
			}
		}
		return nil
	})
}

// Update is UpdateEach for one key.
func (n *Node) Update(bucket, key string, fn func(old []byte) ([]byte, error)) error {
	return n.UpdateEach(bucket, []string{key}, func(_ string, old []byte) ([]byte, error) { return fn(old) })
}

// UpdateEach is UpdateEachEmit without events.
func (n *Node) UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error {
	return n.UpdateEachEmit(bucket, keys, func(k string, old []byte) ([]byte, [][]byte, error) {
		rec, err := fn(k, old)
		return rec, nil, err
	})
}

// UpdateEachEmit writes through Backend (fn sees the records as etcd has
// them, under the fleet's write lock), then waits until the local copy has
// the commit, so that a read after it on this node sees it.
func (n *Node) UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) ([]byte, [][]byte, error)) error {
	if err := n.enter(); err != nil {
		return err
	}
	defer n.life.RUnlock()
	rev, err := n.w.updateEachEmit(bucket, keys, fn, nil)
	if err != nil || rev == 0 {
		return err
	}
	if !n.waitApplied(rev, n.o.Timeout) {
		return fmt.Errorf("%w: the write was committed to etcd (revision %d) but this node's local copy did not reach it within %v (its watch is behind or broken)", store.ErrUnavailable, rev, n.o.Timeout)
	}
	return nil
}

// Close stops following etcd, waits for the calls under way, and closes
// the local copy and the writer (the etcd client stays open).
func (n *Node) Close() error {
	n.life.Lock()
	defer n.life.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	// The calls under way are done (a write among them needed the copy
	// to follow etcd until its commit arrived); the copy stops.
	n.stop()
	n.advance.Broadcast()
	n.done.Wait()
	werr := n.w.Close()
	if err := n.db.Close(); err != nil {
		return fmt.Errorf("etcdstore: the local copy %s: %w", n.o.Path, err)
	}
	return werr
}

// Lock takes the fleet's lock of name (store.Locker): a
// concurrency.Mutex on PREFIX/locks/<name>, on a session of its own, so
// that ending it (a failed wait, an unlock that cannot reach etcd) takes
// nothing else with it. The wait lasts as long as ctx allows, or
// lockWait if ctx has no deadline.
func (n *Node) Lock(ctx context.Context, name string) (func(), error) {
	// Not held across the wait, which Close would wait out: a Close meanwhile
	// ends the wait with an error instead.
	if err := n.enter(); err != nil {
		return nil, err
	}
	n.life.RUnlock()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, lockWait)
		defer cancel()
	}
	ctx = clientv3.WithRequireLeader(ctx)
	lease, err := n.w.cli.Grant(ctx, int64(n.o.SessionTTL))
	if err != nil {
		return nil, fmt.Errorf("%w: the fleet's lock of %s: %v", store.ErrUnavailable, name, mapErr(err))
	}
	s, err := concurrency.NewSession(n.w.cli, concurrency.WithLease(lease.ID), concurrency.WithContext(context.Background()))
	if err != nil {
		go n.w.revoke(lease.ID)
		return nil, fmt.Errorf("%w: the fleet's lock of %s: %v", store.ErrUnavailable, name, mapErr(err))
	}
	end := func() {
		s.Orphan()
		n.w.revoke(lease.ID) // the lock, or the place in its queue, with it
	}
	mu := concurrency.NewMutex(s, n.prefix+"locks/"+name)
	if err := LockWithin(ctx, mu); err != nil {
		go end()
		return nil, fmt.Errorf("%w: the fleet's lock of %s (another node holds it, or etcd did not answer): %v", store.ErrUnavailable, name, mapErr(err))
	}
	// What the last holder wrote is in etcd before the lock was ours; the
	// holder reads the local copy, which must have it too.
	if !n.waitApplied(mu.Header().Revision, n.o.Timeout) {
		go end()
		return nil, fmt.Errorf("%w: the fleet's lock of %s was taken, but this node's local copy did not reach its revision within %v", store.ErrUnavailable, name, n.o.Timeout)
	}
	return end, nil
}

// lockWait bounds the wait for a fleet lock when the caller's context has
// no deadline.
const lockWait = 30 * time.Second

// Sync waits until the copy has every write committed to etcd before it was
// called (store.Syncer): one linearizable read, and the watch's progress.
func (n *Node) Sync(ctx context.Context) error {
	if err := n.enterRead(); err != nil {
		return err
	}
	defer n.life.RUnlock()
	_, err := n.catchUp(ctx)
	return err
}
