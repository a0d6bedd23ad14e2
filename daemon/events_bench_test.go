package daemon_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// BenchmarkWatch: the time from a revocation's answer to its event at a
// watcher (p50, p99), with 1 and with 1 000 watchers open, against the
// floor's round trip (a bare grpc-go server's Ping, durable) measured in
// the same run; and keywardd's resident memory with 1 000 idle watchers,
// keywardd a process of its own so that the clients' memory is not
// counted.
func BenchmarkWatch(b *testing.B) {
	ctx := context.Background()
	floor := keywardv1.NewStatusServiceClient(startFloor(b, true))
	bin := daemontest.Build(b)
	f := daemontest.NewFiles(b, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  all:
    limits: {connections: 128, calls: 4096}
    permissions:
      - operations: ["*"]
        keys: ["*"]
bindings:
  - role: all
    callers:
      - uid: %d
`, os.Getuid())), daemontest.Configure(func(c *daemon.Config) { c.Events.MaxWatchers = 2000 }))
	p := daemontest.Exec(b, bin, f)
	c, err := client.Dial(f.Socket)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()

	rss := func() float64 {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid()))
		if err != nil {
			b.Fatal(err)
		}
		for _, line := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
				return kb / 1024
			}
		}
		b.Fatal("no VmRSS")
		return 0
	}

	// latency revokes b.N keys and times each event's arrival at a watcher.
	latency := func(b *testing.B) {
		got := make(chan string, 1)
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		started := make(chan struct{})
		go c.Watch(wctx, client.WatchOptions{Kinds: []string{"api_key"}}, func(ch client.Change) error {
			if ch.Start {
				close(started)
			}
			if ch.Event != nil {
				got <- ch.Event.GetId()
			}
			return nil
		})
		<-started
		var took, floorTook []time.Duration
		for b.Loop() {
			b.StopTimer()
			k, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "bench", Name: "w", Environment: "prod", Permissions: []string{"orders:read"}})
			if err != nil {
				b.Fatal(err)
			}
			fs := time.Now()
			if _, err := floor.Ping(ctx, &keywardv1.PingRequest{}); err != nil {
				b.Fatal(err)
			}
			floorTook = append(floorTook, time.Since(fs))
			b.StartTimer()
			if _, err := c.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
				b.Fatal(err)
			}
			answered := time.Now()
			if id := <-got; id != k.Key.Id {
				b.Fatalf("event for %s; want %s", id, k.Key.Id)
			}
			took = append(took, time.Since(answered))
		}
		q := func(d []time.Duration, p float64) float64 {
			slices.Sort(d)
			return float64(d[min(len(d)-1, int(p*float64(len(d))))].Nanoseconds()) / 1e3
		}
		b.ReportMetric(q(took, 0.5), "p50-µs")
		b.ReportMetric(q(took, 0.99), "p99-µs")
		b.ReportMetric(q(floorTook, 0.5), "floor-p50-µs")
		b.ReportMetric(q(took, 0.5)/max(q(floorTook, 0.5), 1), "p50/floor")
	}
	b.Run("watchers=1", latency)

	// 1 000 idle watchers (on other kinds' events, so that they are woken
	// and read, but send nothing), over 40 connections (32 streams each at
	// most).
	before := rss()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var conns []*client.Client
	for range 40 {
		cc, err := client.Dial(f.Socket)
		if err != nil {
			b.Fatal(err)
		}
		defer cc.Close()
		conns = append(conns, cc)
	}
	open := make(chan error, 1000)
	for i := range 1000 {
		cc := conns[i%len(conns)]
		go func() {
			started := false
			err := cc.Watch(wctx, client.WatchOptions{Kinds: []string{"credential_rotated"}}, func(ch client.Change) error {
				if ch.Start && !started {
					started = true
					open <- nil
				}
				if ch.Lost && !started {
					open <- ch.Err
					return ch.Err
				}
				return nil
			})
			_ = err
		}()
	}
	for range 1000 {
		if err := <-open; err != nil {
			b.Fatal(err)
		}
	}
	time.Sleep(time.Second) // settled
	with := rss()
	b.Run("watchers=1001", latency)
	b.Run("idle-memory", func(b *testing.B) {
		for b.Loop() {
		}
		b.ReportMetric(before, "rss-before-MiB")
		b.ReportMetric(with, "rss-1000-watchers-MiB")
		b.ReportMetric((with-before)*1024/1000, "KiB/watcher")
	})
}
