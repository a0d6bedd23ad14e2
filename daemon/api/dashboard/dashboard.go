// Package dashboard is keyward's web page for operators: `keyward
// dashboard` serves it on loopback, and everything it shows or does is a
// call to keywardd through its Unix socket, made by the keyward process
// and so as the operator who runs it: the policy decides what the page
// may show and do, and the audit log records every action under the
// operator's identity. It adds no way in to keywardd.
//
// Who may use the page: the one who holds its one-time login URL, which
// keyward prints (and hands a browser through a file only the operator
// can read, never in a command line). Opening it turns it into a session
// cookie (HttpOnly, SameSite=Strict) scoped to a path with a random part
// of its own (/s/RANDOM/): a browser sends a cookie of 127.0.0.1 to every
// port of 127.0.0.1, and another local user's server on another port must
// not receive it. Every action is a POST form carrying the session's CSRF
// token, checked with the request's Origin and Sec-Fetch-Site, and the
// forms that make a secret carry a one-time nonce (a reload does not make
// a second); requests from other addresses than loopback, or naming
// another Host (DNS rebinding), are refused. The pages hold no script at
// all: the Content-Security-Policy allows none, and styles and images come
// from the binary itself (no CDN; it works offline).
//
// The pages are html/template, rendered on the server. The charts are SVG
// drawn here (charts.go): the chart libraries of Go either draw in the
// browser with JavaScript (go-echarts, which also loads its scripts from a
// CDN by default) or raster images through a graphics stack; the few bar
// charts and the timeline the pages need are a hundred lines of SVG, which
// also lets a test read each bar's number.
package dashboard

import (
	"bytes"
	"context"
	"crypto/rand"
	"embed"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	pathpkg "path"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon/api/client"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Options tune a Server. Zero values mean the defaults.
type Options struct {
	// LoginTTL is how long a login URL may be opened; default 10 minutes.
	LoginTTL time.Duration
	// SessionIdle ends a session not used for this long; default 30
	// minutes. SessionMax ends any session; default 12 hours.
	SessionIdle, SessionMax time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Log is where the server says what it refused; default discards.
	Log *slog.Logger
	// Version is keyward's, shown in the footer.
	Version string
}

// Server is the dashboard of one keyward process.
type Server struct {
	api   *client.Client
	opt   Options
	pages map[string]*template.Template
	mux   *http.ServeMux

	prefix string // "/s/RANDOM": every page but the login is under it

	mu       sync.Mutex
	addr     string                 // the listener's address, for messages
	cookie   string                 // the session cookie's name: keyward_dashboard_PORT
	hosts    map[string]bool        // the Host values the page answers to
	logins   map[[32]byte]time.Time // a login token's hash -> until when it may be used
	sessions map[[32]byte]*session  // a session cookie's hash -> the session
	verified *verified              // the last verification of the audit log
	reviewed *reviewed              // the last review, kept a while (it costs a call per API key)
	refused  refusals               // what was refused lately, for the log
}

// New makes the dashboard of the keywardd api is connected to.
func New(api *client.Client, o Options) (*Server, error) {
	if o.LoginTTL <= 0 {
		o.LoginTTL = 10 * time.Minute
	}
	if o.SessionIdle <= 0 {
		o.SessionIdle = 30 * time.Minute
	}
	if o.SessionMax <= 0 {
		o.SessionMax = 12 * time.Hour
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{api: api, opt: o, prefix: "/s/" + rand.Text(), cookie: cookieName, hosts: map[string]bool{},
		logins: map[[32]byte]time.Time{}, sessions: map[[32]byte]*session{}}
	var err error
	if s.pages, err = parsePages(s.prefix); err != nil {
		return nil, err
	}
	s.routes()
	return s, nil
}

// Listen opens the page's listener on addr, which must be a loopback
// address ("127.0.0.1:0" picks a free port): the page is for the operator
// on this machine, never for the network.
func (s *Server) Listen(addr string) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dashboard: -listen %q: %w (say 127.0.0.1:PORT)", addr, err)
	}
	if !loopbackHost(host) {
		return nil, fmt.Errorf("dashboard: -listen %q is not a loopback address: the dashboard acts as you, so it listens on this machine only (127.0.0.1, [::1] or localhost)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	s.Allow(ln.Addr().String())
	return ln, nil
}

// Allow makes the page answer to requests naming addr ("127.0.0.1:PORT")
// as their Host, and to localhost, 127.0.0.1 and [::1] on the same port
// (an ssh tunnel's end may name any of them); its session cookie is named
// after the port, so that two dashboards do not end each other's.
func (s *Server) Allow(addr string) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, h := range []string{host, "127.0.0.1", "localhost", "::1"} {
		s.hosts[net.JoinHostPort(h, port)] = true
	}
	s.addr, s.cookie = net.JoinHostPort(host, port), cookieName+"_"+port
}

// Serve serves the page on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute,
		MaxHeaderBytes: 64 << 10, ErrorLog: slog.NewLogLogger(s.opt.Log.Handler(), slog.LevelWarn)}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	for {
		select {
		case err := <-errc:
			return err
		case <-tick.C:
			s.sweep()
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			hs.Shutdown(sctx)
			<-errc
			return nil
		}
	}
}

// ServeHTTP answers one request: refused unless it comes from loopback
// and names the page's own host; then, but for the login, only under the
// prefix, and there, but for the stylesheet, only within a session.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "same-origin") // not no-referrer: Chrome then sends Origin: null with the page's own forms
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	if !fromLoopback(r.RemoteAddr) {
		s.refuse(w, r, http.StatusForbidden, "the dashboard answers only on this machine's loopback")
		return
	}
	s.mu.Lock()
	hostOK, addr := s.hosts[r.Host], s.addr
	s.mu.Unlock()
	if !hostOK {
		// Another name resolving to 127.0.0.1 (DNS rebinding) would let a
		// web page elsewhere read this one.
		s.refuse(w, r, http.StatusMisdirectedRequest, fmt.Sprintf("this page answers to its own address only (http://%s/, or localhost or [::1] at its port): through a tunnel, keep the port the same on both ends", addr))
		return
	}
	path := r.URL.Path
	switch {
	case path != "/" && pathpkg.Clean(path) != strings.TrimSuffix(path, "/"):
		// Not its clean form (//x, x/../y): the mux below would redirect
		// to a clean path without the prefix.
		s.refuse(w, r, http.StatusNotFound, "no such page: write the path in its clean form")
	case path == s.prefix:
		http.Redirect(w, r, s.prefix+"/", http.StatusSeeOther)
	case path == "/login":
		if r.Method != http.MethodGet {
			// Not even HEAD: a link preview probing the URL would spend it.
			s.refuse(w, r, http.StatusMethodNotAllowed, "the login URL is opened with GET, in a browser")
			return
		}
		s.login(w, r)
	case strings.HasPrefix(path, s.prefix+"/"):
		in := new(http.Request)
		*in = *r
		u := *r.URL
		u.Path, u.RawPath = strings.TrimPrefix(path, s.prefix), ""
		in.URL = &u
		s.mux.ServeHTTP(w, in)
	default:
		s.refuse(w, r, http.StatusNotFound, "nothing here: open the login URL that keyward dashboard printed")
	}
}

// at is a page's path as the browser names it: under the prefix.
func (s *Server) at(path string) string { return s.prefix + path }

// refuse answers a refused request with a short page, and logs it: at
// most one line a second, with how many were not logged since, so that
// nobody on the machine can flood the operator's terminal.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, code int, why string) {
	if n, ok := s.refused.take(s.opt.Now()); ok {
		s.opt.Log.Warn("dashboard: request refused", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "status", code, "why", why,
			"not_logged_before", n)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	fmt.Fprintf(w, "%s: %s\n", http.StatusText(code), why)
}

// refusals paces the log of refused requests.
type refusals struct {
	mu     sync.Mutex
	last   time.Time
	missed int
}

// take says whether to log a refusal now, and how many were not logged
// since the last that was.
func (f *refusals) take(now time.Time) (int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if now.Sub(f.last) < time.Second {
		f.missed++
		return 0, false
	}
	n := f.missed
	f.last, f.missed = now, 0
	return n, true
}

func fromLoopback(remote string) bool {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func loopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// parsePages parses each page with the layout around it; {{base}} in a
// template is prefix, which every link and form action starts with.
func parsePages(prefix string) (map[string]*template.Template, error) {
	fm := template.FuncMap{"base": func() string { return prefix }}
	for k, v := range funcs {
		fm[k] = v
	}
	names, err := fs.Glob(templateFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	pages := map[string]*template.Template{}
	for _, n := range names {
		base := strings.TrimSuffix(strings.TrimPrefix(n, "templates/"), ".html")
		if base == "layout" {
			continue
		}
		t, err := template.New(base).Funcs(fm).ParseFS(templateFS, "templates/layout.html", n)
		if err != nil {
			return nil, fmt.Errorf("dashboard: %s: %w", n, err)
		}
		pages[base] = t
	}
	return pages, nil
}

// view is what every page's template gets.
type view struct {
	Title   string
	Nav     string // the menu entry to mark
	CSRF    string
	Nonce   string // for the forms that make a secret: good once
	Flash   string
	FlashOK bool
	Version string
	Now     time.Time
	Data    any
}

// render writes a page; a template that fails writes nothing of it.
func (s *Server) render(w http.ResponseWriter, r *http.Request, code int, page, title string, data any) {
	v := view{Title: title, Nav: page, Version: s.opt.Version, Now: s.opt.Now(), Data: data}
	if ss := sessionFrom(r); ss != nil {
		v.CSRF = ss.csrf
		v.Flash, v.FlashOK = s.takeFlash(ss)
		v.Nonce = s.newNonce(ss)
	}
	var b bytes.Buffer
	if err := s.pages[page].ExecuteTemplate(&b, "layout", v); err != nil {
		s.opt.Log.Error("dashboard: a page failed to render", "page", page, "err", err)
		http.Error(w, "the page failed to render: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	w.Write(b.Bytes())
}

// problem is what a page shows where keywardd refused or failed a call:
// the refusal as keywardd said it (a denial names the operation the
// policy does not grant).
func problem(err error) string {
	if err == nil {
		return ""
	}
	st, ok := status.FromError(err)
	switch {
	case !ok:
		return err.Error()
	case st.Code() == codes.Unavailable && strings.Contains(st.Message(), "connection error"):
		return "keywardd is not answering on its socket: start it (systemctl start keywardd), or run keyward dashboard with the --socket it serves"
	case st.Code() == codes.DeadlineExceeded:
		return "keywardd did not answer in time: " + st.Message()
	}
	return fmt.Sprintf("%s: %s", st.Code(), st.Message())
}
