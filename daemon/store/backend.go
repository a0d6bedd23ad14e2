package store

import (
	"context"
	"errors"
)

// Backend is the contract of keywardd's state, written once for every
// engine that holds it: Store (a bbolt file, one host) today, a shared
// engine for a fleet later. The domain packages declare the subsets they
// use as their own interfaces; storetest.Run checks a backend against every
// promise below, and a new backend must pass it (docs/formats.md, "The
// store's contract").
//
// # Records
//
// A record is an opaque byte string under a key in a bucket. The buckets
// are those of Buckets, fixed by the schema; any other name is refused with
// ErrUnknownBucket. A key is a non-empty string; every backend takes keys of
// up to MaxKeyLen bytes (an empty key is refused with ErrInvalidKey).
// Absent and present are the only states: a nil record means absent, in
// both directions (an update function is handed nil for an absent key, and
// returning nil deletes the key, or leaves it absent); an empty non-nil
// record is a record like any other, read back as empty and non-nil.
// Records handed out are copies the caller may keep and change; the
// backend keeps no reference to what the caller hands it once the call
// returns.
//
// # Transactions
//
// Each write call (Update, UpdateEach, UpdateEachEmit) is one transaction
// over one bucket (and, for UpdateEachEmit, the outbox):
//
//   - Atomic: every record it computes, and every event it emits, is
//     written, or none is. An error returned by fn writes nothing, and is
//     returned as it is (match it with errors.Is); a panic in fn writes
//     nothing and goes on in the caller's goroutine.
//   - fn is called exactly once for each key, in the order of keys, until
//     it returns an error; a key given twice sees what fn returned for it
//     the first time. No backend calls fn again to retry a transaction:
//     callers count and keep state in fn (apikeys counts the keys it
//     revokes there), so a backend with optimistic concurrency must keep
//     other writers off the records it read instead (for instance by
//     serializing its writers).
//   - Isolated: the old record fn is handed is the latest committed one,
//     and no other write to the bucket commits between fn's read and the
//     transaction's commit: N writers incrementing one record with Update
//     lose no increment. A reader never sees part of a transaction.
//   - Durable when the call returns nil: the write is on the backend's
//     stable storage (bbolt: fsynced), and a backend opened again on the
//     same state has it.
//
// fn must not call the backend: Store serializes its writers, so a write
// from fn waits for ever.
//
// # Reads
//
// Get and ForEach see every write that returned before they started on
// this backend (a backend whose state other processes share says how soon
// it sees theirs), never part of a transaction, and never a state older
// than one they saw before. A ForEach or ForEachAfter sees one state of the
// bucket: a transaction that commits while it runs is seen whole or not at
// all (Store: not at all; a writer may wait for a long read to end when
// the file grows). Both visit keys in ascending byte order (Go's string
// order): ForEach those that start with prefix ("" for all), ForEachAfter
// those that sort strictly after the given key ("" for all). An error
// from their fn stops the walk and is returned as it is. fn must not call
// the backend (Store: a write may wait for the read to end, a read for a
// waiting writer).
//
// # Events
//
// UpdateEachEmit appends the events fn returns to BucketOutbox, in the same
// transaction, under OutboxKey of a sequence number of at least 1 (the
// outbox's cursors start at 0): the numbers of one transaction follow the
// order of the events, and an event committed after
// another has a larger number, so that a reader who has seen number n never
// sees a new event at n or below. A number is never used twice, even once
// its event is deleted. (Store's numbers start at 1 and have no gaps: an
// accident callers must not rely on.)
//
// # Size
//
// Every backend commits a transaction of up to MaxTxKeys keys and events,
// holding up to MaxTxBytes of records and events, each record of up to
// MaxRecordSize bytes. A larger one may be refused with ErrTooLarge before
// anything is written; Store takes whatever fits in memory, which callers
// must not rely on: a caller that may write more splits its work, or
// records its intent first.
//
// # Failures
//
// A write that fails returns an error and nothing is written, except that
// a write failing with ErrUnavailable is one whose commit could not be
// confirmed: it may have been made or not (a disk that failed its fsync, a
// connection lost after the commit was sent), so a caller retries with an
// fn that computes the record from what it finds. A record that does not
// verify stops the backend with ErrDamaged; from a stop on, Err returns the
// reason and every call fails with it, until the state is opened again.
// After Close, every call fails with ErrClosed (which matches
// ErrUnavailable too: the call may be made again elsewhere or later).
// Every method is safe for concurrent use.
type Backend interface {
	// Get returns the record under key, or an error matching ErrNotFound.
	Get(bucket, key string) ([]byte, error)
	// Update is UpdateEach for one key.
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	// UpdateEach computes each key's new record from its old one with fn
	// (nil: absent; a nil result deletes), and writes them all in one
	// transaction.
	UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error
	// UpdateEachEmit is UpdateEach whose fn may also return events,
	// appended to BucketOutbox in the same transaction.
	UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error
	// ForEach calls fn for every record whose key starts with prefix, in
	// key order.
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
	// ForEachAfter calls fn for every record whose key sorts after the
	// given one ("" for all), in key order: how a listing resumes from a
	// page token.
	ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error
	// Err says why the backend stopped serving (ErrDamaged, or
	// ErrUnavailable after a commit it could not confirm), or nil.
	Err() error
	// Writes is a count of the write transactions committed, which never
	// decreases, is larger after each write call that returns nil than
	// before it, and survives Close: the audit log records it, so that a
	// state older than one keywardd acknowledged is refused.
	Writes() uint64
	// Close waits for the calls under way and releases the backend; a
	// second Close returns nil.
	Close() error
}

// Store is the bbolt Backend.
var _ Backend = (*Store)(nil)

// The sizes every backend takes (Backend, "Size"). MaxTxKeys is
// apikeys.MaxCreateBatch, the most records a single request writes at once;
// MaxRecordSize is well above the largest record the domain packages write
// (an API key's, about 20 KiB) and below what etcd takes in one request.
const (
	MaxTxKeys     = 10_000
	MaxTxBytes    = 32 << 20
	MaxRecordSize = 1 << 20
	MaxKeyLen     = 1024
)

// TxLimiter is a backend that takes less in one transaction than every
// backend must (etcd's limits: Backend, "Size"): its limits, in
// operations (a key or an event each) and request bytes.
type TxLimiter interface {
	TxLimits() (ops, bytes int)
}

// Locker is a backend whose state other processes share (a fleet's
// nodes). Lock holds name for this process until the returned function is
// called, or until the process loses touch with the backend for longer
// than its lease (another may then take name); it waits for another
// holder for as long as ctx allows. It is for changes of several steps,
// some outside the store (a key made in the HSM, then recorded), that must
// not interleave with another node's change of the same thing; a single
// write needs no more (each is a transaction). On one host, a process's
// own mutex serves.
type Locker interface {
	Lock(ctx context.Context, name string) (unlock func(), err error)
}

// Syncer is a backend whose reads may lag writes made through another
// process sharing the state (a fleet node's local copy). Sync returns once
// this process's reads see every write committed anywhere before it was
// called: for a lookup by name that found nothing, before it answers "not
// found" to a change (not on a hot path: Sync asks the shared engine).
type Syncer interface {
	Sync(ctx context.Context) error
}

// BatchKeys is how many keys a caller puts in each transaction when it
// splits its work into transactions that are each correct alone (usage
// flushes, sweeps, bulk revocations): MaxTxKeys, or what b takes if it is
// a TxLimiter, with opsPerKey operations per key (2 for a key and its
// event) and records of up to batchRecordSize bytes. At least 1.
func BatchKeys(b any, opsPerKey int) int {
	l, ok := b.(TxLimiter)
	if !ok {
		return MaxTxKeys
	}
	ops, bytes := l.TxLimits()
	n := min(MaxTxKeys, (ops-txOverheadOps)/opsPerKey, bytes/(opsPerKey*batchRecordSize))
	return max(n, 1)
}

// batchRecordSize bounds the records written in batches (an API key's is
// the largest, about 20 KiB at most), and txOverheadOps the operations a
// transaction spends besides its keys (the meta record, the write lock's
// guard, margin).
const (
	batchRecordSize = 24 << 10
	txOverheadOps   = 4
)

// Buckets returns the buckets of the schema, the only ones a Backend
// serves.
func Buckets() []string { return append([]string(nil), buckets...) }

// Errors of the contract, besides ErrNotFound, ErrDamaged and
// ErrUnavailable.
var (
	// ErrUnknownBucket: a bucket not in the schema (a caller's mistake).
	ErrUnknownBucket = errors.New("store: no such bucket")
	// ErrInvalidKey: an empty key, or one longer than the backend takes.
	ErrInvalidKey = errors.New("store: invalid key")
	// ErrTooLarge: a transaction larger than the backend takes (Backend,
	// "Size"); nothing was written. Store never returns it.
	ErrTooLarge = errors.New("store: transaction too large")
	// ErrClosed: the backend was closed. An error matching it matches
	// ErrUnavailable too.
	ErrClosed = errors.New("store: closed")
)

// closedError is what every call returns after Close.
type closedError struct{}

func (closedError) Error() string { return "store: closed: keywardd is stopping; try again" }

// Is matches ErrClosed and ErrUnavailable.
func (closedError) Is(target error) bool { return target == ErrClosed || target == ErrUnavailable }
