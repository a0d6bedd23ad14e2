package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/benchload"
	"github.com/keyward/keyward/softhsm-test/daemontest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

// BenchmarkFleet measures, in one run, three keywardd processes sharing a
// 3-member etcd cluster against one keywardd on its bbolt file (same
// machine, same build, same policy):
//
//   - verify: VerifyAPIKey at 4 callers over 1 000 keys, on a fleet node
//     and on the single node; the ratio fleet ÷ bbolt (the goal is >= 0.9:
//     the fleet's hot path reads only its local copy).
//   - create: CreateAPIKey at 4 callers, on each (a fleet's write takes
//     the fleet's lock and an etcd transaction, and waits for the local
//     copy).
//   - revocation visibility: from RevokeAPIKey's answer on node 2 to
//     REVOKED on node 3 (polled as fast as a caller can), over
//     KEYWARD_BENCH_REVOCATIONS revocations (default 1 000): p50, p99, max
//     (the goal is p99 < 500 ms).
func BenchmarkFleet(b *testing.B) {
	revocations := envInt(b, "KEYWARD_BENCH_REVOCATIONS", 1000)
	c := etcdtest.NewCluster(b, 3)
	fleet := startFleet(b, c, 3, nil)
	single := &fleetNode{name: "bbolt", bin: fleet[0].bin, files: daemontest.NewFiles(b, daemontest.Policy(fleetPolicy()))}
	single.start(b)
	ctx := context.Background()

	create := func(cl *client.Client, owner string) (*keywardv1.CreateAPIKeyResponse, error) {
		return cl.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "svc", Environment: "prod", Permissions: []string{"orders:read"}})
	}
	verify := func(cl *client.Client, key string) (keywardv1.APIKeyCode, error) {
		v, err := cl.APIKeys.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod", Permissions: []string{"orders:read"}})
		return v.GetCode(), err
	}
	keysOn := func(cl *client.Client, n int) []string {
		out := make([]string, n)
		for i := range out {
			k, err := create(cl, "team-verify")
			if err != nil {
				b.Fatal(err)
			}
			out[i] = k.Secret
		}
		return out
	}
	type row struct {
		name string
		res  benchload.Result
	}
	var rows []row
	measureVerify := func(name string, cl *client.Client, keys []string) {
		for _, k := range keys { // seen once each: the HSM call of a first verify is not what is compared
			if code, err := verify(cl, k); code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
				b.Fatalf("%s: %v %v", name, code, err)
			}
		}
		var next atomic.Int64
		b.Run(name, func(b *testing.B) {
			r := benchload.RunAtLeast(b, 4, 20_000, func() error {
				code, err := verify(cl, keys[int(next.Add(1))%len(keys)])
				if err == nil && code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
					err = fmt.Errorf("%v", code)
				}
				return err
			})
			rows = append(rows, row{name, r})
		})
	}
	fleetKeys := keysOn(fleet[0].Client, 1000)
	within(b, "node 3 has node 1's keys", func() (bool, string) {
		code, err := verify(fleet[2].Client, fleetKeys[len(fleetKeys)-1])
		return code == keywardv1.APIKeyCode_API_KEY_CODE_VALID, fmt.Sprint(code, err)
	})
	measureVerify("verify/bbolt", single.Client, keysOn(single.Client, 1000))
	measureVerify("verify/fleet", fleet[2].Client, fleetKeys)
	for _, tc := range []struct {
		name string
		cl   *client.Client
	}{{"create/bbolt", single.Client}, {"create/fleet", fleet[0].Client}} {
		b.Run(tc.name, func(b *testing.B) {
			r := benchload.RunAtLeast(b, 4, 500, func() error { _, err := create(tc.cl, "team-create"); return err })
			rows = append(rows, row{tc.name, r})
		})
	}

	// Revocation visibility: keys made on node 1 and seen on node 3 first,
	// then each revoked on node 2 and polled on node 3.
	var lat []time.Duration
	b.Run("revocation-visibility", func(b *testing.B) {
		keys := make([]*keywardv1.CreateAPIKeyResponse, revocations)
		for i := range keys {
			k, err := create(fleet[0].Client, "team-revoke")
			if err != nil {
				b.Fatal(err)
			}
			keys[i] = k
		}
		within(b, "node 3 has node 1's keys", func() (bool, string) {
			code, err := verify(fleet[2].Client, keys[len(keys)-1].Secret)
			return code == keywardv1.APIKeyCode_API_KEY_CODE_VALID, fmt.Sprint(code, err)
		})
		b.ResetTimer()
		for _, k := range keys {
			if _, err := fleet[1].APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
				b.Fatal(err)
			}
			t0 := time.Now()
			for {
				code, err := verify(fleet[2].Client, k.Secret)
				if err != nil {
					b.Fatal(err)
				}
				if code == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
					break
				}
				if time.Since(t0) > 30*time.Second {
					b.Fatalf("node 3 accepted a key revoked 30 s ago: %v", code)
				}
			}
			lat = append(lat, time.Since(t0))
		}
		b.StopTimer()
		slices.Sort(lat)
		b.ReportMetric(float64(pct(lat, 0.50).Microseconds()), "p50-µs")
		b.ReportMetric(float64(pct(lat, 0.99).Microseconds()), "p99-µs")
		b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-µs")
	})

	fmt.Printf("\nkeyward fleet: 3 keywardd on a 3-member etcd cluster against 1 keywardd on bbolt, one machine, one run (%s)\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Printf("%-16s %10s %10s %10s\n", "", "ops/s", "p50", "p99")
	byName := map[string]benchload.Result{}
	for _, r := range rows {
		byName[r.name] = r.res
		fmt.Printf("%-16s %10.0f %10s %10s\n", r.name, r.res.OpsPerSec, r.res.P50.Round(time.Microsecond), r.res.P99.Round(time.Microsecond))
	}
	if f, s := byName["verify/fleet"], byName["verify/bbolt"]; s.OpsPerSec > 0 {
		fmt.Printf("VerifyAPIKey fleet ÷ bbolt: %.2f (goal >= 0.9)\n", f.OpsPerSec/s.OpsPerSec)
	}
	if f, s := byName["create/fleet"], byName["create/bbolt"]; s.OpsPerSec > 0 {
		fmt.Printf("CreateAPIKey fleet ÷ bbolt: %.2f (no goal: a fleet's write is an etcd transaction under the fleet's lock)\n", f.OpsPerSec/s.OpsPerSec)
	}
	if len(lat) > 0 {
		fmt.Printf("revocation visible on another node, %d revocations: p50 %v, p99 %v, max %v (goal p99 < 500ms)\n", len(lat),
			pct(lat, 0.50).Round(time.Microsecond), pct(lat, 0.99).Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond))
	}
}

// pct is the value at fraction q of sorted (nearest rank).
func pct(sorted []time.Duration, q float64) time.Duration {
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// envInt is the positive number in the variable name, or def.
func envInt(b *testing.B, name string, def int) int {
	b.Helper()
	env := os.Getenv(name)
	if env == "" {
		return def
	}
	n, err := strconv.Atoi(env)
	if err != nil || n < 1 {
		b.Fatalf("%s: %q is not a positive number", name, env)
	}
	return n
}
