package ship_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/audit/ship"
)

// rsyslogd is a real rsyslogd (Debian's rsyslog; make deps installs it)
// run by a test with a configuration of its own in a temporary directory.
type rsyslogd struct {
	dir  string
	stop func()
}

// startRsyslog runs rsyslogd with conf (DIR in it is the test's
// directory) until the test ends, and waits for the files it listens on
// (wait, relative to DIR) to appear.
func startRsyslog(t *testing.T, conf string, wait ...string) *rsyslogd {
	t.Helper()
	bin, err := exec.LookPath("rsyslogd")
	if err != nil {
		if bin, err = exec.LookPath("/usr/sbin/rsyslogd"); err != nil {
			t.Fatal("rsyslogd is not installed: run make deps (Debian's rsyslog and rsyslog-gnutls)")
		}
	}
	dir, err := os.MkdirTemp("", "rsyslog") // short: a unix socket's path is at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	conf = strings.ReplaceAll(conf, "DIR", dir)
	path := filepath.Join(dir, "rsyslog.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-N1", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("rsyslogd refuses the test's configuration: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "-n", "-f", path, "-i", filepath.Join(dir, "rsyslogd.pid"))
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("rsyslogd's output:\n%s", stderr.String())
		}
	})
	for _, w := range wait {
		eventually(t, "rsyslogd makes "+w, func() bool {
			b, err := os.ReadFile(filepath.Join(dir, w))
			return err == nil && (len(b) > 0 || !strings.HasSuffix(w, "port")) || errorsIsSocket(filepath.Join(dir, w))
		})
	}
	return &rsyslogd{dir: dir, stop: stop}
}

func errorsIsSocket(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeSocket != 0
}

func (r *rsyslogd) path(name string) string { return filepath.Join(r.dir, name) }

func (r *rsyslogd) port(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(r.path(name))
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strings.TrimSpace(string(b)))
}

// lines counts the lines of a file rsyslogd writes.
func lines(path string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte("\n"))
}

// TestRsyslog ships to a real rsyslogd on a unix socket and over TCP, and
// verifies what rsyslogd wrote, with its syslog headers, against the HSM
// key: every record and checkpoint there, in order, unchanged.
func TestRsyslog(t *testing.T) {
	r := startRsyslog(t, `
global(workDirectory="DIR" maxMessageSize="1m")
module(load="imuxsock" SysSock.Use="off")
module(load="imtcp")
input(type="imuxsock" Socket="DIR/log.sock" UseSpecialParser="off" ruleset="unix")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="DIR/tcp.port" ruleset="tcp")
ruleset(name="unix") { action(type="omfile" file="DIR/unix.log" template="RSYSLOG_SyslogProtocol23Format") }
ruleset(name="tcp") { action(type="omfile" file="DIR/tcp.log" template="RSYSLOG_SyslogProtocol23Format") }
`, "log.sock", "tcp.port")
	l := newLog(t)
	s, _ := start(t, l, t.TempDir(),
		ship.SinkConfig{Name: "local", Type: ship.TypeSyslog, Network: "unixgram", Address: r.path("log.sock")},
		ship.SinkConfig{Name: "remote", Type: ship.TypeSyslog, Network: "tcp", Address: r.port(t, "tcp.port"), ExcludeOps: []string{"APIKeyService.VerifyAPIKey"}})
	l.add(t, 50, "EnvelopeService.Decrypt")
	l.add(t, 20, "APIKeyService.VerifyAPIKey")
	caughtUp(t, l, s)
	want := int(l.State().LastSeq)
	for _, f := range []string{"unix.log", "tcp.log"} {
		eventually(t, "rsyslogd writes every line to "+f, func() bool { return lines(r.path(f)) >= want })
	}
	if rep := receivedFile(t, r.path("unix.log"), l.h); !rep.OK() || rep.Records != 70 || rep.LastSeq != uint64(want) || rep.Unverified != 0 || rep.Filtered != 0 {
		t.Errorf("unix.log: %+v", rep)
	}
	if rep := receivedFile(t, r.path("tcp.log"), l.h, audit.ReceivedOptions{Filtered: true}); !rep.OK() || rep.Records != 50 || rep.Filtered != 20 || rep.LastSeq != uint64(want) || rep.Unverified != 0 {
		t.Errorf("tcp.log: %+v", rep)
	}
	b, _ := os.ReadFile(r.path("tcp.log"))
	if !bytes.HasPrefix(b, []byte("<86>1 ")) || !bytes.Contains(b, []byte(" keywardd ")) {
		t.Errorf("not RFC 5424 messages of facility authpriv: %.200s", b)
	}
}

// TestRsyslogRestart: the receiver stops (down for a while) and starts
// again on its port: the sink notices the closed connection before it
// writes, fails while nobody listens, and delivers everything once
// rsyslogd is back; what the two rsyslogd wrote is the whole log.
func TestRsyslogRestart(t *testing.T) {
	const conf = `
global(workDirectory="DIR" maxMessageSize="1m")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="PORT" listenPortFileName="DIR/tcp.port")
action(type="omfile" file="DIR/tcp.log" template="RSYSLOG_SyslogProtocol23Format")
`
	r := startRsyslog(t, strings.Replace(conf, "PORT", "0", 1), "tcp.port")
	addr := r.port(t, "tcp.port")
	l := newLog(t)
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "remote", Type: ship.TypeSyslog, Network: "tcp", Address: addr})
	l.add(t, 30, "EnvelopeService.Decrypt")
	caughtUp(t, l, s)
	eventually(t, "rsyslogd writes every line", func() bool { return lines(r.path("tcp.log")) >= int(l.State().LastSeq) })
	r.stop()

	l.add(t, 30, "EnvelopeService.Encrypt")
	eventually(t, "the sink fails while rsyslogd is down", func() bool {
		st := s.Status()[0]
		return st.State == "failing" && st.LagBytes > 0
	})
	_, port, _ := net.SplitHostPort(addr)
	r2 := startRsyslog(t, strings.Replace(conf, "PORT", port, 1))
	caughtUp(t, l, s)
	want := int(l.State().LastSeq)
	var rep audit.Received
	eventually(t, "the second rsyslogd writes the last line", func() bool {
		first, _ := os.ReadFile(r.path("tcp.log"))
		second, _ := os.ReadFile(r2.path("tcp.log"))
		rep = received(t, bytes.NewReader(append(first, second...)), l.h)
		return rep.LastSeq == uint64(want) // one connection at a time, in order: every line before it is there, or lost
	})
	if !rep.OK() || rep.Records != 60 || rep.LastSeq != uint64(want) || rep.Unverified != 0 {
		t.Errorf("what the two rsyslogd wrote: %+v", rep)
	}
}

// TestRsyslogTLS ships over TLS (RFC 5425) to a real rsyslogd that
// presents a certificate of a test CA, and refuses a CA that did not
// sign it.
func TestRsyslogTLS(t *testing.T) {
	pki := t.TempDir()
	caFile, certFile, keyFile := testPKI(t, pki)
	r := startRsyslog(t, `
global(workDirectory="DIR" maxMessageSize="1m" DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="`+caFile+`" DefaultNetstreamDriverCertFile="`+certFile+`" DefaultNetstreamDriverKeyFile="`+keyFile+`")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="DIR/tls.port" ruleset="tls")
ruleset(name="tls") { action(type="omfile" file="DIR/tls.log" template="RSYSLOG_SyslogProtocol23Format") }
`, "tls.port")
	l := newLog(t)
	addr := r.port(t, "tls.port")
	otherCA, _, _ := testPKI(t, t.TempDir())
	s, _ := start(t, l, t.TempDir(),
		ship.SinkConfig{Name: "tls", Type: ship.TypeSyslog, Network: "tls", Address: addr, CAFile: caFile, CertFile: certFile, KeyFile: keyFile, ServerName: "localhost"},
		ship.SinkConfig{Name: "wrong-ca", Type: ship.TypeSyslog, Network: "tls", Address: addr, CAFile: otherCA, CertFile: certFile, KeyFile: keyFile, ServerName: "localhost"},
		ship.SinkConfig{Name: "wrong-name", Type: ship.TypeSyslog, Network: "tls", Address: addr, CAFile: caFile, CertFile: certFile, KeyFile: keyFile, ServerName: "other.example"})
	l.add(t, 30, "TokenService.MintToken")
	eventually(t, "the sink of the right CA and name ships everything; the others fail on the certificate", func() bool {
		st := s.Status()
		return st[0].Seq == l.State().LastSeq && l.State().LastCheckpointSeq == l.State().LastSeq &&
			st[1].State == "failing" && strings.Contains(st[1].LastError, "certificate") &&
			st[2].State == "failing" && strings.Contains(st[2].LastError, "certificate is valid for localhost") && strings.Contains(st[2].LastError, "not other.example")
	})
	want := int(l.State().LastSeq)
	eventually(t, "rsyslogd writes every line", func() bool { return lines(r.path("tls.log")) >= want })
	if rep := receivedFile(t, r.path("tls.log"), l.h); !rep.OK() || rep.Records != 30 || rep.Unverified != 0 {
		t.Errorf("tls.log: %+v", rep)
	}
	for _, st := range s.Status()[1:] {
		if st.Seq != 0 || st.LagBytes != l.State().Size {
			t.Errorf("a sink that does not trust the receiver shipped: %+v", st)
		}
	}
}

// testPKI writes a test CA and a server certificate it signs (for
// localhost and 127.0.0.1) into dir.
func testPKI(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keyward test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	caFile, certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for _, f := range []struct {
		path, typ string
		der       []byte
	}{{caFile, "CERTIFICATE", caDER}, {certFile, "CERTIFICATE", der}, {keyFile, "EC PRIVATE KEY", keyDER}} {
		if err := os.WriteFile(f.path, pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile, certFile, keyFile
}
