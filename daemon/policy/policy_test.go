package policy

import (
	"errors"
	"os/user"
	"strings"
	"testing"
	"time"
)

var ops = []string{
	"EnvelopeService.GenerateDataKey", "EnvelopeService.Decrypt", "EnvelopeService.ReEncrypt",
	"KeyService.CreateKey", "KeyService.RotateKey", "KeyService.ListKeys",
}

const good = `
version: 1
roles:
  billing-app:
    max_batch: 50
    permissions:
      - operations: [EnvelopeService.GenerateDataKey, EnvelopeService.Decrypt]
        keys: ["billing-*", payroll]
  operator:
    permissions:
      - operations: ["KeyService.*"]
        keys: ["*"]
  auditor:
    permissions:
      - operations: [KeyService.ListKeys]
        keys: [none-needed]
bindings:
  - role: billing-app
    callers:
      - uid: 1001
        binary: /usr/local/bin/billing
      - sha256: ` + hash + `
        uid: 5000
  - role: operator
    callers:
      - user: root
      - gid: 4242
  - role: auditor
    callers:
      - gid: 777
`

const hash = "aa00000000000000000000000000000000000000000000000000000000000000"

func TestAllow(t *testing.T) {
	p, err := Parse([]byte(good), ops)
	if err != nil {
		t.Fatal(err)
	}
	billing := Subject{UID: 1001, GIDs: []uint32{1001}, Exe: "/usr/local/bin/billing"}
	impostor := Subject{UID: 1001, GIDs: []uint32{1001}, Exe: "/tmp/billing"}
	byHash := Subject{UID: 5000, GIDs: []uint32{5000}, Exe: "/opt/x", ExeSHA256: hash}
	root := Subject{UID: 0, GIDs: []uint32{0}}
	groupie := Subject{UID: 3000, GIDs: []uint32{3000, 4242}} // operator by supplementary group
	auditor := Subject{UID: 3001, GIDs: []uint32{777}}
	nobody := Subject{UID: 65534, GIDs: []uint32{65534}}

	for _, tc := range []struct {
		name    string
		sub     Subject
		op, key string
		allow   bool
	}{
		{"app on its key", billing, "EnvelopeService.Decrypt", "billing-eu", true},
		{"app on its exact key", billing, "EnvelopeService.GenerateDataKey", "payroll", true},
		{"app on another key", billing, "EnvelopeService.Decrypt", "hr", false},
		{"app, ungranted op", billing, "EnvelopeService.ReEncrypt", "billing-eu", false},
		{"app, operator op", billing, "KeyService.RotateKey", "billing-eu", false},
		{"same uid, other binary", impostor, "EnvelopeService.Decrypt", "billing-eu", false},
		{"by hash", byHash, "EnvelopeService.Decrypt", "billing-x", true},
		{"operator by user", root, "KeyService.RotateKey", "anything", true},
		{"operator: not envelope", root, "EnvelopeService.Decrypt", "billing-eu", false},
		{"operator by supplementary group", groupie, "KeyService.CreateKey", "k", true},
		{"keyless op, granted", auditor, "KeyService.ListKeys", "", true},
		{"keyless op, key glob irrelevant", root, "KeyService.ListKeys", "", true},
		{"keyless op, not granted", billing, "KeyService.ListKeys", "", false},
		{"stranger", nobody, "EnvelopeService.Decrypt", "billing-eu", false},
		{"a name with a slash never matches a glob", billing, "EnvelopeService.Decrypt", "billing-/x", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := p.Allow(tc.sub, tc.op, tc.key)
			if tc.allow != (err == nil) {
				t.Fatalf("Allow = %v, want allow=%v", err, tc.allow)
			}
			if err != nil {
				var d *Denied
				if !errors.Is(err, ErrDenied) || !errors.As(err, &d) || d.Op != tc.op || d.Key != tc.key {
					t.Fatalf("denial %v does not name %s on %q", err, tc.op, tc.key)
				}
				for _, secret := range []string{"billing-app", "operator", "1001", "/usr/local/bin", hash} {
					if strings.Contains(err.Error(), secret) {
						t.Fatalf("denial %q shows the policy's contents (%s)", err, secret)
					}
				}
			}
		})
	}
	if n := p.MaxBatch(billing, "EnvelopeService.Decrypt"); n != 50 {
		t.Errorf("MaxBatch = %d, want 50", n)
	}
	if n := p.MaxBatch(billing, "KeyService.RotateKey"); n != 0 {
		t.Errorf("MaxBatch of an ungranted op = %d, want 0", n)
	}
	if got := p.Roles(root); len(got) != 1 || got[0] != "operator" {
		t.Errorf("Roles(root) = %v, want [operator]", got)
	}
}

func TestParseErrors(t *testing.T) {
	if _, err := user.Lookup("root"); err != nil {
		t.Fatal("this system has no root user to test with")
	}
	role := "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [KeyService.ListKeys]\n        keys: [\"*\"]\n"
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown top field", "version: 1\nrolez: {}\n", "line 2: field rolez not found"},
		{"unknown role field", "version: 1\nroles:\n  r:\n    permisions: []\n", "line 4: field permisions not found"},
		{"unknown selector field", role + "bindings:\n  - role: r\n    callers:\n      - uuid: 1\n", "line 10: field uuid not found"},
		{"version", "version: 2\n", "version 2 is not supported"},
		{"no version", "roles: {}\n", "version 0 is not supported"},
		{"unknown op", "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [KeyService.Frob]\n        keys: [x]\n", "line 5: unknown operation \"KeyService.Frob\""},
		{"unknown service wildcard", "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [Nope.*]\n        keys: [x]\n", "unknown operation \"Nope.*\""},
		{"bad glob", "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"[\"]\n", "line 6: key pattern \"[\" is not a valid glob"},
		{"no keys", "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [\"*\"]\n", "needs operations and keys"},
		{"undefined role", role + "bindings:\n  - role: ghost\n    callers:\n      - uid: 1\n", "line 8: role \"ghost\" is not defined"},
		{"no callers", role + "bindings:\n  - role: r\n", "has no callers"},
		{"empty selector", role + "bindings:\n  - role: r\n    callers:\n      - {}\n", "at least one of uid"},
		{"unknown user", role + "bindings:\n  - role: r\n    callers:\n      - user: no-such-user-kw\n", "line 10: user \"no-such-user-kw\" is not known"},
		{"unknown group", role + "bindings:\n  - role: r\n    callers:\n      - group: no-such-group-kw\n", "group \"no-such-group-kw\" is not known"},
		{"uid and user", role + "bindings:\n  - role: r\n    callers:\n      - uid: 0\n        user: root\n", "not both"},
		{"relative binary", role + "bindings:\n  - role: r\n    callers:\n      - binary: bin/app\n        uid: 1\n", "clean absolute path"},
		{"bad hash", role + "bindings:\n  - role: r\n    callers:\n      - sha256: xyz\n        uid: 1\n", "not 64 hex digits"},
		{"binary alone", role + "bindings:\n  - role: r\n    callers:\n      - binary: /usr/bin/app\n", "add the uid/user or gid/group"},
		{"sha256 alone", role + "bindings:\n  - role: r\n    callers:\n      - sha256: " + hash + "\n", "add the uid/user or gid/group"},
		{"negative uid", role + "bindings:\n  - role: r\n    callers:\n      - uid: -1\n", "cannot unmarshal"},
		{"negative batch", "version: 1\nroles:\n  r:\n    max_batch: -1\n", "negative"},
		{"two documents", role + "---\nversion: 1\n", "a second YAML document"},
		{"list where a value goes", role + "bindings:\n  - role: [r]\n", "expected a single value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), ops)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// FuzzParse: no input makes Parse panic, and a policy it accepts answers
// Allow for any subject without panicking.
func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte("version: 1\nroles:\n  r:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\nbindings:\n  - role: r\n    callers:\n      - uid: 7\n"))
	f.Add([]byte("version: 1\n"))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data, ops)
		if err != nil {
			return
		}
		sub := Subject{UID: 7, GIDs: []uint32{7}}
		_ = p.Allow(sub, "KeyService.ListKeys", "")
		_ = p.Allow(sub, "EnvelopeService.Decrypt", "billing-1")
		_ = p.MaxBatch(sub, "EnvelopeService.Decrypt")
	})
}

func TestTokenGrants(t *testing.T) {
	const y = `
version: 1
roles:
  web:
    permissions:
      - operations: [KeyService.ListKeys]
        keys: ["*"]
    tokens:
      audiences: [orders, "billing-*"]
      scopes: ["orders:read", "orders:list:*"]
      claims: [tenant]
      max_ttl: 15m
  impersonator:
    permissions:
      - operations: [KeyService.ListKeys]
        keys: ["*"]
    tokens:
      audiences: [admin]
      max_ttl: 1h
      subject: any
bindings:
  - role: web
    callers:
      - uid: 1000
  - role: impersonator
    callers:
      - uid: 2000
      - uid: 1000
        gid: 77
`
	p, err := Parse([]byte(y), ops)
	if err != nil {
		t.Fatal(err)
	}
	web := p.Tokens(Subject{UID: 1000, GIDs: []uint32{1000}})
	both := p.Tokens(Subject{UID: 1000, GIDs: []uint32{1000, 77}})
	none := p.Tokens(Subject{UID: 3000, GIDs: []uint32{3000}})
	for _, tc := range []struct {
		name    string
		g       TokenGrant
		aud     []string
		scopes  []string
		claims  []string
		ttl     time.Duration
		subject bool
		deny    string
	}{
		{"within", web, []string{"orders", "billing-eu"}, []string{"orders:read", "orders:list:all"}, []string{"tenant"}, 10 * time.Minute, false, ""},
		{"other audience", web, []string{"admin"}, nil, nil, time.Minute, false, `audience "admin"`},
		{"other scope", web, []string{"orders"}, []string{"orders:write"}, nil, time.Minute, false, `scope "orders:write"`},
		{"other claim", web, []string{"orders"}, nil, []string{"role"}, time.Minute, false, `claim "role"`},
		{"too long", web, []string{"orders"}, nil, nil, 16 * time.Minute, false, "at most 15m0s"},
		{"names a subject", web, []string{"orders"}, nil, nil, time.Minute, true, "subject of its choosing"},
		{"two roles together", both, []string{"orders", "admin"}, nil, nil, 59 * time.Minute, true, ""},
		{"no grant at all", none, []string{"orders"}, nil, nil, time.Minute, false, `audience "orders"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.g.Check(tc.aud, tc.scopes, tc.claims, tc.ttl, tc.subject)
			if tc.deny == "" && err != nil {
				t.Fatalf("denied: %v", err)
			}
			if tc.deny != "" && (!errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), tc.deny)) {
				t.Fatalf("got %v, want a denial about %s", err, tc.deny)
			}
		})
	}
	role := "version: 1\nroles:\n  r:\n    permissions:\n      - operations: [KeyService.ListKeys]\n        keys: [\"*\"]\n    tokens:\n"
	for _, tc := range []struct{ yaml, want string }{
		{role + "      audiences: [\"[\"]\n", "line 8: audience pattern"},
		{role + "      audiences: [a]\n      claims: [Sub]\n", "line 9: claim name \"Sub\""},
		{role + "      audiences: [a]\n      max_ttl: forever\n", "line 9: max_ttl \"forever\""},
		{role + "      audiences: [a]\n      subject: root\n", "line 9: subject \"root\""},
		{role + "      scopes: [a]\n", "at least one audience"},
		{role + "      audiences: [a]\n      audience: [b]\n", "field audience not found"},
	} {
		if _, err := Parse([]byte(tc.yaml), ops); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want an error containing %q", err, tc.want)
		}
	}
}
