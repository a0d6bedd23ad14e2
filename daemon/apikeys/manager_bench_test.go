package apikeys

import (
	"context"
	"crypto/rand"
	"testing"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// The verify path against its parts, measured in one run: BenchmarkHSMHMAC
// is the raw HSM call a first verify of a key makes; BenchmarkVerifyCold
// pays it on every verify; BenchmarkVerifyCached is the steady state (digest
// cache, a store read, the checks, no HSM call). Compare ratios, not
// absolute numbers.

// benchSpec is a key without rate limits: the clock of a benchmark's
// fixture stands still, and a limit would refuse all but its burst.
func benchSpec() Spec {
	s := spec()
	s.Limits = []ratelimit.Layer{}
	return s
}

// BenchmarkVerifyStranger: a well-formed key nobody issued, refused by its
// missing hint before any HSM call.
func BenchmarkVerifyStranger(b *testing.B) {
	f := newFixture(b)
	f.create(b, benchSpec())
	key, err := Generate("kwtest", rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != NotFound {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

func BenchmarkHSMHMAC(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, benchSpec())
	ctx := context.Background()
	for b.Loop() {
		if _, err := f.h.HMACSHA256(ctx, pepper, []byte(key)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyCold(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, benchSpec())
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
	key, _ := f.create(b, benchSpec())
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
	s := benchSpec()
	s.Quota = &Quota{Remaining: 1 << 40}
	key, _ := f.create(b, s)
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

// BenchmarkVerifyCachedCountries: BenchmarkVerifyCached with a GeoIP
// database, a key limited to a country and a source address in it: the
// country lookup, the check and the usage by country on top.
func BenchmarkVerifyCachedCountries(b *testing.B) {
	f := newGeoFixture(b)
	s := benchSpec()
	s.AllowedCountries = []string{"DE"}
	key, _ := f.create(b, s)
	req := from("192.0.2.7")
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, req); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}
