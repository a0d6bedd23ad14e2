// Package geotest builds small GeoIP databases in the MaxMind DB format
// for tests, with github.com/maxmind/mmdbwriter (MaxMind's own writer):
// keyward's tests read a real database without shipping one.
package geotest

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// Network is a network of a test database and the countries its record
// says; an empty one is left out of the record.
type Network struct {
	Prefix     string // e.g. "192.0.2.0/24", "2001:db8::/32"
	Country    string // country.iso_code
	Registered string // registered_country.iso_code
}

// Build returns an IPv6 database (IPv4 networks aliased into it, as
// GeoLite2's are) of type GeoLite2-Country holding nets.
func Build(t testing.TB, nets ...Network) []byte {
	t.Helper()
	w, err := mmdbwriter.New(mmdbwriter.Options{DatabaseType: "GeoLite2-Country", Description: map[string]string{"en": "keyward test countries"}, RecordSize: 24, IncludeReservedNetworks: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nets {
		_, p, err := net.ParseCIDR(n.Prefix)
		if err != nil {
			t.Fatal(err)
		}
		rec := mmdbtype.Map{}
		if n.Country != "" {
			rec["country"] = mmdbtype.Map{"iso_code": mmdbtype.String(n.Country), "geoname_id": mmdbtype.Uint32(1)}
		}
		if n.Registered != "" {
			rec["registered_country"] = mmdbtype.Map{"iso_code": mmdbtype.String(n.Registered)}
		}
		if err := w.Insert(p, rec); err != nil {
			t.Fatalf("geotest: inserting %s: %v", n.Prefix, err)
		}
	}
	var b bytes.Buffer
	if _, err := w.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Write writes a database of nets (Build) to a file in dir and returns
// its path.
func Write(t testing.TB, dir string, nets ...Network) string {
	t.Helper()
	path := filepath.Join(dir, "countries.mmdb")
	if err := os.WriteFile(path, Build(t, nets...), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// Networks is a database for keyward's tests: 192.0.2.0/24 and
// 2001:db8:1::/48 in Germany, 198.51.100.0/24 and 2001:db8:2::/48 in
// France, 203.0.113.0/25 registered to Japan (no country of its own);
// the rest of 203.0.113.0/24 and everything else is not in it.
var Networks = []Network{
	{Prefix: "192.0.2.0/24", Country: "DE", Registered: "DE"},
	{Prefix: "2001:db8:1::/48", Country: "DE"},
	{Prefix: "198.51.100.0/24", Country: "FR", Registered: "FR"},
	{Prefix: "2001:db8:2::/48", Country: "FR"},
	{Prefix: "203.0.113.0/25", Registered: "JP"},
}
