package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"

	"github.com/keyward/keyward/daemon/api/gateway"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/identity"
)

// The gateway endpoint for nginx's auth_request (docs/gateways.md#nginx):
// what it reads of a request, where, and the header it adds to a refusal.
const (
	// AuthRequestPath is where the endpoint answers, for any method.
	AuthRequestPath = "/verify"
	// HeaderEnvironment and HeaderPermission are set by the gateway's
	// configuration for each of its locations: the environment the key
	// must be for, and the permissions it must hold (comma-separated, or
	// the header repeated).
	HeaderEnvironment = "X-Keyward-Environment"
	HeaderPermission  = "X-Keyward-Permission"
	// HeaderRealIP is the client's address, which the gateway sets: it is
	// trusted because the caller is the gateway, identified by the kernel
	// and bound by the policy, and only the socket's caller sets it.
	HeaderRealIP = "X-Real-IP"
	// HeaderAPIKey holds the key itself when Authorization has no
	// "Bearer KEY".
	HeaderAPIKey = "X-API-Key"
	// HeaderBody repeats a refusal's JSON body in a header: nginx's
	// auth_request keeps a subrequest's headers, never its body, and its
	// configuration answers the client with it.
	HeaderBody = "Keyward-Body"
)

// AuthRequest is keywardd's HTTP server for gateways that ask a URL
// whether to admit a request (nginx's auth_request), to be served on a
// Unix socket: each request there is a VerifyAPIKey call by the
// connection's caller, whom the kernel names (SO_PEERCRED) as for the gRPC
// socket, counted against the same budget, allowed by the same policy and
// audited alike (intercept and VerifyAPIKey themselves serve it). Its
// answer is gateway.AnswerOf's: 200 with Keyward-Key-Id, Keyward-Owner and
// the RateLimit-* headers, or 401, 403 or 429 with their headers, the JSON
// body and the body again in Keyward-Body. A call keywardd does not
// answer with a verdict (the gateway over its budget, not allowed
// VerifyAPIKey, or the audit log unwritable) is 503 or 500 with a JSON
// body saying why: the gateway fails closed.
func (s *Server) AuthRequest() *http.Server {
	a := &authRequest{s: s, resolver: identity.NewResolver()}
	a.resolver.Hashing = s.gate.Hash
	mux := http.NewServeMux()
	mux.Handle(AuthRequestPath, a)
	// ReadTimeout as well as ReadHeaderTimeout: a request with a body
	// (refused) must not hold its connection while it trickles in.
	return &http.Server{Handler: mux, ReadHeaderTimeout: s.cfg.HandshakeTimeout, ReadTimeout: s.cfg.HandshakeTimeout, WriteTimeout: s.cfg.WriteTimeout,
		IdleTimeout: s.cfg.IdleTimeout, MaxHeaderBytes: 16 << 10,
		ConnContext: a.accept,
		ConnState:   a.connState,
	}
}

type authRequest struct {
	s        *Server
	resolver *identity.Resolver
	conns    sync.Map // net.Conn → *gatewayConn holding a slot
}

// gatewayConn is a connection to the endpoint. It is counted against its
// caller's budget at accept (peerCreds.admit: its uid, one system call,
// in the accept loop), and its caller identified on its first request
// (peerCreds.identify, in the connection's own goroutine: reading /proc
// and hashing a binary must not hold up the accept loop).
type gatewayConn struct {
	raw  net.Conn
	once sync.Once
	mu   sync.Mutex
	adm  admitted // adm.acct nil once the slot is given back or identified
	ai   AuthInfo // ai.conn set once identified
	err  error
}

type gatewayConnKey struct{}

// accept counts a new connection against its caller's uid's budget. One
// over it is closed after refuseLinger: a request sent at once is told
// why (503), a silent connection holds nothing longer than that.
func (a *authRequest) accept(ctx context.Context, c net.Conn) context.Context {
	gc := &gatewayConn{raw: c}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		gc.err = errors.New("keywardd serves its gateway endpoint on a Unix socket only")
	} else if gc.adm, gc.err = (&peerCreds{s: a.s, resolver: a.resolver}).admit(uc); gc.err == nil {
		a.conns.Store(c, gc)
	}
	if gc.err != nil {
		a.s.refused(gc.err)
		time.AfterFunc(refuseLinger, func() { c.Close() })
	}
	return context.WithValue(ctx, gatewayConnKey{}, gc)
}

// connState gives back a closed connection's slot and its caller's pidfd.
func (a *authRequest) connState(c net.Conn, st http.ConnState) {
	if st != http.StateClosed && st != http.StateHijacked {
		return
	}
	if v, ok := a.conns.LoadAndDelete(c); ok {
		gc := v.(*gatewayConn)
		gc.mu.Lock()
		defer gc.mu.Unlock()
		switch {
		case gc.ai.conn != nil:
			gc.ai.conn.Close()
		case gc.adm.acct != nil:
			gc.adm.acct.Disconnect()
		}
		gc.adm.acct = nil
	}
}

// identify is the connection's caller, identified on its first request.
func (a *authRequest) identify(gc *gatewayConn) (AuthInfo, error) {
	gc.once.Do(func() {
		if gc.err != nil {
			return // refused at accept
		}
		gc.mu.Lock()
		defer gc.mu.Unlock()
		if gc.adm.acct == nil {
			gc.err = fmt.Errorf("%w: the connection is closing", errUnavailable)
			return
		}
		// peerCreds' second step without its refusal, which speaks HTTP/2.
		pc := &peerCreds{s: a.s, resolver: a.resolver}
		_, gc.ai, gc.err = pc.identify(gc.raw.(*net.UnixConn), gc.adm)
		gc.adm.acct = nil // the serverConn's now, or given back
		if gc.err != nil {
			a.s.refused(gc.err)
		}
	})
	return gc.ai, gc.err
}

func (a *authRequest) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != 0 || len(r.TransferEncoding) > 0 {
		// auth_request sends none (proxy_pass_request_body off): a body
		// is not a gateway's question, and reading it would hold the
		// connection.
		w.Header().Set("Connection", "close")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		w.Write(gateway.JSON(map[string]any{"error": "the request has a body; keywardd's gateway endpoint takes none (proxy_pass_request_body off)"}))
		return
	}
	conn := r.Context().Value(gatewayConnKey{}).(*gatewayConn)
	ai, err := a.identify(conn)
	if err != nil {
		w.Header().Set("Connection", "close")
		a.fail(w, err)
		return
	}
	// As the gRPC socket's reads do: a caller that owes for its refusals
	// waits, then the call is counted against its budget (admit).
	if d := ai.conn.acct.Wait(); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			// Never an empty 200, which auth_request takes as admit.
			w.Header().Set("Connection", "close")
			a.fail(w, fmt.Errorf("%w: the request ended while the gateway waited for its budget", errUnavailable))
			return
		}
	}
	lim := ai.conn.limits(a.s.policy.Load())
	end, err := ai.conn.acct.Call(lim.Limits, lim.bound)
	if err != nil {
		a.s.refused(err)
		a.fail(w, err)
		return
	}
	defer end()
	req := &keywardv1.VerifyAPIKeyRequest{
		Key:         gateway.Key(r.Header, "Authorization"),
		Environment: r.Header.Get(HeaderEnvironment),
		Permissions: permissions(r.Header.Values(HeaderPermission)),
		SourceIp:    r.Header.Get(HeaderRealIP),
	}
	if req.Key == "" {
		req.Key = r.Header.Get(HeaderAPIKey)
	}
	ctx := peer.NewContext(r.Context(), &peer.Peer{Addr: conn.raw.RemoteAddr(), AuthInfo: ai})
	ctx = context.WithValue(ctx, endKey{}, end)
	resp, err := a.s.intercept(ctx, req, &grpc.UnaryServerInfo{FullMethod: keywardv1.APIKeyService_VerifyAPIKey_FullMethodName},
		func(ctx context.Context, req any) (any, error) {
			// On record as the gateway's, apart from a VerifyAPIKey over gRPC.
			callFrom(ctx).detail = "through the auth_request endpoint (gateway.http_socket)"
			return a.s.VerifyAPIKey(ctx, req.(*keywardv1.VerifyAPIKeyRequest))
		})
	if err != nil {
		a.fail(w, err)
		return
	}
	v := resp.(*keywardv1.VerifyAPIKeyResponse)
	ans := gateway.AnswerOf(v, a.s.cfg.Now())
	if req.Key == "" {
		// Asked all the same, so that it is on record.
		ans = gateway.NoKey("Authorization or " + HeaderAPIKey)
	}
	for k, vs := range ans.Header {
		w.Header()[k] = vs
	}
	if ans.Status == 0 {
		w.Header().Set(gateway.HeaderKeyID, v.GetKeyId())
		w.Header().Set(gateway.HeaderOwner, v.GetOwner())
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set(HeaderBody, strings.TrimSpace(string(ans.Body)))
	w.WriteHeader(ans.Status)
	w.Write(ans.Body)
}

// fail answers a call that got no verdict: 503 when keywardd or the
// gateway's budget may let it through later, 400 for a request the
// gateway's configuration got wrong, 500 otherwise (the gateway is not
// allowed to verify keys).
func (a *authRequest) fail(w http.ResponseWriter, err error) {
	st := toStatus(err)
	code := http.StatusInternalServerError
	switch st.Code() {
	case codes.Unavailable, codes.ResourceExhausted:
		code = http.StatusServiceUnavailable
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(gateway.JSON(map[string]any{"error": "keywardd did not verify the API key: " + st.Message(), "code": strings.ToLower(st.Code().String())}))
}

// permissions are the values of X-Keyward-Permission, each a list
// separated by commas.
func permissions(vs []string) []string {
	var out []string
	for _, v := range vs {
		for p := range strings.SplitSeq(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}
