// Package server is keywardd's gRPC layer: it translates keyward.v1 to the
// domain packages and back, checks every call against the policy for the
// caller the kernel identified, maps domain errors to gRPC status codes in one
// place (errcodes.go), and audits every call, allowed or denied, before its
// answer goes out. A call whose audit record cannot be written fails with
// UNAVAILABLE: no success goes unaudited.
//
// No caller can lock the others out. Each caller (a uid) has a budget of
// connections, calls in flight and call rate (the policy's limits, kept by
// package admission). A connection is counted in the handshake, where the
// kernel has named its caller and nothing has been read from it; a call is
// counted in the tap (grpc.InTapHandle), when its headers are read and
// before a goroutine or its request is spent on it. What is over the budget
// is refused there and then (RESOURCE_EXHAUSTED, with when to retry), never
// queued behind anyone else's work; and a caller that goes on regardless
// pays for its refusals (admission.RefusalCost): its connections are not
// read, nor new ones let in, until it has, so that a flood stalls in its
// own socket instead of taking the CPU from others. A connection that
// sends nothing is closed: before its HTTP/2 preface after
// HandshakeTimeout, after it with no call after IdleTimeout, and a client
// that does not read what it is sent after WriteTimeout; a caller the
// policy does not bind gets the policy's small unbound budget, whose
// connections also close after their lifetime.
//
// Two kinds of call are not audited, as nothing was done in them: a call
// refused for its caller's budget (auditing each would let a flood write
// the audit log at its own pace; keyward_caller_refusals_total counts
// them), and a call its client cancelled, or whose deadline passed, before
// its handler ran. A call whose handler ran is audited even if its client
// has gone.
package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/keyward/keyward/daemon/admission"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/faults"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/daemon/policy"
)

// services are the keyward.v1 services keywardd serves.
var services = []*grpc.ServiceDesc{&keywardv1.KeyService_ServiceDesc, &keywardv1.EnvelopeService_ServiceDesc,
	&keywardv1.StatusService_ServiceDesc, &keywardv1.TokenService_ServiceDesc, &keywardv1.APIKeyService_ServiceDesc,
	&keywardv1.CredentialService_ServiceDesc, &keywardv1.RotationService_ServiceDesc, &keywardv1.AuditService_ServiceDesc,
	&keywardv1.CryptoService_ServiceDesc, &keywardv1.EventService_ServiceDesc}

// Ops lists every operation name the policy may grant, "Service.Method".
func Ops() []string {
	var ops []string
	for _, op := range eachOp {
		ops = append(ops, op)
	}
	return ops
}

// eachOp yields each keyward.v1 method's gRPC name, "/keyward.v1.Service/
// Method", and its operation name, "Service.Method".
func eachOp(yield func(method, op string) bool) {
	for _, sd := range services {
		svc := sd.ServiceName[strings.LastIndexByte(sd.ServiceName, '.')+1:]
		for _, md := range sd.Methods {
			if !yield("/"+sd.ServiceName+"/"+md.MethodName, svc+"."+md.MethodName) {
				return
			}
		}
		for _, st := range sd.Streams {
			if !yield("/"+sd.ServiceName+"/"+st.StreamName, svc+"."+st.StreamName) {
				return
			}
		}
	}
}

// opNames maps gRPC method names to operation names (eachOp, and the
// gateways' methods: gatewayOps), so that calls do not build them.
var opNames = func() map[string]string {
	m := maps.Collect(eachOp)
	maps.Copy(m, gatewayOps)
	return m
}()

// MaxRequest is the largest request keywardd reads, in bytes.
const MaxRequest = 8 << 20

// auditTimeout bounds the wait for an audit record to reach the disk.
const auditTimeout = 10 * time.Second

// ReservedPrefix starts the names of the keys keywardd keeps for itself
// (the audit MAC key); the API refuses to create or delete them.
const ReservedPrefix = "keyward-"

// HSM is what the server asks of the HSM: whether it answers, and what
// token it is.
type HSM interface {
	Health(ctx context.Context) error
	Token() TokenInfo
}

// FleetInfo is a fleet node's view of the shared state, for GetStatus.
type FleetInfo struct {
	Node      string
	Leader    bool
	Revision  int64
	FreshAt   time.Time
	Staleness time.Duration
	// Nodes are the names campaigning in the fleet's election, as last
	// counted (every second), and LeaderNode the one elected.
	Nodes      []string
	LeaderNode string
}

// TokenInfo describes the HSM token, for GetStatus.
type TokenInfo struct {
	Label, Serial, Manufacturer, Model string
}

// Store is what the server needs of the store: whether it serves, and
// what keyward status shows of it.
type Store interface {
	Err() error
	Path() string
	SchemaVersion() (int, error)
}

// ErrAuditBehind is an AuditLog's Err when the log can be written but an
// audit sink that blocks is too far behind it: every call is refused but
// those that say why (storeFree).
var ErrAuditBehind = errors.New("keywardd: an audit sink is too far behind")

// AuditLog is the hash-chained log every call is written to before its
// answer goes out: daemon/audit.Log.
type AuditLog interface {
	// Append writes r and returns once it is on disk.
	Append(ctx context.Context, r audit.Record) error
	// Err is why the log cannot be written; nil while it can.
	Err() error
	// CheckpointErr is why the last checkpoint failed, for GetStatus.
	CheckpointErr() error
	// SetNotify has fn called whenever Err may have changed.
	SetNotify(fn func())
}

// Config is what a Server is made of.
type Config struct {
	HSM      HSM
	Store    Store
	Keys     Keys
	Envelope Envelope
	Audit    AuditLog
	Policy   *policy.Policy
	// MaxBatch caps every batch, whatever a role allows. Default 100.
	MaxBatch int
	// DefaultBatch is the batch size allowed to roles that set none.
	// Default 10.
	DefaultBatch int
	// Version is keywardd's version, for GetStatus.
	Version string
	// HealthEvery is how often the HSM's health is checked. Default 5 s.
	HealthEvery time.Duration
	// Tokens serves the TokenService.
	Tokens TokenService
	// APIKeys serves the APIKeyService.
	APIKeys APIKeys
	// LimitWindows serves its scheduled limits; nil turns them off.
	LimitWindows LimitWindows
	// Credentials serves the CredentialService; nil turns it off.
	Credentials Credentials
	// AuditReader serves the AuditService: the audit log (Audit) read
	// back; nil turns it off.
	AuditReader AuditReader
	// Crypto serves the CryptoService; nil turns it off.
	Crypto Crypto
	// Metrics, if set, counts and times every call. It stays concrete: a
	// leaf (Prometheus counters, safe on a nil receiver) with no behaviour
	// a caller would swap, and tests read what it counted.
	Metrics *metrics.Metrics
	// Plugins, if set, reports the plugins' states for GetStatus.
	Plugins func() []PluginState
	// NamesToRename, if set, counts by kind the names in use that are not
	// canonical, for GetStatus; nil until known.
	NamesToRename func() map[string]int
	// Fleet, if set, is this node's place in a fleet, for GetStatus.
	Fleet func() FleetInfo
	// AuditSinks, if set, reports the audit sinks' states for GetStatus.
	AuditSinks func() []AuditSinkState
	// Schedule serves GetRotationPlan; nil turns it off.
	Schedule Schedule
	// Notify, if set, is called when events for the plugins were queued,
	// so that they go out at once.
	Notify func()
	// Events serves EventService.Watch; nil turns it off.
	Events Events
	// Now is keywardd's clock (audit records, tokens, API keys' expiry);
	// nil is time.Now. Latencies are measured on the monotonic clock.
	Now func() time.Time
	// HandshakeTimeout bounds the time from a connection's accept to its
	// client's HTTP/2 preface and first SETTINGS frame. Default 5 s.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that has had no call in flight for
	// this long (a GOAWAY; a client that does not answer it is cut off 5 s
	// later). Default 1 minute.
	IdleTimeout time.Duration
	// WriteTimeout closes a connection whose client has not read what it
	// was sent for this long. Default 10 s.
	WriteTimeout time.Duration
}

// The defaults of Config's timeouts.
const (
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultIdleTimeout      = time.Minute
	DefaultWriteTimeout     = 10 * time.Second
)

// AuditSinkState is an audit sink's state as GetStatus reports it: the
// fields of daemon/audit/ship.Status.
type AuditSinkState struct {
	Name, Type, OnFailure       string
	LagBytes, MaxLagBytes       int64
	OverBound                   bool
	Seq                         uint64
	Shipped, Filtered, Failures uint64
	State                       string
	LastError                   string
}

// PluginState is a plugin's state as GetStatus reports it.
type PluginState struct {
	Name, Version, State string
	PID, Launches        int
	LastError            string
	Capabilities         []string
	Since                time.Time
	EventsPending        int    // revocations waiting for it
	DeliveryError        string // why the last delivery failed
}

// Server serves keyward.v1.
type Server struct {
	cfg    Config
	policy atomic.Pointer[policy.Policy]
	gate   *admission.Gate
	// lingering counts refused connections waiting for their client to
	// read why (peerCreds.refuse).
	lingering atomic.Int64
	health    *health.Server
	start     time.Time
	hsmErr    atomic.Pointer[error] // the last health check's error; nil when healthy
	kick      chan struct{}         // checks health at once: the audit log or the store changed

	keywardv1.UnimplementedKeyServiceServer
	keywardv1.UnimplementedEnvelopeServiceServer
	keywardv1.UnimplementedStatusServiceServer
	keywardv1.UnimplementedTokenServiceServer
	keywardv1.UnimplementedAPIKeyServiceServer
	keywardv1.UnimplementedCredentialServiceServer
	keywardv1.UnimplementedRotationServiceServer
	keywardv1.UnimplementedAuditServiceServer
	keywardv1.UnimplementedCryptoServiceServer
	keywardv1.UnimplementedEventServiceServer
}

// New makes the server and the grpc.Server that serves it.
func New(cfg Config) (*Server, *grpc.Server) {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 100
	}
	if cfg.DefaultBatch <= 0 {
		cfg.DefaultBatch = 10
	}
	if cfg.HealthEvery <= 0 {
		cfg.HealthEvery = 5 * time.Second
	}
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{
		{&cfg.HandshakeTimeout, DefaultHandshakeTimeout}, {&cfg.IdleTimeout, DefaultIdleTimeout}, {&cfg.WriteTimeout, DefaultWriteTimeout}} {
		if *d.v <= 0 {
			*d.v = d.def
		}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, gate: admission.New(nil), health: health.NewServer(), start: cfg.Now(), kick: make(chan struct{}, 1)}
	s.policy.Store(cfg.Policy)
	cfg.Audit.SetNotify(s.recheck)
	resolver := identity.NewResolver()
	resolver.Hashing = s.gate.Hash
	gs := grpc.NewServer(
		grpc.Creds(&peerCreds{s: s, resolver: resolver}),
		grpc.ConnectionTimeout(cfg.HandshakeTimeout),
		// Idle: no call in flight, whatever else the client sends (pings
		// do not count), from the handshake on.
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: cfg.IdleTimeout}),
		grpc.InTapHandle(s.admit),
		grpc.UnaryInterceptor(s.intercept),
		grpc.StreamInterceptor(s.interceptStream),
		// A batch of 100 items of 64 KiB fits; a request is read whole
		// before the policy sees it, so nothing much larger is taken.
		grpc.MaxRecvMsgSize(MaxRequest),
		// The streams of a connection bound the answers it holds: a call
		// leaves its caller's budget when its handler returns, but its
		// stream (and the answer queued in it, which a client that grants
		// no flow-control window never takes) lasts until the answer is
		// written. So not more, though at 64 clients on one connection
		// half of them wait for a stream (docs/performance.md).
		grpc.MaxConcurrentStreams(32),
		// protobuf, but Envoy's CheckRequest's unread fields discarded (envoy.go).
		grpc.ForceServerCodecV2(newEnvoyCodec()),
	)
	keywardv1.RegisterKeyServiceServer(gs, s)
	keywardv1.RegisterEnvelopeServiceServer(gs, s)
	keywardv1.RegisterStatusServiceServer(gs, s)
	keywardv1.RegisterTokenServiceServer(gs, s)
	keywardv1.RegisterAPIKeyServiceServer(gs, s)
	keywardv1.RegisterCredentialServiceServer(gs, s)
	keywardv1.RegisterRotationServiceServer(gs, s)
	keywardv1.RegisterAuditServiceServer(gs, s)
	keywardv1.RegisterCryptoServiceServer(gs, s)
	keywardv1.RegisterEventServiceServer(gs, s)
	gs.RegisterService(&envoyAuthzDesc, envoyAuthz{s: s})
	healthpb.RegisterHealthServer(gs, s.health)
	reflection.Register(gs)
	return s, gs
}

// SetPolicy replaces the policy (SIGHUP). Calls in flight finish under the
// old one. Every watcher is sent a resync marker: the events it may see changed, and
// a cache kept by them (client.VerdictCache) must read its verdicts again.
func (s *Server) SetPolicy(p *policy.Policy) {
	s.policy.Store(p)
	if s.cfg.Events != nil {
		s.cfg.Events.Invalidate("keywardd's policy was reloaded: what you may see may have changed")
	}
}

// WatchHealth checks the HSM every HealthEvery until ctx ends, and serves
// NOT_SERVING on the health service while it fails, while the audit log
// cannot be written, or once the store was found damaged (those two at
// once).
func (s *Server) WatchHealth(ctx context.Context) {
	t := time.NewTicker(s.cfg.HealthEvery)
	defer t.Stop()
	for {
		s.checkHealth(ctx)
		select {
		case <-ctx.Done():
			s.health.Shutdown()
			return
		case <-t.C:
		case <-s.kick:
		}
	}
}

// recheck has WatchHealth check at once.
func (s *Server) recheck() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Server) checkHealth(ctx context.Context) {
	err := s.cfg.HSM.Health(ctx)
	st := healthpb.HealthCheckResponse_SERVING
	if err != nil {
		s.hsmErr.Store(&err)
	} else {
		s.hsmErr.Store(nil)
	}
	if err != nil || s.cfg.Audit.Err() != nil || s.cfg.Store.Err() != nil {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	s.health.SetServingStatus("", st)
	for _, sd := range services {
		s.health.SetServingStatus(sd.ServiceName, st)
	}
}

// call is what a handler learns about its call, for the audit record.
type call struct {
	op      string
	caller  *identity.Caller
	key     string
	version uint32
	items   int
	ctxHash string
	batch   []audit.Item
	apiKey  string // an API key's ID (never its secret)
	result  string // VerifyAPIKey's verdict
	detail  string // what a successful call did, when key and items do not say
}

// outcome names how a call or item ended, for the audit log.
func outcome(st *status.Status) (string, string) {
	switch {
	case st == nil:
		return "ok", ""
	case st.Code() == codes.PermissionDenied:
		return "denied", st.Code().String()
	}
	return "error", st.Code().String()
}

type callKey struct{}

func callFrom(ctx context.Context) *call { return ctx.Value(callKey{}).(*call) }

// storeFree operations are served while the store is not, and while an
// audit sink that blocks is behind (ErrAuditBehind: the local log is
// written all the same): GetStatus, which says why the others are
// refused, and the audit log's, which tell what happened before.
var storeFree = map[string]bool{
	"StatusService.GetStatus":       true,
	"AuditService.ListAuditRecords": true, "AuditService.VerifyAuditLog": true,
}

// sensitive operations return key material or plaintext: the caller must
// still be the process that connected when the answer is ready.
var sensitive = map[string]bool{
	"EnvelopeService.GenerateDataKey": true, "EnvelopeService.Decrypt": true,
	"EnvelopeService.BatchGenerateDataKey": true, "EnvelopeService.BatchDecrypt": true,
	"TokenService.MintToken":     true,
	"APIKeyService.CreateAPIKey": true, "APIKeyService.RotateAPIKey": true,
	"CredentialService.GetCredential": true,
}

// endKey holds, in a call's context, the func that ends it in its
// caller's budget.
type endKey struct{}

// admit counts a call against its caller's budget when its headers are
// read, and refuses it if it is over (grpc.InTapHandle). The call ends in
// the budget when its handler returns (intercept), or else when its stream
// ends, however it ends.
func (s *Server) admit(ctx context.Context, _ *tap.Info) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ctx, nil // not through the handshake: intercept refuses it
	}
	ai, ok := p.AuthInfo.(AuthInfo)
	if !ok {
		return ctx, nil
	}
	lim := ai.conn.limits(s.policy.Load())
	end, err := ai.conn.acct.Call(lim.Limits, lim.bound)
	if err != nil {
		s.refused(err)
		return nil, toStatus(err).Err()
	}
	context.AfterFunc(ctx, end)
	return context.WithValue(ctx, endKey{}, end), nil
}

// refused counts a refusal for a caller's budget.
func (s *Server) refused(err error) {
	if r, ok := errors.AsType[*admission.Refusal](err); ok {
		s.cfg.Metrics.Refused(string(r.Budget), r.Bound)
	}
}

// intercept identifies the caller, runs the handler, audits the call, and
// turns every error into a status.
func (s *Server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if end, ok := ctx.Value(endKey{}).(func()); ok {
		defer end() // before the answer goes out: the client may call again at once
	}
	c, err := newCall(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	op := c.op
	if strings.HasPrefix(info.FullMethod, "/grpc.") {
		return handler(ctx, req) // health and reflection: no keys, nothing to audit
	}
	if err := s.cfg.Audit.Err(); err != nil && !(errors.Is(err, ErrAuditBehind) && storeFree[op]) {
		return nil, status.Error(codes.Unavailable, "keywardd: the audit log cannot be written, so nothing is done: "+err.Error())
	}
	if err := ctx.Err(); err != nil {
		// Cancelled (a reset stream) or past its deadline before it ran:
		// nothing was done, so there is nothing to audit.
		st := status.FromContextError(err)
		s.cfg.Metrics.Call(op, st.Code().String(), 0)
		return nil, st.Err()
	}
	started := time.Now()
	var resp any
	err = s.cfg.Store.Err()
	if err == nil || storeFree[op] {
		resp, err = handler(context.WithValue(ctx, callKey{}, c), req)
	}
	if faults.Damaged(err) {
		s.recheck()
	}
	if err == nil && sensitive[op] {
		if aerr := c.caller.Alive(); aerr != nil {
			resp, err = nil, aerr
		}
	}
	st := toStatus(err)
	rec := s.record(c, err, st)
	// The record is written even if the caller gave up: what was done must
	// be on record whether or not anyone waits for the answer.
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditTimeout)
	defer cancel()
	if aerr := s.cfg.Audit.Append(actx, rec); aerr != nil {
		s.cfg.Metrics.Call(op, codes.Unavailable.String(), time.Since(started))
		return nil, status.Error(codes.Unavailable, "keywardd: the call could not be audited, so its answer is withheld: "+aerr.Error())
	}
	code := codes.OK
	if st != nil {
		code = st.Code()
	}
	s.cfg.Metrics.Call(op, code.String(), time.Since(started))
	if st != nil {
		return nil, st.Err()
	}
	return resp, nil
}

// newCall is a call to method by the caller keywardd identified when its
// connection was made; Unauthenticated without one.
func newCall(ctx context.Context, method string) (*call, error) {
	op, ok := opNames[method]
	if !ok {
		op = strings.Replace(strings.TrimPrefix(method, "/keyward.v1."), "/", ".", 1)
	}
	c := &call{op: op}
	if p, ok := peer.FromContext(ctx); ok {
		if ai, ok := p.AuthInfo.(AuthInfo); ok {
			c.caller = ai.Caller
		}
	}
	if c.caller == nil {
		return nil, status.Error(codes.Unauthenticated, "keywardd: the caller is not known; connect through keywardd's Unix socket")
	}
	return c, nil
}

// record is the audit record of c, which ended with err (st its status).
func (s *Server) record(c *call, err error, st *status.Status) audit.Record {
	rec := audit.Record{
		Time: s.cfg.Now().UTC(),
		Caller: audit.Caller{UID: c.caller.UID, GID: c.caller.GID, PID: c.caller.PID,
			Exe: c.caller.Exe, SHA256: c.caller.ExeSHA256, Cgroup: c.caller.Cgroup.Path},
		Op: c.op, Key: c.key, Version: c.version, Items: c.items, ContextSHA256: c.ctxHash, Batch: c.batch,
		APIKey: c.apiKey, Result: c.result,
	}
	rec.Outcome, rec.Code = outcome(st)
	if st != nil {
		rec.Detail = auditDetail(err, st)
	} else {
		rec.Detail = c.detail
	}
	return rec
}

// allow checks the policy for the call's caller on key, and notes the key
// for the audit record.
func (s *Server) allow(ctx context.Context, op, key string) error {
	c := callFrom(ctx)
	if c.key == "" {
		c.key = key
	}
	if (strings.HasPrefix(op, "EnvelopeService.") || strings.HasPrefix(op, "CryptoService.")) && strings.HasPrefix(key, ReservedPrefix) {
		// keyward-credentials seals managed credentials: decrypting with it
		// would bypass GetCredential's policy and audit, whatever a glob
		// such as "*" grants; keyward-audit's MACs vouch for the audit log.
		return fmt.Errorf("%w: %q is one of keywardd's own keys, which no caller may use", policy.ErrDenied, key)
	}
	return s.policy.Load().Allow(subject(c.caller), op, key)
}

func subject(c *identity.Caller) policy.Subject {
	return policy.Subject{UID: c.UID, GIDs: append([]uint32{c.GID}, c.Groups...), Exe: c.Exe, ExeSHA256: c.ExeSHA256,
		Cgroup: c.Cgroup.Path, SystemdUnit: c.Cgroup.Unit, PodUID: c.Cgroup.PodUID, ContainerID: c.Cgroup.ContainerID}
}

// batchLimit is the largest batch the caller may send to op.
func (s *Server) batchLimit(ctx context.Context, op string) int {
	n := s.policy.Load().MaxBatch(subject(callFrom(ctx).caller), op)
	if n == 0 {
		n = s.cfg.DefaultBatch
	}
	return min(n, s.cfg.MaxBatch)
}

func checkBatch(n, limit int) error {
	switch {
	case n == 0:
		return fmt.Errorf("%w: an empty batch", errInvalid)
	case n > limit:
		return fmt.Errorf("%w: a batch of %d items; this caller may send at most %d", errInvalid, n, limit)
	}
	return nil
}
