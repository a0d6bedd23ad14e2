// Command keyward-plugin-webhook is the webhook plugin: it POSTs keyward's
// revocations and managed credentials' rotations as signed JSON to a URL.
// keywardd runs it; see docs/plugins.md.
package main

import (
	"fmt"
	"os"

	"github.com/keyward/keyward/plugins/sdk"
	"github.com/keyward/keyward/plugins/webhook"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	h, err := webhook.FromEnv()
	if err != nil {
		fmt.Fprintf(os.Stderr, "keyward-plugin-webhook: %v\n", err)
		os.Exit(1)
	}
	sdk.Serve(sdk.Plugin{Name: "webhook", Version: version, Rotator: h, Revoker: h, Events: h.Events})
}
