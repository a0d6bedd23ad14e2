// Package daemon is keywardd: it reads the configuration, opens the socket,
// the store, the HSM, the audit log and the policy, serves keyward.v1 until
// it is told to stop, and shuts down cleanly (SIGTERM drains the calls in
// flight and removes the socket; SIGHUP reloads the policy and the GeoIP
// database).
package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit/ship"
	"github.com/keyward/keyward/daemon/dynlimits"
	"github.com/keyward/keyward/daemon/events"
	"github.com/keyward/keyward/daemon/geo"
	"github.com/keyward/keyward/daemon/leaks"
	"github.com/keyward/keyward/daemon/names"
	"github.com/keyward/keyward/daemon/procenv"
	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/daemon/socket"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/plugins/host"
)

// Config is keywardd's configuration file (docs/operations.md). The HSM PIN
// is never in it: only the systemd credential, file or environment variable
// that holds it.
type Config struct {
	Socket struct {
		Path  string `yaml:"path"`
		Mode  string `yaml:"mode"`  // "0600" or "0660" (default)
		Group string `yaml:"group"` // the group that may connect, with mode 0660: a name, or a gid (digits)
	} `yaml:"socket"`
	DataDir string `yaml:"data_dir"`
	HSM     struct {
		Module        string `yaml:"module"`
		Token         string `yaml:"token"`
		URI           string `yaml:"uri"`
		PINCredential string `yaml:"pin_credential"` // a systemd credential (LoadCredential=NAME:PATH): the documented way
		PINFile       string `yaml:"pin_file"`
		PINEnv        string `yaml:"pin_env"` // cleared from /proc/PID/environ once read
		Sessions      int    `yaml:"sessions"`
	} `yaml:"hsm"`
	// Connections: how long a connection may keep keywardd waiting (each
	// caller's budget of connections and calls is in the policy).
	Connections struct {
		HandshakeTimeout time.Duration `yaml:"handshake_timeout"` // connect to HTTP/2 preface; default 5s
		IdleTimeout      time.Duration `yaml:"idle_timeout"`      // no call in flight; default 1m
		WriteTimeout     time.Duration `yaml:"write_timeout"`     // a client not reading; default 10s
	} `yaml:"connections"`
	PolicyFile string `yaml:"policy_file"`
	AuditFile  string `yaml:"audit_file"` // default DATA_DIR/audit.log
	MaxBatch   int    `yaml:"max_batch"`  // default 100
	Tokens     struct {
		Issuer     string        `yaml:"issuer"`      // iss of every token; default "keyward"
		DefaultTTL time.Duration `yaml:"default_ttl"` // default 5m
		MaxTTL     time.Duration `yaml:"max_ttl"`     // the ceiling; default 1h
		Leeway     time.Duration `yaml:"leeway"`      // default 30s, at most 60s
		PrePublish time.Duration `yaml:"pre_publish"` // a new signing version's time in the JWKS before it signs; default 10m
		NoCache    bool          `yaml:"no_cache"`    // mint a new token every time, even for identical requests
		// HTTP serves /.well-known/jwks.json and openid-configuration to
		// verifiers elsewhere; off unless address is set. An address that is
		// not loopback needs a TLS certificate (TLS 1.3 only).
		HTTP struct {
			Address string `yaml:"address"` // e.g. 127.0.0.1:8642
			TLSCert string `yaml:"tls_cert"`
			TLSKey  string `yaml:"tls_key"`
			BaseURL string `yaml:"base_url"` // how verifiers reach it; default from the address
		} `yaml:"http"`
	} `yaml:"tokens"`
	// Metrics serves Prometheus metrics at http://ADDRESS/metrics, on a
	// loopback address, on a Unix socket, or both; off unless set (there is
	// no authentication: loopback, or the socket's mode and group).
	Metrics struct {
		Address string `yaml:"address"` // e.g. 127.0.0.1:9464
		Socket  string `yaml:"socket"`  // e.g. /run/keyward-metrics/metrics.sock; 0600, or 0660 with group
		Group   string `yaml:"group"`   // with socket: the group that may scrape
	} `yaml:"metrics"`
	// Gateway: keywardd's endpoints for API gateways (docs/gateways.md).
	// HTTPSocket serves nginx's auth_request (server.AuthRequest) on a
	// Unix socket, off unless its path is set: mode 0600, or 0660 for its
	// group (nginx's workers'); as on socket.path, every caller there is
	// identified by the kernel and must be granted VerifyAPIKey by the
	// policy.
	Gateway struct {
		HTTPSocket struct {
			Path  string `yaml:"path"`  // e.g. /run/keyward-gateway/http.sock
			Mode  string `yaml:"mode"`  // "0600" or "0660"; default 0600, 0660 with group
			Group string `yaml:"group"` // the group that may connect (nginx's workers')
		} `yaml:"http_socket"`
	} `yaml:"gateway"`
	// AuditSinks ship the audit log, after it is written, to syslog, a
	// file or an HTTP receiver (package ship, docs/audit-shipping.md).
	AuditSinks []ship.SinkConfig `yaml:"audit_sinks"`
	// Plugins are started at start and supervised (docs/plugins.md).
	Plugins []PluginConfig `yaml:"plugins"`
	// Rotation: policies and which keys they apply to (package schedule).
	Rotation schedule.Rules `yaml:"rotation"`
	// Anomaly: watching API keys' use (package anomaly).
	Anomaly anomaly.Config `yaml:"anomaly"`
	// GeoIP: a MaxMind DB file that places API keys' source addresses
	// in countries (package geo): usage by country, keys limited to
	// countries, new-country anomalies. Off unless database is set.
	GeoIP geo.Config `yaml:"geoip"`
	// DynamicLimits: API keys' rate limits under load (package dynlimits).
	DynamicLimits dynlimits.Config `yaml:"dynamic_limits"`
	// Events: the watch stream (package events, docs/events.md).
	Events events.Config `yaml:"events"`
	// Store is where the state is kept: a bbolt file in data_dir (one
	// host, the default), or etcd, shared by a fleet of nodes
	// (docs/fleet.md).
	Store struct {
		Etcd *EtcdConfig `yaml:"etcd"`
	} `yaml:"store"`
	// Node is this node's name in a fleet, in every audit record; default
	// the host's name.
	Node    string `yaml:"node"`
	APIKeys struct {
		Prefix     string        `yaml:"prefix"`      // starts every key; default "kw"
		NearLimit  float64       `yaml:"near_limit"`  // fraction of a burst that sets near_limit; default 0.8
		FlushEvery time.Duration `yaml:"flush_every"` // how often usage and quotas are written; default 10s
		// DefaultLimits replace, role by role, the limits a key created
		// without any gets; an empty list means none.
		DefaultLimits map[string][]ratelimit.Layer `yaml:"default_limits"`
	} `yaml:"api_keys"`
	// Leaks: what a confirmed leak of an API key does, and the secret
	// scanners' intake over HTTP(S) (package leaks, docs/leaks.md).
	Leaks leaks.Config `yaml:"leaks"`
}

// PluginConfig is one plugin.
type PluginConfig struct {
	Name   string `yaml:"name"`   // what the plugin calls itself
	Path   string `yaml:"path"`   // its executable, absolute
	SHA256 string `yaml:"sha256"` // the executable's SHA-256 (sha256sum PATH)
	// A plugin that is a script: its interpreter's own file (not a link)
	// and SHA-256; path and sha256 are then the script's.
	Interpreter       string            `yaml:"interpreter"`
	InterpreterSHA256 string            `yaml:"interpreter_sha256"`
	InterpreterArgs   []string          `yaml:"interpreter_args"` // options before the script: -I for Python
	Env               map[string]string `yaml:"env"`              // its whole environment
	CallTimeout       time.Duration     `yaml:"call_timeout"`     // default 30s
}

// LoadConfig reads a configuration file strictly: unknown fields are errors
// with their line. Its errors match ErrConfig.
func LoadConfig(path string) (*Config, error) { return LoadConfigWith(path, nil) }

// LoadConfigWith is LoadConfig, with fill (if not nil) given the
// configuration as the file says it before it is checked: keywardd --dev
// puts its token there.
func LoadConfigWith(path string, fill func(*Config)) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, configError(fmt.Errorf("config: %w", err))
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, configError(fmt.Errorf("config %s: %w", path, err))
	}
	if fill != nil {
		fill(&c)
	}
	return &c, c.check()
}

func (c *Config) check() error {
	var errs []error
	if !filepath.IsAbs(c.Socket.Path) {
		errs = append(errs, errors.New("socket.path must be an absolute path"))
	}
	if !filepath.IsAbs(c.DataDir) {
		errs = append(errs, errors.New("data_dir must be an absolute path"))
	}
	if c.PolicyFile == "" {
		errs = append(errs, errors.New("policy_file is required: without a policy every call is denied"))
	}
	if c.Socket.Mode != "" && c.Socket.Mode != "0600" && c.Socket.Mode != "0660" {
		errs = append(errs, fmt.Errorf("socket.mode %q: use \"0600\" or \"0660\"", c.Socket.Mode))
	}
	if cn := c.Connections; cn.HandshakeTimeout < 0 || cn.IdleTimeout < 0 || cn.WriteTimeout < 0 {
		errs = append(errs, errors.New("connections: timeouts must not be negative (0 is the default)"))
	}
	if c.MaxBatch < 0 {
		errs = append(errs, errors.New("max_batch must not be negative"))
	}
	if c.Tokens.Leeway < 0 || c.Tokens.Leeway > time.Minute {
		errs = append(errs, errors.New("tokens.leeway must be from 0 to 60s"))
	}
	if c.Tokens.DefaultTTL < 0 || c.Tokens.MaxTTL < 0 || c.Tokens.PrePublish < 0 || (c.Tokens.MaxTTL > 0 && c.Tokens.DefaultTTL > c.Tokens.MaxTTL) {
		errs = append(errs, errors.New("tokens: durations must be positive, and default_ttl at most max_ttl"))
	}
	if a := c.Tokens.HTTP.Address; a != "" {
		host, _, err := net.SplitHostPort(a)
		ip := net.ParseIP(host)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("tokens.http.address %q: %v", a, err))
		case (ip == nil || !ip.IsLoopback()) && (c.Tokens.HTTP.TLSCert == "" || c.Tokens.HTTP.TLSKey == ""):
			errs = append(errs, fmt.Errorf("tokens.http.address %q is not loopback: set tls_cert and tls_key (it serves TLS 1.3 only)", a))
		}
	}
	if p := c.APIKeys.Prefix; p != "" {
		if err := apikeys.CheckPrefix(p); err != nil {
			errs = append(errs, fmt.Errorf("api_keys.prefix: %v", err))
		}
	}
	if n := c.APIKeys.NearLimit; n < 0 || n > 1 {
		errs = append(errs, errors.New("api_keys.near_limit is a fraction from 0 to 1 (0.8 warns at 80 % of a burst)"))
	}
	if c.APIKeys.FlushEvery < 0 {
		errs = append(errs, errors.New("api_keys.flush_every must not be negative"))
	}
	if _, err := c.apiKeyOptions(); err != nil {
		errs = append(errs, err)
	}
	if a := c.Metrics.Address; a != "" {
		host, _, err := net.SplitHostPort(a)
		if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
			errs = append(errs, fmt.Errorf("metrics.address %q: a loopback address and port (127.0.0.1:9464): the metrics have no authentication", a))
		}
	}
	if m := c.Metrics; m.Socket != "" && (!filepath.IsAbs(m.Socket) || m.Socket == c.Socket.Path) || m.Socket == "" && m.Group != "" {
		errs = append(errs, errors.New("metrics.socket must be an absolute path other than socket.path (and metrics.group goes with it)"))
	}
	if g := c.Gateway.HTTPSocket; g.Path != "" && (!filepath.IsAbs(g.Path) || g.Path == c.Socket.Path || g.Path == c.Metrics.Socket) ||
		g.Path == "" && (g.Group != "" || g.Mode != "") {
		errs = append(errs, errors.New("gateway.http_socket.path must be an absolute path other than socket.path and metrics.socket (and its mode and group go with it)"))
	}
	if m := c.Gateway.HTTPSocket.Mode; m != "" && m != "0600" && m != "0660" {
		errs = append(errs, fmt.Errorf("gateway.http_socket.mode %q: give \"0600\" or \"0660\" (with a group)", m))
	}
	if err := ship.Check(c.AuditSinks); err != nil {
		errs = append(errs, err)
	}
	for i, k := range c.AuditSinks {
		if k.Type == ship.TypeFile && k.Path != "" && filepath.Clean(k.Path) == filepath.Clean(c.auditPath()) {
			errs = append(errs, fmt.Errorf("audit_sinks[%d] (%s): path is the audit log itself: a file sink writes a copy elsewhere", i, k.Name))
		}
	}
	if err := c.Rotation.Check(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Anomaly.Check(); err != nil {
		errs = append(errs, err)
	}
	if p := c.GeoIP.Database; p != "" && !filepath.IsAbs(p) {
		errs = append(errs, fmt.Errorf("geoip.database %q must be an absolute path", p))
	}
	if c.Anomaly.NewCountries && c.GeoIP.Database == "" {
		errs = append(errs, errors.New("anomaly.new_countries needs a GeoIP database: set geoip.database"))
	}
	if err := c.DynamicLimits.Check(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Events.Check(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Leaks.Check(); err != nil {
		errs = append(errs, err)
	}
	// Credentials and policies name a plugin; two names of one canonical
	// form ("pg" and "pg-") would be two plugins to keywardd and one to
	// whoever reads them.
	seen := map[string]string{}
	for i, p := range c.Plugins {
		canonical := names.Canonical(p.Name)
		if other, ok := seen[canonical]; ok && other == p.Name {
			errs = append(errs, fmt.Errorf("plugins[%d]: a second plugin named %q", i, p.Name))
		} else if ok {
			errs = append(errs, fmt.Errorf("plugins[%d]: plugin names %q and %q have one canonical form, %q: give each plugin a name of its own canonical form (docs/operations.md, \"Names have one form\")", i, other, p.Name, canonical))
		} else {
			seen[canonical] = p.Name
		}
		if _, ok := p.Env[c.HSM.PINEnv]; ok && c.HSM.PINEnv != "" {
			errs = append(errs, fmt.Errorf("plugins[%d] (%s): env names %s, the HSM PIN's variable: a plugin never gets the PIN", i, p.Name, c.HSM.PINEnv))
		}
		if p.CallTimeout < 0 {
			errs = append(errs, fmt.Errorf("plugins[%d] (%s): call_timeout must not be negative", i, p.Name))
		}
		if err := host.CheckConfig(host.Config{Name: p.Name, Path: p.Path, SHA256: p.SHA256, Interpreter: p.Interpreter, InterpreterSHA256: p.InterpreterSHA256, InterpreterArgs: p.InterpreterArgs, Env: p.Env}); err != nil {
			errs = append(errs, fmt.Errorf("plugins[%d]: %v", i, err))
		}
	}
	if e := c.Store.Etcd; e != nil {
		errs = append(errs, e.check()...)
	}
	if len(errs) > 0 {
		return configError(fmt.Errorf("config: %w", errors.Join(errs...)))
	}
	return nil
}

// nodeName is the name in the audit records of a fleet's node (none on one
// host): node, or the host's name.
func (c *Config) nodeName() string {
	if c.Store.Etcd == nil {
		return ""
	}
	if c.Node != "" {
		return c.Node
	}
	h, _ := os.Hostname()
	return h
}

func (c *Config) socketOptions() (socket.Options, error) {
	mode := os.FileMode(0o660)
	if c.Socket.Mode == "0600" {
		mode = 0o600
	}
	return unixOptions(c.Socket.Path, mode, c.Socket.Group, "socket.group")
}

// metricsSocketOptions: 0600, or 0660 for metrics.group.
func (c *Config) metricsSocketOptions() (socket.Options, error) {
	mode := os.FileMode(0o600)
	if c.Metrics.Group != "" {
		mode = 0o660
	}
	return unixOptions(c.Metrics.Socket, mode, c.Metrics.Group, "metrics.group")
}

// gatewaySocketOptions: gateway.http_socket's mode, by default 0600, or
// 0660 with its group.
func (c *Config) gatewaySocketOptions() (socket.Options, error) {
	g := c.Gateway.HTTPSocket
	mode := os.FileMode(0o600)
	if g.Mode == "0660" || g.Mode == "" && g.Group != "" {
		mode = 0o660
	}
	return unixOptions(g.Path, mode, g.Group, "gateway.http_socket.group")
}

func unixOptions(path string, mode os.FileMode, group, field string) (socket.Options, error) {
	o := socket.Options{Path: path, Mode: mode, GID: -1}
	if gid, err := strconv.ParseUint(group, 10, 31); err == nil {
		// A number is a gid as it is: a container's /etc/group seldom
		// names the pod's supplemental groups.
		o.GID = int(gid)
		return o, nil
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			return o, configError(fmt.Errorf("config: %s %q is not known on this system", field, group))
		}
		o.GID, _ = strconv.Atoi(g.Gid)
	}
	return o, nil
}

func (c *Config) hsmConfig() hsm.Config {
	return hsm.Config{Module: c.HSM.Module, Token: c.HSM.Token, URI: c.HSM.URI, PINFile: c.HSM.PINFile, PINEnv: c.HSM.PINEnv,
		PINCredential: c.HSM.PINCredential, Sessions: c.HSM.Sessions, ScrubPINEnv: scrubPINEnv,
		Shared: c.Store.Etcd != nil} // a fleet's nodes share the HSM
}

// scrubPINEnv takes the PIN's variable out of keywardd's environment once
// hsm has read it, before the HSM's module is loaded: no helper process the
// module starts inherits it, and /proc/PID/environ no longer shows it
// (os.Unsetenv alone would leave it there; package procenv).
func scrubPINEnv(name string) error {
	if err := procenv.Scrub(name); err != nil {
		return fmt.Errorf("hsm.pin_env: the PIN could not be cleared from keywardd's /proc/PID/environ (%v): give it with hsm.pin_credential or hsm.pin_file instead", err)
	}
	return nil
}

func (c *Config) auditPath() string {
	if c.AuditFile != "" {
		return c.AuditFile
	}
	return filepath.Join(c.DataDir, "audit.log")
}

// apiKeyOptions are the API key manager's options: the built-in default
// limits with the configured roles' replaced.
func (c *Config) apiKeyOptions() (apikeys.Options, error) {
	o := apikeys.Options{Prefix: c.APIKeys.Prefix, NearLimit: c.APIKeys.NearLimit, DefaultLimits: maps.Clone(apikeys.DefaultLimits),
		LeakAction: apikeys.LeakAction(c.Leaks.Action)}
	for role, layers := range c.APIKeys.DefaultLimits {
		if _, ok := apikeys.Roles[role]; !ok {
			return o, fmt.Errorf("api_keys.default_limits: %q is not a role; roles are read-only, standard and admin", role)
		}
		if err := apikeys.CheckLimits(layers); err != nil {
			return o, fmt.Errorf("api_keys.default_limits.%s: %v", role, err)
		}
		o.DefaultLimits[role] = layers
	}
	return o, nil
}

// tokenConfig is the token service's configuration, with its defaults.
func (c *Config) tokenConfig() tokens.Config {
	return tokens.Config{Issuer: c.Tokens.Issuer, DefaultTTL: c.Tokens.DefaultTTL, MaxTTL: c.Tokens.MaxTTL, Leeway: c.Tokens.Leeway, NoCache: c.Tokens.NoCache}.WithDefaults()
}
