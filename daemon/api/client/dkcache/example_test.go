package dkcache_test

import (
	"context"
	"errors"
	"log"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/dkcache"
)

// Sealing many small records under one key and tenant: one GenerateDataKey
// per 65 536 records or 5 minutes, whichever comes first.
func Example() {
	kw, err := client.Dial("") // $KEYWARD_SOCKET or the default socket
	if err != nil {
		log.Fatal(err)
	}
	defer kw.Close()
	c, err := dkcache.New(kw, dkcache.Options{})
	if errors.Is(err, dkcache.ErrMemoryLock) {
		log.Fatal(err) // raise RLIMIT_MEMLOCK, or set Options.AllowUnlocked knowingly
	}
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	tenant := map[string]string{"tenant": "42"}
	for _, row := range [][]byte{[]byte("order 1"), []byte("order 2")} {
		rec, err := c.Seal(ctx, "orders", row, tenant)
		if err != nil {
			log.Fatal(err)
		}
		pt, err := c.Open(ctx, "orders", rec, tenant)
		if err != nil {
			log.Fatal(err)
		}
		_ = pt
	}
}
