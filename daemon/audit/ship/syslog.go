package ship

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// facilities are RFC 5424's facility names and codes, as syslog.conf
// spells them.
var facilities = map[string]int{"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
	"uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
	"local5": 21, "local6": 22, "local7": 23}

func facility(name string) (int, error) {
	if name == "" {
		return facilities["authpriv"], nil
	}
	f, ok := facilities[name]
	if !ok {
		return 0, fmt.Errorf("facility %q: a syslog facility name (authpriv, auth, daemon, local0 ... local7)", name)
	}
	return f, nil
}

// severityInfo is RFC 5424's "informational".
const severityInfo = 6

// syslogSender ships lines as RFC 5424 messages: one datagram each on a
// unixgram socket, or octet-counted frames (RFC 6587 3.4.1, as RFC 5425
// requires for TLS) on a TCP or TLS connection, which it opens again after
// an error.
type syslogSender struct {
	network, address string
	pri              int
	host             string
	pid              string
	tls              *tls.Config
	timeout          time.Duration
	conn             net.Conn
	buf              []byte
}

func newSyslog(c SinkConfig) (*syslogSender, error) {
	fac, err := facility(c.Facility)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "-"
	}
	s := &syslogSender{network: c.Network, address: c.Address, pri: fac*8 + severityInfo, host: host, pid: strconv.Itoa(os.Getpid()), timeout: c.timeout()}
	if s.network == "" {
		s.network = "unixgram"
	}
	if s.network == "unixgram" && s.address == "" {
		s.address = "/dev/log"
	}
	if s.network == "tls" {
		if s.tls, err = tlsConfig(c, c.Address); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// tlsConfig is the client TLS configuration of a sink: its CA (default
// the system's), its client certificate if any, TLS 1.2 at least.
func tlsConfig(c SinkConfig, address string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if cfg.ServerName == "" {
		if h, _, err := net.SplitHostPort(address); err == nil {
			cfg.ServerName = h
		}
	}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ship: ca_file: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ship: ca_file %s holds no PEM certificate", c.CAFile)
		}
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("ship: cert_file, key_file: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// message appends an RFC 5424 message carrying line to dst:
// <PRI>1 TIMESTAMP HOSTNAME keywardd PROCID MSGID - LINE, MSGID being the
// line's kind (record, checkpoint, filtered).
func (s *syslogSender) message(dst []byte, kind string, line []byte, now time.Time) []byte {
	dst = fmt.Appendf(dst, "<%d>1 ", s.pri)
	dst = now.UTC().AppendFormat(dst, "2006-01-02T15:04:05.000000Z07:00")
	dst = fmt.Appendf(dst, " %s keywardd %s %s - ", s.host, s.pid, kind)
	return append(dst, line...)
}

// Send implements sender.
func (s *syslogSender) Send(ctx context.Context, b batch) error {
	if s.conn != nil && s.network != "unixgram" && !s.open() {
		s.conn.Close()
		s.conn = nil
	}
	if s.conn == nil {
		d := net.Dialer{Timeout: s.timeout}
		var err error
		if s.tls != nil {
			td := tls.Dialer{NetDialer: &d, Config: s.tls}
			s.conn, err = td.DialContext(ctx, "tcp", s.address)
		} else {
			network := s.network
			s.conn, err = d.DialContext(ctx, network, s.address)
		}
		if err != nil {
			return fmt.Errorf("ship: connecting to %s %s: %w", s.network, s.address, err)
		}
	}
	deadline := time.Now().Add(s.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	s.conn.SetWriteDeadline(deadline)
	now := time.Now()
	err := func() error {
		if s.network == "unixgram" {
			for i, ln := range b.lines {
				s.buf = s.message(s.buf[:0], b.kinds[i], ln, now)
				if _, err := s.conn.Write(s.buf); err != nil {
					return err
				}
			}
			return nil
		}
		s.buf = s.buf[:0]
		var msg []byte
		for i, ln := range b.lines {
			msg = s.message(msg[:0], b.kinds[i], ln, now)
			s.buf = strconv.AppendInt(s.buf, int64(len(msg)), 10)
			s.buf = append(append(s.buf, ' '), msg...)
		}
		_, err := s.conn.Write(s.buf)
		return err
	}()
	if cap(s.buf) > 4<<20 {
		s.buf = nil
	}
	if err != nil {
		s.conn.Close()
		s.conn = nil
		return fmt.Errorf("ship: writing to %s %s: %w", s.network, s.address, err)
	}
	return nil
}

// open says whether the receiver has not closed the connection: syslog
// receivers send nothing, so a read that does not time out within a millisecond found
// its end (or bytes it should not have sent). Without this, the first batch
// after a receiver's restart would be written into a connection the
// receiver no longer reads, and lost, since TCP's write succeeds until the
// peer's reset comes back.
func (s *syslogSender) open() bool {
	// A deadline already past would not even try the read (Go's poller
	// checks it first): a millisecond makes it read what has arrived.
	s.conn.SetReadDeadline(time.Now().Add(time.Millisecond))
	var one [1]byte
	_, err := s.conn.Read(one[:])
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Close implements sender.
func (s *syslogSender) Close() error {
	if s.conn != nil {
		return s.conn.Close()
	}
	return nil
}
