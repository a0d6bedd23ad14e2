package daemon_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// BenchmarkAuthRequest measures one verification through keywardd's
// auth_request endpoint (gateway.http_socket), one request at a time, as
// nginx asks it: on a new connection each time (docs/gateways.md's
// configuration: the caller is identified and its connection counted for
// each request), and on one connection kept alive (an nginx upstream with
// keepalive), beside the VerifyAPIKey it stands for.
func BenchmarkAuthRequest(b *testing.B) {
	sock := filepath.Join(b.TempDir(), "gw", "http.sock")
	in := daemontest.Start(b, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Gateway.HTTPSocket.Path = sock
	}))
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	key, _ := benchAPIKeys(b, ac)
	b.Run("VerifyAPIKey", func(b *testing.B) {
		verify := benchVerify(ac, key)
		for b.Loop() {
			if err := verify(); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, keepAlive := range []bool{false, true} {
		name := "new-connection"
		if keepAlive {
			name = "keep-alive"
		}
		b.Run(name, func(b *testing.B) {
			c := &http.Client{Transport: &http.Transport{DisableKeepAlives: !keepAlive, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
			defer c.CloseIdleConnections()
			req, _ := http.NewRequest("GET", "http://keywardd"+server.AuthRequestPath, nil)
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set(server.HeaderEnvironment, "prod")
			req.Header.Set(server.HeaderPermission, "orders:read")
			req.Header.Set(server.HeaderRealIP, "192.0.2.1")
			for b.Loop() {
				resp, err := c.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
		})
	}
}
