package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/dkcache"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/benchload"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// BenchmarkDataKeyCache measures, in one run, where a data key's cost is
// and what the client's data-key cache (daemon/api/client/dkcache) saves
// on records of 1 KiB: the HSM's encryption alone; over keywardd's socket
// a Ping (the durable round trip) and a GenerateDataKey; then sealing a
// record by Encrypt (keywardd seals it in the HSM), by dkcache with
// MaxMessages 1 (a GenerateDataKey and a local AES-GCM seal per record:
// the uncached path) and by dkcache with its defaults; and opening a
// record by dkcache with MaxMessages 1 (a Decrypt per record) and with
// its defaults. Every keywardd row runs right after a durable floor
// (floor_test.go) at the same level, as in BenchmarkDaemon. The table
// gives each row's ratio to that floor and each cached row's speed-up
// over its uncached row.
func BenchmarkDataKeyCache(b *testing.B) {
	ctx := context.Background()
	res := map[string]benchload.Result{}
	key := func(op string, n int) string { return fmt.Sprintf("%s/%d", op, n) }
	durable := keywardv1.NewStatusServiceClient(startFloor(b, true))
	floorPing := func() error { _, err := durable.Ping(ctx, &keywardv1.PingRequest{}); return err }

	// The HSM alone, before keywardd opens the token (it must be the
	// library's only user in its process).
	in := daemontest.Start(b, daemontest.Policy(daemontest.AllowAll()))
	h, raw := benchHSM(b, in)
	dataKey, aad := make([]byte, 32), make([]byte, 40)
	for _, n := range benchLevels {
		b.Run(fmt.Sprintf("hsm=encrypt/callers=%d", n), func(b *testing.B) {
			res[key("hsm-encrypt", n)] = benchload.Run(b, n, func() error { _, _, err := h.Encrypt(ctx, raw, dataKey, aad); return err })
		})
	}
	h.Close()

	in.Restart()
	kw, err := client.Dial(in.Socket)
	if err != nil {
		b.Fatal(err)
	}
	defer kw.Close()
	if _, err := kw.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "bench", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		b.Fatal(err)
	}
	ectx := map[string]string{"app": "bench"}
	record := bytes.Repeat([]byte{'r'}, 1024)
	cache := func(lim dkcache.Limits) *dkcache.Cache {
		c, err := dkcache.New(kw, dkcache.Options{Limits: lim})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return c
	}
	uncached, cached := cache(dkcache.Limits{MaxMessages: 1}), cache(dkcache.Limits{})
	sealed, err := cached.Seal(ctx, "bench", record, ectx)
	if err != nil {
		b.Fatal(err)
	}
	seal := func(c *dkcache.Cache) func() error {
		return func() error { _, err := c.Seal(ctx, "bench", record, ectx); return err }
	}
	open := func(c *dkcache.Cache) func() error {
		return func() error { _, err := c.Open(ctx, "bench", sealed, ectx); return err }
	}
	ops := []struct {
		name string
		call func() error
	}{
		{"ping", func() error { _, err := kw.Status.Ping(ctx, &keywardv1.PingRequest{}); return err }},
		{"generate-data-key", func() error { _, err := kw.GenerateDataKey(ctx, "bench", ectx); return err }},
		{"encrypt-1k", func() error { _, err := kw.Encrypt(ctx, "bench", record, ectx); return err }},
		{"seal-1k-uncached", seal(uncached)},
		{"seal-1k-cached", seal(cached)},
		{"open-1k-uncached", open(uncached)},
		{"open-1k-cached", open(cached)},
	}
	for _, op := range ops {
		for _, n := range benchLevels {
			b.Run(fmt.Sprintf("daemon=%s/floor=durable/callers=%d", op.name, n), func(b *testing.B) {
				res[key("pair:"+op.name, n)] = benchload.Run(b, n, floorPing)
			})
			b.Run(fmt.Sprintf("daemon=%s/callers=%d", op.name, n), func(b *testing.B) {
				res[key(op.name, n)] = benchload.Run(b, n, op.call)
			})
		}
	}
	printCacheTable(res, key, uncached.Stats(), cached.Stats())
}

// benchHSM stops in and opens its token through the hsm package, with an
// AES-256-GCM key made on it: the HSM's own rows run while keywardd is
// stopped, since keywardd must be the PKCS#11 library's only user in its
// process. (BenchmarkDaemon's HSM rows use it too.)
func benchHSM(b *testing.B, in *daemontest.Daemon) (*hsm.HSM, hsm.KeyID) {
	b.Helper()
	in.Stop()
	h, err := hsm.Open(hsm.Config{Module: in.Token.Module, Token: in.Token.Label, PINFile: in.Token.PINFile})
	if err != nil {
		b.Fatal(err)
	}
	raw := hsm.KeyID{Name: "bench-raw", Version: 1}
	if err := h.CreateKey(context.Background(), raw, hsm.AES256GCM); err != nil {
		b.Fatal(err)
	}
	return h, raw
}

// records is how many records a cache sealed or opened.
func records(s dkcache.Stats) uint64 { return s.Hits + s.Misses + s.Uncached }

// printCacheTable writes BenchmarkDataKeyCache's table.
func printCacheTable(res map[string]benchload.Result, key func(string, int) string, uncached, cached dkcache.Stats) {
	against := map[string]string{"seal-1k-cached": "seal-1k-uncached", "open-1k-cached": "open-1k-uncached", "seal-1k-uncached": "encrypt-1k"}
	var t strings.Builder
	fmt.Fprintf(&t, "\ndata keys and the client's cache, records of 1 KiB, one run (%s)\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&t, "%-18s %7s %10s %9s %9s %8s %9s %7s %14s\n", "call", "clients", "ops/s", "p50", "p99", "cpu/op", "floor/s", "ratio", "speed-up")
	for _, op := range []string{"hsm-encrypt", "ping", "generate-data-key", "encrypt-1k", "seal-1k-uncached", "seal-1k-cached", "open-1k-uncached", "open-1k-cached"} {
		for _, n := range benchLevels {
			r, ok := res[key(op, n)]
			if !ok {
				continue
			}
			fl, ratio, speed := "", "", ""
			if f, ok := res[key("pair:"+op, n)]; ok && f.OpsPerSec > 0 {
				fl, ratio = fmt.Sprintf("%.0f", f.OpsPerSec), fmt.Sprintf("%.2f", r.OpsPerSec/f.OpsPerSec)
			}
			if base, ok := res[key(against[op], n)]; ok && base.OpsPerSec > 0 {
				speed = fmt.Sprintf("%.1f x %s", r.OpsPerSec/base.OpsPerSec, strings.TrimSuffix(against[op], "-1k"))
			}
			fmt.Fprintf(&t, "%-18s %7d %10.0f %9s %9s %8s %9s %7s %14s\n", op, n, r.OpsPerSec, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond),
				r.CPU.Round(100*time.Nanosecond), fl, ratio, speed)
		}
	}
	fmt.Fprintf(&t, `floor/s: a bare grpc-go server's Ping with a group-committed fsync (floor_test.go), run right before the row.
uncached: dkcache with MaxMessages 1 (one GenerateDataKey or Decrypt per record, and the local AES-GCM);
cached: dkcache's defaults (%d records, %d MiB, %s per data key). The cache's own counts over the run:
uncached %d calls to keywardd for %d records; cached %d calls for %d records.
`, dkcache.DefaultMaxMessages, dkcache.DefaultMaxBytes>>20, dkcache.DefaultMaxAge, uncached.Misses, records(uncached), cached.Misses, records(cached))
	fmt.Fprint(os.Stdout, t.String())
}
