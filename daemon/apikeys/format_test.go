package apikeys

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
)

// counting is a fixed randomness stream for the test vectors: 0, 1, 2, ...
type counting struct{ n byte }

func (c *counting) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = c.n
		c.n++
	}
	return len(p), nil
}

// The test vectors of docs/formats.md.
// Each was computed independently too (Python: zlib.crc32, base62 by hand).
var vectors = []struct {
	prefix string
	start  byte // the random stream is start, start+1, ... (mod 256)
	key    string
}{
	{"kw", 0, "kw_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg0azNt7"},
	{"kwprod", 240, "kwprod_stuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXY2nT7Pf"}, // bytes 248-255 are skipped
}

func TestVectors(t *testing.T) {
	for _, v := range vectors {
		got, err := Generate(v.prefix, &counting{n: v.start})
		if err != nil {
			t.Fatal(err)
		}
		if got != v.key {
			t.Fatalf("Generate(%q, 0 1 2 ...) = %s, want %s", v.prefix, got, v.key)
		}
		if p, err := Parse(v.key); err != nil || p != v.prefix {
			t.Fatalf("Parse(%s) = %q, %v", v.key, p, err)
		}
	}
}

func TestGenerate(t *testing.T) {
	seen := map[string]bool{}
	counts := map[byte]int{}
	for range 2000 {
		k, err := Generate("kwprod", rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if len(k) != len("kwprod_")+49 || seen[k] {
			t.Fatalf("key %s: wrong length or repeated", k)
		}
		seen[k] = true
		if _, err := Parse(k); err != nil {
			t.Fatalf("a generated key does not parse: %v", err)
		}
		for i := len("kwprod_"); i < len(k)-checksumLen; i++ {
			counts[k[i]]++
		}
	}
	// Every character is about equally likely: 2000×43/62 ≈ 1387 each.
	for _, c := range []byte(alphabet) {
		if n := counts[c]; n < 1100 || n > 1700 {
			t.Errorf("character %c appears %d times; the random part is not uniform", c, n)
		}
	}
	if _, err := Generate("KW", rand.Reader); err == nil {
		t.Error("an upper-case prefix was accepted")
	}
}

// TestTypos: the checksum catches every change of one character and every
// swap of two neighbours, and refuses anything not in the format.
func TestTypos(t *testing.T) {
	key := vectors[0].key
	body := key[len("kw_"):]
	for i := range body {
		for _, c := range []byte(alphabet) {
			if c == body[i] {
				continue
			}
			typo := "kw_" + body[:i] + string(c) + body[i+1:]
			if _, err := Parse(typo); !errors.Is(err, ErrMalformed) {
				t.Fatalf("a one-character typo at %d passes: %s", i, typo)
			}
		}
		if i+1 < len(body) && body[i] != body[i+1] {
			swapped := "kw_" + body[:i] + string(body[i+1]) + string(body[i]) + body[i+2:]
			if _, err := Parse(swapped); !errors.Is(err, ErrMalformed) {
				t.Fatalf("swapping %d and %d passes", i, i+1)
			}
		}
	}
	for _, bad := range []string{"", "kw", "kw_", key[:len(key)-1], key + "0", "Kw" + key[2:], "kw-" + key[3:], "k_" + key[3:],
		strings.Replace(key, "A", "+", 1), " " + key, key + "\n"} {
		if _, err := Parse(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}

// FuzzParse: Parse never panics, and accepts only strings of the format.
func FuzzParse(f *testing.F) {
	f.Add(vectors[0].key)
	f.Add("kw_")
	f.Add("ghp_0123456789")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := Parse(s)
		if err != nil {
			return
		}
		if !strings.HasPrefix(s, p+"_") || len(s) != len(p)+1+49 || checksum(s[:len(s)-checksumLen]) != s[len(s)-checksumLen:] {
			t.Fatalf("Parse accepted %q", s)
		}
		if !bytes.ContainsAny([]byte(s[len(p)+1:]), alphabet) {
			t.Fatal("no key characters")
		}
	})
}

// TestParseLong: a huge string is refused by its length, before any scan.
func TestParseLong(t *testing.T) {
	key, err := Generate(strings.Repeat("k", maxPrefixLen), rand.Reader)
	if err != nil || len(key) != MaxLen {
		t.Fatalf("the longest key: %d characters, %v; want %d", len(key), err, MaxLen)
	}
	if _, err := Parse(key); err != nil {
		t.Fatalf("the longest key: %v", err)
	}
	if _, err := Parse(key + "x"); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "longer than any key") {
		t.Fatalf("one character more: %v", err)
	}
}
