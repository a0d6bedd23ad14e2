// Package etcdstore is a store.Backend on etcd: the state a fleet of
// keywardd nodes shares (docs/fleet.md, "Design").
//
// Backend is the writer; Node (node.go) is the store.Backend keywardd
// uses on a fleet: Backend's writes, and reads from a local copy fed by a
// watch. What Backend does:
//
//   - Records live under PREFIX/b/<bucket>/<key>, sealed as in the bbolt
//     file (store.Sealer: a value changed or moved in etcd does not verify,
//     and is refused with store.ErrDamaged). The outbox's events live in
//     its bucket under store.OutboxKey of their sequence number.
//   - PREFIX/meta holds, sealed under the prefix (a state copied from
//     another prefix does not open), the write count (Writes), the
//     outbox's last sequence number and the digest of the whole content
//     (the XOR of every record's store.Sealer.Element), masked with a
//     fresh pad (store.Sealer.Mask) so that it is never readable: every
//     write transaction moves all three (Carry raises the counts, for a
//     migration's last write). Node checks the digest at every revision.
//   - Every write takes the fleet's write lock (a concurrency.Mutex on
//     PREFIX/lock, on this backend's session, kept across a burst of
//     writes), reads the keys it changes from etcd, runs the caller's fn
//     once per key in order, and commits in one etcd transaction guarded
//     by the lock's ownership and the meta record as read: a writer whose
//     session ended mid-write commits nothing (store.ErrUnavailable), and a
//     commit whose answer was lost is looked up, never applied twice.
//     Every request carries a deadline and clientv3.WithRequireLeader.
//   - A transaction larger than etcd takes (Options.MaxTxnOps,
//     Options.MaxRequestBytes, which must be the cluster's) is refused with
//     store.ErrTooLarge, nothing written; callers split their work by
//     store.BatchKeys, recording an intent first where it must finish
//     (apikeys' bulk revocations, daemon's migration).
package etcdstore

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/daemon/store"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options say where the state is and how large a transaction etcd takes.
type Options struct {
	// Client is the etcd client; the caller owns it (Close leaves it open).
	Client *clientv3.Client
	// Prefix is the key prefix of the state in etcd (every node of a fleet
	// uses the same one). Required.
	Prefix string
	// Key is the store key (store.KeySize bytes), derived from the HSM.
	Key []byte
	// Timeout is each call's deadline (default 5 s).
	Timeout time.Duration
	// SessionTTL is the write lock's lease, in seconds (default 10).
	SessionTTL int
	// MaxTxnOps and MaxRequestBytes are the cluster's limits (etcd's
	// defaults: 128 and 1.5 MiB); a transaction over either is refused.
	MaxTxnOps       int
	MaxRequestBytes int
}

// Defaults of Options.
const (
	DefaultTimeout         = 5 * time.Second
	DefaultSessionTTL      = 10
	DefaultMaxTxnOps       = 128
	DefaultMaxRequestBytes = 3 << 19 // 1.5 MiB
)

// metaBucket is the bucket name the meta record is sealed under (no bucket
// of the schema has it).
const metaBucket = "meta"

// pageSize is how many records a walk reads per request.
const pageSize = 256

// opOverhead is what a request spends per operation besides its key and
// value, with margin (protobuf tags and lengths).
const opOverhead = 32

// Backend is the etcd store.Backend.
type Backend struct {
	o      Options
	seal   *store.Sealer
	cli    *clientv3.Client
	writes atomic.Uint64
	failed atomic.Pointer[error]

	life   sync.RWMutex // held for reading by every call, for writing by Close
	closed bool

	wmu     sync.Mutex // serializes this process's writers; guards what follows
	session *concurrency.Session
	// held is the write lock kept across a burst of this node's writes
	// (burstIdle between them, maxHold in all), so that each write is one
	// etcd transaction instead of three (lock, commit, unlock); every
	// commit is still guarded by its ownership. release lets it go.
	held      *concurrency.Mutex
	heldSince time.Time
	release   *time.Timer
	holds     uint64 // which hold release is for
}

// A node keeps the fleet's write lock between its writes for burstIdle,
// and for maxHold at most: what another node's write may wait on top of
// the writes themselves.
const (
	burstIdle = 5 * time.Millisecond
	maxHold   = 100 * time.Millisecond
)

var _ store.Backend = (*Backend)(nil)

// Open opens the state under o.Prefix, reading its write count.
func Open(o Options) (*Backend, error) {
	if o.Client == nil || o.Prefix == "" {
		return nil, errors.New("etcdstore: a client and a prefix are required")
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.SessionTTL <= 0 {
		o.SessionTTL = DefaultSessionTTL
	}
	if o.MaxTxnOps <= 0 {
		o.MaxTxnOps = DefaultMaxTxnOps
	}
	if o.MaxRequestBytes <= 0 {
		o.MaxRequestBytes = DefaultMaxRequestBytes
	}
	seal, err := store.NewSealer(o.Key)
	if err != nil {
		return nil, fmt.Errorf("etcdstore: %w", err)
	}
	b := &Backend{o: o, seal: seal, cli: o.Client}
	ctx, cancel := b.ctx()
	defer cancel()
	resp, err := b.cli.Get(ctx, b.metaKey())
	if err != nil {
		return nil, mapErr(err)
	}
	m, err := b.openMeta(resp.Kvs)
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		if err := b.noRecords(ctx, resp.Header.Revision); err != nil {
			return nil, err
		}
	}
	b.writes.Store(m.writes)
	return b, nil
}

// ctx is one call's context: its deadline, and a leader required.
func (b *Backend) ctx() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), b.o.Timeout)
	return clientv3.WithRequireLeader(ctx), cancel
}

func (b *Backend) metaKey() string { return b.o.Prefix + "/meta" }
func (b *Backend) lockKey() string { return b.o.Prefix + "/lock" }
func (b *Backend) bucketPrefix(bucket string) string {
	return b.o.Prefix + "/b/" + bucket + "/"
}

// meta is the meta record: the write count, the outbox's last number, and
// the digest of the whole content: the XOR of every record's element
// (store.Sealer.Element), which each write moves by what it changes. A
// record removed, or an older sealed record put back, by anyone but
// keywardd leaves the content's digest apart from the meta record's, and
// a node that checks it (Node) refuses the state.
type meta struct {
	writes, outbox uint64
	digest         [32]byte
	// modRev is the meta record's revision as read (0: absent), which a
	// commit requires unchanged: a copy of an earlier commit that lands
	// late (its answer lost, sent again, the first one still on its way)
	// finds the record moved on and writes nothing.
	modRev int64
}

func (b *Backend) openMeta(kvs []*mvccpb.KeyValue) (meta, error) {
	m, err := b.readMeta(kvs)
	if err != nil {
		return meta{}, b.fail(err)
	}
	return m, nil
}

// readMeta opens a meta record (none: the zero meta) without stopping the
// backend on a bad one: a local copy's is checked so, and reloaded.
func (b *Backend) readMeta(kvs []*mvccpb.KeyValue) (meta, error) {
	if len(kvs) == 0 {
		return meta{}, nil
	}
	// Sealed under the prefix: a meta record (and the state with it)
	// copied from another prefix does not open.
	v, err := b.seal.Open(metaBucket, b.o.Prefix, kvs[0].Value)
	if err == nil && len(v) != metaSize {
		err = fmt.Errorf("%w: the meta record has %d bytes, not %d (a state written before keyward's integrity digest, by a development build: delete the prefix, or migrate into a new one)", store.ErrDamaged, len(v), metaSize)
	}
	if err != nil {
		return meta{}, err
	}
	m := meta{writes: binary.BigEndian.Uint64(v), outbox: binary.BigEndian.Uint64(v[8:]), modRev: kvs[0].ModRevision}
	mask := b.seal.Mask(v[16:32])
	for i := range m.digest {
		m.digest[i] = v[32+i] ^ mask[i]
	}
	return m, nil
}

// metaSize is the meta record's size: the write count, the outbox's last
// number, a nonce, and the digest masked with the nonce's pad
// (store.Sealer.Mask), never in the clear.
const metaSize = 8 + 8 + 16 + 32

// xor is d ^= e.
func xor(d *[32]byte, e [32]byte) {
	for i := range d {
		d[i] ^= e[i]
	}
}

// noRecords checks that a state without its meta record holds no record
// either (at rev): a meta record deleted under records would reset the
// write count and the outbox's numbers, and the next events would be
// written over the last ones.
func (b *Backend) noRecords(ctx context.Context, rev int64) error {
	resp, err := b.cli.Get(ctx, b.o.Prefix+"/b/", clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(rev))
	if err != nil {
		return mapErr(err)
	}
	if resp.Count > 0 {
		return b.fail(fmt.Errorf("%w: the meta record is gone but %d records are there (a record deleted in etcd, not by keywardd)", store.ErrDamaged, resp.Count))
	}
	return nil
}

func (b *Backend) sealMeta(m meta) string {
	v := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, m.writes), m.outbox)
	nonce := make([]byte, 16)
	rand.Read(nonce)
	mask := b.seal.Mask(nonce)
	v = append(v, nonce...)
	for i := range m.digest {
		v = append(v, m.digest[i]^mask[i])
	}
	return string(b.seal.Seal(metaBucket, b.o.Prefix, v))
}

// fail stops the backend with err (a record that does not verify).
func (b *Backend) fail(err error) error {
	b.failed.CompareAndSwap(nil, &err)
	return b.Err()
}

// Err says why the backend stopped serving, or nil.
func (b *Backend) Err() error {
	if p := b.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// TxLimits are the cluster's limits of one transaction (store.TxLimiter).
func (b *Backend) TxLimits() (ops, bytes int) { return b.o.MaxTxnOps, b.o.MaxRequestBytes }

// Writes is the write count of the state, as of this backend's last write
// (or Open): other nodes' writes are counted at the next.
func (b *Backend) Writes() uint64 { return b.writes.Load() }

// enter starts a call: it fails after Close, or once the backend stopped.
func (b *Backend) enter() error {
	b.life.RLock()
	if b.closed {
		b.life.RUnlock()
		return closedError{}
	}
	if err := b.Err(); err != nil {
		b.life.RUnlock()
		return err
	}
	return nil
}

// Close waits for the calls under way and ends the backend's session
// (the write lock's lease); the client stays open.
func (b *Backend) Close() error {
	b.life.Lock()
	defer b.life.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	b.wmu.Lock()
	defer b.wmu.Unlock()
	if b.release != nil {
		b.release.Stop()
	}
	b.held = nil // released with the session's lease, below
	if b.session != nil {
		// Revoke the lease within the call's deadline (Session.Close would
		// wait up to its TTL), before the caller closes the client; a
		// failure leaves it to expire.
		b.session.Orphan()
		b.revoke(b.session.Lease())
		b.session = nil
	}
	return nil
}

// closedError is every call's error after Close: store.ErrClosed, which
// matches store.ErrUnavailable too.
type closedError struct{}

func (closedError) Error() string { return "etcdstore: closed: keywardd is stopping; try again" }
func (closedError) Is(target error) bool {
	return target == store.ErrClosed || target == store.ErrUnavailable
}

func checkBucket(bucket string) error {
	if !slices.Contains(store.Buckets(), bucket) {
		return fmt.Errorf("%w %q", store.ErrUnknownBucket, bucket)
	}
	return nil
}

func checkKey(key string) error {
	if key == "" || len(key) > store.MaxKeyLen {
		return fmt.Errorf("%w: a key of %d bytes; a key has 1 to %d", store.ErrInvalidKey, len(key), store.MaxKeyLen)
	}
	return nil
}

// mapErr says what an etcd error means to the contract (docs/fleet.md,
// "What etcd's behaviour asks of the backend").
func mapErr(err error) error {
	if err == nil {
		return nil
	}
	var ee rpctypes.EtcdError
	switch {
	case errors.Is(err, rpctypes.ErrTooManyOps), errors.Is(err, rpctypes.ErrRequestTooLarge),
		status.Code(err) == codes.ResourceExhausted:
		return fmt.Errorf("%w: etcd refused it: %v", store.ErrTooLarge, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		errors.As(err, &ee) && ee.Code() == codes.Unavailable,
		status.Code(err) == codes.Unavailable:
		return fmt.Errorf("%w: etcd did not answer in time or has no leader: %v", store.ErrUnavailable, err)
	case errors.Is(err, rpctypes.ErrCompacted):
		// A walk whose revision was compacted between its pages.
		return fmt.Errorf("%w: etcd compacted the revision being read; read again: %v", store.ErrUnavailable, err)
	case errors.Is(err, clientv3.ErrNoAvailableEndpoints), errors.Is(err, concurrency.ErrSessionExpired),
		errors.Is(err, rpctypes.ErrTooManyRequests),
		// A member stopping answers raft's own error, untranslated, with
		// gRPC's code Unknown: only its text tells it.
		status.Code(err) == codes.Unknown && rpctypes.ErrorDesc(err) == "raft: stopped":
		return fmt.Errorf("%w: %v", store.ErrUnavailable, err)
	case errors.Is(err, rpctypes.ErrNoSpace):
		return fmt.Errorf("%w: etcd is out of space (its quota-backend-bytes): an operator compacts and defragments it, or raises the quota, and disarms the alarm: %v", store.ErrUnavailable, err)
	}
	return fmt.Errorf("etcdstore: %w", err)
}

// Get returns a copy of the record under key, or store.ErrNotFound.
func (b *Backend) Get(bucket, key string) ([]byte, error) {
	if err := b.enter(); err != nil {
		return nil, err
	}
	defer b.life.RUnlock()
	if err := checkBucket(bucket); err != nil {
		return nil, err
	}
	if err := checkKey(key); err != nil {
		return nil, err
	}
	ctx, cancel := b.ctx()
	defer cancel()
	resp, err := b.cli.Get(ctx, b.bucketPrefix(bucket)+key)
	if err != nil {
		return nil, mapErr(err)
	}
	if len(resp.Kvs) == 0 {
		return nil, store.ErrNotFound
	}
	rec, err := b.seal.Open(bucket, key, resp.Kvs[0].Value)
	if err != nil {
		return nil, b.fail(err)
	}
	return rec, nil
}

// ForEach calls fn for every record whose key starts with prefix, in key
// order, all read at one revision of etcd, a page at a time.
func (b *Backend) ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error {
	bp := b.bucketPrefix(bucket)
	return b.walk(bucket, bp+prefix, clientv3.GetPrefixRangeEnd(bp+prefix), fn)
}

// ForEachAfter calls fn for every record whose key sorts after the given
// one ("" for all), in key order, all read at one revision of etcd.
func (b *Backend) ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error {
	bp := b.bucketPrefix(bucket)
	from := bp
	if after != "" {
		from = bp + after + "\x00"
	}
	return b.walk(bucket, from, clientv3.GetPrefixRangeEnd(bp), fn)
}

func (b *Backend) walk(bucket, from, end string, fn func(key string, rec []byte) error) error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.life.RUnlock()
	if err := checkBucket(bucket); err != nil {
		return err
	}
	bp := b.bucketPrefix(bucket)
	var rev int64
	for {
		ctx, cancel := b.ctx()
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := b.cli.Get(ctx, from, opts...)
		cancel()
		if err != nil {
			return mapErr(err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			key := string(kv.Key[len(bp):])
			rec, err := b.seal.Open(bucket, key, kv.Value)
			if err != nil {
				return b.fail(err)
			}
			if err := fn(key, rec); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Update is UpdateEach for one key.
func (b *Backend) Update(bucket, key string, fn func(old []byte) ([]byte, error)) error {
	return b.UpdateEach(bucket, []string{key}, func(_ string, old []byte) ([]byte, error) { return fn(old) })
}

// UpdateEach is UpdateEachEmit without events.
func (b *Backend) UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error {
	return b.UpdateEachEmit(bucket, keys, func(k string, old []byte) ([]byte, [][]byte, error) {
		rec, err := fn(k, old)
		return rec, nil, err
	})
}

// UpdateEachEmit computes each key's new record with fn, once per key in
// order, and commits the records and fn's events in one etcd transaction
// under the fleet's write lock, fenced by its ownership.
func (b *Backend) UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error {
	_, err := b.updateEachEmit(bucket, keys, fn, nil)
	return err
}

// Carry is UpdateEach that also raises the state's write count past
// writes and the outbox's last sequence number to at least outbox, in the same
// transaction: the last write of a migration carries the counts of the
// store it copied (a node's audit log has recorded that store's count,
// and the outbox's numbers must never be given twice).
func (b *Backend) Carry(bucket string, keys []string, writes, outbox uint64, fn func(key string, old []byte) ([]byte, error)) error {
	_, err := b.updateEachEmit(bucket, keys, func(k string, old []byte) ([]byte, [][]byte, error) {
		rec, err := fn(k, old)
		return rec, nil, err
	}, func(m *meta) {
		m.writes, m.outbox = max(m.writes, writes+1), max(m.outbox, outbox)
	})
	return err
}

// updateEachEmit is UpdateEachEmit, which also returns the commit's
// revision; carry, if set, changes the meta record the commit writes.
func (b *Backend) updateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error), carry func(*meta)) (int64, error) {
	if err := b.enter(); err != nil {
		return 0, err
	}
	defer b.life.RUnlock()
	if err := checkBucket(bucket); err != nil {
		return 0, err
	}
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return 0, err
		}
	}
	if len(keys) > store.MaxTxKeys {
		return 0, fmt.Errorf("%w: %d keys in one transaction; the contract promises %d", store.ErrTooLarge, len(keys), store.MaxTxKeys)
	}
	b.wmu.Lock()
	defer b.wmu.Unlock()
	ctx, cancel := b.ctx()
	defer cancel()
	if b.release != nil {
		b.release.Stop()
	}
	if b.held != nil {
		select {
		case <-b.session.Done(): // the lease ended: the lock with it
			b.dropSession()
		default:
			if time.Since(b.heldSince) > maxHold {
				b.letGo(ctx) // others' turn
			}
		}
	}
	mu := b.held
	for pause := retryPause; mu == nil; pause = min(2*pause, maxRetryPause) {
		var err error
		if mu, err = b.lock(ctx); err == nil {
			b.held, b.heldSince = mu, time.Now()
			break
		}
		if !b.transient(ctx, err, pause) {
			return 0, err
		}
	}
	rev, err := b.write(ctx, mu, bucket, keys, fn, carry)
	if b.held != nil {
		b.holds++
		hold := b.holds
		b.release = time.AfterFunc(burstIdle, func() { b.releaseIdle(hold) })
	}
	return rev, err
}

// releaseIdle lets the write lock of hold go, if no write took it up
// since. Under wmu: a lock taken again on the same session is the same key
// in etcd, which an unlock still under way would delete. The unlock gets
// releaseWait at most (a write may be waiting for wmu): one that does not
// make it drops the session, whose lease takes the lock with it, and the
// next write starts a new one.
func (b *Backend) releaseIdle(hold uint64) {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	if b.holds != hold || b.held == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(releaseWait, b.o.Timeout))
	defer cancel()
	b.letGo(ctx)
}

// releaseWait bounds an idle release of the write lock.
const releaseWait = 500 * time.Millisecond

// letGo releases the held write lock. If it cannot be let go, the session
// is dropped: its lease, and the lock with it, expire within SessionTTL,
// and the next write starts a new session. Under wmu.
func (b *Backend) letGo(ctx context.Context) {
	mu := b.held
	b.held = nil
	if mu.Unlock(ctx) != nil && b.session != nil {
		b.dropSession()
	}
}

// lock takes the fleet's write lock on this backend's session, starting a
// new session if the last one ended. Under wmu. Every step is bounded by
// ctx: etcd's Mutex.Lock, when its wait fails, cleans up with a context of
// its own that has no deadline (and retries for as long as quorum is
// lost), so it runs apart, and a wait that ends without the lock revokes
// the session, which takes this node's place in the queue with it.
func (b *Backend) lock(ctx context.Context) (*concurrency.Mutex, error) {
	for retried := false; ; retried = true {
		if b.session != nil {
			select {
			case <-b.session.Done():
				b.dropSession()
			default:
			}
		}
		if b.session == nil {
			lease, err := b.cli.Grant(ctx, int64(b.o.SessionTTL))
			if err != nil {
				return nil, mapErr(err)
			}
			s, err := concurrency.NewSession(b.cli, concurrency.WithLease(lease.ID), concurrency.WithContext(context.Background()))
			if err != nil {
				go b.revoke(lease.ID)
				return nil, mapErr(err)
			}
			b.session = s
		}
		mu := concurrency.NewMutex(b.session, b.lockKey())
		err := LockWithin(ctx, mu)
		if err == nil {
			return mu, nil
		}
		// Not ours: leave no place in the queue behind.
		b.dropSession()
		if !errors.Is(err, rpctypes.ErrLeaseNotFound) && !errors.Is(err, concurrency.ErrSessionExpired) || retried || ctx.Err() != nil {
			return nil, mapErr(err)
		}
		// The session's lease ended before its keepalive noticed: once
		// more, on a new one.
	}
}

// LockWithin takes mu within ctx. etcd's Mutex.Lock, when its wait fails,
// cleans up with a context of its own that has no deadline (and retries
// for as long as quorum is lost): it runs apart, and the caller, once ctx
// ended, ends mu's session, which takes its place in the queue with it.
func LockWithin(ctx context.Context, mu *concurrency.Mutex) error {
	locked := make(chan error, 1)
	go func() { locked <- mu.Lock(ctx) }()
	select {
	case err := <-locked:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// dropSession ends this node's session: its keepalive stops, and its lease
// (the lock, or the place in the lock's queue, with it) is revoked apart,
// within a deadline of its own, so that the call that dropped it is not
// held longer; if the revocation fails, the lease expires within
// SessionTTL. Under wmu.
func (b *Backend) dropSession() {
	b.session.Orphan()
	go b.revoke(b.session.Lease())
	b.session = nil
	b.held = nil // the lock went with the session
}

// revoke revokes a lease, within a call's deadline.
func (b *Backend) revoke(id clientv3.LeaseID) {
	ctx, cancel := b.ctx()
	defer cancel()
	b.cli.Revoke(ctx, id)
}

// write is a write under the lock; it returns the commit's revision.
func (b *Backend) write(ctx context.Context, mu *concurrency.Mutex, bucket string, keys []string, fn func(string, []byte) ([]byte, [][]byte, error), carry func(*meta)) (int64, error) {
	bp := b.bucketPrefix(bucket)
	// The keys, each once in order of first appearance, and the meta record.
	var uniq []string
	cur := map[string][]byte{}
	elems := map[string][32]byte{} // the old values' shares of the digest
	for _, k := range keys {
		if _, ok := cur[k]; !ok {
			cur[k] = nil
			uniq = append(uniq, k)
		}
	}
	var m meta
	for pause := retryPause; ; pause = min(2*pause, maxRetryPause) {
		var err error
		clear(cur) // what a failed try read
		clear(elems)
		if m, err = b.read(ctx, bucket, uniq, cur, elems); err == nil {
			break
		}
		if !b.transient(ctx, err, pause) {
			return 0, err
		}
	}
	// fn, once per key in order.
	var events [][]byte
	for _, k := range keys {
		rec, evs, err := fn(k, cur[k])
		if err != nil {
			return 0, err
		}
		cur[k] = rec
		events = append(events, evs...)
	}
	m.writes++
	if carry != nil {
		carry(&m)
	}
	ops := make([]clientv3.Op, 0, len(uniq)+len(events)+1)
	size := 0
	for _, k := range uniq {
		if e, ok := elems[k]; ok {
			xor(&m.digest, e)
		}
		if rec := cur[k]; rec == nil {
			ops = append(ops, clientv3.OpDelete(bp+k))
			size += len(bp) + len(k) + opOverhead
		} else {
			v := b.seal.Seal(bucket, k, rec)
			xor(&m.digest, b.seal.Element(v))
			ops = append(ops, clientv3.OpPut(bp+k, string(v)))
			size += len(bp) + len(k) + len(v) + opOverhead
		}
	}
	ob := b.bucketPrefix(store.BucketOutbox)
	for _, ev := range events {
		m.outbox++
		k := store.OutboxKey(m.outbox)
		v := b.seal.Seal(store.BucketOutbox, k, ev)
		xor(&m.digest, b.seal.Element(v))
		ops = append(ops, clientv3.OpPut(ob+k, string(v)))
		size += len(ob) + len(k) + len(v) + opOverhead
	}
	mv := b.sealMeta(m)
	ops = append(ops, clientv3.OpPut(b.metaKey(), mv))
	size += len(b.metaKey()) + len(mv) + len(mu.Key()) + 2*opOverhead
	if n := len(ops) + 1; n > b.o.MaxTxnOps || size > b.o.MaxRequestBytes {
		return 0, fmt.Errorf("%w: %d operations, about %d bytes; etcd takes %d operations and %d bytes in one transaction", store.ErrTooLarge, n, size, b.o.MaxTxnOps, b.o.MaxRequestBytes)
	}
	rev, err := b.commit(ctx, mu, ops, m)
	if err != nil {
		return 0, err
	}
	if m.writes > b.writes.Load() {
		b.writes.Store(m.writes)
	}
	return rev, nil
}

// commit commits ops, guarded by the lock's ownership, and returns the
// commit's revision. A commit whose answer was lost (the connection to a
// member broke, a leader changed) is looked up rather than given up: while
// this node holds the lock nobody else writes, so the meta record says
// whether it was applied (its write count is m's), and one that was not is
// sent again, until the call's deadline.
func (b *Backend) commit(ctx context.Context, mu *concurrency.Mutex, ops []clientv3.Op, m meta) (int64, error) {
	for pause := retryPause; ; pause = min(2*pause, maxRetryPause) {
		resp, err := b.cli.Txn(ctx).If(b.guard(mu, m)...).Then(ops...).Commit()
		if err == nil && resp.Succeeded {
			return resp.Header.Revision, nil
		}
		if err == nil {
			// The lock was lost, or the meta record moved on: by this very
			// commit, sent before and landed meanwhile, if the lock is
			// still ours.
			rev, applied, lerr := b.applied(ctx, mu, m)
			switch {
			case lerr == nil && applied:
				return rev, nil
			case errors.Is(lerr, errLockLost):
				return 0, fmt.Errorf("%w: the write lock was lost before the commit (this node's etcd session ended); nothing was written", store.ErrUnavailable)
			case lerr == nil:
				return 0, b.fail(fmt.Errorf("%w: the meta record changed under this node's write lock without its count moving", store.ErrDamaged))
			}
			return 0, fmt.Errorf("%w: the commit was refused and why cannot be told: %v", store.ErrUnavailable, mapErr(lerr))
		}
		if !b.transient(ctx, err, pause) {
			return 0, mapErr(err)
		}
		for {
			rev, applied, lerr := b.applied(ctx, mu, m)
			if lerr == nil && applied {
				return rev, nil
			}
			if lerr == nil {
				break // not applied, and the lock is still ours: send it again
			}
			if errors.Is(lerr, store.ErrDamaged) {
				return 0, lerr
			}
			if !b.transient(ctx, lerr, pause) {
				return 0, fmt.Errorf("%w: the commit's answer was lost and whether it was applied cannot be told: %v", store.ErrUnavailable, mapErr(lerr))
			}
		}
	}
}

// guard is what a commit of m requires: the lock still this node's, and
// the meta record as the write read it.
func (b *Backend) guard(mu *concurrency.Mutex, m meta) []clientv3.Cmp {
	return []clientv3.Cmp{mu.IsOwner(), clientv3.Compare(clientv3.ModRevision(b.metaKey()), "=", m.modRev)}
}

// Pauses between tries of a request that failed on the way (a connection
// to a member broke, an election): within the call's deadline.
const (
	retryPause    = 20 * time.Millisecond
	maxRetryPause = 500 * time.Millisecond
)

// transient reports whether err may pass by trying again (etcd unavailable,
// not the call's deadline), after a pause, if ctx leaves time for it.
func (b *Backend) transient(ctx context.Context, err error, pause time.Duration) bool {
	if ctx.Err() != nil || !errors.Is(mapErr(err), store.ErrUnavailable) || errors.Is(err, rpctypes.ErrNoSpace) {
		return false
	}
	if d, ok := ctx.Deadline(); ok && time.Until(d) < pause {
		return false
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(pause):
		return true
	}
}

// errLockLost: the lock was no longer this node's when the commit was
// looked up, so whether it was applied cannot be told.
var errLockLost = errors.New("the write lock was lost")

// applied looks up whether the commit of m was applied, reading the meta
// record only while the lock is still this node's (one transaction): its
// write count is then m's if and only if it was.
func (b *Backend) applied(ctx context.Context, mu *concurrency.Mutex, m meta) (int64, bool, error) {
	resp, err := b.cli.Txn(ctx).If(mu.IsOwner()).Then(clientv3.OpGet(b.metaKey())).Commit()
	if err != nil {
		return 0, false, err
	}
	if !resp.Succeeded {
		b.dropSession()
		return 0, false, errLockLost
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	got, err := b.openMeta(kvs)
	if err != nil {
		return 0, false, err
	}
	switch got.writes {
	case m.writes:
		return kvs[0].ModRevision, true, nil
	case m.writes - 1:
		return 0, false, nil
	}
	return 0, false, b.fail(fmt.Errorf("%w: the meta record holds write %d under this node's lock, which is writing %d", store.ErrDamaged, got.writes, m.writes))
}

// read reads the meta record and the records of keys into cur (absent:
// nil), in transactions of at most MaxTxnOps gets, all at the revision of
// the first.
func (b *Backend) read(ctx context.Context, bucket string, keys []string, cur map[string][]byte, elems map[string][32]byte) (meta, error) {
	bp := b.bucketPrefix(bucket)
	batch := max(2, b.o.MaxTxnOps)
	var m meta
	var rev int64
	for i := 0; i == 0 || i < len(keys); i += batch - 1 {
		part := keys[i:min(len(keys), i+batch-1)]
		var opts []clientv3.OpOption
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ops := []clientv3.Op{clientv3.OpGet(b.metaKey(), opts...)}
		for _, k := range part {
			ops = append(ops, clientv3.OpGet(bp+k, opts...))
		}
		resp, err := b.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return meta{}, mapErr(err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
			kvs := resp.Responses[0].GetResponseRange().Kvs
			if m, err = b.openMeta(kvs); err != nil {
				return meta{}, err
			}
			if m.writes < b.writes.Load() {
				// An older meta record put back (and the state with it):
				// the count never goes back.
				return meta{}, b.fail(fmt.Errorf("%w: the meta record is at write %d, but this node saw write %d: an older state was put back in etcd, by something other than keywardd", store.ErrDamaged, m.writes, b.writes.Load()))
			}
			if len(kvs) == 0 {
				if err := b.noRecords(ctx, rev); err != nil {
					return meta{}, err
				}
			}
		}
		for j, k := range part {
			kvs := resp.Responses[j+1].GetResponseRange().Kvs
			if len(kvs) == 0 {
				continue
			}
			rec, err := b.seal.Open(bucket, k, kvs[0].Value)
			if err != nil {
				return meta{}, b.fail(err)
			}
			cur[k] = rec
			elems[k] = b.seal.Element(kvs[0].Value)
		}
	}
	return m, nil
}
