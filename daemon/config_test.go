package daemon_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/server"
)

// docConfig is the example keywardd.yaml of docs/operations.md.
func docConfig(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "## Configuration")
	if !ok {
		t.Fatal("operations.md has no Configuration section")
	}
	_, rest, _ = strings.Cut(rest, "```yaml\n")
	yaml, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatal("no yaml block in operations.md's Configuration section")
	}
	return yaml
}

// TestDocumentedConfig: the configuration operations.md shows is read
// strictly and means what it says; only the files it names are missing
// here.
func TestDocumentedConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keywardd.yaml")
	os.WriteFile(path, []byte(docConfig(t)), 0o600)
	cfg, err := daemon.LoadConfig(path)
	if cfg == nil {
		t.Fatalf("the documented configuration does not parse: %v", err)
	}
	if err != nil {
		for _, part := range strings.Split(err.Error(), "\n") {
			if !strings.Contains(part, "plugins[0]") { // the plugin's file does not exist here
				t.Errorf("the documented configuration: %s", part)
			}
		}
	}
	r := cfg.Rotation
	if r.CheckEvery != time.Minute || r.Jitter == nil || *r.Jitter != time.Hour || r.Policies["weekly"].Every != 168*time.Hour ||
		len(r.Keys) != 2 || r.Keys[1].Policy != "weekly" || len(r.APIKeys) != 2 || r.APIKeys[0].Action != "force" {
		t.Errorf("rotation: %+v", r)
	}
	if a := cfg.Anomaly; !a.Enabled || a.Factor != 8 || a.Window != 5*time.Minute || len(a.Disable) != 1 || a.Disable[0] != "spike" {
		t.Errorf("anomaly: %+v", a)
	}
	if cfg.GeoIP.Database != "/var/lib/GeoIP/GeoLite2-Country.mmdb" || !cfg.Anomaly.NewCountries {
		t.Errorf("geoip: %+v, anomaly.new_countries %v", cfg.GeoIP, cfg.Anomaly.NewCountries)
	}
	if d := cfg.DynamicLimits; !d.Enabled || d.Tighten != 0.5 || d.Raise != 2 || d.HSMLatency != 50*time.Millisecond {
		t.Errorf("dynamic_limits: %+v", d)
	}
	if g := cfg.Gateway.HTTPSocket; g.Path != "/run/keyward-gateway/http.sock" || g.Group != "www-data" {
		t.Errorf("gateway: %+v", g)
	}
	if c := cfg.Connections; c.HandshakeTimeout != 5*time.Second || c.IdleTimeout != time.Minute || c.WriteTimeout != 10*time.Second {
		t.Errorf("connections: %+v", c)
	}
}

// TestConfigRefusals: a mistake in the new sections is an error that
// names it.
func TestConfigRefusals(t *testing.T) {
	base := "socket: {path: /run/k/k.sock}\ndata_dir: /var/lib/k\npolicy_file: /etc/k/policy.yaml\n"
	for extra, want := range map[string]string{
		"rotation: {keys: [{match: \"x-*\", policy: weekly}]}":                `no policy "weekly"`,
		"rotation: {api_keys: [{policy: high, action: rotate}]}":              `action "rotate"`,
		"rotation: {policies: {high: {every: 1h}}}":                           "built in",
		"anomaly: {enabled: true, factor: 1}":                                 "anomaly.factor",
		"anomaly: {disable: [everything]}":                                    "anomaly.disable",
		"anomaly: {new_countries: true}":                                      "anomaly.new_countries needs a GeoIP database",
		"geoip: {database: GeoLite2-Country.mmdb}":                            "geoip.database",
		"dynamic_limits: {tighten: 2}":                                        "dynamic_limits.tighten",
		"dynamic_limits: {cpu: 3}":                                            "dynamic_limits.cpu",
		"rotation: {keys: [{match: \"x-*\", policy: high, extra: 1}]}":        "extra",
		"connections: {idle_timeout: -1s}":                                    "connections: timeouts must not be negative",
		"connections: {idle: 1m}":                                             "field idle not found",
		"store: {etcd: {prefix: /k}}":                                         "store.etcd.endpoints: name the etcd cluster",
		"store: {etcd: {endpoints: [http://etcd-1:2379]}}":                    "plain HTTP to another host",
		"store: {etcd: {endpoints: [etcd-1:2379]}}":                           "is not a URL",
		"store: {etcd: {endpoints: [https://a:2379, http://127.0.0.1:2379]}}": "all https:// or all http://",
		"store: {etcd: {endpoints: [https://a:2379], prefix: keyward/}}":      "store.etcd.prefix",
		"store: {etcd: {endpoints: [https://a:2379], leader_ttl: 1s}}":        "store.etcd.leader_ttl",
		"store: {etcd: {endpoints: [https://a:2379], tls: {cert: /c.pem}}}":   "cert and key go together",
		"gateway: {http_socket: {path: gw.sock}}":                             "gateway.http_socket.path must be an absolute path",
		"gateway: {http_socket: {path: /run/k/k.sock}}":                       "gateway.http_socket.path must be an absolute path other than socket.path",
		"gateway: {http_socket: {group: www-data}}":                           "its mode and group go with it",
		"gateway: {http_socket: {path: /run/g/g.sock, mode: \"0666\"}}":       `gateway.http_socket.mode "0666"`,
	} {
		path := filepath.Join(t.TempDir(), "keywardd.yaml")
		os.WriteFile(path, []byte(base+extra+"\n"), 0o600)
		if _, err := daemon.LoadConfig(path); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error naming %q", extra, err, want)
		}
	}
}

// TestPluginNamesOneForm: two plugins whose names have one canonical form
// ("pg" and "pg-") are refused, with that form; names of their own forms
// are not.
func TestPluginNamesOneForm(t *testing.T) {
	base := "socket: {path: /run/k/k.sock}\ndata_dir: /var/lib/k\npolicy_file: /etc/k/policy.yaml\nplugins:\n"
	plugin := func(name string) string {
		return "  - {name: " + name + ", path: /usr/lib/keyward/plugins/p, sha256: " + strings.Repeat("ab", 32) + "}\n"
	}
	for _, tc := range []struct {
		names []string
		want  string // "" when accepted
	}{
		{[]string{"pg", "pgx", "pg-2"}, ""},
		{[]string{"pg", "pg-"}, `plugins[1]: plugin names "pg" and "pg-" have one canonical form, "pg"`},
		{[]string{"pg-", "pg"}, `plugins[1]: plugin names "pg-" and "pg" have one canonical form, "pg"`},
		{[]string{"pg-", "web", "pg--"}, `plugins[2]: plugin names "pg-" and "pg--" have one canonical form, "pg"`},
		{[]string{"pg", "pg"}, `plugins[1]: a second plugin named "pg"`},
	} {
		t.Run(strings.Join(tc.names, ","), func(t *testing.T) {
			y := base
			for _, n := range tc.names {
				y += plugin(n)
			}
			path := filepath.Join(t.TempDir(), "keywardd.yaml")
			os.WriteFile(path, []byte(y), 0o600)
			_, err := daemon.LoadConfig(path)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("LoadConfig: %v; want an error saying %s", err, tc.want)
			case tc.want != "" && strings.Count(err.Error(), "plugins[") != 1:
				t.Fatalf("LoadConfig: %v; want one error, about the second name", err)
			}
		})
	}
}

// TestInstallFiles: the keywardd.yaml and policy.yaml that
// docs/operations.md installs are read strictly, and say what their
// comments say.
func TestInstallFiles(t *testing.T) {
	cfg, err := daemon.LoadConfig("../docs/install/keywardd.yaml")
	if err != nil {
		t.Fatalf("docs/install/keywardd.yaml: %v", err)
	}
	if cfg.Socket.Mode != "0660" || cfg.HSM.PINCredential != "keyward-pin" || cfg.PolicyFile != "/etc/keyward/policy.yaml" ||
		cfg.Metrics.Address != "127.0.0.1:9464" || !cfg.Anomaly.Enabled || len(cfg.Rotation.Keys) != 1 {
		t.Errorf("docs/install/keywardd.yaml: %+v", cfg)
	}
	b, err := os.ReadFile("../docs/install/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// Its user and group are not on this machine: root stands in for them.
	b = []byte(strings.NewReplacer("user: orders", "user: root", "group: keyward-admins", "group: root").Replace(string(b)))
	p, err := policy.Parse(b, server.Ops())
	if err != nil {
		t.Fatalf("docs/install/policy.yaml: %v", err)
	}
	app := policy.Subject{UID: 0, GIDs: []uint32{4242}, Exe: "/usr/local/bin/orders"}
	admin := policy.Subject{UID: 4242, GIDs: []uint32{0}}
	for _, c := range []struct {
		sub     policy.Subject
		op, key string
		ok      bool
	}{
		{app, "EnvelopeService.GenerateDataKey", "orders-eu", true},
		{app, "EnvelopeService.GenerateDataKey", "billing", false},
		{app, "KeyService.CreateKey", "orders-eu", false},
		{policy.Subject{UID: 0, GIDs: []uint32{4242}, Exe: "/usr/bin/other"}, "EnvelopeService.Decrypt", "orders-eu", false},
		{admin, "KeyService.CreateKey", "orders-eu", true},
		{admin, "EnvelopeService.Decrypt", "orders-eu", false},
	} {
		if err := p.Allow(c.sub, c.op, c.key); (err == nil) != c.ok {
			t.Errorf("%+v %s on %s: %v, want allowed %v", c.sub, c.op, c.key, err, c.ok)
		}
	}
}

// TestFleetDocConfig: the store.etcd example of docs/fleet.md is read
// strictly and means what it says.
func TestFleetDocConfig(t *testing.T) {
	b, err := os.ReadFile("../docs/fleet.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "## Running a fleet")
	if !ok {
		t.Fatal("fleet.md has no Running a fleet section")
	}
	_, rest, _ = strings.Cut(rest, "```yaml\n")
	yaml, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatal("no yaml block in fleet.md's Running a fleet section")
	}
	path := filepath.Join(t.TempDir(), "keywardd.yaml")
	os.WriteFile(path, []byte("socket: {path: /run/k/k.sock}\ndata_dir: /var/lib/k\npolicy_file: /etc/k/policy.yaml\n"+yaml), 0o600)
	cfg, err := daemon.LoadConfig(path)
	if err != nil {
		t.Fatalf("fleet.md's configuration: %v", err)
	}
	e := cfg.Store.Etcd
	if e == nil || len(e.Endpoints) != 3 || e.Prefix != "/keyward" || e.Staleness != 30*time.Second || e.LeaderTTL != 10*time.Second || e.TLS.CA == "" || cfg.Node != "web-1" {
		t.Errorf("store.etcd: %+v, node %q", e, cfg.Node)
	}
}
