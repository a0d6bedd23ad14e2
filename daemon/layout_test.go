// Package daemon_test keeps the module's import rules (docs/architecture in
// DESIGN.md) true: a test over `go list` of every package.
package daemon_test

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/keyward/keyward"

type pkg struct {
	ImportPath string
	Imports    []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-json=ImportPath,Imports", "./...")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(root)))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 3 {
		t.Fatalf("go list found %d packages; is the module root right?", len(pkgs))
	}
	return pkgs
}

func under(path, prefix string) bool { return path == prefix || strings.HasPrefix(path, prefix+"/") }

type rule struct {
	name   string
	who    func(p string) bool // packages the rule applies to
	banned func(imp string) bool
}

var rules = []rule{
	{"hsm imports nothing of keyward's",
		func(p string) bool { return under(p, module+"/hsm") },
		func(imp string) bool { return under(imp, module) && !under(imp, module+"/hsm") }},
	// keywardd --dev's throw-away token is a test fixture by nature, so dev
	// mode is the one other importer.
	{"only tests (and dev mode) import softhsm-test",
		func(p string) bool { return !under(p, module+"/softhsm-test") && p != module+"/daemon/devmode" },
		func(imp string) bool { return under(imp, module+"/softhsm-test") }},
	{"only hsm (and the test fixtures) talk PKCS#11",
		func(p string) bool { return !under(p, module+"/hsm") && !under(p, module+"/softhsm-test") },
		func(imp string) bool {
			return under(imp, "github.com/miekg/pkcs11") || under(imp, "github.com/ThalesGroup/crypto11")
		}},
	{"nothing imports a command",
		func(string) bool { return true },
		func(imp string) bool { return under(imp, module+"/cmd") }},
	{"domain packages never import gRPC or the generated API",
		func(p string) bool {
			return under(p, module+"/daemon") && !under(p, module+"/daemon/server") && !under(p, module+"/daemon/api")
		},
		func(imp string) bool { return under(imp, "google.golang.org/grpc") || under(imp, module+"/daemon/api") }},
	{"the plugin SDK and protocol depend on the protocol alone",
		func(p string) bool { return under(p, module+"/plugins/sdk") || under(p, module+"/plugins/proto") },
		func(imp string) bool { return under(imp, module) && !under(imp, module+"/plugins/proto") }},
}

func violations(pkgs []pkg) []string {
	var out []string
	for _, r := range rules {
		for _, p := range pkgs {
			if !r.who(p.ImportPath) {
				continue
			}
			for _, imp := range p.Imports {
				if r.banned(imp) {
					out = append(out, r.name+": "+p.ImportPath+" imports "+imp)
				}
			}
		}
	}
	return out
}

// TestImportRules checks the non-test imports of every package against the
// rules of DESIGN.md.
func TestImportRules(t *testing.T) {
	for _, v := range violations(listPackages(t)) {
		t.Error(v)
	}
}

// TestRulesBite feeds each rule a package that breaks it.
func TestRulesBite(t *testing.T) {
	for _, p := range []pkg{
		{module + "/hsm", []string{module + "/daemon/store"}},
		{module + "/daemon/envelope", []string{module + "/softhsm-test"}},
		{module + "/daemon/envelope", []string{"github.com/miekg/pkcs11"}},
		{module + "/plugins/host", []string{"github.com/ThalesGroup/crypto11"}},
		{module + "/daemon", []string{module + "/cmd/keyward"}},
		{module + "/daemon/apikeys", []string{"google.golang.org/grpc/status"}},
		{module + "/plugins/sdk", []string{module + "/plugins/host"}},
	} {
		if v := violations([]pkg{p}); len(v) != 1 {
			t.Errorf("%s importing %v: %d violations, want 1: %v", p.ImportPath, p.Imports, len(v), v)
		}
	}
	for _, p := range []pkg{
		{module + "/hsm", []string{"github.com/miekg/pkcs11"}},
		{module + "/softhsm-test", []string{"github.com/miekg/pkcs11", module + "/hsm"}},
		{module + "/daemon/server", []string{"google.golang.org/grpc", module + "/daemon/api/v1"}},
		{module + "/daemon/devmode", []string{module + "/softhsm-test"}},
		{module + "/plugins/sdk", []string{module + "/plugins/proto/v1", "github.com/hashicorp/go-plugin"}},
	} {
		if v := violations([]pkg{p}); len(v) != 0 {
			t.Errorf("%s importing %v is allowed, but: %v", p.ImportPath, p.Imports, v)
		}
	}
}
