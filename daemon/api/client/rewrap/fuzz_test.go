package rewrap_test

import (
	"testing"

	"github.com/keyward/keyward/daemon/api/client/rewrap"
	"github.com/keyward/keyward/daemon/envelope"
)

// FuzzHeader: Header reads what keywardd's own parser reads from every
// ciphertext keywardd would take, and nothing from bytes it would refuse
// for their header.
func FuzzHeader(f *testing.F) {
	f.Add([]byte("kwe\x01\x08payments\x00\x00\x00\x03\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b0123456789abcdef"))
	f.Add([]byte("kwe\x01\x00"))
	f.Add([]byte("kwe\x02\x01k\x00\x00\x00\x01"))
	f.Fuzz(func(t *testing.T, b []byte) {
		key, v, ok := rewrap.Header(b)
		c, err := envelope.Parse(b)
		if err == nil && (!ok || key != c.KeyName || v != c.KeyVersion) {
			t.Fatalf("Header = %q v%d %v; envelope.Parse = %q v%d", key, v, ok, c.KeyName, c.KeyVersion)
		}
		if ok && (key == "" || v == 0) {
			t.Fatalf("Header = %q v%d, ok", key, v)
		}
	})
}
