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
	// MaxBody, ReplayWindow and MaxInFlight: Config's, with its defaults.
	// A ReplayWindow of 0 keeps no replay memory.
	MaxBody      int64
	ReplayWindow time.Duration
	MaxInFlight  int
}

// Limits on refused requests, per source address and for all sources
// together. They decide only how a refused request is answered (429 and
// no log line, past them) and never refuse a request: a report whose
// signature verifies is always handled, whatever came before it.
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

	// slots bound the requests whose body is read or handled at once.
	slots chan struct{}
	full  rate.Sometimes // logs of requests refused for want of a slot

	mu   sync.Mutex
	seen map[[32]byte]answered // reports handled, by their body's SHA-256

	limMu    sync.Mutex
	sources  map[string]*rate.Limiter
	all      *rate.Limiter
	unlogged int // refusals past the limits since the last one logged
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
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultMaxInFlight
	}
	return &Intake{o: o, slots: make(chan struct{}, o.MaxInFlight), full: rate.Sometimes{Interval: 10 * time.Second},
		seen: map[[32]byte]answered{}, sources: map[string]*rate.Limiter{}, all: rate.NewLimiter(allSources, allBurst)}
}

// Handler serves the intake at Path, nothing else.
func (in *Intake) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(Path, in)
	return mux
}

// refuse answers a request that failed before or at its signature, and
// counts it against its source. Within the limits it gets its own status
// and a log line; past them, 429 with the same reason and no log line, so
// that a flood of garbage costs neither log volume nor more than a map
// update.
func (in *Intake) refuse(w http.ResponseWriter, r *http.Request, code int, msg string) {
	dropConnection(w)
	over, unlogged := in.failed(source(r))
	if over != "" {
		w.Header().Set("Retry-After", "5")
		http.Error(w, fmt.Sprintf("%s; too many requests %s were refused lately: wait before sending more", msg, over), http.StatusTooManyRequests)
		return
	}
	in.o.Log.Warn("a secret scanning report was refused", "from", r.RemoteAddr, "status", code, "reason", msg, "refused_unlogged_before", unlogged)
	http.Error(w, msg, code)
}

func source(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// failed counts a refusal of src. Past a limit it says which ("from this
// address", "from all addresses"); within them it gives the count of the
// refusals not logged since the last one that was, and resets it.
func (in *Intake) failed(src string) (over string, unlogged int) {
	in.limMu.Lock()
	defer in.limMu.Unlock()
	now := in.o.Now()
	l := in.sources[src]
	if l == nil {
		if len(in.sources) >= maxSources {
			for s, old := range in.sources { // forget sources whose bucket is full again
				if old.TokensAt(now) >= float64(perSourceBurst) {
					delete(in.sources, s)
				}
			}
		}
		if len(in.sources) < maxSources { // else the limit on all sources still holds
			l = rate.NewLimiter(perSource, perSourceBurst)
			in.sources[src] = l
		}
	}
	switch {
	case l != nil && !l.AllowN(now, 1):
		over = "from this address"
	case !in.all.AllowN(now, 1):
		over = "from all addresses"
	default:
		unlogged, in.unlogged = in.unlogged, 0
		return "", unlogged
	}
	in.unlogged++
	return over, 0
}

// ServeHTTP takes a report: POST, a body of at most MaxBody bytes, signed
// by a key of Keys. What the headers alone can refuse is refused before
// the body is read (the method, the signature's headers, an identifier
// not in Keys, a Content-Length over MaxBody); then the request takes one
// of MaxInFlight slots (none free: 503) and its body is read. The
// signature is verified before anything else is done with the body; then
// each token is looked up and, if it is a key's secret, the key stopped
// (Reporter). The answer labels each token.
func (in *Intake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		in.refuse(w, r, http.StatusMethodNotAllowed, "leaks: a secret scanning report is a POST")
		return
	}
	id, sigHeader := r.Header.Get("Github-Public-Key-Identifier"), r.Header.Get("Github-Public-Key-Signature")
	if id == "" || sigHeader == "" {
		in.refuse(w, r, http.StatusUnauthorized, ErrNoSignature.Error())
		return
	}
	if len(id) > maxKeyID || !in.o.Keys.Known(id) {
		in.refuse(w, r, http.StatusUnauthorized, ErrUnknownKey.Error())
		return
	}
	sig, err := ParseSignature(sigHeader)
	if err != nil {
		in.refuse(w, r, http.StatusUnauthorized, err.Error())
		return
	}
	if r.ContentLength > in.o.MaxBody {
		in.refuse(w, r, http.StatusRequestEntityTooLarge, in.tooBig())
		return
	}
	select {
	case in.slots <- struct{}{}:
		defer func() { <-in.slots }()
	default:
		in.full.Do(func() {
			in.o.Log.Warn("secret scanning reports are refused with 503: the intake is reading or handling as many as it takes at once", "max_in_flight", in.o.MaxInFlight)
		})
		dropConnection(w)
		w.Header().Set("Retry-After", "2")
		http.Error(w, fmt.Sprintf("leaks: keywardd is taking %d reports already (leaks.max_in_flight); send it again shortly", in.o.MaxInFlight), http.StatusServiceUnavailable)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, in.o.MaxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			in.refuse(w, r, http.StatusRequestEntityTooLarge, in.tooBig())
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

// dropConnection has the server close the connection after the answer.
// Without it net/http reads what is left of an unread body (up to 256 KiB)
// before it answers, waiting on a sender that trickles it: a request
// refused on its headers would hold the connection as long as one read.
func dropConnection(w http.ResponseWriter) {
	w.Header().Set("Connection", "close")
}

func (in *Intake) tooBig() string {
	return fmt.Sprintf("leaks: a report is at most %d bytes (leaks.max_body)", in.o.MaxBody)
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
