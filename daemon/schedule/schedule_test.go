package schedule_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

type fixture struct {
	st  *store.Store
	km  *keys.Manager
	akm *apikeys.Manager
	clk *clock
}

var pepper = hsm.KeyID{Name: "keyward-apikeys", Version: 1}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	h, _ := hsmtest.Open(t)
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{st: st, clk: &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}}
	if f.km, err = keys.New(st, h, keys.Options{Now: f.clk.now}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.km.Create(context.Background(), keys.Spec{Name: pepper.Name, Purpose: keys.MAC}); err != nil {
		t.Fatal(err)
	}
	if f.akm, err = apikeys.NewManager(st, h, pepper, apikeys.Options{Now: f.clk.now}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) scheduler(rules *schedule.Rules, c schedule.Config) *schedule.Scheduler {
	c.Store, c.Now = f.st, f.clk.now
	if c.Sources == nil {
		c.Sources = []schedule.Source{schedule.KeySource(f.km, rules, "keyward-"), schedule.APIKeySource(f.akm, rules, f.clk.now, 0, 24*time.Hour)}
	}
	return schedule.New(c)
}

func (f *fixture) key(t testing.TB, s keys.Spec) {
	t.Helper()
	if _, err := f.km.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
}

// events are the outbox's events of a kind.
func (f *fixture) events(t *testing.T, kind string) []outbox.Event {
	t.Helper()
	var out []outbox.Event
	f.st.ForEach(store.BucketOutbox, "", func(_ string, b []byte) error {
		var e outbox.Event
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		if e.Kind == kind {
			out = append(out, e)
		}
		return nil
	})
	return out
}

// TestAYearInMilliseconds runs a year of hourly ticks on an injected clock:
// a moderate key rotates every 90 days, a high-risk signing key every 30, a
// key with its own period by it, keywardd's own keys never; an API key under
// a forced policy gets its deadline and stops working after the overlap,
// one under reminders keeps working and is reminded daily.
func TestAYearInMilliseconds(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.key(t, keys.Spec{Name: "orders", Purpose: keys.Encrypt})
	f.key(t, keys.Spec{Name: "tokens-signer", Purpose: keys.Sign, Algorithm: hsm.ECDSAP256})
	f.key(t, keys.Spec{Name: "reports", Purpose: keys.Encrypt, RotationPeriod: 7 * 24 * time.Hour})
	f.key(t, keys.Spec{Name: "keyward-audit", Purpose: keys.MAC, RotationPeriod: 24 * time.Hour})
	f.key(t, keys.Spec{Name: "archive", Purpose: keys.Encrypt})
	forced, forcedRec, err := f.akm.Create(ctx, apikeys.Spec{Owner: "payments", Name: "charge", Environment: "prod", Permissions: []string{"charges:create"}, Tags: []string{"pci"}})
	if err != nil {
		t.Fatal(err)
	}
	reminded, remindedRec, err := f.akm.Create(ctx, apikeys.Spec{Owner: "reports", Name: "read", Environment: "prod", Permissions: []string{"reports:read"}})
	if err != nil {
		t.Fatal(err)
	}
	rules := &schedule.Rules{
		Keys: []schedule.KeyRule{{Match: "orders", Policy: "moderate"}, {Match: "tokens-*", Policy: "high"}, {Match: "keyward-*", Policy: "high"}},
		APIKeys: []schedule.APIKeyRule{{Environment: "prod", Tag: "pci", Policy: "high", Action: schedule.Force},
			{Environment: "prod", Policy: "moderate"}},
	}
	if err := rules.Check(); err != nil {
		t.Fatal(err)
	}
	var runs []schedule.Result
	s := f.scheduler(rules, schedule.Config{Jitter: time.Hour, Grace: time.Hour})
	start := f.clk.now()
	verify := func(secret string) apikeys.Code {
		return f.akm.Verify(ctx, secret, apikeys.Request{Environment: "prod"}).Code
	}
	var forcedDeadline time.Time
	for f.clk.now().Before(start.Add(365 * 24 * time.Hour)) {
		r, err := s.Tick(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range r {
			if x.Subject.ID == forcedRec.ID && forcedDeadline.IsZero() {
				forcedDeadline = f.clk.now().Add(schedule.High.Overlap)
				// Within the overlap the key works; after it, not.
				if c := verify(forced); c != apikeys.Valid {
					t.Fatalf("the forced key inside its overlap: %v", c)
				}
			}
		}
		runs = append(runs, r...)
		f.clk.add(time.Hour)
	}
	count := map[string]int{}
	for _, r := range runs {
		if r.Err != nil {
			t.Fatalf("run %s: %v", r.Subject.ID, r.Err)
		}
		count[r.Subject.ID]++
	}
	// 365 days: 4 periods of 90, 12 of 30, 52 of 7; each run a little
	// late (the jitter, the hourly tick), never early, never twice.
	year := 365 * 24 * time.Hour
	for name, every := range map[string]time.Duration{"orders": 90 * 24 * time.Hour, "tokens-signer": 30 * 24 * time.Hour, "reports": 7 * 24 * time.Hour} {
		k, _ := f.km.Get(name)
		most, least := int(year/every), int(year/(every+2*time.Hour)) // the jitter and the tick, each at most an hour
		if count[name] < least || count[name] > most || len(k.Versions) != count[name]+1 {
			t.Errorf("%s: %d runs, %d versions; want %d to %d rotations", name, count[name], len(k.Versions), least, most)
		}
		for i := 1; i < len(k.Versions); i++ {
			gap := k.Versions[i].Created.Sub(k.Versions[i-1].Created)
			if gap < every || gap > every+min(time.Hour, every/10)+time.Hour {
				t.Errorf("%s v%d came %v after v%d; the period is %v", name, i+1, gap, i, every)
			}
		}
	}
	if k, _ := f.km.Get("tokens-signer"); k.Versions[1].ActivateAt.IsZero() {
		t.Error("a scheduled signing key rotation did not follow the signing timeline")
	}
	for _, name := range []string{"keyward-audit", "archive"} {
		if k, _ := f.km.Get(name); count[name] != 0 || len(k.Versions) != 1 {
			t.Errorf("%s rotated %d times: it has no policy (or is keywardd's own)", name, count[name])
		}
	}
	// The forced key: due after 30 days, a deadline a day later, dead since.
	if forcedDeadline.IsZero() || forcedDeadline.Before(forcedRec.Created.Add(schedule.High.Every+schedule.High.Overlap)) {
		t.Fatalf("the forced key's deadline %v", forcedDeadline)
	}
	if c := verify(forced); c != apikeys.Expired {
		t.Errorf("the forced key after its deadline: %v, want EXPIRED", c)
	}
	if c := verify(reminded); c != apikeys.Valid {
		t.Errorf("the reminded key: %v; a reminder must not stop it", c)
	}
	// Reminders: daily from the due date on, with the policy in words.
	due := f.events(t, outbox.RotationDue)
	byKey := map[string]int{}
	for _, e := range due {
		byKey[e.ID]++
		if e.Subject == "" || !strings.Contains(e.Detail, "rotation policy") {
			t.Fatalf("a reminder without its owner or detail: %+v", e)
		}
	}
	if n := byKey["api_key/"+remindedRec.ID]; n < 270 || n > 276 {
		t.Errorf("%d reminders for the moderate key: one a day from day 90", n)
	}
	if n := byKey["api_key/"+forcedRec.ID]; n < 334 || n > 336 {
		t.Errorf("%d notices for the forced key: one a day from day 30", n)
	}
	// The plan shows both keys overdue (nobody rotated them), the keys
	// due next, and counts as the metric does.
	plan, err := s.Plan()
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 5 || plan[0].Kind != schedule.APIKey || !plan[0].Overdue(f.clk.now()) {
		t.Fatalf("plan %+v", plan)
	}
	if o := s.Overdue(); o[schedule.APIKey] != 2 || o[schedule.Key] != 0 {
		t.Errorf("overdue %v, want 2 API keys and no key", o)
	}

	// The owner rotates: the schedule counts from the new secret.
	if _, _, err := f.akm.Rotate(ctx, remindedRec.ID, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if o := s.Overdue(); o[schedule.APIKey] != 1 {
		t.Errorf("after the owner rotated: overdue %v", o)
	}
}

// TestOverdueRunsOnceAfterDowntime: keywardd down for 200 days (a new
// scheduler on the same store, as after a restart) rotates a 30-day key once,
// then counts its period from that rotation.
func TestOverdueRunsOnceAfterDowntime(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.key(t, keys.Spec{Name: "orders", Purpose: keys.Encrypt})
	rules := &schedule.Rules{Keys: []schedule.KeyRule{{Match: "*", Policy: "high"}}}
	s := f.scheduler(rules, schedule.Config{})
	if r, _ := s.Tick(ctx); len(r) != 0 {
		t.Fatalf("a new key rotated at once: %+v", r)
	}
	f.clk.add(200 * 24 * time.Hour)
	s = f.scheduler(rules, schedule.Config{})
	r, err := s.Tick(ctx)
	if err != nil || len(r) != 1 || r[0].Err != nil {
		t.Fatalf("after the downtime: %+v, %v; want one rotation", r, err)
	}
	for range 3 {
		if r, _ := s.Tick(ctx); len(r) != 0 {
			t.Fatalf("a second rotation for the same overdue period: %+v", r)
		}
	}
	if k, _ := f.km.Get("orders"); len(k.Versions) != 2 {
		t.Fatalf("%d versions after 200 days down, want 2", len(k.Versions))
	}
	plan, _ := s.Plan()
	if len(plan) != 1 || !plan[0].Due.Equal(f.clk.now().Add(schedule.High.Every)) || plan[0].Runs != 1 || plan[0].Outcome != "ok" {
		t.Fatalf("plan after the rotation: %+v", plan)
	}
	f.clk.add(schedule.High.Every - time.Minute)
	if r, _ := s.Tick(ctx); len(r) != 0 {
		t.Fatal("rotated before the period counted from the last rotation")
	}
	f.clk.add(time.Minute)
	if r, _ := s.Tick(ctx); len(r) != 1 {
		t.Fatal("not rotated once the period passed")
	}
}

// TestJitterSpreadsAndHolds: keys made in the same instant are due at
// different times, within a tenth of the period and the configured jitter,
// and a restart computes the same times.
func TestJitterSpreadsAndHolds(t *testing.T) {
	f := newFixture(t)
	for _, n := range []string{"a", "b", "c", "d", "e", "f", "g", "h"} {
		f.key(t, keys.Spec{Name: "k-" + n, Purpose: keys.Encrypt})
	}
	rules := &schedule.Rules{Keys: []schedule.KeyRule{{Match: "k-*", Policy: "high"}}}
	plan := func() map[string]time.Time {
		s := f.scheduler(rules, schedule.Config{Jitter: 6 * time.Hour})
		p, err := s.Plan()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]time.Time{}
		for _, e := range p {
			out[e.ID] = e.Due
		}
		return out
	}
	first := plan()
	seen := map[time.Time]bool{}
	for id, due := range first {
		k, _ := f.km.Get(id)
		j := due.Sub(k.Versions[0].Created.Add(schedule.High.Every))
		if j < 0 || j >= 6*time.Hour {
			t.Errorf("%s: jitter %v, want [0, 6h)", id, j)
		}
		seen[due] = true
	}
	if len(seen) < 6 {
		t.Errorf("8 keys made together fall on %d due times", len(seen))
	}
	// A Tick saves the entries; wipe them: the same times come back.
	if _, err := f.scheduler(rules, schedule.Config{Jitter: 6 * time.Hour}).Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	var saved []string
	f.st.ForEach(store.BucketSchedule, "", func(k string, _ []byte) error { saved = append(saved, k); return nil })
	if err := f.st.UpdateEach(store.BucketSchedule, saved, func(string, []byte) ([]byte, error) { return nil, nil }); err != nil || len(saved) != 8 {
		t.Fatalf("%d entries saved, %v", len(saved), err)
	}
	for id, due := range plan() {
		if !due.Equal(first[id]) {
			t.Errorf("%s: due %v, then %v", id, first[id], due)
		}
	}
}

// TestFailuresWaitAndUnauditedRunsDoNot: a failed run is retried after
// Retry, not at every tick, and shows as overdue; a run whose audit record
// cannot be written is not done.
func TestFailuresWaitAndUnauditedRunsDoNot(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	calls := 0
	fail := errors.New("the plugin is down")
	last := f.clk.now().Add(-100 * 24 * time.Hour)
	src := schedule.Source{Kind: schedule.Credential,
		List: func() ([]schedule.Subject, error) {
			return []schedule.Subject{{Kind: schedule.Credential, ID: "db", Policy: schedule.Moderate, Action: schedule.Rotate, Last: last}}, nil
		},
		Run: func(context.Context, schedule.Subject) (string, error) { calls++; return "", fail }}
	auditOK := false
	s := f.scheduler(nil, schedule.Config{Sources: []schedule.Source{src}, Retry: 10 * time.Minute, Grace: time.Hour,
		Before: func(context.Context, schedule.Subject, schedule.Entry) error {
			if !auditOK {
				return errors.New("audit log full")
			}
			return nil
		}})
	if _, err := s.Tick(ctx); err == nil || calls != 0 {
		t.Fatalf("unaudited: %d calls, %v", calls, err)
	}
	if n := s.Overdue()[schedule.Credential]; n != 1 {
		t.Fatalf("a run held back by the audit log counts %d overdue, want 1", n)
	}
	auditOK = true
	for range 5 {
		s.Tick(ctx)
		f.clk.add(time.Minute)
	}
	if calls != 1 {
		t.Fatalf("%d calls in 5 minutes, want 1 (retry after 10)", calls)
	}
	f.clk.add(6 * time.Minute)
	s.Tick(ctx)
	plan, _ := s.Plan()
	if calls != 2 || plan[0].Outcome != fail.Error() || plan[0].Runs != 2 || s.Overdue()[schedule.Credential] != 1 {
		t.Fatalf("%d calls; plan %+v", calls, plan)
	}
}

func TestRulesCheck(t *testing.T) {
	bad := map[string]schedule.Rules{
		"unknown policy":     {Keys: []schedule.KeyRule{{Match: "*", Policy: "weekly"}}},
		"bad glob":           {Keys: []schedule.KeyRule{{Match: "[", Policy: "high"}}},
		"empty glob":         {Keys: []schedule.KeyRule{{Policy: "high"}}},
		"built-in redefined": {Policies: map[string]schedule.Policy{"high": {Every: time.Hour}}},
		"short period":       {Policies: map[string]schedule.Policy{"x": {Every: time.Minute}}},
		"overlap too long":   {Policies: map[string]schedule.Policy{"x": {Every: time.Hour, Overlap: time.Hour}}},
		"bad action":         {APIKeys: []schedule.APIKeyRule{{Policy: "high", Action: "rotate"}}},
	}
	for name, r := range bad {
		if err := r.Check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	good := schedule.Rules{Policies: map[string]schedule.Policy{"weekly": {Every: 7 * 24 * time.Hour, Overlap: 12 * time.Hour}},
		Keys: []schedule.KeyRule{{Match: "orders-*", Policy: "weekly"}}, APIKeys: []schedule.APIKeyRule{{Owner: "team-*", Policy: "weekly", Action: schedule.Force}}}
	if err := good.Check(); err != nil {
		t.Fatal(err)
	}
	if p, ok := good.ForKey("orders-eu", 0); !ok || p.Name != "weekly" || p.Overlap != 12*time.Hour {
		t.Errorf("ForKey: %+v %v", p, ok)
	}
	if p, ok := good.ForKey("other", 48*time.Hour); !ok || p.Every != 48*time.Hour {
		t.Errorf("a key's own period: %+v %v", p, ok)
	}
	if _, a, ok := good.ForAPIKey("team-a", "prod", nil); !ok || a != schedule.Force {
		t.Errorf("ForAPIKey: %v %v", a, ok)
	}
	if _, _, ok := good.ForAPIKey("other", "prod", nil); ok {
		t.Error("a key no rule matches got a policy")
	}
}

// TestSourceEvery: a source with Every is listed by every Every-th Tick.
func TestSourceEvery(t *testing.T) {
	f := newFixture(t)
	lists := 0
	src := schedule.Source{Kind: schedule.APIKey, Every: 60,
		List: func() ([]schedule.Subject, error) { lists++; return nil, nil },
		Run:  func(context.Context, schedule.Subject) (string, error) { return "", nil }}
	s := f.scheduler(nil, schedule.Config{Sources: []schedule.Source{src}})
	for range 180 {
		if _, err := s.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
		f.clk.add(time.Minute)
	}
	if lists != 3 {
		t.Fatalf("listed %d times in 3 hours, want 3", lists)
	}
}

// TestForcedDeadlineSparesANewSecret: an owner who rotates between the
// scheduler's look and its run keeps the new secret whole.
func TestForcedDeadlineSparesANewSecret(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	old, rec, err := f.akm.Create(ctx, apikeys.Spec{Owner: "o", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	rules := &schedule.Rules{APIKeys: []schedule.APIKeyRule{{Environment: "prod", Policy: "high", Action: schedule.Force}}}
	src := schedule.APIKeySource(f.akm, rules, f.clk.now, 0, 24*time.Hour)
	f.clk.add(31 * 24 * time.Hour)
	subs, err := src.List()
	if err != nil || len(subs) != 1 {
		t.Fatal(subs, err)
	}
	fresh, _, err := f.akm.Rotate(ctx, rec.ID, time.Hour) // the owner, between the look and the run
	if err != nil {
		t.Fatal(err)
	}
	if detail, err := src.Run(ctx, subs[0]); err != nil || !strings.Contains(detail, "rotated meanwhile") {
		t.Fatalf("run after the owner rotated: %q, %v", detail, err)
	}
	f.clk.add(48 * time.Hour)
	verify := func(secret string) apikeys.Code {
		return f.akm.Verify(ctx, secret, apikeys.Request{Environment: "prod"}).Code
	}
	if c := verify(fresh); c != apikeys.Valid {
		t.Fatalf("the new secret after the forced run: %v", c)
	}
	if c := verify(old); c != apikeys.Expired {
		t.Fatalf("the old secret after its overlap: %v", c)
	}
	if n := len(f.events(t, outbox.RotationDue)); n != 0 {
		t.Fatalf("%d notices for a key rotated meanwhile", n)
	}
}

// TestOneNoticePerOwner: an owner whose five keys come due together gets
// one reminder a day, not five; every key still runs. Under force every
// key's deadline is announced: none stops working unnamed.
func TestOneNoticePerOwner(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	ids := map[string]string{} // ID -> secret
	for _, owner := range []string{"shop", "bank"} {
		for i := range 5 {
			k, rec, err := f.akm.Create(ctx, apikeys.Spec{Owner: owner, Name: fmt.Sprint(i), Environment: "prod", Permissions: []string{"orders:read"}})
			if err != nil {
				t.Fatal(err)
			}
			ids[rec.ID] = k
		}
	}
	rules := &schedule.Rules{APIKeys: []schedule.APIKeyRule{{Owner: "shop", Policy: "high", Action: schedule.Remind},
		{Owner: "bank", Policy: "high", Action: schedule.Force}}}
	s := f.scheduler(rules, schedule.Config{})
	runs := 0
	for range 3 * 24 { // 30 days, then three days hour by hour
		r, err := s.Tick(ctx)
		if err != nil {
			t.Fatal(err)
		}
		runs += len(r)
		if f.clk.now().Before(time.Date(2026, 1, 31, 0, 0, 0, 0, time.UTC)) {
			f.clk.add(30 * 24 * time.Hour)
			continue
		}
		f.clk.add(time.Hour)
	}
	byOwner := map[string]int{}
	named := map[string]bool{}
	deadlines := map[string]map[string]bool{} // key -> the deadlines its notices named
	for _, e := range f.events(t, outbox.RotationDue) {
		byOwner[e.Subject]++
		id := strings.TrimPrefix(e.ID, "api_key/")
		named[id] = true
		if _, d, ok := strings.Cut(e.Detail, " before "); ok {
			if deadlines[id] == nil {
				deadlines[id] = map[string]bool{}
			}
			deadlines[id][strings.Fields(d)[0]] = true
		}
	}
	for id, ds := range deadlines {
		if len(ds) != 1 {
			t.Errorf("%s: notices named the deadlines %v; the first stays in force", id, ds)
		}
	}
	if len(deadlines) != 5 {
		t.Errorf("%d forced keys' notices named a deadline, want 5", len(deadlines))
	}
	if byOwner["shop"] != 3 || byOwner["bank"] != 15 {
		t.Errorf("events by owner over three days: %v; want shop 3 (reminders, one a day) and bank 15 (every deadline)", byOwner)
	}
	if runs != 30 {
		t.Errorf("%d runs, want 30 (10 keys, daily)", runs)
	}
	for id, k := range ids {
		rec, _ := f.akm.Get(id)
		c := f.akm.Verify(ctx, k, apikeys.Request{Environment: "prod"}).Code
		switch {
		case rec.Owner == "shop" && c != apikeys.Valid:
			t.Errorf("a reminded key: %v", c)
		case rec.Owner == "bank" && (c != apikeys.Expired || !named[id]):
			t.Errorf("a forced key: %v, named in an event %v", c, named[id])
		}
	}
}

// TestForcedNoticeNamesCurrentDeadline: a key rotated before (its old
// secret ended long ago) is told the deadline of the secret it uses now.
func TestForcedNoticeNamesCurrentDeadline(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	_, rec, err := f.akm.Create(ctx, apikeys.Spec{Owner: "o", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.akm.Rotate(ctx, rec.ID, 0); err != nil { // the first secret ends now
		t.Fatal(err)
	}
	rules := &schedule.Rules{APIKeys: []schedule.APIKeyRule{{Policy: "high", Action: schedule.Force}}}
	s := f.scheduler(rules, schedule.Config{})
	s.Tick(ctx)
	f.clk.add(31 * 24 * time.Hour)
	r, err := s.Tick(ctx)
	if err != nil || len(r) != 1 {
		t.Fatal(r, err)
	}
	want := f.clk.now().Add(schedule.High.Overlap).UTC().Format(time.RFC3339)
	if !strings.Contains(r[0].Detail, "before "+want) {
		t.Fatalf("the notice: %s; want the deadline %s", r[0].Detail, want)
	}
}

// TestSaveInBatches: the schedule of more subjects than one transaction of
// the store's contract holds is written, on a backend that refuses a
// larger transaction (as etcd's may), and every entry is in the plan.
func TestSaveInBatches(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := store.MaxTxKeys + 13
	subjects := make([]schedule.Subject, n)
	for i := range subjects {
		subjects[i] = schedule.Subject{Kind: schedule.APIKey, ID: fmt.Sprintf("ak_%024x", i), Action: schedule.Remind,
			Policy: schedule.Policy{Name: "yearly", Every: 365 * 24 * time.Hour}, Last: now}
	}
	s := schedule.New(schedule.Config{Store: storetest.Strict(st), Now: func() time.Time { return now },
		Sources: []schedule.Source{{Kind: schedule.APIKey, List: func() ([]schedule.Subject, error) { return subjects, nil },
			Run: func(context.Context, schedule.Subject) (string, error) { return "", nil }}}})
	if _, err := s.Tick(context.Background()); err != nil {
		t.Fatalf("a tick over %d subjects: %v", n, err)
	}
	plan, err := s.Plan()
	if err != nil || len(plan) != n {
		t.Fatalf("the plan holds %d entries, want %d: %v", len(plan), n, err)
	}
}
