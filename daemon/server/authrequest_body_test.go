package server

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// TestAuthRequestRefusesBody: a request with a body is refused at once
// (400, the connection closed), not verified while its body trickles in.
func TestAuthRequestRefusesBody(t *testing.T) {
	ts := newTestServer(t, withAdmin("", fmt.Sprintf("  - role: admin\n    callers: [{uid: %d}]\n", os.Getuid())))
	c, err := net.Dial("unix", authRequestSocket(t, ts))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// 3 bytes of a 1 000-byte body: the answer comes without the rest.
	c.Write([]byte("POST /verify HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer kw_x\r\nContent-Length: 1000\r\n\r\nabc"))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 400 || !resp.Close {
		t.Fatalf("a request with a body: %d, close %v; want 400 and the connection closed", resp.StatusCode, resp.Close)
	}
}
