package apikeys

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/geo"
	"github.com/keyward/keyward/daemon/geo/geotest"
)

// newGeoFixture is newFixture with a GeoIP database of geotest.Networks.
func newGeoFixture(t testing.TB) *fixture {
	t.Helper()
	db, err := geo.Open(geotest.Write(t, t.TempDir(), geotest.Networks...))
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t)
	f.geo = db
	f.reopen(t)
	return f
}

// TestManagerCountries: a key limited to countries is valid from them
// only; an unknown country (no address, not in the database) is refused;
// usage counts the countries.
func TestManagerCountries(t *testing.T) {
	f := newGeoFixture(t)
	s := spec()
	s.AllowedCountries = []string{"DE", "JP"}
	key, rec := f.create(t, s)
	if fmt.Sprint(rec.AllowedCountries) != "[DE JP]" {
		t.Fatalf("created with countries %v", rec.AllowedCountries)
	}
	for _, c := range []struct {
		ip     string
		want   Code
		detail string
	}{
		{"192.0.2.1", Valid, ""},
		{"2001:db8:1::7", Valid, ""},
		{"::ffff:192.0.2.2", Valid, ""},
		{"203.0.113.1", Valid, ""}, // registered to JP
		{"198.51.100.1", IPNotAllowed, "in FR, not in a country"},
		{"2001:db8:2::1", IPNotAllowed, "in FR"},
		{"203.0.113.200", IPNotAllowed, "country is unknown"},
		{"", IPNotAllowed, "country is unknown"},
	} {
		req := prod
		if c.ip != "" {
			req = from(c.ip)
		}
		res := f.verify(t, key, req, c.want)
		if !strings.Contains(res.Detail, c.detail) {
			t.Errorf("from %q: detail %q, want it to say %q", c.ip, res.Detail, c.detail)
		}
	}
	other, rec2 := f.create(t, spec()) // no countries: from anywhere
	f.verify(t, other, from("198.51.100.1"), Valid)
	f.verify(t, other, prod, Valid)

	check := func() {
		t.Helper()
		u, err := f.m.GetUsage(rec.ID, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]int64{"DE": 3, "JP": 1, "FR": 2, UnknownCountry: 2}
		if fmt.Sprint(u.Countries) != fmt.Sprint(want) {
			t.Errorf("countries %v, want %v", u.Countries, want)
		}
		if u, _ := f.m.GetUsage(rec2.ID, time.Hour); fmt.Sprint(u.Countries) != fmt.Sprint(map[string]int64{"FR": 1, UnknownCountry: 1}) {
			t.Errorf("the other key's countries %v", u.Countries)
		}
	}
	check() // pending
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	check() // stored

	for _, bad := range [][]string{{"de"}, {"DEU"}, {"D1"}, {""}} {
		s := spec()
		s.AllowedCountries = bad
		if _, _, err := f.m.Create(t.Context(), s); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "ISO 3166-1 alpha-2") {
			t.Errorf("countries %q: %v, want ErrInvalid naming the form", bad, err)
		}
	}
}

// TestManagerCountriesNarrow: adding countries narrows, removing or
// adding one to a key's list widens.
func TestManagerCountriesNarrow(t *testing.T) {
	f := newGeoFixture(t)
	s := spec()
	s.AllowedCountries = []string{"DE", "FR"}
	key, rec := f.create(t, s)
	for name, c := range map[string][]string{"no limit": {}, "another country": {"DE", "JP"}} {
		if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &c}, false); !errors.Is(err, ErrWidens) {
			t.Errorf("%s by a non-admin: %v, want ErrWidens", name, err)
		}
	}
	if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &[]string{"de"}}, true); !errors.Is(err, ErrInvalid) {
		t.Errorf("a lower-case country: %v, want ErrInvalid", err)
	}
	if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &[]string{"DE"}}, false); err != nil {
		t.Fatalf("narrowing to DE: %v", err)
	}
	f.verify(t, key, from("198.51.100.1"), IPNotAllowed)
	if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &[]string{}}, true); err != nil {
		t.Fatalf("an admin removing the limit: %v", err)
	}
	f.verify(t, key, from("198.51.100.1"), Valid)
	if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &[]string{"FR"}}, false); err != nil {
		t.Fatalf("a non-admin limiting a key to FR: %v", err)
	}
	f.verify(t, key, from("192.0.2.1"), IPNotAllowed)
	if got, _ := f.m.Get(rec.ID); fmt.Sprint(got.AllowedCountries) != "[FR]" {
		t.Errorf("stored countries %v, want [FR]", got.AllowedCountries)
	}
}

// TestManagerCountriesNeedDatabase: without a GeoIP database a key
// cannot be limited to countries, usage counts none, and a key limited
// before (the database since removed) is refused: fail closed.
func TestManagerCountriesNeedDatabase(t *testing.T) {
	f := newGeoFixture(t)
	s := spec()
	s.AllowedCountries = []string{"DE"}
	limited, rec := f.create(t, s)
	f.geo = nil
	f.reopen(t)

	if _, _, err := f.m.Create(t.Context(), s); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "geoip.database") {
		t.Errorf("creating with countries and no database: %v, want ErrInvalid naming geoip.database", err)
	}
	if _, err := f.m.Update(rec.ID, Change{AllowedCountries: &[]string{"DE"}}, true); !errors.Is(err, ErrInvalid) {
		t.Errorf("updating countries with no database: %v, want ErrInvalid", err)
	}
	// Other changes to the key still go through.
	if _, err := f.m.Update(rec.ID, Change{Permissions: []string{"invoices:read"}}, false); err != nil {
		t.Errorf("narrowing a limited key's permissions with no database: %v", err)
	}
	res := f.verify(t, limited, from("192.0.2.1"), IPNotAllowed)
	if !strings.Contains(res.Detail, "unknown") {
		t.Errorf("detail %q, want it to say the country is unknown", res.Detail)
	}
	key, rec2 := f.create(t, spec())
	f.verify(t, key, from("192.0.2.1"), Valid)
	if u, _ := f.m.GetUsage(rec2.ID, time.Hour); len(u.Countries) != 0 {
		t.Errorf("countries counted without a database: %v", u.Countries)
	}
}

// TestUsageCountriesBounded: an hour keeps maxCountries countries; the
// rest count under OtherCountries, in memory and when merged.
func TestUsageCountriesBounded(t *testing.T) {
	u := newUsageLog()
	now := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	for i := range maxCountries + 8 {
		c := string([]byte{'A' + byte(i/26), 'A' + byte(i%26)})
		u.record("k", Valid, netip.Addr{}, c, now, time.Millisecond)
	}
	h := u.take()["k"][now.Unix()]
	if len(h.Countries) != maxCountries+1 || h.Countries[OtherCountries] != 8 {
		t.Fatalf("%d countries, %d other; want %d and 8", len(h.Countries), h.Countries[OtherCountries], maxCountries+1)
	}
	var merged HourUsage
	merged.add(h)
	merged.add(&HourUsage{Countries: map[string]int64{"ZZ": 5}})
	if len(merged.Countries) != maxCountries+1 || merged.Countries[OtherCountries] != 13 {
		t.Errorf("merged: %d countries, %d other; want %d and 13", len(merged.Countries), merged.Countries[OtherCountries], maxCountries+1)
	}
}
