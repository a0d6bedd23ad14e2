package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/keyward/keyward/daemon/admission"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/policy"
)

// peerCreds are gRPC transport credentials for the Unix socket: no
// encryption (the kernel carries the bytes), but every connection is
// identified by the kernel and counted against its caller's budget before
// a byte of it is read. The handshake knows the caller's uid from one
// system call: a uid that holds as many connections as it could ever be
// allowed is refused then, before /proc is read.
type peerCreds struct {
	s        *Server
	resolver *identity.Resolver
}

// AuthInfo is what a connection's calls know of their caller.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Caller *identity.Caller
	conn   *serverConn
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return "peercred" }

func (c *peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("keywardd serves Unix socket connections only")
	}
	sc, ai, uid, err := c.connect(uc)
	if errors.Is(err, admission.ErrOverBudget) {
		return nil, nil, c.refuse(conn, uid, err)
	}
	if err != nil {
		return nil, nil, err
	}
	return sc, ai, nil
}

// connect identifies a connection's caller and counts it against the
// caller's budget (the gRPC handshake's). An error over the caller's
// budget matches admission.ErrOverBudget; uid is the caller's once known.
func (c *peerCreds) connect(uc *net.UnixConn) (_ *serverConn, _ AuthInfo, uid uint32, err error) {
	a, err := c.admit(uc)
	if err != nil {
		return nil, AuthInfo{}, a.uid, err
	}
	sc, ai, err := c.identify(uc, a)
	return sc, ai, a.uid, err
}

// admitted is a connection whose slot is taken on its caller's uid.
type admitted struct {
	uid      uint32
	acct     *admission.Caller
	accepted time.Time
	pol      *policy.Policy
}

// admit is connect's first step, one system call and no more: a slot is
// taken on the uid alone, with the most any of its processes could hold,
// so that a uid at that many is refused before /proc is read, and no more
// of its connections than that are identified at once. The gateway
// endpoint takes it at accept, and identifies the caller (identify) on
// its first request, in the connection's own goroutine.
func (c *peerCreds) admit(uc *net.UnixConn) (admitted, error) {
	uid, err := identity.PeerUID(uc)
	if err != nil {
		return admitted{}, err
	}
	a := admitted{uid: uid, accepted: time.Now(), pol: c.s.policy.Load()}
	most, bindable := a.pol.MaxConnections(uid)
	a.acct, err = c.s.gate.Connect(uid, most, bindable)
	return a, err
}

// identify is connect's second step: the caller of a connection admit
// took a slot for, and its own budget. On an error the slot is given
// back.
func (c *peerCreds) identify(uc *net.UnixConn, a admitted) (*serverConn, AuthInfo, error) {
	caller, err := c.resolver.Identify(uc, a.accepted)
	if err != nil {
		a.acct.Disconnect()
		return nil, AuthInfo{}, err // over budget when its binaries were hashed
	}
	lim := &connLimits{pol: a.pol}
	lim.Limits, lim.bound = a.pol.Limits(subject(caller))
	if err := a.acct.Narrow(lim.Limits, lim.bound); err != nil {
		caller.Close()
		return nil, AuthInfo{}, err
	}
	sc := &serverConn{Conn: uc, caller: caller, acct: a.acct, writeTimeout: c.s.cfg.WriteTimeout, closed: make(chan struct{}),
		handshakeBy: a.accepted.Add(c.s.cfg.HandshakeTimeout)}
	sc.lim.Store(lim)
	if lim.Lifetime > 0 {
		sc.lifetime.Store(time.AfterFunc(lim.Lifetime, func() { sc.Close() }))
	}
	return sc, AuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		Caller:         caller,
		conn:           sc,
	}, nil
}

// refuse tells the client why its connection is refused, and returns err
// for gRPC to close the connection. A gRPC client learns nothing from a
// connection closed under it ("broken pipe") nor from a GOAWAY before its
// first call ("the connection is draining"): so the client's first call on
// the connection is answered with err's status (RESOURCE_EXHAUSTED, what
// budget it reached, and its details), as a trailers-only HTTP/2 response,
// before the GOAWAY. Nothing else of the connection is served: it is given
// refuseLinger to send its call and close. A uid that owes for its
// refusals (admission.Gate.Wait) is told only after that wait, maxTarpit
// at most: a client that reconnects at once whenever it is refused then
// waits instead of spinning. At most maxLingering refusals wait at once
// (beyond that they are closed at once), so that a flood of connections
// costs no more than a goroutine each, briefly.
func (c *peerCreds) refuse(conn net.Conn, uid uint32, err error) error {
	c.s.refused(err)
	if c.s.lingering.Add(1) > maxLingering {
		c.s.lingering.Add(-1)
		return err
	}
	defer c.s.lingering.Add(-1)
	time.Sleep(min(c.s.gate.Wait(uid), maxTarpit))
	conn.SetDeadline(time.Now().Add(refuseLinger))
	preface := make([]byte, len(http2.ClientPreface))
	if _, rerr := io.ReadFull(conn, preface); rerr != nil || string(preface) != http2.ClientPreface {
		return err
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = 16 << 10
	if fr.WriteSettings() != nil {
		return err
	}
	st := toStatus(err)
	var stream uint32
	for range 8 { // the client's SETTINGS and WINDOW_UPDATE come before its first call
		f, rerr := fr.ReadFrame()
		if rerr != nil {
			break
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			fr.WriteSettingsAck()
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			stream = h.StreamID
			var block bytes.Buffer
			enc := hpack.NewEncoder(&block)
			fields := [][2]string{{":status", "200"}, {"content-type", "application/grpc"},
				{"grpc-status", strconv.Itoa(int(st.Code()))}, {"grpc-message", grpcMessage(st.Message())}}
			if b, err := proto.Marshal(st.Proto()); err == nil && len(st.Details()) > 0 {
				fields = append(fields, [2]string{"grpc-status-details-bin", base64.RawStdEncoding.EncodeToString(b)})
			}
			for _, hf := range fields {
				enc.WriteField(hpack.HeaderField{Name: hf[0], Value: hf[1]})
			}
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true})
			break
		}
	}
	if fr.WriteGoAway(stream, http2.ErrCodeEnhanceYourCalm, []byte(st.Message())) == nil {
		if uc, ok := conn.(*net.UnixConn); ok {
			uc.CloseWrite()
		}
		io.Copy(io.Discard, io.LimitReader(conn, 64<<10))
	}
	return err
}

// How long, and how many at once, refused connections are given to hear
// why.
const (
	refuseLinger = 250 * time.Millisecond
	maxTarpit    = time.Second
	maxLingering = 256
)

// grpcMessage percent-encodes a status message for the grpc-message
// header, as the gRPC protocol asks (bytes outside printable ASCII, and %).
func grpcMessage(msg string) string {
	var b strings.Builder
	for i := range len(msg) {
		if c := msg[i]; c < 0x20 || c > 0x7e || c == '%' {
			fmt.Fprintf(&b, "%%%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// connLimits is a connection's caller's budget under one policy: worked
// out again after a reload.
type connLimits struct {
	pol *policy.Policy
	policy.Limits
	bound bool
}

// serverConn is a connection served: it gives up on a client that does not
// read what it is sent within writeTimeout, closes itself when its
// caller's budget gives connections a lifetime, and gives back the
// caller's pidfd and connection slot when it closes.
type serverConn struct {
	net.Conn
	caller       *identity.Caller
	acct         *admission.Caller
	writeTimeout time.Duration
	lim          atomic.Pointer[connLimits]
	lifetime     atomic.Pointer[time.Timer] // nil without a lifetime
	once         sync.Once
	closed       chan struct{}
	handshakeBy  time.Time // the handshake's deadline
}

// limits is the caller's budget under pol.
func (c *serverConn) limits(pol *policy.Policy) *connLimits {
	if l := c.lim.Load(); l.pol == pol {
		return l
	}
	l := &connLimits{pol: pol}
	l.Limits, l.bound = pol.Limits(subject(c.caller))
	c.lim.Store(l)
	return l
}

// Read waits first while the caller owes for calling over its budget
// (admission.Caller.Wait), or until the connection closes. Until the
// handshake's deadline (which gRPC sets on the connection underneath,
// where it does not bound this wait), a read that would wait past it
// fails as the handshake would have.
func (c *serverConn) Read(b []byte) (int, error) {
	for d := c.acct.Wait(); d > 0; d = c.acct.Wait() {
		late := false
		if left := time.Until(c.handshakeBy); left > 0 && d >= left {
			d, late = left, true
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-c.closed:
			t.Stop()
			return 0, net.ErrClosed
		}
		if late {
			return 0, os.ErrDeadlineExceeded
		}
	}
	return c.Conn.Read(b)
}

// Write gives up after writeTimeout, and then closes the connection: gRPC
// leaves closing it after a failed write to its reader, which a client
// that sends nothing more would keep waiting.
func (c *serverConn) Write(b []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
	n, err := c.Conn.Write(b)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.Close()
	}
	return n, err
}

func (c *serverConn) Close() error {
	c.once.Do(func() {
		close(c.closed)
		if t := c.lifetime.Load(); t != nil {
			t.Stop()
		}
		c.caller.Close()
		c.acct.Disconnect()
	})
	return c.Conn.Close()
}

func (c *peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("keywardd's credentials are for the server side")
}

func (c *peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c *peerCreds) Clone() credentials.TransportCredentials {
	return &peerCreds{s: c.s, resolver: c.resolver}
}

func (c *peerCreds) OverrideServerName(string) error { return nil }
