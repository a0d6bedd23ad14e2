package ship

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
)

// httpSender POSTs each batch to a URL as newline-JSON
// (application/x-ndjson); a 2xx answer acknowledges it. Anything else,
// or no answer within the sink's timeout, is a failure, and the batch is
// sent again.
type httpSender struct {
	url    string
	token  string
	client *http.Client
	buf    []byte
}

func newHTTP(c SinkConfig) (*httpSender, error) {
	s := &httpSender{url: c.URL}
	if c.BearerTokenFile != "" {
		b, err := os.ReadFile(c.BearerTokenFile)
		if err != nil {
			return nil, fmt.Errorf("ship: bearer_token_file: %w", err)
		}
		s.token = strings.TrimSpace(string(b))
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // a SIEM's address is the operator's to name, not the environment's
	if strings.HasPrefix(c.URL, "https:") {
		cfg, err := tlsConfig(c, "")
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = cfg
	}
	s.client = &http.Client{Transport: tr, Timeout: c.timeout(),
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return s, nil
}

// Send implements sender.
func (s *httpSender) Send(ctx context.Context, b batch) error {
	s.buf = s.buf[:0]
	for _, ln := range b.lines {
		s.buf = append(append(s.buf, ln...), '\n')
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(s.buf))
	if err != nil {
		return fmt.Errorf("ship: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	if s.token != "" {
		req.Header.Set("Authorization", "Bearer "+s.token)
	}
	resp, err := s.client.Do(req)
	if cap(s.buf) > 4<<20 {
		s.buf = nil
	}
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // its message holds the whole URL
		}
		return fmt.Errorf("ship: posting to %s: %w", s.where(), err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("ship: %s answered %s", s.where(), resp.Status)
	}
	return nil
}

// where is the URL as errors and logs name it: without its user
// information and query, which may hold a SIEM's token.
func (s *httpSender) where() string { return redactURL(s.url) }

// redactURL is a URL without its user information, query and fragment,
// which may hold a SIEM's token: what errors, logs and config errors show.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(the sink's url, not shown: it does not parse)"
	}
	return u.Scheme + "://" + u.Host + u.Path
}

// Close implements sender.
func (s *httpSender) Close() error {
	s.client.CloseIdleConnections()
	return nil
}
