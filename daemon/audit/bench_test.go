package audit

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/softhsm-test/benchload"
)

// BenchmarkAppend measures Append alone (records on disk per second, with
// their latency) from 1, 4, 16 and 64 concurrent callers.
func BenchmarkAppend(b *testing.B) {
	h := macHSM(b)
	for _, n := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("callers=%d", n), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"), h, macKey, Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			ctx := context.Background()
			benchload.Run(b, n, func() error { return l.Append(ctx, rec(1)) })
		})
	}
}
