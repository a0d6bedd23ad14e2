package audit

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyward/keyward/softhsm-test/benchload"
)

// BenchmarkAppend measures Append alone (records on disk per second, with
// their latency) from 1, 4, 16 and 64 concurrent callers.
func BenchmarkAppend(b *testing.B) {
	h := macHSM(b)
	for _, n := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("callers=%d", n), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"), h, macKey, Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			ctx := context.Background()
			benchload.Run(b, n, func() error { return l.Append(ctx, rec(1)) })
		})
	}
}

// bigLog is a log of n records (written 4096 a write, as a busy keywardd
// writes them), its checkpoints MACed by the HSM.
func bigLog(b *testing.B, n int) *Log {
	b.Helper()
	l, err := Open(filepath.Join(b.TempDir(), "audit.log"), macHSM(b), macKey, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	for i := 0; i < n; i += 4096 {
		var bodies [][]byte
		for j := i; j < min(n, i+4096); j++ {
			body, err := l.encode(rec(j))
			if err != nil {
				b.Fatal(err)
			}
			bodies = append(bodies, body)
		}
		l.mu.Lock()
		err := l.write(bodies, false)
		l.mu.Unlock()
		if err != nil {
			b.Fatal(err)
		}
	}
	return l
}

// BenchmarkList measures one ListAuditRecords call on a log of 74 MiB:
// the newest page, the records since a time, and a filter no record
// matches, which reads MaxScan bytes (the most a call costs).
func BenchmarkList(b *testing.B) {
	l := bigLog(b, 180_000)
	b.Logf("log of %d MiB", l.State().Size>>20)
	ctx := context.Background()
	for _, c := range []struct {
		name string
		q    Query
	}{
		{"newest-page", Query{}},
		// The last 50 records: then a look back for records written late.
		{"since", Query{Since: time.Unix(1700000000+180_000-50, 0)}},
		{"no-match", Query{Subject: "nope"}},
	} {
		b.Run(c.name, func(b *testing.B) {
			var scanned int64
			for b.Loop() {
				p, err := l.List(ctx, c.q)
				if err != nil {
					b.Fatal(err)
				}
				scanned = p.Scanned
			}
			b.SetBytes(scanned)
		})
	}
}

// BenchmarkVerify measures VerifyAuditLog's work on a log of 74 MiB: the
// whole log, its checkpoints' MACs checked by the HSM.
func BenchmarkVerify(b *testing.B) {
	l := bigLog(b, 180_000)
	ctx := context.Background()
	for b.Loop() {
		rep, size, err := l.Verify(ctx)
		if err != nil || rep.BadLine != 0 {
			b.Fatal(rep, err)
		}
		b.SetBytes(size)
	}
}
