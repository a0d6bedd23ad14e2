package keys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

type env struct {
	h     *hsm.HSM
	s     *store.Store
	m     *Manager
	clock *clock
	path  string
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func setup(t *testing.T, o Options) *env {
	t.Helper()
	h, _ := hsmtest.Open(t)
	path := filepath.Join(t.TempDir(), "keyward.db")
	s, err := store.Open(path, storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	o.Now = c.Now
	m, err := New(s, h, o)
	if err != nil {
		t.Fatal(err)
	}
	return &env{h: h, s: s, m: m, clock: c, path: path}
}

func TestCreate(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	for _, s := range []Spec{
		{Name: "kek", Purpose: Encrypt, Labels: map[string]string{"team": "payments"}},
		{Name: "jwt", Purpose: Sign},
		{Name: "jwt-ed", Purpose: Sign, Algorithm: hsm.Ed25519},
		{Name: "pepper", Purpose: MAC, RotationPeriod: 90 * 24 * time.Hour},
	} {
		k, err := e.m.Create(ctx, s)
		if err != nil {
			t.Fatalf("Create(%+v): %v", s, err)
		}
		if k.Latest() != 1 || k.State != Enabled || k.MinDecryptionVersion != 1 || !k.Created.Equal(e.clock.Now()) {
			t.Fatalf("created %+v", k)
		}
		got, err := e.m.Get(s.Name)
		if err != nil || got.Algorithm != k.Algorithm || got.Labels["team"] != s.Labels["team"] {
			t.Fatalf("Get = %+v, %v", got, err)
		}
	}
	if _, err := e.h.Signer(ctx, hsm.KeyID{Name: "jwt-ed", Version: 1}); err != nil {
		t.Fatalf("the HSM key of jwt-ed v1: %v", err)
	}
	for _, tc := range []struct {
		spec Spec
		want error
		msg  string
	}{
		{Spec{Name: "kek", Purpose: Encrypt}, ErrExists, `"kek"`},
		{Spec{Name: "bad/name", Purpose: Encrypt}, ErrInvalid, "not allowed"},
		{Spec{Name: "x", Purpose: "wrap"}, ErrInvalid, "use encrypt, sign or hmac"},
		{Spec{Name: "x", Purpose: Encrypt, Algorithm: hsm.Ed25519}, ErrInvalid, "does not serve purpose encrypt"},
		{Spec{Name: "x", Purpose: Encrypt, RotationPeriod: time.Minute}, ErrInvalid, "at least an hour"},
	} {
		if _, err := e.m.Create(ctx, tc.spec); !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("Create(%+v) = %v; want %v saying %q", tc.spec, err, tc.want, tc.msg)
		}
	}
	all, _ := e.m.List()
	if len(all) != 4 || all[0].Name != "jwt" {
		t.Fatalf("List: %d keys, first %q", len(all), all[0].Name)
	}
}

func TestLifecycle(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Create(ctx, Spec{Name: "sig", Purpose: Sign}); err != nil {
		t.Fatal(err)
	}
	if id, err := e.m.ForEncryption(ctx, "kek"); err != nil || id.Version != 1 {
		t.Fatalf("ForEncryption = %v, %v", id, err)
	}
	k, err := e.m.Rotate(ctx, "kek")
	if err != nil || k.Latest() != 2 {
		t.Fatalf("Rotate = %+v, %v", k, err)
	}
	if id, _ := e.m.ForEncryption(ctx, "kek"); id.Version != 2 {
		t.Fatalf("encrypting with v%d after rotation", id.Version)
	}
	for v := uint32(1); v <= 2; v++ {
		if _, err := e.m.ForDecryption("kek", v); err != nil {
			t.Fatalf("decrypt with v%d: %v", v, err)
		}
	}
	if _, err := e.m.ForDecryption("kek", 3); !errors.Is(err, ErrVersion) {
		t.Fatalf("v3: %v", err)
	}
	// Minimum decryption version.
	if _, err := e.m.SetMinDecryptionVersion("kek", 2); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.ForDecryption("kek", 1); !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "below the minimum decryption version 2") {
		t.Fatalf("v1 below the minimum: %v", err)
	}
	for _, v := range []uint32{0, 3} {
		if _, err := e.m.SetMinDecryptionVersion("kek", v); !errors.Is(err, ErrInvalid) {
			t.Fatalf("SetMinDecryptionVersion(%d) = %v", v, err)
		}
	}
	e.m.SetMinDecryptionVersion("kek", 1)
	if _, err := e.m.ForDecryption("kek", 1); err != nil {
		t.Fatalf("v1 back: %v", err)
	}
	// Purpose.
	if _, err := e.m.ForEncryption(ctx, "sig"); !errors.Is(err, ErrWrongPurpose) {
		t.Fatalf("encrypting with a signing key: %v", err)
	}
	// Disabled.
	e.m.SetEnabled("kek", false)
	if _, err := e.m.ForEncryption(ctx, "kek"); !errors.Is(err, ErrDisabled) {
		t.Fatalf("disabled: %v", err)
	}
	if _, err := e.m.ForDecryption("kek", 2); !errors.Is(err, ErrDisabled) {
		t.Fatalf("disabled decrypt: %v", err)
	}
	e.m.SetEnabled("kek", true)
	// Deletion.
	if _, err := e.m.ScheduleDeletion("kek", 24*time.Hour); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a one-day wait: %v", err)
	}
	k, err = e.m.ScheduleDeletion("kek", 0)
	if err != nil || k.State != PendingDeletion || !k.DeletionDate.Equal(e.clock.Now().Add(DefaultDeletionWait)) {
		t.Fatalf("ScheduleDeletion = %+v, %v", k, err)
	}
	for name, err := range map[string]error{
		"encrypt": second(e.m.ForEncryption(ctx, "kek")),
		"decrypt": second(e.m.ForDecryption("kek", 2)),
		"enable":  second(e.m.SetEnabled("kek", true)),
		"rotate":  second(e.m.Rotate(ctx, "kek")),
	} {
		if !errors.Is(err, ErrPendingDeletion) {
			t.Errorf("%s while pending deletion: %v", name, err)
		}
	}
	if k, err := e.m.CancelDeletion("kek"); err != nil || k.State != Disabled || !k.DeletionDate.IsZero() {
		t.Fatalf("CancelDeletion = %+v, %v", k, err)
	}
	e.m.ScheduleDeletion("kek", 8*24*time.Hour)
	if due, _ := e.m.DueForDeletion(); len(due) != 0 {
		t.Fatalf("due %v before the date", due)
	}
	if done, err := e.m.DeleteDue(ctx, "kek"); done || err != nil {
		t.Fatalf("DeleteDue before the date = %v, %v", done, err)
	}
	e.clock.Advance(8*24*time.Hour + time.Second)
	if due, err := e.m.DueForDeletion(); err != nil || len(due) != 1 || due[0] != "kek" {
		t.Fatalf("DueForDeletion = %v, %v", due, err)
	}
	if done, err := e.m.DeleteDue(ctx, "kek"); !done || err != nil {
		t.Fatalf("DeleteDue = %v, %v", done, err)
	}
	if _, err := e.m.Get("kek"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after deletion: %v", err)
	}
	for v := uint32(1); v <= 2; v++ {
		if _, _, err := e.h.Encrypt(ctx, hsm.KeyID{Name: "kek", Version: v}, nil, nil); !errors.Is(err, hsm.ErrKeyNotFound) {
			t.Fatalf("HSM key v%d after deletion: %v", v, err)
		}
	}
}

func second[T any](_ T, err error) error { return err }

// failingStore lets writes succeed `allow` more times, then fails every
// write while failing is set: a disk full, a crash between the HSM and the
// store.
type failingStore struct {
	*store.Store
	failing bool
	allow   int
}

func (f *failingStore) fail() error {
	if f.failing {
		if f.allow == 0 {
			return errors.New("disk full")
		}
		f.allow--
	}
	return nil
}

func (f *failingStore) Update(b, k string, fn func([]byte) ([]byte, error)) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Store.Update(b, k, fn)
}

func (f *failingStore) UpdateEachEmit(b string, ks []string, fn func(string, []byte) ([]byte, [][]byte, error)) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Store.UpdateEachEmit(b, ks, fn)
}

// TestRotateAllOrNothing: when saving the new version fails, the key is as
// it was; the next rotation adopts the HSM key the failed one made (it was
// on record as intended), and never destroys it.
func TestRotateAllOrNothing(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	fs := &failingStore{Store: e.s}
	m, _ := New(fs, e.h, Options{Now: e.clock.Now})
	if _, err := m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	fs.failing, fs.allow = true, 1 // the intent is saved, the new version is not
	if _, err := m.Rotate(ctx, "kek"); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Rotate with a failing store: %v", err)
	}
	fs.failing = false
	k, _ := m.Get("kek")
	if k.Latest() != 1 || k.PendingVersion != 2 {
		t.Fatalf("after a failed rotation: %d versions, pending %d", k.Latest(), k.PendingVersion)
	}
	if id, _ := m.ForEncryption(ctx, "kek"); id.Version != 1 {
		t.Fatalf("encrypting with v%d after a failed rotation", id.Version)
	}
	// The HSM key the failed rotation made: seal something with it to see
	// that the next rotation keeps it rather than making another.
	v2 := hsm.KeyID{Name: "kek", Version: 2}
	nonce, ct, err := e.h.Encrypt(ctx, v2, []byte("x"), nil)
	if err != nil {
		t.Fatalf("the HSM key of the failed rotation: %v", err)
	}
	if k, err := m.Rotate(ctx, "kek"); err != nil || k.Latest() != 2 || k.PendingVersion != 0 {
		t.Fatalf("Rotate after the failure: %+v, %v", k, err)
	}
	if _, err := e.h.Decrypt(ctx, v2, nonce, ct, nil); err != nil {
		t.Fatalf("the adopted v2 is not the key the failed rotation made: %v", err)
	}
	// A failed Create is finished by the next one.
	fs.failing, fs.allow = true, 1
	if _, err := m.Create(ctx, Spec{Name: "new", Purpose: MAC}); err == nil {
		t.Fatal("Create with a failing store succeeded")
	}
	fs.failing = false
	if _, err := m.Get("new"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a half-made key is visible: %v", err)
	}
	if _, err := m.Create(ctx, Spec{Name: "new", Purpose: MAC}); err != nil {
		t.Fatalf("Create after a failed one: %v", err)
	}
}

// TestUnknownHSMKeyRefused: an HSM key the store does not know (the store
// was restored from an older backup) is never used or destroyed.
func TestUnknownHSMKeyRefused(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt})
	backup, _ := e.s.Get(store.BucketKeys, "kek")
	e.m.Rotate(ctx, "kek")
	nonce, ct, _ := e.h.Encrypt(ctx, hsm.KeyID{Name: "kek", Version: 2}, []byte("data under v2"), nil)
	// Restore the older record, as from a backup taken before the rotation.
	e.s.Update(store.BucketKeys, "kek", func([]byte) ([]byte, error) { return backup, nil })
	_, err := e.m.Rotate(ctx, "kek")
	if err == nil || !strings.Contains(err.Error(), "restored from an older backup") {
		t.Fatalf("Rotate over an unknown HSM key: %v", err)
	}
	if _, err := e.m.Rotate(ctx, "kek"); err == nil {
		t.Fatal("a second Rotate adopted the unknown HSM key")
	}
	if pt, err := e.h.Decrypt(ctx, hsm.KeyID{Name: "kek", Version: 2}, nonce, ct, nil); err != nil || string(pt) != "data under v2" {
		t.Fatalf("the unknown HSM key was touched: %v", err)
	}
	// keywardd's own keys may be adopted after the store was lost.
	e.h.CreateKey(ctx, hsm.KeyID{Name: "keyward-audit", Version: 1}, hsm.HMACSHA256)
	for range 2 {
		if _, err := e.m.Create(ctx, Spec{Name: "keyward-audit", Purpose: MAC}); err == nil {
			t.Fatal("Create took over an existing HSM key without Adopt")
		}
	}
	if _, err := e.m.Create(ctx, Spec{Name: "keyward-audit", Purpose: MAC, Adopt: true}); err != nil {
		t.Fatalf("adopting keywardd's own key: %v", err)
	}
}

// TestEncryptionLimit: counts are reserved in blocks, survive a restart
// without going back, and the key rotates before a version's limit.
func TestEncryptionLimit(t *testing.T) {
	e := setup(t, Options{ReserveBlock: 10, EncryptionLimit: 30})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	for i := range 25 {
		id, err := e.m.ForEncryption(ctx, "kek")
		if err != nil || id.Version != 1 {
			t.Fatalf("encryption %d: %v, %v", i, id, err)
		}
	}
	k, _ := e.m.Get("kek")
	if r := k.Versions[0].Reserved; r != 30 {
		t.Fatalf("reserved %d after 25 encryptions in blocks of 10, want 30", r)
	}
	// A restart: the new process starts above every reservation.
	m2, _ := New(e.s, e.h, Options{ReserveBlock: 10, EncryptionLimit: 40, Now: e.clock.Now})
	id, err := m2.ForEncryption(ctx, "kek")
	if err != nil || id.Version != 1 {
		t.Fatalf("after restart: %v, %v", id, err)
	}
	if used, reserved := m2.Counted(id); used != 31 || reserved != 40 {
		t.Fatalf("after restart counted %d of %d, want 31 of 40", used, reserved)
	}
	for range 9 {
		m2.ForEncryption(ctx, "kek")
	}
	// v1 is used up at 40: the next encryption rotates.
	id, err = m2.ForEncryption(ctx, "kek")
	if err != nil || id.Version != 2 {
		t.Fatalf("past the limit: %v, %v; want v2", id, err)
	}
	if k, _ := m2.Get("kek"); k.Latest() != 2 {
		t.Fatalf("%d versions", k.Latest())
	}
	if _, err := New(e.s, e.h, Options{EncryptionLimit: 1 << 32}); err == nil {
		t.Fatal("a limit of 2^32 was accepted")
	}
}

// TestConcurrent: encryptions, decryption checks, rotations and minimum
// changes at once; run with -race.
func TestConcurrent(t *testing.T) {
	e := setup(t, Options{ReserveBlock: 7})
	ctx := context.Background()
	e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt})
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for w := range 6 {
		wg.Go(func() {
			for i := range 40 {
				switch {
				case w == 0 && i%10 == 0:
					if _, err := e.m.Rotate(ctx, "kek"); err != nil {
						errs <- err
					}
				case w == 1 && i%10 == 5:
					k, _ := e.m.Get("kek")
					if _, err := e.m.SetMinDecryptionVersion("kek", k.Latest()); err != nil {
						errs <- err
					}
				default:
					id, err := e.m.ForEncryption(ctx, "kek")
					if err != nil {
						errs <- err
						continue
					}
					if _, err := e.m.ForDecryption("kek", id.Version); err != nil && !errors.Is(err, ErrVersion) {
						errs <- err
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	k, _ := e.m.Get("kek")
	if k.Latest() != 5 {
		t.Fatalf("%d versions after 4 rotations", k.Latest())
	}
}

// TestSigningTimeline: a new signing version is published before it signs;
// the one before signs until then, and stays published while its tokens can
// be valid. Exactly one version signs at any time.
func TestSigningTimeline(t *testing.T) {
	e := setup(t, Options{SignPrePublish: 10 * time.Minute, SignKeepPublished: time.Hour})
	ctx := context.Background()
	start := e.clock.Now()
	k, err := e.m.Create(ctx, Spec{Name: "jwt", Purpose: Sign})
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := k.Signing(start); !ok || v.Number != 1 {
		t.Fatal("the first version does not sign at once")
	}
	e.clock.Advance(time.Hour)
	rot := e.clock.Now()
	k, _ = e.m.Rotate(ctx, "jwt")
	for _, tc := range []struct {
		at        time.Time
		signing   uint32
		published []uint32
	}{
		{rot, 1, []uint32{1, 2}}, // v2 published, v1 still signs
		{rot.Add(10*time.Minute - time.Second), 1, []uint32{1, 2}},
		{rot.Add(10 * time.Minute), 2, []uint32{1, 2}}, // v2 signs, v1 retired but published
		{rot.Add(70*time.Minute - time.Second), 2, []uint32{1, 2}},
		{rot.Add(70 * time.Minute), 2, []uint32{2}}, // v1 removed
	} {
		v, ok := k.Signing(tc.at)
		var pub []uint32
		for _, p := range k.Published(tc.at) {
			pub = append(pub, p.Number)
		}
		if !ok || v.Number != tc.signing || fmt.Sprint(pub) != fmt.Sprint(tc.published) {
			t.Errorf("at rotation+%v: signing v%d, published %v; want v%d, %v", tc.at.Sub(rot), v.Number, pub, tc.signing, tc.published)
		}
	}
	if got := k.Versions[0].SigningState(rot.Add(30 * time.Minute)); got != SigningRetired {
		t.Errorf("v1 half an hour after rotation: %s", got)
	}
	if got := k.Versions[1].SigningState(rot); got != SigningPending {
		t.Errorf("v2 at rotation: %s", got)
	}
	// Withdrawing v1 (raising the minimum) stops it signing at once, even
	// before v2 activates: nothing is signed that the JWKS does not hold.
	k.MinDecryptionVersion = 2
	if _, ok := k.Signing(rot); ok {
		t.Error("a withdrawn version still signs")
	}
	if v, ok := k.Signing(rot.Add(10 * time.Minute)); !ok || v.Number != 2 {
		t.Error("v2 does not sign once active")
	}
	// Encryption keys have no timeline.
	kek, _ := e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt})
	if !kek.Versions[0].ActivateAt.IsZero() {
		t.Error("an encryption key has a signing timeline")
	}
}

// TestVersionRevocationEvents: raising the minimum decryption version, and
// deleting a key, write an event for each version no longer usable, in the
// same transaction, for the plugins (daemon/outbox).
func TestVersionRevocationEvents(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "k", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := e.m.Rotate(ctx, "k"); err != nil {
			t.Fatal(err)
		}
	}
	events := func() []string {
		var ids []string
		e.s.ForEachAfter(store.BucketOutbox, "", func(_ string, b []byte) error {
			var ev outbox.Event
			json.Unmarshal(b, &ev)
			if ev.Kind != outbox.KeyVersionCreated { // TestPanicRotate counts those
				ids = append(ids, ev.Kind+" "+ev.ID)
			}
			return nil
		})
		return ids
	}
	if got := events(); len(got) != 0 {
		t.Fatalf("events before any revocation: %v", got)
	}
	if _, err := e.m.SetMinDecryptionVersion("k", 3); err != nil {
		t.Fatal(err)
	}
	if got := events(); !slices.Equal(got, []string{"key_version k/v1", "key_version k/v2"}) {
		t.Fatalf("after raising the minimum to 3: %v", got)
	}
	if _, err := e.m.ScheduleDeletion("k", MinDeletionWait); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(MinDeletionWait)
	if done, err := e.m.DeleteDue(ctx, "k"); !done || err != nil {
		t.Fatalf("DeleteDue = %v, %v", done, err)
	}
	if got := events(); !slices.Equal(got, []string{"key_version k/v1", "key_version k/v2", "key_version k/v3", "key_version k/v4"}) {
		t.Fatalf("after the deletion: %v", got)
	}
}

// TestPanicRotate: a compromised encryption key gets a new version that
// encrypts at once; the versions in use before are announced to the
// plugins and still decrypt; a dry run counts the same and changes
// nothing. A compromised signing key's new version signs at once and the
// old ones leave the published set.
func TestPanicRotate(t *testing.T) {
	e := setup(t, Options{ReserveBlock: 10, SignPrePublish: 10 * time.Minute, SignKeepPublished: time.Hour})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "k", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := e.m.ForEncryption(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		if _, err := e.m.Rotate(ctx, "k"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.m.ForEncryption(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.SetMinDecryptionVersion("k", 2); err != nil { // v1 already withdrawn: one event
		t.Fatal(err)
	}
	dry, err := e.m.PanicRotate(ctx, "k", true)
	if err != nil {
		t.Fatal(err)
	}
	if dry.NewVersion != 4 || !slices.Equal(dry.Retired, []uint32{2, 3}) || dry.Encryptions != 20 || dry.Withdrawn {
		t.Fatalf("dry run: %+v", dry)
	}
	if k, _ := e.m.Get("k"); k.Latest() != 3 {
		t.Fatal("the dry run rotated")
	}
	got, err := e.m.PanicRotate(ctx, "k", false)
	if err != nil {
		t.Fatal(err)
	}
	if got.NewVersion != 4 || !slices.Equal(got.Retired, dry.Retired) || got.Encryptions != dry.Encryptions || got.Key.Latest() != 4 {
		t.Fatalf("panic: %+v; the dry run said %+v", got, dry)
	}
	if id, err := e.m.ForEncryption(ctx, "k"); err != nil || id.Version != 4 {
		t.Fatalf("encrypting after the panic with %v, %v", id, err)
	}
	if id, err := e.m.ForDecryption("k", 2); err != nil || id.Version != 2 {
		t.Fatalf("v2 must still decrypt (for re-encryption): %v", err)
	}
	var events []outbox.Event
	var created []string
	e.s.ForEachAfter(store.BucketOutbox, "", func(_ string, b []byte) error {
		var ev outbox.Event
		json.Unmarshal(b, &ev)
		if ev.Kind == outbox.KeyVersionCreated {
			created = append(created, ev.ID)
		} else {
			events = append(events, ev)
		}
		return nil
	})
	if fmt.Sprint(created) != "[k/v2 k/v3 k/v4]" {
		t.Errorf("key_version_created events %v; want one per new version", created)
	}
	if len(events) != 3 || events[1].ID != "k/v2" || events[2].ID != "k/v3" || !strings.Contains(events[2].Detail, "panic-rotate") || events[2].Kind != outbox.KeyVersionRetired || events[0].Kind != outbox.KeyVersionRevoked {
		t.Fatalf("events %+v", events)
	}

	if _, err := e.m.Create(ctx, Spec{Name: "s", Purpose: Sign, Algorithm: hsm.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Rotate(ctx, "s"); err != nil { // v2 pending, v1 signing
		t.Fatal(err)
	}
	p, err := e.m.PanicRotate(ctx, "s", false)
	if err != nil || !p.Withdrawn || !slices.Equal(p.Retired, []uint32{1, 2}) {
		t.Fatalf("signing panic: %+v, %v", p, err)
	}
	now := e.clock.Now()
	if v, ok := p.Key.Signing(now); !ok || v.Number != 3 {
		t.Fatalf("signing after the panic with %+v, %v; want v3 at once", v, ok)
	}
	if pub := p.Key.Published(now); len(pub) != 1 || pub[0].Number != 3 {
		t.Fatalf("published after the panic: %+v; want v3 alone", pub)
	}
	if _, err := e.m.PanicRotate(ctx, "nope", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
}

// TestPanicRotateFinishedAfterCrash: a panic-rotate that died after the HSM
// key was made is finished by whatever adopts the version next, even a
// scheduled Rotate: the old versions are withdrawn, not left signing.
func TestPanicRotateFinishedAfterCrash(t *testing.T) {
	e := setup(t, Options{SignPrePublish: 10 * time.Minute, SignKeepPublished: time.Hour})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "s", Purpose: Sign, Algorithm: hsm.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	// What PanicRotate leaves if it dies between the HSM key and the record.
	if _, err := e.m.change("s", func(k *Key) error { k.PendingVersion, k.PendingPanic = 2, true; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := e.m.makeVersion(ctx, "s", 2, hsm.ECDSAP256, false); err != nil {
		t.Fatal(err)
	}
	k, err := e.m.Rotate(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	now := e.clock.Now()
	if v, ok := k.Signing(now); !ok || v.Number != 2 || k.MinDecryptionVersion != 2 || k.PendingPanic || k.PendingVersion != 0 {
		t.Fatalf("after the adoption: %+v", k)
	}
	if pub := k.Published(now); len(pub) != 1 || pub[0].Number != 2 {
		t.Fatalf("published: %+v; the compromised v1 must be gone", pub)
	}
}

// TestFailedPanicRotateDoesNotArmRotate: a panic-rotate that failed (and
// said so) leaves no panic for a later plain Rotate to finish: that one
// withdraws nothing.
func TestFailedPanicRotateDoesNotArmRotate(t *testing.T) {
	tok := softhsmtest.New(t)
	faults := softhsmtest.NewFaults(t, tok)
	h, err := hsm.Open(hsm.Config{Module: faults.Module, Token: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	s, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m, err := New(s, h, Options{SignPrePublish: time.Minute, SignKeepPublished: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := m.Create(ctx, Spec{Name: "s", Purpose: Sign, Algorithm: hsm.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	faults.Set("C_GenerateKeyPair 0x30") // CKR_DEVICE_ERROR
	if _, err := m.PanicRotate(ctx, "s", false); err == nil {
		t.Fatal("panic-rotate with the HSM failing succeeded")
	}
	faults.Set()
	k, err := m.Rotate(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if k.MinDecryptionVersion != 1 || len(k.Published(time.Now())) != 2 || k.PendingPanic {
		t.Fatalf("a plain Rotate after a failed panic-rotate: min %d, published %d, pending panic %v", k.MinDecryptionVersion, len(k.Published(time.Now())), k.PendingPanic)
	}
	// A crashed panic-rotate (its mark and version recorded, no HSM key
	// yet) whose finishing fails once keeps its mark: the next Rotate
	// still finishes it.
	if _, err := m.change("s", func(k *Key) error { k.PendingVersion, k.PendingPanic = 3, true; return nil }); err != nil {
		t.Fatal(err)
	}
	faults.Set("C_GenerateKeyPair 0x30")
	if _, err := m.Rotate(ctx, "s"); err == nil {
		t.Fatal("finishing with the HSM failing succeeded")
	}
	faults.Set()
	if k, err = m.Rotate(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if k.Latest() != 3 || k.MinDecryptionVersion != 3 || k.PendingPanic {
		t.Fatalf("after finishing the crashed panic-rotate: latest %d, min %d, pending panic %v", k.Latest(), k.MinDecryptionVersion, k.PendingPanic)
	}
}

// TestReportRewrap: a key keeps one report per source, newest first, and
// at most MaxRewrapReports of them; the oldest source goes first.
func TestReportRewrap(t *testing.T) {
	e := setup(t, Options{})
	ctx := context.Background()
	if _, err := e.m.Create(ctx, Spec{Name: "kek", Purpose: Encrypt}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Create(ctx, Spec{Name: "jwt", Purpose: Sign}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.ReportRewrap("jwt", RewrapReport{Source: "dir:/a"}); !errors.Is(err, ErrWrongPurpose) {
		t.Fatalf("a report on a signing key: %v", err)
	}
	for i := range MaxRewrapReports + 1 {
		e.clock.t = e.clock.t.Add(time.Minute)
		if _, err := e.m.ReportRewrap("kek", RewrapReport{Source: fmt.Sprintf("dir:/%d", i), Ciphertexts: map[uint32]uint64{1: uint64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	// Source 3 again: it moves to the front, with its new count.
	if _, err := e.m.ReportRewrap("kek", RewrapReport{Source: "dir:/3", Ciphertexts: map[uint32]uint64{1: 0}, Complete: true}); err != nil {
		t.Fatal(err)
	}
	k, err := e.m.Get("kek")
	if err != nil {
		t.Fatal(err)
	}
	if len(k.RewrapReports) != MaxRewrapReports {
		t.Fatalf("%d reports kept; want %d", len(k.RewrapReports), MaxRewrapReports)
	}
	if r := k.RewrapReports[0]; r.Source != "dir:/3" || r.Ciphertexts[1] != 0 || !r.Complete || !r.Time.Equal(e.clock.Now()) {
		t.Fatalf("newest report %+v", r)
	}
	for _, r := range k.RewrapReports {
		if r.Source == "dir:/0" {
			t.Fatal("the oldest source was kept past the bound")
		}
	}
	if r := k.RewrapReports[1]; r.Source != fmt.Sprintf("dir:/%d", MaxRewrapReports) || r.Ciphertexts[1] != MaxRewrapReports || len(r.Ciphertexts) != 1 {
		t.Fatalf("second report %+v", r)
	}
	// Another reporter's new sources push out one report of others, then
	// each its own last.
	for _, src := range []string{"other:1", "other:2", "other:3"} {
		if _, err := e.m.ReportRewrap("kek", RewrapReport{Source: src, ReporterUID: 7}); err != nil {
			t.Fatal(err)
		}
	}
	k, _ = e.m.Get("kek")
	var sources []string
	for _, r := range k.RewrapReports {
		sources = append(sources, r.Source)
	}
	if len(sources) != MaxRewrapReports || sources[0] != "other:3" || slices.Contains(sources, "other:1") || slices.Contains(sources, "other:2") ||
		slices.Contains(sources, "dir:/1") || !slices.Contains(sources, "dir:/2") {
		t.Fatalf("after another reporter's three sources: %v", sources)
	}
	for _, src := range []string{"", strings.Repeat("x", MaxRewrapSource+1), "dir:\x00", "\xff", "dir:/a\u202e"} {
		if _, err := e.m.ReportRewrap("kek", RewrapReport{Source: src}); !errors.Is(err, ErrInvalid) {
			t.Errorf("source %q: %v", src, err)
		}
	}
}
