// Package keys owns the life of keyward's root keys: their metadata (purpose,
// algorithm, versions, state, minimum decryption version, rotation period,
// deletion schedule) in the store, and their material in the HSM, one HSM key
// per version.
//
// Rotation is all or nothing, as in Vault's transit engine: the store first
// records the intent to make version N (PendingVersion), then the HSM makes
// it, then the store adds it. If anything fails the key stays as it was; the
// next attempt finds the intent and adopts an HSM key the failed one left
// behind. An HSM key the store knows nothing about (a store restored from an
// older backup, say) is never used and never destroyed: keyward refuses and
// says why. Changes to one key are serialized.
//
// Encryption keys count their AES-GCM encryptions per version. Nonces are
// random, so a version must seal well under 2^32 messages; counts are
// reserved in the store in blocks before use, so after a crash the count
// resumes above every encryption made, never below, and the key rotates by
// itself before a version reaches its limit.
package keys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/keyward/keyward/daemon/names"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

// Errors of this package; the API maps each to one status code.
var (
	ErrNotFound        = errors.New("key not found")
	ErrExists          = errors.New("key already exists")
	ErrInvalid         = errors.New("invalid argument")
	ErrDisabled        = errors.New("key is disabled")
	ErrPendingDeletion = errors.New("key is scheduled for deletion")
	ErrWrongPurpose    = errors.New("key has another purpose")
	ErrVersion         = errors.New("key version not usable")
)

// Purpose is what a key is for.
type Purpose string

const (
	Encrypt Purpose = "encrypt" // envelope encryption: AES-256-GCM
	Sign    Purpose = "sign"    // token signing: ECDSA P-256 / P-384, Ed25519
	MAC     Purpose = "hmac"    // HMAC-SHA256 (API key pepper, audit chain) / HMAC-SHA384
)

// State is whether a key may be used.
type State string

const (
	Enabled         State = "enabled"
	Disabled        State = "disabled"
	PendingDeletion State = "pending_deletion"
	// creating: the key's first version is being made; the key does not
	// exist yet for anything but Create, which finishes it.
	creating State = "creating"
)

// UseLabel, set to UseRaw when a signing key is created, makes it a key
// of CryptoService.Sign, which TokenService then refuses; a signing key
// without it signs tokens only. Labels are fixed at creation.
const (
	UseLabel = "use"
	UseRaw   = "raw"
)

// Deletion waiting periods.
const (
	MinDeletionWait     = 7 * 24 * time.Hour
	DefaultDeletionWait = 30 * 24 * time.Hour
)

// Key is a root key's metadata. Its material is in the HSM.
type Key struct {
	Name                 string            `json:"name"`
	Purpose              Purpose           `json:"purpose"`
	Algorithm            string            `json:"algorithm"` // hsm.Algorithm's name
	State                State             `json:"state"`
	Versions             []Version         `json:"versions"`
	MinDecryptionVersion uint32            `json:"min_decryption_version"`
	RotationPeriod       time.Duration     `json:"rotation_period,omitempty"`
	Labels               map[string]string `json:"labels,omitempty"`
	Created              time.Time         `json:"created"`
	DeletionDate         time.Time         `json:"deletion_date,omitzero"`
	// PendingVersion is a version being made: recorded before the HSM key
	// is, cleared once the version is added. Zero when none is.
	PendingVersion uint32 `json:"pending_version,omitempty"`
	// PendingPanic: the pending version is a panic-rotate's; whatever
	// adopts it (a crash came between) finishes the panic-rotate.
	PendingPanic bool `json:"pending_panic,omitempty"`
	// RewrapReports: encryption keys only, the newest report of each
	// source's rewrap job, newest first, at most MaxRewrapReports.
	RewrapReports []RewrapReport `json:"rewrap_reports,omitempty"`
}

// RewrapReport is how many ciphertexts under each version of a key one
// source of an application held when its rewrap job last ended (the job
// runs in the application: keyward rewrap, or the Go client's rewrap
// package). keywardd cannot count them itself: the ciphertexts are the
// application's.
type RewrapReport struct {
	Source      string            `json:"source"`
	Ciphertexts map[uint32]uint64 `json:"ciphertexts,omitempty"`
	Failed      uint64            `json:"failed,omitempty"`
	Complete    bool              `json:"complete,omitempty"`
	Time        time.Time         `json:"time"`
	// Reporter is who sent it, as keywardd identified the caller
	// ("uid=1000 exe=/usr/bin/keyward"); ReporterUID its uid.
	Reporter    string `json:"reporter,omitempty"`
	ReporterUID uint32 `json:"reporter_uid,omitempty"`
}

// Rewrap report bounds: a key keeps the reports of this many sources, each
// named in at most MaxRewrapSource bytes.
const (
	MaxRewrapReports = 16
	MaxRewrapSource  = 256
)

// Version is one version of a key.
type Version struct {
	Number  uint32    `json:"number"`
	Created time.Time `json:"created"`
	// Reserved is how many encryptions under this version have been
	// reserved in the store (AES-GCM keys only): an upper bound of those made.
	Reserved uint64 `json:"reserved,omitempty"`

	// The timeline of a signing key's version (signing keys only): it is
	// published from Created, signs from ActivateAt until RetireAt (when the
	// next version activates), and stays published until RemoveAt, so that
	// tokens it signed verify until they expire. Zero RetireAt and RemoveAt:
	// no next version yet.
	ActivateAt time.Time `json:"activate_at,omitzero"`
	RetireAt   time.Time `json:"retire_at,omitzero"`
	RemoveAt   time.Time `json:"remove_at,omitzero"`
}

// Signing states of a version at a time.
const (
	SigningPending = "pending" // published, not signing yet
	SigningActive  = "active"  // signing
	SigningRetired = "retired" // published, not signing any more
	SigningRemoved = "removed" // neither
)

// SigningState is where a signing key's version stands at t.
func (v Version) SigningState(t time.Time) string {
	switch {
	case !v.RemoveAt.IsZero() && !t.Before(v.RemoveAt):
		return SigningRemoved
	case !v.RetireAt.IsZero() && !t.Before(v.RetireAt):
		return SigningRetired
	case t.Before(v.ActivateAt):
		return SigningPending
	}
	return SigningActive
}

// Signing returns the version that signs at t, if any. A version below the
// minimum decryption version never signs: it is withdrawn from the JWKS.
func (k *Key) Signing(t time.Time) (Version, bool) {
	for i := len(k.Versions) - 1; i >= 0; i-- {
		if k.Versions[i].Number >= k.MinDecryptionVersion && k.Versions[i].SigningState(t) == SigningActive {
			return k.Versions[i], true
		}
	}
	return Version{}, false
}

// Published returns the versions whose public keys are published at t:
// pending, active and retired ones, from the minimum decryption version on
// (raising it withdraws older versions at once, as after a compromise).
func (k *Key) Published(t time.Time) []Version {
	var out []Version
	for _, v := range k.Versions {
		if v.Number >= k.MinDecryptionVersion && v.SigningState(t) != SigningRemoved {
			out = append(out, v)
		}
	}
	return out
}

// Latest is the newest version's number.
func (k *Key) Latest() uint32 { return uint32(len(k.Versions)) }

// Usable says whether the key may be used at all: not if disabled or
// pending deletion.
func (k *Key) Usable() error {
	switch k.State {
	case Disabled:
		return fmt.Errorf("%w: %q; enable it to use it", ErrDisabled, k.Name)
	case PendingDeletion:
		return fmt.Errorf("%w: %q on %s; cancel the deletion and enable it to use it", ErrPendingDeletion, k.Name, k.DeletionDate.UTC().Format(time.RFC3339))
	}
	return nil
}

// Store is what keys needs of the store.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
}

// HSM is what keys needs of the HSM.
type HSM interface {
	CreateKey(ctx context.Context, id hsm.KeyID, alg hsm.Algorithm) error
	DestroyKey(ctx context.Context, id hsm.KeyID) error
}

// Options tune a Manager. Zero values mean the defaults.
type Options struct {
	// EncryptionLimit is how many AES-GCM encryptions a version may make
	// before the key rotates by itself. Default and maximum 2^32 − 2^24.
	EncryptionLimit uint64
	// ReserveBlock is how many encryptions are reserved in the store at a
	// time. Default 4096.
	ReserveBlock uint64
	// Now is the clock; default time.Now.
	Now func() time.Time
	// SignPrePublish is how long a new signing version is published before
	// it signs, so that verifiers caching the JWKS see it first. Default
	// 10 minutes.
	SignPrePublish time.Duration
	// SignKeepPublished is how long a retired signing version stays
	// published: at least the longest token lifetime plus the verifiers'
	// leeway. Default 1 hour and 1 minute.
	SignKeepPublished time.Duration
}

// MaxEncryptionLimit leaves room below 2^32 for the encryptions of one
// reserved block and a margin.
const MaxEncryptionLimit = 1<<32 - 1<<24

// Manager manages the root keys.
type Manager struct {
	store Store
	hsm   HSM
	opt   Options

	mu      sync.Mutex
	locks   map[string]*sync.Mutex // one per key name: changes to a key are serialized
	counter map[hsm.KeyID]*counter // encryptions made in this process, per version

	// cache holds keys as last read, for the calls on every request
	// (ForEncryption, ForDecryption); every change through the Manager
	// drops its key from it. Cached keys are never modified.
	cacheMu  sync.RWMutex
	cache    map[string]*Key
	cacheGen uint64 // moves on every change, so a read that raced one is not cached
}

type counter struct {
	used, reserved uint64
}

// New returns a Manager on the store and HSM.
func New(s Store, h HSM, o Options) (*Manager, error) {
	if o.EncryptionLimit == 0 {
		o.EncryptionLimit = MaxEncryptionLimit
	}
	if o.EncryptionLimit > MaxEncryptionLimit {
		return nil, fmt.Errorf("keys: encryption limit %d is above the maximum %d", o.EncryptionLimit, uint64(MaxEncryptionLimit))
	}
	if o.ReserveBlock == 0 {
		o.ReserveBlock = 4096
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.SignPrePublish == 0 {
		o.SignPrePublish = 10 * time.Minute
	}
	if o.SignKeepPublished == 0 {
		o.SignKeepPublished = time.Hour + time.Minute
	}
	return &Manager{store: s, hsm: h, opt: o, locks: map[string]*sync.Mutex{}, counter: map[hsm.KeyID]*counter{}, cache: map[string]*Key{}}, nil
}

// lockFleet is lock and, on a store other processes share (a fleet), the
// fleet's lock of the key too: for a change of several steps (the HSM,
// then the store) that another node's must not interleave with. The
// local lock comes first, always.
func (m *Manager) lockFleet(ctx context.Context, name string) (func(), error) {
	unlock := m.lock(name)
	fl, ok := m.store.(store.Locker)
	if !ok {
		return unlock, nil
	}
	release, err := fl.Lock(ctx, "keys/"+name)
	if err != nil {
		unlock()
		return nil, err
	}
	return func() { release(); unlock() }, nil
}

// lock serializes changes to one key.
func (m *Manager) lock(name string) func() {
	m.mu.Lock()
	l := m.locks[name]
	if l == nil {
		l = &sync.Mutex{}
		m.locks[name] = l
	}
	m.mu.Unlock()
	l.Lock()
	return func() {
		m.forgetCached(name) // whatever changed under the lock is read afresh
		l.Unlock()
	}
}

func (m *Manager) forgetCached(name string) {
	m.cacheMu.Lock()
	delete(m.cache, name)
	m.cacheGen++
	m.cacheMu.Unlock()
}

// Forget drops the keys named (nil: every key) from the cache: another
// node of a fleet changed them, and the next call reads them afresh.
func (m *Manager) Forget(names []string) {
	m.cacheMu.Lock()
	if names == nil {
		clear(m.cache)
	}
	for _, name := range names {
		delete(m.cache, name)
	}
	m.cacheGen++
	m.cacheMu.Unlock()
}

// Generation moves whenever a key changes through the Manager: what was
// derived from the keys before (a published key set) must be derived again.
func (m *Manager) Generation() uint64 {
	m.cacheMu.RLock()
	defer m.cacheMu.RUnlock()
	return m.cacheGen
}

// Cached is Get from the cache the Manager keeps of the keys calls use
// (reading and caching the key if it is not there), which every change
// through the Manager clears: for a call's hot path. The Key is shared:
// its caller must not change it.
func (m *Manager) Cached(name string) (*Key, error) {
	m.cacheMu.RLock()
	k, gen := m.cache[name], m.cacheGen
	m.cacheMu.RUnlock()
	if k != nil {
		return k, nil
	}
	k, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	m.cacheMu.Lock()
	if m.cacheGen == gen { // no change since the read began
		if len(m.cache) > 4096 {
			clear(m.cache)
		}
		m.cache[name] = k
	}
	m.cacheMu.Unlock()
	return k, nil
}

// Spec describes a key to create.
type Spec struct {
	Name           string
	Purpose        Purpose
	Algorithm      hsm.Algorithm // zero: the purpose's default
	RotationPeriod time.Duration // zero: rotate on demand only
	Labels         map[string]string
	// Adopt lets Create take over an HSM key already there for version 1
	// that the store does not know (keywardd's own keys, after the store was
	// lost). Never for keys callers ask for.
	Adopt bool
}

// The algorithms of keys, as the HSM names them (hsm.Algorithm): the
// callers of this package need not import hsm to name one.
type Algorithm = hsm.Algorithm

const (
	AES256GCM  = hsm.AES256GCM
	HMACSHA256 = hsm.HMACSHA256
	HMACSHA384 = hsm.HMACSHA384
	ECDSAP256  = hsm.ECDSAP256
	ECDSAP384  = hsm.ECDSAP384
	Ed25519    = hsm.Ed25519
)

var purposeAlgs = map[Purpose][]hsm.Algorithm{
	Encrypt: {hsm.AES256GCM},
	Sign:    {hsm.ECDSAP256, hsm.ECDSAP384, hsm.Ed25519},
	MAC:     {hsm.HMACSHA256, hsm.HMACSHA384},
}

// Create makes version 1 of a new key in the HSM, then saves it. Its name
// must be canonical (daemon/names); keys stored under other names before
// that rule are read and used as ever, but none is made.
func (m *Manager) Create(ctx context.Context, s Spec) (*Key, error) {
	if err := (hsm.KeyID{Name: s.Name, Version: 1}).Check(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := names.Check("key name", s.Name); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	algs, ok := purposeAlgs[s.Purpose]
	if !ok {
		return nil, fmt.Errorf("%w: purpose %q; use encrypt, sign or hmac", ErrInvalid, s.Purpose)
	}
	if s.Algorithm == 0 {
		s.Algorithm = algs[0]
	}
	if !containsAlg(algs, s.Algorithm) {
		return nil, fmt.Errorf("%w: algorithm %v does not serve purpose %s", ErrInvalid, s.Algorithm, s.Purpose)
	}
	if s.RotationPeriod < 0 || (s.RotationPeriod > 0 && s.RotationPeriod < time.Hour) {
		return nil, fmt.Errorf("%w: rotation period %v; use at least an hour, or none", ErrInvalid, s.RotationPeriod)
	}
	if len(s.Labels) > 32 {
		return nil, fmt.Errorf("%w: at most 32 labels", ErrInvalid)
	}
	unlock, err := m.lockFleet(ctx, s.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	now := m.opt.Now().UTC()
	k := &Key{
		Name: s.Name, Purpose: s.Purpose, Algorithm: s.Algorithm.String(), State: creating,
		MinDecryptionVersion: 1, RotationPeriod: s.RotationPeriod, Labels: maps.Clone(s.Labels), Created: now,
		PendingVersion: 1,
	}
	// Record the intent first; a key left half made by a failed Create is
	// finished by this one.
	resumed := false
	err = m.store.Update(store.BucketKeys, s.Name, func(old []byte) ([]byte, error) {
		if old != nil {
			var prev Key
			if err := json.Unmarshal(old, &prev); err != nil || prev.State != creating {
				return nil, fmt.Errorf("%w: %q", ErrExists, s.Name)
			}
			resumed = true
		}
		return json.Marshal(k)
	})
	if err != nil {
		return nil, err
	}
	if err := m.makeVersion(ctx, s.Name, 1, s.Algorithm, resumed || s.Adopt); err != nil {
		if errors.Is(err, ErrUnknownHSMKey) { // withdraw the intent, or the next Create would adopt it
			m.store.Update(store.BucketKeys, s.Name, func([]byte) ([]byte, error) { return nil, nil })
		}
		return nil, err
	}
	return m.update(s.Name, true, func(k *Key) error {
		k.State, k.PendingVersion = Enabled, 0
		k.Versions = []Version{{Number: 1, Created: now}}
		if k.Purpose == Sign {
			k.Versions[0].ActivateAt = now // the first version signs at once
		}
		return nil
	})
}

func containsAlg(algs []hsm.Algorithm, a hsm.Algorithm) bool {
	for _, x := range algs {
		if x == a {
			return true
		}
	}
	return false
}

// ErrUnknownHSMKey: the HSM holds a version the store never intended.
var ErrUnknownHSMKey = errors.New("key version already in the HSM but unknown to the store")

// makeVersion creates a version's HSM key. The caller holds the key's lock
// and has recorded the intent to make it. An HSM key already there is adopted
// only if adopt says a failed attempt of keyward's own may have left it (the
// intent was on record before this call); otherwise it is refused, never
// destroyed: it may protect data the store no longer knows about.
func (m *Manager) makeVersion(ctx context.Context, name string, v uint32, alg hsm.Algorithm, adopt bool) error {
	id := hsm.KeyID{Name: name, Version: v}
	err := m.hsm.CreateKey(ctx, id, alg)
	if errors.Is(err, hsm.ErrKeyExists) {
		if adopt {
			return nil // the load-time check vets it on first use
		}
		return fmt.Errorf("%w: the HSM already holds %q version %d, which the store does not know: the store may have been restored from an older backup (restore the newest one), or another keywardd shares this token. keyward never reuses or destroys such a key", ErrUnknownHSMKey, name, v)
	}
	return err
}

// EncryptionLimit is how many AES-GCM encryptions a version makes before
// its key rotates by itself (Options.EncryptionLimit).
func (m *Manager) EncryptionLimit() uint64 { return m.opt.EncryptionLimit }

// Get returns a key's metadata.
func (m *Manager) Get(name string) (*Key, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: no key name given", ErrNotFound)
	}
	rec, err := m.store.Get(store.BucketKeys, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	var k Key
	if err := json.Unmarshal(rec, &k); err != nil {
		return nil, fmt.Errorf("keys: the record of %q does not parse: %w", name, err)
	}
	if k.State == creating {
		return nil, fmt.Errorf("%w: %q (its creation did not finish; create it again)", ErrNotFound, name)
	}
	return &k, nil
}

// List returns every key, by name.
func (m *Manager) List() ([]*Key, error) {
	var out []*Key
	err := m.store.ForEach(store.BucketKeys, "", func(name string, rec []byte) error {
		var k Key
		if err := json.Unmarshal(rec, &k); err != nil {
			return fmt.Errorf("keys: the record of %q does not parse: %w", name, err)
		}
		if k.State != creating {
			out = append(out, &k)
		}
		return nil
	})
	return out, err
}

// change applies fn to a key's metadata under its lock and saves it.
func (m *Manager) change(name string, fn func(k *Key) error) (*Key, error) {
	return m.update(name, false, fn)
}

// update is change, which may also finish a key being created.
func (m *Manager) update(name string, creatingToo bool, fn func(k *Key) error) (*Key, error) {
	return m.updateEmit(name, creatingToo, func(k *Key) ([][]byte, error) { return nil, fn(k) })
}

// updateEmit is update whose fn may also return events for the plugins,
// written with the change.
func (m *Manager) updateEmit(name string, creatingToo bool, fn func(k *Key) ([][]byte, error)) (*Key, error) {
	var out *Key
	err := m.store.UpdateEachEmit(store.BucketKeys, []string{name}, func(_ string, old []byte) ([]byte, [][]byte, error) {
		if old == nil {
			return nil, nil, fmt.Errorf("%w: %q", ErrNotFound, name)
		}
		var k Key
		if err := json.Unmarshal(old, &k); err != nil {
			return nil, nil, fmt.Errorf("keys: the record of %q does not parse: %w", name, err)
		}
		if k.State == creating && !creatingToo {
			return nil, nil, fmt.Errorf("%w: %q", ErrNotFound, name)
		}
		was := max(k.MinDecryptionVersion, 1)
		events, err := fn(&k)
		if err != nil {
			return nil, nil, err
		}
		out = &k
		b, err := json.Marshal(&k)
		// Versions below a raised minimum may no longer be used: an event
		// for each, for the plugins, with the change.
		return b, append(events, m.revokedVersions(name, was, k.MinDecryptionVersion, "")...), err
	})
	return out, err
}

// revokedVersions are the events of versions from..to-1 of name.
func (m *Manager) revokedVersions(name string, from, to uint32, detail string) [][]byte {
	var out [][]byte
	for v := from; v < to; v++ {
		out = append(out, outbox.Encode(outbox.Event{Kind: outbox.KeyVersionRevoked, ID: fmt.Sprintf("%s/v%d", name, v), Subject: name, Time: m.opt.Now().UTC(), Detail: detail}))
	}
	return out
}

// Rotate adds a version: the HSM key first, the metadata after. New
// encryptions use it at once; older versions keep decrypting until the
// minimum decryption version passes them.
func (m *Manager) Rotate(ctx context.Context, name string) (*Key, error) {
	unlock, err := m.lockFleet(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return m.rotateLocked(ctx, name)
}

func (m *Manager) rotateLocked(ctx context.Context, name string) (*Key, error) {
	return m.rotateLockedAt(ctx, name, false, nil)
}

// rotateLockedAt rotates; at once, a signing key's new version signs now
// and the others stop now (a compromise), instead of after the pre-publish
// time. then, if set, changes the key further in the same transaction as
// the new version, and returns events for the plugins.
func (m *Manager) rotateLockedAt(ctx context.Context, name string, atOnce bool, then func(k *Key) [][]byte) (*Key, error) {
	k, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	if k.State == PendingDeletion {
		return nil, k.Usable()
	}
	alg, err := hsm.ParseAlgorithm(k.Algorithm)
	if err != nil {
		return nil, err
	}
	next := k.Latest() + 1
	adopt := k.PendingVersion == next // a failed rotation recorded it
	if adopt && k.PendingPanic && !atOnce {
		// A panic-rotate made this version and died before it was done:
		// finish it, not a plain rotation.
		p, err := m.panicLocked(ctx, name, false)
		if err != nil {
			return nil, err
		}
		return p.Key, nil
	}
	if !adopt {
		if _, err := m.change(name, func(k *Key) error { k.PendingVersion, k.PendingPanic = next, atOnce; return nil }); err != nil {
			return nil, err
		}
	}
	if err := m.makeVersion(ctx, name, next, alg, adopt); err != nil {
		if errors.Is(err, ErrUnknownHSMKey) { // withdraw the intent, or the next Rotate would adopt it
			m.change(name, func(k *Key) error { k.PendingVersion, k.PendingPanic = 0, false; return nil })
		} else if atOnce && !adopt {
			// The panic-rotate that recorded this version failed and said
			// so: a later plain Rotate that adopts the version must not
			// withdraw every other one unasked. (A crash, or a failed
			// attempt to finish a crashed one, keeps the mark.)
			if _, cerr := m.change(name, func(k *Key) error { k.PendingPanic = false; return nil }); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
		return nil, err
	}
	return m.updateEmit(name, false, func(k *Key) ([][]byte, error) {
		if k.Latest()+1 != next {
			return nil, fmt.Errorf("keys: %q changed during rotation", name) // cannot happen under the lock
		}
		now := m.opt.Now().UTC()
		v := Version{Number: next, Created: now}
		if k.Purpose == Sign {
			// Published now, signing after the pre-publish time; the
			// version signing until then retires at that moment and stays
			// published while tokens it signed can still be valid.
			v.ActivateAt = now.Add(m.opt.SignPrePublish)
			prev := &k.Versions[len(k.Versions)-1]
			prev.RetireAt = v.ActivateAt
			prev.RemoveAt = v.ActivateAt.Add(m.opt.SignKeepPublished)
			if atOnce {
				v.ActivateAt = now
				for i := range k.Versions {
					if p := &k.Versions[i]; p.RemoveAt.IsZero() || p.RemoveAt.After(now) {
						if p.RetireAt.IsZero() || p.RetireAt.After(now) {
							p.RetireAt = now
						}
						p.RemoveAt = now
					}
				}
			}
		}
		k.Versions = append(k.Versions, v)
		k.PendingVersion, k.PendingPanic = 0, false
		// The new version, for the watch stream and the plugins that
		// subscribe to it (a cache of public keys or of the newest version).
		events := [][]byte{outbox.Encode(outbox.Event{Kind: outbox.KeyVersionCreated, ID: fmt.Sprintf("%s/v%d", name, next), Subject: name, Time: now})}
		if then != nil {
			events = append(events, then(k)...)
		}
		return events, nil
	})
}

// Panic is what PanicRotate did, or would do.
type Panic struct {
	Key        *Key
	NewVersion uint32
	// Retired are the versions that stop encrypting or signing: every
	// version in use before.
	Retired []uint32
	// Encryptions is how many encryptions were reserved under the retired
	// versions: at most that many ciphertexts to re-encrypt.
	Encryptions uint64
	// Withdrawn: a signing key's retired versions left the JWKS (a MAC
	// key's no longer verify), and every
	// token they signed is refused from now on.
	Withdrawn bool
}

// PanicRotate handles a compromised key: a new version at once (signing
// at once, for a signing key), the versions before it retired — an
// encryption key stops encrypting with them (they still decrypt, so that
// data can be re-encrypted, until the minimum decryption version passes
// them); a signing key's are withdrawn (the minimum rises to the new
// version), so that every token they signed is refused — and an event per
// retired version for the plugins. A dry run says what it would do and
// does nothing.
func (m *Manager) PanicRotate(ctx context.Context, name string, dryRun bool) (*Panic, error) {
	unlock, err := m.lockFleet(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return m.panicLocked(ctx, name, dryRun)
}

func (m *Manager) panicLocked(ctx context.Context, name string, dryRun bool) (*Panic, error) {
	k, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	if k.State == PendingDeletion {
		return nil, k.Usable()
	}
	// A signing or MAC key's compromised versions are withdrawn at once: a
	// signature or a MAC is authenticity, not data to recover, and one the
	// thief makes with them must not verify.
	withdraw := k.Purpose == Sign || k.Purpose == MAC
	p := &Panic{Key: k, NewVersion: k.Latest() + 1, Withdrawn: withdraw}
	for _, v := range k.Versions {
		if v.Number >= k.MinDecryptionVersion {
			p.Retired = append(p.Retired, v.Number)
			p.Encryptions += v.Reserved
		}
	}
	if dryRun {
		return p, nil
	}
	const why = "panic-rotate: the key was compromised"
	// The new version, the old ones retired and their events: one
	// transaction, so that a crash leaves either all of it or a pending
	// version the next rotation adopts.
	p.Key, err = m.rotateLockedAt(ctx, name, true, func(k *Key) [][]byte {
		if withdraw {
			k.MinDecryptionVersion = p.NewVersion // withdraws them: updateEmit sends key_version revocations
			return nil
		}
		var out [][]byte
		for _, v := range p.Retired {
			out = append(out, outbox.Encode(outbox.Event{Kind: outbox.KeyVersionRetired, ID: fmt.Sprintf("%s/v%d", name, v), Subject: name, Time: m.opt.Now().UTC(),
				Detail: why + "; this version no longer encrypts, and decrypts until the minimum decryption version passes it"}))
		}
		return out
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// SetEnabled enables or disables a key. A key scheduled for deletion must
// have its deletion cancelled first.
func (m *Manager) SetEnabled(name string, enabled bool) (*Key, error) {
	defer m.lock(name)()
	return m.change(name, func(k *Key) error {
		if k.State == PendingDeletion {
			return k.Usable()
		}
		k.State = Disabled
		if enabled {
			k.State = Enabled
		}
		return nil
	})
}

// SetMinDecryptionVersion sets the oldest version that may still decrypt,
// from 1 to the latest. Raising it retires older versions at once; lowering
// it brings them back (their HSM keys are kept).
func (m *Manager) SetMinDecryptionVersion(name string, v uint32) (*Key, error) {
	defer m.lock(name)()
	return m.change(name, func(k *Key) error {
		if v < 1 || v > k.Latest() {
			return fmt.Errorf("%w: minimum decryption version %d of %q must be from 1 to %d", ErrInvalid, v, name, k.Latest())
		}
		k.MinDecryptionVersion = v
		return nil
	})
}

// ReportRewrap records r, the report of a rewrap job over one source of
// ciphertexts under the encryption key name, stamped with keywardd's clock.
// It replaces the source's last report. A new source beyond
// MaxRewrapReports replaces the reporter's own oldest report, or, when the
// reporter has none there, the one reported longest ago: a reporter
// filing many sources pushes out at most one report of others.
func (m *Manager) ReportRewrap(name string, r RewrapReport) (*Key, error) {
	if r.Source == "" || len(r.Source) > MaxRewrapSource || !printable(r.Source) {
		return nil, fmt.Errorf("%w: a rewrap report's source must be 1 to %d printable characters, as \"dir:host1:/var/lib/app\"", ErrInvalid, MaxRewrapSource)
	}
	defer m.lock(name)()
	return m.change(name, func(k *Key) error {
		if k.Purpose != Encrypt {
			return fmt.Errorf("%w: %q is a %s key; rewrap reports are for encryption keys", ErrWrongPurpose, name, k.Purpose)
		}
		for v := range r.Ciphertexts {
			if v < 1 || v > k.Latest() {
				return fmt.Errorf("%w: the report counts ciphertexts under version %d of %q, which has versions 1 to %d", ErrInvalid, v, name, k.Latest())
			}
		}
		r.Time = m.opt.Now().UTC()
		others := slices.DeleteFunc(slices.Clone(k.RewrapReports), func(o RewrapReport) bool { return o.Source == r.Source })
		if len(others) >= MaxRewrapReports {
			// Newest first: the last of the reporter's own, else the last.
			drop := len(others) - 1
			for i := len(others) - 1; i >= 0; i-- {
				if others[i].ReporterUID == r.ReporterUID {
					drop = i
					break
				}
			}
			others = slices.Delete(others, drop, drop+1)
		}
		k.RewrapReports = append([]RewrapReport{r}, others...)
		return nil
	})
}

// printable: valid UTF-8 without control or format characters (the
// latter include the bidirectional overrides that make a name on a
// terminal or a page read as another).
func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, c := range s {
		if unicode.IsControl(c) || unicode.Is(unicode.Cf, c) {
			return false
		}
	}
	return true
}

// ScheduleDeletion makes the key unusable at once and deletable after wait
// (at least MinDeletionWait; zero means DefaultDeletionWait).
func (m *Manager) ScheduleDeletion(name string, wait time.Duration) (*Key, error) {
	if wait == 0 {
		wait = DefaultDeletionWait
	}
	if wait < MinDeletionWait {
		return nil, fmt.Errorf("%w: the waiting period must be at least %v, so that a mistake can be undone", ErrInvalid, MinDeletionWait)
	}
	// The fleet's lock of the key, as DeleteDue takes it: a deletion under
	// way on the elected node is done before this one is decided.
	unlock, err := m.lockFleet(context.Background(), name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return m.change(name, func(k *Key) error {
		if k.State == PendingDeletion {
			return fmt.Errorf("%w: %q already", ErrPendingDeletion, name)
		}
		k.State = PendingDeletion
		k.DeletionDate = m.opt.Now().UTC().Add(wait)
		return nil
	})
}

// CancelDeletion takes a key off the deletion schedule; it comes back
// disabled, to be enabled on purpose.
func (m *Manager) CancelDeletion(name string) (*Key, error) {
	// The fleet's lock of the key, as DeleteDue takes it: a cancel that
	// returns ok is never followed by the destruction it cancelled.
	unlock, err := m.lockFleet(context.Background(), name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return m.change(name, func(k *Key) error {
		if k.State != PendingDeletion {
			return fmt.Errorf("%w: %q is not scheduled for deletion", ErrInvalid, name)
		}
		k.State = Disabled
		k.DeletionDate = time.Time{}
		return nil
	})
}

// DueForDeletion lists the keys whose deletion date has passed.
func (m *Manager) DueForDeletion() ([]string, error) {
	all, err := m.List()
	if err != nil {
		return nil, err
	}
	var due []string
	for _, k := range all {
		if k.State == PendingDeletion && !m.opt.Now().Before(k.DeletionDate) {
			due = append(due, k.Name)
		}
	}
	return due, nil
}

// DeleteDue destroys a key whose deletion date has passed: every version's
// HSM key, then the metadata. It does nothing (and says so with false) if the
// key was cancelled or scheduled again since it was listed.
func (m *Manager) DeleteDue(ctx context.Context, name string) (bool, error) {
	unlock, err := m.lockFleet(ctx, name)
	if err != nil {
		return false, err
	}
	defer unlock()
	k, err := m.Get(name)
	if err != nil || k.State != PendingDeletion || m.opt.Now().Before(k.DeletionDate) {
		return false, err
	}
	for _, v := range k.Versions {
		err := m.hsm.DestroyKey(ctx, hsm.KeyID{Name: name, Version: v.Number})
		if err != nil && !errors.Is(err, hsm.ErrKeyNotFound) {
			return false, err
		}
	}
	// The record goes with an event for each version still usable until
	// now, for the plugins.
	events := m.revokedVersions(name, max(k.MinDecryptionVersion, 1), k.Latest()+1, "the key was deleted")
	return true, m.store.UpdateEachEmit(store.BucketKeys, []string{name}, func(string, []byte) ([]byte, [][]byte, error) { return nil, events, nil })
}

// encryptionKey returns a usable encryption key, from the cache.
func (m *Manager) encryptionKey(name string) (*Key, error) {
	k, err := m.Cached(name)
	if err != nil {
		return nil, err
	}
	if err := k.Usable(); err != nil {
		return nil, err
	}
	if k.Purpose != Encrypt {
		return nil, fmt.Errorf("%w: %q is a %s key, not an encryption key", ErrWrongPurpose, name, k.Purpose)
	}
	return k, nil
}

// ForEncryption returns the version to encrypt with under an enabled
// encryption key, and counts the encryption. When the version reaches the
// encryption limit the key rotates first.
func (m *Manager) ForEncryption(ctx context.Context, name string) (hsm.KeyID, error) {
	k, err := m.encryptionKey(name)
	if err != nil {
		return hsm.KeyID{}, err
	}
	id := hsm.KeyID{Name: name, Version: k.Latest()}
	m.mu.Lock()
	c := m.counter[id]
	if c != nil && c.used < c.reserved {
		c.used++
		m.mu.Unlock()
		return id, nil
	}
	m.mu.Unlock()
	return m.reserve(ctx, name)
}

// reserve takes the next block of encryptions of the latest version from
// the store, rotating first if the version is used up.
func (m *Manager) reserve(ctx context.Context, name string) (hsm.KeyID, error) {
	defer m.lock(name)()
	tries := 0
	for {
		k, err := m.Get(name)
		if err != nil {
			return hsm.KeyID{}, err
		}
		if err := k.Usable(); err != nil {
			return hsm.KeyID{}, err
		}
		id := hsm.KeyID{Name: name, Version: k.Latest()}
		m.mu.Lock()
		c := m.counter[id]
		if c != nil && c.used < c.reserved { // another caller reserved meanwhile
			c.used++
			m.mu.Unlock()
			return id, nil
		}
		m.mu.Unlock()
		reserved := k.Versions[len(k.Versions)-1].Reserved
		if reserved+m.opt.ReserveBlock > m.opt.EncryptionLimit {
			if err := m.rotateForLimit(ctx, name, id); err != nil {
				return hsm.KeyID{}, err
			}
			continue
		}
		// The limit is checked again in the transaction, on the record as
		// the store has it: another node may have reserved meanwhile.
		_, err = m.change(name, func(k *Key) error {
			last := &k.Versions[len(k.Versions)-1]
			if last.Number != id.Version {
				return errReserveAgain
			}
			if last.Reserved+m.opt.ReserveBlock > m.opt.EncryptionLimit {
				return errReserveAgain
			}
			last.Reserved += m.opt.ReserveBlock
			reserved = last.Reserved
			return nil
		})
		if errors.Is(err, errReserveAgain) {
			// Rotated, or used up, by another node: the record read next
			// says which, once this node's reads have what the transaction
			// saw (a fleet node's copy may lag).
			if tries++; tries > maxReserveTries {
				return hsm.KeyID{}, fmt.Errorf("%w: keys: %q changed under %d reservations in a row", store.ErrUnavailable, name, tries)
			}
			if sy, ok := m.store.(store.Syncer); ok {
				if err := sy.Sync(ctx); err != nil {
					return hsm.KeyID{}, err
				}
			}
			continue
		}
		if err != nil {
			return hsm.KeyID{}, err
		}
		m.mu.Lock()
		// Encryptions counted before a crash lie below the old reservation;
		// this process starts above it.
		m.counter[id] = &counter{used: reserved - m.opt.ReserveBlock + 1, reserved: reserved}
		m.mu.Unlock()
		return id, nil
	}
}

// errReserveAgain: a reservation found the version rotated or used up in
// the transaction; maxReserveTries bounds how often in a row.
var errReserveAgain = errors.New("keys: reserve again")

const maxReserveTries = 10

// rotateForLimit rotates name because version id reached its encryption
// limit, under the fleet's lock of the key (reserve holds the local one);
// another node may have rotated it first, which does as well.
func (m *Manager) rotateForLimit(ctx context.Context, name string, id hsm.KeyID) error {
	if fl, ok := m.store.(store.Locker); ok {
		release, err := fl.Lock(ctx, "keys/"+name)
		if err != nil {
			return err
		}
		defer release()
		if k, err := m.Get(name); err == nil && k.Latest() != id.Version {
			return nil // rotated by another node meanwhile
		}
	}
	if _, err := m.rotateLocked(ctx, name); err != nil {
		return fmt.Errorf("keys: %q v%d reached its encryption limit and rotating it failed: %w", name, id.Version, err)
	}
	return nil
}

// ForDecryption checks that version v of an enabled encryption key may
// decrypt: it exists and is not below the minimum decryption version.
func (m *Manager) ForDecryption(name string, v uint32) (hsm.KeyID, error) {
	k, err := m.encryptionKey(name)
	if err != nil {
		return hsm.KeyID{}, err
	}
	if v < 1 || v > k.Latest() {
		return hsm.KeyID{}, fmt.Errorf("%w: %q has no version %d", ErrVersion, name, v)
	}
	if v < k.MinDecryptionVersion {
		return hsm.KeyID{}, fmt.Errorf("%w: %q v%d is below the minimum decryption version %d", ErrVersion, name, v, k.MinDecryptionVersion)
	}
	return hsm.KeyID{Name: name, Version: v}, nil
}

// Counted is how many encryptions of a version this process has counted
// and reserved; for tests and the Status call.
func (m *Manager) Counted(id hsm.KeyID) (used, reserved uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.counter[id]; c != nil {
		return c.used, c.reserved
	}
	return 0, 0
}
