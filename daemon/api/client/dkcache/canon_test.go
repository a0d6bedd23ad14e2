package dkcache

import (
	"bytes"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon/envelope"
)

// A test may import daemon/envelope (the package itself does not: it would
// bring the HSM's cgo library into every client); these tests keep the
// copy of the canonical context encoding byte for byte equal to
// envelope.CanonicalContext, which keywardd binds the wrapped key to.

// fuzzContext makes an encryption context of b: its first byte the
// number of entries (up to 67, past envelope's 64), then each entry's key
// and value lengths (a byte each) and bytes, as far as b goes.
func fuzzContext(b []byte) map[string]string {
	if len(b) == 0 {
		return nil
	}
	n := int(b[0]) % 68
	b = b[1:]
	take := func() string {
		if len(b) == 0 {
			return ""
		}
		l := min(int(b[0]), len(b)-1)
		s := string(b[1 : 1+l])
		b = b[1+l:]
		return s
	}
	m := map[string]string{}
	for range n {
		k := take()
		m[k] = take()
	}
	return m
}

// FuzzCanonicalContext: for every context envelope.CanonicalContext
// accepts (what keywardd accepts), canonicalContext gives the same bytes.
// Seeds in testdata/fuzz/FuzzCanonicalContext.
func FuzzCanonicalContext(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		m := fuzzContext(b)
		want, err := envelope.CanonicalContext(m)
		if err != nil {
			return
		}
		if got := canonicalContext(m); !bytes.Equal(got, want) {
			t.Fatalf("%q: dkcache % x, envelope % x", m, got, want)
		}
	})
}

// TestCanonicalContextLimits: the same bytes at envelope's limits (64
// entries, keys of 256 bytes, values of 1024: lengths of two-byte
// varints) and for the empty cases.
func TestCanonicalContextLimits(t *testing.T) {
	big := map[string]string{}
	for i := range envelope.MaxContextEntries {
		k := strings.Repeat(string(rune('a'+i%26)), 1+i*4) + string(rune('0'+i/26))
		big[k[:min(len(k), envelope.MaxContextKeyLen)]] = strings.Repeat("v", envelope.MaxContextValueLen-i)
	}
	if len(big) != envelope.MaxContextEntries {
		t.Fatalf("%d entries; want %d distinct", len(big), envelope.MaxContextEntries)
	}
	for _, tc := range []struct {
		name string
		ctx  map[string]string
	}{
		{"nil", nil},
		{"empty", map[string]string{}},
		{"empty value", map[string]string{"k": ""}},
		{"utf-8", map[string]string{"é": "ü", "a": "\x00"}},
		{"at the limits", big},
	} {
		want, err := envelope.CanonicalContext(tc.ctx)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := canonicalContext(tc.ctx); !bytes.Equal(got, want) {
			t.Errorf("%s: dkcache % x\nenvelope % x", tc.name, got, want)
		}
	}
}
