package tokens

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
)

// Store is what revocation needs of the store.
type Store interface {
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
}

// Revoked is the set of revoked token IDs, each until its token expires
// plus MaxLeeway (a verifier may accept a token that long after its exp),
// and ClockMargin more. It lives in the store, so it survives restarts, and
// in memory, so a check costs a map lookup.
type Revoked struct {
	store Store
	now   func() time.Time
	wmu   sync.Mutex           // serializes Revoke and Sweep
	mu    sync.RWMutex         // guards until, never held across a write
	until map[string]time.Time // jti -> when its token can no longer be valid
}

// ClockMargin is how long a revocation is kept after its token can no
// longer be valid: a clock set back by up to that much after a sweep (a
// clock that had run ahead, corrected) brings no revoked token back.
const ClockMargin = 24 * time.Hour

// LoadRevoked reads every revocation in the store. It removes none: Sweep
// does, on a clock keywardd has seen steady (at start it has seen none).
func LoadRevoked(s Store, now func() time.Time) (*Revoked, error) {
	r := NewRevoked(s, now)
	if err := r.Load(); err != nil {
		return nil, err
	}
	return r, nil
}

// NewRevoked is an empty set of revocations kept in s; Load reads them.
func NewRevoked(s Store, now func() time.Time) *Revoked {
	return &Revoked{store: s, now: now, until: map[string]time.Time{}}
}

// Load reads every revocation in the store into the set (keeping the
// later expiry of one it has): at start, and when a fleet node's copy of
// the state was reloaded.
func (r *Revoked) Load() error {
	recs := map[string][]byte{}
	err := r.store.ForEach(store.BucketRevokedTokens, "", func(jti string, rec []byte) error {
		recs[jti] = rec
		return nil
	})
	if err != nil {
		return err
	}
	r.Apply(recs)
	return nil
}

// untilOf is the time a revocation record holds; an unreadable one is
// swept at once.
func untilOf(rec []byte) time.Time {
	if len(rec) != 8 {
		return time.Unix(0, 0)
	}
	return time.Unix(int64(binary.BigEndian.Uint64(rec)), 0)
}

// Apply takes revocations another node of a fleet wrote (recs[jti], nil
// for one swept): a token revoked anywhere is refused here from then on.
func (r *Revoked) Apply(recs map[string][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for jti, rec := range recs {
		if rec == nil {
			delete(r.until, jti)
		} else if until := untilOf(rec); until.After(r.until[jti]) {
			r.until[jti] = until
		}
	}
}

// Revoke revokes the token jti until exp, its expiry (after which it fails
// anyway). It is in the store before Revoke returns. keyName, the key that
// signed it (empty if unknown), is the event's subject.
func (r *Revoked) Revoke(jti string, exp time.Time, keyName string) error {
	if jti == "" || len(jti) > 256 {
		return fmt.Errorf("%w: a token ID is 1 to 256 bytes", ErrInvalid)
	}
	until := exp.Add(MaxLeeway).Truncate(time.Second).Add(time.Second)
	r.wmu.Lock()
	defer r.wmu.Unlock()
	// The revocation and, the first time, its event for the plugins, in
	// one transaction; a later expiry another node wrote stays.
	err := r.store.UpdateEachEmit(store.BucketRevokedTokens, []string{jti}, func(_ string, old []byte) ([]byte, [][]byte, error) {
		if old != nil {
			if prev := untilOf(old); prev.After(until) {
				until = prev
			}
			return binary.BigEndian.AppendUint64(nil, uint64(until.Unix())), nil, nil
		}
		return binary.BigEndian.AppendUint64(nil, uint64(until.Unix())), [][]byte{outbox.Encode(outbox.Event{Kind: outbox.TokenRevoked, ID: jti, Subject: keyName, Time: r.now().UTC()})}, nil
	})
	if err != nil {
		return err
	}
	r.mu.Lock()
	if until.After(r.until[jti]) {
		r.until[jti] = until
	}
	r.mu.Unlock()
	return nil
}

// Is reports whether jti is revoked; for Verifier.Revoked.
func (r *Revoked) Is(jti string) bool {
	r.mu.RLock()
	_, ok := r.until[jti]
	r.mu.RUnlock()
	return ok
}

// Sweep forgets the revocations no verifier needs any more (their token
// expired more than MaxLeeway and ClockMargin ago), in memory and in the
// store, and says how many it forgot. Revoke waits for it, so a revocation
// made meanwhile is not lost.
func (r *Revoked) Sweep() (int, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	now := r.now()
	var gone []string
	r.mu.RLock()
	for jti, until := range r.until {
		if !until.Add(ClockMargin).After(now) {
			gone = append(gone, jti)
		}
	}
	r.mu.RUnlock()
	if len(gone) == 0 {
		return 0, nil
	}
	// A transaction of up to store.BatchKeys, one sync, however many: Is
	// waits for the lock. A batch that failed is forgotten at the next sweep.
	n := 0
	for batch := range slices.Chunk(gone, store.BatchKeys(r.store, 1)) {
		// A revocation another node made longer meanwhile stays.
		kept := map[string][]byte{}
		err := r.store.UpdateEachEmit(store.BucketRevokedTokens, batch, func(jti string, old []byte) ([]byte, [][]byte, error) {
			if old != nil && untilOf(old).Add(ClockMargin).After(now) {
				kept[jti] = old
				return old, nil, nil
			}
			return nil, nil, nil
		})
		if err != nil {
			return n, err
		}
		r.mu.Lock()
		for _, jti := range batch {
			if rec, ok := kept[jti]; ok {
				r.until[jti] = untilOf(rec)
				continue
			}
			delete(r.until, jti)
			n++
		}
		r.mu.Unlock()
	}
	return n, nil
}
