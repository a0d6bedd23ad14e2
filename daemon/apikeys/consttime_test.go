package apikeys

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConstantTimeComparison: the package compares secrets and their MACs
// only with hmac.Equal. Lookups are by a hash of the presented key (the
// digest cache, a SHA-256; the hints and the index, HMACs under keys
// derived in the HSM), so their timing tells nothing an attacker can steer
// towards a secret; the one comparison of secret-derived bytes an attacker
// chooses, the record's MAC against the presented key's, must not stop at
// the first differing byte. A timing measurement would be flaky on shared
// machines, so this reads the code: no bytes.Equal, bytes.Compare,
// reflect.DeepEqual or ==/!= on anything named like a secret, a MAC or a
// digest, and hmac.Equal on the record's MAC.
func TestConstantTimeComparison(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	sawHMACEqual := false
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		src, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, name, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		text := func(n ast.Node) string {
			return string(src[fset.Position(n.Pos()).Offset:fset.Position(n.End()).Offset])
		}
		secretish := func(e ast.Expr) bool {
			s := strings.ToLower(text(e))
			return strings.Contains(s, "mac") || strings.Contains(s, "secret") && !strings.Contains(s, "secrets") || strings.Contains(s, "digest") || strings.Contains(s, "presented")
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CallExpr:
				switch fn := text(n.Fun); fn {
				case "bytes.Equal", "bytes.Compare", "reflect.DeepEqual": // the package needs none
					t.Errorf("%v: %s: compare secrets and MACs with hmac.Equal", fset.Position(n.Pos()), fn)
				case "strings.EqualFold", "strings.Compare", "slices.Equal", "slices.Compare", "cmp.Compare":
					for _, a := range n.Args {
						if secretish(a) {
							t.Errorf("%v: %s: compare secrets and MACs with hmac.Equal", fset.Position(n.Pos()), text(n))
						}
					}
				case "hmac.Equal":
					if strings.Contains(text(n), ".MAC") {
						sawHMACEqual = true
					}
				}
			case *ast.BinaryExpr:
				if (n.Op == token.EQL || n.Op == token.NEQ) && (secretish(n.X) || secretish(n.Y)) {
					t.Errorf("%v: %s: compare secrets and MACs with hmac.Equal", fset.Position(n.Pos()), text(n))
				}
			}
			return true
		})
	}
	if !sawHMACEqual {
		t.Error("no hmac.Equal on a record's MAC: how does Verify compare?")
	}
}
