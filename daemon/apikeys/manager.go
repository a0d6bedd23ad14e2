package apikeys

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/daemon/geo"
	"github.com/keyward/keyward/daemon/names"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

// Errors of the Manager.
var (
	ErrNotFound = errors.New("apikeys: no such key")
	ErrInvalid  = errors.New("apikeys: invalid argument")
)

// maxCached bounds the digest cache (about 150 bytes an entry); when full
// it drops an entry for each new one.
const maxCached = 100_000

// The record cache keeps at most maxRecords records of at most
// maxRecordBytes encoded in all (a record is 0.3 to 20 KiB): decoding a
// record was a fifth of a verify's CPU through the daemon.
const (
	maxRecords     = 10_000
	maxRecordBytes = 8 << 20
)

type cachedRecord struct {
	rec  *Record
	size int
}

// Unavailable: the HSM or the store failed; the key's validity is unknown
// and the caller should retry (never treat it as valid).
const Unavailable Code = "UNAVAILABLE"

// Store is what the Manager needs of the store.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error
	UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
	ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error
}

// MACer computes HMAC-SHA256 with the pepper key inside the HSM.
type MACer interface {
	HMACSHA256(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, error)
}

// Manager issues, verifies, rotates and revokes API keys. The store holds
// only HMACs of secrets under the pepper, a key in the HSM, so a copy of the
// store is useless without the HSM. A key verified once is found again by a
// local SHA-256 of the presented string, so verifying it costs no HSM call.
// That cache only points at a record and remembers the MAC: every verify
// reads the record (from the record cache, which every write of the record
// empties of it) and compares its MAC, so a revocation, rotation or change
// counts from the very next verify.
type Manager struct {
	store  Store
	mac    MACer
	pepper hsm.KeyID
	prefix string
	// defaults are the limits of keys created without any, by role.
	defaults map[string][]ratelimit.Layer
	lim      *ratelimit.Limiter
	// factor scales rate limits at each verify (Options.LimitFactor).
	factor func(rec *Record, now time.Time) float64
	// window scales a key's own limits for a time (Options.WindowFactor).
	window func(rec *Record, now time.Time) float64
	usage  *usageLog
	// fleet holds the node's shares of keys' fleet-wide limits; nil on
	// one host.
	fleet *fleetLimits
	// quotas holds the quotas used since the last Flush, by key ID; they
	// override the store's until Flush or a change writes them.
	quotas map[string]*Quota
	now    func() time.Time

	mu      sync.Mutex         // serializes changes; guards the caches
	digests map[[32]byte]known // sha256(presented key) -> its MAC, which key and secret
	// records holds the decoded records of keys verified lately, never
	// changed in place: every write of a record drops its entry (this
	// node's writes go through the Manager, under mu; another node's reach
	// Forget), so a verify sees each change as if it read the store.
	records     map[string]cachedRecord
	recordBytes int // the encoded size of the records cached

	// running are the intents of the bulk revocations this process runs
	// (intents.go): a resumption leaves them alone.
	intentsMu sync.Mutex
	running   map[string]bool

	// changed holds the IDs of records another node of a fleet changed
	// (Forget), for the next call under mu to drop from records: Forget
	// may not wait for mu, which a write holds while the store waits for
	// the change to reach this node.
	changedMu  sync.Mutex
	changed    map[string]bool
	changedAll bool
	anyChanged atomic.Bool

	// watch hears of each verification of a live secret (SetWatch).
	watch atomic.Pointer[Watch]

	// hintKey keys the hints: a short HMAC of every secret issued, kept in
	// the store, so that a key nobody issued is refused without an HSM call
	// (the checksum only catches typos: anyone can make a well-formed key).
	// The key is derived in the HSM from the pepper at start and lives only
	// in memory, so a copy of the store still tells nothing without the HSM.
	hintKey []byte
	// legacy: the store holds keys issued before hints; a key without one
	// is looked up in the HSM as before.
	legacy bool

	// leakAction is what ReportLeak does to a leaked key.
	leakAction LeakAction

	// geo tells a source address's country; nil: no GeoIP database.
	geo Geo
}

// hintLen is a hint's length in bytes: 64 bits make a stranger's key pass
// the filter (and cost an HSM call) with odds of one in 2^64 per key issued.
const hintLen = 8

// hintLabel is what the pepper MACs to make the hint key: never a
// well-formed API key, so never any key's MAC.
const hintLabel = "keyward apikeys hint key v1"

// hint is a secret's hint, hex.
func (m *Manager) hint(secret string) string {
	h := hmac.New(sha256.New, m.hintKey)
	h.Write([]byte(secret))
	return hex.EncodeToString(h.Sum(nil)[:hintLen])
}

// known is a presented key verified before: its MAC under the pepper and
// where the index says it belongs.
type known struct {
	mac []byte
	ref secretRef
}

// secretRef is an index entry: the key a MAC belongs to. Secret, its
// position when indexed, is only a hint: rotations prune old secrets.
type secretRef struct {
	ID     string `json:"id"`
	Secret int    `json:"secret"`
}

// Options tune a Manager; the zero value is the defaults.
type Options struct {
	// Prefix starts every key; DefaultPrefix if empty.
	Prefix string
	// NearLimit is the fraction of a rate-limit layer's burst in use at
	// which a verification says NearLimit; default 0.8.
	NearLimit float64
	// DefaultLimits are the rate limits of a key created without any, by
	// role (see LimitsFor); DefaultLimits if nil.
	DefaultLimits map[string][]ratelimit.Layer
	// Now is the clock; time.Now if nil.
	Now func() time.Time
	// LimitFactor, if set, scales each key's rate limits at each verify
	// (keywardd's dynamic limits: tighter under load). On a fleet it
	// scales each node's limiter only.
	LimitFactor func(rec *Record, now time.Time) float64
	// WindowFactor, if set, scales each key's own rate limits for a time
	// (limit windows, daemon/limitwin): the limits the key has then, on a
	// fleet its fleet-wide bucket and blocks too.
	WindowFactor func(rec *Record, now time.Time) float64
	// FleetNodes, set on a node of a fleet, says how many nodes the fleet
	// has now; keys' rate limits and quotas then hold across the fleet
	// (fleet.go).
	FleetNodes func() int
	// LeakAction is what a confirmed leak does to its key (ReportLeak):
	// LeakRevoke (the default, if empty) or LeakDisable.
	LeakAction LeakAction
	// Geo, if set, tells the country of a verification's source address
	// (daemon/geo): usage counts countries, and keys may be limited to
	// countries. Without it, a key cannot be given allowed countries.
	Geo Geo
}

// Geo tells the country of an address: its ISO 3166-1 alpha-2 code, or ""
// if unknown (daemon/geo's DB).
type Geo interface {
	Country(ip netip.Addr) string
}

// countryOf is ip's country as usage counts it and the check compares it:
// "" without a GeoIP database, UnknownCountry if it does not say.
func (m *Manager) countryOf(ip netip.Addr) string {
	if m.geo == nil {
		return ""
	}
	if c := m.geo.Country(ip); c != "" {
		return c
	}
	return UnknownCountry
}

// DefaultLimits are the rate limits a key gets when it is created without
// any, by the most powerful role it holds: the more a key may do, the less
// often. Custom resource:action permissions count as "standard".
var DefaultLimits = map[string][]ratelimit.Layer{
	"read-only": {{Limit: 100, Per: time.Second, Burst: 200}, {Limit: 100_000, Per: time.Hour, Burst: 100_000}},
	"standard":  {{Limit: 50, Per: time.Second, Burst: 100}, {Limit: 50_000, Per: time.Hour, Burst: 50_000}},
	"admin":     {{Limit: 10, Per: time.Second, Burst: 20}, {Limit: 5_000, Per: time.Hour, Burst: 5_000}},
}

// LimitsFor returns the default limits (from defaults, by role) of a key
// with these permissions, by what they grant: those of "admin" for a key
// that may do anything ("admin", "*:*"), of "read-only" for one that may
// only read, and of "standard" otherwise.
func LimitsFor(defaults map[string][]ratelimit.Layer, perms []string) []ratelimit.Layer {
	rec := Record{Permissions: perms}
	role := "standard"
	switch {
	case rec.Grants("*:*") || slices.Contains(perms, "admin"):
		role = "admin"
	case !slices.ContainsFunc(perms, func(p string) bool { return p != "read-only" && !strings.HasSuffix(p, ":read") }):
		role = "read-only"
	}
	return slices.Clone(defaults[role])
}

// NewManager returns a Manager; pepper names the HMAC key in the HSM, from
// which it derives the hint key (one HSM call).
func NewManager(s Store, mac MACer, pepper hsm.KeyID, o Options) (*Manager, error) {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if err := CheckPrefix(o.Prefix); err != nil {
		return nil, err
	}
	if o.NearLimit < 0 || o.NearLimit > 1 {
		return nil, fmt.Errorf("%w: the near-limit threshold is a fraction from 0 to 1, not %v", ErrInvalid, o.NearLimit)
	}
	if o.DefaultLimits == nil {
		o.DefaultLimits = DefaultLimits
	}
	for role, layers := range o.DefaultLimits {
		if _, ok := Roles[role]; !ok {
			return nil, fmt.Errorf("%w: default limits for %q: roles are read-only, standard and admin", ErrInvalid, role)
		}
		if err := CheckLimits(layers); err != nil {
			return nil, fmt.Errorf("default limits for %q: %w", role, err)
		}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	switch o.LeakAction {
	case "":
		o.LeakAction = LeakRevoke
	case LeakRevoke, LeakDisable:
	default:
		return nil, fmt.Errorf("%w: a leak's action is %s or %s, not %q", ErrInvalid, LeakRevoke, LeakDisable, o.LeakAction)
	}
	hintKey, err := mac.HMACSHA256(context.Background(), pepper, []byte(hintLabel))
	if err != nil {
		return nil, fmt.Errorf("apikeys: deriving the hint key from %s: %w", pepper, err)
	}
	_, err = s.Get(store.BucketAPIKeyHints, store.LegacyAPIKeys)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	lim := ratelimit.New()
	lim.Near = o.NearLimit
	m := &Manager{store: s, mac: mac, pepper: pepper, prefix: o.Prefix, defaults: o.DefaultLimits, lim: lim, usage: newUsageLog(),
		quotas: map[string]*Quota{}, now: o.Now, factor: o.LimitFactor, window: o.WindowFactor, digests: map[[32]byte]known{}, records: map[string]cachedRecord{}, hintKey: hintKey, legacy: err == nil,
		running: map[string]bool{}, leakAction: o.LeakAction, geo: o.Geo}
	if o.FleetNodes != nil {
		m.fleet = newFleetLimits(m, o.FleetNodes)
	}
	return m, nil
}

// Spec is a key to create.
type Spec struct {
	Owner, Name, Environment string
	Permissions              []string
	Expires                  time.Time
	AllowedIPs               []netip.Prefix
	AllowedCountries         []string // ISO 3166-1 alpha-2; needs Options.Geo
	// Limits: nil gives the defaults of the key's role (LimitsFor); an
	// empty, non-nil slice, none at all.
	Limits   []ratelimit.Layer
	Quota    *Quota
	Tags     []string
	Metadata map[string]string
}

// A permission is resource:action, each part a name or "*" alone.
var permForm = regexp.MustCompile(`^(\*|[a-z0-9][a-z0-9_.-]*):(\*|[a-z0-9][a-z0-9_.-]*)$`)

// An owner is a name the policy's globs can match: no glob characters, no
// slash, no space.
var ownerForm = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@:+-]*$`)

// Bounds on a key's record: every verify reads and walks it.
const (
	maxField    = 128 // owner, name, environment, a permission, a tag, a metadata name
	maxValue    = 1024
	maxItems    = 32 // permissions, tags, metadata entries, allowlist prefixes
	maxMetadata = 8 << 10
)

func (m *Manager) check(s Spec) error {
	metaSize := 0
	for k, v := range s.Metadata {
		if len(k) == 0 || len(k) > maxField || len(v) > maxValue {
			return fmt.Errorf("%w: a metadata name is 1 to %d bytes and a value at most %d", ErrInvalid, maxField, maxValue)
		}
		metaSize += len(k) + len(v)
	}
	long := func(ss ...string) bool {
		return slices.ContainsFunc(ss, func(x string) bool { return len(x) > maxField })
	}
	switch {
	case long(s.Owner, s.Name, s.Environment) || long(s.Permissions...) || long(s.Tags...):
		return fmt.Errorf("%w: owner, name, environment, permissions and tags are at most %d bytes each", ErrInvalid, maxField)
	case len(s.Permissions) > maxItems || len(s.Tags) > maxItems || len(s.Metadata) > maxItems || len(s.AllowedIPs) > maxItems || len(s.AllowedCountries) > maxItems:
		return fmt.Errorf("%w: at most %d permissions, tags, metadata entries, allowlist prefixes and allowed countries each", ErrInvalid, maxItems)
	case metaSize > maxMetadata:
		return fmt.Errorf("%w: metadata is at most %d bytes in all", ErrInvalid, maxMetadata)
	case s.Owner == "" || s.Name == "" || s.Environment == "":
		return fmt.Errorf("%w: owner, name and environment are required", ErrInvalid)
	case !ownerForm.MatchString(s.Owner):
		return fmt.Errorf("%w: owner %q: letters, digits and _ . @ : + - (the policy matches owners with globs)", ErrInvalid, s.Owner)
	case len(s.Permissions) == 0:
		return fmt.Errorf("%w: a key needs at least one permission (least privilege: name what it may do)", ErrInvalid)
	case !s.Expires.IsZero() && !s.Expires.After(m.now()):
		return fmt.Errorf("%w: the expiry is in the past", ErrInvalid)
	}
	for _, p := range s.Permissions {
		if _, role := Roles[p]; !role && !permForm.MatchString(p) {
			return fmt.Errorf("%w: permission %q: use read-only, standard, admin or resource:action (lower case; a part is a name or * alone)", ErrInvalid, p)
		}
	}
	if err := CheckLimits(s.Limits); err != nil {
		return err
	}
	for _, c := range s.AllowedCountries {
		if err := geo.CheckCountry(c); err != nil {
			return fmt.Errorf("%w: allowed country: %v", ErrInvalid, err)
		}
	}
	for _, p := range s.AllowedIPs {
		if !p.IsValid() {
			return fmt.Errorf("%w: an invalid allowlist prefix", ErrInvalid)
		}
		if p.Addr().Is4In6() {
			return fmt.Errorf("%w: allowlist prefix %v is IPv4-mapped IPv6; write it as IPv4", ErrInvalid, p)
		}
	}
	return nil
}

// checkNames refuses a new key whose owner, environment or a tag is not
// canonical (daemon/names). It is not part of check, which updates run
// too: keys issued before the rule keep their names and can still be
// narrowed.
func checkNames(s Spec) error {
	err := names.Check("owner", s.Owner)
	if err == nil {
		err = names.Check("environment", s.Environment)
	}
	for _, t := range s.Tags {
		if err == nil {
			err = names.Check("tag", t)
		}
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

// checkGeo refuses allowed countries without a GeoIP database: every use
// of the key would be refused.
func (m *Manager) checkGeo(countries []string) error {
	if len(countries) > 0 && m.geo == nil {
		return fmt.Errorf("%w: allowed countries need a GeoIP database: set geoip.database in keywardd's configuration", ErrInvalid)
	}
	return nil
}

// CheckLimits says whether layers can be a key's rate limits
// (ratelimit.CheckLayers: at most 4, each valid, each period once).
func CheckLimits(layers []ratelimit.Layer) error {
	if err := ratelimit.CheckLayers(layers); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

// Create issues a key. The secret is returned here and never again.
func (m *Manager) Create(ctx context.Context, s Spec) (secret string, rec *Record, err error) {
	secrets, recs, err := m.CreateMany(ctx, []Spec{s})
	if err != nil {
		return "", nil, err
	}
	return secrets[0], recs[0], nil
}

// MaxCreateBatch is the most keys CreateMany issues at once.
const MaxCreateBatch = 10_000

// CreateMany issues keys, all or none, with two store transactions for
// the lot (the index, then the records) instead of two a key: for issuing
// and loading in bulk. The secrets are returned here and never again, in
// the order of specs.
func (m *Manager) CreateMany(ctx context.Context, specs []Spec) (secrets []string, recs []*Record, err error) {
	if len(specs) == 0 || len(specs) > MaxCreateBatch {
		return nil, nil, fmt.Errorf("%w: create 1 to %d keys at once", ErrInvalid, MaxCreateBatch)
	}
	for i, s := range specs {
		err := m.check(s)
		if err == nil {
			err = checkNames(s)
		}
		if err == nil {
			err = m.checkGeo(s.AllowedCountries)
		}
		if err != nil {
			if len(specs) > 1 {
				err = fmt.Errorf("key %d: %w", i, err)
			}
			return nil, nil, err
		}
	}
	now := m.now().UTC()
	secrets, recs = make([]string, len(specs)), make([]*Record, len(specs))
	macs := make([][]byte, len(specs))
	for i, s := range specs {
		if secrets[i], err = Generate(m.prefix, rand.Reader); err != nil {
			return nil, nil, err
		}
		if macs[i], err = m.mac.HMACSHA256(ctx, m.pepper, []byte(secrets[i])); err != nil {
			return nil, nil, err
		}
		id := make([]byte, 12)
		rand.Read(id)
		if s.Limits == nil {
			s.Limits = LimitsFor(m.defaults, s.Permissions)
		}
		recs[i] = &Record{
			ID: "ak_" + hex.EncodeToString(id), Owner: s.Owner, Name: s.Name, Environment: s.Environment,
			Permissions: s.Permissions, Expires: s.Expires, AllowedIPs: s.AllowedIPs, AllowedCountries: s.AllowedCountries, Limits: s.Limits, Quota: s.Quota,
			Tags: s.Tags, Metadata: s.Metadata, State: Active, Created: now,
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.addSecrets(recs, secrets, macs, now); err != nil {
		return nil, nil, err
	}
	if err := m.save(recs...); err != nil {
		return nil, nil, err
	}
	for i, rec := range recs {
		recs[i] = public(rec)
	}
	return secrets, recs, nil
}

// addSecrets writes the hints of new secrets, secrets[i] of recs[i] with
// MAC macs[i], indexes their MACs (both before the records name them: a
// hint or an index entry without a record only ever finds nothing), and
// appends them. The caller computes the MACs before it takes m.mu: no HSM
// call holds it. Hints are never removed: two secrets may share one.
func (m *Manager) addSecrets(recs []*Record, secrets []string, macs [][]byte, now time.Time) error {
	if err := m.indexSecrets(recs, secrets, macs); err != nil {
		return err
	}
	for i, rec := range recs {
		rec.Secrets = append(rec.Secrets, Secret{MAC: macs[i], Created: now})
	}
	return nil
}

// indexSecrets writes the hints of new secrets and indexes their MACs,
// before any record names them.
func (m *Manager) indexSecrets(recs []*Record, secrets []string, macs [][]byte) error {
	hints := make([]string, len(secrets))
	for i, s := range secrets {
		hints[i] = m.hint(s)
	}
	slices.Sort(hints)
	if err := m.store.UpdateEach(store.BucketAPIKeyHints, slices.Compact(hints), func(string, []byte) ([]byte, error) { return []byte{1}, nil }); err != nil {
		return err
	}
	refs := make(map[string][]byte, len(recs))
	for i, rec := range recs {
		refs[hex.EncodeToString(macs[i])], _ = json.Marshal(secretRef{ID: rec.ID, Secret: len(rec.Secrets)})
	}
	return m.store.UpdateEach(store.BucketAPIKeyMACs, slices.Sorted(maps.Keys(refs)), func(k string, old []byte) ([]byte, error) {
		if old != nil {
			return nil, errors.New("apikeys: a secret's MAC is indexed already") // 256 random bits: never
		}
		return refs[k], nil
	})
}

// cachedLoad is load through the record cache, for Verify; m.mu held. It
// returns a copy the caller may change (its Quota too).
func (m *Manager) cachedLoad(id string) (*Record, error) {
	m.dropChanged()
	c, ok := m.records[id]
	if !ok {
		b, err := m.store.Get(store.BucketAPIKeys, id)
		if errors.Is(err, store.ErrNotFound) {
			return nil, fmt.Errorf("%w: %q", ErrNotFound, id)
		}
		if err != nil {
			return nil, err
		}
		if c.rec, err = decode(id, b); err != nil {
			return nil, err
		}
		c.size = len(b)
		for old := range m.records { // full: make room by dropping any
			if len(m.records) < maxRecords && m.recordBytes+c.size <= maxRecordBytes {
				break
			}
			m.forget(old)
		}
		m.records[id] = c
		m.recordBytes += c.size
	}
	rec := c.rec
	cp := *rec
	if rec.Quota != nil {
		q := *rec.Quota
		cp.Quota = &q
	}
	return &cp, nil
}

// Forget has the records of ids (nil: every record) read afresh at their
// next use: another node of a fleet changed them. It never waits for a
// call under way.
func (m *Manager) Forget(ids []string) {
	m.changedMu.Lock()
	defer m.changedMu.Unlock()
	if ids == nil {
		m.changedAll = true
	}
	for _, id := range ids {
		if m.changed == nil {
			m.changed = map[string]bool{}
		}
		m.changed[id] = true
	}
	m.anyChanged.Store(true)
}

// dropChanged drops what Forget was told of from the caches. Under mu.
func (m *Manager) dropChanged() {
	if !m.anyChanged.Load() {
		return
	}
	m.changedMu.Lock()
	ids, all := m.changed, m.changedAll
	m.changed, m.changedAll = nil, false
	m.anyChanged.Store(false)
	m.changedMu.Unlock()
	if all {
		clear(m.records)
		clear(m.digests)
		m.recordBytes = 0
		return
	}
	for id := range ids {
		m.forget(id)
	}
}

// forget drops records from the record cache: they are being written.
func (m *Manager) forget(ids ...string) {
	for _, id := range ids {
		if c, ok := m.records[id]; ok {
			m.recordBytes -= c.size
			delete(m.records, id)
		}
	}
}

// save writes records in one transaction.
func (m *Manager) save(recs ...*Record) error {
	bs := make(map[string][]byte, len(recs))
	for _, rec := range recs {
		m.forget(rec.ID)
		b, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		bs[rec.ID] = b
	}
	return m.store.UpdateEach(store.BucketAPIKeys, slices.Sorted(maps.Keys(bs)), func(id string, _ []byte) ([]byte, error) { return bs[id], nil })
}

var idForm = regexp.MustCompile(`^ak_[0-9a-f]{24}$`)

// load reads a key's record, MACs included. An ID that is not of the form
// is refused without being echoed: it may be a secret pasted by mistake.
func (m *Manager) load(id string) (*Record, error) {
	if !idForm.MatchString(id) {
		return nil, fmt.Errorf("%w: not a key ID (ak_ and 24 hex digits; the ID, never the key itself)", ErrInvalid)
	}
	b, err := m.store.Get(store.BucketAPIKeys, id)
	if sy, ok := m.store.(store.Syncer); ok && errors.Is(err, store.ErrNotFound) {
		// On a fleet, a key made on another node a moment ago may not be in
		// this node's copy yet (never on the verify path, which answers
		// from what it has).
		if err = sy.Sync(context.Background()); err == nil {
			b, err = m.store.Get(store.BucketAPIKeys, id)
		}
	}
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err != nil {
		return nil, err
	}
	return decode(id, b)
}

func decode(id string, b []byte) (*Record, error) {
	var rec Record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("apikeys: the record of %q does not parse: %w", id, err)
	}
	return &rec, nil
}

// public is what leaves the Manager: a copy of a record without its
// secrets' MACs.
func public(rec *Record) *Record {
	out := *rec
	if rec.Quota != nil {
		q := *rec.Quota
		out.Quota = &q
	}
	out.Secrets = make([]Secret, len(rec.Secrets))
	for i, s := range rec.Secrets {
		out.Secrets[i] = Secret{Created: s.Created, NotAfter: s.NotAfter}
	}
	return &out
}

// Get returns a key's record, without MACs.
func (m *Manager) Get(id string) (*Record, error) {
	rec, err := m.load(id)
	if err != nil {
		return nil, err
	}
	return m.live(rec), nil
}

// live is public(rec) with the quota not yet flushed.
func (m *Manager) live(rec *Record) *Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	if q := m.quotas[rec.ID]; q != nil {
		rec.Quota = q
	}
	return public(rec)
}

// Page sizes of List.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

var errStop = errors.New("stop") // ends a store scan early

// List returns the keys the filter picks (every field set must match; an
// empty filter picks all), in ID order, after the ID after ("" for the
// first page), at most size of them (0: DefaultPageSize), without MACs.
// next is the ID to pass as after for the next page, "" on the last one.
func (m *Manager) List(f Filter, after string, size int) (recs []*Record, next string, err error) {
	if after != "" && !idForm.MatchString(after) {
		return nil, "", fmt.Errorf("%w: a page token is the last ID of the previous page", ErrInvalid)
	}
	if size <= 0 {
		size = DefaultPageSize
	}
	size = min(size, MaxPageSize)
	err = m.store.ForEachAfter(store.BucketAPIKeys, after, func(id string, b []byte) error {
		rec, err := decode(id, b)
		if err != nil {
			return err
		}
		if !f.matches(rec) {
			return nil
		}
		if len(recs) == size {
			next = recs[size-1].ID
			return errStop
		}
		recs = append(recs, rec)
		return nil
	})
	if errors.Is(err, errStop) {
		err = nil
	}
	// The quotas not yet flushed, once the store's read is over: m.mu is
	// taken around store writes (revokeBatch), and a write that grows the
	// file waits for every read to end, so a read must never wait for
	// m.mu (it did: a bulk revocation and the names' survey deadlocked).
	for i, rec := range recs {
		recs[i] = m.live(rec)
	}
	return recs, next, err
}

// Verify checks a presented key for a request.
// A known key's verification is counted in its usage, with its latency
// from here to the decision on the monotonic clock (not Options.Now).
func (m *Manager) Verify(ctx context.Context, presented string, req Request) Result {
	start := monoNow()
	prefix, err := Parse(presented)
	if err != nil {
		return Result{Code: Malformed, Detail: err.Error()}
	}
	if prefix != m.prefix {
		return Result{Code: NotFound, Detail: fmt.Sprintf("not a key of this daemon (its keys start %s_)", m.prefix)}
	}
	digest := sha256.Sum256([]byte(presented))
	k, cached, found, err := m.find(ctx, presented, digest)
	if err != nil {
		return Result{Code: Unavailable, Detail: err.Error()}
	}
	if !found {
		return Result{Code: NotFound, Detail: "no such key"}
	}
	req.country = m.countryOf(req.SourceIP)
	m.mu.Lock()
	locked := true
	defer func() {
		if locked {
			m.mu.Unlock()
		}
	}()
	rec, err := m.cachedLoad(k.ref.ID)
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalid) {
		return Result{Code: NotFound, Detail: "no such key"}
	}
	if err != nil {
		return Result{Code: Unavailable, Detail: err.Error()}
	}
	// The index only points at a key; the record's MACs decide, each
	// compared in constant time, so an index entry that is stale (a pruned
	// secret) or was written by someone else finds nothing.
	secret := secretOf(rec, k.mac)
	if secret < 0 {
		return Result{Code: NotFound, Detail: "no such key"}
	}
	if !cached {
		for d := range m.digests { // full: make room by dropping one, any one
			if len(m.digests) < maxCached {
				break
			}
			delete(m.digests, d)
		}
		m.digests[digest] = k
	}
	if req.Owners != nil && !req.Owners(rec.Owner) {
		// Not a key of an owner this caller serves: for it, no such key.
		return Result{Code: NotFound, Detail: "no such key"}
	}
	if m.fleet != nil && limits(rec) {
		// The fleet's limits may wait for the store: not under mu.
		m.mu.Unlock()
		locked = false
		now := m.now()
		if m.factor != nil {
			req.LimitFactor = m.factor(rec, now)
		}
		res := m.watched(rec.ID, m.fleet.check(ctx, rec, secret, req, now), req)
		m.usage.record(rec.ID, res.Code, req.SourceIP, req.country, now, monoNow()-start)
		res.Key = answer(rec)
		if q := res.Key.Quota; q != nil {
			q.refill(now)
			q.Remaining += m.fleet.share(rec.ID)
		}
		return res
	}
	if q := m.quotas[rec.ID]; q != nil {
		rec.Quota = q
	}
	var quota Quota
	if rec.Quota != nil {
		quota = *rec.Quota
	}
	now := m.now()
	req.LimitFactor = 1
	if m.factor != nil {
		req.LimitFactor = m.factor(rec, now)
	}
	if m.window != nil && len(rec.Limits) > 0 {
		req.LimitFactor *= m.window(rec, now)
	}
	res := Check(rec, secret, req, m.lim, now)
	if rec.Quota != nil && *rec.Quota != quota {
		m.quotas[rec.ID] = rec.Quota // saved by the next Flush
		if len(m.quotas) >= maxPendingKeys {
			m.usage.askFlush()
		}
	}
	res.Key = answer(rec)
	if q := res.Key.Quota; q != nil {
		q.refill(now) // refused before the quota: its refills due all the same
	}
	// The watch, outside mu: the anomaly detector has locks of its own.
	m.mu.Unlock()
	locked = false
	res = m.watched(rec.ID, res, req)
	m.usage.record(rec.ID, res.Code, req.SourceIP, req.country, now, monoNow()-start)
	return res
}

// limitsNow are the key's own rate limits at now: its record's, times the
// factor of a limit window covering it (Options.WindowFactor).
func (m *Manager) limitsNow(rec *Record, now time.Time) []ratelimit.Layer {
	if m.window == nil || len(rec.Limits) == 0 {
		return rec.Limits
	}
	return scaled(rec.Limits, m.window(rec, now))
}

// secretOf is the index of the record's secret whose MAC is mac, each
// compared in constant time; -1 if none.
func secretOf(rec *Record, mac []byte) int {
	secret := -1
	for i, s := range rec.Secrets {
		if hmac.Equal(s.MAC, mac) {
			secret = i
		}
	}
	return secret
}

// find looks up a well-formed key of this daemon's prefix, whose SHA-256
// is digest: in the digest cache (cached), else by its hint, its HMAC in
// the HSM and the MAC index. found is false for a key nobody issued; err
// is a store or HSM failure (the key's fate is then unknown). What it
// finds only points at a key: the caller compares the record's MACs.
func (m *Manager) find(ctx context.Context, presented string, digest [32]byte) (k known, cached, found bool, err error) {
	m.mu.Lock()
	k, cached = m.digests[digest]
	m.mu.Unlock()
	if cached {
		return k, true, true, nil
	}
	if !m.legacy {
		_, err := m.store.Get(store.BucketAPIKeyHints, m.hint(presented))
		if errors.Is(err, store.ErrNotFound) {
			return k, false, false, nil
		}
		if err != nil {
			return k, false, false, err
		}
	}
	mac, err := m.mac.HMACSHA256(ctx, m.pepper, []byte(presented))
	if err != nil {
		return k, false, false, err
	}
	b, err := m.store.Get(store.BucketAPIKeyMACs, hex.EncodeToString(mac))
	if errors.Is(err, store.ErrNotFound) {
		return k, false, false, nil
	}
	if err != nil {
		return k, false, false, err
	}
	k.mac = mac
	if err := json.Unmarshal(b, &k.ref); err != nil {
		return k, false, false, nil
	}
	return k, false, true, nil
}

// Watch hears of a verification of a live secret of key id (the anomaly
// detector): from ip, and learn false for a use refused by where or how
// it was made (Result.Watched), and country the address's (""
// without a GeoIP database, UnknownCountry if it does not say). A stop code (Disabled, Revoked) refuses a
// use that would have been valid, with why as its detail: the use that
// set off an alert that stops the key, and those after it until the key
// is changed in the store.
type Watch func(id string, ip netip.Addr, country string, learn bool) (stop Code, why string)

// SetWatch sets the watch; nil takes it away.
func (m *Manager) SetWatch(w Watch) {
	if w == nil {
		m.watch.Store(nil)
		return
	}
	m.watch.Store(&w)
}

// watched is res after the watch heard of it.
func (m *Manager) watched(id string, res Result, req Request) Result {
	w := m.watch.Load()
	if w == nil {
		return res
	}
	watch, learn := watchedCode(res.Code)
	if !watch {
		return res
	}
	if stop, why := (*w)(id, req.SourceIP, req.country, learn); stop != "" && res.Code == Valid {
		res.Code, res.Detail = stop, why
	}
	return res
}

// answer is what Verify hands out of a record: a deep copy (the record may
// be the record cache's, and its quota the pending one), without secrets.
func answer(rec *Record) *Record {
	out := *rec
	out.Secrets, out.Shared = nil, nil
	if rec.Quota != nil {
		q := *rec.Quota
		out.Quota = &q
	}
	out.Permissions, out.Tags = slices.Clone(rec.Permissions), slices.Clone(rec.Tags)
	out.Limits, out.AllowedIPs = slices.Clone(rec.Limits), slices.Clone(rec.AllowedIPs)
	out.AllowedCountries = slices.Clone(rec.AllowedCountries)
	out.Metadata = maps.Clone(rec.Metadata)
	return &out
}

// flushQuotas writes the quotas used since the last flush into their
// records, writeBatch keys a transaction, holding the lock verifies need
// for one transaction at a time.
func (m *Manager) flushQuotas() error {
	m.mu.Lock()
	ids := slices.Sorted(maps.Keys(m.quotas))
	m.mu.Unlock()
	batch := m.writeBatch(1)
	for lo := 0; lo < len(ids); lo += batch {
		if err := m.flushQuotaBatch(ids[lo:min(lo+batch, len(ids))]); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) flushQuotaBatch(ids []string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	// A change saved some quotas with their records meanwhile.
	ids = slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return m.quotas[id] == nil })
	m.forget(ids...)
	err := m.store.UpdateEach(store.BucketAPIKeys, ids, func(id string, old []byte) ([]byte, error) {
		rec, err := decode(id, old)
		if err != nil {
			return old, nil // left as it is: one bad record must not stop the rest
		}
		rec.Quota = m.quotas[id]
		return json.Marshal(rec)
	})
	if err != nil {
		return err
	}
	for _, id := range ids {
		delete(m.quotas, id)
	}
	return nil
}

// changeEmit applies fn to a key's record and saves it; fn may also name
// an event for the plugins and the watch stream (kind and detail; no kind,
// no event), written in the same transaction. It counts from the very next
// verify: save drops the record from the record cache, and the digest
// cache only points at it.
//
// fn runs in the store's transaction, on the record as the store holds it
// then: in a fleet, a change made on another node a moment before (a
// revocation) is what fn sees, not undone by a copy read earlier.
func (m *Manager) changeEmit(id string, fn func(*Record) (kind, detail string, err error)) (*Record, error) {
	if !idForm.MatchString(id) {
		return nil, fmt.Errorf("%w: not a key ID (ak_ and 24 hex digits; the ID, never the key itself)", ErrInvalid)
	}
	m.forget(id)
	var rec *Record
	err := m.store.UpdateEachEmit(store.BucketAPIKeys, []string{id}, func(_ string, old []byte) ([]byte, [][]byte, error) {
		if old == nil {
			return nil, nil, fmt.Errorf("%w: %q", ErrNotFound, id)
		}
		r, err := decode(id, old)
		if err != nil {
			return nil, nil, err
		}
		if q := m.quotas[id]; q != nil {
			r.Quota = q
		}
		kind, detail, err := fn(r)
		if err != nil {
			return nil, nil, err
		}
		rec = r
		b, err := json.Marshal(r)
		if kind == "" {
			return b, nil, err
		}
		return b, [][]byte{outbox.Encode(outbox.Event{Kind: kind, ID: id, Subject: r.Owner, Time: m.now().UTC(), Detail: detail})}, err
	})
	if err != nil {
		return nil, err
	}
	delete(m.quotas, id) // saved with the record
	// The limiter keeps each period's use across changes of the layers, so
	// no update hands out a fresh bucket; a revoked key needs none.
	if rec.State == StateRevoked {
		m.lim.Forget(id)
	}
	return rec, nil
}

// Revoke revokes a key at once.
func (m *Manager) Revoke(id string) (*Record, error) {
	if _, err := m.load(id); err != nil {
		return nil, err
	}
	if _, err := m.revokeBatch([]string{id}); err != nil {
		return nil, err
	}
	return m.Get(id)
}

// ErrWidens: a caller without admin rights asked for more than the key has.
var ErrWidens = errors.New("apikeys: widening a key needs the right to issue its owner's keys")

// Change is an update of a key; nil fields stay as they are.
type Change struct {
	Permissions []string
	Limits      *[]ratelimit.Layer // &[]ratelimit.Layer{} removes every limit
	AllowedIPs  *[]netip.Prefix    // &[]netip.Prefix{} removes the allowlist
	// AllowedCountries: &[]string{} removes the limit to countries.
	AllowedCountries *[]string
	Expires          *time.Time // &time.Time{} removes the expiry
	State            *State     // Active or StateDisabled; revoke with Revoke
}

// Update changes a key's permissions, limits, allowlist, expiry or state.
// Unless admin, it may only narrow: permissions the key already grants,
// every rate-limit layer kept (same period) with no larger limit or burst,
// allowlist prefixes inside the current ones, an earlier expiry, disabling.
func (m *Manager) Update(id string, c Change, admin bool) (*Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, err := m.changeEmit(id, func(r *Record) (string, string, error) {
		kind, err := m.update(r, c, admin)
		var changed []string
		for _, f := range []struct {
			name string
			set  bool
		}{{"permissions", c.Permissions != nil}, {"limits", c.Limits != nil}, {"allowed_ips", c.AllowedIPs != nil}, {"allowed_countries", c.AllowedCountries != nil}, {"expiry", c.Expires != nil}} {
			if f.set {
				changed = append(changed, f.name)
			}
		}
		if kind == outbox.APIKeyUpdated && len(changed) == 0 {
			kind = "" // nothing a verdict depends on changed: no event
		}
		return kind, strings.Join(changed, ","), err
	})
	if err != nil {
		return nil, err
	}
	return public(rec), nil
}

// update applies c to r, and names the event it makes: api_key_disabled
// or api_key_enabled when the state changes, api_key_updated otherwise.
func (m *Manager) update(r *Record, c Change, admin bool) (string, error) {
	id := r.ID
	kind := outbox.APIKeyUpdated
	if r.State == StateRevoked {
		return "", fmt.Errorf("%w: %q is revoked; create a new key", ErrInvalid, id)
	}
	old := *r
	if c.Permissions != nil {
		r.Permissions = c.Permissions
	}
	if c.Limits != nil {
		r.Limits = *c.Limits
	}
	if c.AllowedIPs != nil {
		r.AllowedIPs = *c.AllowedIPs
	}
	if c.AllowedCountries != nil {
		if err := m.checkGeo(*c.AllowedCountries); err != nil {
			return "", err
		}
		r.AllowedCountries = *c.AllowedCountries
	}
	if c.Expires != nil {
		r.Expires = *c.Expires
	}
	if c.State != nil {
		if *c.State != Active && *c.State != StateDisabled {
			return "", fmt.Errorf("%w: a key's state changes to active or disabled (revoke with RevokeAPIKey)", ErrInvalid)
		}
		switch {
		case r.State != StateDisabled && *c.State == StateDisabled:
			kind = outbox.APIKeyDisabled
		case r.State == StateDisabled && *c.State == Active:
			kind = outbox.APIKeyEnabled
		}
		r.State = *c.State
	}
	if c.Expires != nil || c.Permissions != nil || c.Limits != nil || c.AllowedIPs != nil || c.AllowedCountries != nil {
		if err := m.check(Spec{Owner: r.Owner, Name: r.Name, Environment: r.Environment, Permissions: r.Permissions,
			Expires: r.Expires, AllowedIPs: r.AllowedIPs, AllowedCountries: r.AllowedCountries, Limits: r.Limits}); err != nil {
			return "", err
		}
	}
	if admin {
		return kind, nil
	}
	return kind, narrows(&old, r)
}

// narrows says why now grants more than was, or nil.
func narrows(was, now *Record) error {
	for _, p := range now.Permissions {
		pats := Roles[p]
		if pats == nil {
			pats = []string{p}
		}
		for _, pat := range pats {
			if !was.Grants(pat) {
				return fmt.Errorf("%w: the key does not grant %q now", ErrWidens, pat)
			}
		}
	}
	for _, l := range was.Limits {
		if !slices.ContainsFunc(now.Limits, func(n ratelimit.Layer) bool {
			return n.Per == l.Per && n.Limit <= l.Limit && n.Burst <= l.Burst
		}) {
			return fmt.Errorf("%w: the rate limit of %d per %v is raised or removed", ErrWidens, l.Limit, l.Per)
		}
	}
	if len(was.AllowedIPs) > 0 {
		if len(now.AllowedIPs) == 0 {
			return fmt.Errorf("%w: the allowlist is removed", ErrWidens)
		}
		for _, n := range now.AllowedIPs {
			if !slices.ContainsFunc(was.AllowedIPs, func(o netip.Prefix) bool { return o.Bits() <= n.Bits() && o.Contains(n.Addr()) }) {
				return fmt.Errorf("%w: %v is outside the allowlist", ErrWidens, n)
			}
		}
	}
	if len(was.AllowedCountries) > 0 {
		if len(now.AllowedCountries) == 0 {
			return fmt.Errorf("%w: the limit to countries is removed", ErrWidens)
		}
		for _, c := range now.AllowedCountries {
			if !slices.Contains(was.AllowedCountries, c) {
				return fmt.Errorf("%w: %s is not among the key's countries", ErrWidens, c)
			}
		}
	}
	if !was.Expires.IsZero() && (now.Expires.IsZero() || now.Expires.After(was.Expires)) {
		return fmt.Errorf("%w: the expiry is later or removed", ErrWidens)
	}
	if was.State == StateDisabled && now.State == Active {
		return fmt.Errorf("%w: the key is enabled again", ErrWidens)
	}
	return nil
}

// Filter picks keys; every field set must match.
type Filter struct {
	Owner, Tag, Environment string
	State                   State
	// All: RevokeWhere takes an empty filter as every key.
	All bool
	// Owners, if set, says which owners' keys the caller may see; the
	// others are passed over as if they did not exist.
	Owners func(owner string) bool
	// Reach says, to whoever set Owners, how to set it again: RevokeWhere
	// records it with its intent, and a resumption hands it back
	// (ResumeRevocations). Opaque here.
	Reach json.RawMessage

	// owners, if set, are the only owners whose keys match (a resumption:
	// those the caller reached when it asked); issued, if set, the latest
	// a matching key was issued.
	owners map[string]bool
	issued time.Time
}

func (f Filter) matches(r *Record) bool {
	return (f.Owner == "" || r.Owner == f.Owner) && (f.Environment == "" || r.Environment == f.Environment) &&
		(f.Tag == "" || slices.Contains(r.Tags, f.Tag)) && (f.State == "" || r.State == f.State) &&
		(f.Owners == nil || f.Owners(r.Owner)) && (f.owners == nil || f.owners[r.Owner]) &&
		(f.issued.IsZero() || !r.Created.After(f.issued))
}

// RevokeWhere revokes every key not yet revoked that the filter picks (or,
// with dryRun, only counts them) and returns the count. The filter must name
// an owner, tag or environment.
//
// A revocation of many keys takes many transactions (store.BatchKeys), so
// it records its intent first (intents.go): one cut short (keywardd killed,
// the store lost) is finished by ResumeRevocations, never left half done.
func (m *Manager) RevokeWhere(f Filter, dryRun bool) (int, error) {
	if empty := f.Owner == "" && f.Tag == "" && f.Environment == ""; empty != f.All {
		return 0, fmt.Errorf("%w: name an owner, tag or environment, or all keys (and not both)", ErrInvalid)
	}
	ids, owners, err := m.matchingOwners(f)
	if err != nil || dryRun {
		return len(ids), err
	}
	in, err := m.recordIntent(f, owners)
	if err != nil {
		return 0, err
	}
	defer m.doneIntent(in)
	n, err := m.revokeWhere(f, ids, in)
	if err != nil {
		return n, fmt.Errorf("%w (%d revoked; the rest is recorded, and keywardd finishes it)", err, n)
	}
	m.dropIntent(in.key)
	return n, nil
}

// revokeWhere is RevokeWhere's work, from the first pass's keys (nil: a
// scan); it keeps its intent touched (nil: none).
func (m *Manager) revokeWhere(f Filter, ids []string, in *intent) (int, error) {
	// A key issued while a pass runs may escape its scan: scan again until
	// a pass finds none (a few passes at most; more only if keys matching
	// the filter keep being issued).
	total := 0
	for pass := 0; pass < 4; pass++ {
		if pass > 0 || ids == nil {
			var err error
			if ids, err = m.matching(f); err != nil {
				return total, err
			}
		}
		if len(ids) == 0 {
			break
		}
		batch := m.writeBatch(2) // a record and its event each
		for lo := 0; lo < len(ids); lo += batch {
			n, err := m.revokeBatch(ids[lo:min(lo+batch, len(ids))])
			total += n
			if err != nil {
				return total, err
			}
			m.touchIntent(in)
		}
	}
	return total, nil
}

// writeBatch is how many records RevokeWhere and flushQuotas write in one
// transaction, one sync, holding the lock every verify needs: a few
// milliseconds' wait; fewer where the store takes fewer (etcd).
func (m *Manager) writeBatch(opsPerKey int) int {
	return min(maxWriteBatch, store.BatchKeys(m.store, opsPerKey))
}

const maxWriteBatch = 1000

// matchingOwners is matching, and the owners of the keys it lists.
func (m *Manager) matchingOwners(f Filter) ([]string, map[string]bool, error) {
	owners := map[string]bool{}
	g := f
	g.Owners = func(o string) bool {
		ok := f.Owners == nil || f.Owners(o)
		if ok && len(owners) <= maxIntentOwners {
			owners[o] = true
		}
		return ok
	}
	ids, err := m.matching(g)
	return ids, owners, err
}

// matching lists the keys not yet revoked that f picks. It reads a snapshot
// without holding m.mu, so verifies go on; the owner, tags and environment
// it matches on never change.
func (m *Manager) matching(f Filter) ([]string, error) {
	var ids []string
	err := m.store.ForEachAfter(store.BucketAPIKeys, "", func(id string, b []byte) error {
		r, err := decode(id, b)
		if err != nil {
			return err
		}
		if r.State != StateRevoked && f.matches(r) {
			ids = append(ids, id)
		}
		return nil
	})
	return ids, err
}

// revokeBatch revokes keys in one transaction and says how many it revoked
// (a key revoked meanwhile is not counted again).
func (m *Manager) revokeBatch(ids []string) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forget(ids...)
	n := 0
	now := m.now().UTC()
	err := m.store.UpdateEachEmit(store.BucketAPIKeys, ids, func(id string, old []byte) ([]byte, [][]byte, error) {
		rec, err := decode(id, old)
		if err != nil || rec.State == StateRevoked {
			return old, nil, nil // gone, unreadable or revoked: nothing to do
		}
		if q := m.quotas[id]; q != nil {
			rec.Quota = q
		}
		rec.State = StateRevoked
		n++
		b, err := json.Marshal(rec)
		// The revocation and its event for the plugins, in one transaction.
		return b, [][]byte{outbox.Encode(outbox.Event{Kind: outbox.APIKeyRevoked, ID: id, Subject: rec.Owner, Time: now})}, err
	})
	if err != nil {
		return 0, err
	}
	for _, id := range ids {
		delete(m.quotas, id) // saved with the record
		m.lim.Forget(id)
	}
	return n, nil
}

// Notice changes a key and announces it to the plugins in one transaction:
// fn changes the record (nil: no change) and returns what to add to the
// event's detail, which is written back through out if set. An empty kind
// changes the key without an event.
func (m *Manager) Notice(id, kind, eventID, detail string, fn func(*Record) (string, error), out *string) (*Record, error) {
	if _, err := m.load(id); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forget(id)
	var rec *Record
	err := m.store.UpdateEachEmit(store.BucketAPIKeys, []string{id}, func(id string, old []byte) ([]byte, [][]byte, error) {
		r, err := decode(id, old)
		if err != nil {
			return nil, nil, err
		}
		if q := m.quotas[id]; q != nil {
			r.Quota = q
		}
		d := detail
		if fn != nil {
			more, err := fn(r)
			if err != nil {
				return nil, nil, err
			}
			d += more
		}
		if out != nil {
			*out = d
		}
		rec = r
		b, err := json.Marshal(r)
		if kind == "" {
			return b, nil, err
		}
		return b, [][]byte{outbox.Encode(outbox.Event{Kind: kind, ID: eventID, Subject: r.Owner, Time: m.now().UTC(), Detail: d})}, err
	})
	if err != nil {
		return nil, err
	}
	delete(m.quotas, id) // saved with the record
	return public(rec), nil
}

// NoticeExpiring writes an api_key_expiring event, for the watch stream
// and the plugins, for each active key that expires within the coming
// within and has had none for that expiry; it returns their IDs.
func (m *Manager) NoticeExpiring(within time.Duration) ([]string, error) {
	now := m.now()
	var due []string
	err := m.store.ForEach(store.BucketAPIKeys, "", func(id string, b []byte) error {
		r, err := decode(id, b)
		if err != nil {
			return nil // an unreadable record is reported where it is used
		}
		if r.State == Active && !r.Expires.IsZero() && r.Expires.Sub(now) <= within && r.Expires.After(now) && !r.ExpiryNoticed.Equal(r.Expires) {
			due = append(due, id)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var done []string
	for _, id := range due {
		_, err := m.Notice(id, outbox.APIKeyExpiring, id, "", func(r *Record) (string, error) {
			if r.ExpiryNoticed.Equal(r.Expires) {
				return "", errNoticed
			}
			r.ExpiryNoticed = r.Expires
			return "expires " + r.Expires.UTC().Format(time.RFC3339), nil
		}, nil)
		switch {
		case errors.Is(err, errNoticed):
		case err != nil:
			return done, err
		default:
			done = append(done, id)
		}
	}
	return done, nil
}

// errNoticed: another node of a fleet wrote the notice meanwhile.
var errNoticed = errors.New("apikeys: noticed already")

// ErrRotatedMeanwhile: the key got a new secret after the one a rotation
// notice was for; the notice is moot.
var ErrRotatedMeanwhile = errors.New("apikeys: the key was rotated meanwhile")

// RotationDue tells the plugins (if notify) that a key, whose newest
// secret was made at last, is due for rotation; a non-zero deadline also
// ends then the secrets made up to last (a forced rotation: the owner
// rotates before it, or the key stops working). An earlier deadline stays;
// the notice names the one in force. It returns the notice's detail. A key
// rotated since last is left alone (ErrRotatedMeanwhile): a secret made
// after the notice was decided never gets its deadline.
func (m *Manager) RotationDue(id string, last, deadline time.Time, detail string, notify bool) (string, error) {
	kind := outbox.RotationDue
	if !notify {
		kind = ""
	}
	var out string
	_, err := m.Notice(id, kind, "api_key/"+id, detail, func(r *Record) (string, error) {
		if r.State == StateRevoked {
			return "", fmt.Errorf("%w: %q is revoked", ErrInvalid, id)
		}
		if n := len(r.Secrets); n > 0 && r.Secrets[n-1].Created.After(last) {
			return "", ErrRotatedMeanwhile
		}
		if deadline.IsZero() || len(r.Secrets) == 0 {
			return "", nil
		}
		for i := range r.Secrets {
			if s := &r.Secrets[i]; !s.Created.After(last) && (s.NotAfter.IsZero() || deadline.Before(s.NotAfter)) {
				s.NotAfter = deadline.UTC()
			}
		}
		// The newest secret's end: the one the owner uses (older ones may
		// have ended long ago).
		return fmt.Sprintf(" before %s, when its current secret stops working", r.Secrets[len(r.Secrets)-1].NotAfter.UTC().Format(time.RFC3339)), nil
	}, &out)
	return out, err
}

// Bounds on a key's secrets: a rotated-out secret is still recognized (as
// EXPIRED, not NOT_FOUND) for RotatedGrace after its overlap ends, and a key
// keeps at most MaxSecrets, the newest; a rotation prunes the rest, so
// rotating daily for years does not grow the record every verify reads.
const (
	RotatedGrace = 30 * 24 * time.Hour
	MaxSecrets   = 8
)

// Overlaps by risk level: how long an old secret keeps working after a
// rotation.
var Overlaps = map[string]time.Duration{"high": 24 * time.Hour, "moderate": 48 * time.Hour}

// Rotate gives a key a new secret, returned here and never again; the old
// ones keep working for overlap, then get EXPIRED. An overlap of 0 stops
// them at once (a leaked key); Overlaps has the defaults by risk level.
func (m *Manager) Rotate(ctx context.Context, id string, overlap time.Duration) (string, *Record, error) {
	if overlap < 0 {
		return "", nil, fmt.Errorf("%w: a negative overlap", ErrInvalid)
	}
	secret, err := Generate(m.prefix, rand.Reader)
	if err != nil {
		return "", nil, err
	}
	mac, err := m.mac.HMACSHA256(ctx, m.pepper, []byte(secret))
	if err != nil {
		return "", nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now().UTC()
	// The new secret's hint and index first (a change's function may not
	// write to the store); an index entry whose record never names it
	// finds nothing.
	if err := m.indexSecrets([]*Record{{ID: id}}, []string{secret}, [][]byte{mac}); err != nil {
		return "", nil, err
	}
	var pruned []string
	rec, err := m.changeEmit(id, func(r *Record) (string, string, error) {
		err := m.rotate(r, now, overlap, mac, &pruned)
		return outbox.APIKeyRotated, fmt.Sprintf("the old secrets work until %s", now.Add(overlap).Format(time.RFC3339)), err
	})
	if err != nil {
		return "", nil, err
	}
	// The record no longer holds the pruned MACs, so their index entries
	// find nothing; removing them only saves space, and a failure here
	// leaves nothing unsafe behind.
	if len(pruned) > 0 {
		slices.Sort(pruned)
		_ = m.store.UpdateEach(store.BucketAPIKeyMACs, pruned, func(string, []byte) ([]byte, error) { return nil, nil })
	}
	return secret, public(rec), nil
}

// rotate gives r the new secret mac, the old ones ending within overlap;
// the MACs of secrets dropped go to pruned.
func (m *Manager) rotate(r *Record, now time.Time, overlap time.Duration, mac []byte, pruned *[]string) error {
	id := r.ID
	if r.State == StateRevoked {
		return fmt.Errorf("%w: %q is revoked", ErrInvalid, id)
	}
	kept := r.Secrets[:0:0]
	working := 0
	for _, s := range r.Secrets {
		if end := now.Add(overlap); s.NotAfter.IsZero() || end.Before(s.NotAfter) {
			s.NotAfter = end
		}
		switch {
		case s.NotAfter.After(now):
			working++
			kept = append(kept, s)
		case now.Sub(s.NotAfter) < RotatedGrace:
			kept = append(kept, s)
		default:
			*pruned = append(*pruned, hex.EncodeToString(s.MAC))
		}
	}
	if working > MaxSecrets-1 {
		return fmt.Errorf("%w: %q has %d secrets still in their overlap, the most a key keeps; rotate with a shorter overlap (0 ends the old ones now)", ErrInvalid, id, working)
	}
	// Room for the new one: the secrets that stopped working go first,
	// oldest first; none still in its overlap.
	for i := 0; len(kept) > MaxSecrets-1; {
		if kept[i].NotAfter.After(now) {
			i++
			continue
		}
		*pruned = append(*pruned, hex.EncodeToString(kept[i].MAC))
		kept = slices.Delete(kept, i, i+1)
	}
	r.Secrets = append(kept, Secret{MAC: mac, Created: now})
	return nil
}
