package server

import (
	"context"
	"errors"
	"net"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/keyward/keyward/daemon/identity"
)

// peerCreds are gRPC transport credentials for the Unix socket: no
// encryption (the kernel carries the bytes), but every connection is
// identified by the kernel before its first call.
type peerCreds struct {
	resolver *identity.Resolver
}

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
	caller, err := c.resolver.Identify(uc, time.Now())
	if err != nil {
		return nil, nil, err
	}
	return &closeNotify{Conn: conn, caller: caller}, AuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		Caller:         caller,
	}, nil
}

// closeNotify releases the caller's pidfd when the connection closes.
type closeNotify struct {
	net.Conn
	caller *identity.Caller
}

func (c *closeNotify) Close() error {
	c.caller.Close()
	return c.Conn.Close()
}

func (c *peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("keywardd's credentials are for the server side")
}

func (c *peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c *peerCreds) Clone() credentials.TransportCredentials { return &peerCreds{resolver: c.resolver} }

func (c *peerCreds) OverrideServerName(string) error { return nil }
