package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// crashingStore takes about 50 keys a transaction, as a small etcd would, and
// fails every revocation batch after the first `after`, as a keywardd
// killed between two of them leaves its work.
type crashingStore struct {
	Store
	after int64
	n     atomic.Int64
}

func (c *crashingStore) TxLimits() (ops, bytes int) { return 108, 64 << 20 }

func (c *crashingStore) UpdateEachEmit(bucket string, keys []string, fn func(string, []byte) ([]byte, [][]byte, error)) error {
	if c.n.Add(1) > c.after {
		return fmt.Errorf("%w: keywardd died here", store.ErrUnavailable)
	}
	return c.Store.UpdateEachEmit(bucket, keys, fn)
}

// TestRevokeWhereResumes: a bulk revocation cut short after its first
// batch leaves its intent; ResumeRevocations (a restart) finishes it,
// within the caller's recorded reach, each key revoked and announced once,
// and drops the intent.
func TestRevokeWhereResumes(t *testing.T) {
	f := newFixture(t)
	specs := make([]Spec, 0, 300)
	for i := range 300 {
		s := spec()
		s.Owner = []string{"team-a", "team-b", "team-c"}[i%3]
		s.Name, s.Tags = fmt.Sprintf("k%d", i), []string{"leaked"}
		specs = append(specs, s)
	}
	if _, _, err := f.m.CreateMany(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
	crash := &crashingStore{Store: f.store, after: 1}
	m, err := NewManager(crash, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now})
	if err != nil {
		t.Fatal(err)
	}
	// The caller may reach team-a and team-b, not team-c.
	reach := json.RawMessage(`{"may":["team-a","team-b"]}`)
	owners := func(raw json.RawMessage) (func(string) bool, error) {
		var r struct{ May []string }
		if err := json.Unmarshal(raw, &r); err != nil {
			return nil, err
		}
		return func(o string) bool { return strings.Contains(strings.Join(r.May, ","), o) }, nil
	}
	may, _ := owners(reach)
	batch := store.BatchKeys(crash, 2)
	n, err := m.RevokeWhere(Filter{Tag: "leaked", Owners: may, Reach: reach}, false)
	if err == nil || n != batch {
		t.Fatalf("a revocation cut after its first batch: %d revoked, %v; want %d and an error", n, err, batch)
	}
	intents := func() int {
		c := 0
		f.store.ForEach(store.BucketSchedule, IntentPrefix, func(string, []byte) error { c++; return nil })
		return c
	}
	if intents() != 1 {
		t.Fatalf("%d intents recorded, want 1", intents())
	}
	// Not yet a minute old: under way, not resumed.
	if done, err := f.m.ResumeRevocations(f.clk.now().Add(-time.Minute), owners); err != nil || len(done) != 0 {
		t.Fatalf("a fresh intent resumed: %+v, %v", done, err)
	}
	// A key issued after the revocation was cut short is not its business;
	// and a policy widened since (every owner) reaches no owner the caller
	// did not reach when it asked.
	f.clk.add(time.Second)
	later := spec()
	later.Owner, later.Name, later.Tags = "team-a", "later", []string{"leaked"}
	_, laterRec := f.create(t, later)
	wide := func(json.RawMessage) (func(string) bool, error) { return func(string) bool { return true }, nil }
	done, err := f.m.ResumeRevocations(f.clk.now(), wide)
	if err != nil || len(done) != 1 || done[0].Err != nil || done[0].Revoked != 200-batch {
		t.Fatalf("ResumeRevocations = %+v, %v; want one, %d revoked", done, err, 200-batch)
	}
	if intents() != 0 {
		t.Fatal("the intent is kept after its revocation finished")
	}
	if !strings.Contains(done[0].String(), `tag "leaked"`) {
		t.Errorf("the audit's words: %s", done[0])
	}
	revoked := map[string]int{}
	recs, _, err := f.m.List(Filter{}, "", MaxPageSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.State == StateRevoked {
			revoked[r.Owner]++
		}
	}
	if r, err := f.m.Get(laterRec.ID); err != nil || r.State != Active {
		t.Errorf("a key issued after the revocation was cut short: %+v, %v", r, err)
	}
	if revoked["team-a"] != 100 || revoked["team-b"] != 100 || revoked["team-c"] != 0 {
		t.Fatalf("revoked by owner: %v; want all of team-a's and team-b's, none of team-c's (out of reach)", revoked)
	}
	events := 0
	f.store.ForEach(store.BucketOutbox, "", func(string, []byte) error { events++; return nil })
	if events != 200 {
		t.Fatalf("%d revocation events for 200 keys revoked", events)
	}
	// A reach that no longer parses leaves the intent, reported.
	crash.n.Store(0)
	if _, err := m.RevokeWhere(Filter{Owner: "team-c", Reach: json.RawMessage(`"garbled"`)}, false); err == nil {
		t.Fatal("the second cut revocation did not fail")
	}
	if done, err := f.m.ResumeRevocations(f.clk.now(), owners); err != nil || len(done) != 1 || done[0].Err == nil || intents() != 1 {
		t.Fatalf("a resumption whose reach does not parse: %+v, %v, %d intents", done, err, intents())
	}
}
