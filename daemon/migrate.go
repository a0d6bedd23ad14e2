package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/etcdstore"
	"github.com/keyward/keyward/hsm"
)

// A migration copies a keywardd's state from its bbolt file into the etcd
// of store.etcd, for the nodes of a fleet to share (keyward store
// migrate). It is resumable and never half applied:
//
//   - It starts only into a prefix with no state, and records its intent
//     there first (MigrateIntent, in the schedule bucket): the source, its
//     write count, and how far the copy is.
//   - It copies bucket by bucket, in key order, as many records a
//     transaction as etcd takes, and moves the intent's cursor every few
//     transactions: cut short, it is run again and goes on from the
//     cursor (copying again what came after it is harmless: the same
//     records).
//   - Its last transaction deletes the intent and carries the source's
//     write count and outbox number into etcd's meta record: from then on
//     the state is the fleet's.
//   - A node refuses to start while the intent is there, so no node serves
//     half a state.
//
// The records are checked as they are read (each is sealed under the key
// the HSM derives) and sealed again for etcd under the same key.

// MigrateIntent is the key, in store.BucketSchedule in etcd, of a
// migration under way; MigrateDone, of the record a finished one leaves
// (what was migrated, and when), so that running it again says so.
const (
	MigrateIntent = "intent/store.migrate"
	MigrateDone   = "done/store.migrate"
)

// migration is a migration's intent.
type migration struct {
	Source  string    `json:"source"`  // the bbolt file
	Writes  uint64    `json:"writes"`  // its write count when the migration started
	Bucket  string    `json:"bucket"`  // the bucket the copy is in,
	After   string    `json:"after"`   // and the last key it copied there
	Copied  int64     `json:"copied"`  // records copied so far, in all
	Started time.Time `json:"started"` // the first run's start
	// Buckets are the buckets in the order they are copied, as the first
	// run had them.
	Buckets  []string  `json:"buckets"`
	Finished time.Time `json:"finished,omitzero"` // MigrateDone's
}

// MigrateOptions tune Migrate.
type MigrateOptions struct {
	// From is the bbolt file; DataDir/keyward.db if empty.
	From string
	// Progress, if set, hears how far the copy is after each transaction.
	Progress func(MigrateProgress)
}

// MigrateProgress is how far a migration is.
type MigrateProgress struct {
	Bucket        string
	Copied, Total int64 // records, in all buckets
	Resumed       bool  // this run goes on from an earlier one's cursor
}

// MigrateResult is what a migration did.
type MigrateResult struct {
	From, To     string
	Records      int64 // copied by this run
	Total        int64 // records of the source
	Transactions int
	Resumed      bool
	Done         bool   // it was done before: nothing copied now
	Writes       uint64 // the write count carried into etcd
	Took         time.Duration
}

// migrateCursorEvery is how many transactions go between two moves of the
// intent's cursor: at most that many are copied again after a cut.
const migrateCursorEvery = 16

// Migrate copies the state of the bbolt file into cfg's store.etcd. keywardd
// must not run on the file (bbolt's lock refuses a second opener); the
// fleet's nodes must not run either until it returns (they refuse to start
// while it is under way).
func Migrate(ctx context.Context, cfg *Config, o MigrateOptions) (MigrateResult, error) {
	start := time.Now()
	e := cfg.Store.Etcd
	if e == nil {
		return MigrateResult{}, configError(errors.New("keywardd.yaml has no store.etcd: the migration copies into the etcd cluster it names (docs/fleet.md, \"Running a fleet\")"))
	}
	from := o.From
	if from == "" {
		from = filepath.Join(cfg.DataDir, "keyward.db")
	}
	if _, err := os.Stat(from); err != nil {
		return MigrateResult{}, fmt.Errorf("the store to migrate: %w", err)
	}
	res := MigrateResult{From: from, To: fmt.Sprintf("etcd %v%s", e.Endpoints, e.prefix())}
	h, err := hsm.Open(cfg.hsmConfig())
	if err != nil {
		return res, err
	}
	defer h.Close()
	key, err := DeriveStoreKey(ctx, h)
	if err != nil {
		return res, fmt.Errorf("the store's key %s in the token: %w (is hsm in keywardd.yaml the token this store was made with?)", StoreKey, err)
	}
	cc, err := e.clientConfig()
	if err != nil {
		return res, err
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return res, fmt.Errorf("store.etcd: %w", err)
	}
	defer cli.Close()
	dst, err := etcdstore.Open(etcdstore.Options{Client: cli, Prefix: e.prefix(), Key: key, Timeout: e.Timeout,
		MaxTxnOps: e.MaxTxnOps, MaxRequestBytes: e.MaxRequestBytes})
	if err != nil {
		return res, fmt.Errorf("%s: %w", res.To, err)
	}
	defer dst.Close()

	count := func(key string) (int64, error) {
		gctx, cancel := context.WithTimeout(ctx, etcdstore.DefaultTimeout)
		defer cancel()
		n, err := cli.Get(clientv3.WithRequireLeader(gctx), key, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return 0, fmt.Errorf("%s: %w", res.To, err)
		}
		return n.Count, nil
	}
	// No node may run on the prefix meanwhile: its writes would mix with
	// the copy's (every node campaigns under PREFIX/leader). Checked again
	// once the intent is there, which a node starting refuses.
	running := func() error {
		n, err := count(e.prefix() + "/leader/")
		if err == nil && n > 0 {
			err = fmt.Errorf("%d keywardd nodes run on %s: stop every node of the fleet first, then migrate", n, res.To)
		}
		return err
	}
	if err := running(); err != nil {
		return res, err
	}
	acked, err := auditedWrites(cfg, h)
	if err != nil {
		return res, err
	}
	src, err := store.Open(from, store.Options{Key: key, Acknowledged: acked})
	if err != nil {
		return res, fmt.Errorf("%s: %w (if keywardd runs on it, stop it first)", from, err)
	}
	defer src.Close()
	buckets := store.Buckets()
	// Done before: say so. Under way: go on. An empty prefix: start.
	if raw, err := dst.Get(store.BucketSchedule, MigrateDone); err == nil {
		var done migration
		if json.Unmarshal(raw, &done) == nil && done.Source == from && done.Writes == src.Writes() {
			res.Done, res.Writes, res.Total = true, done.Writes, done.Copied
			return res, nil
		}
		return res, fmt.Errorf("%s holds the state another migration made (from %s at write %d, finished %s): a migration goes into an empty prefix", res.To, done.Source, done.Writes, done.Finished.Format(time.RFC3339))
	}
	var in migration
	raw, err := dst.Get(store.BucketSchedule, MigrateIntent)
	switch {
	case err == nil:
		if err := json.Unmarshal(raw, &in); err != nil {
			return res, fmt.Errorf("the intent of the migration under way in %s does not parse: %w", res.To, err)
		}
		if in.Source != from || in.Writes != src.Writes() || !slices.Equal(in.Buckets, buckets) {
			return res, fmt.Errorf("a migration of %s (at write %d) into %s was cut short; this is %s at write %d: keywardd ran on it since, or it is another store. Delete the partial copy (etcdctl del --prefix %s) and migrate again", in.Source, in.Writes, res.To, from, src.Writes(), e.prefix()+"/")
		}
		res.Resumed = true
	case errors.Is(err, store.ErrNotFound):
		if n, err := count(e.prefix() + "/b/"); err != nil || n > 0 {
			if err == nil {
				err = fmt.Errorf("%s already holds a keyward state (%d records): a migration goes into an empty prefix (another prefix, or, if that state is not wanted, delete it)", res.To, n)
			}
			return res, err
		}
		in = migration{Source: from, Writes: src.Writes(), Bucket: buckets[0], Started: time.Now().UTC(), Buckets: buckets}
		// Only if no other migration began meanwhile.
		b, _ := json.Marshal(in)
		err := dst.Update(store.BucketSchedule, MigrateIntent, func(old []byte) ([]byte, error) {
			if old != nil {
				return nil, errors.New("another migration into this prefix began a moment ago")
			}
			return b, nil
		})
		if err != nil {
			return res, fmt.Errorf("%s: %w", res.To, err)
		}
		if err := running(); err != nil {
			// A node that started between the checks: the intent goes.
			dst.Update(store.BucketSchedule, MigrateIntent, func([]byte) ([]byte, error) { return nil, nil })
			return res, err
		}
	default:
		return res, fmt.Errorf("%s: %w", res.To, err)
	}

	for _, b := range buckets {
		if err := src.ForEach(b, "", func(string, []byte) error { res.Total++; return nil }); err != nil {
			return res, err
		}
	}
	maxOps, maxBytes := dst.TxLimits()
	limitOps, limitBytes := maxOps-8, maxBytes*3/4 // the meta record, the lock's guard, and room
	copied := in.Copied
	at := slices.Index(buckets, in.Bucket)
	if at < 0 {
		return res, fmt.Errorf("the migration's cursor names the bucket %q, which this keyward does not have", in.Bucket)
	}
	last, _ := json.Marshal(in) // the intent as this run last wrote it
	for _, b := range buckets[at:] {
		after := ""
		if b == in.Bucket {
			after = in.After
		}
		for {
			if err := ctx.Err(); err != nil {
				return res, err
			}
			var keys []string
			recs := map[string][]byte{}
			size := 0
			err := src.ForEachAfter(b, after, func(k string, v []byte) error {
				if len(keys) > 0 && (len(keys) >= limitOps || size+len(k)+len(v)+128 > limitBytes) {
					return errStopWalk
				}
				keys = append(keys, k)
				recs[k] = v
				size += len(k) + len(v) + 128 // sealing and the operation
				return nil
			})
			if err != nil && !errors.Is(err, errStopWalk) {
				return res, err
			}
			if len(keys) == 0 {
				break
			}
			err = dst.UpdateEach(b, keys, func(k string, old []byte) ([]byte, error) {
				if old != nil && !bytes.Equal(old, recs[k]) {
					// Copied before, it is what it was; anything else was
					// written by something other than this migration.
					return nil, fmt.Errorf("%w: a record of %s in etcd is not the one the migration copied (did a node run meanwhile?)", errMigrationMixed, b)
				}
				return recs[k], nil
			})
			if errors.Is(err, errMigrationMixed) {
				return res, err
			}
			if err != nil {
				return res, fmt.Errorf("copying %d records of %s into %s: %w (run the migration again: it goes on from where it was)", len(keys), b, res.To, err)
			}
			after = keys[len(keys)-1]
			copied += int64(len(keys))
			res.Records += int64(len(keys))
			res.Transactions++
			if res.Transactions%migrateCursorEvery == 0 {
				in.Bucket, in.After, in.Copied = b, after, copied
				if last, err = moveIntent(dst, in, last); err != nil {
					return res, err
				}
				res.Transactions++
			}
			if o.Progress != nil {
				o.Progress(MigrateProgress{Bucket: b, Copied: min(copied, res.Total), Total: res.Total, Resumed: res.Resumed})
			}
		}
	}
	// The commit: the counts carried, the intent gone, in one transaction.
	seq, err := src.OutboxSequence()
	if err != nil {
		return res, err
	}
	res.Writes = src.Writes()
	in.Copied, in.Finished = copied, time.Now().UTC()
	done, _ := json.Marshal(in)
	err = dst.Carry(store.BucketSchedule, []string{MigrateIntent, MigrateDone}, res.Writes, seq, func(k string, old []byte) ([]byte, error) {
		if k == MigrateDone {
			return done, nil
		}
		if !bytes.Equal(old, last) {
			return nil, fmt.Errorf("%w: the migration's intent in etcd is not the one this run wrote (another migration, or a deletion, meanwhile)", errMigrationMixed)
		}
		return nil, nil
	})
	if err != nil {
		return res, fmt.Errorf("finishing the migration into %s: %w (run it again: everything is copied, only this step remains)", res.To, err)
	}
	res.Transactions++
	res.Took = time.Since(start)
	return res, nil
}

var (
	errStopWalk       = errors.New("enough for one transaction")
	errMigrationMixed = errors.New("the migration's copy was written by something else")
)

// moveIntent writes in over the intent this run last wrote, and returns
// it; an intent changed by anything else stops the migration.
func moveIntent(dst *etcdstore.Backend, in migration, last []byte) ([]byte, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	err = dst.Update(store.BucketSchedule, MigrateIntent, func(old []byte) ([]byte, error) {
		if !bytes.Equal(old, last) {
			return nil, fmt.Errorf("%w: the migration's intent in etcd is not the one this run wrote (another migration, or a deletion, meanwhile)", errMigrationMixed)
		}
		return b, nil
	})
	if err != nil {
		return nil, fmt.Errorf("recording the migration's progress: %w (run it again: it goes on from where it was)", err)
	}
	return b, nil
}

// auditedWrites is the store write count the host's audit log last
// recorded, as keywardd reads it at start (its checkpoints' MACed counts
// too): a store behind it was rolled back, and is not migrated. 0 without
// a log.
func auditedWrites(cfg *Config, h *hsm.HSM) (uint64, error) {
	if _, err := os.Stat(cfg.auditPath()); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	al, err := audit.Open(cfg.auditPath(), h, AuditKey, audit.Options{Node: cfg.nodeName()})
	if err != nil {
		return 0, fmt.Errorf("the audit log %s: %w", cfg.auditPath(), err)
	}
	defer al.Close()
	return al.StoreWrites(), nil
}

// refuseMigrating refuses a fleet state a migration is still copying into.
func refuseMigrating(s store.Backend, where string) error {
	raw, err := s.Get(store.BucketSchedule, MigrateIntent)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var in migration
	json.Unmarshal(raw, &in)
	return fmt.Errorf("%w: a migration into %s is under way or was cut short (from %s, started %s, %d records copied): no node serves half a state; run keyward store migrate again to finish it", store.ErrUnavailable, where, in.Source, in.Started.Format(time.RFC3339), in.Copied)
}
