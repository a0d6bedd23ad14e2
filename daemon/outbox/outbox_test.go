package outbox_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/host"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// emit writes an event as the domain packages do: with a change, in one
// transaction.
var opForm = regexp.MustCompile(`^evt-[0-9]{20}-[0-9a-f]{16}$`)

func emit(t *testing.T, st *store.Store, e outbox.Event) {
	t.Helper()
	err := st.UpdateEachEmit(store.BucketAPIKeys, []string{e.ID}, func(string, []byte) ([]byte, [][]byte, error) {
		return []byte(`{}`), [][]byte{outbox.Encode(e)}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDeliveryInOrderThroughOutage: the test plugin (a real process,
// subscribed to API key revocations) gets each event once, in order, with
// the token event it did not ask for passed over; while it fails, events
// wait and nothing is lost; a restart of keywardd delivers nothing twice.
func TestDeliveryInOrderThroughOutage(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	bin := conformance.Build(t, "github.com/keyward/keyward/plugins/host/testdata/testplugin")
	b, _ := os.ReadFile(bin)
	sum := sha256.Sum256(b)
	rec := filepath.Join(dir, "record")
	p, err := host.Start(host.Config{Name: "test", Path: bin, SHA256: hex.EncodeToString(sum[:]), Env: map[string]string{"TESTPLUGIN_RECORD": rec},
		Log: slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	set := host.Set{"test": p}

	emit(t, st, outbox.Event{Kind: outbox.APIKeyRevoked, ID: "ak_before", Time: time.Now()}) // before the plugin was known: not its
	clk := &clock{t: time.Now()}
	ob, err := outbox.New(st, set, nil, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	emit(t, st, outbox.Event{Kind: outbox.APIKeyRevoked, ID: "ak_1", Subject: "team-a", Time: time.Now()})
	emit(t, st, outbox.Event{Kind: outbox.TokenRevoked, ID: "jti-1", Time: time.Now()})
	emit(t, st, outbox.Event{Kind: outbox.APIKeyRevoked, ID: "ak_2", Subject: "team-a", Time: time.Now()})
	ob.Pass(ctx)
	read := func() string { b, _ := os.ReadFile(rec); return string(b) }
	deliveries := func() []string {
		var out []string
		for line := range strings.Lines(read()) {
			if f := strings.Fields(line); len(f) >= 4 && f[0] == "revoke" {
				// evt-<sequence number>-<nonce>
				if !opForm.MatchString(f[1]) {
					t.Fatalf("operation ID %q", f[1])
				}
				out = append(out, f[1][:24]+" "+f[3])
			}
		}
		return out
	}
	if got := deliveries(); !slices.Equal(got, []string{"evt-00000000000000000002 ak_1", "evt-00000000000000000004 ak_2"}) {
		t.Fatalf("delivered: %v", got)
	}

	// The system behind the plugin is down: events wait, in order.
	os.WriteFile(rec+".down", nil, 0o600)
	emit(t, st, outbox.Event{Kind: outbox.APIKeyRevoked, ID: "ak_3", Time: time.Now()})
	emit(t, st, outbox.Event{Kind: outbox.APIKeyRevoked, ID: "ak_4", Time: time.Now()})
	ob.Pass(ctx)
	if s := ob.Status()["test"]; s.Failures != 1 || s.Pending != 2 || !strings.Contains(s.LastError, "down") {
		t.Fatalf("status while down: %+v", s)
	}
	os.Remove(rec + ".down")
	ob.Pass(ctx) // not before the retry time
	if strings.Contains(read(), "ak_3") {
		t.Fatal("delivered before the retry time")
	}
	clk.add(time.Minute)
	ob.Pass(ctx)
	if got := deliveries(); !slices.Equal(got[2:], []string{"evt-00000000000000000005 ak_3", "evt-00000000000000000006 ak_4"}) {
		t.Fatalf("after the outage: %v", got)
	}
	if s := ob.Status()["test"]; s.Failures != 0 || s.Pending != 0 {
		t.Errorf("status after the outage: %+v", s)
	}

	// A new outbox (keywardd restarted) delivers nothing again, and the
	// delivered events are gone from the store.
	before := read()
	ob2, err := outbox.New(st, set, nil, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	ob2.Pass(ctx)
	if read() != before {
		t.Fatalf("redelivered after a restart:\n%s", read())
	}
	n := 0
	st.ForEachAfter(store.BucketOutbox, "", func(string, []byte) error { n++; return nil })
	if n != 0 {
		t.Errorf("%d delivered events left in the store", n)
	}
}
