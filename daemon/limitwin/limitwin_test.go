package limitwin_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/limitwin"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) set(t time.Time)     { c.mu.Lock(); c.t = t; c.mu.Unlock() }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

var t0 = time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC)

// open opens the windows on a real bbolt store at path.
func open(t *testing.T, path string, clk *clock) (*limitwin.Windows, *store.Store) {
	t.Helper()
	st, err := store.Open(path, storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	w, err := limitwin.New(st, clk.now)
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	return w, st
}

func schedule(t *testing.T, w *limitwin.Windows, win limitwin.Window) limitwin.Window {
	t.Helper()
	got, err := w.Schedule(win)
	if err != nil {
		t.Fatalf("Schedule(%s): %v", win.Target, err)
	}
	return got
}

var (
	shopProd = limitwin.Key{ID: "ak_000000000000000000000001", Owner: "shop", Environment: "prod"}
	shopDev  = limitwin.Key{ID: "ak_000000000000000000000002", Owner: "shop", Environment: "dev"}
	blogProd = limitwin.Key{ID: "ak_000000000000000000000003", Owner: "blog", Environment: "prod"}
)

// TestOnTime: a window applies from its start up to its end, by the clock
// of each verification and nothing else, and the same after a restart.
func TestOnTime(t *testing.T) {
	clk := &clock{t: t0}
	path := filepath.Join(t.TempDir(), "keyward.db")
	w, st := open(t, path, clk)
	start, end := t0.Add(7*24*time.Hour), t0.Add(11*24*time.Hour)
	win := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop", Environment: "prod"}, Factor: 3, Start: start, End: end, Reason: "Black Friday"})
	if !strings.HasPrefix(win.ID, "lw_") || len(win.ID) != 19 {
		t.Errorf("ID %q: want lw_ and 16 hex digits", win.ID)
	}
	for _, c := range []struct {
		at   time.Time
		key  limitwin.Key
		want float64
	}{
		{start.Add(-time.Nanosecond), shopProd, 1},
		{start, shopProd, 3},
		{end.Add(-time.Nanosecond), shopProd, 3},
		{end, shopProd, 1},
		{start, shopDev, 1},  // another environment
		{start, blogProd, 1}, // another owner
	} {
		if got := w.Factor(c.key, c.at); got != c.want {
			t.Errorf("Factor(%s %s, %v) = %v, want %v", c.key.Owner, c.key.Environment, c.at, got, c.want)
		}
	}
	st.Close()

	// A restart in the middle: the window is read back from the store.
	clk.set(start.Add(time.Hour))
	w, st = open(t, path, clk)
	defer st.Close()
	if got := w.Factor(shopProd, clk.now()); got != 3 {
		t.Errorf("after a restart, Factor = %v, want 3", got)
	}
	if got := w.Factor(shopProd, end); got != 1 {
		t.Errorf("after a restart, at the end Factor = %v, want 1", got)
	}
}

// TestMostSpecific: the key's own window wins over its owner's in its
// environment, which wins over its owner's, which wins over its
// environment's; factors never multiply.
func TestMostSpecific(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	end := t0.Add(24 * time.Hour)
	env := schedule(t, w, limitwin.Window{Target: limitwin.Target{Environment: "prod"}, Factor: 2, Start: t0, End: end, Reason: "launch"})
	if got := w.Factor(shopProd, t0); got != 2 {
		t.Errorf("environment's window: %v, want 2", got)
	}
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 4, Start: t0, End: end, Reason: "shop's sale"})
	if got := w.Factor(shopProd, t0); got != 4 {
		t.Errorf("owner's window over the environment's: %v, want 4", got)
	}
	if got := w.Factor(blogProd, t0); got != 2 {
		t.Errorf("another owner in prod: %v, want 2 (the environment's)", got)
	}
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop", Environment: "prod"}, Factor: 5, Start: t0, End: end, Reason: "shop's sale, prod"})
	if got := w.Factor(shopProd, t0); got != 5 {
		t.Errorf("owner-in-environment over owner's: %v, want 5", got)
	}
	if got := w.Factor(shopDev, t0); got != 4 {
		t.Errorf("shop in dev: %v, want 4 (the owner's)", got)
	}
	key := schedule(t, w, limitwin.Window{Target: limitwin.Target{Key: shopProd.ID}, KeyOwner: "shop", Factor: 0.5, Start: t0.Add(time.Hour), End: t0.Add(2 * time.Hour), Reason: "abusive client"})
	if got := w.Factor(shopProd, t0.Add(time.Hour)); got != 0.5 {
		t.Errorf("the key's own window: %v, want 0.5", got)
	}
	if got := w.Factor(shopProd, t0.Add(2*time.Hour)); got != 5 {
		t.Errorf("after the key's window: %v, want 5 again", got)
	}
	if o := w.Overriding(env, shopProd); o == nil || o.Key != shopProd.ID {
		t.Errorf("Overriding(environment's window, shop's prod key) = %v, want the key's window %s", o, key.ID)
	}
	if o := w.Overriding(env, blogProd); o != nil {
		t.Errorf("Overriding(environment's window, blog's key) = %v, want none", o)
	}
	if got := w.List(limitwin.Filter{Key: &shopProd}); len(got) != 4 {
		t.Errorf("List(covering shop's prod key) = %d windows, want 4", len(got))
	}
	if got := w.List(limitwin.Filter{Key: &blogProd}); len(got) != 1 || got[0].ID != env.ID {
		t.Errorf("List(covering blog's key) = %v, want the environment's only", got)
	}
}

// TestOverlap: two windows on one target may not overlap; back to back
// they may.
func TestOverlap(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	shop := limitwin.Target{Owner: "shop"}
	first := schedule(t, w, limitwin.Window{Target: shop, Factor: 2, Start: t0.Add(time.Hour), End: t0.Add(3 * time.Hour), Reason: "a"})
	_, err := w.Schedule(limitwin.Window{Target: shop, Factor: 3, Start: t0.Add(2 * time.Hour), End: t0.Add(4 * time.Hour), Reason: "b"})
	if !errors.Is(err, limitwin.ErrOverlap) || !strings.Contains(err.Error(), first.ID) {
		t.Fatalf("an overlapping window: %v, want ErrOverlap naming %s", err, first.ID)
	}
	schedule(t, w, limitwin.Window{Target: shop, Factor: 3, Start: t0.Add(3 * time.Hour), End: t0.Add(4 * time.Hour), Reason: "back to back"})
	// Cancelled, the first no longer stands in the way of what follows
	// its cancellation.
	clk.set(t0.Add(90 * time.Minute))
	if _, err := w.Cancel(first.ID, "uid=0"); err != nil {
		t.Fatal(err)
	}
	schedule(t, w, limitwin.Window{Target: shop, Factor: 1.5, Start: t0.Add(2 * time.Hour), End: t0.Add(3 * time.Hour), Reason: "c"})
	if got := len(w.List(limitwin.Filter{Target: &shop})); got != 2 {
		t.Errorf("pending and active windows of shop: %d, want 2", got)
	}
	if got := len(w.List(limitwin.Filter{Target: &shop, Ended: true})); got != 3 {
		t.Errorf("with those over: %d, want 3", got)
	}
}

// TestCancel: a cancelled window stops applying at once, and a pending one
// never starts; one over cannot be cancelled.
func TestCancel(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	active := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 3, Start: t0, End: t0.Add(time.Hour), Reason: "a"})
	pending := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "blog"}, Factor: 3, Start: t0.Add(time.Hour), End: t0.Add(2 * time.Hour), Reason: "b"})
	clk.add(time.Minute)
	got, err := w.Cancel(active.ID, "uid=1000 exe=/usr/bin/keyward")
	if err != nil || got.CancelledBy != "uid=1000 exe=/usr/bin/keyward" || got.State(clk.now()) != "cancelled" {
		t.Fatalf("Cancel: %+v, %v", got, err)
	}
	if f := w.Factor(shopProd, clk.now()); f != 1 {
		t.Errorf("after cancelling, Factor = %v, want 1", f)
	}
	if _, err := w.Cancel(pending.ID, "x"); err != nil {
		t.Fatal(err)
	}
	if f := w.Factor(blogProd, t0.Add(90*time.Minute)); f != 1 {
		t.Errorf("a cancelled pending window applied: %v", f)
	}
	if _, err := w.Cancel(active.ID, "x"); !errors.Is(err, limitwin.ErrEnded) {
		t.Errorf("cancelling twice: %v, want ErrEnded", err)
	}
	if _, err := w.Cancel("lw_0000000000000000", "x"); !errors.Is(err, limitwin.ErrNotFound) {
		t.Errorf("cancelling nothing: %v, want ErrNotFound", err)
	}
}

// TestInvalid: what may not be scheduled, each with a message that says
// what to do.
func TestInvalid(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	ok := limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 2, Start: t0.Add(time.Hour), End: t0.Add(2 * time.Hour), Reason: "sale"}
	for _, c := range []struct {
		name string
		edit func(*limitwin.Window)
		want string
	}{
		{"no target", func(w *limitwin.Window) { w.Target = limitwin.Target{} }, "say what the window covers"},
		{"key and owner", func(w *limitwin.Window) { w.Key = "ak_1" }, "not a key and an owner"},
		{"slash", func(w *limitwin.Window) { w.Owner = "a/b" }, "no '/'"},
		{"glob", func(w *limitwin.Window) { w.Owner = "*" }, "no '/', '*'"},
		{"factor 1", func(w *limitwin.Window) { w.Factor = 1 }, "changes nothing"},
		{"factor 0", func(w *limitwin.Window) { w.Factor = 0 }, "from 0.001"},
		{"factor too big", func(w *limitwin.Window) { w.Factor = 1000 }, "to 100"},
		{"ends before it starts", func(w *limitwin.Window) { w.End = w.Start.Add(-time.Second) }, "before it starts"},
		{"over already", func(w *limitwin.Window) { w.Start, w.End = t0.Add(-2*time.Hour), t0.Add(-time.Hour) }, "past already"},
		{"too long", func(w *limitwin.Window) { w.End = w.Start.Add(40 * 24 * time.Hour) }, "at most"},
		{"too far ahead", func(w *limitwin.Window) { w.Start, w.End = t0.AddDate(2, 0, 0), t0.AddDate(2, 0, 1) }, "ahead"},
		{"no reason", func(w *limitwin.Window) { w.Reason = " " }, "say why"},
		{"reason with a newline", func(w *limitwin.Window) { w.Reason = "a\nb" }, "one line"},
		{"reason too long", func(w *limitwin.Window) { w.Reason = strings.Repeat("é", 257) }, "at most 256 characters"},
		{"four decimals", func(w *limitwin.Window) { w.Factor = 1.0001 }, "at most 3 decimals"},
	} {
		win := ok
		c.edit(&win)
		_, err := w.Schedule(win)
		if !errors.Is(err, limitwin.ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want ErrInvalid saying %q", c.name, err, c.want)
		}
	}
	if got := w.List(limitwin.Filter{Ended: true}); len(got) != 0 {
		t.Errorf("refused windows were written: %v", got)
	}
	// 256 characters of two bytes each, and spaces of any kind, are fine.
	long := ok
	long.Reason, long.Target = strings.Repeat("é", 250)+"\t\u00a0sale", limitwin.Target{Owner: "blog"}
	schedule(t, w, long)
	// A start in the past is now.
	win := ok
	win.Start = t0.Add(-time.Hour)
	if got := schedule(t, w, win); !got.Start.Equal(t0) {
		t.Errorf("a past start: %v, want now (%v)", got.Start, t0)
	}
}

// TestDue: each start and end is due for its audit record once, a window
// that started and ended unseen only as ended, and a restart does not make
// a noticed one due again.
func TestDue(t *testing.T) {
	clk := &clock{t: t0}
	path := filepath.Join(t.TempDir(), "keyward.db")
	w, st := open(t, path, clk)
	a := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 2, Start: t0.Add(time.Hour), End: t0.Add(2 * time.Hour), Reason: "a"})
	b := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "blog"}, Factor: 2, Start: t0.Add(time.Hour), End: t0.Add(90 * time.Minute), Reason: "b"})
	if due := w.Due(); len(due) != 0 {
		t.Fatalf("due before any start: %v", due)
	}
	clk.set(t0.Add(time.Hour))
	due := w.Due()
	if len(due) != 2 || due[0].Boundary != limitwin.Started || due[1].Boundary != limitwin.Started {
		t.Fatalf("due at the start: %+v", due)
	}
	for _, n := range due {
		if err := w.Noticed(n); err != nil {
			t.Fatal(err)
		}
	}
	if due := w.Due(); len(due) != 0 {
		t.Fatalf("due again after being noticed: %v", due)
	}
	st.Close()
	clk.set(t0.Add(3 * time.Hour)) // both over while keywardd was down
	w, st = open(t, path, clk)
	defer st.Close()
	due = w.Due()
	if len(due) != 2 || due[0].Boundary != limitwin.Ended || due[1].Boundary != limitwin.Ended {
		t.Fatalf("due after both ended: %+v", due)
	}
	for _, n := range due {
		if n.Window.ID != a.ID && n.Window.ID != b.ID {
			t.Errorf("due: unknown window %s", n.Window.ID)
		}
		if err := w.Noticed(n); err != nil {
			t.Fatal(err)
		}
	}
	if due := w.Due(); len(due) != 0 {
		t.Fatalf("due after the ends were noticed: %v", due)
	}
	// Kept for the plan's history, then dropped by the next write.
	if got := w.List(limitwin.Filter{Ended: true}); len(got) != 2 {
		t.Errorf("history: %d windows, want 2", len(got))
	}
	clk.add(limitwin.Keep + time.Hour)
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 2, Start: clk.now(), End: clk.now().Add(time.Hour), Reason: "later"})
	if got := w.List(limitwin.Filter{Ended: true, Target: &limitwin.Target{Owner: "shop"}}); len(got) != 1 {
		t.Errorf("shop's history past Keep: %d windows, want only the new one", len(got))
	}
}

// TestChanged: another node's write, taken from the fleet's change feed,
// reaches Factor without a read of the store; a deleted record drops its
// windows.
func TestChanged(t *testing.T) {
	clk := &clock{t: t0}
	dir := t.TempDir()
	a, sta := open(t, filepath.Join(dir, "a.db"), clk)
	defer sta.Close()
	b, stb := open(t, filepath.Join(dir, "b.db"), clk)
	defer stb.Close()
	win := schedule(t, a, limitwin.Window{Target: limitwin.Target{Environment: "prod"}, Factor: 2, Start: t0, End: t0.Add(time.Hour), Reason: "launch"})
	// What the feed hands b: the record a wrote, as it is now.
	var key string
	var rec []byte
	err := sta.ForEach(store.BucketSchedule, limitwin.Prefix, func(k string, r []byte) error { key, rec = k, r; return nil })
	if err != nil || rec == nil {
		t.Fatalf("the record a wrote: %v", err)
	}
	if err := b.Changed(key, rec); err != nil {
		t.Fatal(err)
	}
	if got := b.Factor(blogProd, t0); got != 2 {
		t.Errorf("b after the change: %v, want 2", got)
	}
	if got, err := b.Get(win.ID); err != nil || got.Reason != "launch" {
		t.Errorf("b.Get: %v, %v", got, err)
	}
	if err := b.Changed(key, nil); err != nil {
		t.Fatal(err)
	}
	if got := b.Factor(blogProd, t0); got != 1 {
		t.Errorf("b after the record's deletion: %v, want 1", got)
	}
	if err := b.Changed(key, []byte("{")); err == nil {
		t.Error("a record that does not parse was taken")
	}
	if err := b.Changed("key/ak_1", rec); err != nil || b.Factor(blogProd, t0) != 1 {
		t.Errorf("a record outside limits/ was taken: %v", err)
	}
}

// BenchmarkFactor is the cost a verification pays: no window at all, and
// 1000 windows of other owners (the most that may be pending or active,
// MaxLive), plus 10 000 ended ones: the lookup is by target, not a scan.
func BenchmarkFactor(b *testing.B) {
	clk := &clock{t: t0}
	st, err := store.Open(filepath.Join(b.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	w, err := limitwin.New(st, clk.now)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("none", func(b *testing.B) {
		for b.Loop() {
			w.Factor(shopProd, t0)
		}
	})
	for i := range 11_000 {
		win := limitwin.Window{ID: fmt.Sprintf("lw_%016x", i), Target: limitwin.Target{Owner: fmt.Sprintf("team-%d", i)},
			Factor: 2, Start: t0, End: t0.Add(time.Hour), Reason: "x"}
		if i >= 1000 {
			win.Start, win.End, win.Noticed = t0.Add(-48*time.Hour), t0.Add(-24*time.Hour), limitwin.Ended
		}
		rec, _ := json.Marshal([]limitwin.Window{win})
		if err := w.Changed(fmt.Sprintf("%sowner/team-%d", limitwin.Prefix, i), rec); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("many", func(b *testing.B) {
		for b.Loop() {
			w.Factor(shopProd, t0)
		}
	})
}

// TestCutWins: where a cut and a raise cover a key at once, the cut
// applies, the deepest of several, whatever the targets: a raise for an
// owner cannot undo an operator's cut of the environment.
func TestCutWins(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	end := t0.Add(time.Hour)
	envCut := schedule(t, w, limitwin.Window{Target: limitwin.Target{Environment: "prod"}, Factor: 0.5, Start: t0, End: end, Reason: "incident"})
	raise := schedule(t, w, limitwin.Window{Target: limitwin.Target{Key: shopProd.ID}, KeyOwner: "shop", Factor: 100, Start: t0, End: end, Reason: "mine"})
	if got := w.Factor(shopProd, t0); got != 0.5 {
		t.Errorf("the key's raise over the environment's cut: %v, want 0.5", got)
	}
	if o := w.Overriding(raise, shopProd); o == nil || o.ID != envCut.ID {
		t.Errorf("Overriding(the raise) = %v, want the environment's cut", o)
	}
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 0.25, Start: t0, End: end, Reason: "deeper"})
	if got := w.Factor(shopProd, t0); got != 0.25 {
		t.Errorf("two cuts: %v, want the deeper, 0.25", got)
	}
	if got := w.Factor(blogProd, t0); got != 0.5 {
		t.Errorf("blog in prod: %v, want the environment's 0.5", got)
	}
}

// TestBadRecord: a record that does not parse does not stop New (keywardd
// starts), is reported by Bad, keeps the other windows, and is replaced by
// the next write of its target.
func TestBadRecord(t *testing.T) {
	clk := &clock{t: t0}
	path := filepath.Join(t.TempDir(), "keyward.db")
	w, st := open(t, path, clk)
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 3, Start: t0, End: t0.Add(time.Hour), Reason: "sale"})
	if err := st.Update(store.BucketSchedule, limitwin.Prefix+"owner/blog", func([]byte) ([]byte, error) { return []byte("{not json"), nil }); err != nil {
		t.Fatal(err)
	}
	st.Close()
	w, st = open(t, path, clk)
	defer st.Close()
	if bad := w.Bad(); len(bad) != 1 || bad[limitwin.Prefix+"owner/blog"] == "" {
		t.Errorf("Bad() = %v", bad)
	}
	if f := w.Factor(shopProd, t0); f != 3 {
		t.Errorf("the good window is lost: factor %v", f)
	}
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "blog"}, Factor: 2, Start: t0, End: t0.Add(time.Hour), Reason: "fresh"})
	if bad := w.Bad(); len(bad) != 0 || w.Factor(blogProd, t0) != 2 {
		t.Errorf("after a write of its target: Bad() = %v, factor %v", bad, w.Factor(blogProd, t0))
	}
}

// slowStore delays the return of chosen Updates, after their commit, as
// a goroutine descheduled between the commit and its taking effect is.
type slowStore struct {
	*store.Store
	mu    sync.Mutex
	delay map[int]time.Duration
	n     int
}

func (s *slowStore) Update(bucket, key string, fn func([]byte) ([]byte, error)) error {
	s.mu.Lock()
	s.n++
	d := s.delay[s.n]
	s.mu.Unlock()
	err := s.Store.Update(bucket, key, fn)
	time.Sleep(d)
	return err
}

// TestCancelRacesNotice: the job records a window's start (Noticed) while
// an operator cancels it; the two writes take effect in the order they
// were committed, so the cancelled window stays cancelled.
func TestCancelRacesNotice(t *testing.T) {
	clk := &clock{t: t0}
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ss := &slowStore{Store: st, delay: map[int]time.Duration{2: 200 * time.Millisecond}}
	w, err := limitwin.New(ss, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	win := schedule(t, w, limitwin.Window{Target: limitwin.Target{Owner: "shop"}, Factor: 3, Start: t0, End: t0.Add(24 * time.Hour), Reason: "sale"}) // update 1
	clk.add(time.Second)
	due := w.Due()
	if len(due) != 1 {
		t.Fatalf("due: %v", due)
	}
	done := make(chan error)
	go func() { done <- w.Noticed(due[0]) }() // update 2: committed, then slow to return
	time.Sleep(50 * time.Millisecond)
	if _, err := w.Cancel(win.ID, "uid=0"); err != nil { // update 3
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	clk.add(time.Second)
	if f := w.Factor(shopProd, clk.now()); f != 1 {
		t.Fatalf("a window cancelled (and the cancel answered OK) still applies: factor %v", f)
	}
}

// TestPrune: windows over and audited go from the store and the plan Keep
// after their end, by Prune (the audit job runs it), though their target
// is never written again; Tidy drops ended windows from what Factor looks
// at.
func TestPrune(t *testing.T) {
	clk := &clock{t: t0}
	w, st := open(t, filepath.Join(t.TempDir(), "keyward.db"), clk)
	defer st.Close()
	schedule(t, w, limitwin.Window{Target: limitwin.Target{Key: shopProd.ID}, KeyOwner: "shop", Factor: 3, Start: t0, End: t0.Add(time.Hour), Reason: "sale"})
	clk.add(2 * time.Hour)
	w.Tidy()
	for _, n := range w.Due() {
		if err := w.Noticed(n); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Prune(); err != nil {
		t.Fatal(err)
	}
	if got := w.List(limitwin.Filter{Ended: true}); len(got) != 1 {
		t.Fatalf("within Keep: %d windows on record, want 1", len(got))
	}
	clk.add(limitwin.Keep)
	if err := w.Prune(); err != nil {
		t.Fatal(err)
	}
	if got := w.List(limitwin.Filter{Ended: true}); len(got) != 0 {
		t.Errorf("%d windows listed past Keep", len(got))
	}
	n := 0
	st.ForEach(store.BucketSchedule, limitwin.Prefix, func(string, []byte) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d records still in the store past Keep", n)
	}
}
