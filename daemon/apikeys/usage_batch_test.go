package apikeys

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

// failSecond is a store whose second UpdateEach fails: a flush that dies
// half-way.
type failSecond struct {
	store.Backend
	calls int
}

func (f *failSecond) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	if f.calls++; f.calls == 2 {
		return fmt.Errorf("%w: the disk is full", store.ErrUnavailable)
	}
	return f.Backend.UpdateEach(bucket, keys, fn)
}

// TestFlushUsageInBatches: the use of more keys than one transaction of the
// store's contract holds is written in several, on a backend that refuses
// a larger one; and a flush that fails after its first transaction leaves
// pending only what it did not write, so the next flush counts each use
// once.
func TestFlushUsageInBatches(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Date(2026, 12, 1, 12, 30, 0, 0, time.UTC)
	flaky := &failSecond{Backend: storetest.Strict(s)}
	m, err := NewManager(flaky, knownPepper("pepper"), pepper, Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	ids := store.MaxTxKeys*3/4 + 1 // two records each (the hour, the last use): two transactions at least
	for i := range ids {
		m.usage.record(fmt.Sprintf("key%06d", i), Valid, netip.Addr{}, "", now, time.Millisecond)
	}
	if err := m.flushUsage(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("the half-failed flush: %v", err)
	}
	if err := m.flushUsage(); err != nil {
		t.Fatalf("the flush after: %v", err)
	}
	hours, lasts := 0, 0
	err = s.ForEach(store.BucketAPIKeyUsage, "", func(k string, rec []byte) error {
		var h HourUsage
		if err := json.Unmarshal(rec, &h); err != nil {
			return err
		}
		if h.Hour.IsZero() {
			lasts++
			return nil
		}
		hours++
		if h.Counts[Valid] != 1 {
			return fmt.Errorf("%s counts %d uses, want 1", k, h.Counts[Valid])
		}
		return nil
	})
	if err != nil || hours != ids || lasts != ids {
		t.Fatalf("%d hours and %d last uses written, want %d each: %v", hours, lasts, ids, err)
	}
}
