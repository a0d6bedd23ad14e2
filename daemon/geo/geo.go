// Package geo tells the country of an IP address from an operator-supplied
// GeoIP database in the MaxMind DB format (GeoLite2-Country, GeoIP2-City and
// the like), for API keys' usage by country, keys limited to countries and
// the anomaly detector's new-country alerts.
//
// The reading is github.com/oschwald/maxminddb-golang/v2's. The file is read
// into memory, not mapped: a reload swaps readers while verifications may
// still be looking up in the old one, and a slice the garbage collector
// frees when the last lookup is done cannot fault as an unmapped file would
// (a country database is a few megabytes; a file over MaxSize is refused,
// and one that is not a country database is used with a warning in the
// log, Warning). A database is checked whole (the library's Verify)
// before it is used, so a damaged file is refused when it is opened, not
// at some lookup. Lookups are on the verify path: many addresses share a
// record (one per country in a country database), so the country each
// record says is decoded once and then found by the record's offset in a
// fixed table of atomic words (offset and code packed in one), with no
// lock and no allocation; a city database's millions of records miss it
// often, and each miss decodes (and allocates).
package geo

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/oschwald/maxminddb-golang/v2"
	"golang.org/x/text/language"
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
	// countries caches a record's country by its data offset, direct
	// mapped: slot off%cacheSlots holds (off+1)<<16 | code, the code's two
	// letters in the low 16 bits (0: a record without a valid code), or 0
	// when empty.
	countries [cacheSlots]atomic.Uint64
}

// cacheSlots is the size of a reader's country cache: a country database
// has a few hundred records, which all fit.
const cacheSlots = 4096

// MaxSize is the largest database file keywardd reads: a country database
// is a few megabytes, a city one about 70.
const MaxSize = 256 << 20

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
	// Not blocking: a FIFO named by mistake would wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("geo: reading the database: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	switch {
	case err != nil:
		return nil, fmt.Errorf("geo: reading the database: %w", err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrDatabase, path)
	case fi.Size() > MaxSize:
		return nil, fmt.Errorf("%w: %s is %d MiB, more than keywardd reads (%d MiB): use a country database (GeoLite2-Country)", ErrDatabase, path, fi.Size()>>20, MaxSize>>20)
	}
	b := make([]byte, fi.Size())
	if _, err := io.ReadFull(f, b); err != nil {
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
	return &reader{r: mr}, nil
}

// Warning is what the log should say of the database in use: that it is
// not a country database (a city one costs memory and a decode on many
// lookups), or "".
func (d *DB) Warning() string {
	if t := d.cur.Load().r.Metadata.DatabaseType; !strings.Contains(t, "Country") {
		return fmt.Sprintf("the GeoIP database is of type %q, not a country database: it takes more memory, and many lookups decode a record (GeoLite2-Country is enough for keyward)", t)
	}
	return ""
}

// Built is when the database in use was built (its metadata), to tell a
// stale one.
func (d *DB) Built() time.Time {
	return time.Unix(int64(d.cur.Load().r.Metadata.BuildEpoch), 0)
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
	ip = ip.Unmap().WithZone("")
	if tunnelled(ip) {
		return ""
	}
	return r.country(ip)
}

// Teredo (2001::/32) and 6to4 (2002::/16) addresses embed an IPv4 address
// that the client chooses (a relay's, a server's); the databases place
// them by it. They are placed nowhere: a key limited to countries refuses
// them.
var tunnels = []netip.Prefix{netip.MustParsePrefix("2001::/32"), netip.MustParsePrefix("2002::/16")}

func tunnelled(ip netip.Addr) bool {
	return ip.Is6() && (tunnels[0].Contains(ip) || tunnels[1].Contains(ip))
}

func (r *reader) country(ip netip.Addr) string {
	res := r.r.Lookup(ip)
	if res.Err() != nil || !res.Found() {
		return ""
	}
	off := res.Offset()
	slot := &r.countries[off%cacheSlots]
	if v := slot.Load(); v>>16 == uint64(off)+1 {
		return codeOf(uint16(v))
	}
	var rec record
	if res.Decode(&rec) != nil {
		return ""
	}
	c := rec.Country.ISOCode
	if !IsCode(c) {
		c = rec.RegisteredCountry.ISOCode
	}
	var packed uint16
	if IsCode(c) {
		packed = uint16(c[0])<<8 | uint16(c[1])
	}
	slot.Store((uint64(off)+1)<<16 | uint64(packed))
	return codeOf(packed)
}

// codes are the strings of every two-letter code, so that a cached
// country is returned without an allocation.
var codes = func() (out [26 * 26]string) {
	for i := range out {
		out[i] = string([]byte{byte('A' + i/26), byte('A' + i%26)})
	}
	return out
}()

// codeOf is the code packed in c's two bytes, "" for 0.
func codeOf(c uint16) string {
	if c == 0 {
		return ""
	}
	return codes[int(c>>8-'A')*26+int(c&0xff-'A')]
}

// CheckCountry says whether c is a code a key may be limited to: a
// country's ISO 3166-1 alpha-2 code, upper case, as the databases give it
// (GB, not UK; no region such as EU, no reserved code such as XX).
func CheckCountry(c string) error {
	if !IsCode(c) {
		return fmt.Errorf("%q is not an ISO 3166-1 alpha-2 code: two upper-case letters (DE, FR, US)", c)
	}
	r, err := language.ParseRegion(c)
	if err != nil {
		return fmt.Errorf("%q is no country's ISO 3166-1 code", c)
	}
	if canon := r.Canonicalize().String(); canon != c {
		return fmt.Errorf("%q is written %s in ISO 3166-1 and the GeoIP databases", c, canon)
	}
	if !r.IsCountry() {
		return fmt.Errorf("%q is not a country's code (a region, or a code reserved for private use)", c)
	}
	return nil
}

// IsCode says whether s is an ISO 3166-1 alpha-2 code as geo gives them:
// two upper-case ASCII letters.
func IsCode(s string) bool {
	return len(s) == 2 && s[0] >= 'A' && s[0] <= 'Z' && s[1] >= 'A' && s[1] <= 'Z'
}
