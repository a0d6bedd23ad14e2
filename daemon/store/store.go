// Package store is keywardd's state on one host: a bbolt file under the data
// directory, with a schema version and migrations, an exclusive lock (a
// second daemon gets a clear error, not a corrupted file), and an fsync on
// every commit. It stores opaque records in named buckets; the domain
// packages own the record formats and declare the few methods they use as
// interfaces, drawn from one contract, Backend (backend.go), so that a fleet
// can later share state through another engine without touching them;
// storetest.Run checks a backend against that contract. Key material never
// comes here.
//
// A store serves exactly what keywardd last wrote, or nothing. Every record
// is authenticated under a key keywardd derives from its HSM (seal.go), the
// whole content is bound to a write count by a MACed digest, and the file's
// structure is checked with plain reads before bbolt maps it (file.go): a
// damaged, edited or swapped file is refused with ErrDamaged, one older
// than the last write keywardd acknowledged with ErrRolledBack, and a write
// that cannot reach the disk fails with ErrUnavailable, changing nothing.
package store

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"
)

// Buckets of the schema.
const (
	BucketKeys          = "keys"           // root-key metadata, by key name (schema 1)
	BucketRevokedTokens = "revoked_tokens" // revoked token IDs and their expiry (schema 2)
	BucketAPIKeys       = "apikeys"        // API key records, by ID (schema 3)
	BucketAPIKeyMACs    = "apikey_macs"    // hex HMAC of a secret -> the key's ID and secret number (schema 3)
	BucketAPIKeyUsage   = "apikey_usage"   // ID/hour -> that hour's use of a key; ID/last -> last use (schema 3)
	BucketAPIKeyHints   = "apikey_hints"   // a short keyed hash of every secret issued: refuses strangers without the HSM (schema 4)
	BucketCredentials   = "credentials"    // managed credentials and their rotation state, by name (schema 5)
	BucketOutbox        = "outbox"         // revocation events to deliver to plugins, by sequence number (schema 5)
	BucketOutboxCursors = "outbox_cursors" // each plugin's last delivered sequence number (schema 5)
	BucketSchedule      = "schedule"       // each scheduled subject's next and last run, by kind/ID (schema 6)
	BucketBaselines     = "baselines"      // each API key's request-rate baseline and known networks, by ID (schema 6)
)

// buckets are every bucket of the current schema.
var buckets = []string{BucketKeys, BucketRevokedTokens, BucketAPIKeys, BucketAPIKeyMACs, BucketAPIKeyUsage, BucketAPIKeyHints,
	BucketCredentials, BucketOutbox, BucketOutboxCursors, BucketSchedule, BucketBaselines}

// LegacyAPIKeys is the key of BucketAPIKeyHints that marks a store whose
// API keys predate the hints (schema 3): their secrets have none.
const LegacyAPIKeys = "legacy"

// ErrNotFound: no record under that key.
var ErrNotFound = errors.New("store: not found")

const (
	metaBucket = "meta"
	schemaKey  = "schema_version"
	// SchemaVersion is the schema this keywardd writes. Schema 7 seals
	// every record (seal.go).
	SchemaVersion = 7
	sealedSchema  = 7
)

// legacyMigrations[i] brings an unsealed store from schema version i to
// i+1; sealing (schema 7) follows them.
var legacyMigrations = []func(tx *bolt.Tx) error{
	0: func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists([]byte(BucketKeys))
		return err
	},
	1: func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists([]byte(BucketRevokedTokens))
		return err
	},
	2: func(tx *bolt.Tx) error {
		for _, b := range []string{BucketAPIKeys, BucketAPIKeyMACs, BucketAPIKeyUsage} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	},
	3: func(tx *bolt.Tx) error {
		hints, err := tx.CreateBucketIfNotExists([]byte(BucketAPIKeyHints))
		if err != nil {
			return err
		}
		if k, _ := tx.Bucket([]byte(BucketAPIKeys)).Cursor().First(); k != nil {
			return hints.Put([]byte(LegacyAPIKeys), []byte{1})
		}
		return nil
	},
	4: func(tx *bolt.Tx) error {
		for _, b := range []string{BucketCredentials, BucketOutbox, BucketOutboxCursors} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	},
	5: func(tx *bolt.Tx) error {
		for _, b := range []string{BucketSchedule, BucketBaselines} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	},
}

// Act is what Open does on an operator's say-so (Options.Before).
type Act string

const (
	// Sealing: an unsealed store of an old schema is sealed.
	Sealing Act = "seal an unsealed store"
	// AcceptingRollback: a store behind the audit log is served, its count
	// moved past the audit log's.
	AcceptingRollback Act = "serve a store behind the audit log"
)

// Problem is how the store refuses: a message for the operator, and
// ErrDamaged, ErrRolledBack or ErrUnavailable to match with errors.Is.
type Problem struct {
	Err error
	Msg string
}

func (p *Problem) Error() string { return p.Msg }

// Unwrap returns the sentinel.
func (p *Problem) Unwrap() error { return p.Err }

// Runbook is where an operator reads what to do with a refused store.
const Runbook = `docs/operations.md, "Restoring the store"`

// Store is an open store file, the bbolt Backend: one host's state. It is
// safe for concurrent use.
type Store struct {
	db   *bolt.DB
	path string
	seal *sealer

	wmu    sync.Mutex // serializes writes; guards digest
	digest digest     // of the records as committed
	writes atomic.Uint64

	failed   atomic.Pointer[Problem] // set when a record read at run time did not verify
	onDamage atomic.Pointer[func(detail string)]
	onEvents atomic.Pointer[func()]
}

// Options tune Open.
type Options struct {
	// Key authenticates every record (KeySize bytes). keywardd derives it
	// from its store key in the HSM, so that neither a damaged disk nor
	// anyone who can edit the file can change a record unnoticed. Required.
	Key []byte
	// Acknowledged is the write count the audit log last recorded: a store
	// with fewer writes is refused with ErrRolledBack, unless
	// AcceptRollback (an operator restored a backup on purpose).
	Acknowledged   uint64
	AcceptRollback bool
	// AllowUnsealed lets Open seal a store of schema 6 or older, whose
	// records carry no tags. keywardd allows it only when it has just made
	// its store key (the first start of a keywardd that seals), or when an
	// operator says so: otherwise an unsealed store is a sealed one whose
	// tags were cut off (ErrDamaged), since anyone can write one.
	AllowUnsealed bool
	// Before, if set, is told what Open is about to do that an operator
	// allowed (Sealing an unsealed store, AcceptingRollback) before it does
	// it; an error stops Open, changing nothing. keywardd audits there.
	Before func(act Act, had, acknowledged uint64) error
	// LockTimeout is how long Open waits for another process to let go of
	// the file. Default 1 s.
	LockTimeout time.Duration
}

// Open opens or creates the store at path (mode 0600), checks it and brings
// its schema up to date. Nothing is written to a store that is refused.
func Open(path string, o Options) (*Store, error) {
	if o.LockTimeout <= 0 {
		o.LockTimeout = time.Second
	}
	seal, err := newSealer(o.Key)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("store: data directory: %w", err)
	}
	var rep fileReport
	var walked *digester // the records as checkPath read them
	if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
		walked = newDigester(seal).parallel(runtime.GOMAXPROCS(0))
		rep, err = checkPath(path, o.LockTimeout, walked)
		walked.finish()
		if err != nil {
			return nil, refusal(path, err)
		}
	}
	if beforeOpen != nil {
		beforeOpen(path)
	}
	s := &Store{path: path, seal: seal}
	var opened *os.File // bbolt's, to compare with the file walked
	err = guard(func() error {
		var err error
		s.db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: o.LockTimeout, OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			opened = f
			return f, err
		}})
		return err
	})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, inUse(path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return nil, refusal(path, fmt.Errorf("%w: bbolt could not open it: %v", ErrDamaged, err))
	case err != nil:
		return nil, refusal(path, fmt.Errorf("store: opening %s: %w", path, err))
	}
	if walked != nil && !rep.same(opened) {
		walked = nil // not the file walked, or written since: verified again through bbolt
	}
	if err := s.load(rep, o, walked); err != nil {
		s.db.Close()
		return nil, err
	}
	return s, nil
}

func inUse(path string) error {
	return fmt.Errorf("store: %s is in use by another process (is another keywardd running on this data directory?)", path)
}

// refusal says what is wrong with the store at path and what to do. An
// error that is neither ErrDamaged nor ErrRolledBack (the file cannot be
// opened or read: a permission, the disk) is returned as it is.
func refusal(path string, err error) error {
	if errors.Is(err, ErrUnsealed) {
		return &Problem{Err: ErrDamaged, Msg: fmt.Sprintf("store: %s is not sealed, but this HSM token's keyward-store key shows keywardd sealed its store before: the store's seals were cut off (so its records cannot be trusted), a backup from before keywardd sealed its store was put back, or keywardd's first start after the upgrade that seals stores stopped before it sealed this one. keywardd changed nothing and does not serve from it: put a sealed copy back; if you put back such an old backup on purpose, or the upgrade's first start was cut short, start once with -accept-unsealed-store (see %s)", path, Runbook)}
	}
	if errors.Is(err, ErrRolledBack) {
		return &Problem{Err: ErrRolledBack, Msg: fmt.Sprintf("store: %s is older than the last write keywardd acknowledged: %v. keywardd changed nothing and does not serve from it: put the newest copy back, or if there is none, start once with -accept-store-rollback (see %s)", path, unwrapMsg(err), Runbook)}
	}
	if !errors.Is(err, ErrDamaged) {
		return err
	}
	return &Problem{Err: ErrDamaged, Msg: fmt.Sprintf("store: %s is damaged: %v. keywardd changed nothing and does not serve from it: restore it from a backup (see %s)", path, unwrapMsg(err), Runbook)}
}

// ErrUnsealed: a store of an old schema that Open may not seal.
var ErrUnsealed = errors.New("store: not sealed")

// unwrapMsg is err's message without the sentinel's prefix.
func unwrapMsg(err error) string {
	m := err.Error()
	for _, s := range []error{ErrDamaged, ErrRolledBack} {
		m = trimPrefix(m, s.Error()+": ")
	}
	return m
}

func trimPrefix(s, p string) string {
	if len(s) >= len(p) && s[:len(p)] == p {
		return s[len(p):]
	}
	return s
}

// checkPath checks the file's structure under a shared lock, which waits
// for and keeps out any writer, then drops the pages it read from the page
// cache: keywardd's own map then holds only the pages its calls use.
func checkPath(path string, timeout time.Duration, v visitor) (fileReport, error) {
	f, err := os.Open(path)
	if err != nil {
		return fileReport{}, fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return fileReport{}, inUse(path)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// With a visitor, the file's stamp before and after the walk: the lock
	// keeps out only writers that take it, and what the visitor was shown
	// holds for what bbolt opens only if nothing wrote the file meanwhile
	// (Open compares the stamp with bbolt's file). A change time moves once
	// a clock tick (milliseconds, on kernels before 6.13): one that recent
	// could hide a write in the same tick, so the walk starts once it is
	// older (as git treats a "racily clean" file); one ahead of the clock
	// proves nothing, and the records are then checked again through bbolt.
	var before fileStamp
	var age time.Duration
	if v != nil {
		if before, err = fileID(f); err != nil {
			return fileReport{}, fmt.Errorf("store: %w", err)
		}
		if age = time.Since(time.Unix(before.ctime.Unix())); age >= 0 && age < ctimeTick {
			time.Sleep(ctimeTick - age)
			if before, err = fileID(f); err != nil {
				return fileReport{}, fmt.Errorf("store: %w", err)
			}
		}
	}
	var rep fileReport
	err = guard(func() error {
		var err error
		rep, err = checkFile(f, v)
		return err
	})
	if duringWalk != nil {
		duringWalk(path)
	}
	if err == nil && v != nil {
		var after fileStamp
		if after, err = fileID(f); err == nil {
			rep.id, rep.changed = after, after != before || age < 0
		}
	}
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED) // advice: nothing to do if refused
	return rep, err
}

// ctimeTick is more than the coarsest step of a file's change time.
const ctimeTick = 20 * time.Millisecond

// duringWalk, if set, runs as checkFile's walk ends, under its lock, and
// beforeOpen between the walk and bbolt's open (tests: writes the walk did
// not see).
var duringWalk, beforeOpen func(path string)

// guard runs fn, turning a panic, or a fault reading a mapped file, into
// ErrDamaged: bbolt panics on pages it finds inconsistent.
func guard(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: reading it failed: %v", ErrDamaged, r)
		}
	}()
	return fn()
}

// load verifies every record against the integrity record (or seals a
// store of an older schema, or initializes a new one), checks the write
// count against the audit log's, and migrates.
func (s *Store) load(rep fileReport, o Options, walked *digester) error {
	var (
		sealed bool
		schema int
		d      digest
		writes uint64
	)
	var fresh bool // a new file: no bucket at all
	err := guard(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			meta := tx.Bucket([]byte(metaBucket))
			sealed = meta != nil && meta.Get([]byte(integrityKey)) != nil
			if !sealed {
				k, _ := tx.Cursor().First()
				fresh = k == nil
				schema = legacySchema(tx)
				return nil
			}
			var err error
			// The schema first: a newer keywardd's store has buckets this
			// one does not know, and is no damaged store.
			if schema, err = s.schema(tx); err != nil || schema > SchemaVersion {
				return err
			}
			if walked != nil && uint64(tx.ID()) != rep.txid {
				walked = nil // bbolt serves another transaction than the one walked
			}
			if walked == nil {
				boltVerified.Add(1)
				d, writes, err = s.verifyAll(tx)
				return err
			}
			if d, err = walked.done(); err != nil {
				return err
			}
			d, writes, err = s.integrity(tx, d)
			return err
		})
	})
	if err != nil {
		return refusal(s.path, err)
	}
	if schema > SchemaVersion {
		return fmt.Errorf("store: %s has schema version %d, newer than this keywardd's %d: run a newer keywardd", s.path, schema, SchemaVersion)
	}
	if !sealed && !fresh && !o.AllowUnsealed {
		return refusal(s.path, ErrUnsealed)
	}
	if writes < o.Acknowledged {
		why := fmt.Sprintf("it holds write %d, the audit log records write %d", writes, o.Acknowledged)
		if !sealed {
			why = fmt.Sprintf("it is not sealed (a new or pre-schema-%d file), but the audit log records write %d of a sealed store", sealedSchema, o.Acknowledged)
		}
		if rep.metaDamaged != "" {
			why += "; its newest meta page is damaged (" + rep.metaDamaged + "), so bbolt fell back to the transaction before"
		}
		if !o.AcceptRollback {
			return refusal(s.path, fmt.Errorf("%w: %s", ErrRolledBack, why))
		}
	}
	before := func(act Act) error {
		if o.Before == nil {
			return nil
		}
		return o.Before(act, writes, o.Acknowledged)
	}
	s.digest = d
	s.writes.Store(writes)
	if !sealed {
		if !fresh {
			if err := before(Sealing); err != nil {
				return err
			}
		}
		if err := s.sealLegacy(schema); err != nil {
			return err
		}
	}
	if had := s.writes.Load(); had < o.Acknowledged {
		// Accepted: the write count moves past the acknowledged one, so
		// that the store this one replaces, were it put back, is behind.
		if err := before(AcceptingRollback); err != nil {
			return err
		}
		return s.bump(o.Acknowledged + 1)
	}
	return nil
}

// bump sets the write count to writes, in a write of its own.
func (s *Store) bump(writes uint64) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	d := s.digest
	err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(metaBucket)).Put([]byte(integrityKey), s.seal.integrity(writes, &d))
	})
	if err != nil {
		return writeFailed(err)
	}
	s.writes.Store(writes)
	return nil
}

// verify checks every record's tag and the buckets of the schema, and
// returns the digest of the records, through bbolt (after a failed commit;
// at start, checkFile's walk shows the records to a digester).
func (s *Store) verify(tx *bolt.Tx) (digest, error) {
	g := newDigester(s.seal)
	err := tx.ForEach(func(name []byte, b *bolt.Bucket) error {
		g.bucket(name, b.Sequence())
		c := b.Cursor()
		for k, v := c.First(); k != nil && g.err == nil; k, v = c.Next() {
			if v == nil {
				g.nested(name, k)
			} else {
				g.record(name, k, v)
			}
		}
		return g.err
	})
	if err != nil {
		return digest{}, err
	}
	return g.done()
}

// boltVerified counts the starts that verified the records through bbolt,
// not through checkFile's walk (tests).
var boltVerified atomic.Int64

// digester checks what it is shown of a store (a visitor) as verify
// checks it: the buckets are the schema's, every record's tag holds, no
// bucket is inside another; and sums the digest. It keeps the first
// problem.
type digester struct {
	seal  *sealer
	d     digest
	known map[string]bool // the schema's buckets, true once seen
	err   error

	// In parallel (checkFile's walk at start, where the records' MACs are
	// most of the time): records go to workers in batches, each summing a
	// digest of its own; XOR does not mind the order.
	batch  []shown
	work   chan []shown
	wg     sync.WaitGroup
	mu     sync.Mutex // guards wd and werr, the workers' sum and first problem
	wd     digest
	werr   error
	failed atomic.Bool // werr is set
}

// shown is a record a digester was shown.
type shown struct{ bucket, key, val []byte }

// parallel has n workers check the records; finish must follow.
func (g *digester) parallel(n int) *digester {
	g.work = make(chan []shown, 2*n)
	for range n {
		g.wg.Go(func() {
			failed := func(err error) {
				g.mu.Lock()
				if g.werr == nil {
					g.werr = err
				}
				g.mu.Unlock()
				g.failed.Store(true)
			}
			defer func() {
				if r := recover(); r != nil {
					failed(fmt.Errorf("%w: checking its records failed: %v", ErrDamaged, r))
					for range g.work { // the walk does not wait on a worker gone
					}
				}
			}()
			for b := range g.work {
				var d digest
				for _, r := range b {
					e, err := g.check(r.bucket, r.key, r.val)
					if err != nil {
						failed(err)
						break
					}
					d.xor(e)
				}
				g.mu.Lock()
				g.wd.xor(d)
				g.mu.Unlock()
			}
		})
	}
	return g
}

// finish waits for the workers, and takes their sum and first problem.
func (g *digester) finish() {
	if g.work == nil {
		return
	}
	if len(g.batch) > 0 {
		g.work <- g.batch
	}
	close(g.work)
	g.wg.Wait()
	g.work, g.batch = nil, nil
	g.d.xor(g.wd)
	if g.err == nil {
		g.err = g.werr
	}
}

func newDigester(seal *sealer) *digester {
	g := &digester{seal: seal, known: map[string]bool{metaBucket: false}}
	for _, b := range buckets {
		g.known[b] = false
	}
	return g
}

func (g *digester) bucket(name []byte, seq uint64) {
	if g.err != nil {
		return
	}
	if _, ok := g.known[string(name)]; !ok {
		g.err = fmt.Errorf("%w: a bucket %q that is not in the schema", ErrDamaged, name)
		return
	}
	g.known[string(name)] = true
	g.d.xor(g.seal.sequence(name, seq))
}

func (g *digester) nested(bucket, key []byte) {
	if g.err == nil {
		g.err = fmt.Errorf("%w: a bucket %q inside the bucket %q", ErrDamaged, key, bucket)
	}
}

func (g *digester) record(bucket, key, val []byte) {
	if g.err != nil || string(bucket) == metaBucket && string(key) == integrityKey {
		return
	}
	if g.work != nil {
		if g.failed.Load() {
			return // a worker found a problem: the rest need no MAC
		}
		if g.batch = append(g.batch, shown{bucket, key, val}); len(g.batch) == 512 {
			g.work <- g.batch
			g.batch = nil
		}
		return
	}
	e, err := g.check(bucket, key, val)
	if err != nil {
		g.err = err
		return
	}
	g.d.xor(e)
}

// check checks a record's tag and returns its share of the digest.
func (g *digester) check(bucket, key, val []byte) ([sha256.Size]byte, error) {
	_, t, err := g.seal.open(bucket, key, val)
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("%w: the record %q of the bucket %q: %v (a damaged disk, an edited file, or a store written with another HSM token's keyward-store key)", ErrDamaged, key, bucket, err)
	}
	return g.seal.element(t), nil
}

// done is the digest, or the first problem found, or the first bucket of
// the schema not seen.
func (g *digester) done() (digest, error) {
	g.finish()
	if g.err != nil {
		return digest{}, g.err
	}
	for _, b := range append([]string{metaBucket}, buckets...) {
		if !g.known[b] {
			return digest{}, fmt.Errorf("%w: the bucket %q is missing", ErrDamaged, b)
		}
	}
	return g.d, nil
}

// verifyAll checks every record and the integrity record, and returns the
// digest and the write count it vouches for.
func (s *Store) verifyAll(tx *bolt.Tx) (digest, uint64, error) {
	d, err := s.verify(tx)
	if err != nil {
		return d, 0, err
	}
	return s.integrity(tx, d)
}

// integrity checks the integrity record against the digest d of the
// records, and returns the write count it vouches for.
func (s *Store) integrity(tx *bolt.Tx, d digest) (digest, uint64, error) {
	writes, err := s.seal.checkIntegrity(tx.Bucket([]byte(metaBucket)).Get([]byte(integrityKey)), &d)
	if err != nil {
		return d, 0, fmt.Errorf("%w: %v", ErrDamaged, err)
	}
	return d, writes, nil
}

// schema reads the sealed schema version.
func (s *Store) schema(tx *bolt.Tx) (int, error) {
	v := tx.Bucket([]byte(metaBucket)).Get([]byte(schemaKey))
	rec, _, err := s.seal.open([]byte(metaBucket), []byte(schemaKey), v)
	if err != nil || len(rec) != 8 {
		return 0, fmt.Errorf("%w: the schema version does not verify (a damaged disk, an edited file, or a store written with another HSM token's keyward-store key)", ErrDamaged)
	}
	return int(binary.BigEndian.Uint64(rec)), nil
}

// legacySchema reads an unsealed store's schema version (0: a new file).
func legacySchema(tx *bolt.Tx) int {
	b := tx.Bucket([]byte(metaBucket))
	if b == nil {
		return 0
	}
	if raw := b.Get([]byte(schemaKey)); len(raw) == 8 {
		return int(binary.BigEndian.Uint64(raw))
	}
	return 0
}

// sealLegacy brings a new or unsealed store to the sealed schema in one
// transaction: the old migrations, then every record sealed.
func (s *Store) sealLegacy(from int) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	var d digest
	err := s.db.Update(func(tx *bolt.Tx) error {
		if from > len(legacyMigrations) {
			return fmt.Errorf("%w: unsealed, with schema version %d, which no keywardd wrote", ErrDamaged, from)
		}
		for v := from; v < len(legacyMigrations); v++ {
			if err := legacyMigrations[v](tx); err != nil {
				return fmt.Errorf("store: migrating %s from schema %d to %d: %w", s.path, v, v+1, err)
			}
		}
		meta, err := tx.CreateBucketIfNotExists([]byte(metaBucket))
		if err != nil {
			return err
		}
		if err := meta.Put([]byte(schemaKey), binary.BigEndian.AppendUint64(nil, sealedSchema)); err != nil {
			return err
		}
		err = tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			d.xor(s.seal.sequence(name, b.Sequence()))
			var ks, vs [][]byte
			if err := b.ForEach(func(k, v []byte) error {
				if v == nil {
					return fmt.Errorf("%w: a bucket %q inside the bucket %q", ErrDamaged, k, name)
				}
				if _, _, err := s.seal.open(name, k, v); err == nil {
					return fmt.Errorf("%w: it holds sealed records but no integrity record, which was removed", ErrDamaged)
				}
				ks, vs = append(ks, bytes.Clone(k)), append(vs, bytes.Clone(v))
				return nil
			}); err != nil {
				return err
			}
			for i, k := range ks {
				sealed, t := s.seal.seal(name, k, vs[i])
				if err := b.Put(k, sealed); err != nil {
					return err
				}
				d.xor(s.seal.element(t))
			}
			return nil
		})
		if err != nil {
			return err
		}
		return meta.Put([]byte(integrityKey), s.seal.integrity(1, &d))
	})
	if errors.Is(err, ErrDamaged) {
		return refusal(s.path, err)
	}
	if err != nil {
		return writeFailed(err)
	}
	s.digest = d
	s.writes.Store(1)
	return nil
}

// Sealed says whether the store at path is sealed (schema 7 or later),
// without its key: whether it needs the HSM's keyward-store key to be
// read. A missing or empty file is not sealed; a damaged one is an error.
func Sealed(path string, lockTimeout time.Duration) (bool, error) {
	if lockTimeout <= 0 {
		lockTimeout = time.Second
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() == 0 {
		return false, nil
	}
	if _, err := checkPath(path, lockTimeout, nil); err != nil {
		return false, refusal(path, err)
	}
	var sealed bool
	err := guard(func() error {
		db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: lockTimeout})
		if err != nil {
			return err
		}
		defer db.Close()
		return db.View(func(tx *bolt.Tx) error {
			meta := tx.Bucket([]byte(metaBucket))
			sealed = meta != nil && meta.Get([]byte(integrityKey)) != nil
			return nil
		})
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return false, inUse(path)
	}
	return sealed, err
}

// Close waits for the calls under way and closes the file; a second Close
// returns nil.
func (s *Store) Close() error { return s.db.Close() }

// Path is the store's file.
func (s *Store) Path() string { return s.path }

// Writes is how many writes the store has committed since it was sealed:
// the audit log records it, so that an older store is refused.
func (s *Store) Writes() uint64 { return s.writes.Load() }

// Err says why the store stopped serving (a record read at run time did not
// verify), or nil. A nil Store has none.
func (s *Store) Err() error {
	if s == nil {
		return nil
	}
	if p := s.failed.Load(); p != nil {
		return p
	}
	return nil
}

// fail marks the store as damaged at run time: every later call fails.
// Callers' answers say that much and where the runbook is; what was found
// (which record: names callers may not see) goes to OnDamage, for the log.
func (s *Store) fail(err error) error {
	p := &Problem{Err: ErrDamaged, Msg: fmt.Sprintf("store: keywardd's store is damaged (a record does not verify, or the file changed under keywardd). keywardd stopped serving and changes nothing more: restore the store from a backup (see %s)", Runbook)}
	if s.failed.CompareAndSwap(nil, p) {
		if fn := s.onDamage.Load(); fn != nil {
			(*fn)(unwrapMsg(err))
		}
	}
	return s.Err()
}

// OnDamage sets a function told, once, what was found when a record read
// while serving does not verify: for the operator's log, not for callers.
func (s *Store) OnDamage(fn func(detail string)) { s.onDamage.Store(&fn) }

// OnEvents has fn called after each committed write that added events to
// the outbox (UpdateEachEmit), under the store's write lock: the watch
// stream wakes its watchers at once rather than at its next look. fn must
// neither wait nor call the store.
func (s *Store) OnEvents(fn func()) { s.onEvents.Store(&fn) }

// writeFailed turns a failed commit into ErrUnavailable, without the
// file's path (callers' answers carry it).
func writeFailed(err error) error {
	why := errnoOf(err)
	return &Problem{Err: ErrUnavailable, Msg: "store: keywardd's store cannot be written now (" + why + "); the change was not confirmed on disk: check whether it was made, then try again later"}
}

// errnoOf is what the system said of a failed write, without the file's
// path.
func errnoOf(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return "the disk refused the write"
}

// SchemaVersion returns the schema version of the open file.
func (s *Store) SchemaVersion() (int, error) {
	var v int
	err := s.read(func(tx *bolt.Tx) error {
		var err error
		v, err = s.schema(tx)
		return err
	})
	return v, err
}

func bucket(tx *bolt.Tx, name string) (*bolt.Bucket, error) {
	b := tx.Bucket([]byte(name))
	if b == nil || name == metaBucket {
		return nil, fmt.Errorf("%w %q in schema %d", ErrUnknownBucket, name, SchemaVersion)
	}
	return b, nil
}

// read runs a read transaction; a record that does not verify stops the
// store.
func (s *Store) read(fn func(tx *bolt.Tx) error) error {
	if err := s.Err(); err != nil {
		return err
	}
	err := guard(func() error { return s.db.View(fn) })
	switch {
	case errors.Is(err, ErrDamaged):
		return s.fail(err)
	case errors.Is(err, bolterrors.ErrDatabaseNotOpen):
		return closedError{}
	}
	return err
}

// checkKey refuses a key bbolt cannot hold.
func checkKey(key string) error {
	if key == "" || len(key) > bolt.MaxKeySize {
		return fmt.Errorf("%w: a key of %d bytes; a key has 1 to %d", ErrInvalidKey, len(key), bolt.MaxKeySize)
	}
	return nil
}

// openRecord checks a stored value and returns a copy of its record.
func (s *Store) openRecord(bucketName string, key, v []byte) ([]byte, [tagSize]byte, error) {
	rec, t, err := s.seal.open([]byte(bucketName), key, v)
	if err != nil {
		return nil, t, fmt.Errorf("%w: the record %q of the bucket %q: %v", ErrDamaged, key, bucketName, err)
	}
	return bytes.Clone(rec), t, nil
}

// Get returns a copy of the record under key, or ErrNotFound.
func (s *Store) Get(bucketName, key string) ([]byte, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	var out []byte
	err := s.read(func(tx *bolt.Tx) error {
		b, err := bucket(tx, bucketName)
		if err != nil {
			return err
		}
		v := b.Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		out, _, err = s.openRecord(bucketName, []byte(key), v)
		return err
	})
	return out, err
}

// OutboxSequence is the last sequence number the outbox gave an event:
// a migration carries it on, so that no number is given twice.
func (s *Store) OutboxSequence() (uint64, error) {
	var seq uint64
	err := s.read(func(tx *bolt.Tx) error {
		b, err := bucket(tx, BucketOutbox)
		if err == nil {
			seq = b.Sequence()
		}
		return err
	})
	return seq, err
}

// Update reads the record under key (nil if absent), lets fn compute the
// new one, and writes it in one transaction, synced to disk before Update
// returns. If fn returns an error nothing is written. A nil record from fn
// deletes the key.
func (s *Store) Update(bucketName, key string, fn func(old []byte) ([]byte, error)) error {
	return s.UpdateEach(bucketName, []string{key}, func(_ string, old []byte) ([]byte, error) { return fn(old) })
}

// UpdateEach is Update for many keys in one transaction, one sync to disk:
// fn computes each key's new record from its old one (nil: absent; a nil
// result deletes). An error from fn writes nothing at all.
func (s *Store) UpdateEach(bucketName string, keys []string, fn func(key string, old []byte) ([]byte, error)) error {
	return s.UpdateEachEmit(bucketName, keys, func(k string, old []byte) ([]byte, [][]byte, error) {
		rec, err := fn(k, old)
		return rec, nil, err
	})
}

// errCallerPanicked stops a transaction whose caller's fn panicked.
var errCallerPanicked = errors.New("store: the caller's function panicked")

// callerFn runs a caller's fn inside a guarded transaction: a panic of the
// caller's is no sign of a damaged store, so it is caught here, the
// transaction ends, and rethrow raises it again outside.
func callerFn(caught *any, fn func() ([]byte, [][]byte, error)) (rec []byte, events [][]byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			*caught, err = r, errCallerPanicked
		}
	}()
	return fn()
}

func rethrow(caught *any) {
	if *caught != nil {
		panic(*caught)
	}
}

// fnError carries an error of the caller's fn through bbolt's Update, to
// tell it from a failed write.
type fnError struct{ err error }

func (e *fnError) Error() string { return e.err.Error() }

// UpdateEachEmit is UpdateEach whose fn may also return events, appended
// to BucketOutbox in the same transaction under the next sequence numbers
// (OutboxKey): a change and the events announcing it are written together
// or not at all.
func (s *Store) UpdateEachEmit(bucketName string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error {
	if err := s.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return err
		}
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	d := s.digest
	writes := s.writes.Load() + 1
	var caught any
	defer rethrow(&caught)
	var txid int
	emitted := false
	err := guard(func() error {
		return s.db.Update(func(tx *bolt.Tx) error {
			txid = tx.ID()
			b, err := bucket(tx, bucketName)
			if err != nil {
				return &fnError{err}
			}
			name := []byte(bucketName)
			for _, k := range keys {
				key := []byte(k)
				var old []byte
				if v := b.Get(key); v != nil {
					var t [tagSize]byte
					if old, t, err = s.openRecord(bucketName, key, v); err != nil {
						return err
					}
					d.xor(s.seal.element(t))
				}
				rec, events, err := callerFn(&caught, func() ([]byte, [][]byte, error) { return fn(k, old) })
				if err != nil {
					return &fnError{err}
				}
				if rec == nil {
					err = b.Delete(key)
				} else {
					sealed, t := s.seal.seal(name, key, rec)
					d.xor(s.seal.element(t))
					err = b.Put(key, sealed)
				}
				if err != nil {
					return err
				}
				if len(events) > 0 {
					if err := s.emit(tx, &d, events); err != nil {
						return err
					}
					emitted = true
				}
			}
			return tx.Bucket([]byte(metaBucket)).Put([]byte(integrityKey), s.seal.integrity(writes, &d))
		})
	})
	var fe *fnError
	switch {
	case errors.As(err, &fe):
		return fe.err
	case errors.Is(err, ErrDamaged):
		return s.fail(err)
	case err != nil:
		return s.failedCommit(err, txid)
	}
	s.digest = d
	s.writes.Store(writes)
	if fn := s.onEvents.Load(); emitted && fn != nil {
		(*fn)()
	}
	return nil
}

// failedCommit answers a commit that failed. When the sync of bbolt's meta
// page is what failed, the page is in the page cache all the same and bbolt
// serves the transaction (txid) it reported as failed, although the disk
// may not hold it, nor (Linux marks pages whose write-back failed clean)
// ever will: the store then stops writing until keywardd is restarted and
// checks it again, as PostgreSQL stops at a failed fsync; the digest and
// count are read back so that what it serves meanwhile verifies. Under wmu.
func (s *Store) failedCommit(cause error, txid int) error {
	if errors.Is(cause, bolterrors.ErrDatabaseNotOpen) {
		return closedError{}
	}
	served := false
	err := guard(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			if tx.ID() != txid {
				return nil // the transaction is not served: nothing changed
			}
			served = true
			d, writes, err := s.verifyAll(tx)
			if err != nil {
				return err
			}
			s.digest = d
			s.writes.Store(writes)
			return nil
		})
	})
	switch {
	case errors.Is(err, ErrDamaged):
		return s.fail(err)
	case err != nil:
		return writeFailed(cause)
	case served:
		p := &Problem{Err: ErrUnavailable, Msg: "store: keywardd's store could not confirm a write on disk (" + errnoOf(cause) + "), which may be lost whatever keywardd writes after it: keywardd stopped serving; restart it (it checks the store at start) once the disk is sound"}
		if s.failed.CompareAndSwap(nil, p) {
			if fn := s.onDamage.Load(); fn != nil {
				(*fn)("a failed sync of the store's meta page: " + cause.Error())
			}
		}
		return s.Err()
	}
	return writeFailed(cause)
}

// emit appends events to the outbox under its next sequence numbers.
func (s *Store) emit(tx *bolt.Tx, d *digest, events [][]byte) error {
	ob, err := bucket(tx, BucketOutbox)
	if err != nil {
		return err
	}
	name := []byte(BucketOutbox)
	d.xor(s.seal.sequence(name, ob.Sequence()))
	for _, event := range events {
		seq, err := ob.NextSequence()
		if err != nil {
			return err
		}
		key := []byte(OutboxKey(seq))
		if ob.Get(key) != nil {
			return fmt.Errorf("%w: the outbox's sequence number %d is taken already", ErrDamaged, seq)
		}
		sealed, t := s.seal.seal(name, key, event)
		d.xor(s.seal.element(t))
		if err := ob.Put(key, sealed); err != nil {
			return err
		}
	}
	d.xor(s.seal.sequence(name, ob.Sequence()))
	return nil
}

// OutboxKey is the key of the outbox event of sequence number seq: fixed
// width, so that key order is sequence order.
func OutboxKey(seq uint64) string { return fmt.Sprintf("%020d", seq) }

// ForEach calls fn for every record whose key starts with prefix, in key
// order, with copies of key and value. An error from fn stops it.
func (s *Store) ForEach(bucketName, prefix string, fn func(key string, rec []byte) error) error {
	p := []byte(prefix)
	return s.scan(bucketName, p, func(k []byte) bool { return bytes.HasPrefix(k, p) }, fn)
}

// ForEachAfter calls fn for every record whose key sorts after the given
// one ("" for all), in key order, with copies of key and value; it is how
// a listing resumes from a page token. An error from fn stops it.
func (s *Store) ForEachAfter(bucketName, after string, fn func(key string, rec []byte) error) error {
	start := []byte(after)
	if after != "" {
		start = append(start, 0) // the least key greater than after
	}
	return s.scan(bucketName, start, func([]byte) bool { return true }, fn)
}

func (s *Store) scan(bucketName string, from []byte, in func(k []byte) bool, fn func(key string, rec []byte) error) error {
	var fnErr error
	var caught any
	defer rethrow(&caught)
	err := s.read(func(tx *bolt.Tx) error {
		b, err := bucket(tx, bucketName)
		if err != nil {
			return err
		}
		c := b.Cursor()
		for k, v := c.Seek(from); k != nil && in(k); k, v = c.Next() {
			rec, _, err := s.openRecord(bucketName, k, v)
			if err != nil {
				return err
			}
			if _, _, fnErr = callerFn(&caught, func() ([]byte, [][]byte, error) { return nil, nil, fn(string(k), rec) }); fnErr != nil {
				return fnErr
			}
		}
		return nil
	})
	if fnErr != nil {
		return fnErr
	}
	return err
}
