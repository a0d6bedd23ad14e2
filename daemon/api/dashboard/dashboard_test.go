package dashboard

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// clock is a settable clock for sessions' and logins' lifetimes.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// page is a dashboard serving a real keywardd, on loopback.
type page struct {
	t     *testing.T
	s     *Server
	base  string
	clock *clock
	api   *client.Client
}

func start(t *testing.T) *page {
	t.Helper()
	d := daemontest.Start(t)
	api, err := client.Dial(d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { api.Close() })
	if _, err := api.Keys.CreateKey(context.Background(), &keywardv1.CreateKeyRequest{Name: "orders",
		Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT, Algorithm: keywardv1.KeyAlgorithm_KEY_ALGORITHM_AES256_GCM}); err != nil {
		t.Fatal(err)
	}
	c := &clock{t: time.Now()}
	s, err := New(api, Options{Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &page{t: t, s: s, base: "http://" + ln.Addr().String(), clock: c, api: api}
}

// do sends a request with the headers given ("Cookie", "Origin", ...),
// without following redirects, and returns the answer and its body.
func (p *page) do(method, path string, form url.Values, headers ...string) (*http.Response, string) {
	p.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, p.base+path, body)
	if err != nil {
		p.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i] == "Host" {
			req.Host = headers[i+1]
			continue
		}
		req.Header.Set(headers[i], headers[i+1])
	}
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// login opens a fresh login URL and returns the session's cookie header.
func (p *page) login() string {
	p.t.Helper()
	u := p.s.NewLogin(p.base)
	resp, _ := p.do("GET", strings.TrimPrefix(u, p.base), nil)
	if resp.StatusCode != http.StatusOK {
		p.t.Fatalf("login: %s", resp.Status)
	}
	for _, c := range resp.Cookies() {
		if c.Name == cookieName {
			return c.Name + "=" + c.Value
		}
	}
	p.t.Fatal("login set no session cookie")
	return ""
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func (p *page) csrf(cookie string) string {
	p.t.Helper()
	_, body := p.do("GET", "/keys", nil, "Cookie", cookie)
	m := csrfRE.FindStringSubmatch(body)
	if m == nil {
		p.t.Fatalf("no CSRF token on /keys:\n%s", body)
	}
	return m[1]
}

func (p *page) version(name string) uint32 {
	p.t.Helper()
	k, err := p.api.Keys.GetKey(context.Background(), &keywardv1.GetKeyRequest{Name: name})
	if err != nil {
		p.t.Fatal(err)
	}
	return k.GetKey().GetLatestVersion()
}

// TestLogin: a login URL opens one session, once, within its time; its
// cookie is HttpOnly and SameSite=Strict.
func TestLogin(t *testing.T) {
	p := start(t)
	u := strings.TrimPrefix(p.s.NewLogin(p.base), p.base)
	resp, _ := p.do("GET", u, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("login: %s", resp.Status)
	}
	cs := resp.Cookies()
	if len(cs) != 1 || !cs[0].HttpOnly || cs[0].SameSite != http.SameSiteStrictMode || cs[0].Value == "" {
		t.Errorf("the session cookie: %+v; want one, HttpOnly, SameSite=Strict", cs)
	}
	if resp, body := p.do("GET", u, nil); resp.StatusCode != http.StatusForbidden || len(resp.Cookies()) != 0 || !strings.Contains(body, "used already or has expired") {
		t.Errorf("the login URL replayed: %s %q, cookies %v", resp.Status, body, resp.Cookies())
	}
	late := strings.TrimPrefix(p.s.NewLogin(p.base), p.base)
	p.clock.add(11 * time.Minute)
	if resp, _ := p.do("GET", late, nil); resp.StatusCode != http.StatusForbidden {
		t.Errorf("a login URL 11 minutes old: %s", resp.Status)
	}
	for _, bad := range []string{"/login", "/login?token=", "/login?token=AAAA", u + "x"} {
		if resp, _ := p.do("GET", bad, nil); resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %s", bad, resp.Status)
		}
	}
}

// TestRefusals: without the session, with a wrong or missing CSRF token,
// from another origin or site, naming another host, from off loopback:
// refused, and nothing done. With all of it right, the action is done.
func TestRefusals(t *testing.T) {
	p := start(t)
	cookie := p.login()
	token := p.csrf(cookie)
	port := strings.TrimPrefix(p.base, "http://127.0.0.1")
	rotate := func(form url.Values, headers ...string) int {
		resp, _ := p.do("POST", "/keys/orders/rotate", form, headers...)
		return resp.StatusCode
	}
	for _, c := range []struct {
		what    string
		method  string
		form    url.Values
		headers []string
		want    int
	}{
		{"a page without the cookie", "GET", nil, nil, http.StatusUnauthorized},
		{"a page with a made-up cookie", "GET", nil, []string{"Cookie", cookieName + "=forged"}, http.StatusUnauthorized},
		{"an action without the cookie", "POST", url.Values{"csrf": {token}}, nil, http.StatusUnauthorized},
		{"an action without a CSRF token", "POST", url.Values{}, []string{"Cookie", cookie}, http.StatusForbidden},
		{"an action with a wrong CSRF token", "POST", url.Values{"csrf": {token + "x"}}, []string{"Cookie", cookie}, http.StatusForbidden},
		{"an action from another origin", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Origin", "http://evil.example"}, http.StatusForbidden},
		{"an action from another site", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Sec-Fetch-Site", "cross-site"}, http.StatusForbidden},
		{"an action from a null origin", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Origin", "null"}, http.StatusForbidden},
		{"another Host (DNS rebinding)", "GET", nil, []string{"Cookie", cookie, "Host", "evil.example" + port}, http.StatusMisdirectedRequest},
		{"another port on the Host", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Host", "127.0.0.1:1"}, http.StatusMisdirectedRequest},
	} {
		var code int
		if c.method == "GET" {
			resp, _ := p.do("GET", "/", nil, c.headers...)
			code = resp.StatusCode
		} else {
			code = rotate(c.form, c.headers...)
		}
		if code != c.want {
			t.Errorf("%s: %d; want %d", c.what, code, c.want)
		}
	}
	if v := p.version("orders"); v != 1 {
		t.Fatalf("a refused action rotated the key: version %d", v)
	}

	// Off loopback: the handler itself refuses (a listener on loopback
	// never hands it such a request, but a mistaken -listen might).
	req := httptest.NewRequest("GET", "/", nil)
	req.RemoteAddr, req.Host = "192.0.2.10:40000", "127.0.0.1"+port
	req.Header.Set("Cookie", cookie)
	rec := httptest.NewRecorder()
	p.s.ServeHTTP(rec, req)
	if rec.Code != http.StatusForbidden {
		t.Errorf("a request from 192.0.2.10: %d", rec.Code)
	}

	// All right: done, once.
	if code := rotate(url.Values{"csrf": {token}}, "Cookie", cookie, "Origin", p.base, "Sec-Fetch-Site", "same-origin"); code != http.StatusSeeOther {
		t.Errorf("the page's own rotation: %d; want 303", code)
	}
	if v := p.version("orders"); v != 2 {
		t.Errorf("after the page's rotation, version %d; want 2", v)
	}
}

// TestListen: the page listens on loopback only.
func TestListen(t *testing.T) {
	s, err := New(nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0", "[::]:0", "example.com:80", "nonsense"} {
		if ln, err := s.Listen(addr); err == nil {
			ln.Close()
			t.Errorf("Listen(%q) was taken", addr)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "localhost:0"} {
		ln, err := s.Listen(addr)
		if err != nil {
			t.Errorf("Listen(%q): %v", addr, err)
			continue
		}
		ln.Close()
	}
}

// TestSessionEnds: a session ends after its idle time, and at logout.
func TestSessionEnds(t *testing.T) {
	p := start(t)
	cookie := p.login()
	if resp, _ := p.do("GET", "/", nil, "Cookie", cookie); resp.StatusCode != http.StatusOK {
		t.Fatalf("in session: %s", resp.Status)
	}
	p.clock.add(31 * time.Minute)
	if resp, _ := p.do("GET", "/", nil, "Cookie", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("after 31 idle minutes: %s", resp.Status)
	}
	cookie = p.login()
	token := p.csrf(cookie)
	if resp, _ := p.do("POST", "/logout", url.Values{"csrf": {token}}, "Cookie", cookie); resp.StatusCode != http.StatusOK {
		t.Fatalf("logout: %s", resp.Status)
	}
	if resp, _ := p.do("GET", "/", nil, "Cookie", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("after logout: %s", resp.Status)
	}
}

// TestHeaders: every page forbids scripts, framing and caching, and holds
// no script.
func TestHeaders(t *testing.T) {
	p := start(t)
	cookie := p.login()
	for _, path := range []string{"/", "/keys", "/apikeys", "/apikeys/new", "/apikeys/revoke", "/tokens", "/credentials", "/rotation", "/review", "/audit", "/keys/orders/panic-rotate", "/static/style.css", "/login?token=x"} {
		resp, body := p.do("GET", path, nil, "Cookie", cookie)
		h := resp.Header
		if csp := h.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || strings.Contains(csp, "script-src") || strings.Contains(csp, "unsafe") {
			t.Errorf("%s: Content-Security-Policy %q", path, csp)
		}
		if h.Get("X-Frame-Options") != "DENY" || h.Get("Cache-Control") != "no-store" || h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: headers %v", path, h)
		}
		if strings.Contains(strings.ToLower(body), "<script") || strings.Contains(strings.ToLower(body), " on") && regexp.MustCompile(`(?i)\son[a-z]+=`).MatchString(body) {
			t.Errorf("%s holds a script", path)
		}
		if path != "/login?token=x" && resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s", path, resp.Status)
		}
	}
}
