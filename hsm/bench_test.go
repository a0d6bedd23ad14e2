package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/miekg/pkcs11"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/benchload"
)

// benchToken opens a fresh token with one key of each kind.
func benchToken(b *testing.B) *HSM {
	b.Helper()
	tok := softhsmtest.New(b)
	h, err := Open(tokenConfig(tok))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	for _, a := range []Algorithm{AES256GCM, HMACSHA256, ECDSAP256, ECDSAP384, Ed25519} {
		if err := h.CreateKey(context.Background(), KeyID{a.String(), 1}, a); err != nil {
			b.Fatal(err)
		}
	}
	return h
}

// benchOps are the operations keyward's services stand on, each as keyward
// calls it. "health" is the cheapest round trip through the pool (two
// informational calls), the floor under every other row.
func benchOps(b *testing.B, h *HSM) map[string]func() error {
	ctx := context.Background()
	kek := KeyID{"aes256-gcm", 1}
	dataKey := make([]byte, 32)
	aad := []byte(`{"app":"bench"}`)
	nonce, sealed, err := h.Encrypt(ctx, kek, dataKey, aad)
	if err != nil {
		b.Fatal(err)
	}
	signer := func(alg Algorithm) *Signer {
		s, err := h.Signer(ctx, KeyID{alg.String(), 1})
		if err != nil {
			b.Fatal(err)
		}
		return s
	}
	p256, p384, ed := signer(ECDSAP256), signer(ECDSAP384), signer(Ed25519)
	d256 := sha256.Sum256([]byte("bench"))
	d384 := sha512.Sum384([]byte("bench"))
	return map[string]func() error{
		"health":  func() error { return h.Health(ctx) },
		"encrypt": func() error { _, _, err := h.Encrypt(ctx, kek, dataKey, aad); return err },
		"decrypt": func() error { _, err := h.Decrypt(ctx, kek, nonce, sealed, aad); return err },
		"hmac": func() error {
			_, err := h.HMACSHA256(ctx, KeyID{"hmac-sha256", 1}, []byte("kw_0123456789abcdef"))
			return err
		},
		"sign-ecdsa-p256": func() error { _, err := p256.Sign(nil, d256[:], crypto.SHA256); return err },
		"sign-ecdsa-p384": func() error { _, err := p384.Sign(nil, d384[:], crypto.SHA384); return err },
		"sign-ed25519":    func() error { _, err := ed.Sign(nil, []byte("bench"), crypto.Hash(0)); return err },
		"random-32":       func() error { _, err := h.Random(ctx, 32); return err },
	}
}

// BenchmarkHSM runs every operation at 1, 2, 4 and 8 concurrent callers and
// reports ops/s, p50 and p99. Later benchmarks (the daemon's) are compared
// with these rows from the same run.
func BenchmarkHSM(b *testing.B) {
	h := benchToken(b)
	ops := benchOps(b, h)
	for _, name := range []string{"health", "encrypt", "decrypt", "hmac", "sign-ecdsa-p256", "sign-ecdsa-p384", "sign-ed25519", "random-32"} {
		for _, n := range benchload.Callers {
			b.Run(fmt.Sprintf("op=%s/callers=%d", name, n), func(b *testing.B) {
				benchload.Run(b, n, ops[name])
			})
		}
	}
}

// BenchmarkFullToken shows what the handle cache saves: with 1 000 objects
// on the token, a cached encrypt costs what it costs on an empty token,
// while looking a key up by label (a FindObjects over every object, what a
// stale handle costs) is the "lookup" row.
func BenchmarkFullToken(b *testing.B) {
	h := benchToken(b)
	ctx := context.Background()
	err := h.do(ctx, "fill", "", func(s pkcs11.SessionHandle) error {
		for i := range 1000 {
			_, err := h.mod.ctx.CreateObject(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, fmt.Sprintf("filler-%d", i)),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("x")),
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	kek := KeyID{"aes256-gcm", 1}
	b.Run("op=encrypt/objects=1000", func(b *testing.B) {
		benchload.Run(b, 1, func() error { _, _, err := h.Encrypt(ctx, kek, make([]byte, 32), nil); return err })
	})
	b.Run("op=lookup/objects=1000", func(b *testing.B) {
		benchload.Run(b, 1, func() error {
			stale(h, kek)
			_, _, err := h.Encrypt(ctx, kek, make([]byte, 32), nil)
			return err
		})
	})
}

// loadSizes are the numbers of keys BenchmarkLoadKeys measures at. Filling
// a SoftHSM2 token takes longer the fuller it is (about 2 minutes to 10 000
// keys), so 10 000 is measured only when asked: -load-keys=1000,10000.
var loadSizes = flag.String("load-keys", "1000", "BenchmarkLoadKeys: the numbers of keys on the token, comma-separated")

// BenchmarkLoadKeys measures what reading every keyward key at start and
// at each reconnect costs (loadKeys: one search, one read of every private
// object, the checks of each key), against looking keys up one by one
// (lookup: a search over every object per key). The token holds keys
// keyward made, one in ten an ECDSA P-256 pair (checked with a signature),
// the rest AES-256 keys. "open" is all of Open: library, login and load.
// At 10 000 keys this is keywardd's start-up with a very full token.
func BenchmarkLoadKeys(b *testing.B) {
	tok := softhsmtest.New(b)
	cfg := tokenConfig(tok)
	h, err := Open(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { h.Close() }()
	ctx := context.Background()
	made := 0
	for _, size := range strings.Split(*loadSizes, ",") {
		keys, err := strconv.Atoi(size)
		if err != nil || keys < made {
			b.Fatalf("-load-keys=%s: give increasing numbers of keys", *loadSizes)
		}
		err = h.do(ctx, "fill", "", func(s pkcs11.SessionHandle) error {
			for ; made < keys; made++ {
				alg := AES256GCM
				if made%10 == 0 {
					alg = ECDSAP256
				}
				if _, err := h.generate(s, specs[alg], KeyID{fmt.Sprint("fill-", made), 1}.label()); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("op=load/keys=%d", keys), func(b *testing.B) {
			for b.Loop() {
				err := h.do(ctx, "load", "", func(s pkcs11.SessionHandle) error {
					loaded, err := h.loadKeys(s)
					if err == nil && len(loaded) != keys {
						err = fmt.Errorf("loaded %d keys of %d", len(loaded), keys)
					}
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("op=lookup/keys=%d", keys), func(b *testing.B) {
			id := KeyID{"fill-1", 1}
			for b.Loop() {
				stale(h, id)
				if _, _, err := h.Encrypt(ctx, id, nil, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("op=open/keys=%d", keys), func(b *testing.B) {
			h.Close()
			for b.Loop() {
				if h, err = Open(cfg); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				h.Close()
				b.StartTimer()
			}
			if h, err = Open(cfg); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkSessionFaults compares encryption at 4 callers with no faults
// and with 1 % of C_EncryptInit and of C_Encrypt calls failing with a
// device error or a lost session, all through the fault module (which reads
// its rules on every call, so both rows pay for that alike). It reports the
// calls that failed in spite of the retry (failed/op) and the logins the run
// cost beyond the first (relogins): with the retry on another session the
// second is 0 and the first about (3 %)², as an encryption makes three
// faultable calls.
func BenchmarkSessionFaults(b *testing.B) {
	tok := softhsmtest.New(b)
	f := softhsmtest.NewFaults(b, tok)
	h, err := Open(tokenConfig(tok, func(c *Config) { c.Module = f.Module; c.Sessions = 4 }))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	ctx := context.Background()
	kek := KeyID{"kek", 1}
	if err := h.CreateKey(ctx, kek, AES256GCM); err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		rules []string
	}{
		{"faults=none", nil},
		{"faults=1%-device-error", []string{"C_EncryptInit 0x30 1%", "C_Encrypt 0x30 1%"}},
		{"faults=1%-session-handle-invalid", []string{"C_EncryptInit 0xB3 1%", "C_Encrypt 0xB3 1%"}},
	} {
		b.Run(tc.name+"/callers=4", func(b *testing.B) {
			f.Set(tc.rules...)
			defer f.Set()
			logins := f.Counts()["C_Login"].Calls
			var failed atomic.Int64
			benchload.Run(b, 4, func() error {
				_, _, err := h.Encrypt(ctx, kek, make([]byte, 32), nil)
				if err != nil && (errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)) || errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID))) {
					failed.Add(1)
					return nil
				}
				return err
			})
			b.ReportMetric(float64(failed.Load())/float64(b.N), "failed/op")
			b.ReportMetric(float64(f.Counts()["C_Login"].Calls-logins), "relogins")
		})
	}
}
