package server

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/keyward/keyward/daemon/identity"
)

// peerCreds are gRPC transport credentials for the Unix socket: no
// encryption (the kernel carries the bytes), but every connection is
// identified by the kernel before its first call.
type peerCreds struct {
	resolver *identity.Resolver
	// open counts connections; past MaxConnections new ones are refused,
	// so that a flood of them (each holds a pidfd and buffers) cannot
	// exhaust the daemon before any policy check.
	open *atomic.Int64
}

// MaxConnections bounds the connections served at once.
const MaxConnections = 512

// AuthInfo is what a connection's calls know of their caller.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Caller *identity.Caller
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return "peercred" }

func (c *peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("keywardd serves Unix socket connections only")
	}
	if c.open.Add(1) > MaxConnections {
		c.open.Add(-1)
		return nil, nil, errors.New("keywardd: too many connections")
	}
	caller, err := c.resolver.Identify(uc, time.Now())
	if err != nil {
		c.open.Add(-1)
		return nil, nil, err
	}
	return &closeNotify{Conn: conn, caller: caller, open: c.open}, AuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		Caller:         caller,
	}, nil
}

// closeNotify releases the caller's pidfd and its connection slot when the
// connection closes.
type closeNotify struct {
	net.Conn
	caller *identity.Caller
	open   *atomic.Int64
	once   sync.Once
}

func (c *closeNotify) Close() error {
	c.once.Do(func() {
		c.caller.Close()
		c.open.Add(-1)
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
	return &peerCreds{resolver: c.resolver, open: c.open}
}

func (c *peerCreds) OverrideServerName(string) error { return nil }
