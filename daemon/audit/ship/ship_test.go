package ship_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/audit/ship"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

// testLog is a real audit log on a SoftHSM2 token, with a checkpoint every
// 10 records.
type testLog struct {
	*audit.Log
	h    *hsm.HSM
	path string
	n    int
}

func newLog(t testing.TB) *testLog {
	t.Helper()
	h, _ := hsmtest.Open(t)
	key := hsm.KeyID{Name: audit.KeyName, Version: 1}
	if err := h.CreateKey(context.Background(), key, hsm.HMACSHA256); err != nil {
		t.Fatal(err)
	}
	return openLog(t, h)
}

// openLog opens a new log MACed by h's key.
func openLog(t testing.TB, h *hsm.HSM) *testLog {
	t.Helper()
	key := hsm.KeyID{Name: audit.KeyName, Version: 1}
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, h, key, audit.Options{CheckpointEvery: 10, CheckpointInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return &testLog{Log: l, h: h, path: path}
}

// add appends n records of op.
func (l *testLog) add(t testing.TB, n int, op string) {
	t.Helper()
	for range n {
		l.n++
		r := audit.Record{Time: time.Unix(1800000000+int64(l.n), 0).UTC(), Caller: audit.Caller{UID: 1000, GID: 1000, Exe: "/usr/bin/app"},
			Op: op, Key: "orders", Version: 1, Outcome: "ok", Detail: strings.Repeat("x", 200)}
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
}

// start runs a Shipper for sinks on l until the test ends (or stop).
func start(t testing.TB, l *testLog, state string, sinks ...ship.SinkConfig) (*ship.Shipper, func()) {
	t.Helper()
	s, err := ship.New(sinks, ship.Options{LogPath: l.path, Size: func() int64 { return l.State().Size }, StateDir: state,
		Poll: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
			s.Close()
		}
	}
	t.Cleanup(stop)
	return s, stop
}

// eventually polls cond until it holds, or fails the test after 30 s.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 30s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// caughtUp waits until every sink has shipped the whole log, a last
// checkpoint included.
func caughtUp(t testing.TB, l *testLog, s *ship.Shipper) {
	t.Helper()
	eventually(t, "the sinks catch up with the log", func() bool {
		st := l.State()
		if st.LastCheckpointSeq != st.LastSeq {
			return false
		}
		for _, k := range s.Status() {
			if k.LagBytes != 0 || k.Seq != st.LastSeq {
				return false
			}
		}
		return true
	})
}

func received(t testing.TB, r io.Reader, mac audit.MACer, o ...audit.ReceivedOptions) audit.Received {
	t.Helper()
	var opts audit.ReceivedOptions
	if len(o) > 0 {
		opts = o[0]
	}
	rep, err := audit.VerifyReceivedWith(context.Background(), r, mac, opts)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func receivedFile(t testing.TB, path string, mac audit.MACer, o ...audit.ReceivedOptions) audit.Received {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return received(t, f, mac, o...)
}

// receiver is an HTTP receiver for a SIEM: it keeps every batch it
// acknowledges, and answers 503 while down.
type receiver struct {
	mu      sync.Mutex
	got     bytes.Buffer
	batches int
	down    atomic.Bool
	failed  atomic.Int64
	token   string
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if rc.down.Load() {
		rc.failed.Add(1)
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	if r.Header.Get("Content-Type") != "application/x-ndjson" || rc.token != "" && r.Header.Get("Authorization") != "Bearer "+rc.token {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	rc.mu.Lock()
	rc.got.Write(b)
	rc.batches++
	rc.mu.Unlock()
}

func (rc *receiver) bytes() []byte {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return bytes.Clone(rc.got.Bytes())
}

// downtime is how long TestHTTPReceiverDown keeps its receiver down: the
// issue's minute with -args -ship.downtime 1m.
var downtime = flag.Duration("ship.downtime", 2*time.Second, "how long TestHTTPReceiverDown's receiver is down")

// TestHTTPReceiverDown: a SIEM down for a while (answering 503, or not
// listening at all) while calls go on, and then up again: with
// on_failure: spool every Append returns meanwhile, the sink lags, alerts
// past its bound, and once the receiver is back delivers everything, in
// order, each record at least once.
func TestHTTPReceiverDown(t *testing.T) {
	for _, mode := range []string{"503", "not listening"} {
		t.Run(mode, func(t *testing.T) {
			l := newLog(t)
			rc := &receiver{token: "siem-token"}
			srv := httptest.NewServer(rc)
			defer func() { srv.Close() }()
			srv.URL += "/in?token=in-the-query" // kept out of errors and logs
			tokenFile := filepath.Join(t.TempDir(), "token")
			os.WriteFile(tokenFile, []byte(rc.token+"\n"), 0o600)
			s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "siem", Type: ship.TypeHTTP, URL: srv.URL, BearerTokenFile: tokenFile, MaxLagBytes: ship.MinLag})

			l.add(t, 30, "EnvelopeService.Decrypt")
			caughtUp(t, l, s)

			addr := srv.Listener.Addr().String()
			if mode == "503" {
				rc.down.Store(true)
			} else {
				srv.Close()
			}
			// Calls go on while the receiver is down: each Append returns
			// (none waits for the sink), 200 a second.
			for end := time.Now().Add(*downtime); time.Now().Before(end); {
				l.add(t, 1, "EnvelopeService.Encrypt")
				time.Sleep(5 * time.Millisecond)
			}
			why := "503"
			if mode != "503" {
				why = "connection refused"
			}
			eventually(t, "the sink fails, lags past its bound and is not blocking", func() bool {
				st := s.Status()[0]
				return st.State == "failing" && st.OverBound && st.LagBytes > ship.MinLag && st.Failures > 0 && strings.Contains(st.LastError, why)
			})
			if err := s.Blocked(); err != nil {
				t.Fatalf("a spooling sink blocks: %v", err)
			}
			if e := s.Status()[0].LastError; strings.Contains(e, "in-the-query") || !strings.Contains(e, "/in") {
				t.Errorf("the error names the URL's query, or not its path: %s", e)
			}
			if mode == "503" {
				rc.down.Store(false)
			} else {
				ln, err := net.Listen("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				srv = httptest.NewUnstartedServer(rc)
				srv.Listener.Close()
				srv.Listener = ln
				srv.Start()
			}
			caughtUp(t, l, s)
			st := s.Status()[0]
			if st.OverBound || st.State == "failing" || st.LastError != "" || st.Shipped != uint64(l.n) {
				t.Errorf("after the receiver came back: %+v", st)
			}
			rep := received(t, bytes.NewReader(rc.bytes()), l.h)
			if !rep.OK() || rep.FirstSeq != 1 || rep.LastSeq != l.State().LastSeq || rep.Records != uint64(l.n) || rep.Unverified != 0 {
				t.Errorf("what the receiver got: %+v", rep)
			}
			if mode == "503" && rc.failed.Load() == 0 {
				t.Error("the receiver never answered 503")
			}
		})
	}
}

// TestBlockPolicy: a sink with on_failure: block whose receiver is down
// makes keywardd refuse calls (Blocked) once it lags past its bound, and
// serve again once the receiver is back and the sink has caught up.
func TestBlockPolicy(t *testing.T) {
	l := newLog(t)
	rc := &receiver{}
	srv := httptest.NewServer(rc)
	defer srv.Close()
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "siem", Type: ship.TypeHTTP, URL: srv.URL, OnFailure: ship.Block, MaxLagBytes: ship.MinLag})
	var notified atomic.Int64
	s.SetNotify(func() { notified.Add(1) })
	rc.down.Store(true)
	l.add(t, 100, "EnvelopeService.Decrypt") // under 64 KiB: calls are served
	if err := s.Blocked(); err != nil {
		t.Fatalf("blocked under the bound: %v", err)
	}
	l.add(t, 200, "EnvelopeService.Decrypt")
	eventually(t, "the sink blocks", func() bool { return s.Blocked() != nil && notified.Load() > 0 })
	err := s.Blocked()
	if !errors.Is(err, ship.ErrBlocked) || !strings.Contains(err.Error(), `"siem"`) || !strings.Contains(err.Error(), "503") {
		t.Errorf("Blocked: %v", err)
	}
	rc.down.Store(false)
	eventually(t, "the sink unblocks", func() bool { return s.Blocked() == nil })
	caughtUp(t, l, s)
	if rep := received(t, bytes.NewReader(rc.bytes()), l.h); !rep.OK() || rep.Records != 300 {
		t.Errorf("what the receiver got: %+v", rep)
	}
}

// TestFilter: a sink that leaves out verifications ships a stub for each,
// with nothing of its content; the stream verifies as complete except
// what was filtered. The local log keeps everything.
func TestFilter(t *testing.T) {
	l := newLog(t)
	out := filepath.Join(t.TempDir(), "shipped.jsonl")
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "siem", Type: ship.TypeFile, Path: out, ExcludeOps: []string{"APIKeyService.Verify*"}})
	for range 5 {
		l.add(t, 3, "APIKeyService.VerifyAPIKey")
		l.add(t, 2, "APIKeyService.CreateAPIKey")
	}
	caughtUp(t, l, s)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("VerifyAPIKey")) || bytes.Contains(b, []byte("/usr/bin/app")) && bytes.Count(b, []byte("/usr/bin/app")) != 10 {
		t.Errorf("the filtered records' content was shipped")
	}
	rep := receivedFile(t, out, l.h, audit.ReceivedOptions{Filtered: true})
	if !rep.OK() || rep.Filtered != 15 || rep.Records != 10 || rep.Unverified != 0 {
		t.Errorf("%+v", rep)
	}
	if rep := receivedFile(t, out, l.h); rep.OK() || rep.Filtered != 15 {
		t.Errorf("stubs pass with the sink not said to filter: %+v", rep)
	}
	if st := s.Status()[0]; st.Filtered != 15 || st.Shipped != 10 {
		t.Errorf("%+v", st)
	}
	local := receivedFile(t, l.path, l.h)
	if local.Records != 25 || local.Filtered != 0 {
		t.Errorf("the local log: %+v", local)
	}
}

// TestRestartResume: a sink stopped and started again goes on from its
// cursor: nothing shipped twice after a clean stop, nothing lost.
func TestRestartResume(t *testing.T) {
	l := newLog(t)
	out := filepath.Join(t.TempDir(), "shipped.jsonl")
	state := t.TempDir()
	cfg := ship.SinkConfig{Name: "archive", Type: ship.TypeFile, Path: out}
	s, stop := start(t, l, state, cfg)
	l.add(t, 25, "EnvelopeService.Decrypt")
	caughtUp(t, l, s)
	stop()
	l.add(t, 25, "EnvelopeService.Decrypt") // while shipping is stopped
	s, _ = start(t, l, state, cfg)
	caughtUp(t, l, s)
	rep := receivedFile(t, out, l.h)
	if !rep.OK() || rep.Records != 50 || rep.Duplicates != 0 || rep.FirstSeq != 1 {
		t.Errorf("%+v", rep)
	}
}

// TestCursorOfAnotherLog: a cursor that does not match the log (the log
// moved aside and a new chain started) ships the new log from its start.
func TestCursorOfAnotherLog(t *testing.T) {
	state := t.TempDir()
	other := newLog(t)
	s, stop := start(t, other, state, ship.SinkConfig{Name: "archive", Type: ship.TypeFile, Path: filepath.Join(t.TempDir(), "old.jsonl")})
	other.add(t, 40, "EnvelopeService.Decrypt")
	caughtUp(t, other, s)
	stop()

	l := openLog(t, other.h)
	l.add(t, 45, "EnvelopeService.Encrypt")
	out := filepath.Join(t.TempDir(), "new.jsonl")
	s, _ = start(t, l, state, ship.SinkConfig{Name: "archive", Type: ship.TypeFile, Path: out})
	caughtUp(t, l, s)
	if rep := receivedFile(t, out, l.h); !rep.OK() || rep.FirstSeq != 1 || rep.Records != 45 {
		t.Errorf("%+v", rep)
	}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		sink ship.SinkConfig
		want string
	}{
		{ship.SinkConfig{Type: "file", Path: "/x"}, "name is required"},
		{ship.SinkConfig{Name: "a/b", Type: "file", Path: "/x"}, "it names a file"},
		{ship.SinkConfig{Name: "a", Type: "kafka"}, `type "kafka": syslog, file or http`},
		{ship.SinkConfig{Name: "a", Type: "file"}, "path is required"},
		{ship.SinkConfig{Name: "a", Type: "file", Path: "rel"}, "path must be an absolute path"},
		{ship.SinkConfig{Name: "a", Type: "file", Path: "/x", OnFailure: "drop"}, `on_failure "drop"`},
		{ship.SinkConfig{Name: "a", Type: "file", Path: "/x", MaxLagBytes: 100}, "at least 65536"},
		{ship.SinkConfig{Name: "a", Type: "file", Path: "/x", ExcludeOps: []string{"["}}, "not a glob"},
		{ship.SinkConfig{Name: "a", Type: "syslog", Network: "udp"}, `network "udp"`},
		{ship.SinkConfig{Name: "a", Type: "syslog", Network: "tcp", Address: "nohost"}, "host:port"},
		{ship.SinkConfig{Name: "a", Type: "syslog", Facility: "kernel"}, `facility "kernel"`},
		{ship.SinkConfig{Name: "a", Type: "syslog", Network: "tcp", Address: "h:514", CAFile: "/ca"}, "for network: tls"},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "ftp://x"}, "http:// or https://"},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "ftp://user:s3cret@x/p?token=s3cret"}, `url "ftp://x/p": an http:// or https://`},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "http://user:s3cret@siem.example/x?token=s3cret", BearerTokenFile: "/t"}, `url "http://siem.example/x": a bearer token is sent over https only`},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "https://x/%zz?token=s3cret"}, "not shown: it does not parse"},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "http://siem.example/x", BearerTokenFile: "/t"}, "over https only"},
		{ship.SinkConfig{Name: "a", Type: "http", URL: "https://siem.example/x", CertFile: "/c"}, "go together"},
	} {
		err := ship.Check([]ship.SinkConfig{tc.sink})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.sink, err, tc.want)
		} else if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%+v: the URL's secret in the error: %v", tc.sink, err)
		}
	}
	two := []ship.SinkConfig{{Name: "a", Type: "file", Path: "/x"}, {Name: "a", Type: "file", Path: "/y"}}
	if err := ship.Check(two); err == nil || !strings.Contains(err.Error(), "a second sink") {
		t.Errorf("two sinks named a: %v", err)
	}
	good := []ship.SinkConfig{{Name: "siem", Type: "http", URL: "https://siem.example/x", BearerTokenFile: "/t", OnFailure: "block"},
		{Name: "local", Type: "syslog"}, {Name: "remote", Type: "syslog", Network: "tls", Address: "logs.example:6514", CAFile: "/ca"}}
	if err := ship.Check(good); err != nil {
		t.Error(err)
	}
}

// TestFileMovedAway: a file sink's file moved away (logrotate without
// copytruncate) is noticed at the next batch, which goes to a new file at
// the path; the two files together are the whole log.
func TestFileMovedAway(t *testing.T) {
	l := newLog(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "shipped.jsonl")
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "archive", Type: ship.TypeFile, Path: out})
	l.add(t, 20, "EnvelopeService.Decrypt")
	caughtUp(t, l, s)
	if err := os.Rename(out, out+".1"); err != nil {
		t.Fatal(err)
	}
	l.add(t, 20, "EnvelopeService.Decrypt")
	caughtUp(t, l, s)
	old, _ := os.ReadFile(out + ".1")
	cur, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if rep := received(t, bytes.NewReader(cur), l.h); rep.FirstSeq <= 20 || rep.Records != 20 {
		t.Errorf("the new file: %+v", rep)
	}
	if rep := received(t, bytes.NewReader(append(old, cur...)), l.h); !rep.OK() || rep.Records != 40 || rep.FirstSeq != 1 {
		t.Errorf("both files: %+v", rep)
	}
}

// TestHTTPSClientCertificate: an https receiver that trusts its test CA's
// client certificates only: the sink with one delivers, the sink without
// fails and lags.
func TestHTTPSClientCertificate(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := testPKI(t, dir)
	caPEM, _ := os.ReadFile(caFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	rc := &receiver{}
	srv := httptest.NewUnstartedServer(rc)
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	srv.StartTLS()
	defer srv.Close()
	serverCA := filepath.Join(dir, "server-ca.pem")
	os.WriteFile(serverCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600)

	l := newLog(t)
	s, _ := start(t, l, t.TempDir(),
		ship.SinkConfig{Name: "mtls", Type: ship.TypeHTTP, URL: srv.URL, CAFile: serverCA, CertFile: certFile, KeyFile: keyFile},
		ship.SinkConfig{Name: "no-cert", Type: ship.TypeHTTP, URL: srv.URL, CAFile: serverCA},
		ship.SinkConfig{Name: "wrong-name", Type: ship.TypeHTTP, URL: srv.URL, CAFile: serverCA, CertFile: certFile, KeyFile: keyFile, ServerName: "other.example"})
	l.add(t, 25, "KeyService.CreateKey")
	eventually(t, "the sink with a certificate delivers, the others fail", func() bool {
		st := s.Status()
		return st[0].Seq == l.State().LastSeq && l.State().LastCheckpointSeq == l.State().LastSeq && st[1].State == "failing" && st[1].Seq == 0 &&
			st[2].State == "failing" && st[2].Seq == 0 && strings.Contains(st[2].LastError, "certificate is valid for") && strings.Contains(st[2].LastError, "not other.example")
	})
	if rep := received(t, bytes.NewReader(rc.bytes()), l.h); !rep.OK() || rep.Records != 25 || rep.Unverified != 0 {
		t.Errorf("%+v", rep)
	}
}

// TestFileMode: a file sink's file is 0600, also one that was there with
// another mode; a symbolic link at the path is refused, not followed, and
// the sink says so until the path names a file.
func TestFileMode(t *testing.T) {
	l := newLog(t)
	dir := t.TempDir()
	open := filepath.Join(dir, "was-0644.jsonl")
	if err := os.WriteFile(open, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	readable := filepath.Join(dir, "world-readable.jsonl")
	if err := os.WriteFile(readable, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.jsonl")
	if err := os.Symlink(readable, link); err != nil {
		t.Fatal(err)
	}
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "was-0644", Type: ship.TypeFile, Path: open},
		ship.SinkConfig{Name: "link", Type: ship.TypeFile, Path: link})
	l.add(t, 5, "EnvelopeService.Decrypt")
	eventually(t, "the sink of the link fails", func() bool {
		return strings.Contains(s.Status()[1].LastError, "link.jsonl is a symbolic link, which the file sink does not follow")
	})
	eventually(t, "the other sink catches up", func() bool { return s.Status()[0].Seq == l.State().LastSeq })
	if fi, err := os.Stat(open); err != nil || fi.Mode().Perm() != 0o600 || fi.Size() == 0 {
		t.Errorf("the file that was 0644: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(readable); err != nil || fi.Mode().Perm() != 0o644 || fi.Size() != 0 {
		t.Errorf("the link's target was written to or changed: %v %v", fi.Mode(), err)
	}
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	caughtUp(t, l, s)
	if fi, err := os.Lstat(link); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Errorf("the file made where the link was: %v %v", fi.Mode(), err)
	}
}
