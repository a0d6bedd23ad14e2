package anomaly_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/anomaly"
)

// BenchmarkObserve is what the detector adds to each VerifyAPIKey: 1 000
// keys in use, each from its network and country, past their learning
// time, watched for new networks and countries. Compare with the apikeys
// package's BenchmarkVerifyCached.
func BenchmarkObserve(b *testing.B) {
	d := anomaly.New(anomaly.Config{Enabled: true, Learn: time.Minute, NewNetworks: true, NewCountries: true, MinRate: 1e9}, openStore(b))
	countries := []string{"DE", "FR", "JP", "US"}
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	ids := make([]string, 1000)
	for i := range ids {
		ids[i] = fmt.Sprintf("ak_%024x", i)
		d.Observe(ids[i], netip.AddrFrom4([4]byte{10, 0, byte(i % 4), 1}), countries[i%4], start, true)
	}
	now := start.Add(time.Hour)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		n := i % len(ids)
		d.Observe(ids[n], netip.AddrFrom4([4]byte{10, 0, byte(n % 4), 1}), countries[n%4], now.Add(time.Duration(i)*time.Millisecond), true)
	}
}
