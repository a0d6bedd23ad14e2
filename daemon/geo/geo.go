// Package geo tells the country of an IP address from an operator-supplied
// GeoIP database in the MaxMind DB format (GeoLite2-Country, GeoIP2-City and
// the like), for API keys' usage by country, keys limited to countries and
// the anomaly detector's new-country alerts.
//
// The reading is github.com/oschwald/maxminddb-golang/v2's. The file is read
// into memory, not mapped: a reload swaps readers while verifications may
// still be looking up in the old one, and a slice the garbage collector
// frees when the last lookup is done cannot fault as an unmapped file would
// (a country database is a few megabytes). A database is checked whole
// (the library's Verify) before it is used, so a damaged file is refused
// when it is opened, not at some lookup. Lookups are on the verify path:
// many addresses share a record (one per country in a country database),
// so the country each record says is decoded once and then found by the
// record's offset in a read-only map, with no lock and no allocation.
package geo

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"

	"github.com/oschwald/maxminddb-golang/v2"
)

// Config is the configuration's geoip section.
type Config struct {
	// Database is the path of a MaxMind DB file (e.g.
	// /var/lib/GeoIP/GeoLite2-Country.mmdb); empty: no countries.
	Database string `yaml:"database"`
}

// ErrDatabase: a file is not a usable GeoIP database.
var ErrDatabase = errors.New("geo: not a usable MaxMind DB database")

// DB is a GeoIP database that can be reloaded while it is in use.
type DB struct {
	path string
	cur  atomic.Pointer[reader]
}

// reader is one database's contents and the countries decoded from it.
type reader struct {
	r *maxminddb.Reader
	// countries: data offset -> ISO code ("" for a record without a
	// valid one), copied on write, at most maxCached entries.
	countries atomic.Pointer[map[uintptr]string]
	mu        sync.Mutex // orders the writers of countries
}

// maxCached bounds the records whose country is kept: a country database
// has a few hundred; past that (a city database), each lookup decodes.
const maxCached = 4096

// record is the part of a record geo reads.
type record struct {
	Country struct {
		ISOCode string `maxminddb:"iso_code"`
	} `maxminddb:"country"`
	RegisteredCountry struct {
		ISOCode string `maxminddb:"iso_code"`
	} `maxminddb:"registered_country"`
}

// Open reads and checks the database at path.
func Open(path string) (*DB, error) {
	r, err := load(path)
	if err != nil {
		return nil, err
	}
	d := &DB{path: path}
	d.cur.Store(r)
	return d, nil
}

// Reload reads the file again and, if it is a usable database, uses it
// from now on; if not, the database in use stays and the error says why.
func (d *DB) Reload() error {
	r, err := load(d.path)
	if err != nil {
		return err
	}
	d.cur.Store(r)
	return nil
}

// Path is the database's file.
func (d *DB) Path() string { return d.path }

// Loaded says whether a database is in use: always, for a DB from Open
// (a nil DB has none).
func (d *DB) Loaded() bool { return d != nil && d.cur.Load() != nil }

func load(path string) (*reader, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("geo: reading the database: %w", err)
	}
	r, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// parse opens a database's bytes and checks them whole.
func parse(b []byte) (*reader, error) {
	mr, err := maxminddb.OpenBytes(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDatabase, err)
	}
	if err := mr.Verify(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDatabase, err)
	}
	if v := mr.Metadata.IPVersion; v != 4 && v != 6 {
		return nil, fmt.Errorf("%w: IP version %d", ErrDatabase, v)
	}
	r := &reader{r: mr}
	r.countries.Store(&map[uintptr]string{})
	return r, nil
}

// Country is the ISO 3166-1 alpha-2 code (upper case) of the country ip
// is in: the record's country, else its registered country; "" if the
// database does not say (not in it, no valid code, an IPv6 address in an
// IPv4 database) or there is no database. An IPv4-mapped IPv6 address is
// looked up as IPv4.
func (d *DB) Country(ip netip.Addr) string {
	if d == nil || !ip.IsValid() {
		return ""
	}
	r := d.cur.Load()
	if r == nil {
		return ""
	}
	return r.country(ip.Unmap().WithZone(""))
}

func (r *reader) country(ip netip.Addr) string {
	res := r.r.Lookup(ip)
	if res.Err() != nil || !res.Found() {
		return ""
	}
	off := res.Offset()
	if c, ok := (*r.countries.Load())[off]; ok {
		return c
	}
	var rec record
	if res.Decode(&rec) != nil {
		return ""
	}
	c := rec.Country.ISOCode
	if !IsCode(c) {
		c = rec.RegisteredCountry.ISOCode
	}
	if !IsCode(c) {
		c = ""
	}
	c = string([]byte(c)) // its own copy, not a view of the database
	r.mu.Lock()
	defer r.mu.Unlock()
	old := *r.countries.Load()
	if len(old) < maxCached {
		m := maps.Clone(old)
		m[off] = c
		r.countries.Store(&m)
	}
	return c
}

// IsCode says whether s is an ISO 3166-1 alpha-2 code as geo gives them:
// two upper-case ASCII letters.
func IsCode(s string) bool {
	return len(s) == 2 && s[0] >= 'A' && s[0] <= 'Z' && s[1] >= 'A' && s[1] <= 'Z'
}
