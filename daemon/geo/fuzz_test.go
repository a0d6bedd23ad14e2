package geo

import (
	"net/netip"
	"testing"
)

// FuzzParse: any bytes as a database are refused or give a reader whose
// lookups answer a valid code or nothing, never a panic. The seeds
// (testdata/fuzz/FuzzParse) are a database geotest built, cut short and
// flipped, and bytes that are no database.
func FuzzParse(f *testing.F) {
	f.Add([]byte("not a database"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parse(b)
		if err != nil {
			return
		}
		for _, ip := range []string{"192.0.2.7", "198.51.100.1", "2001:db8:1::1", "::ffff:203.0.113.1", "0.0.0.0"} {
			if c := r.country(netip.MustParseAddr(ip)); c != "" && !IsCode(c) {
				t.Fatalf("country(%s) = %q", ip, c)
			}
		}
	})
}
