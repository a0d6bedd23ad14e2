package rewrap_test

import (
	"testing"

	"github.com/keyward/keyward/daemon/api/client/rewrap"
	"github.com/keyward/keyward/daemon/envelope"
)

// FuzzHeader: Header takes exactly the bytes keywardd's own parser takes,
// and reads from them what it reads.
func FuzzHeader(f *testing.F) {
	f.Add([]byte("kwe\x01\x08payments\x00\x00\x00\x03\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b0123456789abcdef"))
	f.Add([]byte("kwe\x01\x00"))
	f.Add([]byte("kwe\x02\x01k\x00\x00\x00\x01"))
	f.Add([]byte("kwe\x01\x02\x1b[\x00\x00\x00\x01\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b0123456789abcdef"))
	f.Fuzz(func(t *testing.T, b []byte) {
		key, v, ok := rewrap.Header(b)
		c, err := envelope.Parse(b)
		if ok != (err == nil) {
			t.Fatalf("Header = %q v%d %v; envelope.Parse: %v", key, v, ok, err)
		}
		if ok && (key != c.KeyName || v != c.KeyVersion) {
			t.Fatalf("Header = %q v%d; envelope.Parse = %q v%d", key, v, c.KeyName, c.KeyVersion)
		}
	})
}
