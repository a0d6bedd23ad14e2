// Command keyward-plugin-postgres is the PostgreSQL plugin: it rotates an
// application's database login with an overlap (two login roles that take
// turns). keywardd runs it; see docs/plugins.md.
package main

import (
	"fmt"
	"os"

	"github.com/keyward/keyward/plugins/postgres"
	"github.com/keyward/keyward/plugins/sdk"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	r, err := postgres.FromEnv()
	if err != nil {
		fmt.Fprintf(os.Stderr, "keyward-plugin-postgres: %v\n", err)
		os.Exit(1)
	}
	sdk.Serve(sdk.Plugin{Name: "postgres", Version: version, Rotator: r, CheckConfig: r.CheckConfig})
}
