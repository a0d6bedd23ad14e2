package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/etcdstore"
	"github.com/keyward/keyward/hsm"
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
	// LeaderTTL is the lease of the node running the fleet's jobs: when it
	// dies, another takes them within this; whole seconds, at least 2s
	// (1.5 × etcd's election timeout, 1 s by default), default 10s.
	LeaderTTL time.Duration `yaml:"leader_ttl"`
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
	schemes := map[string]bool{}
	for _, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err == nil {
			schemes[u.Scheme] = true
		}
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
	if len(schemes) > 1 {
		errs = append(errs, errors.New("store.etcd.endpoints: all https:// or all http:// (one client speaks one of them to every member)"))
	}
	if p := e.Prefix; p != "" && (!strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/")) {
		errs = append(errs, fmt.Errorf("store.etcd.prefix %q: a path such as /keyward, starting with / and not ending with it", p))
	}
	if (e.TLS.Cert == "") != (e.TLS.Key == "") {
		errs = append(errs, errors.New("store.etcd.tls: cert and key go together"))
	}
	if t := e.LeaderTTL; t != 0 && (t < 2*time.Second || t%time.Second != 0) {
		errs = append(errs, fmt.Errorf("store.etcd.leader_ttl %v: whole seconds, at least 2s (etcd refuses a shorter lease than 1.5 × its election timeout)", t))
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
func openFleetStore(ctx context.Context, cfg *Config, h *hsm.HSM, al *audit.Log, feed *changeFeed, log *slog.Logger) (stateStore, *clientv3.Client, func() error, error) {
	e := cfg.Store.Etcd
	cc, err := e.clientConfig()
	if err != nil {
		return nil, nil, nil, err
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("store.etcd: %w", err)
	}
	key, err := DeriveStoreKey(ctx, h)
	if errors.Is(err, hsm.ErrKeyNotFound) {
		// The fleet's first node makes it, under the fleet's lock of it:
		// the HSM's own check for a key there is per process, and nodes
		// making their first start at once would each make one.
		err = fleetLocked(ctx, cli, e.prefix()+"/locks/"+StoreKey.Name, func() error {
			if key, err = DeriveStoreKey(ctx, h); !errors.Is(err, hsm.ErrKeyNotFound) {
				return err // made by another node meanwhile
			}
			if err = h.CreateKey(ctx, StoreKey, hsm.HMACSHA256); err != nil && !errors.Is(err, hsm.ErrKeyExists) {
				return err
			}
			key, err = DeriveStoreKey(ctx, h)
			return err
		})
	}
	if err != nil {
		cli.Close()
		return nil, nil, nil, fmt.Errorf("the store's key %s: %w", StoreKey, err)
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
		return nil, nil, nil, fmt.Errorf("the fleet's state in %s: %w", where, err)
	}
	closeAll := func() error { return errors.Join(n.Close(), cli.Close()) }
	if err := refuseMigrating(n, where); err != nil {
		closeAll()
		return nil, nil, nil, err
	}
	if acked := al.StoreWrites(); n.EtcdWrites() < acked {
		closeAll()
		return nil, nil, nil, fmt.Errorf("%w: the fleet's state in %s is at write %d, but this node's audit log recorded write %d: etcd was restored from an older snapshot, or this is another cluster, or this node ran on one host (its bbolt store) before and its audit log holds that store's count (docs/fleet.md, \"Backup and restore\")", store.ErrDamaged, where, n.EtcdWrites(), acked)
	}
	al.SetStoreWrites(n.Writes)
	return fleetStore{n, where}, cli, closeAll, nil
}

// DefaultLeaderTTL is store.etcd.leader_ttl's default.
const DefaultLeaderTTL = 10 * time.Second

// leadership runs the jobs done once for a fleet (task.once) on one node
// at a time: the one elected with clientv3/concurrency's Election on
// PREFIX/leader. The jobs run while its session lives; when the session
// ends (its lease was not renewed within the TTL: the node was cut off
// from etcd's quorum), they stop at once and the node campaigns again.
// A node cut off may still run them for up to a round trip after etcd
// expired its lease and elected another; their writes go through the
// fleet's write lock and are computed from the records as they are then
// (a rotation makes the version after the latest), so two leaders for
// that moment repeat no work that matters.
type leadership struct {
	cli     *clientv3.Client
	key     string
	node    string
	ttl     int
	timeout time.Duration
	log     *slog.Logger
	leading atomic.Bool
	// nodes is how many nodes campaign (one key each under PREFIX/leader),
	// counted every second: the fleet's size, as the API keys' fleet-wide
	// limits divide them.
	nodes atomic.Int64
	// seen is the names campaigning and the leader's, as last counted.
	seen atomic.Pointer[fleetNodes]
}

// fleetNodes is the fleet's nodes as a count saw them.
type fleetNodes struct {
	names  []string // sorted, this node's among them
	leader string   // the oldest campaign's: the leader; empty if none yet
}

// Nodes is the fleet's size as last counted, at least 1.
func (l *leadership) Nodes() int { return int(max(l.nodes.Load(), 1)) }

// count counts the nodes: the names campaigning, and this node's own
// (before its campaign starts); on an error the last count stands.
func (l *leadership) count(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.key+"/", clientv3.WithPrefix(), clientv3.WithSerializable())
	if err != nil {
		return
	}
	names := map[string]bool{l.node: true}
	var seen fleetNodes
	var oldest int64
	for _, kv := range resp.Kvs {
		names[string(kv.Value)] = true
		if oldest == 0 || kv.CreateRevision < oldest {
			oldest, seen.leader = kv.CreateRevision, string(kv.Value)
		}
	}
	seen.names = slices.Sorted(maps.Keys(names))
	l.nodes.Store(int64(len(names)))
	l.seen.Store(&seen)
}

// elect returns ts with the work done once wrapped in the fleet's
// leadership, on a fleet's node; on one host, ts as they are.
func (d *daemonParts) elect(ts []task) []task {
	if d.lead == nil {
		return ts
	}
	var each, once []task
	for _, t := range ts {
		if t.once {
			once = append(once, t)
		} else {
			each = append(each, t)
		}
	}
	// Every second: a node that counts too few nodes takes blocks too large
	// for the bound (apikeys/fleet.go).
	each = append(each, every("fleet size", time.Second, d.lead.count))
	return append(each, d.lead.task(once))
}

// task campaigns, runs jobs while elected, and campaigns again, until ctx
// ends. A job's error is fatal, as it is on one host.
func (l *leadership) task(jobs []task) task {
	return task{name: "fleet leadership", run: func(ctx context.Context) error {
		backoff := 100 * time.Millisecond
		for ctx.Err() == nil {
			elected, err := l.term(ctx, jobs)
			if elected && err != nil {
				return err
			}
			if ctx.Err() != nil {
				return nil
			}
			if err != nil {
				l.log.Warn("campaigning to run the fleet's jobs failed; trying again", "error", err.Error(), "after", backoff.String())
				select {
				case <-ctx.Done():
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 5*time.Second)
				continue
			}
			backoff = 100 * time.Millisecond
		}
		return nil
	}}
}

// term is one session: a campaign and, once elected, the jobs until the
// session or ctx ends. elected says whether err is the jobs'.
func (l *leadership) term(ctx context.Context, jobs []task) (elected bool, err error) {
	gctx, cancel := context.WithTimeout(ctx, l.timeout)
	lease, err := l.cli.Grant(clientv3.WithRequireLeader(gctx), int64(l.ttl))
	cancel()
	if err != nil {
		return false, err
	}
	s, err := concurrency.NewSession(l.cli, concurrency.WithLease(lease.ID), concurrency.WithContext(ctx))
	if err != nil {
		l.revoke(lease.ID)
		return false, err
	}
	defer func() {
		// Within a deadline (Session.Close would wait out its TTL without
		// quorum): the next leader need not wait for the lease to expire.
		s.Orphan()
		l.revoke(lease.ID)
	}()
	cctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-s.Done():
			stop()
		case <-cctx.Done():
		}
	}()
	e := concurrency.NewElection(s, l.key)
	won := make(chan error, 1)
	// Campaign cleans up after a cancelled wait with a context of its own
	// that has no deadline: it runs apart, and the lease's revocation
	// takes its place in the queue with it.
	go func() { won <- e.Campaign(cctx, l.node) }()
	select {
	case err = <-won:
	case <-cctx.Done():
		err = cctx.Err()
	}
	if err != nil {
		return false, err
	}
	// The session may have ended while the campaign waited: the key it
	// won with must still be there, under this session's lease.
	gctx, cancel = context.WithTimeout(cctx, l.timeout)
	resp, err := l.cli.Get(clientv3.WithRequireLeader(gctx), e.Key())
	cancel()
	if err != nil {
		return false, err
	}
	if len(resp.Kvs) == 0 || clientv3.LeaseID(resp.Kvs[0].Lease) != lease.ID {
		return false, errors.New("the session ended as the campaign was won")
	}
	l.leading.Store(true)
	defer l.leading.Store(false)
	l.log.Info("this node runs the fleet's jobs", "node", l.node)
	bg := startTasks(jobs)
	select {
	case <-cctx.Done():
		if ctx.Err() == nil {
			l.log.Warn("this node's session with etcd ended: its jobs stop, another node takes them", "node", l.node)
		}
	case <-bg.failed():
	}
	return true, bg.wait()
}

// revoke revokes a lease, within a request's deadline.
func (l *leadership) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	l.cli.Revoke(ctx, id)
}

// fleetInfo is what GetStatus shows of the node's place in the fleet (nil
// on one host).
func (d *daemonParts) fleetInfo() func() server.FleetInfo {
	fs, ok := d.st.(fleetStore)
	if !ok || d.lead == nil {
		return nil
	}
	return func() server.FleetInfo {
		f := server.FleetInfo{Node: d.lead.node, Leader: d.lead.leading.Load(), Revision: fs.Revision(),
			FreshAt: fs.FreshAt(), Staleness: fs.Staleness()}
		if seen := d.lead.seen.Load(); seen != nil {
			f.Nodes, f.LeaderNode = seen.names, seen.leader
		}
		return f
	}
}

// fleetLocked runs fn under the fleet's lock of key (a concurrency.Mutex
// on a session of its own), before the node's store is open.
func fleetLocked(ctx context.Context, cli *clientv3.Client, key string, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	s, err := concurrency.NewSession(cli, concurrency.WithTTL(etcdstore.DefaultSessionTTL), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("the fleet's lock of %s: %w", key, err)
	}
	defer func() {
		s.Orphan()
		rctx, cancel := context.WithTimeout(context.Background(), etcdstore.DefaultTimeout)
		defer cancel()
		cli.Revoke(rctx, s.Lease()) // the lock with it
	}()
	if err := etcdstore.LockWithin(clientv3.WithRequireLeader(ctx), concurrency.NewMutex(s, key)); err != nil {
		return fmt.Errorf("the fleet's lock of %s: %w", key, err)
	}
	return fn()
}
