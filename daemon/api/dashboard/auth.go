package dashboard

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// cookieName is the session cookie's name, before the port (Allow).
const cookieName = "keyward_dashboard"

// maxNonces is how many unused form nonces a session keeps (one per page
// shown, each for SessionIdle; past that many the oldest go first), and
// maxSpent how many spent ones it remembers, to say a form was sent
// already.
const (
	maxNonces = 1024
	maxSpent  = 64
)

// nonce is a page's nonce, and when it was given.
type nonce struct {
	n     string
	given time.Time
}

// session is a browser logged in through a login URL.
type session struct {
	csrf     string // the token every form carries
	started  time.Time
	lastSeen time.Time
	flash    string // a message for the next page, once
	flashOK  bool
	nonces   []nonce  // good once each, for every form
	spent    []string // the last ones used
	secret   *secretOnce
}

// secretOnce is a secret just made, kept until its page shows it once.
type secretOnce struct {
	data secretData
	made time.Time
}

type sessionKey struct{}

// sessionFrom is the request's session, set by within.
func sessionFrom(r *http.Request) *session {
	s, _ := r.Context().Value(sessionKey{}).(*session)
	return s
}

// NewLogin makes a login URL's token: it works once, within LoginTTL.
// base is the page's address ("http://127.0.0.1:PORT").
func (s *Server) NewLogin(base string) string {
	tok := rand.Text() + rand.Text() // 2 × 26 base32 digits: 260 bits
	s.mu.Lock()
	s.logins[sha256.Sum256([]byte(tok))] = s.opt.Now().Add(s.opt.LoginTTL)
	s.mu.Unlock()
	return base + "/login?" + url.Values{"token": {tok}}.Encode()
}

// login turns a login URL's token into a session: the token is spent
// whether or not the browser keeps the cookie.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	tok := r.URL.Query().Get("token")
	h := sha256.Sum256([]byte(tok))
	now := s.opt.Now()
	s.mu.Lock()
	until, ok := s.logins[h]
	delete(s.logins, h)
	s.mu.Unlock()
	if !ok || tok == "" || now.After(until) {
		s.refuse(w, r, http.StatusForbidden, "this login URL was used already or has expired: run keyward dashboard again for a new one")
		return
	}
	sid := rand.Text() + rand.Text()
	ss := &session{csrf: rand.Text() + rand.Text(), started: now, lastSeen: now}
	s.mu.Lock()
	s.sessions[sha256.Sum256([]byte(sid))] = ss
	name := s.cookie
	s.mu.Unlock()
	// Scoped to the prefix's path, which no other server learns: a
	// browser sends 127.0.0.1's cookies to every port of it. No Max-Age:
	// the browser keeps it in memory only, and the server ends it anyway.
	http.SetCookie(w, &http.Cookie{Name: name, Value: sid, Path: s.prefix + "/", HttpOnly: true, SameSite: http.SameSiteStrictMode})
	// A page, not a redirect: a SameSite=Strict cookie set in answer to a
	// navigation from elsewhere (the login file, a terminal) is not sent
	// along that navigation's redirects; this page's own navigation is
	// same-site, so the cookie goes with it.
	home := s.at("/")
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, `<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=%s"><title>keyward</title></head><body><p>Logged in. <a href="%s">Open the dashboard</a>.</p></body></html>`, home, home)
}

// within runs next only in a session, and for a POST only with the
// session's CSRF token from this page itself.
func (s *Server) within(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		name := s.cookie
		s.mu.Unlock()
		c, err := r.Cookie(name)
		if err != nil {
			s.refuse(w, r, http.StatusUnauthorized, "no session: open the login URL that keyward dashboard printed")
			return
		}
		h := sha256.Sum256([]byte(c.Value))
		now := s.opt.Now()
		s.mu.Lock()
		ss := s.sessions[h]
		if ss != nil && (now.Sub(ss.lastSeen) > s.opt.SessionIdle || now.Sub(ss.started) > s.opt.SessionMax) {
			delete(s.sessions, h)
			ss = nil
		}
		if ss != nil {
			ss.lastSeen = now
		}
		s.mu.Unlock()
		if ss == nil {
			s.refuse(w, r, http.StatusUnauthorized, "the session has ended: run keyward dashboard again for a new login URL")
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if why := s.forged(r, ss); why != "" {
				s.refuse(w, r, http.StatusForbidden, why)
				return
			}
			if why := s.takeNonce(ss, r.PostForm.Get("nonce")); why != "" {
				s.stale(w, r, ss, why)
				return
			}
		}
		next(w, r.WithContext(context.WithValue(r.Context(), sessionKey{}, ss)))
	}
}

// forged says why a state-changing request is not the page's own form,
// or "" if it is.
func (s *Server) forged(r *http.Request, ss *session) string {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" {
		return "a request from another site (Sec-Fetch-Site: " + site + ")"
	}
	if o := r.Header.Get("Origin"); o != "" && o != "http://"+r.Host {
		return "a request from another origin (" + o + ")"
	}
	r.Body = http.MaxBytesReader(nil, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		return "the form does not parse: " + err.Error()
	}
	if subtle.ConstantTimeCompare([]byte(r.PostForm.Get("csrf")), []byte(ss.csrf)) != 1 {
		return "the form's CSRF token is missing or wrong: reload the page and try again"
	}
	return ""
}

// logout ends the session.
func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	name := s.cookie
	if c, err := r.Cookie(name); err == nil {
		delete(s.sessions, sha256.Sum256([]byte(c.Value)))
	}
	s.mu.Unlock()
	http.SetCookie(w, &http.Cookie{Name: name, Value: "", Path: s.prefix + "/", HttpOnly: true, SameSite: http.SameSiteStrictMode, MaxAge: -1})
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("Logged out. Run keyward dashboard again for a new login URL.\n"))
}

// flash keeps a message for the session's next page.
func (s *Server) flash(r *http.Request, ok bool, msg string) {
	if ss := sessionFrom(r); ss != nil {
		s.mu.Lock()
		ss.flash, ss.flashOK = msg, ok
		s.mu.Unlock()
	}
}

func (s *Server) takeFlash(ss *session) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := ss.flash, ss.flashOK
	ss.flash = ""
	return m, ok
}

// newNonce is a nonce for the forms of the page about to be shown: every
// form is taken once, so that a reload or a second click does not act
// twice (a second panic rotation would retire the version the first one
// made; a second create makes a key nobody has the secret of).
func (s *Server) newNonce(ss *session) string {
	n := rand.Text()
	now := s.opt.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	ss.nonces = slices.DeleteFunc(ss.nonces, func(x nonce) bool { return now.Sub(x.given) > s.opt.SessionIdle })
	if len(ss.nonces) >= maxNonces {
		ss.nonces = ss.nonces[1:]
	}
	ss.nonces = append(ss.nonces, nonce{n, now})
	return n
}

// takeNonce spends a form's nonce: "" if it was good, else why not.
func (s *Server) takeNonce(ss *session, n string) string {
	now := s.opt.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, m := range ss.nonces {
		if subtle.ConstantTimeCompare([]byte(m.n), []byte(n)) == 1 && now.Sub(m.given) <= s.opt.SessionIdle {
			ss.nonces = slices.Delete(ss.nonces, i, i+1)
			if len(ss.spent) >= maxSpent {
				ss.spent = ss.spent[1:]
			}
			ss.spent = append(ss.spent, n)
			return ""
		}
	}
	if n != "" && slices.Contains(ss.spent, n) {
		return "this form was sent already (a reload, or a second click): nothing more was done; open the page again to do it again"
	}
	return "this form is too old, or not this page's: nothing was done; open the page again"
}

// stale answers a form whose nonce is spent or old: back to the page it
// came from (its Referer, if it is one of this page's), saying so; else a
// short page.
func (s *Server) stale(w http.ResponseWriter, r *http.Request, ss *session, why string) {
	if ref, err := url.Parse(r.Referer()); err == nil && ref.Host == r.Host && strings.HasPrefix(ref.Path, s.prefix+"/") {
		s.mu.Lock()
		ss.flash, ss.flashOK = why, false
		s.mu.Unlock()
		http.Redirect(w, r, ref.RequestURI(), http.StatusSeeOther)
		return
	}
	s.refuse(w, r, http.StatusConflict, why)
}

// keepSecret holds a secret just made for the page that shows it once.
func (s *Server) keepSecret(r *http.Request, d secretData) {
	if ss := sessionFrom(r); ss != nil {
		s.mu.Lock()
		ss.secret = &secretOnce{data: d, made: s.opt.Now()}
		s.mu.Unlock()
	}
}

// secretKept is how long a secret waits for its page.
const secretKept = time.Minute

// takeSecret hands out the secret kept for key id, once, within a
// minute of its making; late says it was kept and not shown in time.
func (s *Server) takeSecret(r *http.Request, id string) (d secretData, ok, late bool) {
	ss := sessionFrom(r)
	if ss == nil {
		return secretData{}, false, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k := ss.secret
	if k == nil || k.data.Key.GetId() != id {
		return secretData{}, false, false
	}
	ss.secret = nil
	if s.opt.Now().Sub(k.made) >= secretKept {
		return secretData{}, false, true
	}
	return k.data, true, false
}

// sweep drops what has ended: logins past their time, sessions past
// theirs, secrets not shown within their minute. Serve runs it every
// minute, so that nothing lingers in memory for the process's life.
func (s *Server) sweep() {
	now := s.opt.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for h, until := range s.logins {
		if now.After(until) {
			delete(s.logins, h)
		}
	}
	for h, ss := range s.sessions {
		if now.Sub(ss.lastSeen) > s.opt.SessionIdle || now.Sub(ss.started) > s.opt.SessionMax {
			delete(s.sessions, h)
			continue
		}
		if ss.secret != nil && now.Sub(ss.secret.made) >= secretKept {
			ss.secret = nil
		}
	}
}
