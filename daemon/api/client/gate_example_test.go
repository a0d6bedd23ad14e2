package client_test

import (
	"log"
	"net/http"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/gateway"
)

// A Go service admitting requests by API key: the key in the
// Authorization header ("Bearer KEY"), for environment prod with
// orders:read, verified through a verdict cache kept right by keywardd's
// watch stream.
func ExampleGate() {
	c, err := client.Dial("") // $KEYWARD_SOCKET or /run/keyward/keyward.sock
	if err != nil {
		log.Fatal(err)
	}
	vc := c.NewVerdictCache(client.VerdictCacheOptions{})
	defer vc.Close()
	orders := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("orders of " + r.Header.Get(gateway.HeaderOwner)))
	})
	gate := client.Gate(vc, client.GateOptions{Environment: "prod", Permissions: []string{"orders:read"}})
	http.Handle("/orders", gate(orders))
	// http.ListenAndServe(":8080", nil)
}
