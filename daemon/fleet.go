package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/etcdstore"
	"github.com/keyward/keyward/hsm"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EtcdConfig is store.etcd: the etcd cluster a fleet of nodes shares its
// state through (docs/fleet.md). Every node of a fleet names the same
// cluster and prefix, and uses the same HSM.
type EtcdConfig struct {
	// Endpoints are the cluster's client URLs: https://HOST:2379, or
	// http:// on loopback only.
	Endpoints []string `yaml:"endpoints"`
	// Prefix is where the state lives in etcd; default "/keyward".
	Prefix string `yaml:"prefix"`
	// TLS: the CA that signed etcd's certificates, and this node's client
	// certificate and key (etcd's --client-cert-auth).
	TLS struct {
		CA   string `yaml:"ca"`
		Cert string `yaml:"cert"`
		Key  string `yaml:"key"`
	} `yaml:"tls"`
	// Staleness: how long verifications go on from the local copy when
	// etcd cannot be reached with a quorum; then every call is refused.
	// Default 30s.
	Staleness time.Duration `yaml:"staleness"`
	// Timeout bounds each request to etcd; default 5s.
	Timeout time.Duration `yaml:"timeout"`
	// MaxTxnOps and MaxRequestBytes are the cluster's --max-txn-ops and
	// --max-request-bytes (defaults: etcd's, 128 and 1572864).
	MaxTxnOps       int `yaml:"max_txn_ops"`
	MaxRequestBytes int `yaml:"max_request_bytes"`
}

// DefaultEtcdPrefix is store.etcd.prefix's default.
const DefaultEtcdPrefix = "/keyward"

func (e *EtcdConfig) check() []error {
	var errs []error
	if len(e.Endpoints) == 0 {
		errs = append(errs, errors.New("store.etcd.endpoints: name the etcd cluster's client URLs (https://HOST:2379)"))
	}
	for _, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			errs = append(errs, fmt.Errorf("store.etcd.endpoints: %q is not a URL such as https://etcd-1:2379", ep))
			continue
		}
		if u.Scheme == "http" {
			ip := net.ParseIP(u.Hostname())
			if u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
				errs = append(errs, fmt.Errorf("store.etcd.endpoints: %q is plain HTTP to another host: use https:// with store.etcd.tls", ep))
			}
		}
	}
	if p := e.Prefix; p != "" && (!strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/")) {
		errs = append(errs, fmt.Errorf("store.etcd.prefix %q: a path such as /keyward, starting with / and not ending with it", p))
	}
	if (e.TLS.Cert == "") != (e.TLS.Key == "") {
		errs = append(errs, errors.New("store.etcd.tls: cert and key go together"))
	}
	if e.Staleness < 0 || e.Timeout < 0 || e.MaxTxnOps < 0 || e.MaxRequestBytes < 0 {
		errs = append(errs, errors.New("store.etcd: staleness, timeout and the limits must not be negative (0 is the default)"))
	}
	return errs
}

func (e *EtcdConfig) prefix() string {
	if e.Prefix == "" {
		return DefaultEtcdPrefix
	}
	return e.Prefix
}

// clientConfig is the etcd client's configuration.
func (e *EtcdConfig) clientConfig() (clientv3.Config, error) {
	cfg := clientv3.Config{
		Endpoints:   e.Endpoints,
		DialTimeout: 5 * time.Second,
		// Every request of the backend has its own deadline; the client's
		// own log would only repeat its retries.
		Logger: zap.NewNop(),
		// Room for the largest transaction the cluster takes.
		MaxCallSendMsgSize: max(e.MaxRequestBytes, etcdstore.DefaultMaxRequestBytes) + 1<<20,
	}
	if e.TLS.CA == "" && e.TLS.Cert == "" && !strings.HasPrefix(e.Endpoints[0], "https://") {
		return cfg, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.TLS.CA != "" {
		pem, err := os.ReadFile(e.TLS.CA)
		if err != nil {
			return cfg, configError(fmt.Errorf("store.etcd.tls.ca: %w", err))
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return cfg, configError(fmt.Errorf("store.etcd.tls.ca %s holds no PEM certificate", e.TLS.CA))
		}
	}
	if e.TLS.Cert != "" {
		cert, err := tls.LoadX509KeyPair(e.TLS.Cert, e.TLS.Key)
		if err != nil {
			return cfg, configError(fmt.Errorf("store.etcd.tls: %w", err))
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	cfg.TLS = tc
	return cfg, nil
}

// fleetStore is the state of a fleet node: etcdstore.Node, with what the
// server shows of it.
type fleetStore struct {
	*etcdstore.Node
	where string // the cluster and prefix, for the log and status
}

func (f fleetStore) Path() string { return f.where }

// SchemaVersion is the schema the records are written in: the same as the
// bbolt file's, record for record.
func (f fleetStore) SchemaVersion() (int, error) { return store.SchemaVersion, nil }

// Err is why the node cannot serve: its backend stopped, or its local copy
// is staler than the bound (fail closed: the server refuses every call
// while it is, cached answers included).
func (f fleetStore) Err() error {
	if err := f.Node.Err(); err != nil {
		return err
	}
	return f.Fresh()
}

// changeFeed hands the records the local copy saw change (any node's
// writes) to the caches above the store that registered for their bucket.
type changeFeed struct {
	mu  sync.RWMutex
	fns map[string][]func([]etcdstore.Change)
}

// on registers fn for bucket's changes (nil: anything may have changed).
// fn runs on the goroutine that feeds the local copy, before a write
// waiting for the change returns: it must not wait for a lock a caller
// holds across a write (etcdstore.NodeOptions.Changed).
func (f *changeFeed) on(bucket string, fn func([]etcdstore.Change)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fns == nil {
		f.fns = map[string][]func([]etcdstore.Change){}
	}
	f.fns[bucket] = append(f.fns[bucket], fn)
}

func (f *changeFeed) changed(bucket string, changes []etcdstore.Change) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for _, fn := range f.fns[bucket] {
		fn(changes)
	}
}

// keysOf is the keys of changes, nil for nil (anything changed).
func keysOf(changes []etcdstore.Change) []string {
	if changes == nil {
		return nil
	}
	keys := make([]string, len(changes))
	for i, c := range changes {
		keys[i] = c.Key
	}
	return keys
}

// openFleetStore opens this node's view of the fleet's state in etcd: the
// store key derived from the shared HSM, a local copy in the data
// directory, and the audit log's check that the state is not older than
// one this node acknowledged.
func openFleetStore(ctx context.Context, cfg *Config, h *hsm.HSM, al *audit.Log, feed *changeFeed, log *slog.Logger) (stateStore, func() error, error) {
	e := cfg.Store.Etcd
	key, err := DeriveStoreKey(ctx, h)
	if errors.Is(err, hsm.ErrKeyNotFound) {
		// The fleet's first node makes it; another making it at once is
		// fine (ErrKeyExists), the next derivation finds the one there.
		if err = h.CreateKey(ctx, StoreKey, hsm.HMACSHA256); err == nil || errors.Is(err, hsm.ErrKeyExists) {
			key, err = DeriveStoreKey(ctx, h)
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("the store's key %s: %w", StoreKey, err)
	}
	cc, err := e.clientConfig()
	if err != nil {
		return nil, nil, err
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return nil, nil, fmt.Errorf("store.etcd: %w", err)
	}
	where := fmt.Sprintf("etcd %s%s", strings.Join(e.Endpoints, ","), e.prefix())
	n, err := etcdstore.OpenNode(etcdstore.NodeOptions{
		Options: etcdstore.Options{Client: cli, Prefix: e.prefix(), Key: key, Timeout: e.Timeout,
			MaxTxnOps: e.MaxTxnOps, MaxRequestBytes: e.MaxRequestBytes},
		Path:      filepath.Join(cfg.DataDir, "fleet-copy.db"),
		Staleness: e.Staleness,
		Logger:    log,
		Changed:   feed.changed,
	})
	if err != nil {
		cli.Close()
		return nil, nil, fmt.Errorf("the fleet's state in %s: %w", where, err)
	}
	closeAll := func() error { return errors.Join(n.Close(), cli.Close()) }
	if acked := al.StoreWrites(); n.Writes() < acked {
		closeAll()
		return nil, nil, fmt.Errorf("%w: the fleet's state in %s is at write %d, but this node's audit log recorded write %d: etcd was restored from an older snapshot, or this is another cluster; restore the newest snapshot (docs/fleet.md, \"Backup and restore\")", store.ErrDamaged, where, n.Writes(), acked)
	}
	al.SetStoreWrites(n.Writes)
	return fleetStore{n, where}, closeAll, nil
}
