package daemon_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
)

// This file speaks HTTP/2 to keywardd frame by frame, for what a gRPC
// library would not do: send a preface and then nothing, reset calls before
// they run, hold thousands of connections, flood.

const pingMethod = "/keyward.v1.StatusService/Ping"

// headerBlock is the HPACK block of a call's headers, encoded without the
// dynamic table (never-indexed literals) so that it can be sent on any
// connection, as any stream.
func headerBlock(method string) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", method},
		{":authority", "keywardd"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1], Sensitive: true})
	}
	return b.Bytes()
}

// greeting is what a raw client sends first: the preface and SETTINGS (a
// large window, so keywardd's answers never wait for one), and a large
// connection window.
func greeting() []byte {
	var b bytes.Buffer
	b.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	fr.WriteWindowUpdate(0, 1<<30)
	return b.Bytes()
}

// rawConn is an HTTP/2 client connection driven by hand.
type rawConn struct {
	net.Conn
	w    *bufio.Writer
	fr   *http2.Framer
	next uint32 // the next stream's ID
}

func newRaw(c net.Conn, next uint32) *rawConn {
	r := &rawConn{Conn: c, w: bufio.NewWriterSize(c, 8<<10), next: next}
	r.fr = http2.NewFramer(r.w, c)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return r
}

// dialRaw connects to sock and greets; the connection closes with the test.
func dialRaw(t testing.TB, sock string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := newRaw(c, 1)
	r.w.Write(greeting())
	if err := r.w.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

// call writes a call's headers and, if body, its empty request, which
// ends the client's side of the stream; Flush sends what was written.
func (r *rawConn) call(method string, body bool) uint32 {
	id := r.next
	r.next += 2
	r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: headerBlock(method), EndHeaders: true})
	if body {
		r.fr.WriteData(id, true, []byte{0, 0, 0, 0, 0})
	}
	return id
}

// ended is how a call on a raw connection ended.
type ended struct {
	stream uint32
	code   codes.Code
	msg    string
	reset  bool // keywardd reset the stream: no code, no message
}

// ended reads frames until a call ends (its trailers, or a reset); it
// fails at the end of the connection or a GOAWAY. It answers nothing (no
// SETTINGS or PING acknowledgement): the most a silent client does.
func (r *rawConn) ended() (ended, error) {
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			return ended{}, err
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if !f.StreamEnded() {
				continue
			}
			e := ended{stream: f.StreamID, code: codes.Unknown}
			for _, hf := range f.RegularFields() {
				switch hf.Name {
				case "grpc-status":
					n, _ := strconv.Atoi(hf.Value)
					e.code = codes.Code(n)
				case "grpc-message":
					e.msg, _ = url.PathUnescape(hf.Value)
				}
			}
			return e, nil
		case *http2.RSTStreamFrame:
			return ended{stream: f.StreamID, reset: true}, nil
		case *http2.GoAwayFrame:
			return ended{}, fmt.Errorf("GOAWAY %v: %s", f.ErrCode, f.DebugData())
		}
	}
}

// closedWithin reads (and drops) what keywardd sends until it closes the
// connection, and says whether it did within d.
func (r *rawConn) closedWithin(d time.Duration) bool {
	r.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, r.Conn)
	ne, timeout := err.(net.Error)
	return !(timeout && ne.Timeout())
}

// floodReport is what a hostile caller (flood) got.
type floodReport struct {
	Conns      int               // connections it opened and held
	DialErrors int               // connections it could not open
	Admitted   int               // held connections keywardd served
	Stalled    int               // held connections keywardd kept open without answering (the caller owed for its refusals)
	Refused    int               // held connections refused with a status saying why
	Closed     int               // held connections closed without a word (too many refusals waiting at once)
	Refusals   map[string]string // a refusal's message, by the budget it names
	Codes      map[string]int64  // how the flood's calls ended, by gRPC code
	Budgets    map[string]int64  // its RESOURCE_EXHAUSTED answers, by the budget named: connections, calls, rate
	Resets     int64             // calls reset by keywardd (over a connection's 32 streams)
	Reconnects int64
	Seconds    float64 // from its first connection to its report
}

// flood is a hostile caller (TestMain runs it with KEYWARD_TEST_FLOOD set to
// the socket). It opens KEYWARD_TEST_FLOOD_CONNS connections, each starting
// a Ping at once, and holds them; prints "holding" when it knows how each
// was answered; then, on every connection keywardd served, calls Ping as
// fast as it can (32 calls at a time, a connection's most), reconnecting at
// once whenever a connection is closed or refused, until its stdin closes;
// and prints its floodReport.
func flood(sock string) int {
	n, _ := strconv.Atoi(os.Getenv("KEYWARD_TEST_FLOOD_CONNS"))
	rep := floodReport{Conns: n, Codes: map[string]int64{}, Budgets: map[string]int64{}, Refusals: map[string]string{}}
	start := time.Now()
	var buf bytes.Buffer
	buf.Write(greeting())
	fr := http2.NewFramer(&buf, nil)
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: headerBlock(pingMethod), EndHeaders: true})
	fr.WriteData(1, true, []byte{0, 0, 0, 0, 0})
	opening := buf.Bytes()

	var held []net.Conn
	for range n {
		c, err := dialPersistently(sock)
		if err != nil {
			rep.DialErrors++
			continue
		}
		if _, err := c.Write(opening); err != nil {
			rep.Closed++
			c.Close()
			continue
		}
		held = append(held, c)
	}
	// How each was answered, read by 256 at once: a connection keywardd
	// keeps without answering is given 3 s from now (and a second at
	// least, for those read after that).
	var mu sync.Mutex
	var served []*rawConn
	deadline := time.Now().Add(3 * time.Second)
	next := make(chan net.Conn)
	var readers sync.WaitGroup
	for range 256 {
		readers.Go(func() {
			for c := range next {
				c.SetReadDeadline(later(deadline, time.Now().Add(time.Second)))
				r := newRaw(c, 3)
				e, err := r.ended()
				ne, timeout := err.(net.Error)
				mu.Lock()
				switch {
				case timeout && ne.Timeout():
					rep.Stalled++
					c.SetReadDeadline(time.Time{})
					served = append(served, r)
				case err != nil:
					rep.Closed++
					c.Close()
				case e.code == codes.ResourceExhausted:
					rep.Refused++
					rep.Refusals[budgetOf(e.msg)] = e.msg
					c.Close()
				default:
					rep.Admitted++
					c.SetReadDeadline(time.Time{})
					served = append(served, r)
				}
				mu.Unlock()
			}
		})
	}
	for _, c := range held {
		next <- c
	}
	close(next)
	readers.Wait()
	fmt.Printf("holding %d\n", len(served))

	var stopped atomic.Bool
	go func() { io.Copy(io.Discard, os.Stdin); stopped.Store(true) }()
	var resets, reconnects atomic.Int64
	count := func(e ended) {
		if e.reset {
			resets.Add(1)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		rep.Codes[e.code.String()]++
		if e.code == codes.ResourceExhausted {
			rep.Budgets[budgetOf(e.msg)]++
		}
	}
	var wg sync.WaitGroup
	for i := range max(len(served), 4) {
		var r *rawConn
		if i < len(served) {
			r = served[i]
		}
		wg.Go(func() {
			for !stopped.Load() {
				if r == nil {
					c, err := net.Dial("unix", sock)
					if err != nil {
						time.Sleep(time.Millisecond)
						continue
					}
					reconnects.Add(1)
					r = newRaw(c, 1)
					r.w.Write(greeting())
				}
				for range 32 {
					r.call(pingMethod, true)
				}
				r.SetDeadline(time.Now().Add(5 * time.Second))
				err := r.w.Flush()
				for i := 0; err == nil && i < 32; i++ {
					var e ended
					if e, err = r.ended(); err == nil {
						count(e)
					}
				}
				if err != nil {
					r.Close()
					r = nil
				}
			}
			if r != nil {
				r.Close()
			}
		})
	}
	wg.Wait()
	rep.Resets, rep.Reconnects, rep.Seconds = resets.Load(), reconnects.Load(), time.Since(start).Seconds()
	json.NewEncoder(os.Stdout).Encode(rep)
	return 0
}

// budgetOf names the budget a refusal's message is about.
func budgetOf(msg string) string {
	for phrase, budget := range map[string]string{" connections, ": "connections", " calls in flight, ": "calls", " call rate ": "rate", " after it was refused": "refusals"} {
		if strings.Contains(msg, phrase) {
			return budget
		}
	}
	return "other"
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// dialPersistently connects to sock, trying again for a second while the
// socket's queue of connections not yet accepted is full (EAGAIN).
func dialPersistently(sock string) (net.Conn, error) {
	for i := 0; ; i++ {
		c, err := net.Dial("unix", sock)
		if err == nil || !errors.Is(err, syscall.EAGAIN) || i == 1000 {
			return c, err
		}
		time.Sleep(time.Millisecond)
	}
}

// hostile is a flood running as nobody.
type hostile struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	stderr *bytes.Buffer
	held   string // its "holding" line
}

// startFlood runs a flood of conns connections as nobody from bin (see
// openToNobody), and returns once it holds them. It raises this process's
// limit of open files first, for the flood to inherit; if it cannot, the
// flood holds as many as the limit allows, and the test says so.
func startFlood(t testing.TB, bin, sock string, conns int) *hostile {
	t.Helper()
	var rl syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	if want := uint64(conns + 1024); rl.Cur < want {
		raised := syscall.Rlimit{Cur: max(want, rl.Max), Max: max(want, rl.Max)}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			conns = int(rl.Max) - 1024
			t.Logf("cannot raise the limit of open files to %d (%v): the flood holds %d connections", want, err, conns)
			rl.Cur = rl.Max
			syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
		}
	}
	h := &hostile{cmd: asNobody(bin, "KEYWARD_TEST_FLOOD="+sock, fmt.Sprintf("KEYWARD_TEST_FLOOD_CONNS=%d", conns)), stderr: &bytes.Buffer{}}
	h.cmd.Stderr = h.stderr
	h.stdin, _ = h.cmd.StdinPipe()
	stdout, _ := h.cmd.StdoutPipe()
	h.out = bufio.NewReader(stdout)
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.cmd.Process.Kill(); h.cmd.Wait() })
	line, err := h.out.ReadString('\n')
	if !strings.HasPrefix(line, "holding ") {
		t.Fatalf("the flood did not start: %q, %v; stderr: %s", line, err, h.stderr)
	}
	h.held = strings.TrimSpace(line)
	return h
}

// stop ends the flood and returns its report.
func (h *hostile) stop(t testing.TB) floodReport {
	t.Helper()
	h.stdin.Close()
	var rep floodReport
	if err := json.NewDecoder(h.out).Decode(&rep); err != nil {
		t.Fatalf("the flood's report: %v; stderr: %s", err, h.stderr)
	}
	h.cmd.Wait()
	return rep
}
