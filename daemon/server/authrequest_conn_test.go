package server

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestAuthRequestCountsAtAccept: a connection to the gateway endpoint is
// counted against its caller's connection budget when it is accepted,
// not at its first request: with the gateway's two connections open and
// silent, a third is refused (503, saying which budget) and closed, a
// silent one too; closing a silent connection gives its slot back.
func TestAuthRequestCountsAtAccept(t *testing.T) {
	uid := uint32(os.Getuid())
	pol := fmt.Sprintf(`version: 1
roles:
  gateway:
    limits: {connections: 2}
    permissions:
      - operations: [APIKeyService.VerifyAPIKey]
        keys: ["team-a"]
bindings:
  - role: gateway
    callers: [{uid: %d}]
`, uid)
	ts := newTestServer(t, pol)
	secret, _ := issue(t, ts, "team-a", "shop")
	sock := authRequestSocket(t, ts)
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(time.Minute))
		return c
	}
	ask := func(c net.Conn) (*http.Response, string) {
		t.Helper()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: keywardd\r\nX-API-Key: %s\r\n%s: live\r\n\r\n", AuthRequestPath, secret, HeaderEnvironment)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return resp, string(b)
	}
	waitHolds := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ts.s.gate.Holds(uid) != n; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the gateway holds %d connections, want %d", ts.s.gate.Holds(uid), n)
			}
		}
	}

	silent1, _ := dial(), dial()
	waitHolds(2)
	resp, body := ask(dial())
	var got map[string]any
	if resp.StatusCode != 503 || json.Unmarshal([]byte(body), &got) != nil || got["code"] != "resourceexhausted" ||
		!strings.Contains(fmt.Sprint(got["error"]), "connection") || !resp.Close {
		t.Fatalf("a third connection beside two silent ones: %d %s (close %v); want 503 over the connection budget, and closed", resp.StatusCode, body, resp.Close)
	}
	// One over the budget that says nothing is closed, not left open until
	// the request's header timeout.
	over := dial()
	if n, err := over.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("a silent connection over the budget: read %d, %v; want it closed (EOF)", n, err)
	}
	waitHolds(2)

	// A silent connection that closes gives its slot back.
	silent1.Close()
	waitHolds(1)
	if resp, body := ask(dial()); resp.StatusCode != 200 {
		t.Fatalf("after a silent connection closed: %d %s; want 200", resp.StatusCode, body)
	}
}
