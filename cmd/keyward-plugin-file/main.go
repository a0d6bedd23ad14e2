// Command keyward-plugin-file is the file plugin: it keeps a managed
// credential's current secret in a file (mode 0600, replaced atomically) for
// applications that can only read one. keywardd runs it; see docs/plugins.md.
package main

import (
	"fmt"
	"os"

	"github.com/keyward/keyward/plugins/file"
	"github.com/keyward/keyward/plugins/sdk"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	r, err := file.FromEnv()
	if err != nil {
		fmt.Fprintf(os.Stderr, "keyward-plugin-file: %v\n", err)
		os.Exit(1)
	}
	sdk.Serve(sdk.Plugin{Name: "file", Version: version, Rotator: r, CheckConfig: r.CheckConfig})
}
