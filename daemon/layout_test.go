// Package daemon_test keeps the module's import rules (docs/architecture.md)
// true: a test over `go list` of every package, its imports and everything
// they reach, and over the names the domain packages use of the store.
package daemon_test

import (
	"encoding/json"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/keyward/keyward"

type pkg struct {
	ImportPath string
	Imports    []string // what its non-test files import
	Deps       []string // everything those reach, transitively
	Dir        string
	GoFiles    []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-json=ImportPath,Imports,Deps,Dir,GoFiles", "./...")
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

func ours(imp string) bool { return under(imp, module) }

// A rule bans some imports to some packages: their direct imports, or, if
// deps, everything they reach (an indirect path breaks the rule as much).
type rule struct {
	name   string
	deps   bool
	who    func(p string) bool // packages the rule applies to
	banned func(imp string) bool
}

// leaves import nothing of keyward's, even indirectly: each does one job
// that needs no other part, and everything above may use it without a
// cycle. hsm is the one PKCS#11 adapter, and store the one storage engine:
// records are opaque to it (their formats are the domain's), so a second
// backend needs nothing of the domain either. ratelimit, names, identity,
// socket, metrics, dynlimits, procenv and geo are a mechanism each (an
// algorithm, a form of names, the kernel's word on a peer, a socket made
// safely, Prometheus, a CPU reading, /proc, a GeoIP database) that the
// domain and the daemon share.
var leaves = []string{"hsm", "daemon/store", "daemon/ratelimit", "daemon/names", "daemon/identity",
	"daemon/socket", "daemon/metrics", "daemon/dynlimits", "daemon/procenv", "daemon/geo"}

func isLeaf(p string) bool {
	for _, l := range leaves {
		if p == module+"/"+l {
			return true
		}
	}
	return false
}

// domain is every package under daemon/ but those that wire it to the
// world: the daemon itself (it assembles the parts and opens the store),
// its dev mode, the API (generated) and server (it translates calls into
// the domain's and errors into gRPC codes).
func domain(p string) bool {
	return under(p, module+"/daemon") && p != module+"/daemon" && !under(p, module+"/daemon/devmode") &&
		!under(p, module+"/daemon/server") && !under(p, module+"/daemon/api")
}

var rules = []rule{
	{"leaves import nothing of keyward's", true,
		isLeaf,
		ours},
	// A store backend (daemon/store/...: the bbolt one, the conformance
	// suite, the next) holds opaque records: knowing a domain's formats
	// would tie the engine to it, and the domain depends on the store.
	{"store backends depend on daemon/store alone", true,
		func(p string) bool { return under(p, module+"/daemon/store") },
		func(imp string) bool { return ours(imp) && imp != module+"/daemon/store" }},
	// keywardd --dev's throw-away token is a test fixture by nature, so dev
	// mode is the one other importer; no library reaches it at all, so no
	// test fixture can end up in what keywardd runs but through dev mode.
	{"only tests (and dev mode) import softhsm-test", false,
		func(p string) bool { return !under(p, module+"/softhsm-test") && p != module+"/daemon/devmode" },
		func(imp string) bool { return under(imp, module+"/softhsm-test") }},
	{"no library depends on softhsm-test but dev mode", true,
		func(p string) bool {
			return (under(p, module+"/daemon") || under(p, module+"/plugins") || under(p, module+"/hsm")) &&
				p != module+"/daemon" && p != module+"/daemon/devmode"
		},
		func(imp string) bool { return under(imp, module+"/softhsm-test") }},
	// One place maps PKCS#11 codes to errors: anyone else calling the
	// module would need its own map.
	{"only hsm (and the test fixtures) talk PKCS#11", false,
		func(p string) bool { return !under(p, module+"/hsm") && !under(p, module+"/softhsm-test") },
		func(imp string) bool {
			return under(imp, "github.com/miekg/pkcs11") || under(imp, "github.com/ThalesGroup/crypto11")
		}},
	// A command is a main: what it holds belongs in a package.
	{"nothing imports a command", false,
		func(string) bool { return true },
		func(imp string) bool { return under(imp, module+"/cmd") }},
	// The domain speaks Go errors; server maps them to gRPC codes in one
	// place (server/errcodes.go). Indirectly too: a domain package that reached
	// gRPC through another would carry it into every backend and test.
	// The etcd store backend is the exception: etcd's client is a gRPC
	// client, and etcd's errors are told apart by their gRPC codes
	// (docs/fleet.md); it maps them to the store's errors itself, and the
	// rule for store backends keeps keyward's API out of it.
	{"domain packages never depend on gRPC or the generated API", true,
		func(p string) bool { return domain(p) && !under(p, module+"/daemon/store/etcdstore") },
		func(imp string) bool { return under(imp, "google.golang.org/grpc") || under(imp, module+"/daemon/api") }},
	// The daemon and its dev mode wire the parts together; server alone
	// holds the gRPC side (they reach it through server, not themselves).
	{"the daemon never imports gRPC or the generated API itself", false,
		func(p string) bool { return p == module+"/daemon" || under(p, module+"/daemon/devmode") },
		func(imp string) bool { return under(imp, "google.golang.org/grpc") || under(imp, module+"/daemon/api") }},
	// server translates calls into the domain's and back: the HSM and the
	// store are the domain's to use (their failures reach it sorted by
	// daemon/faults), so that a call's path through them is in one place,
	// and a second store backend changes nothing here.
	{"server does not import hsm or the store", false,
		func(p string) bool { return under(p, module+"/daemon/server") },
		func(imp string) bool { return imp == module+"/hsm" || imp == module+"/daemon/store" }},
	// Plugins are built apart from keywardd, against the protocol only.
	{"the plugin SDK and protocol depend on the protocol alone", true,
		func(p string) bool { return under(p, module+"/plugins/sdk") || under(p, module+"/plugins/proto") },
		func(imp string) bool { return ours(imp) && !under(imp, module+"/plugins/proto") }},
}

func violations(pkgs []pkg) []string {
	var out []string
	for _, r := range rules {
		for _, p := range pkgs {
			if !r.who(p.ImportPath) {
				continue
			}
			imps := p.Imports
			if r.deps {
				imps = p.Deps
			}
			for _, imp := range imps {
				if r.banned(imp) {
					out = append(out, r.name+": "+p.ImportPath+" depends on "+imp)
				}
			}
		}
	}
	return out
}

// throughContract is what a package outside daemon/store may name of it:
// the contract (Backend and its sizes, what a backend that takes less, or
// that other processes share, offers: TxLimiter, BatchKeys, Locker,
// Syncer), the
// schema's buckets and keys, and the sentinel errors. The domain packages use the store through
// interfaces of their own, subsets of Backend, so that another backend
// serves them unchanged; the bbolt type and how to open it (Store, Open,
// Options, Sealed...) belong to where keywardd opens its store.
func throughContract(name string) bool {
	switch {
	case name == "Backend", name == "Buckets", name == "OutboxKey", name == "LegacyAPIKeys",
		name == "TxLimiter", name == "BatchKeys", name == "Locker", name == "Syncer":
		return true
	case strings.HasPrefix(name, "Bucket"), strings.HasPrefix(name, "Err"), strings.HasPrefix(name, "Max"):
		return true
	}
	return false
}

// storeNames is every name of daemon/store a Go file refers to, besides
// those of the contract.
func storeNames(file string, src any) ([]string, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, src, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	local := ""
	for _, imp := range f.Imports {
		if imp.Path.Value == strconv.Quote(module+"/daemon/store") {
			local = "store"
			if imp.Name != nil {
				local = imp.Name.Name
			}
		}
	}
	if local == "" {
		return nil, nil
	}
	var out []string
	ast.Inspect(f, func(n ast.Node) bool {
		if sel, ok := n.(*ast.SelectorExpr); ok {
			if id, ok := sel.X.(*ast.Ident); ok && id.Name == local && !throughContract(sel.Sel.Name) {
				out = append(out, fset.Position(sel.Pos()).String()+": store."+sel.Sel.Name)
			}
		}
		return true
	})
	return out, nil
}

// TestStoreThroughContract: outside daemon/store, only the daemon, which
// opens the store, names more of it than the contract.
func TestStoreThroughContract(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.ImportPath == module+"/daemon" || under(p.ImportPath, module+"/daemon/store") {
			continue
		}
		for _, f := range p.GoFiles {
			names, err := storeNames(filepath.Join(p.Dir, f), nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range names {
				t.Errorf("%s: %s uses the bbolt store, not the contract (store.Backend, the buckets, the errors): declare an interface of the methods it needs", n, p.ImportPath)
			}
		}
	}
}

// TestImportRules checks every package's non-test imports, and what they
// reach, against the rules.
func TestImportRules(t *testing.T) {
	for _, v := range violations(listPackages(t)) {
		t.Error(v)
	}
}

// TestRulesBite feeds each rule a package that breaks it, directly or
// through what it reaches, and each rule's exceptions.
func TestRulesBite(t *testing.T) {
	imports := func(p string, imps ...string) pkg {
		return pkg{ImportPath: module + "/" + p, Imports: imps, Deps: imps}
	}
	reaches := func(p string, deps ...string) pkg { return pkg{ImportPath: module + "/" + p, Deps: deps} }
	for _, p := range []pkg{
		imports("hsm", module+"/daemon/store"),
		reaches("hsm", module+"/daemon/names"),
		reaches("daemon/store/storetest", module+"/daemon/outbox"),
		reaches("daemon/ratelimit", module+"/hsm"),
		reaches("daemon/store/etcd", module+"/daemon/apikeys"),
		reaches("daemon/store/etcdstore", module+"/daemon/api/v1"),
		imports("daemon/envelope", "github.com/miekg/pkcs11"),
		imports("plugins/host", "github.com/ThalesGroup/crypto11"),
		imports("daemon", module+"/cmd/keyward"),
		imports("daemon/apikeys", "google.golang.org/grpc/status"),
		imports("daemon/server", module+"/hsm"),
		imports("daemon/server", module+"/daemon/store"),
		imports("daemon", "google.golang.org/grpc"),
		reaches("daemon/apikeys", "google.golang.org/grpc"),
		reaches("daemon/schedule", module+"/daemon/api/v1"),
		imports("plugins/sdk", module+"/plugins/host"),
		reaches("plugins/proto/v1", module+"/plugins/sdk"),
		reaches("daemon/keys", module+"/softhsm-test"),
	} {
		if v := violations([]pkg{p}); len(v) != 1 {
			t.Errorf("%s importing %v, reaching %v: %d violations, want 1: %v", p.ImportPath, p.Imports, p.Deps, len(v), v)
		}
	}
	// softhsm-test imported by a library breaks both of its rules.
	if v := violations([]pkg{imports("daemon/envelope", module+"/softhsm-test")}); len(v) != 2 {
		t.Errorf("daemon/envelope importing softhsm-test: %v, want both softhsm-test rules", v)
	}
	for _, p := range []pkg{
		imports("hsm", "github.com/miekg/pkcs11"),
		imports("softhsm-test", "github.com/miekg/pkcs11", module+"/hsm"),
		imports("daemon/server", "google.golang.org/grpc", module+"/daemon/api/v1"),
		imports("daemon/devmode", module+"/softhsm-test"),
		reaches("daemon", module+"/daemon/devmode", module+"/softhsm-test", "google.golang.org/grpc"),
		imports("plugins/sdk", module+"/plugins/proto/v1", "github.com/hashicorp/go-plugin"),
		reaches("daemon/store/etcd", module+"/daemon/store", "go.etcd.io/etcd/client/v3"),
		reaches("daemon/store/etcdstore", module+"/daemon/store", "go.etcd.io/etcd/client/v3", "google.golang.org/grpc"),
		reaches("daemon/store/storetest", module+"/daemon/store"),
		reaches("daemon/apikeys", module+"/daemon/store", module+"/hsm", module+"/daemon/outbox"),
	} {
		if v := violations([]pkg{p}); len(v) != 0 {
			t.Errorf("%s importing %v, reaching %v is allowed, but: %v", p.ImportPath, p.Imports, p.Deps, v)
		}
	}
}

// TestContractRuleBites: storeNames finds a name of the bbolt store under
// any import name, and lets the contract's pass.
func TestContractRuleBites(t *testing.T) {
	for _, c := range []struct {
		src  string
		want int
	}{
		{`package a; import "` + module + `/daemon/store"; func f(s *store.Store) { store.Open("", store.Options{}) }`, 3},
		{`package a; import st "` + module + `/daemon/store"; var _ = st.Sealed`, 1},
		{`package a; import "` + module + `/daemon/store"; var _ store.Backend; var _ = []any{store.BucketKeys, store.ErrNotFound, store.OutboxKey, store.MaxTxKeys}`, 0},
		{`package a; import "other/store"; var _ = store.Open`, 0},
	} {
		got, err := storeNames("a.go", c.src)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != c.want {
			t.Errorf("%s: %v, want %d", c.src, got, c.want)
		}
	}
}
