package ship_test

import (
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/daemon/audit/ship"
)

// BenchmarkShip ships a log of 5 000 records (some 2.9 MB) from its start
// to a file (without fsync, to measure shipping rather than the disk), the
// same with every other record filtered out, and to an HTTP receiver:
// bytes of the local log shipped per second, the cursor's fsyncs
// included.
func BenchmarkShip(b *testing.B) {
	l := newLog(b)
	for range 2500 {
		l.add(b, 1, "EnvelopeService.Decrypt")
		l.add(b, 1, "APIKeyService.VerifyAPIKey")
	}
	eventually(b, "a last checkpoint", func() bool { st := l.State(); return st.LastCheckpointSeq == st.LastSeq })
	srv := httptest.NewServer(&receiver{})
	defer srv.Close()
	for _, bc := range []struct {
		name string
		sink func(dir string) ship.SinkConfig
	}{
		{"file", func(dir string) ship.SinkConfig {
			return ship.SinkConfig{Name: "b", Type: ship.TypeFile, Path: filepath.Join(dir, "out"), NoFsync: true}
		}},
		{"file-filtered", func(dir string) ship.SinkConfig {
			return ship.SinkConfig{Name: "b", Type: ship.TypeFile, Path: filepath.Join(dir, "out"), NoFsync: true, ExcludeOps: []string{"APIKeyService.*"}}
		}},
		{"http", func(string) ship.SinkConfig { return ship.SinkConfig{Name: "b", Type: ship.TypeHTTP, URL: srv.URL} }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(l.State().Size)
			for b.Loop() {
				dir := b.TempDir()
				s, stop := start(b, l, dir, bc.sink(dir))
				caughtUp(b, l, s)
				stop()
			}
		})
	}
}
