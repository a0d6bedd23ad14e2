package storetest

// The conformance suite of store.Backend: every promise of its doc comment,
// checked through the interface alone, so that any backend can run it.

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/keyward/keyward/daemon/store"
)

// NewState makes a new, empty state for one test and returns how to open
// it. open may be called again once the backend it returned is closed, and
// opens the same state: the suite checks that what was written survives.
// Failing to open is the test's failure (t.Fatal).
type NewState func(t *testing.T) (open func() store.Backend)

// Run checks a backend against the contract of store.Backend, one subtest
// per promise, each on a state of its own. A new backend runs it from a
// test of its package:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) func() store.Backend {
//			cfg := newStateFor(t) // a fresh prefix, a fresh file...
//			return func() store.Backend { return openOrFatal(t, cfg) }
//		})
//	}
func Run(t *testing.T, newState NewState) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			open := newState(t)
			b := open()
			t.Cleanup(func() { b.Close() })
			c.fn(t, &state{b: b, open: open})
		})
	}
}

// state is the backend under test and how to open its state again.
type state struct {
	b    store.Backend
	open func() store.Backend
}

// reopen closes the backend and opens the same state again.
func (s *state) reopen(t *testing.T) {
	t.Helper()
	if err := s.b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s.b = s.open()
	t.Cleanup(func() { s.b.Close() })
}

var cases = []struct {
	name string
	fn   func(t *testing.T, s *state)
}{
	{"RoundTrip", testRoundTrip},
	{"Absent", testAbsent},
	{"Delete", testDelete},
	{"AtomicUpdateEach", testAtomic},
	{"PanicWritesNothing", testPanic},
	{"CallsOnceInOrder", testCallsOnce},
	{"Order", testOrder},
	{"WalkStops", testWalkStops},
	{"Events", testEvents},
	{"LargeTransaction", testLarge},
	{"LargeEvents", testLargeEvents},
	{"BeyondLimit", testBeyondLimit},
	{"Keys", testKeys},
	{"ConcurrentWriters", testConcurrentWriters},
	{"ReadersDuringWriter", testReadersDuringWriter},
	{"Writes", testWrites},
	{"Close", testClose},
	{"Errors", testErrors},
}

// The buckets the suite writes: any of the schema's serves.
const (
	bA = store.BucketKeys
	bB = store.BucketCredentials
)

func put(t *testing.T, b store.Backend, bucket, key string, rec []byte) {
	t.Helper()
	if err := b.Update(bucket, key, func([]byte) ([]byte, error) { return rec, nil }); err != nil {
		t.Fatalf("Update %s/%s: %v", bucket, key, err)
	}
}

func get(t *testing.T, b store.Backend, bucket, key string) []byte {
	t.Helper()
	rec, err := b.Get(bucket, key)
	if err != nil {
		t.Fatalf("Get %s/%s: %v", bucket, key, err)
	}
	return rec
}

func absent(t *testing.T, b store.Backend, bucket, key string) {
	t.Helper()
	if rec, err := b.Get(bucket, key); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get %s/%s = %q, %v; want ErrNotFound", bucket, key, rec, err)
	}
}

// all is a bucket's records in the order ForEach visits them.
func all(t *testing.T, b store.Backend, bucket string) (keys []string, recs [][]byte) {
	t.Helper()
	if err := b.ForEach(bucket, "", func(k string, rec []byte) error {
		keys, recs = append(keys, k), append(recs, rec)
		return nil
	}); err != nil {
		t.Fatalf("ForEach %s: %v", bucket, err)
	}
	return keys, recs
}

func testRoundTrip(t *testing.T, s *state) {
	for _, bucket := range store.Buckets() {
		put(t, s.b, bucket, "k", []byte("in "+bucket))
	}
	for _, bucket := range store.Buckets() {
		if got := get(t, s.b, bucket, "k"); string(got) != "in "+bucket {
			t.Errorf("%s/k = %q: buckets are not separate", bucket, got)
		}
	}

	// What the caller hands over and what it gets are its own.
	in := []byte("original")
	put(t, s.b, bA, "copy", in)
	copy(in, "CHANGED!")
	got := get(t, s.b, bA, "copy")
	copy(got, "changed?")
	if again := get(t, s.b, bA, "copy"); string(again) != "original" {
		t.Errorf("after changing buffers handed in and out, the record is %q", again)
	}

	// An empty record is a record.
	put(t, s.b, bA, "empty", []byte{})
	if got := get(t, s.b, bA, "empty"); got == nil || len(got) != 0 {
		t.Errorf("empty record read back as %#v, want empty and non-nil", got)
	}
	var saw []byte
	s.b.Update(bA, "empty", func(old []byte) ([]byte, error) { saw = old; return old, nil })
	if saw == nil {
		t.Error("Update handed nil for an empty record: it is present")
	}

	// Durable: the state opened again has it.
	s.reopen(t)
	if got := get(t, s.b, bA, "copy"); string(got) != "original" {
		t.Errorf("after reopening, %q", got)
	}
	if got := get(t, s.b, bA, "empty"); got == nil || len(got) != 0 {
		t.Errorf("after reopening, the empty record is %#v", got)
	}
}

func testAbsent(t *testing.T, s *state) {
	absent(t, s.b, bA, "nothing")
	calls := 0
	if err := s.b.Update(bA, "nothing", func(old []byte) ([]byte, error) {
		calls++
		if old != nil {
			t.Errorf("old of an absent key = %#v, want nil", old)
		}
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	if calls != 1 {
		t.Errorf("fn called %d times", calls)
	}
	absent(t, s.b, bA, "nothing")
	if keys, _ := all(t, s.b, bA); len(keys) != 0 {
		t.Errorf("a nil record for an absent key left %q", keys)
	}
}

func testDelete(t *testing.T, s *state) {
	for _, k := range []string{"a", "b", "c"} {
		put(t, s.b, bA, k, []byte(k))
	}
	put(t, s.b, bB, "a", []byte("other bucket"))
	if err := s.b.UpdateEach(bA, []string{"a", "b"}, func(k string, old []byte) ([]byte, error) {
		if k == "a" {
			return nil, nil
		}
		return old, nil
	}); err != nil {
		t.Fatal(err)
	}
	absent(t, s.b, bA, "a")
	if keys, _ := all(t, s.b, bA); !slices.Equal(keys, []string{"b", "c"}) {
		t.Errorf("after deleting a: %q", keys)
	}
	if got := get(t, s.b, bB, "a"); string(got) != "other bucket" {
		t.Errorf("deleting a in %s changed %s: %q", bA, bB, got)
	}
	s.reopen(t)
	absent(t, s.b, bA, "a")
	put(t, s.b, bA, "a", []byte("again"))
	if got := get(t, s.b, bA, "a"); string(got) != "again" {
		t.Errorf("a deleted key written again: %q", got)
	}
}

// errThird is the error a caller's fn returns.
type errThird struct{ key string }

func (e *errThird) Error() string { return "caller: refused " + e.key }

func testAtomic(t *testing.T, s *state) {
	put(t, s.b, bA, "k1", []byte("old1"))
	put(t, s.b, bA, "k2", []byte("old2"))
	_, outBefore := all(t, s.b, store.BucketOutbox)
	want := &errThird{"k3"}
	for _, emit := range []bool{false, true} {
		var called []string
		fn := func(k string, old []byte) ([]byte, [][]byte, error) {
			called = append(called, k)
			if k == "k3" {
				return nil, nil, want
			}
			return []byte("new " + k), [][]byte{[]byte("event " + k)}, nil
		}
		keys := []string{"k1", "k2", "k3", "k4"}
		var err error
		if emit {
			err = s.b.UpdateEachEmit(bA, keys, fn)
		} else {
			err = s.b.UpdateEach(bA, keys, func(k string, old []byte) ([]byte, error) {
				rec, _, err := fn(k, old)
				return rec, err
			})
		}
		var got *errThird
		if !errors.As(err, &got) || got != want {
			t.Fatalf("emit %v: the error of fn came back as %v, want it as it is", emit, err)
		}
		if !slices.Equal(called, []string{"k1", "k2", "k3"}) {
			t.Errorf("emit %v: fn called for %q, want k1, k2, k3 and no more", emit, called)
		}
		if a, b := get(t, s.b, bA, "k1"), get(t, s.b, bA, "k2"); string(a) != "old1" || string(b) != "old2" {
			t.Errorf("emit %v: a failed transaction wrote k1 = %q, k2 = %q", emit, a, b)
		}
		absent(t, s.b, bA, "k3")
		absent(t, s.b, bA, "k4")
		if _, out := all(t, s.b, store.BucketOutbox); len(out) != len(outBefore) {
			t.Errorf("emit %v: a failed transaction emitted %d events", emit, len(out)-len(outBefore))
		}
	}
	// The same transaction without the error writes all.
	if err := s.b.UpdateEach(bA, []string{"k1", "k2", "k3"}, func(k string, _ []byte) ([]byte, error) { return []byte("new " + k), nil }); err != nil {
		t.Fatal(err)
	}
	if _, recs := all(t, s.b, bA); len(recs) != 3 || string(recs[2]) != "new k3" {
		t.Errorf("after a good transaction: %q", recs)
	}
}

func testPanic(t *testing.T, s *state) {
	put(t, s.b, bA, "p1", []byte("old"))
	type boom struct{}
	func() {
		defer func() {
			if r := recover(); r != (boom{}) {
				t.Errorf("recovered %v, want fn's own panic", r)
			}
		}()
		s.b.UpdateEachEmit(bA, []string{"p1", "p2"}, func(k string, _ []byte) ([]byte, [][]byte, error) {
			if k == "p2" {
				panic(boom{})
			}
			return []byte("new"), [][]byte{[]byte("e")}, nil
		})
		t.Error("a panic in fn did not reach the caller")
	}()
	if got := get(t, s.b, bA, "p1"); string(got) != "old" {
		t.Errorf("a panicking transaction wrote p1 = %q", got)
	}
	if _, out := all(t, s.b, store.BucketOutbox); len(out) != 0 {
		t.Errorf("a panicking transaction emitted %d events", len(out))
	}
	// The backend goes on serving.
	put(t, s.b, bA, "p1", []byte("after"))
	if got := get(t, s.b, bA, "p1"); string(got) != "after" {
		t.Errorf("after a panic, p1 = %q", got)
	}
	func() {
		defer func() { recover() }()
		s.b.ForEach(bA, "", func(string, []byte) error { panic(boom{}) })
	}()
	put(t, s.b, bA, "p2", []byte("x"))
}

func testCallsOnce(t *testing.T, s *state) {
	put(t, s.b, bA, "b", []byte("0"))
	var calls []string
	if err := s.b.UpdateEach(bA, []string{"c", "a", "b", "a"}, func(k string, old []byte) ([]byte, error) {
		calls = append(calls, k+"="+string(old))
		return append(old, '+'), nil
	}); err != nil {
		t.Fatal(err)
	}
	// A key given twice sees the first result.
	if want := []string{"c=", "a=", "b=0", "a=+"}; !slices.Equal(calls, want) {
		t.Errorf("fn calls %q, want %q", calls, want)
	}
	if got := get(t, s.b, bA, "a"); string(got) != "++" {
		t.Errorf("a = %q, want ++", got)
	}
}

// orderKeys are written shuffled; this is their byte order.
var orderKeys = []string{"a", "a/1", "a/10", "a/2", "a0", "b", "z", "\u00e9", "\xff"}

func writeShuffled(t *testing.T, b store.Backend) {
	t.Helper()
	shuffled := slices.Clone(orderKeys)
	slices.Reverse(shuffled)
	shuffled[1], shuffled[4] = shuffled[4], shuffled[1]
	for _, k := range shuffled {
		put(t, b, bA, k, []byte("v"+k))
	}
}

func walk(t *testing.T, f func(fn func(string, []byte) error) error) []string {
	t.Helper()
	var keys []string
	if err := f(func(k string, rec []byte) error {
		if string(rec) != "v"+k {
			t.Errorf("%q holds %q", k, rec)
		}
		keys = append(keys, k)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

func testOrder(t *testing.T, s *state) {
	writeShuffled(t, s.b)
	put(t, s.b, bB, "a/3", []byte("va/3")) // another bucket: never visited
	for _, c := range []struct {
		prefix string
		want   []string
	}{
		{"", orderKeys},
		{"a", orderKeys[:5]},
		{"a/", orderKeys[1:4]},
		{"a/1", orderKeys[1:3]},
		{"a/10", orderKeys[2:3]},
		{"c", nil},
		{"\xff", orderKeys[8:]},
	} {
		got := walk(t, func(fn func(string, []byte) error) error { return s.b.ForEach(bA, c.prefix, fn) })
		if !slices.Equal(got, c.want) {
			t.Errorf("ForEach(%q) = %q, want %q", c.prefix, got, c.want)
		}
	}
	for _, c := range []struct {
		after string
		want  []string
	}{
		{"", orderKeys},
		{"a", orderKeys[1:]},
		{"a/1", orderKeys[2:]},
		{"a/15", orderKeys[3:]}, // not a key: from the next one
		{"a0", orderKeys[5:]},
		{"\xff", nil},
		{"\xff\xff", nil},
	} {
		got := walk(t, func(fn func(string, []byte) error) error { return s.b.ForEachAfter(bA, c.after, fn) })
		if !slices.Equal(got, c.want) {
			t.Errorf("ForEachAfter(%q) = %q, want %q", c.after, got, c.want)
		}
	}
}

var errStop = errors.New("caller: stop")

func testWalkStops(t *testing.T, s *state) {
	writeShuffled(t, s.b)
	for name, f := range map[string]func(fn func(string, []byte) error) error{
		"ForEach":      func(fn func(string, []byte) error) error { return s.b.ForEach(bA, "", fn) },
		"ForEachAfter": func(fn func(string, []byte) error) error { return s.b.ForEachAfter(bA, "", fn) },
	} {
		var seen []string
		err := f(func(k string, _ []byte) error {
			seen = append(seen, k)
			if len(seen) == 3 {
				return fmt.Errorf("wrapped: %w", errStop)
			}
			return nil
		})
		if !errors.Is(err, errStop) {
			t.Errorf("%s: fn's error came back as %v", name, err)
		}
		if !slices.Equal(seen, orderKeys[:3]) {
			t.Errorf("%s went on after fn's error: %q", name, seen)
		}
	}
}

// events is the outbox's events in order, with their sequence numbers.
func events(t *testing.T, b store.Backend) (seqs []uint64, evs []string) {
	t.Helper()
	keys, recs := all(t, b, store.BucketOutbox)
	for i, k := range keys {
		seq, err := strconv.ParseUint(k, 10, 64)
		if err != nil || store.OutboxKey(seq) != k {
			t.Fatalf("outbox key %q is not an OutboxKey", k)
		}
		seqs, evs = append(seqs, seq), append(evs, string(recs[i]))
	}
	return seqs, evs
}

func emit(t *testing.T, b store.Backend, keys []string, perKey int) {
	t.Helper()
	if err := b.UpdateEachEmit(bA, keys, func(k string, _ []byte) ([]byte, [][]byte, error) {
		var evs [][]byte
		for i := range perKey {
			evs = append(evs, fmt.Appendf(nil, "%s#%d", k, i))
		}
		return []byte("r"), evs, nil
	}); err != nil {
		t.Fatal(err)
	}
}

func testEvents(t *testing.T, s *state) {
	emit(t, s.b, []string{"x", "y"}, 2)
	if err := s.b.UpdateEachEmit(bA, []string{"none"}, func(string, []byte) ([]byte, [][]byte, error) { return []byte("r"), nil, nil }); err != nil {
		t.Fatal(err)
	}
	emit(t, s.b, []string{"z"}, 1)
	seqs, evs := events(t, s.b)
	if want := []string{"x#0", "x#1", "y#0", "y#1", "z#0"}; !slices.Equal(evs, want) {
		t.Fatalf("outbox %q, want %q (the events in the order emitted, with their records)", evs, want)
	}
	if !slices.IsSorted(seqs) || len(slices.Compact(slices.Clone(seqs))) != len(seqs) || seqs[0] == 0 {
		t.Fatalf("sequence numbers %v do not increase", seqs)
	}
	if got := get(t, s.b, bA, "x"); string(got) != "r" {
		t.Errorf("the record beside the events: %q", got)
	}

	// Numbers are never used again, even once their events are gone.
	last := seqs[len(seqs)-1]
	var keys []string
	for _, q := range seqs {
		keys = append(keys, store.OutboxKey(q))
	}
	if err := s.b.UpdateEach(store.BucketOutbox, keys, func(string, []byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	s.reopen(t)
	emit(t, s.b, []string{"w"}, 1)
	seqs, evs = events(t, s.b)
	if len(seqs) != 1 || seqs[0] <= last || evs[0] != "w#0" {
		t.Errorf("after deleting events up to %d and reopening, the outbox is %v %q: a number was used again", last, seqs, evs)
	}
}

// large writes n keys in one transaction, each record of size bytes.
func large(t *testing.T, b store.Backend, prefix string, n, size int) {
	t.Helper()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s%06d", prefix, i)
	}
	if err := b.UpdateEach(bA, keys, func(k string, _ []byte) ([]byte, error) { return record(k, size), nil }); err != nil {
		t.Fatalf("a transaction of %d keys of %d bytes: %v", n, size, err)
	}
}

// record is a record of size bytes that names its key.
func record(key string, size int) []byte {
	return append([]byte(key+":"), bytes.Repeat([]byte{'.'}, size-len(key)-1)...)
}

func testLarge(t *testing.T, s *state) {
	size := store.MaxTxBytes / store.MaxTxKeys
	large(t, s.b, "k", store.MaxTxKeys, size)
	n := 0
	if err := s.b.ForEach(bA, "k", func(k string, rec []byte) error {
		if !bytes.Equal(rec, record(k, size)) {
			return fmt.Errorf("%s holds another record", k)
		}
		n++
		return nil
	}); err != nil || n != store.MaxTxKeys {
		t.Fatalf("%d of %d records read back: %v", n, store.MaxTxKeys, err)
	}
	// One record of the largest size.
	big := record("big", store.MaxRecordSize)
	put(t, s.b, bB, "big", big)
	if got := get(t, s.b, bB, "big"); !bytes.Equal(got, big) {
		t.Errorf("a record of %d bytes read back as %d bytes", len(big), len(got))
	}
}

func testLargeEvents(t *testing.T, s *state) {
	keys := make([]string, store.MaxTxKeys/2)
	for i := range keys {
		keys[i] = fmt.Sprintf("e%06d", i)
	}
	emit(t, s.b, keys, 1)
	seqs, evs := events(t, s.b)
	if len(evs) != len(keys) || evs[0] != keys[0]+"#0" || evs[len(evs)-1] != keys[len(keys)-1]+"#0" {
		t.Fatalf("%d events of %d, from %q to %q", len(evs), len(keys), evs[0], evs[len(evs)-1])
	}
	if !slices.IsSorted(seqs) {
		t.Error("the events' numbers do not follow their order")
	}
}

func testBeyondLimit(t *testing.T, s *state) {
	n := store.MaxTxKeys + 1
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("k%06d", i)
	}
	err := s.b.UpdateEach(bA, keys, func(k string, _ []byte) ([]byte, error) { return []byte(k), nil })
	got, _ := all(t, s.b, bA)
	switch {
	case err == nil && len(got) != n:
		t.Errorf("a transaction of %d keys returned nil and wrote %d", n, len(got))
	case errors.Is(err, store.ErrTooLarge) && len(got) != 0:
		t.Errorf("a transaction refused as too large wrote %d keys", len(got))
	case err != nil && !errors.Is(err, store.ErrTooLarge):
		t.Errorf("a transaction of %d keys: %v, want nil or ErrTooLarge", n, err)
	}
}

func testKeys(t *testing.T, s *state) {
	long := string(bytes.Repeat([]byte{'k'}, store.MaxKeyLen))
	for _, k := range []string{long, "\x00", "a\x00b", "with space", "a/b/c"} {
		put(t, s.b, bA, k, []byte(k))
		if got := get(t, s.b, bA, k); string(got) != k {
			t.Errorf("key %q: %q", k, got)
		}
	}
	before := s.b.Writes()
	for name, err := range everyCall(s.b, bA, "fine", "") {
		if strings.HasPrefix(name, "ForEach") {
			continue // a prefix or a start, not a key: "" is all
		}
		if !errors.Is(err, store.ErrInvalidKey) {
			t.Errorf("%s with an empty key: %v, want ErrInvalidKey", name, err)
		}
	}
	absent(t, s.b, bA, "fine")
	if s.b.Writes() != before {
		t.Errorf("refused writes moved Writes from %d to %d", before, s.b.Writes())
	}
}

func testConcurrentWriters(t *testing.T, s *state) {
	const writers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for range each {
				// One counter of its own, one shared by all, and a pair
				// written together whose sum stays 0.
				err := s.b.UpdateEach(bA, []string{"shared", fmt.Sprint("own", w), "plus", "minus"}, func(k string, old []byte) ([]byte, error) {
					n, _ := strconv.Atoi(string(old))
					if k == "minus" {
						return []byte(strconv.Itoa(n - 1)), nil
					}
					return []byte(strconv.Itoa(n + 1)), nil
				})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	// A reader meanwhile sees the pair from one transaction.
	done := make(chan struct{})
	var rg sync.WaitGroup
	rg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			var plus, minus int
			s.b.ForEach(bA, "", func(k string, rec []byte) error {
				switch k {
				case "plus":
					plus, _ = strconv.Atoi(string(rec))
				case "minus":
					minus, _ = strconv.Atoi(string(rec))
				}
				return nil
			})
			if plus+minus != 0 {
				errs <- fmt.Errorf("a reader saw part of a transaction: plus %d, minus %d", plus, minus)
				return
			}
		}
	})
	wg.Wait()
	close(done)
	rg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	counter := func(k string) int {
		n, _ := strconv.Atoi(string(get(t, s.b, bA, k)))
		return n
	}
	if got := counter("shared"); got != writers*each {
		t.Errorf("shared counter %d, want %d: updates were lost", got, writers*each)
	}
	for w := range writers {
		if got := counter(fmt.Sprint("own", w)); got != each {
			t.Errorf("own%d = %d, want %d", w, got, each)
		}
	}
	// And with Update alone.
	var ug sync.WaitGroup
	for range writers {
		ug.Go(func() {
			for range each {
				if err := s.b.Update(bB, "n", func(old []byte) ([]byte, error) {
					n, _ := strconv.Atoi(string(old))
					return []byte(strconv.Itoa(n + 1)), nil
				}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	ug.Wait()
	if n, _ := strconv.Atoi(string(get(t, s.b, bB, "n"))); n != writers*each {
		t.Errorf("Update counter %d, want %d: updates were lost", n, writers*each)
	}
}

// testReadersDuringWriter: a writer sets every key of a set to the same
// generation in each transaction; readers must see one generation in a
// walk, and never an older one than they saw before.
func testReadersDuringWriter(t *testing.T, s *state) {
	const keys, gens, readers = 40, 60, 3
	set := make([]string, keys)
	for i := range set {
		set[i] = fmt.Sprintf("g%02d", i)
	}
	write := func(g int) error {
		return s.b.UpdateEach(bA, set, func(string, []byte) ([]byte, error) { return []byte(strconv.Itoa(g)), nil })
	}
	if err := write(0); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	errs := make(chan error, readers+1)
	var wg sync.WaitGroup
	for range readers {
		wg.Go(func() {
			last := 0
			for {
				select {
				case <-done:
					return
				default:
				}
				seen := map[string]bool{}
				n := 0
				err := s.b.ForEach(bA, "g", func(_ string, rec []byte) error {
					seen[string(rec)] = true
					n++
					return nil
				})
				if err != nil || n != keys || len(seen) != 1 {
					errs <- fmt.Errorf("a walk during writes saw %d keys of generations %v (err %v): want all %d of one", n, seen, err, keys)
					return
				}
				for g := range seen {
					gn, _ := strconv.Atoi(g)
					if gn < last {
						errs <- fmt.Errorf("a reader saw generation %d after %d", gn, last)
						return
					}
					last = gn
				}
				rec, err := s.b.Get(bA, set[keys-1])
				if gn, _ := strconv.Atoi(string(rec)); err != nil || gn < last {
					errs <- fmt.Errorf("a Get saw generation %d (%v) after a walk saw %d", gn, err, last)
					return
				}
			}
		})
	}
	for g := 1; g <= gens; g++ {
		if err := write(g); err != nil {
			errs <- err
			break
		}
		// Read-your-writes: the write is seen once it returned.
		if rec, err := s.b.Get(bA, set[0]); err != nil || string(rec) != strconv.Itoa(g) {
			errs <- fmt.Errorf("after writing generation %d, a Get saw %q (%v)", g, rec, err)
			break
		}
	}
	close(done)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func testWrites(t *testing.T, s *state) {
	w := s.b.Writes()
	for i := range 5 {
		put(t, s.b, bA, "k", []byte{byte(i)})
		if now := s.b.Writes(); now <= w {
			t.Fatalf("Writes %d after a write, %d before", now, w)
		} else {
			w = now
		}
	}
	emit(t, s.b, []string{"e"}, 1)
	if s.b.Writes() <= w {
		t.Fatal("UpdateEachEmit did not move Writes")
	}
	w = s.b.Writes()

	// Never decreasing, while writers run.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 10 {
				put(t, s.b, bB, "c", []byte("x"))
			}
		})
	}
	stop := make(chan struct{})
	var rg sync.WaitGroup
	rg.Go(func() {
		last := s.b.Writes()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if now := s.b.Writes(); now < last {
				t.Errorf("Writes went from %d to %d", last, now)
				return
			} else {
				last = now
			}
		}
	})
	wg.Wait()
	close(stop)
	rg.Wait()
	if s.b.Writes() < w+40 {
		t.Errorf("40 writes moved Writes from %d to %d", w, s.b.Writes())
	}
	w = s.b.Writes()
	s.reopen(t)
	if s.b.Writes() < w {
		t.Errorf("Writes %d after reopening, %d before", s.b.Writes(), w)
	}
}

func testClose(t *testing.T, s *state) {
	put(t, s.b, bA, "k", []byte("v"))

	// A write under way when Close is called commits (or fails), and
	// Close waits for it.
	in, release := make(chan struct{}), make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		werr <- s.b.Update(bA, "inflight", func([]byte) ([]byte, error) {
			close(in)
			<-release
			return []byte("made"), nil
		})
	}()
	<-in
	cerr := make(chan error, 1)
	go func() { cerr <- s.b.Close() }()
	close(release)
	inflight := <-werr
	if err := <-cerr; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.b.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}

	for name, err := range everyCall(s.b, bA, "k") {
		if !errors.Is(err, store.ErrClosed) || !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s after Close: %v, want ErrClosed and ErrUnavailable", name, err)
		}
	}

	s.b = s.open()
	t.Cleanup(func() { s.b.Close() })
	if got := get(t, s.b, bA, "k"); string(got) != "v" {
		t.Errorf("after Close, k = %q: a call after Close wrote", got)
	}
	rec, err := s.b.Get(bA, "inflight")
	switch {
	case inflight == nil && string(rec) != "made":
		t.Errorf("a write that returned nil before Close returned is %q, %v after reopening", rec, err)
	case inflight != nil && !errors.Is(err, store.ErrNotFound):
		t.Errorf("a write that failed (%v) is there: %q", inflight, rec)
	}
}

// everyCall calls every method of b on bucket once, writing keys (the
// last also read and updated alone, the first the prefix and start of
// the walks), and returns
// their errors by method.
func everyCall(b store.Backend, bucket string, keys ...string) map[string]error {
	x := func(string, []byte) ([]byte, error) { return []byte("x"), nil }
	_, get := b.Get(bucket, keys[len(keys)-1])
	return map[string]error{
		"Get":            get,
		"Update":         b.Update(bucket, keys[len(keys)-1], func(old []byte) ([]byte, error) { return x("", old) }),
		"UpdateEach":     b.UpdateEach(bucket, keys, x),
		"UpdateEachEmit": b.UpdateEachEmit(bucket, keys, func(k string, old []byte) ([]byte, [][]byte, error) { rec, err := x(k, old); return rec, nil, err }),
		"ForEach":        b.ForEach(bucket, keys[0], func(string, []byte) error { return nil }),
		"ForEachAfter":   b.ForEachAfter(bucket, keys[0], func(string, []byte) error { return nil }),
	}
}

func testErrors(t *testing.T, s *state) {
	if err := s.b.Err(); err != nil {
		t.Fatalf("Err of a new backend: %v", err)
	}
	for _, bucket := range []string{"nope", "", "meta"} {
		for name, err := range everyCall(s.b, bucket, "k") {
			if !errors.Is(err, store.ErrUnknownBucket) {
				t.Errorf("%s on the bucket %q: %v, want ErrUnknownBucket", name, bucket, err)
			}
		}
	}
	// A caller's error is returned as it is, from every write.
	errMine := errors.New("caller: mine")
	for name, err := range map[string]error{
		"Update":         s.b.Update(bA, "k", func([]byte) ([]byte, error) { return nil, errMine }),
		"UpdateEach":     s.b.UpdateEach(bA, []string{"k"}, func(string, []byte) ([]byte, error) { return nil, errMine }),
		"UpdateEachEmit": s.b.UpdateEachEmit(bA, []string{"k"}, func(string, []byte) ([]byte, [][]byte, error) { return nil, nil, errMine }),
	} {
		if err != errMine {
			t.Errorf("%s: fn's error came back as %v", name, err)
		}
	}
	if err := s.b.Err(); err != nil {
		t.Errorf("a caller's errors stopped the backend: %v", err)
	}
}
