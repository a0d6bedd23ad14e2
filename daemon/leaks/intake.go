package leaks

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
)

// Path is where the intake takes GitHub's secret scanning reports.
const Path = "/leaks/github"

// Reporter acts on a leaked secret: daemon/apikeys.Manager.
type Reporter interface {
	ReportLeak(ctx context.Context, presented string, l apikeys.Leak, allow func(id, owner string) error) (apikeys.LeakVerdict, error)
}

// Auditor writes audit records: daemon/audit.Log.
type Auditor interface {
	Append(ctx context.Context, r audit.Record) error
}

// Options make an Intake.
type Options struct {
	Keys     *Keys
	Reporter Reporter
	Audit    Auditor
	// Caller is keywardd itself, the caller of the audit records.
	Caller audit.Caller
	Log    *slog.Logger
	// Now is the clock; time.Now if nil.
	Now func() time.Time
	// MaxBody and ReplayWindow: Config's, with its defaults.
	MaxBody      int64
	ReplayWindow time.Duration
}

// Limits on requests that fail before their signature is verified (or
// fail it): per source address, and for all sources together.
var (
	perSource      = rate.Every(time.Second)
	perSourceBurst = 20
	allSources     = rate.Limit(20)
	allBurst       = 100
)

// maxSeen bounds the reports remembered for replays; maxSources the
// source addresses whose failures are counted.
const (
	maxSeen    = 10_000
	maxSources = 10_000
)

// Intake is the HTTP handler of the secret scanners' reports.
type Intake struct {
	o Options

	mu   sync.Mutex
	seen map[[32]byte]answered // reports handled, by their body's SHA-256

	limMu   sync.Mutex
	sources map[string]*rate.Limiter
	all     *rate.Limiter
}

type answered struct {
	body    []byte
	expires time.Time
}

// New returns an Intake.
func New(o Options) *Intake {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxBody <= 0 {
		o.MaxBody = DefaultMaxBody
	}
	return &Intake{o: o, seen: map[[32]byte]answered{}, sources: map[string]*rate.Limiter{}, all: rate.NewLimiter(allSources, allBurst)}
}

// Handler serves the intake at Path, nothing else.
func (in *Intake) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(Path, in)
	return mux
}

// refuse answers a request that failed before or at its signature, and
// counts it against its source.
func (in *Intake) refuse(w http.ResponseWriter, r *http.Request, code int, msg string) {
	in.failed(source(r))
	in.o.Log.Warn("a secret scanning report was refused", "from", r.RemoteAddr, "status", code, "reason", msg)
	http.Error(w, msg, code)
}

func source(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// limited says whether a source, or all of them, failed too often lately.
func (in *Intake) limited(src string) bool {
	in.limMu.Lock()
	defer in.limMu.Unlock()
	now := in.o.Now()
	if in.all.TokensAt(now) < 1 {
		return true
	}
	l := in.sources[src]
	return l != nil && l.TokensAt(now) < 1
}

func (in *Intake) failed(src string) {
	in.limMu.Lock()
	defer in.limMu.Unlock()
	now := in.o.Now()
	in.all.AllowN(now, 1)
	l := in.sources[src]
	if l == nil {
		if len(in.sources) >= maxSources {
			for s, old := range in.sources { // forget sources whose bucket is full again
				if old.TokensAt(now) >= float64(perSourceBurst) {
					delete(in.sources, s)
				}
			}
		}
		if len(in.sources) >= maxSources {
			return // the limit on all sources still holds
		}
		l = rate.NewLimiter(perSource, perSourceBurst)
		in.sources[src] = l
	}
	l.AllowN(now, 1)
}

// ServeHTTP takes a report: POST, a body of at most MaxBody bytes, signed
// by a key of Keys. The signature is verified before anything else is
// done with the body; then each token is looked up and, if it is a key's
// secret, the key stopped (Reporter). The answer labels each token.
func (in *Intake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if in.limited(source(r)) {
		w.Header().Set("Retry-After", "5")
		http.Error(w, "too many refused reports from this address lately; try again later", http.StatusTooManyRequests)
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		in.refuse(w, r, http.StatusMethodNotAllowed, "a secret scanning report is a POST")
		return
	}
	id, sigHeader := r.Header.Get("Github-Public-Key-Identifier"), r.Header.Get("Github-Public-Key-Signature")
	if id == "" || sigHeader == "" {
		in.refuse(w, r, http.StatusUnauthorized, ErrNoSignature.Error())
		return
	}
	if len(id) > maxKeyID {
		in.refuse(w, r, http.StatusUnauthorized, ErrUnknownKey.Error())
		return
	}
	sig, err := ParseSignature(sigHeader)
	if err != nil {
		in.refuse(w, r, http.StatusUnauthorized, err.Error())
		return
	}
	body, err := readBody(w, r, in.o.MaxBody)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			in.refuse(w, r, http.StatusRequestEntityTooLarge, fmt.Sprintf("leaks: a report is at most %d bytes (leaks.max_body)", in.o.MaxBody))
			return
		}
		in.refuse(w, r, http.StatusBadRequest, "leaks: the report's body could not be read")
		return
	}
	if err := in.o.Keys.Verify(id, body, sig); err != nil {
		in.refuse(w, r, http.StatusUnauthorized, err.Error())
		return
	}
	// Signed by the scanner from here on.
	digest := sha256.Sum256(body)
	if b, ok := in.replayed(digest); ok {
		in.o.Log.Info("a secret scanning report seen before was answered from memory, not handled again", "key_identifier", id)
		writeJSON(w, b)
		return
	}
	found, err := ParsePayload(body)
	if err != nil {
		in.o.Log.Warn("a signed secret scanning report does not parse", "key_identifier", id, "error", err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	labels, err := in.handle(r.Context(), id, r.RemoteAddr, found)
	if err != nil {
		in.o.Log.Error("a secret scanning report could not be handled; the scanner should send it again", "key_identifier", id, "error", err.Error())
		w.Header().Set("Retry-After", "10")
		http.Error(w, "leaks: the report could not be handled now; send it again", http.StatusServiceUnavailable)
		return
	}
	b, _ := json.Marshal(labels) // strings only: cannot fail
	in.remember(digest, b)
	writeJSON(w, b)
}

func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	if r.ContentLength > limit {
		return nil, &http.MaxBytesError{Limit: limit}
	}
	return io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
}

func writeJSON(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Write(b)
}

// handle reports each token, and audits each key found and the report.
// An error (the store or the HSM failed, or the audit log) leaves what
// was done done: a report sent again finds those keys stopped already.
func (in *Intake) handle(ctx context.Context, keyID, from string, found []Found) ([]Label, error) {
	labels := make([]Label, 0, len(found))
	var keys []string
	for _, f := range found {
		l := apikeys.Leak{Source: "github", URL: f.URL, Type: f.Type}
		if f.Source != "" {
			l.Source += ":" + f.Source
		}
		v, err := in.o.Reporter.ReportLeak(ctx, f.Token, l, nil)
		if err != nil {
			return nil, err
		}
		label := Label{TokenRaw: f.Token, TokenType: f.Type, Label: FalsePositive}
		if v.TruePositive {
			label.Label = TruePositive
			keys = append(keys, v.KeyID)
			rec := audit.Record{Time: in.o.Now().UTC(), Caller: in.o.Caller, Op: "keywardd.APIKeyLeak", Key: v.Owner, APIKey: v.KeyID,
				Outcome: "ok", Result: "TRUE_POSITIVE", Detail: l.Describe() + ", signed by the scanner's key " + keyID + ": " + v.Reason}
			if err := in.o.Audit.Append(ctx, rec); err != nil {
				return nil, fmt.Errorf("leaks: auditing the leak of %s: %w", v.KeyID, err)
			}
			if v.Changed {
				in.o.Log.Warn("an API key was found leaked and stopped", "key_id", v.KeyID, "owner", v.Owner, "state", string(v.State), "found", l.Describe())
			}
		}
		labels = append(labels, label)
	}
	rec := audit.Record{Time: in.o.Now().UTC(), Caller: in.o.Caller, Op: "keywardd.LeakReport", Items: len(found), Outcome: "ok",
		Detail: fmt.Sprintf("a secret scanning report signed by the scanner's key %s, from %s: %d tokens, %d of them keys of this daemon %v", keyID, from, len(found), len(keys), keys)}
	if err := in.o.Audit.Append(ctx, rec); err != nil {
		return nil, fmt.Errorf("leaks: auditing the report: %w", err)
	}
	in.o.Log.Info("a secret scanning report was handled", "key_identifier", keyID, "tokens", len(found), "true_positives", keys)
	return labels, nil
}

// replayed is the answer to a report handled within the replay window.
func (in *Intake) replayed(d [32]byte) ([]byte, bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	a, ok := in.seen[d]
	if !ok || !in.o.Now().Before(a.expires) {
		return nil, false
	}
	return a.body, true
}

func (in *Intake) remember(d [32]byte, body []byte) {
	if in.o.ReplayWindow <= 0 {
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	now := in.o.Now()
	if len(in.seen) >= maxSeen {
		for k, a := range in.seen {
			if !now.Before(a.expires) {
				delete(in.seen, k)
			}
		}
		for k := range in.seen { // still full: make room, any one
			if len(in.seen) < maxSeen {
				break
			}
			delete(in.seen, k)
		}
	}
	in.seen[d] = answered{body: body, expires: now.Add(in.o.ReplayWindow)}
}
