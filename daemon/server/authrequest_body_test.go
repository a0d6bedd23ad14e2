package server

import (
	"bufio"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestAuthRequestRefusesBody: a request with a body is refused at once
// (400, the connection closed), not verified while its body trickles in.
func TestAuthRequestRefusesBody(t *testing.T) {
	srv := (&Server{cfg: Config{HandshakeTimeout: time.Second}}).AuthRequest()
	ln, err := net.Listen("unix", t.TempDir()+"/g.sock")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	c, err := net.Dial("unix", ln.Addr().String())
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
