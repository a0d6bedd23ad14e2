// Package credentials is keyward's managed credentials: secrets of external
// systems (a database role's password, a webhook's key) that a plugin
// rotates and keywardd hands to the applications the policy allows. Their
// secrets are kept sealed (envelope encryption under a key in the HSM,
// bound to the credential's name).
//
// A rotation is a persisted state machine, saved to the store before each
// step it starts: a new secret is generated and sealed (pending), then the
// plugin Creates the new credential beside the current one (created), Tests
// it (tested), and Activates it; only then does it become current, and the
// previous one is Retired after the overlap. A crash of keywardd or of the
// plugin at any point resumes from the saved step with the same operation ID
// and the same secret, so each step is retried, never repeated with other
// data, and the current credential keeps working until a tested one
// replaces it. A permanent failure before activation abandons the rotation
// (the plugin is asked to retire what it created) and keeps the current one.
//
// Written here: no library runs rotation state machines over a plugin.
package credentials

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/names"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
)

// Errors of the Manager.
var (
	ErrNotFound = errors.New("credentials: no such credential")
	ErrExists   = errors.New("credentials: a credential of that name exists")
	ErrInvalid  = errors.New("credentials: invalid argument")
	ErrRevoked  = errors.New("credentials: the credential is revoked")
	// ErrPermanent marks a plugin's failure that retrying will not mend.
	ErrPermanent = errors.New("credentials: permanent failure")
	// ErrUnavailable marks a plugin that cannot be reached now (starting,
	// restarting, too slow): the step is retried.
	ErrUnavailable = errors.New("credentials: plugin unavailable")
	// ErrNoPlugin: the credential's plugin is not configured (now): its
	// steps wait for it, and nothing is taken as done.
	ErrNoPlugin = errors.New("credentials: no such plugin")
	// ErrNoSecret: the credential has no current secret yet (its first
	// rotation has not finished).
	ErrNoSecret = errors.New("credentials: no current secret yet")
)

// Credential is what a plugin is told about a credential.
type Credential struct {
	Name   string
	Config json.RawMessage
}

// SecretSpec is what secrets a plugin takes.
type SecretSpec struct {
	Length          int
	Alphabet        string
	PluginGenerates bool
}

// Rotator is what the Manager needs of plugins, by plugin name. An error
// wrapping ErrPermanent is not retried.
type Rotator interface {
	SecretSpec(plugin string) (SecretSpec, error)
	CheckConfig(ctx context.Context, plugin string, c Credential) error
	Create(ctx context.Context, plugin, op string, c Credential, secret []byte, current string) (handle string, generated []byte, err error)
	Test(ctx context.Context, plugin, op string, c Credential, handle string, secret []byte) error
	Activate(ctx context.Context, plugin, op string, c Credential, handle, previous string) error
	Retire(ctx context.Context, plugin, op string, c Credential, handle string) error
}

// Sealer seals and opens secrets, bound to the credential's name.
type Sealer interface {
	Seal(ctx context.Context, name string, secret []byte) ([]byte, error)
	Open(ctx context.Context, name string, sealed []byte) ([]byte, error)
}

// Store is what the Manager needs of the store.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	UpdateEachEmit(bucket string, keys []string, fn func(key string, old []byte) (rec []byte, events [][]byte, err error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
}

// State is whether a credential is in use.
type State string

const (
	Active  State = "active"
	Revoked State = "revoked"
)

// Step is how far a rotation got.
type Step string

const (
	StepNew     Step = "new"     // secret made and sealed; Create not known to be done
	StepCreated Step = "created" // Create done
	StepTested  Step = "tested"  // Test done; Activate next
)

// Record is a credential as the store keeps it.
type Record struct {
	Name           string          `json:"name"`
	Plugin         string          `json:"plugin"`
	Config         json.RawMessage `json:"config"`
	RotationPeriod time.Duration   `json:"rotation_period"`
	Overlap        time.Duration   `json:"overlap"`
	State          State           `json:"state"`
	Created        time.Time       `json:"created"`
	Current        *Version        `json:"current,omitempty"`
	Previous       *Version        `json:"previous,omitempty"` // until its RetireAt
	Pending        *Rotation       `json:"pending,omitempty"`
	// Failures counts the failed attempts since the last success; the
	// next is not before RetryAt.
	Failures  int       `json:"failures,omitempty"`
	RetryAt   time.Time `json:"retry_at,omitzero"`
	LastError string    `json:"last_error,omitempty"`

	// stored is the record as the store held it when this one was read or
	// last written (nil: new): a save requires the store to hold it still.
	stored []byte
}

// Version is a credential's secret as the plugin made it.
type Version struct {
	Handle    string    `json:"handle"`
	Sealed    []byte    `json:"sealed,omitempty"`
	Activated time.Time `json:"activated"`
	RetireAt  time.Time `json:"retire_at,omitzero"`
	// RetireOp is the operation ID of this version's retirement, named
	// after the rotation that replaced it: a plugin whose handles take
	// turns sees a new ID for each retirement.
	RetireOp string `json:"retire_op,omitempty"`
}

// retireOp is the operation ID that retires v.
func retireOp(v *Version) string {
	if v.RetireOp != "" {
		return v.RetireOp
	}
	return "retire-" + v.Handle // records from before RetireOp
}

// Rotation is a rotation under way.
type Rotation struct {
	OperationID string    `json:"operation_id"`
	Step        Step      `json:"step"`
	Handle      string    `json:"handle,omitempty"`
	Sealed      []byte    `json:"sealed,omitempty"`
	Started     time.Time `json:"started"`
}

// NextRotation is when the credential is due for its next rotation.
func (r *Record) NextRotation() time.Time {
	if r.Current == nil || r.RotationPeriod <= 0 {
		return time.Time{}
	}
	return r.Current.Activated.Add(r.RotationPeriod)
}

// public is a copy without sealed secrets.
func (r *Record) public() *Record {
	out := *r
	strip := func(v *Version) *Version {
		if v == nil {
			return nil
		}
		c := *v
		c.Sealed = nil
		return &c
	}
	out.Current, out.Previous = strip(r.Current), strip(r.Previous)
	if r.Pending != nil {
		p := *r.Pending
		p.Sealed = nil
		out.Pending = &p
	}
	return &out
}

// Spec is a credential to register.
type Spec struct {
	Name, Plugin   string
	Config         json.RawMessage
	RotationPeriod time.Duration // 0: only when asked
	Overlap        time.Duration // how long the previous one keeps working
}

var nameForm = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,127}$`)

// Bounds.
const (
	maxConfig  = 16 << 10
	MaxOverlap = 30 * 24 * time.Hour
	// MinPeriod is the shortest rotation period.
	MinPeriod = time.Minute
)

// Manager keeps managed credentials and runs their rotations.
type Manager struct {
	store   Store
	plugins Rotator
	sealer  Sealer
	now     func() time.Time

	mu    sync.Mutex
	locks map[string]*sync.Mutex // one rotation of a credential at a time
}

// New returns a Manager.
func New(s Store, p Rotator, sl Sealer, now func() time.Time) *Manager {
	if now == nil {
		now = time.Now
	}
	return &Manager{store: s, plugins: p, sealer: sl, now: now, locks: map[string]*sync.Mutex{}}
}

// lock serializes the changes of one credential: in this process, and on
// a store other processes share (a fleet), across them too; the record
// read next has every change the last holder made.
func (m *Manager) lock(ctx context.Context, name string) (func(), error) {
	m.mu.Lock()
	l := m.locks[name]
	if l == nil {
		l = &sync.Mutex{}
		m.locks[name] = l
	}
	m.mu.Unlock()
	l.Lock()
	fl, ok := m.store.(store.Locker)
	if !ok {
		return l.Unlock, nil
	}
	release, err := fl.Lock(ctx, "credentials/"+name)
	if err != nil {
		l.Unlock()
		return nil, err
	}
	return func() { release(); l.Unlock() }, nil
}

func (m *Manager) load(name string) (*Record, error) {
	if !nameForm.MatchString(name) {
		return nil, fmt.Errorf("%w: a credential name is 1 to 128 of a-z 0-9 . _ -", ErrInvalid)
	}
	b, err := m.store.Get(store.BucketCredentials, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("credentials: the record of %q does not parse: %w", name, err)
	}
	r.stored = b
	return &r, nil
}

// ErrChanged: a credential's record changed in the store since it was
// read under the credential's lock: another node of a fleet took the lock
// (this one was cut off from etcd for longer than its lease) and moved the
// credential on. Nothing was written; the next maintenance reads it again.
var ErrChanged = errors.New("credentials: the record changed under this node (another node took over the credential); nothing was written")

// put writes r, with events, if the store holds what r was read from.
func (m *Manager) put(r *Record, events [][]byte) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	err = m.store.UpdateEachEmit(store.BucketCredentials, []string{r.Name}, func(_ string, old []byte) ([]byte, [][]byte, error) {
		if !bytes.Equal(old, r.stored) {
			return nil, nil, ErrChanged
		}
		return b, events, nil
	})
	if err == nil {
		r.stored = b
	}
	return err
}

func (m *Manager) save(r *Record) error { return m.put(r, nil) }

func cred(r *Record) Credential { return Credential{Name: r.Name, Config: r.Config} }

// canonical is a JSON configuration with its keys sorted and no spacing,
// for comparing two.
func canonical(raw json.RawMessage) string {
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return string(raw)
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// Register records a credential and runs its first rotation. If the
// rotation fails for now, the credential stays registered and the rotation
// is resumed later; the error says why. Its name must be canonical
// (daemon/names); credentials registered under other names before that
// rule are served as ever.
func (m *Manager) Register(ctx context.Context, s Spec) (*Record, error) {
	// The characters first, in the canonical form, so that "Orders-DB" is
	// told to be "orders-db", then the form.
	if !nameForm.MatchString(names.Canonical(s.Name)) {
		return nil, fmt.Errorf("%w: a credential name is 1 to 128 of a-z 0-9 . _ -", ErrInvalid)
	}
	if err := names.Check("credential name", s.Name); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	switch {
	case s.Plugin == "":
		return nil, fmt.Errorf("%w: name the plugin that rotates it", ErrInvalid)
	case len(s.Config) > maxConfig || (len(s.Config) > 0 && !json.Valid(s.Config)):
		return nil, fmt.Errorf("%w: the plugin configuration must be JSON of at most %d bytes", ErrInvalid, maxConfig)
	case s.RotationPeriod != 0 && s.RotationPeriod < MinPeriod:
		return nil, fmt.Errorf("%w: a rotation period of at least %v, or none", ErrInvalid, MinPeriod)
	case s.Overlap < 0 || s.Overlap > MaxOverlap:
		return nil, fmt.Errorf("%w: an overlap from 0 to %v", ErrInvalid, MaxOverlap)
	case s.RotationPeriod != 0 && s.Overlap >= s.RotationPeriod:
		return nil, fmt.Errorf("%w: the overlap must be shorter than the rotation period", ErrInvalid)
	}
	if len(s.Config) == 0 {
		s.Config = json.RawMessage("{}")
	}
	r := &Record{Name: s.Name, Plugin: s.Plugin, Config: s.Config, RotationPeriod: s.RotationPeriod, Overlap: s.Overlap, State: Active, Created: m.now().UTC()}
	if err := m.plugins.CheckConfig(ctx, s.Plugin, cred(r)); err != nil {
		return nil, err
	}
	unlock, err := m.lock(ctx, s.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := m.load(s.Name); err == nil {
		return nil, fmt.Errorf("%w: %q", ErrExists, s.Name)
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	// One credential per thing in the external system: a second one on
	// the same configuration would rotate the first's login or file
	// behind its back (and hand its secret to whoever may get the second).
	others, err := m.List()
	if err != nil {
		return nil, err
	}
	for _, o := range others {
		if o.State != Revoked && o.Plugin == s.Plugin && canonical(o.Config) == canonical(s.Config) {
			return nil, fmt.Errorf("%w: credential %q already manages this %s configuration", ErrExists, o.Name, s.Plugin)
		}
	}
	if err := m.save(r); err != nil {
		return nil, err
	}
	return m.rotateLocked(ctx, r)
}

// Rotate rotates a credential now: it starts a rotation, or resumes the one
// under way, and runs it to its activation.
func (m *Manager) Rotate(ctx context.Context, name string) (*Record, error) {
	unlock, err := m.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	r, err := m.load(name)
	if err != nil {
		return nil, err
	}
	return m.rotateLocked(ctx, r)
}

func (m *Manager) rotateLocked(ctx context.Context, r *Record) (*Record, error) {
	if r.State == Revoked {
		return nil, fmt.Errorf("%w: %q", ErrRevoked, r.Name)
	}
	if r.Pending == nil && r.Previous != nil {
		// A new rotation ends the previous version's overlap early: the
		// plugin may reuse what it names (a role of two that alternate),
		// and a version dropped from the record unretired would work for
		// ever. The current version keeps working.
		if err := m.plugins.Retire(ctx, r.Plugin, retireOp(r.Previous), cred(r), r.Previous.Handle); err != nil {
			err = fmt.Errorf("retiring the previous version before a new rotation: %w", err)
			m.failed(r, err)
			m.save(r)
			return r.public(), err
		}
		r.Previous = nil
		if err := m.save(r); err != nil {
			return nil, err
		}
	}
	if r.Pending == nil {
		spec, err := m.plugins.SecretSpec(r.Plugin)
		if err != nil {
			return r.public(), err
		}
		p := &Rotation{OperationID: "rot-" + randomHex(12), Step: StepNew, Started: m.now().UTC()}
		if !spec.PluginGenerates {
			secret, err := generate(spec)
			if err != nil {
				return nil, err
			}
			if p.Sealed, err = m.sealer.Seal(ctx, r.Name, secret); err != nil {
				return nil, err
			}
		}
		r.Pending = p
		if err := m.save(r); err != nil { // before the plugin hears of it
			return nil, err
		}
	}
	err := m.advance(ctx, r)
	if err != nil {
		m.failed(r, err)
	}
	if serr := m.save(r); serr != nil && err == nil {
		err = serr
	}
	return r.public(), err
}

// advance runs the pending rotation's remaining steps, saving after each.
func (m *Manager) advance(ctx context.Context, r *Record) error {
	p := r.Pending
	var secret []byte
	if len(p.Sealed) > 0 {
		var err error
		if secret, err = m.sealer.Open(ctx, r.Name, p.Sealed); err != nil {
			return err
		}
	}
	current := ""
	if r.Current != nil {
		current = r.Current.Handle
	}
	for {
		switch p.Step {
		case StepNew:
			handle, generated, err := m.plugins.Create(ctx, r.Plugin, p.OperationID, cred(r), secret, current)
			if err != nil {
				return fmt.Errorf("the plugin's Create: %w", err)
			}
			if len(secret) == 0 {
				if len(generated) == 0 {
					return fmt.Errorf("the plugin's Create: it generates secrets but returned none: %w", ErrPermanent)
				}
				secret = generated
				if p.Sealed, err = m.sealer.Seal(ctx, r.Name, secret); err != nil {
					return err
				}
			}
			p.Handle, p.Step = handle, StepCreated
		case StepCreated:
			if err := m.plugins.Test(ctx, r.Plugin, p.OperationID, cred(r), p.Handle, secret); err != nil {
				return fmt.Errorf("the plugin's Test: %w", err)
			}
			p.Step = StepTested
		case StepTested:
			if err := m.plugins.Activate(ctx, r.Plugin, p.OperationID, cred(r), p.Handle, current); err != nil {
				return fmt.Errorf("the plugin's Activate: %w", err)
			}
			now := m.now().UTC()
			if r.Current != nil {
				r.Previous = r.Current
				r.Previous.RetireAt, r.Previous.RetireOp = now.Add(r.Overlap), p.OperationID+"-retire"
			}
			r.Current = &Version{Handle: p.Handle, Sealed: p.Sealed, Activated: now}
			r.Pending, r.Failures, r.RetryAt, r.LastError = nil, 0, time.Time{}, ""
			// The new version active, with its event (for the watch stream:
			// an application holding the old secret fetches the new one).
			ev := outbox.Encode(outbox.Event{Kind: outbox.CredentialRotated, ID: r.Name, Subject: r.Plugin, Time: now})
			if err := m.put(r, [][]byte{ev}); err != nil {
				return err
			}
			return m.retireDue(ctx, r)
		}
		if err := m.save(r); err != nil {
			return err
		}
	}
}

// failed records a failure: retried later with backoff; a permanent one
// before activation abandons the rotation (its new credential retired).
func (m *Manager) failed(r *Record, err error) {
	r.Failures++
	r.LastError = err.Error()
	r.RetryAt = m.now().Add(backoff(r.Failures))
	if errors.Is(err, ErrPermanent) && r.Pending != nil {
		if r.Pending.Handle != "" {
			// Best effort: a leftover is the plugin's to clean another time.
			m.plugins.Retire(context.Background(), r.Plugin, r.Pending.OperationID+"-abandon", cred(r), r.Pending.Handle)
		}
		r.Pending = nil
	}
}

// backoff is the wait after n failures: 1 minute, doubling, at most 1 hour.
func backoff(n int) time.Duration {
	d := time.Minute
	for i := 1; i < n && d < time.Hour; i++ {
		d *= 2
	}
	return min(d, time.Hour)
}

// retireDue retires the previous credential once its overlap is over.
func (m *Manager) retireDue(ctx context.Context, r *Record) error {
	if r.Previous == nil || m.now().Before(r.Previous.RetireAt) {
		return nil
	}
	if err := m.plugins.Retire(ctx, r.Plugin, retireOp(r.Previous), cred(r), r.Previous.Handle); err != nil {
		return fmt.Errorf("the plugin's Retire: %w", err)
	}
	r.Previous = nil
	return m.save(r)
}

// Get returns a credential and its current secret.
func (m *Manager) Get(ctx context.Context, name string) (*Record, []byte, error) {
	r, err := m.load(name)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case r.State == Revoked:
		return nil, nil, fmt.Errorf("%w: %q", ErrRevoked, name)
	case r.Current == nil:
		return r.public(), nil, fmt.Errorf("%w: %q (see its last error)", ErrNoSecret, name)
	}
	secret, err := m.sealer.Open(ctx, name, r.Current.Sealed)
	if err != nil {
		return nil, nil, err
	}
	return r.public(), secret, nil
}

// Describe returns a credential without its secrets.
func (m *Manager) Describe(name string) (*Record, error) {
	r, err := m.load(name)
	if err != nil {
		return nil, err
	}
	return r.public(), nil
}

// List returns every credential, without secrets, in name order.
func (m *Manager) List() ([]*Record, error) {
	var out []*Record
	err := m.store.ForEach(store.BucketCredentials, "", func(name string, b []byte) error {
		var r Record
		if err := json.Unmarshal(b, &r); err != nil {
			return fmt.Errorf("credentials: the record of %q does not parse: %w", name, err)
		}
		out = append(out, r.public())
		return nil
	})
	return out, err
}

// Revoke retires every credential the plugin made for name (the pending,
// the current and the previous) and forgets their secrets. It is done when
// the plugin has retired them all; a failure leaves the credential revoked
// in keyward and says what is left, and Revoke can be called again.
func (m *Manager) Revoke(ctx context.Context, name string) (*Record, error) {
	unlock, err := m.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	r, err := m.load(name)
	if err != nil {
		return nil, err
	}
	return m.revokeLocked(ctx, r)
}

func (m *Manager) revokeLocked(ctx context.Context, r *Record) (*Record, error) {
	if r.State != Revoked {
		// Revoked in keyward first, with its event for the plugins in the
		// same transaction; then the plugin retires what it made.
		r.State = Revoked
		ev := outbox.Encode(outbox.Event{Kind: outbox.CredentialRevoked, ID: r.Name, Subject: r.Plugin, Time: m.now().UTC()})
		if err := m.put(r, [][]byte{ev}); err != nil {
			return nil, err
		}
	}
	// Each version goes from the record only once the plugin retired it
	// (or said it is gone for good); a plugin that is away, or not
	// configured now, leaves it for the next attempt.
	var errs []error
	retire := func(handle string) bool {
		err := m.plugins.Retire(ctx, r.Plugin, "revoke-"+r.Name+"-"+handle, cred(r), handle)
		if err != nil && !errors.Is(err, ErrPermanent) {
			errs = append(errs, fmt.Errorf("retiring %s: %w", handle, err))
			return false
		}
		return true
	}
	for _, v := range []**Version{&r.Previous, &r.Current} {
		if *v != nil && retire((*v).Handle) {
			*v = nil
		}
	}
	if r.Pending != nil && (r.Pending.Handle == "" || retire(r.Pending.Handle)) {
		r.Pending = nil
	}
	if len(errs) > 0 {
		r.LastError = errors.Join(errs...).Error()
	}
	if err := m.save(r); err != nil {
		return nil, err
	}
	return r.public(), errors.Join(errs...)
}

// Maintain does what is due, for every credential: resumes rotations whose
// retry time came, retires previous credentials past their overlap, and
// finishes revocations. Rotations whose period passed are the scheduler's
// (package schedule), which calls Rotate. It returns the
// names it acted on and the errors it met.
func (m *Manager) Maintain(ctx context.Context) (map[string]error, error) {
	recs, err := m.List()
	if err != nil {
		return nil, err
	}
	done := map[string]error{}
	for _, pub := range recs {
		if acted, err := m.maintain(ctx, pub.Name); acted {
			done[pub.Name] = err
		}
	}
	return done, nil
}

// maintainLockWait bounds maintain's wait for a credential's lock.
const maintainLockWait = 2 * time.Second

// maintain does what is due for one credential, deciding on the record as
// it is under the credential's lock (a list read before may be stale: a
// Register or a Rotate may have just finished).
func (m *Manager) maintain(ctx context.Context, name string) (bool, error) {
	// A short wait: a credential another node is rotating now (its plugin
	// may take a while) is looked at again at the next round, and the
	// others are not held up behind it.
	lctx, cancel := context.WithTimeout(ctx, maintainLockWait)
	unlock, err := m.lock(lctx, name)
	cancel()
	if err != nil {
		return true, err
	}
	defer unlock()
	r, err := m.load(name)
	if err != nil {
		return true, err
	}
	now := m.now()
	if now.Before(r.RetryAt) {
		return false, nil
	}
	switch {
	case r.State == Revoked && (r.Current != nil || r.Previous != nil || r.Pending != nil):
		_, err := m.revokeLocked(ctx, r)
		return true, err
	case r.State == Revoked:
		return false, nil
	case r.Pending != nil, r.Current == nil:
		_, err := m.rotateLocked(ctx, r)
		return true, err
	case r.Previous != nil && !now.Before(r.Previous.RetireAt):
		if err := m.retireDue(ctx, r); err != nil {
			m.failed(r, err)
			m.save(r)
			return true, err
		}
		return true, nil
	}
	return false, nil
}

const defaultAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// generate makes a secret of spec's length and alphabet (uniform: bytes
// past the largest multiple of the alphabet's size are drawn again).
func generate(spec SecretSpec) ([]byte, error) {
	n, alphabet := spec.Length, spec.Alphabet
	if n == 0 {
		n = 32
	}
	if alphabet == "" {
		alphabet = defaultAlphabet
	}
	if n < 16 || n > 1024 || len(alphabet) < 2 || len(alphabet) > 256 || float64(n)*math.Log2(float64(len(alphabet))) < 128 {
		return nil, fmt.Errorf("%w: the plugin asks for secrets of %d characters of %d: keywardd makes 16 to 1024 of 2 to 256, and at least 128 bits", ErrPermanent, n, len(alphabet))
	}
	out := make([]byte, n)
	limit := 256 - 256%len(alphabet)
	buf := make([]byte, 64)
	for i := 0; i < n; {
		if _, err := rand.Read(buf); err != nil {
			return nil, err
		}
		for _, b := range buf {
			if int(b) < limit && i < n {
				out[i] = alphabet[int(b)%len(alphabet)]
				i++
			}
		}
	}
	return out, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
