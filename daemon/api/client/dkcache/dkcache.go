// Package dkcache is a data-key cache for Go programs that encrypt many
// small records with keyward: it reuses one data key from keywardd for a
// bounded number of records, bytes and seconds, per key name and
// encryption context, as the AWS Encryption SDK's caching materials
// manager does, and seals each record locally with AES-256-GCM under it.
//
//	kw, _ := client.Dial("")
//	c, err := dkcache.New(kw, dkcache.Options{})      // defaults: see Limits
//	rec, err := c.Seal(ctx, "orders", plaintext, map[string]string{"tenant": "42"})
//	pt, err := c.Open(ctx, "orders", rec, map[string]string{"tenant": "42"})
//
// Open takes the key name the record must be under, as Seal does: a
// record under any other key is refused (ErrKey), even one the caller
// may decrypt (see Errors).
//
// # Why in the client
//
// A GenerateDataKey over keywardd's socket costs a gRPC round trip, an
// audit record fsynced before the answer, and one HSM encryption. Measured
// in one run (BenchmarkDataKeyCache in daemon; the numbers are in
// docs/datakey-cache.md), SoftHSM2 encrypts at 33 to 41 k/s (~25 µs),
// while GenerateDataKey over the socket runs at ~2.4 k/s from one client
// (~410 µs; p50 390 to 470 µs over two runs), about what a Ping (the
// durable round trip alone) costs: at one client the Ping was even the
// slower in that run (1 878 against 2 419 calls/s), from four clients on
// it is faster. The HSM is about 5 % of the call. A cache inside keywardd
// would save only that, and would break what keywardd promises: one audit
// record and one reserved encryption of the key version per data key
// handed out. In the client it saves the round trip too: a cached Seal or
// Open of 1 KiB was 2 to 3 µs of CPU, 29 to 180 times the uncached path's
// rate in the documented run (29 to 244 in a second), and is 1.6 µs since
// the cache keeps one AES-GCM per key instead of building one per record.
// So the cache lives here, per process (the process is the caller keywardd
// identifies), and keywardd's audit log still shows every data key it
// made, with its caller.
//
// # What is cached and for how long
//
// Seal caches a data key per key name and canonical encryption context;
// Open caches unwrapped data keys per key name, wrapped key and context,
// so reading many records sealed under one data key costs one Decrypt.
// Each key is used for at most Limits.MaxMessages records, MaxBytes bytes
// of plaintext and MaxAge; at most MaxEntries keys are held (least
// recently used first out). A key past its age is wiped by a timer at that
// moment, not at the next use, so an idle program keeps no key past
// MaxAge; a key used up or evicted is wiped at once.
//
// # Memory
//
// The plaintext data keys live in one anonymous mapping, locked with
// mlock (never swapped), advised MADV_DONTDUMP (not in core dumps) and
// MADV_WIPEONFORK, and cleared when a key leaves the cache; Close clears
// and unmaps it. If mlock is refused (RLIMIT_MEMLOCK), New fails with
// ErrMemoryLock unless Options.AllowUnlocked, and Locked reports which.
//
// Two copies are outside it, and Go leaves no way to avoid them. The
// response message's copy of a new key, which the cache clears at once
// (gRPC's receive buffer held it too, and is reused). And the AES-GCM the
// cache builds for each cached key: Go's AES-256 key schedule starts with
// the key itself, so it is a full copy of the data key, on the ordinary
// heap: it can be swapped and written to a core dump, and nothing wipes
// it: the cache drops it when the key leaves, and it stays until the
// garbage collector reuses its memory. There is one per cached key (and
// one for each record that gets a data key of its own), never one per
// record under a cached key. So
// the locked mapping alone does not keep data keys out of swap and core
// dumps: where that matters, lock the whole process (mlockall(2)) and
// turn core dumps off (RLIMIT_CORE 0, systemd LimitCORE=0, or
// prctl(PR_SET_DUMPABLE, 0)).
//
// # Errors
//
// Open and OpenParts say why a record does not open, for errors.Is:
//   - ErrKey: its data key is under another key name than the one given;
//     keywardd is not asked.
//   - client.ErrInvalid: keywardd refused to unwrap its data key: the
//     record was sealed under another encryption context, or its wrapped
//     key's bytes were changed.
//   - ErrOpen: its data key was unwrapped, but the record does not
//     authenticate: its nonce, ciphertext or tag was changed (for
//     OpenParts, or the additional data differs).
//   - ErrFormat: not a record this version reads (magic, version, lengths,
//     truncated). Seal gives it too when keywardd returns a wrapped key
//     this version cannot store in a record.
//   - keywardd's other refusals, wrapped: client.ErrDenied (no grant to
//     decrypt under the record's key); to a caller granted
//     KeyService.GetKey on the key, client.ErrUnusable (the key is
//     disabled, or the record's key version is below its minimum) and
//     client.ErrNotFound; to any other caller keywardd gives its one
//     answer for all of these, client.ErrInvalid (docs/api.md).
//   - ErrClosed after Close; a caller's context ending while it waits for
//     another's call to keywardd gives its ctx.Err(), wrapped.
//
// Hand-written: the record format and the cache itself, which no kept Go
// library offers (the AWS SDK's is tied to its own message format and
// key providers); the cryptography is the standard library's.
package dkcache

import (
	"bytes"
	"container/list"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
)

// Keyward is what the cache needs of keywardd: *client.Client.
type Keyward interface {
	GenerateDataKey(ctx context.Context, keyName string, encCtx map[string]string) (*client.DataKey, error)
	Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, error)
}

// Limits bound how much one data key is used; a zero field is its default.
type Limits struct {
	// MaxMessages is how many records one data key seals (or, on the Open
	// side, opens) before a new one is asked for. Default 65536: the
	// round trip's share of a record's cost is then about 0.2 %, the
	// chance that two of a key's random 96-bit GCM nonces collide is
	// below 2^-64, and a leaked data key exposes at most that many
	// records. At most 2^32, GCM's bound for random nonces.
	MaxMessages uint64
	// MaxBytes is how many bytes of plaintext one data key seals or
	// opens. Default 1 GiB. A single record larger than it is sealed or
	// opened with a data key of its own, not cached.
	MaxBytes uint64
	// MaxAge is how long a data key is used and kept, from when keywardd
	// made (or opened) it. Default 5 minutes: a key disabled or rotated in
	// keywardd stops being used by this process within it.
	MaxAge time.Duration
	// MaxEntries is how many data keys the cache holds, Seal's and Open's
	// together. Default 64.
	MaxEntries int
}

// Defaults of Limits.
const (
	DefaultMaxMessages = 1 << 16
	DefaultMaxBytes    = 1 << 30
	DefaultMaxAge      = 5 * time.Minute
	DefaultMaxEntries  = 64
	maxMessagesBound   = 1 << 32
)

// Clock is the time the cache reads and the timers it sets to wipe keys
// at their age; nil in Options is the system's.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d; stop cancels it.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }
func (systemClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// Options configure a Cache.
type Options struct {
	Limits
	// AllowUnlocked keeps data keys in memory that is not locked when
	// mlock is refused, instead of failing New with ErrMemoryLock.
	// Cache.Locked tells which it got.
	AllowUnlocked bool
	// Clock, nil for the system's.
	Clock Clock
}

// Errors of the cache, for errors.Is; keywardd's refusals come through
// as client's errors (client.ErrDenied, ...), wrapped.
var (
	// ErrClosed: the cache was closed.
	ErrClosed = errors.New("dkcache: closed")
	// ErrOpen: the record's data key was unwrapped, but the record does
	// not open under it: its nonce, ciphertext or tag (or OpenParts'
	// additional data) changed. A record under another encryption context
	// is refused earlier, by keywardd (client.ErrInvalid): see the
	// package doc's Errors.
	ErrOpen = errors.New("dkcache: the record does not open: it was changed after sealing")
	// ErrKey: the record's data key is wrapped under another key name than
	// the one Open was given.
	ErrKey = errors.New("dkcache: the record is not under the expected key")
)

// Stats counts what the cache did since New.
type Stats struct {
	Hits      uint64 // records sealed or opened with a cached key
	Misses    uint64 // calls to keywardd for a key to cache (GenerateDataKey or Decrypt)
	UsedUp    uint64 // keys retired at MaxMessages or MaxBytes
	Expired   uint64 // keys wiped at MaxAge
	Evicted   uint64 // keys wiped to make room (MaxEntries)
	Uncached  uint64 // records over MaxBytes, given a key of their own (a call each)
	Entries   int    // keys held now
	LockedMem bool   // the keys' memory is locked
}

// Cache is a bounded cache of data keys; safe for concurrent use.
type Cache struct {
	kw    Keyward
	lim   Limits
	clock Clock

	mu       sync.Mutex
	mem      *arena
	entries  map[string]*entry
	lru      list.List // of *entry, most recently used first
	inflight map[string]*fetching
	stats    Stats
	closed   bool
}

// entry is one cached data key.
type entry struct {
	id       string
	slot     int
	key      []byte      // the key's slot in the arena
	aead     cipher.AEAD // AES-GCM of key: its key schedule holds key, on the heap
	wrapped  []byte
	born     time.Time
	messages uint64
	bytes    uint64
	stop     func() bool
	elem     *list.Element
}

// New makes a cache of data keys from kw (a *client.Client). It maps and
// locks the keys' memory now: see ErrMemoryLock.
func New(kw Keyward, opts Options) (*Cache, error) {
	lim := opts.Limits
	if lim.MaxMessages == 0 {
		lim.MaxMessages = DefaultMaxMessages
	}
	if lim.MaxMessages > maxMessagesBound {
		return nil, fmt.Errorf("dkcache: MaxMessages %d is over 2^32, GCM's bound for random nonces under one key", lim.MaxMessages)
	}
	if lim.MaxBytes == 0 {
		lim.MaxBytes = DefaultMaxBytes
	}
	if lim.MaxAge <= 0 {
		lim.MaxAge = DefaultMaxAge
	}
	if lim.MaxEntries <= 0 {
		lim.MaxEntries = DefaultMaxEntries
	}
	mem, err := newArena(lim.MaxEntries, opts.AllowUnlocked)
	if err != nil {
		return nil, err
	}
	c := &Cache{kw: kw, lim: lim, clock: opts.Clock, mem: mem, entries: map[string]*entry{}, inflight: map[string]*fetching{}}
	if c.clock == nil {
		c.clock = systemClock{}
	}
	return c, nil
}

// Locked tells whether the data keys' memory is locked (see
// Options.AllowUnlocked).
func (c *Cache) Locked() bool { return c.mem.locked }

// Limits are the limits in force, defaults filled in.
func (c *Cache) Limits() Limits { return c.lim }

// Stats is what the cache did so far.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Entries, s.LockedMem = len(c.entries), c.mem.locked
	return s
}

// Close wipes every key, unmaps their memory and makes every later call
// fail with ErrClosed. It does not close kw.
func (c *Cache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	for c.lru.Len() > 0 {
		c.retire(c.lru.Front().Value.(*entry))
	}
	return c.mem.close()
}

// Seal encrypts plaintext for encCtx under a data key of keyName, cached,
// and returns a record (docs/datakey-cache.md) holding the wrapped data
// key: Open, or anyone with the data key, opens it.
func (c *Cache) Seal(ctx context.Context, keyName string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	canon := canonicalContext(encCtx)
	aead, wrapped, err := c.sealKey(ctx, keyName, encCtx, canon, len(plaintext))
	if err != nil {
		return nil, err
	}
	out := appendHeader(make([]byte, 0, 5+len(wrapped)+nonceSize+len(plaintext)+tagSize), wrapped)
	return seal(aead, out, plaintext, append(out[:len(out):len(out)], canon...)), nil
}

// Open decrypts a record made by Seal with keyName under encCtx, with a
// cached unwrapped data key when it has one. A record whose data key is
// wrapped under another key name is refused with ErrKey before keywardd
// is asked, even one the caller may decrypt: whoever may seal under some
// other key with this context could otherwise make records this caller
// takes for its own (the AWS Encryption SDK's strict mode, per call).
func (c *Cache) Open(ctx context.Context, keyName string, rec []byte, encCtx map[string]string) ([]byte, error) {
	r, err := parseRecord(rec)
	if err != nil {
		return nil, err
	}
	canon := canonicalContext(encCtx)
	aead, err := c.openKey(ctx, keyName, r.wrapped, encCtx, canon, len(r.sealed)-tagSize)
	if err != nil {
		return nil, err
	}
	return open(aead, r.nonce, r.sealed, r.aad(canon))
}

// SealParts is Seal for a program with its own format: it returns the
// wrapped data key and nonce || ciphertext || tag apart, with
// canonical(encCtx) || additionalData authenticated (the canonical
// context first: its encoding says where it ends). Keep both; give both to
// OpenParts.
func (c *Cache) SealParts(ctx context.Context, keyName string, plaintext, additionalData []byte, encCtx map[string]string) (wrapped, sealed []byte, err error) {
	canon := canonicalContext(encCtx)
	aead, wrapped, err := c.sealKey(ctx, keyName, encCtx, canon, len(plaintext))
	if err != nil {
		return nil, nil, err
	}
	return bytes.Clone(wrapped), seal(aead, nil, plaintext, append(canon, additionalData...)), nil
}

// OpenParts opens what SealParts returned with keyName; like Open, it
// refuses a data key wrapped under another key name with ErrKey.
func (c *Cache) OpenParts(ctx context.Context, keyName string, wrapped, sealed, additionalData []byte, encCtx map[string]string) ([]byte, error) {
	if err := checkWrapped(wrapped); err != nil {
		return nil, err
	}
	if len(sealed) < nonceSize+tagSize {
		return nil, fmt.Errorf("%w: the sealed part is %d bytes, shorter than a nonce and a tag", ErrFormat, len(sealed))
	}
	canon := canonicalContext(encCtx)
	aead, err := c.openKey(ctx, keyName, wrapped, encCtx, canon, len(sealed)-nonceSize-tagSize)
	if err != nil {
		return nil, err
	}
	return open(aead, sealed[:nonceSize], sealed[nonceSize:], append(canon, additionalData...))
}

// aeadMade, if set (tests), is called each time an AES-GCM of a data key
// is built.
var aeadMade func()

// newAEAD is AES-256-GCM under key. It copies key into its key schedule,
// on the heap: the cache builds one per cached key, never one per record.
func newAEAD(key []byte) cipher.AEAD {
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // reserve checked the key's length
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err) // an AES block always makes a GCM
	}
	if aeadMade != nil {
		aeadMade()
	}
	return aead
}

// seal appends a random nonce and the sealing of plaintext to dst.
func seal(aead cipher.AEAD, dst, plaintext, aad []byte) []byte {
	nonce := make([]byte, nonceSize)
	rand.Read(nonce)
	return aead.Seal(append(dst, nonce...), nonce, plaintext, aad)
}

func open(aead cipher.AEAD, nonce, sealed, aad []byte) ([]byte, error) {
	pt, err := aead.Open(nil, nonce, sealed, aad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}

// sealKey reserves one record of size bytes under the cached data key of
// keyName and encCtx, asking keywardd for one if there is none usable.
func (c *Cache) sealKey(ctx context.Context, keyName string, encCtx map[string]string, canon []byte, size int) (cipher.AEAD, []byte, error) {
	return c.reserve(ctx, sealID(keyName, canon), size, func(ctx context.Context) ([]byte, []byte, error) {
		dk, err := c.kw.GenerateDataKey(ctx, keyName, encCtx)
		if err != nil {
			return nil, nil, fmt.Errorf("dkcache: a data key of %q: %w", keyName, err)
		}
		// A wrapped key this version cannot put in a record (a later
		// keywardd's format, a length over a byte) fails here, not in
		// the Open of a record written anyway.
		if err := checkWrapped(dk.Wrapped); err != nil {
			clear(dk.Plaintext)
			return nil, nil, fmt.Errorf("dkcache: keywardd returned a data key of %q that this version of the package cannot store in a record (upgrade the client): %w", keyName, err)
		}
		return dk.Plaintext, dk.Wrapped, nil
	})
}

// sealID is the id of Seal's entry for keyName and the canonical context
// canon.
func sealID(keyName string, canon []byte) string {
	return "s" + string(appendString(nil, keyName)) + string(canon)
}

// openKey reserves one record of size bytes under the unwrapped key of
// wrapped and encCtx, asking keywardd to unwrap it if it is not cached.
// wrapped must be under keyName (ErrKey); checkWrapped has held it to
// format 1.
func (c *Cache) openKey(ctx context.Context, keyName string, wrapped []byte, encCtx map[string]string, canon []byte, size int) (cipher.AEAD, error) {
	if got := wrappedKeyName(wrapped); got != keyName {
		return nil, fmt.Errorf("%w: its data key is wrapped under key %q, not %q", ErrKey, got, keyName)
	}
	id := "o" + string(appendString(nil, keyName)) + string(binary.AppendUvarint(nil, uint64(len(wrapped)))) + string(wrapped) + string(canon)
	aead, _, err := c.reserve(ctx, id, size, func(ctx context.Context) ([]byte, []byte, error) {
		key, err := c.kw.Decrypt(ctx, wrapped, encCtx)
		if err != nil {
			return nil, nil, fmt.Errorf("dkcache: unwrapping the record's data key: %w", err)
		}
		return key, wrapped, nil
	})
	return aead, err
}

// reserve counts one record of size bytes against the entry id and
// returns the AES-GCM of its key and its wrapped key. Without a usable
// entry it calls fetch and caches the key fetch returns (clearing fetch's
// copy). Callers that miss while a fetch for id is under way wait for it,
// as many as the new key can serve: MaxMessages less one records, and no
// more bytes than MaxBytes with the fetcher's record; the others call
// keywardd themselves: with MaxMessages 1 (or records near MaxBytes),
// waiting would make the callers take keys one at a time (measured:
// sealing then ran at one GenerateDataKey's rate whatever the clients,
// with a p99 of a second). If the fetcher's own context ended, its
// waiters try again (one of them fetches); keywardd's refusal is theirs
// too. A key fetched while another was cached for id serves its record
// alone. A record over MaxBytes gets fetch's key alone, uncached.
func (c *Cache) reserve(ctx context.Context, id string, size int, fetch func(context.Context) (key, wrapped []byte, err error)) (cipher.AEAD, []byte, error) {
	cacheable := uint64(size) <= c.lim.MaxBytes
	// The fetched key is cached only if this record does not use it up.
	caches := cacheable && c.lim.MaxMessages > 1 && uint64(size) < c.lim.MaxBytes
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, nil, ErrClosed
		}
		if e := c.entries[id]; e != nil && cacheable && c.usable(e, size) {
			aead := e.aead
			c.stats.Hits++
			c.count(e, size)
			c.mu.Unlock()
			return aead, e.wrapped, nil
		}
		f := c.inflight[id]
		if f == nil || !f.caches || uint64(f.waiters)+1 >= c.lim.MaxMessages || f.bytes+uint64(size) > c.lim.MaxBytes {
			break // c.mu held
		}
		f.waiters++
		f.bytes += uint64(size)
		c.mu.Unlock()
		if waiting != nil {
			waiting()
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			c.mu.Lock()
			f.waiters--
			f.bytes -= uint64(size)
			c.mu.Unlock()
			return nil, nil, fmt.Errorf("dkcache: waiting for a data key: %w", ctx.Err())
		}
		if f.err != nil {
			return nil, nil, f.err
		}
	}
	var f *fetching
	if cacheable {
		c.stats.Misses++
		if c.inflight[id] == nil {
			f = &fetching{done: make(chan struct{}), caches: caches, bytes: uint64(size)}
			c.inflight[id] = f
		}
	} else {
		c.stats.Uncached++
	}
	c.mu.Unlock()

	key, wrapped, err := fetch(ctx)
	defer clear(key)
	if err == nil && len(key) != keySize {
		err = fmt.Errorf("dkcache: keywardd gave a data key of %d bytes, not %d", len(key), keySize)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if f != nil {
		delete(c.inflight, id)
		// The fetcher's context ending is its own failure, not its
		// waiters': judged by the context, since the client reports it
		// as keywardd's status (client.Error, code Canceled), not as
		// context.Canceled.
		if err != nil && ctx.Err() == nil {
			f.err = err
		}
		close(f.done)
	}
	switch {
	case err != nil:
		return nil, nil, err
	case c.closed:
		return nil, nil, ErrClosed
	}
	// A key this record alone uses up is not cached (nor does it evict
	// one that is).
	if _, ok := c.entries[id]; !ok && caches {
		e := c.insert(id, key, wrapped)
		aead := e.aead
		c.count(e, size)
		return aead, wrapped, nil
	}
	return newAEAD(key), wrapped, nil
}

// waiting, if set (tests), is called when a caller starts waiting for
// another's fetch.
var waiting func()

// fetching is a call to keywardd under way for an entry: whether its key
// will be cached, the bytes and callers it is already counted for, and
// its error once done is closed (nil if the fetcher's context ended).
type fetching struct {
	done    chan struct{}
	caches  bool
	waiters int
	bytes   uint64
	err     error
}

// count counts one record of size bytes against e, and retires e if that
// used it up. The caller holds c.mu.
func (c *Cache) count(e *entry, size int) {
	e.messages++
	e.bytes += uint64(size)
	if e.messages >= c.lim.MaxMessages || e.bytes >= c.lim.MaxBytes {
		c.stats.UsedUp++
		c.retire(e)
		return
	}
	c.lru.MoveToFront(e.elem)
}

// usable tells whether e can take one more record of size bytes now;
// if not, it retires e. The caller holds c.mu.
func (c *Cache) usable(e *entry, size int) bool {
	switch {
	case !c.clock.Now().Before(e.born.Add(c.lim.MaxAge)):
		c.stats.Expired++
	case e.bytes+uint64(size) > c.lim.MaxBytes:
		c.stats.UsedUp++
	default:
		return true
	}
	c.retire(e)
	return false
}

// insert caches a copy of key, evicting the least recently used entry if
// the cache is full, and sets the timer that wipes it at MaxAge. The
// caller holds c.mu.
func (c *Cache) insert(id string, key, wrapped []byte) *entry {
	if len(c.mem.free) == 0 {
		c.stats.Evicted++
		c.retire(c.lru.Back().Value.(*entry))
	}
	e := &entry{id: id, wrapped: bytes.Clone(wrapped), born: c.clock.Now()}
	e.slot, e.key = c.mem.take()
	copy(e.key, key)
	e.aead = newAEAD(e.key)
	e.elem = c.lru.PushFront(e)
	c.entries[id] = e
	e.stop = c.clock.AfterFunc(c.lim.MaxAge, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.entries[id] == e {
			c.stats.Expired++
			c.retire(e)
		}
	})
	return e
}

// wiped, if set (tests), sees an entry's key memory right after it was
// cleared, before its slot is reused.
var wiped func(key []byte)

// retire removes e and wipes its key. The caller holds c.mu.
func (c *Cache) retire(e *entry) {
	e.stop()
	delete(c.entries, e.id)
	c.lru.Remove(e.elem)
	c.mem.give(e.slot)
	e.aead = nil // callers under way keep theirs; the garbage collector takes it after
	if wiped != nil {
		wiped(e.key)
	}
}
