package policy

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
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
		{"binary alone", role + "bindings:\n  - role: r\n    callers:\n      - binary: /usr/bin/app\n", "add the uid/user or gid/group the program runs as, or its cgroup"},
		{"sha256 alone", role + "bindings:\n  - role: r\n    callers:\n      - sha256: " + hash + "\n", "add the uid/user or gid/group"},
		{"bad cgroup glob", role + "bindings:\n  - role: r\n    callers:\n      - cgroup: /system.slice/[\n", "line 10: cgroup \"/system.slice/[\" must be a clean absolute path"},
		{"relative cgroup", role + "bindings:\n  - role: r\n    callers:\n      - cgroup: system.slice/a.service\n", "must be a clean absolute path"},
		{"unclean cgroup", role + "bindings:\n  - role: r\n    callers:\n      - cgroup: /system.slice/../a\n", "must be a clean absolute path"},
		{"cgroup with ..", role + "bindings:\n  - role: r\n    callers:\n      - cgroup: /../a\n", "must be a clean absolute path"},
		{"unit without a kind", role + "bindings:\n  - role: r\n    callers:\n      - systemd_unit: orders\n", "systemd_unit \"orders\" must be a unit's name (a glob) ending in .service"},
		{"unit with a slash", role + "bindings:\n  - role: r\n    callers:\n      - systemd_unit: system.slice/orders.service\n", "must be a unit's name"},
		{"bad pod UID", role + "bindings:\n  - role: r\n    callers:\n      - k8s_pod_uid: my-pod\n", "k8s_pod_uid \"my-pod\" is not a pod's UID (metadata.uid"},
		{"pod UID with underscores", role + "bindings:\n  - role: r\n    callers:\n      - k8s_pod_uid: 1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901\n", "is not a pod's UID"},
		{"short container ID", role + "bindings:\n  - role: r\n    callers:\n      - container_id: 3f1a6c2e\n", "container_id \"3f1a6c2e\" is not a container's ID: 12 to 64 hex digits"},
		{"container name", role + "bindings:\n  - role: r\n    callers:\n      - container_id: orders-api\n", "is not a container's ID"},
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
	f.Add([]byte("version: 1\nroles:\n  r:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\nbindings:\n  - role: r\n    callers:\n      - cgroup: /system.slice/*\n        systemd_unit: \"*.service\"\n      - k8s_pod_uid: 1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901\n        container_id: 3f1a6c2e9b8d\n"))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data, ops)
		if err != nil {
			return
		}
		sub := Subject{UID: 7, GIDs: []uint32{7}}
		_ = p.Allow(sub, "KeyService.ListKeys", "")
		inPod := Subject{UID: 7, GIDs: []uint32{7}, Cgroup: "/system.slice/orders.service/x", SystemdUnit: "orders.service", PodUID: "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", ContainerID: "3f1a6c2e9b8d7f4a5e6c1b2d3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3"}
		_ = p.Allow(inPod, "EnvelopeService.Decrypt", "billing-1")
		_ = p.Allow(sub, "EnvelopeService.Decrypt", "billing-1")
		_ = p.MaxBatch(sub, "EnvelopeService.Decrypt")
		_, _ = p.Limits(sub)
		_, _ = p.MaxConnections(7)
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

func TestLimits(t *testing.T) {
	const y = `
version: 1
limits:
  default: {calls: 16}
  unbound: {connections: 1, rate: [{limit: 5, per: 1s, burst: 5}], lifetime: 500ms}
roles:
  app:
    limits:
      connections: 8
      rate: [{limit: 100, per: 1s, burst: 200}, {limit: 1000, per: 1m, burst: 1000}]
  batch:
    limits:
      calls: 4
      rate: [{limit: 50, per: 1s, burst: 500}]
  free:
    limits: {rate: []}
bindings:
  - role: app
    callers:
      - uid: 1000
  - role: batch
    callers:
      - uid: 1000
        gid: 50
      - uid: 2000
  - role: free
    callers:
      - gid: 60
`
	p, err := Parse([]byte(y), ops)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		sub   Subject
		want  Limits
		bound bool
	}{
		{"one role, the default under it", Subject{UID: 1000, GIDs: []uint32{1000}},
			Limits{Connections: 8, Calls: 16, Rate: []ratelimit.Layer{perSecond(100, 200), {Limit: 1000, Per: time.Minute, Burst: 1000}}}, true},
		{"the built-in default under the policy's", Subject{UID: 2000, GIDs: []uint32{2000}},
			Limits{Connections: DefaultLimits.Connections, Calls: 4, Rate: []ratelimit.Layer{perSecond(50, 500)}}, true},
		{"two roles: the most of each, periods both limit", Subject{UID: 1000, GIDs: []uint32{1000, 50}},
			Limits{Connections: 32, Calls: 16, Rate: []ratelimit.Layer{perSecond(100, 500)}}, true},
		{"a role with no rate limit lifts it", Subject{UID: 1000, GIDs: []uint32{1000, 60}},
			Limits{Connections: 32, Calls: 16}, true},
		{"unbound", Subject{UID: 3000, GIDs: []uint32{3000}},
			Limits{Connections: 1, Calls: UnboundLimits.Calls, Rate: []ratelimit.Layer{perSecond(5, 5)}, Lifetime: 500 * time.Millisecond}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, bound := p.Limits(tc.sub); bound != tc.bound || !sameLimits(got, tc.want) {
				t.Fatalf("Limits = %+v, %v; want %+v, %v", got, bound, tc.want, tc.bound)
			}
		})
	}
	// What the uid alone allows: the unbound budget, or the most of any
	// binding the uid could match (the gid-only one matches any uid).
	for uid, want := range map[uint32]int{1000: 32, 2000: 32, 4000: 32} {
		if got, bindable := p.MaxConnections(uid); got != want || !bindable {
			t.Errorf("MaxConnections(%d) = %d, %v; want %d, true", uid, got, bindable, want)
		}
	}
	byUID, err := Parse([]byte("version: 1\nroles:\n  r:\n    limits: {connections: 5}\nbindings:\n  - role: r\n    callers:\n      - uid: 7\n"), ops)
	if err != nil {
		t.Fatal(err)
	}
	a, aBindable := byUID.MaxConnections(7)
	b, bBindable := byUID.MaxConnections(8)
	if a != 5 || !aBindable || b != UnboundLimits.Connections || bBindable {
		t.Errorf("MaxConnections = %d, %v for the bound uid, %d, %v for another; want 5, true and %d, false", a, aBindable, b, bBindable, UnboundLimits.Connections)
	}
	none, err := Parse([]byte("version: 1\n"), ops)
	if err != nil {
		t.Fatal(err)
	}
	if l, bound := none.Limits(Subject{UID: 1}); bound || l.Connections != UnboundLimits.Connections || l.Lifetime != UnboundLimits.Lifetime {
		t.Errorf("a policy without limits: %+v, %v; want the built-in unbound budget", l, bound)
	}

	role := "version: 1\nroles:\n  r:\n    limits:\n"
	for _, tc := range []struct{ yaml, want string }{
		{role + "      connections: 0\n", `role "r": limits.connections is 0`},
		{role + "      calls: -1\n", `role "r": limits.calls is -1`},
		{role + "      rate: [{limit: 0, per: 1s, burst: 1}]\n", `role "r": limits.rate: ratelimit: invalid limit`},
		{role + "      rate: [{limit: 1, per: 1s, burst: 1}, {limit: 2, per: 1s, burst: 2}]\n", "two layers per 1s"},
		{role + "      lifetime: 1s\n", "limits.lifetime is for limits.unbound only"},
		{role + "      conections: 3\n", "field conections not found"},
		{"version: 1\nlimits:\n  unbound: {lifetime: -1s}\n", "limits.unbound: limits.lifetime -1s is negative"},
		{"version: 1\nlimits:\n  default: {lifetime: 1s}\n", "limits.default: limits.lifetime is for limits.unbound only"},
		{"version: 1\nlimits:\n  unbound: {rate: [{limit: 1, per: forever, burst: 1}]}\n", "forever"},
		{"version: 1\nlimits:\n  everyone: {calls: 1}\n", "field everyone not found"},
	} {
		if _, err := Parse([]byte(tc.yaml), ops); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error containing %q", tc.yaml, err, tc.want)
		}
	}
}

// TestDocumentedBudgets: the Budgets example of docs/policy.md is read
// strictly and means what it says.
func TestDocumentedBudgets(t *testing.T) {
	doc := documentedYAML(t, "Budgets")
	doc += "bindings:\n  - role: billing-app\n    callers:\n      - uid: 1000\n  - role: health-monitor\n    callers:\n      - uid: 1001\n"
	p, err := Parse([]byte(doc), ops)
	if err != nil {
		t.Fatalf("the documented budgets: %v", err)
	}
	for _, tc := range []struct {
		uid   uint32
		want  Limits
		bound bool
	}{
		{1000, Limits{Connections: 64, Calls: 256, Rate: []ratelimit.Layer{perSecond(2000, 4000), {Limit: 50_000_000, Per: 24 * time.Hour, Burst: 50_000_000}}}, true},
		{1001, Limits{Connections: 32, Calls: 64, Rate: []ratelimit.Layer{perSecond(500, 1000)}}, true},
		{1002, Limits{Connections: 2, Calls: 2, Rate: []ratelimit.Layer{perSecond(10, 20)}, Lifetime: 2 * time.Second}, false},
	} {
		if got, bound := p.Limits(Subject{UID: tc.uid, GIDs: []uint32{tc.uid}}); bound != tc.bound || !sameLimits(got, tc.want) {
			t.Errorf("uid %d: %+v, %v; want %+v, %v", tc.uid, got, bound, tc.want, tc.bound)
		}
	}
	// The built-in defaults the comments give are the code's.
	if !strings.Contains(doc, fmt.Sprintf("(built in: %d)", DefaultLimits.Connections)) || !strings.Contains(doc, fmt.Sprintf("(built in: %d)", DefaultLimits.Calls)) ||
		!strings.Contains(doc, fmt.Sprintf("(%v)", UnboundLimits.Lifetime)) {
		t.Error("the built-in defaults in policy.md's comments are not the code's")
	}
}

// documentedYAML is the first yaml block of docs/policy.md's section.
func documentedYAML(t *testing.T, section string) string {
	t.Helper()
	b, err := os.ReadFile("../../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(b), "## "+section)
	_, rest, _ = strings.Cut(rest, "```yaml\n")
	doc, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatalf("no yaml block in policy.md's %s section", section)
	}
	return doc
}

func sameLimits(a, b Limits) bool {
	return a.Connections == b.Connections && a.Calls == b.Calls && a.Lifetime == b.Lifetime && slices.Equal(a.Rate, b.Rate)
}

// perSecond is a rate-limit layer of limit calls a second.
func perSecond(limit, burst int) ratelimit.Layer {
	return ratelimit.Layer{Limit: limit, Per: time.Second, Burst: burst}
}

// TestCgroupSelectors: a caller is selected by its cgroup (the path, or
// one above it), its systemd unit, its pod and its container; every field
// of an entry must match; an entry naming a cgroup never matches a caller
// whose cgroup is unknown or outside keywardd's cgroup namespace.
func TestCgroupSelectors(t *testing.T) {
	const pod = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
	const cid = "3f1a6c2e9b8d7f4a5e6c1b2d3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3"
	y := `
version: 1
roles:
  orders:
    permissions: [{operations: [EnvelopeService.Decrypt], keys: [orders]}]
  units:
    permissions: [{operations: [EnvelopeService.Decrypt], keys: [units]}]
  pod:
    permissions: [{operations: [EnvelopeService.Decrypt], keys: [pod]}]
  container:
    permissions: [{operations: [EnvelopeService.Decrypt], keys: [container]}]
  narrowed:
    permissions: [{operations: [EnvelopeService.Decrypt], keys: [narrowed]}]
bindings:
  - role: orders
    callers:
      - cgroup: /system.slice/orders.service
      - cgroup: /..x/*
  - role: units
    callers:
      - systemd_unit: "run-*.scope"
        uid: 1000
  - role: pod
    callers:
      - k8s_pod_uid: ` + strings.ToUpper(pod) + `
  - role: container
    callers:
      - container_id: 3F1A6C2E9B8D
  - role: narrowed
    callers:
      - cgroup: "/kubepods.slice/*"
        binary: /usr/bin/app
`
	p, err := Parse([]byte(y), ops)
	if err != nil {
		t.Fatal(err)
	}
	podPath := "/kubepods.slice/kubepods-pod" + strings.ReplaceAll(pod, "-", "_") + ".slice/cri-containerd-" + cid + ".scope"
	for _, tc := range []struct {
		name string
		sub  Subject
		want []string
	}{
		{"the service", Subject{UID: 5, Cgroup: "/system.slice/orders.service", SystemdUnit: "orders.service"}, []string{"orders"}},
		{"below the service", Subject{UID: 5, Cgroup: "/system.slice/orders.service/worker", SystemdUnit: "orders.service"}, []string{"orders"}},
		{"a sibling with the same prefix", Subject{UID: 5, Cgroup: "/system.slice/orders.service2", SystemdUnit: "orders.service2"}, nil},
		{"the user's own orders.service", Subject{UID: 1000, Cgroup: "/user.slice/user-1000.slice/user@1000.service/app.slice/orders.service", SystemdUnit: "user@1000.service"}, nil},
		{"unknown cgroup", Subject{UID: 1000}, nil},
		{"outside the namespace", Subject{UID: 5, Cgroup: "/../system.slice/orders.service"}, nil},
		{"a name starting with ..", Subject{UID: 5, Cgroup: "/..x/y/z"}, []string{"orders"}},
		{"a run scope of uid 1000", Subject{UID: 1000, Cgroup: "/system.slice/run-r1.scope", SystemdUnit: "run-r1.scope"}, []string{"units"}},
		{"a run scope of another uid", Subject{UID: 1001, Cgroup: "/system.slice/run-r1.scope", SystemdUnit: "run-r1.scope"}, nil},
		{"the pod's container, binary elsewhere", Subject{UID: 0, Cgroup: podPath, SystemdUnit: "cri-containerd-" + cid + ".scope", PodUID: pod, ContainerID: cid, Exe: "/bin/sh"}, []string{"pod", "container"}},
		{"the pod's container, the binary", Subject{UID: 0, Cgroup: podPath, SystemdUnit: "cri-containerd-" + cid + ".scope", PodUID: pod, ContainerID: cid, Exe: "/usr/bin/app"}, []string{"pod", "container", "narrowed"}},
		{"another pod", Subject{UID: 0, Cgroup: "/kubepods.slice/x", PodUID: "00000000-5f60-7182-93a4-b5c6d7e8f901", ContainerID: "3f1a6c2e9b8e" + cid[12:], Exe: "/usr/bin/app"}, []string{"narrowed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := p.Roles(tc.sub); !slices.Equal(got, tc.want) {
				t.Fatalf("Roles = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestDocumentedCgroups: the example of docs/policy.md's "Callers by
// cgroup" is read strictly and selects whom it says.
func TestDocumentedCgroups(t *testing.T) {
	doc := documentedYAML(t, "Callers by cgroup")
	var roles strings.Builder
	for _, r := range []string{"orders", "payments-pod", "batch-container"} {
		fmt.Fprintf(&roles, "  %s:\n    permissions: [{operations: [EnvelopeService.Decrypt], keys: [%s]}]\n", r, r)
	}
	p, err := Parse([]byte("version: 1\nroles:\n"+roles.String()+doc), ops)
	if err != nil {
		t.Fatalf("the documented example: %v", err)
	}
	const pod, cid = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", "3f1a6c2e9b8d7f4a5e6c1b2d3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3"
	for _, tc := range []struct {
		sub  Subject
		want []string
	}{
		{Subject{UID: 998, Cgroup: "/system.slice/orders.service", SystemdUnit: "orders.service"}, []string{"orders"}},
		{Subject{UID: 997, Cgroup: "/system.slice/billing.service/worker", SystemdUnit: "billing.service"}, []string{"orders"}},
		{Subject{UID: 1001, Cgroup: "/system.slice/run-r1.scope", SystemdUnit: "run-r1.scope"}, []string{"orders"}},
		{Subject{UID: 1002, Cgroup: "/system.slice/run-r1.scope", SystemdUnit: "run-r1.scope"}, nil},
		{Subject{Exe: "/app/payments", Cgroup: "/kubepods.slice/kubepods-pod" + strings.ReplaceAll(pod, "-", "_") + ".slice/cri-containerd-" + cid + ".scope", PodUID: pod, ContainerID: cid}, []string{"payments-pod", "batch-container"}},
		{Subject{Exe: "/bin/sh", Cgroup: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/crio-" + cid + ".scope", PodUID: pod, ContainerID: cid}, []string{"payments-pod", "batch-container"}},
		{Subject{Exe: "/bin/sh", Cgroup: "/kubepods.slice/kubepods-besteffort.slice/x", PodUID: pod}, nil},
	} {
		if got := p.Roles(tc.sub); !slices.Equal(got, tc.want) {
			t.Errorf("%+v: roles %v, want %v", tc.sub, got, tc.want)
		}
	}
}
