package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/benchload"
	"github.com/keyward/keyward/softhsm-test/daemontest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

// BenchmarkFleetScale moves a keywardd store of 1 000 000 API keys
// (KEYWARD_BENCH_FLEET_KEYS overrides it) into etcd with the migration
// keyward store migrate runs, then starts a fleet node on it and measures
// what issue 15 asks: the migration's time, the node's start time (from
// exec to answering: its local copy loaded from etcd) and memory (VmRSS
// after start, and after verifying 1 000 keys spread over the set), its
// restart (the copy resumed from its revision), and VerifyAPIKey on it.
// etcd is one member in the benchmark's process, its quota raised to 8 GiB
// (a million keys need more than etcd's default 2 GiB: docs/fleet.md).
func BenchmarkFleetScale(b *testing.B) {
	n := 1_000_000
	if env := os.Getenv("KEYWARD_BENCH_FLEET_KEYS"); env != "" {
		var err error
		if n, err = strconv.Atoi(env); err != nil || n < 1 {
			b.Fatalf("KEYWARD_BENCH_FLEET_KEYS: %q is not a number of keys", env)
		}
	}
	bin := daemontest.Build(b)
	t0 := time.Now()
	host, sample := scaleSetup(b, bin, n, 1000)
	made := time.Since(t0)
	c := etcdtest.New(b, etcdtest.Config{Members: 1, QuotaBackendBytes: 8 << 30})
	etcd := &daemon.EtcdConfig{Endpoints: c.Endpoints(), Prefix: "/keyward-scale"}
	host.Config.Store.Etcd = etcd
	ctx := context.Background()
	last := time.Now()
	res, err := daemon.Migrate(ctx, host.Config, daemon.MigrateOptions{Progress: func(p daemon.MigrateProgress) {
		if time.Since(last) > 10*time.Second {
			last = time.Now()
			b.Logf("migrating: %s, %d of %d records", p.Bucket, p.Copied, p.Total)
		}
	}})
	if err != nil {
		b.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints()})
	if err != nil {
		b.Fatal(err)
	}
	st, err := cli.Status(ctx, c.Endpoints()[0])
	cli.Close()
	if err != nil {
		b.Fatal(err)
	}

	node := daemontest.NewFiles(b, daemontest.SharedToken(host.Token), daemontest.Configure(func(cfg *daemon.Config) {
		cfg.Store.Etcd, cfg.Node = etcd, "scale-node"
	}))
	t0 = time.Now()
	cmd := daemontest.Exec(b, bin, node)
	start := time.Since(t0)
	rssStart, _, _ := memory(cmd.Pid())
	cl, err := client.Dial(node.Socket)
	if err != nil {
		b.Fatal(err)
	}
	verify := func(key string) error {
		v, err := cl.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod", Permissions: []string{"orders:read"}})
		if err == nil && v.Code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			err = fmt.Errorf("%v: %s", v.Code, v.Reason)
		}
		return err
	}
	for _, k := range sample {
		if err := verify(k); err != nil {
			b.Fatal(err)
		}
	}
	var r benchload.Result
	i := 0
	b.Run(fmt.Sprintf("%dkeys", n), func(b *testing.B) {
		r = benchload.RunAtLeast(b, 4, 20_000, func() error { i++; return verify(sample[i%len(sample)]) })
	})
	rss, anon, file := memory(cmd.Pid())
	cl.Close()
	if err := cmd.Stop(); err != nil {
		b.Fatal(err)
	}
	t0 = time.Now()
	cmd = daemontest.Exec(b, bin, node)
	restart := time.Since(t0)
	if err := cmd.Stop(); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(res.Took.Seconds(), "migrate-s")
	b.ReportMetric(float64(start.Milliseconds()), "start-ms")
	b.ReportMetric(float64(rss)/(1<<20), "rss-MiB")

	fmt.Printf("\nkeyward fleet with %d API keys in etcd (one member, in the benchmark's process), one run (%s)\n", n, time.Now().UTC().Format(time.RFC3339))
	fmt.Printf("keys made in the bbolt store: %v\n", made.Round(time.Second))
	fmt.Printf("migration: %d records in %d transactions, %v (%.0f records/s); etcd's database %d MiB\n",
		res.Records, res.Transactions, res.Took.Round(time.Second), float64(res.Records)/res.Took.Seconds(), st.DbSize>>20)
	fmt.Printf("a new node's start (its copy loaded from etcd): %v, RSS %d MiB after start, %d MiB after the verifications (anon %d, file %d)\n",
		start.Round(time.Millisecond), rssStart>>20, rss>>20, anon>>20, file>>20)
	fmt.Printf("its restart (the copy resumed from its revision): %v\n", restart.Round(time.Millisecond))
	fmt.Printf("VerifyAPIKey on it, 1 000 keys in use: %.0f/s, p50 %v, p99 %v\n", r.OpsPerSec, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond))
}
