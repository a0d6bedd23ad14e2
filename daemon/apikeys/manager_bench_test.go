package apikeys

import (
	"context"
	"testing"
)

// The verify path against its parts, measured in one run: BenchmarkHSMHMAC
// is the raw HSM call a first verify of a key makes; BenchmarkVerifyCold
// pays it on every verify; BenchmarkVerifyCached is the steady state (digest
// cache, a store read, the checks, no HSM call). Compare ratios, not
// absolute numbers.

func BenchmarkHSMHMAC(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, spec())
	ctx := context.Background()
	for b.Loop() {
		if _, err := f.h.HMACSHA256(ctx, pepper, []byte(key)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyCold(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, spec())
	ctx := context.Background()
	for b.Loop() {
		f.m.mu.Lock()
		clear(f.m.digests)
		f.m.mu.Unlock()
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

func BenchmarkVerifyCached(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, spec())
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

// BenchmarkVerifyCachedQuota: a key with a usage quota; its use is saved by
// Flush, not by Verify (a write per verify measured 40 times slower).
func BenchmarkVerifyCachedQuota(b *testing.B) {
	f := newFixture(b)
	s := spec()
	s.Quota = &Quota{Remaining: 1 << 40}
	key, _ := f.create(b, s)
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}
