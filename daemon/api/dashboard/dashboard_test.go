package dashboard

import (
	"context"
	"fmt"
	"html/template"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

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
// without following redirects, and returns the answer and its body. A
// page's path is under the session's prefix; /login, and a path written
// "=/..." (as it is), are not.
func (p *page) do(method, path string, form url.Values, headers ...string) (*http.Response, string) {
	p.t.Helper()
	switch {
	case strings.HasPrefix(path, "="):
		path = path[1:]
	case !strings.HasPrefix(path, "/login"):
		path = p.s.prefix + path
	}
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
		if strings.HasPrefix(c.Name, cookieName+"_") {
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
	_, port, _ := strings.Cut(strings.TrimPrefix(p.base, "http://"), ":")
	if len(cs) != 1 || !cs[0].HttpOnly || cs[0].SameSite != http.SameSiteStrictMode || cs[0].Value == "" ||
		cs[0].Name != cookieName+"_"+port || cs[0].Path != p.s.prefix+"/" || cs[0].MaxAge != 0 || !cs[0].Expires.IsZero() {
		t.Errorf("the session cookie: %+v; want one, HttpOnly, SameSite=Strict, named for port %s, on path %s/ only, kept in memory", cs, port, p.s.prefix)
	}
	// A HEAD (a link preview probing the URL) does not spend it.
	head := strings.TrimPrefix(p.s.NewLogin(p.base), p.base)
	if resp, _ := p.do("HEAD", head, nil); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("HEAD of a login URL: %s", resp.Status)
	}
	if resp, _ := p.do("GET", head, nil); resp.StatusCode != http.StatusOK {
		t.Errorf("the login URL after a HEAD of it: %s", resp.Status)
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
		// Another port of 127.0.0.1 is the same site, not the same origin.
		{"an action from another port", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Origin", "http://127.0.0.1:1"}, http.StatusForbidden},
		{"an action from the same site", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Sec-Fetch-Site", "same-site"}, http.StatusForbidden},
		{"a page off the prefix, with the cookie", "=GET", nil, []string{"Cookie", cookie}, http.StatusNotFound},
		{"another Host (DNS rebinding)", "GET", nil, []string{"Cookie", cookie, "Host", "evil.example" + port}, http.StatusMisdirectedRequest},
		{"another port on the Host", "POST", url.Values{"csrf": {token}}, []string{"Cookie", cookie, "Host", "127.0.0.1:1"}, http.StatusMisdirectedRequest},
	} {
		var code int
		switch c.method {
		case "GET":
			resp, _ := p.do("GET", "/", nil, c.headers...)
			code = resp.StatusCode
		case "=GET":
			resp, _ := p.do("GET", "=/", nil, c.headers...)
			code = resp.StatusCode
		default:
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

	// Without the page's nonce (a form never shown, or sent already):
	// nothing done, and said.
	if code := rotate(url.Values{"csrf": {token}}, "Cookie", cookie, "Origin", p.base, "Sec-Fetch-Site", "same-origin"); code != http.StatusConflict {
		t.Errorf("a rotation without the page's nonce: %d; want 409", code)
	}
	// All right: done, once; the same form again (a double click) is not.
	f := p.form(cookie, "/keys")
	if code := rotate(f, "Cookie", cookie, "Origin", p.base, "Sec-Fetch-Site", "same-origin"); code != http.StatusSeeOther {
		t.Errorf("the page's own rotation: %d; want 303", code)
	}
	if code := rotate(f, "Cookie", cookie, "Origin", p.base, "Referer", p.base+p.s.prefix+"/keys"); code != http.StatusSeeOther {
		t.Errorf("the rotation sent again: %d; want 303 back to the page", code)
	}
	if _, body := p.do("GET", "/keys", nil, "Cookie", cookie); !strings.Contains(body, "sent already") {
		t.Errorf("the keys page after a form sent twice does not say so")
	}
	if v := p.version("orders"); v != 2 {
		t.Errorf("after the page's rotation, sent twice, version %d; want 2", v)
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
	if resp, _ := p.do("POST", "/logout", p.form(cookie, "/"), "Cookie", cookie); resp.StatusCode != http.StatusOK {
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
		if strings.Contains(strings.ToLower(body), "<script") || regexp.MustCompile(`(?i)\son[a-z]+=`).MatchString(body) {
			t.Errorf("%s holds a script", path)
		}
		if path != "/login?token=x" && resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s", path, resp.Status)
		}
	}
}

// form is what a page's forms carry: the CSRF token and, if the page has
// one, a nonce, read off the page at path.
func (p *page) form(cookie, path string) url.Values {
	p.t.Helper()
	_, body := p.do("GET", path, nil, "Cookie", cookie)
	m, n := csrfRE.FindStringSubmatch(body), regexp.MustCompile(`name="nonce" value="([^"]+)"`).FindStringSubmatch(body)
	if m == nil {
		p.t.Fatalf("no CSRF token on %s:\n%s", path, body)
	}
	f := url.Values{"csrf": {m[1]}}
	if n != nil {
		f.Set("nonce", n[1])
	}
	return f
}

// TestSecretOnce: a created or rotated key's secret shows once, after a
// redirect, so a reload shows it no more and makes nothing; the form sent
// again (its nonce spent) makes no second key and no second rotation.
func TestSecretOnce(t *testing.T) {
	p := start(t)
	cookie := p.login()
	f := p.form(cookie, "/apikeys/new")
	for k, v := range map[string]string{"owner": "shop", "name": "once", "env": "prod", "preset": "read-only", "days": "30"} {
		f.Set(k, v)
	}
	resp, _ := p.do("POST", "/apikeys", f, "Cookie", cookie)
	to := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(to, p.s.prefix+"/apikeys/ak_") || !strings.HasSuffix(to, "/secret") {
		t.Fatalf("create: %s to %q; want 303 to the key's secret page", resp.Status, to)
	}
	resp, body := p.do("GET", "="+to, nil, "Cookie", cookie)
	secret := regexp.MustCompile(`<pre id="secret">([^<]+)</pre>`).FindStringSubmatch(body)
	if resp.StatusCode != http.StatusOK || secret == nil {
		t.Fatalf("the secret page: %s\n%s", resp.Status, body)
	}
	if resp, body := p.do("GET", "="+to, nil, "Cookie", cookie); resp.StatusCode != http.StatusGone || strings.Contains(body, secret[1]) {
		t.Errorf("the secret page again: %s; want 410 without the secret", resp.Status)
	}
	if resp, body := p.do("POST", "/apikeys", f, "Cookie", cookie); resp.StatusCode != http.StatusConflict || !strings.Contains(body, "sent already") {
		t.Errorf("the create form sent again: %s", resp.Status)
	}
	list, err := p.api.APIKeys.ListAPIKeys(context.Background(), &keywardv1.ListAPIKeysRequest{Owner: "shop"})
	if err != nil || len(list.GetKeys()) != 1 {
		t.Fatalf("keys of shop after the form was sent twice: %v, %v; want one", list.GetKeys(), err)
	}
	id := list.GetKeys()[0].GetId()

	rot := p.form(cookie, "/apikeys/"+id)
	rot.Set("overlap_hours", "1")
	if resp, _ := p.do("POST", "/apikeys/"+id+"/rotate", rot, "Cookie", cookie); resp.StatusCode != http.StatusSeeOther || !strings.HasSuffix(resp.Header.Get("Location"), "/secret") {
		t.Fatalf("rotate: %s", resp.Status)
	}
	p.do("POST", "/apikeys/"+id+"/rotate", rot, "Cookie", cookie)
	k, err := p.api.APIKeys.GetAPIKey(context.Background(), &keywardv1.GetAPIKeyRequest{Id: id})
	if err != nil || len(k.GetKey().GetSecrets()) != 2 {
		t.Errorf("after the rotate form was sent twice, %d secrets; want 2 (one rotation)", len(k.GetKey().GetSecrets()))
	}
	for _, bad := range []string{"NaN", "-1", "721", "x"} {
		f := p.form(cookie, "/apikeys/"+id)
		f.Set("overlap_hours", bad)
		p.do("POST", "/apikeys/"+id+"/rotate", f, "Cookie", cookie)
	}
	if k, _ := p.api.APIKeys.GetAPIKey(context.Background(), &keywardv1.GetAPIKeyRequest{Id: id}); len(k.GetKey().GetSecrets()) != 2 {
		t.Errorf("a bad overlap rotated the key: %d secrets", len(k.GetKey().GetSecrets()))
	}
}

// TestActionsCheck: a bulk revocation whose filter matches another count
// than its dry run revokes nothing; a panic rotation without the key's
// name typed does nothing; the audit log's verification is a POST.
func TestActionsCheck(t *testing.T) {
	p := start(t)
	cookie := p.login()
	for i := range 2 {
		if _, err := p.api.APIKeys.CreateAPIKey(context.Background(), &keywardv1.CreateAPIKeyRequest{Owner: "batch", Name: fmt.Sprint("job-", i),
			Environment: "prod", Permissions: []string{"read-only"}, Tags: []string{"leaked"}}); err != nil {
			t.Fatal(err)
		}
	}
	f := p.form(cookie, "/apikeys/revoke?tag=leaked")
	f.Set("tag", "leaked")
	f.Set("expect", "1") // the dry run said 1; there are 2 now
	if resp, _ := p.do("POST", "/apikeys/revoke", f, "Cookie", cookie); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("bulk revoke: %s", resp.Status)
	}
	if _, body := p.do("GET", "/apikeys/revoke?tag=leaked", nil, "Cookie", cookie); !strings.Contains(body, "now matches 2 keys, not the 1 of the dry run") {
		t.Errorf("the page after a bulk revocation whose count changed:\n%s", body)
	}
	if list, _ := p.api.APIKeys.ListAPIKeys(context.Background(), &keywardv1.ListAPIKeysRequest{Tag: "leaked", State: keywardv1.APIKeyState_API_KEY_STATE_ACTIVE}); len(list.GetKeys()) != 2 {
		t.Errorf("a bulk revocation whose count changed revoked keys: %d left", len(list.GetKeys()))
	}

	f = p.form(cookie, "/keys/orders/panic-rotate")
	f.Set("confirm", "order")
	p.do("POST", "/keys/orders/panic-rotate", f, "Cookie", cookie)
	if v := p.version("orders"); v != 1 {
		t.Errorf("a panic rotation confirmed with the wrong name made version %d", v)
	}

	if resp, _ := p.do("GET", "/audit/verify", nil, "Cookie", cookie); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /audit/verify: %s; want 404 (it is a POST)", resp.Status)
	}
	if _, body := p.do("GET", "/audit", nil, "Cookie", cookie); strings.Contains(body, `id="verified"`) {
		t.Errorf("a GET of /audit/verify verified the log")
	}
	if resp, _ := p.do("POST", "/audit/verify", p.form(cookie, "/audit"), "Cookie", cookie); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("POST /audit/verify: %s", resp.Status)
	}
	if _, body := p.do("GET", "/audit", nil, "Cookie", cookie); !strings.Contains(body, `id="verified"`) || !strings.Contains(body, "holds") {
		t.Errorf("the audit page after a verification does not say it holds")
	}
}

// TestSessionMax: a session in use ends after SessionMax all the same.
func TestSessionMax(t *testing.T) {
	p := start(t)
	cookie := p.login()
	for range 37 { // 12 hours and 20 minutes, a visit every 20 minutes
		if resp, _ := p.do("GET", "/review", nil, "Cookie", cookie); resp.StatusCode != http.StatusOK {
			t.Fatalf("a session in use ended early: %s", resp.Status)
		}
		p.clock.add(20 * time.Minute)
	}
	if resp, _ := p.do("GET", "/", nil, "Cookie", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("after 12 hours and 20 minutes: %s", resp.Status)
	}
}

// TestListenOtherLoopback: a page on another loopback address answers to
// its own address.
func TestListenOtherLoopback(t *testing.T) {
	s, err := New(nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := s.Listen("127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	req := httptest.NewRequest("GET", s.NewLogin("http://"+ln.Addr().String()), nil)
	req.RemoteAddr = "127.0.0.1:5000"
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Errorf("the login URL on %s: %d %s", ln.Addr(), rec.Code, rec.Body)
	}
}

// TestChartsEscape: what keywardd answers (names, networks, results) is
// text in the charts, never markup.
func TestChartsEscape(t *testing.T) {
	evil := `<script>alert(1)</script>"'&`
	now := time.Now().UTC().Truncate(time.Hour)
	hours := []*keywardv1.APIKeyHourUsage{{Hour: timestamppb.New(now), Usage: &keywardv1.APIKeyUsage{Counts: map[string]int64{evil: 3}}}}
	rot := []*keywardv1.ScheduledRotation{{Kind: evil, Id: evil, Policy: evil, Action: evil, DueTime: timestamppb.New(now.Add(time.Hour))}}
	for name, out := range map[string]template.HTML{
		"bars":     barsChart("x", evil, []countOf{{evil, 1}}),
		"usage":    usageChart(hours, now.Add(-time.Hour), now),
		"timeline": timelineChart(rot, now, 24*time.Hour),
	} {
		if strings.Contains(string(out), "<script") || strings.Contains(string(out), `"'&`) {
			t.Errorf("%s chart holds the name unescaped:\n%s", name, out)
		}
		if !strings.Contains(string(out), "&lt;script&gt;") {
			t.Errorf("%s chart lost the name:\n%s", name, out)
		}
	}
}

// TestKeptAndSwept: a HEAD does not spend a secret's page; a secret not
// shown within its minute is gone from memory at the next sweep, and its
// page says it was not shown; a form stays good while other pages are
// shown; paths not in their clean form are refused, not redirected off the
// prefix.
func TestKeptAndSwept(t *testing.T) {
	p := start(t)
	cookie := p.login()
	f := p.form(cookie, "/apikeys/new")
	for range 100 { // other pages, in another tab
		p.do("GET", "/audit", nil, "Cookie", cookie)
	}
	for k, v := range map[string]string{"owner": "shop", "name": "late", "env": "prod", "preset": "read-only"} {
		f.Set(k, v)
	}
	resp, _ := p.do("POST", "/apikeys", f, "Cookie", cookie)
	to := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("create after 100 other pages: %s", resp.Status)
	}
	if resp, _ := p.do("HEAD", "="+to, nil, "Cookie", cookie); resp.StatusCode != http.StatusOK {
		t.Errorf("HEAD of the secret's page: %s", resp.Status)
	}
	p.clock.add(2 * time.Minute)
	p.s.sweep()
	p.s.mu.Lock()
	held := 0
	for _, ss := range p.s.sessions {
		if ss.secret != nil {
			held++
		}
	}
	p.s.mu.Unlock()
	if held != 0 {
		t.Errorf("a secret not shown within its minute is still held after the sweep")
	}
	if resp, body := p.do("GET", "="+to, nil, "Cookie", cookie); resp.StatusCode != http.StatusGone || !strings.Contains(body, "gone") {
		t.Errorf("the secret's page after its minute: %s", resp.Status)
	}

	for _, path := range []string{"=" + p.s.prefix + "/keys/../audit", "=" + p.s.prefix + "//keys", "=" + p.s.prefix + "/nope"} {
		resp, _ := p.do("GET", path, nil, "Cookie", cookie)
		if resp.StatusCode != http.StatusNotFound || resp.Header.Get("Location") != "" {
			t.Errorf("%s: %s to %q; want 404, no redirect", path, resp.Status, resp.Header.Get("Location"))
		}
	}
	if resp, _ := p.do("GET", "="+p.s.prefix, nil, "Cookie", cookie); resp.Header.Get("Location") != p.s.prefix+"/" {
		t.Errorf("the prefix without its slash: %s to %q", resp.Status, resp.Header.Get("Location"))
	}

	// A session past its time is swept, not only refused at its next use.
	p.clock.add(time.Hour)
	p.s.sweep()
	p.s.mu.Lock()
	n := len(p.s.sessions)
	p.s.mu.Unlock()
	if n != 0 {
		t.Errorf("%d sessions past their idle time kept after the sweep", n)
	}
}

// TestLimitWindowsShown: the rotation page lists the API keys' limit
// windows pending and active beside the rotations, escaped.
func TestLimitWindowsShown(t *testing.T) {
	p := start(t)
	cookie := p.login()
	if _, body := p.do("GET", "/rotation", nil, "Cookie", cookie); !strings.Contains(body, `id="windows"`) || !strings.Contains(body, "None pending or active") {
		t.Fatalf("no window yet: the page says %q", body)
	}
	w, err := p.api.APIKeys.ScheduleLimits(context.Background(), &keywardv1.ScheduleLimitsRequest{Owner: "shop", Environment: "prod", Factor: 2.5,
		EndTime: timestamppb.New(time.Now().Add(time.Hour)), Reason: "launch <b>day</b>"})
	if err != nil {
		t.Fatal(err)
	}
	_, body := p.do("GET", "/rotation", nil, "Cookie", cookie)
	for _, want := range []string{w.GetWindow().GetId(), "<td>shop</td><td>prod</td><td>×2.5</td>", "<td>active</td>", "launch &lt;b&gt;day&lt;/b&gt;"} {
		if !strings.Contains(body, want) {
			t.Errorf("the rotation page lacks %q", want)
		}
	}
}
