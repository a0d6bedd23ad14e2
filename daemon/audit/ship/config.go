package ship

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// Sink types.
const (
	TypeSyslog = "syslog"
	TypeFile   = "file"
	TypeHTTP   = "http"
)

// Failure policies.
const (
	// Spool: the sink lags behind the local log (the local log is the
	// spool: only the sink's cursor lags), and past MaxLagBytes keywardd
	// alerts (log, metric) and goes on lagging: nothing is dropped, no
	// call waits.
	Spool = "spool"
	// Block: past MaxLagBytes keywardd refuses calls (UNAVAILABLE, health
	// NOT_SERVING) until the sink has caught up under it: fail closed, as
	// when the local log cannot be written.
	Block = "block"
)

// Defaults.
const (
	DefaultSpoolLag = 256 << 20 // bytes a spooling sink may lag before keywardd alerts
	DefaultBlockLag = 1 << 20   // bytes a blocking sink may lag before keywardd refuses calls
	MinLag          = 64 << 10  // the least max_lag_bytes: less would refuse calls between two batches
	DefaultTimeout  = 10 * time.Second
)

// SinkConfig is one sink of keywardd.yaml's audit_sinks (docs/audit-shipping.md).
type SinkConfig struct {
	Name string `yaml:"name"` // names its cursor, metrics and log lines
	Type string `yaml:"type"` // syslog, file or http
	// OnFailure is spool (the default) or block.
	OnFailure string `yaml:"on_failure"`
	// MaxLagBytes bounds how far behind the local log the sink may be:
	// spool alerts past it, block refuses calls past it. Default 256 MiB
	// (spool), 1 MiB (block); at least 64 KiB.
	MaxLagBytes int64 `yaml:"max_lag_bytes"`
	// ExcludeOps leaves out records whose op matches one of these globs
	// (path.Match: "APIKeyService.VerifyAPIKey", "TokenService.*"); each is
	// shipped as a stub (seq, prev, hash) so that the chain still
	// verifies. Checkpoints are always shipped.
	ExcludeOps []string `yaml:"exclude_ops"`
	// Timeout bounds one delivery (a batch); default 10s.
	Timeout time.Duration `yaml:"timeout"`

	// syslog: network is unixgram (default, address default /dev/log),
	// tcp (RFC 6587 octet counting) or tls (RFC 5425).
	Network  string `yaml:"network"`
	Address  string `yaml:"address"`
	Facility string `yaml:"facility"` // default authpriv
	// file: the newline-JSON file to append to; fsync after each batch
	// unless no_fsync.
	Path    string `yaml:"path"`
	NoFsync bool   `yaml:"no_fsync"`
	// http: the URL batches are POSTed to (newline-JSON); a 2xx answer
	// acknowledges the batch.
	URL string `yaml:"url"`
	// BearerTokenFile holds a token sent as "Authorization: Bearer ...".
	BearerTokenFile string `yaml:"bearer_token_file"`
	// TLS (syslog over tls, https): the CA that signs the receiver's
	// certificate (default the system's), and a client certificate.
	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"` // default the address's host
}

// maxLag is the sink's bound, with its default.
func (c SinkConfig) maxLag() int64 {
	switch {
	case c.MaxLagBytes > 0:
		return c.MaxLagBytes
	case c.OnFailure == Block:
		return DefaultBlockLag
	}
	return DefaultSpoolLag
}

func (c SinkConfig) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return DefaultTimeout
}

// Check says what is wrong with sinks, each error naming the sink and
// the field.
func Check(sinks []SinkConfig) error {
	var errs []error
	seen := map[string]bool{}
	for i, c := range sinks {
		bad := func(format string, a ...any) {
			errs = append(errs, fmt.Errorf("audit_sinks[%d] (%s): %s", i, c.Name, fmt.Sprintf(format, a...)))
		}
		switch {
		case c.Name == "":
			bad("name is required: it names the sink's cursor file, metrics and log lines")
		case strings.ContainsAny(c.Name, "/\\ \t\n") || c.Name == "." || c.Name == "..":
			bad("name %q: letters, digits, '-', '_' or '.' (it names a file)", c.Name)
		case seen[c.Name]:
			bad("a second sink named %q", c.Name)
		}
		seen[c.Name] = true
		switch c.OnFailure {
		case "", Spool, Block:
		default:
			bad("on_failure %q: spool (lag behind and alert) or block (refuse calls past max_lag_bytes)", c.OnFailure)
		}
		if c.MaxLagBytes != 0 && c.MaxLagBytes < MinLag {
			bad("max_lag_bytes %d: at least %d (64 KiB), or 0 for the default", c.MaxLagBytes, MinLag)
		}
		if c.Timeout < 0 {
			bad("timeout must not be negative")
		}
		for _, g := range c.ExcludeOps {
			if _, err := path.Match(g, ""); err != nil || g == "" {
				bad("exclude_ops %q is not a glob (path.Match: \"TokenService.*\")", g)
			}
		}
		if (c.CertFile == "") != (c.KeyFile == "") {
			bad("cert_file and key_file go together")
		}
		for _, f := range []struct{ name, v string }{{"ca_file", c.CAFile}, {"cert_file", c.CertFile}, {"key_file", c.KeyFile}, {"bearer_token_file", c.BearerTokenFile}, {"path", c.Path}} {
			if f.v != "" && !filepath.IsAbs(f.v) {
				bad("%s must be an absolute path", f.name)
			}
		}
		switch c.Type {
		case TypeSyslog:
			if _, err := facility(c.Facility); err != nil {
				bad("%v", err)
			}
			switch c.Network {
			case "", "unixgram":
				if c.Address != "" && !filepath.IsAbs(c.Address) {
					bad("address %q: a unixgram socket's absolute path (default /dev/log)", c.Address)
				}
			case "tcp", "tls":
				if _, _, err := net.SplitHostPort(c.Address); err != nil {
					bad("address %q: host:port of the receiver (%v)", c.Address, err)
				}
			default:
				bad("network %q: unixgram (a local socket), tcp or tls", c.Network)
			}
			if c.Network != "tls" && (c.CAFile != "" || c.CertFile != "") {
				bad("ca_file and cert_file are for network: tls")
			}
		case TypeFile:
			if c.Path == "" {
				bad("path is required: the newline-JSON file to append to")
			}
		case TypeHTTP:
			// The URL is named without its user information and query,
			// which may hold a token.
			u, err := url.Parse(c.URL)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				bad("url %q: an http:// or https:// URL", redactURL(c.URL))
			} else if u.Scheme == "http" && c.BearerTokenFile != "" && !loopback(u.Hostname()) {
				bad("url %q: a bearer token is sent over https only (or to a loopback address)", redactURL(c.URL))
			}
		default:
			bad("type %q: syslog, file or http", c.Type)
		}
	}
	return errors.Join(errs...)
}

func loopback(host string) bool {
	ip := net.ParseIP(host)
	return host == "localhost" || ip != nil && ip.IsLoopback()
}

// excluded says whether op is left out by the sink's filter.
func (c SinkConfig) excluded(op string) bool {
	for _, g := range c.ExcludeOps {
		if ok, _ := path.Match(g, op); ok {
			return true
		}
	}
	return false
}
