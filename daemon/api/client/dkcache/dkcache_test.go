package dkcache_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/dkcache"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// fakeClock is a clock the test moves; its timers fire in Advance, in
// the order they are due, unless late: then they never fire.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
	late   bool
}

type fakeTimer struct {
	at   time.Time
	f    func()
	done bool // fired or stopped
}

func newClock() *fakeClock { return &fakeClock{now: time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		active := !t.done
		t.done = true
		return active
	}
}

// Advance moves the clock by d and runs the timers due by then.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	for _, t := range c.timers {
		if !c.late && !t.done && !t.at.After(c.now) {
			t.done = true
			due = append(due, t)
		}
	}
	c.mu.Unlock()
	for _, t := range due {
		t.f()
	}
}

var (
	tenant42 = map[string]string{"tenant": "42"}
	tenant43 = map[string]string{"tenant": "43"}
)

// canon is the canonical encoding of {"tenant": v}, written out by hand
// from docs/formats.md: one entry, then key and value, length-prefixed.
func canon(v string) []byte {
	return append([]byte{1, 6, 't', 'e', 'n', 'a', 'n', 't', byte(len(v))}, v...)
}

// start runs keywardd with the keys "orders" and "billing" and returns a
// client of it.
func start(t *testing.T) *client.Client {
	t.Helper()
	d := daemontest.Start(t, daemontest.Policy(daemontest.AllowAll()))
	kw, err := client.Dial(d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kw.Close() })
	for _, name := range []string{"orders", "billing"} {
		if _, err := kw.Keys.CreateKey(context.Background(), &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
			t.Fatal(err)
		}
	}
	return kw
}

func newCache(t *testing.T, kw dkcache.Keyward, opts dkcache.Options) *dkcache.Cache {
	t.Helper()
	c, err := dkcache.New(kw, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// audited counts keywardd's audit records of op that succeeded.
func audited(t *testing.T, kw *client.Client, op string) int {
	t.Helper()
	n := 0
	for r, err := range kw.AuditRecords(context.Background(), &keywardv1.ListAuditRecordsRequest{Operation: op}) {
		if err != nil {
			t.Fatal(err)
		}
		if r.Outcome == keywardv1.AuditOutcome_AUDIT_OUTCOME_OK {
			n++
		}
	}
	return n
}

// openByHand opens a record without the package: its layout as
// docs/datakey-cache.md gives it, the data key from keywardd's Decrypt,
// the standard library's AES-GCM. It returns the plaintext and the
// record's wrapped key.
func openByHand(t *testing.T, kw *client.Client, rec []byte, tenant string) ([]byte, []byte) {
	t.Helper()
	if len(rec) < 5 || string(rec[:4]) != "kwr\x01" {
		t.Fatalf("record starts % x", rec[:min(len(rec), 5)])
	}
	w := int(rec[4])
	wrapped, nonce, sealed := rec[5:5+w], rec[5+w:17+w], rec[17+w:]
	key, err := kw.Decrypt(context.Background(), wrapped, map[string]string{"tenant": tenant})
	if err != nil {
		t.Fatal(err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	gcm, _ := cipher.NewGCM(block)
	pt, err := gcm.Open(nil, nonce, sealed, append(bytes.Clone(rec[:5+w]), canon(tenant)...))
	if err != nil {
		t.Fatalf("the record does not open by hand: %v", err)
	}
	return pt, wrapped
}

// TestSealOpen: 100 records sealed under one context cost one
// GenerateDataKey in keywardd's audit log, and each opens by hand (plain
// Decrypt of its data key and AES-GCM); a second cache opens the 100 with
// one Decrypt; SealParts and OpenParts round-trip with the caller's
// additional data bound.
func TestSealOpen(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	c := newCache(t, kw, dkcache.Options{})
	if !c.Locked() {
		t.Fatal("the cache's memory is not locked, and New did not fail")
	}
	var recs [][]byte
	wrappedKeys := map[string]bool{}
	for i := range 100 {
		pt := fmt.Appendf(nil, "record %d", i)
		rec, err := c.Seal(ctx, "orders", pt, tenant42)
		if err != nil {
			t.Fatal(err)
		}
		got, wrapped := openByHand(t, kw, rec, "42")
		if !bytes.Equal(got, pt) {
			t.Fatalf("record %d opened by hand to %q", i, got)
		}
		wrappedKeys[string(wrapped)] = true
		recs = append(recs, rec)
	}
	if len(wrappedKeys) != 1 {
		t.Errorf("100 records under %d data keys; want 1", len(wrappedKeys))
	}
	if n := audited(t, kw, "EnvelopeService.GenerateDataKey"); n != 1 {
		t.Errorf("keywardd audited %d GenerateDataKey for 100 records; want 1", n)
	}
	decrypts := audited(t, kw, "EnvelopeService.Decrypt") // openByHand's
	reader := newCache(t, kw, dkcache.Options{})
	for i, rec := range recs {
		pt, err := reader.Open(ctx, "orders", rec, tenant42)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("record %d", i); string(pt) != want {
			t.Fatalf("Open: %q, want %q", pt, want)
		}
	}
	if n := audited(t, kw, "EnvelopeService.Decrypt") - decrypts; n != 1 {
		t.Errorf("keywardd audited %d Decrypt to open 100 records of one data key; want 1", n)
	}
	if s := reader.Stats(); s.Misses != 1 || s.Hits != 99 {
		t.Errorf("reader's stats %+v; want 1 miss (the first record), 99 hits", s)
	}

	wrapped, sealed, err := c.SealParts(ctx, "orders", []byte("part"), []byte("row 7"), tenant42)
	if err != nil {
		t.Fatal(err)
	}
	dk, err := kw.Decrypt(ctx, wrapped, tenant42)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher(dk)
	gcm, _ := cipher.NewGCM(block)
	if pt, err := gcm.Open(nil, sealed[:12], sealed[12:], append(canon("42"), "row 7"...)); err != nil || string(pt) != "part" {
		t.Errorf("SealParts' output opened by hand (AAD: canonical context, then additional data): %q, %v", pt, err)
	}
	if pt, err := reader.OpenParts(ctx, "orders", wrapped, sealed, []byte("row 7"), tenant42); err != nil || string(pt) != "part" {
		t.Errorf("OpenParts: %q, %v", pt, err)
	}
	if _, err := reader.OpenParts(ctx, "orders", wrapped, sealed, []byte("row 8"), tenant42); !errors.Is(err, dkcache.ErrOpen) {
		t.Errorf("OpenParts with other additional data: %v, want ErrOpen", err)
	}
	tampered := bytes.Clone(recs[0])
	tampered[len(tampered)-1] ^= 1
	if _, err := reader.Open(ctx, "orders", tampered, tenant42); !errors.Is(err, dkcache.ErrOpen) {
		t.Errorf("Open of a changed record: %v, want ErrOpen", err)
	}
}

// TestLimits: a data key seals at most MaxMessages records, MaxBytes
// bytes, for MaxAge (on the cache's clock), even when the timer that
// wipes it at MaxAge is late (each use checks the age); the records say
// which data key each was sealed under, and keywardd's audit log how many
// were made.
func TestLimits(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	kib := bytes.Repeat([]byte{'x'}, 1024)
	for _, tc := range []struct {
		name    string
		lim     dkcache.Limits
		step    time.Duration // the clock's move before each record
		records int
		groups  []int // records under each data key, in order
		late    bool  // the clock's timers never fire
	}{
		{"messages", dkcache.Limits{MaxMessages: 3}, 0, 8, []int{3, 3, 2}, false},
		{"bytes", dkcache.Limits{MaxBytes: 2500}, 0, 5, []int{2, 2, 1}, false},
		{"bytes exactly", dkcache.Limits{MaxBytes: 2048}, 0, 5, []int{2, 2, 1}, false},
		{"age", dkcache.Limits{MaxAge: time.Minute}, 25 * time.Second, 7, []int{3, 3, 1}, false},
		{"age, timer late", dkcache.Limits{MaxAge: time.Minute}, 25 * time.Second, 7, []int{3, 3, 1}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newClock()
			clock.late = tc.late
			c := newCache(t, kw, dkcache.Options{Limits: tc.lim, Clock: clock})
			before := audited(t, kw, "EnvelopeService.GenerateDataKey")
			var groups []int
			last := ""
			for range tc.records {
				clock.Advance(tc.step)
				rec, err := c.Seal(ctx, "orders", kib, tenant42)
				if err != nil {
					t.Fatal(err)
				}
				w := string(rec[5 : 5+int(rec[4])])
				if w != last {
					groups = append(groups, 0)
					last = w
				}
				groups[len(groups)-1]++
			}
			if fmt.Sprint(groups) != fmt.Sprint(tc.groups) {
				t.Errorf("records under each data key: %v, want %v", groups, tc.groups)
			}
			if n := audited(t, kw, "EnvelopeService.GenerateDataKey") - before; n != len(tc.groups) {
				t.Errorf("keywardd made %d data keys, want %d", n, len(tc.groups))
			}
			if s := c.Stats(); tc.step != 0 && s.Expired != uint64(len(tc.groups)-1) {
				t.Errorf("stats %+v; want %d expired", s, len(tc.groups)-1)
			}
		})
	}

	// A record over MaxBytes gets a data key of its own, never cached.
	c := newCache(t, kw, dkcache.Options{Limits: dkcache.Limits{MaxBytes: 100}})
	var ws []string
	for range 2 {
		rec, err := c.Seal(ctx, "orders", kib, tenant42)
		if err != nil {
			t.Fatal(err)
		}
		if pt, err := c.Open(ctx, "orders", rec, tenant42); err != nil || !bytes.Equal(pt, kib) {
			t.Fatalf("Open of a record over MaxBytes: %v", err)
		}
		ws = append(ws, string(rec[5:5+int(rec[4])]))
	}
	if s := c.Stats(); ws[0] == ws[1] || s.Uncached != 4 || s.Entries != 0 {
		t.Errorf("two records over MaxBytes: same data key %v, stats %+v; want two keys, 4 uncached, none held", ws[0] == ws[1], s)
	}
	if _, err := dkcache.New(kw, dkcache.Options{Limits: dkcache.Limits{MaxMessages: 1<<32 + 1}}); err == nil || !strings.Contains(err.Error(), "2^32") {
		t.Errorf("MaxMessages over 2^32: %v", err)
	}
}

// TestRotationAndRevocation: records move to a rotated key's new version
// when the cached data key reaches MaxAge; a disabled key's cached data
// keys still seal and open until MaxAge, then keywardd's refusal comes
// through.
func TestRotationAndRevocation(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	clock := newClock()
	opts := dkcache.Options{Limits: dkcache.Limits{MaxAge: time.Minute}, Clock: clock}
	c, reader := newCache(t, kw, opts), newCache(t, kw, opts)
	version := func() uint32 {
		t.Helper()
		rec, err := c.Seal(ctx, "orders", []byte("r"), tenant42)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := reader.Open(ctx, "orders", rec, tenant42); err != nil {
			t.Fatal(err)
		}
		w := rec[5 : 5+int(rec[4])]
		return binary.BigEndian.Uint32(w[5+int(w[4]):])
	}
	if v := version(); v != 1 {
		t.Fatalf("version %d", v)
	}
	if _, err := kw.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders"}); err != nil {
		t.Fatal(err)
	}
	if v := version(); v != 1 {
		t.Errorf("right after rotation, records under version %d; want the cached data key's, 1", v)
	}
	clock.Advance(time.Minute)
	if v := version(); v != 2 {
		t.Errorf("after MaxAge, records under version %d; want 2", v)
	}
	if _, err := kw.Keys.SetKeyState(ctx, &keywardv1.SetKeyStateRequest{Name: "orders", State: keywardv1.KeyState_KEY_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	rec, err := c.Seal(ctx, "orders", []byte("r"), tenant42) // cached: no call to keywardd
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Open(ctx, "orders", rec, tenant42); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	if _, err := c.Seal(ctx, "orders", []byte("r"), tenant42); !errors.Is(err, client.ErrUnusable) {
		t.Errorf("Seal under a disabled key after MaxAge: %v, want ErrUnusable", err)
	}
	if _, err := reader.Open(ctx, "orders", rec, tenant42); !errors.Is(err, client.ErrUnusable) {
		t.Errorf("Open under a disabled key after MaxAge: %v, want ErrUnusable", err)
	}
}

// TestContextsApart: each key name and context has its own data key; a
// record sealed under one context opens under no other, neither in the
// cache that has its data key unwrapped under the first nor in another.
func TestContextsApart(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	c := newCache(t, kw, dkcache.Options{})
	seal := func(key string, encCtx map[string]string) []byte {
		rec, err := c.Seal(ctx, key, []byte("secret"), encCtx)
		if err != nil {
			t.Fatal(err)
		}
		return rec
	}
	wrapped := func(rec []byte) string { return string(rec[5 : 5+int(rec[4])]) }
	a, b, other := seal("orders", tenant42), seal("orders", tenant43), seal("billing", tenant42)
	if wrapped(a) == wrapped(b) || wrapped(a) == wrapped(other) || wrapped(a) != wrapped(seal("orders", tenant42)) {
		t.Error("data keys shared across contexts or key names, or not reused within one")
	}
	if _, err := c.Open(ctx, "orders", a, tenant42); err != nil {
		t.Fatal(err)
	}
	for _, cc := range []*dkcache.Cache{c, newCache(t, kw, dkcache.Options{})} {
		for _, encCtx := range []map[string]string{tenant43, {}, {"tenant": "42", "x": ""}} {
			if pt, err := cc.Open(ctx, "orders", a, encCtx); !errors.Is(err, client.ErrInvalid) {
				t.Errorf("a record of tenant 42 opened under %v: %q, %v; want keywardd's refusal (ErrInvalid)", encCtx, pt, err)
			}
		}
	}
	// The record's key moved into a record of another context's header:
	// the local AAD (header and context) no longer matches.
	moved := append(bytes.Clone(b[:5+int(b[4])]), a[5+int(a[4]):]...)
	if _, err := c.Open(ctx, "orders", moved, tenant43); !errors.Is(err, dkcache.ErrOpen) {
		t.Errorf("a sealed part moved under another context's data key: %v, want ErrOpen", err)
	}
}

// TestWipe: a key's memory holds the data key while cached and is zero
// once it expires (the timer at MaxAge, with no further call) or is
// evicted; Close leaves the whole mapping zero before unmapping it, and
// every call after fails with ErrClosed.
func TestWipe(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	clock := newClock()
	c := newCache(t, kw, dkcache.Options{Limits: dkcache.Limits{MaxAge: time.Minute, MaxEntries: 2}, Clock: clock})
	var mu sync.Mutex
	var wipes [][]byte
	dkcache.SetWiped(func(key []byte) { mu.Lock(); wipes = append(wipes, bytes.Clone(key)); mu.Unlock() })
	t.Cleanup(func() { dkcache.SetWiped(nil) })

	rec, err := c.Seal(ctx, "orders", []byte("r"), tenant42)
	if err != nil {
		t.Fatal(err)
	}
	mem := c.SealEntryKey("orders", tenant42)
	dk, err := kw.Decrypt(ctx, rec[5:5+int(rec[4])], tenant42)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem, dk) {
		t.Fatal("the cached key's memory does not hold the record's data key")
	}
	clock.Advance(59 * time.Second)
	if !bytes.Equal(mem, dk) || len(wipes) != 0 {
		t.Fatal("the key was wiped before MaxAge")
	}
	clock.Advance(time.Second)
	if !bytes.Equal(mem, make([]byte, 32)) {
		t.Errorf("the key's memory after MaxAge: % x, want zeros", mem)
	}
	if s := c.Stats(); s.Expired != 1 || s.Entries != 0 || len(wipes) != 1 {
		t.Errorf("after MaxAge: stats %+v, %d wipes; want 1 expired, none held", s, len(wipes))
	}

	// Eviction: a third key in a cache of two wipes the least recently used.
	for _, k := range []struct {
		name   string
		encCtx map[string]string
	}{{"orders", tenant42}, {"orders", tenant43}, {"orders", tenant42}, {"billing", tenant42}} {
		if _, err := c.Seal(ctx, k.name, []byte("r"), k.encCtx); err != nil {
			t.Fatal(err)
		}
	}
	if c.SealEntryKey("orders", tenant43) != nil || c.SealEntryKey("orders", tenant42) == nil || c.Stats().Evicted != 1 {
		t.Errorf("evicted the wrong key: stats %+v", c.Stats())
	}
	for i, w := range wipes {
		if !bytes.Equal(w, make([]byte, 32)) {
			t.Errorf("wipe %d left % x", i, w)
		}
	}

	var unmapped []byte
	dkcache.SetBeforeUnmap(func(m []byte) { unmapped = bytes.Clone(m) })
	t.Cleanup(func() { dkcache.SetBeforeUnmap(nil) })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if len(unmapped) == 0 || !bytes.Equal(unmapped, make([]byte, len(unmapped))) {
		t.Errorf("the mapping at Close (%d bytes) is not all zero", len(unmapped))
	}
	if _, err := c.Seal(ctx, "orders", []byte("r"), tenant42); !errors.Is(err, dkcache.ErrClosed) {
		t.Errorf("Seal after Close: %v", err)
	}
	if _, err := c.Open(ctx, "orders", rec, tenant42); !errors.Is(err, dkcache.ErrClosed) {
		t.Errorf("Open after Close: %v", err)
	}
}

// TestConcurrent: goroutines sealing and opening under three contexts at
// once (run with -race): every record opens, under its own context only,
// and no data key seals more than MaxMessages records. Callers that miss
// together wait for one call to keywardd, and share its refusal: 16
// callers under a key that does not exist make one call.
func TestConcurrent(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	burst := func(c *dkcache.Cache, keyName string) []error {
		errs := make([]error, 16)
		var wg sync.WaitGroup
		for i := range errs {
			wg.Go(func() { _, errs[i] = c.Seal(ctx, keyName, []byte("r"), tenant42) })
		}
		wg.Wait()
		return errs
	}
	before := audited(t, kw, "EnvelopeService.GenerateDataKey")
	for _, err := range burst(newCache(t, kw, dkcache.Options{}), "orders") {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := audited(t, kw, "EnvelopeService.GenerateDataKey") - before; n != 1 {
		t.Errorf("16 callers missing at once made %d data keys, want 1", n)
	}
	// The first call is held until the 15 others wait for it.
	h := newHeld(kw)
	waited, stopWaits := waits(t)
	refused := newCache(t, h, dkcache.Options{})
	refusedErrs := make([]error, 16)
	var refusals sync.WaitGroup
	for i := range refusedErrs {
		refusals.Go(func() { _, refusedErrs[i] = refused.Seal(ctx, "nokey", []byte("r"), tenant42) })
	}
	<-h.entered
	for range len(refusedErrs) - 1 {
		<-waited
	}
	close(h.release)
	refusals.Wait()
	stopWaits()
	for _, err := range refusedErrs {
		if !errors.Is(err, client.ErrNotFound) {
			t.Errorf("sealing under a key that does not exist: %v, want ErrNotFound", err)
		}
	}
	if n := h.Calls(); n != 1 {
		t.Errorf("16 callers refused together made %d calls to keywardd; want 1, its refusal shared", n)
	}

	const perKey = 20
	c := newCache(t, kw, dkcache.Options{Limits: dkcache.Limits{MaxMessages: perKey, MaxEntries: 4}})
	tenants := []string{"1", "2", "3"}
	var mu sync.Mutex
	uses := map[string]int{}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for i := range 60 {
				tn := tenants[(g+i)%3]
				pt := fmt.Appendf(nil, "%d/%d", g, i)
				rec, err := c.Seal(ctx, "orders", pt, map[string]string{"tenant": tn})
				if err == nil {
					var got []byte
					got, err = c.Open(ctx, "orders", rec, map[string]string{"tenant": tn})
					if err == nil && !bytes.Equal(got, pt) {
						err = fmt.Errorf("opened %q, sealed %q", got, pt)
					}
				}
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				uses[string(rec[5:5+int(rec[4])])]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	total := 0
	for _, n := range uses {
		if n > perKey {
			t.Errorf("a data key sealed %d records; MaxMessages is %d", n, perKey)
		}
		total += n
	}
	if total != 8*60 || len(uses) < 8*60/perKey {
		t.Errorf("%d records under %d data keys", total, len(uses))
	}
}

// TestMemoryLockRefused: with mlock refused (RLIMIT_MEMLOCK 0 and, as
// root, CAP_IPC_LOCK dropped on this test's thread), New fails with
// ErrMemoryLock and says how to fix it; with AllowUnlocked it works and
// says the memory is not locked.
func TestMemoryLockRefused(t *testing.T) {
	// The thread keeps its capabilities dropped: it is never unlocked, so
	// it ends with the test's goroutine.
	runtime.LockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	data[0].Effective &^= 1 << unix.CAP_IPC_LOCK
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: 0, Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	defer unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old)

	_, err := dkcache.New(nil, dkcache.Options{})
	if !errors.Is(err, dkcache.ErrMemoryLock) || !strings.Contains(err.Error(), "LimitMEMLOCK") || !strings.Contains(err.Error(), "AllowUnlocked") {
		t.Fatalf("New with mlock refused: %v; want ErrMemoryLock saying how to fix it", err)
	}
	c, err := dkcache.New(nil, dkcache.Options{AllowUnlocked: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Locked() || c.Stats().LockedMem {
		t.Error("AllowUnlocked with mlock refused: the cache says its memory is locked")
	}
}
