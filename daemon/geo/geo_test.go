package geo_test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/geo"
	"github.com/keyward/keyward/daemon/geo/geotest"
)

func open(t testing.TB, nets ...geotest.Network) *geo.DB {
	t.Helper()
	db, err := geo.Open(geotest.Write(t, t.TempDir(), nets...))
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func TestCountry(t *testing.T) {
	db := open(t, append(geotest.Networks, geotest.Network{Prefix: "100.64.0.0/24", Country: "de"})...)
	for _, c := range []struct {
		ip, want string
	}{
		{"192.0.2.7", "DE"},
		{"198.51.100.255", "FR"},
		{"2001:db8:1::5", "DE"},
		{"2001:db8:2:ffff::1", "FR"},
		{"::ffff:198.51.100.1", "FR"}, // IPv4-mapped: looked up as IPv4
		{"203.0.113.1", "JP"},         // no country: the registered one
		{"203.0.113.200", ""},         // not in the database
		{"2001:db8:3::1", ""},         // not in the database
		{"fe80::1%eth0", ""},          // a zone is ignored; not in it
		{"100.64.0.1", ""},            // lower case: not a valid code
	} {
		if got := db.Country(netip.MustParseAddr(c.ip)); got != c.want {
			t.Errorf("Country(%s) = %q, want %q", c.ip, got, c.want)
		}
	}
	if got := db.Country(netip.Addr{}); got != "" {
		t.Errorf("Country(zero) = %q, want \"\"", got)
	}
	var none *geo.DB
	if none.Loaded() || none.Country(netip.MustParseAddr("192.0.2.1")) != "" {
		t.Error("a nil DB has a database")
	}
	if !db.Loaded() {
		t.Error("an opened DB says it has no database")
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.mmdb")
	good := geotest.Build(t, geotest.Networks...)
	if err := os.WriteFile(bad, good[:len(good)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := geo.Open(bad); !errors.Is(err, geo.ErrDatabase) {
		t.Errorf("Open(truncated) = %v, want ErrDatabase", err)
	}
	if _, err := geo.Open(filepath.Join(dir, "missing.mmdb")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) = %v, want a not-found error", err)
	}
}

// TestReload: a reload takes a new file; a bad one keeps the old database;
// lookups meanwhile see one or the other, never nothing.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	path := geotest.Write(t, dir, geotest.Network{Prefix: "192.0.2.0/24", Country: "DE"})
	db, err := geo.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr("192.0.2.1")
	var done atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		for !done.Load() {
			if c := db.Country(ip); c != "DE" && c != "FR" {
				t.Errorf("during reloads Country = %q", c)
				return
			}
		}
	})
	if err := os.WriteFile(path, geotest.Build(t, geotest.Network{Prefix: "192.0.2.0/24", Country: "FR"}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := db.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := db.Country(ip); got != "FR" {
		t.Errorf("after reload Country = %q, want FR", got)
	}
	if err := os.WriteFile(path, []byte("not a database"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := db.Reload(); !errors.Is(err, geo.ErrDatabase) {
		t.Errorf("Reload(bad file) = %v, want ErrDatabase", err)
	}
	if got := db.Country(ip); got != "FR" {
		t.Errorf("after a failed reload Country = %q, want FR (the database before)", got)
	}
	done.Store(true)
	wg.Wait()
}

func TestIsCode(t *testing.T) {
	for s, want := range map[string]bool{"DE": true, "XK": true, "de": false, "D": false, "DEU": false, "D1": false, "": false} {
		if geo.IsCode(s) != want {
			t.Errorf("IsCode(%q) = %v", s, !want)
		}
	}
}

// BenchmarkCountry is the lookup on the verify path, with the record's
// country cached (every lookup but a record's first).
func BenchmarkCountry(b *testing.B) {
	db := open(b, geotest.Networks...)
	for _, ip := range []string{"192.0.2.7", "2001:db8:2::1", "203.0.113.200"} {
		b.Run(ip, func(b *testing.B) {
			a := netip.MustParseAddr(ip)
			b.ReportAllocs()
			for b.Loop() {
				db.Country(a)
			}
		})
	}
}

// TestTunnelsNotPlaced: Teredo and 6to4 addresses embed an IPv4 address
// the client chooses; they are placed nowhere, so a key limited to
// countries refuses them.
func TestTunnelsNotPlaced(t *testing.T) {
	db := open(t, geotest.Networks...) // aliases both onto the IPv4 tree, as GeoLite2 does
	for _, ip := range []string{"2001:0:c000:207::1", "2002:c000:207::1"} {
		if got := db.Country(netip.MustParseAddr(ip)); got != "" {
			t.Errorf("Country(%s) = %q, want none", ip, got)
		}
	}
	if got := db.Country(netip.MustParseAddr("192.0.2.7")); got != "DE" {
		t.Errorf("the IPv4 address itself: %q, want DE", got)
	}
}

// TestLookupsDoNotAllocate: once a country database's records are
// cached, a lookup allocates nothing.
func TestLookupsDoNotAllocate(t *testing.T) {
	db := open(t, geotest.Networks...)
	ips := []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8:2::1"), netip.MustParseAddr("203.0.113.1")}
	for _, ip := range ips {
		db.Country(ip)
	}
	if n := testing.AllocsPerRun(100, func() {
		for _, ip := range ips {
			db.Country(ip)
		}
	}); n != 0 {
		t.Errorf("%v allocations a round of cached lookups, want 0", n)
	}
	if w := db.Warning(); w != "" {
		t.Errorf("a country database: warning %q", w)
	}
	if b := db.Built(); time.Since(b) > time.Hour || time.Until(b) > time.Minute {
		t.Errorf("Built() = %v, want about now (the test built it)", b)
	}
}

// TestRefusesLargeOrOdd: a file over MaxSize, or not a regular file (a
// FIFO would block the start), is refused before it is read.
func TestRefusesLargeOrOdd(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.mmdb")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(geo.MaxSize + 1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	f.Close()
	if _, err := geo.Open(big); !errors.Is(err, geo.ErrDatabase) || !strings.Contains(err.Error(), "country database") {
		t.Errorf("a %d-byte file: %v", geo.MaxSize+1, err)
	}
	fifo := filepath.Join(dir, "fifo.mmdb")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := geo.Open(fifo); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, geo.ErrDatabase) {
			t.Errorf("a FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("opening a FIFO blocked")
	}
}

// TestCheckCountry: a key is limited to countries' codes as the databases
// give them, and a code no database gives is refused with what to write.
func TestCheckCountry(t *testing.T) {
	for _, c := range []struct{ code, want string }{
		{"DE", ""}, {"GB", ""}, {"XK", ""},
		{"UK", "written GB"},
		{"XX", "not a country"}, {"EU", "not a country"}, {"ZZ", "not a country"},
		{"AP", "no country"},
		{"de", "upper-case"}, {"DEU", "two upper-case"}, {"", "two upper-case"},
	} {
		err := geo.CheckCountry(c.code)
		if (c.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.want) {
			t.Errorf("CheckCountry(%q) = %v, want %q", c.code, err, c.want)
		}
	}
}
