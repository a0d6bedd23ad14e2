// Package store is keywardd's state on one host: a bbolt file under the data
// directory, with a schema version and migrations, an integrity check when it
// opens, an exclusive lock (a second daemon gets a clear error, not a
// corrupted file), and an fsync on every commit. It stores opaque records in
// named buckets; the domain packages own the record formats and declare the
// few methods they use as interfaces, so that a fleet can later share state
// through another engine without touching them. Key material never comes here.
package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// LegacyAPIKeys is the key of BucketAPIKeyHints that marks a store whose
// API keys predate the hints (schema 3): their secrets have none.
const LegacyAPIKeys = "legacy"

// ErrNotFound: no record under that key.
var ErrNotFound = errors.New("store: not found")

const (
	metaBucket    = "meta"
	schemaKey     = "schema_version"
	SchemaVersion = 6
)

// migrations[i] brings a store from schema version i to i+1.
var migrations = []func(tx *bolt.Tx) error{
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

// Store is an open store file. It is safe for concurrent use.
type Store struct {
	db   *bolt.DB
	path string
}

// Options tune Open. Zero values mean the defaults.
type Options struct {
	// LockTimeout is how long Open waits for another process to let go of
	// the file. Default 1 s.
	LockTimeout time.Duration
}

// Open opens or creates the store at path (mode 0600), checks it and brings
// its schema up to date.
func Open(path string, o Options) (*Store, error) {
	if o.LockTimeout <= 0 {
		o.LockTimeout = time.Second
	}
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("store: data directory: %w", err)
	}
	// The check reads every page through a read-only map of the file, made
	// before keywardd's own: those pages must not stay in keywardd's
	// resident set, nor in the page cache, where the kernel maps up to 16
	// cached neighbours of every page a lookup touches ("fault-around"),
	// so a 1 GB store would soon be 1 GB resident for a few thousand keys
	// in use. Its clean cached pages are dropped after it; bbolt maps the
	// file MADV_RANDOM (no read-ahead), so keywardd's map holds the pages
	// its calls use. The check's shared lock waits for, and keeps out, any
	// writer, as keywardd's exclusive one then does.
	if _, err := os.Stat(path); err == nil {
		ro, err := openFile(path, o, true)
		if err != nil {
			return nil, err
		}
		err = ro.Check()
		ro.Close()
		if err != nil {
			return nil, err
		}
		if f, err := os.Open(path); err == nil {
			unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED) // advice: nothing to do if refused
			f.Close()
		}
	}
	s, err := openFile(path, o, false)
	if err != nil {
		return nil, err
	}
	if err := s.migrate(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func openFile(path string, o Options, readOnly bool) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.LockTimeout, ReadOnly: readOnly})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("store: %s is in use by another process (is another keywardd running on this data directory?)", path)
	}
	if err != nil {
		return nil, fmt.Errorf("store: opening %s: %w; if the file is damaged, restore it from a backup", path, err)
	}
	return &Store{db: db, path: path}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Path is the store's file.
func (s *Store) Path() string { return s.path }

// Check reads every bucket and record of the file. bbolt panics when it
// meets a damaged page, and its own Tx.Check does so in a goroutine of its
// own where no one can recover, which would take the daemon down; so the walk
// happens here and the panic becomes an error that says what to do.
func (s *Store) Check() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("store: integrity check of %s failed: %v; restore it from a backup", s.path, r)
		}
	}()
	var walk func(b *bolt.Bucket) error
	walk = func(b *bolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			if v == nil {
				if nested := b.Bucket(k); nested != nil {
					return walk(nested)
				}
			}
			return nil
		})
	}
	err = s.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return walk(b) })
	})
	if err != nil {
		return fmt.Errorf("store: integrity check of %s failed: %w; restore it from a backup", s.path, err)
	}
	return nil
}

// SchemaVersion returns the schema version of the open file.
func (s *Store) SchemaVersion() (int, error) {
	var v int
	err := s.db.View(func(tx *bolt.Tx) error {
		v = readSchema(tx)
		return nil
	})
	return v, err
}

func readSchema(tx *bolt.Tx) int {
	b := tx.Bucket([]byte(metaBucket))
	if b == nil {
		return 0
	}
	if raw := b.Get([]byte(schemaKey)); len(raw) == 8 {
		return int(binary.BigEndian.Uint64(raw))
	}
	return 0
}

func (s *Store) migrate() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		v := readSchema(tx)
		if v > SchemaVersion {
			return fmt.Errorf("store: %s has schema version %d, newer than this keywardd's %d: run a newer keywardd", s.path, v, SchemaVersion)
		}
		meta, err := tx.CreateBucketIfNotExists([]byte(metaBucket))
		if err != nil {
			return err
		}
		for ; v < SchemaVersion; v++ {
			if err := migrations[v](tx); err != nil {
				return fmt.Errorf("store: migrating %s from schema %d to %d: %w", s.path, v, v+1, err)
			}
			if err := meta.Put([]byte(schemaKey), binary.BigEndian.AppendUint64(nil, uint64(v+1))); err != nil {
				return err
			}
		}
		return nil
	})
}

func bucket(tx *bolt.Tx, name string) (*bolt.Bucket, error) {
	b := tx.Bucket([]byte(name))
	if b == nil || name == metaBucket {
		return nil, fmt.Errorf("store: no bucket %q in schema %d", name, SchemaVersion)
	}
	return b, nil
}

// Get returns a copy of the record under key, or ErrNotFound.
func (s *Store) Get(bucketName, key string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		b, err := bucket(tx, bucketName)
		if err != nil {
			return err
		}
		v := b.Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		out = bytes.Clone(v)
		return nil
	})
	return out, err
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

// UpdateEachEmit is UpdateEach whose fn may also return events, appended
// to BucketOutbox in the same transaction under the next sequence numbers
// (OutboxKey): a change and the events announcing it are written together
// or not at all.
func (s *Store) UpdateEachEmit(bucketName string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := bucket(tx, bucketName)
		if err != nil {
			return err
		}
		for _, k := range keys {
			old := b.Get([]byte(k))
			if old != nil {
				old = bytes.Clone(old)
			}
			rec, events, err := fn(k, old)
			if err != nil {
				return err
			}
			if rec == nil {
				err = b.Delete([]byte(k))
			} else {
				err = b.Put([]byte(k), rec)
			}
			if err != nil {
				return err
			}
			for _, event := range events {
				ob, err := bucket(tx, BucketOutbox)
				if err != nil {
					return err
				}
				seq, err := ob.NextSequence()
				if err != nil {
					return err
				}
				if err := ob.Put([]byte(OutboxKey(seq)), event); err != nil {
					return err
				}
			}
		}
		return nil
	})
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
	return s.db.View(func(tx *bolt.Tx) error {
		b, err := bucket(tx, bucketName)
		if err != nil {
			return err
		}
		c := b.Cursor()
		for k, v := c.Seek(from); k != nil && in(k); k, v = c.Next() {
			if err := fn(string(k), bytes.Clone(v)); err != nil {
				return err
			}
		}
		return nil
	})
}
