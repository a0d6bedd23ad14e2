package leaks

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"
)

// Config is the leaks section of keywardd.yaml: what a confirmed leak does
// to its key, and the secret scanners' intake over HTTP(S) (off unless
// http.address is set).
type Config struct {
	// Action is what a confirmed leak does: revoke (the default) or
	// disable. It applies to every report, the intake's and
	// APIKeyService.ReportLeak's.
	Action string `yaml:"action"`
	// HTTP is the intake's listener. An address that is not loopback
	// needs a TLS certificate (TLS 1.3 only), as tokens.http does.
	HTTP struct {
		Address string `yaml:"address"` // e.g. 127.0.0.1:8643, behind a proxy; or :8443 with TLS
		TLSCert string `yaml:"tls_cert"`
		TLSKey  string `yaml:"tls_key"`
	} `yaml:"http"`
	// PublicKeysFile holds the scanner's public keys, in the format of
	// GitHub's secret scanning keys document ({"public_keys": [{
	// "key_identifier", "key" (PEM), "is_current"}]}). keywardd reads it at
	// start and at every refresh.
	PublicKeysFile string `yaml:"public_keys_file"`
	// PublicKeysURL, if set, is fetched at start and every RefreshEvery;
	// its keys are added to the file's. keywardd fetches nothing unless
	// it is set. https, or http to a loopback address.
	PublicKeysURL string `yaml:"public_keys_url"`
	// RefreshEvery is how often the file is read again and the URL
	// fetched; default 1h.
	RefreshEvery time.Duration `yaml:"refresh_every"`
	// MaxBody bounds a report's body in bytes; default 1 MiB.
	MaxBody int64 `yaml:"max_body"`
	// ReplayWindow is how long a report already handled is answered from
	// memory, without being handled again; default 10m, 0 for never (each
	// report sent again is handled again). A pointer: absent and 0 differ.
	ReplayWindow *time.Duration `yaml:"replay_window"`
	// MaxInFlight bounds the requests the intake reads and handles at
	// once, each holding up to MaxBody bytes; one more is answered 503
	// with Retry-After. Default 16.
	MaxInFlight int `yaml:"max_in_flight"`
}

// Defaults of Config.
const (
	DefaultRefreshEvery = time.Hour
	DefaultMaxBody      = 1 << 20
	DefaultReplayWindow = 10 * time.Minute
	DefaultMaxInFlight  = 16
)

// WithDefaults is c with its defaults filled in.
func (c Config) WithDefaults() Config {
	if c.Action == "" {
		c.Action = "revoke"
	}
	if c.RefreshEvery == 0 {
		c.RefreshEvery = DefaultRefreshEvery
	}
	if c.MaxBody == 0 {
		c.MaxBody = DefaultMaxBody
	}
	if c.ReplayWindow == nil {
		w := DefaultReplayWindow
		c.ReplayWindow = &w
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	return c
}

// Check says what is wrong with c, every problem at once.
func (c Config) Check() error {
	var errs []error
	if c.Action != "" && c.Action != "revoke" && c.Action != "disable" {
		errs = append(errs, fmt.Errorf("leaks.action is revoke or disable, not %q", c.Action))
	}
	if c.RefreshEvery < 0 || c.RefreshEvery > 0 && c.RefreshEvery < time.Minute {
		errs = append(errs, errors.New("leaks.refresh_every is at least 1m (absent: 1h)"))
	}
	if c.MaxBody < 0 || c.MaxBody > 64<<20 {
		errs = append(errs, errors.New("leaks.max_body is from 1 to 67108864 bytes (absent: 1 MiB)"))
	}
	if w := c.ReplayWindow; w != nil && (*w < 0 || *w > 24*time.Hour) {
		errs = append(errs, errors.New("leaks.replay_window is from 0 (no replay memory) to 24h (absent: 10m)"))
	}
	if c.MaxInFlight < 0 || c.MaxInFlight > 1024 {
		errs = append(errs, errors.New("leaks.max_in_flight is from 1 to 1024 (absent: 16)"))
	}
	if u := c.PublicKeysURL; u != "" {
		if err := checkURL(u); err != nil {
			errs = append(errs, fmt.Errorf("leaks.public_keys_url: %w", err))
		}
	}
	if a := c.HTTP.Address; a != "" {
		host, _, err := net.SplitHostPort(a)
		ip := net.ParseIP(host)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("leaks.http.address %q: %v", a, err))
		case (ip == nil || !ip.IsLoopback()) && (c.HTTP.TLSCert == "" || c.HTTP.TLSKey == ""):
			errs = append(errs, fmt.Errorf("leaks.http.address %q is not loopback: set tls_cert and tls_key (it serves TLS 1.3 only), or listen on loopback behind a proxy", a))
		}
		if c.PublicKeysFile == "" && c.PublicKeysURL == "" {
			errs = append(errs, errors.New("leaks.http needs the scanner's public keys: set leaks.public_keys_file (docs/leaks.md says how to get it), or public_keys_url"))
		}
	} else if c.HTTP.TLSCert != "" || c.HTTP.TLSKey != "" {
		errs = append(errs, errors.New("leaks.http.tls_cert and tls_key go with leaks.http.address"))
	}
	return errors.Join(errs...)
}

// checkURL refuses a URL keywardd should not fetch keys from: not https,
// unless plain http to a loopback address.
func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not an absolute URL", s)
	}
	switch ip := net.ParseIP(u.Hostname()); {
	case u.Scheme == "https":
	case u.Scheme == "http" && ip != nil && ip.IsLoopback():
	default:
		return fmt.Errorf("%q: use https (plain http only to a loopback address)", s)
	}
	return nil
}
