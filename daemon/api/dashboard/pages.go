package dashboard

import (
	"context"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/api/client/rewrap"
	"github.com/keyward/keyward/daemon/api/review"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
)

// callTimeout bounds each call a page makes to keywardd.
const callTimeout = 30 * time.Second

func (s *Server) routes() {
	m := http.NewServeMux()
	m.HandleFunc("GET /static/style.css", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFileFS(w, r, staticFS, "static/style.css")
	})
	m.HandleFunc("POST /logout", s.within(s.logout))
	m.HandleFunc("GET /{$}", s.within(s.overview))
	m.HandleFunc("GET /keys", s.within(s.keys))
	m.HandleFunc("POST /keys/{name}/rotate", s.within(s.keyAction))
	m.HandleFunc("POST /keys/{name}/enable", s.within(s.keyAction))
	m.HandleFunc("POST /keys/{name}/disable", s.within(s.keyAction))
	m.HandleFunc("POST /keys/{name}/schedule-deletion", s.within(s.keyAction))
	m.HandleFunc("POST /keys/{name}/cancel-deletion", s.within(s.keyAction))
	m.HandleFunc("GET /keys/{name}/panic-rotate", s.within(s.panicDryRun))
	m.HandleFunc("POST /keys/{name}/panic-rotate", s.within(s.keyAction))
	m.HandleFunc("GET /apikeys", s.within(s.apiKeys))
	m.HandleFunc("GET /apikeys/new", s.within(s.apiKeyForm))
	m.HandleFunc("POST /apikeys", s.within(s.apiKeyCreate))
	m.HandleFunc("GET /apikeys/revoke", s.within(s.bulkDryRun))
	m.HandleFunc("POST /apikeys/revoke", s.within(s.bulkRevoke))
	m.HandleFunc("GET /apikeys/{id}", s.within(s.apiKey))
	m.HandleFunc("GET /apikeys/{id}/secret", s.within(s.apiKeySecret))
	m.HandleFunc("POST /apikeys/{id}/rotate", s.within(s.apiKeyRotate))
	m.HandleFunc("POST /apikeys/{id}/revoke", s.within(s.apiKeyRevoke))
	m.HandleFunc("GET /tokens", s.within(s.tokens))
	m.HandleFunc("POST /tokens/revoke", s.within(s.tokenRevoke))
	m.HandleFunc("GET /credentials", s.within(s.credentials))
	m.HandleFunc("POST /credentials/{name}/rotate", s.within(s.credentialRotate))
	m.HandleFunc("GET /rotation", s.within(s.rotation))
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.refuse(w, r, http.StatusNotFound, "no such page of the dashboard")
	})
	m.HandleFunc("GET /review", s.within(s.review))
	m.HandleFunc("GET /audit", s.within(s.audit))
	m.HandleFunc("POST /audit/verify", s.within(s.auditVerify))
	s.mux = m
}

// ctx is a request's context for its calls to keywardd.
func ctx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), callTimeout)
}

// done ends an action: its outcome for the next page, which the browser
// is sent to (a POST that succeeds never renders, so a reload repeats
// nothing; one whose form is wrong shows the form again, and does
// nothing).
func (s *Server) done(w http.ResponseWriter, r *http.Request, to string, err error, ok string) {
	if err != nil {
		s.flash(r, false, problem(err))
	} else {
		s.flash(r, true, ok)
	}
	http.Redirect(w, r, s.at(to), http.StatusSeeOther)
}

// ---- overview

// alert is one thing the overview asks the operator to look at, and
// where (a page of the dashboard; empty: nowhere more to see).
type alert struct{ What, Detail, Link string }

type overviewData struct {
	Status    *keywardv1.GetStatusResponse
	StatusErr string
	Alerts    []alert
	AlertsErr []string // the parts the caller may not read
}

func (s *Server) overview(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	d := overviewData{}
	st, err := s.api.Status.GetStatus(c, &keywardv1.GetStatusRequest{})
	d.Status, d.StatusErr = st, problem(err)
	if st != nil {
		if h := st.GetHsm(); !h.GetHealthy() {
			d.Alerts = append(d.Alerts, alert{"HSM unhealthy", h.GetError(), ""})
		}
		if e := st.GetStore().GetError(); e != "" {
			d.Alerts = append(d.Alerts, alert{"store refusing calls", e, ""})
		}
		if e := st.GetAuditCheckpointError(); e != "" {
			d.Alerts = append(d.Alerts, alert{"audit log not MACed", e, ""})
		}
		for _, p := range st.GetPlugins() {
			if p.GetState() != "running" {
				d.Alerts = append(d.Alerts, alert{"plugin " + p.GetName() + " " + p.GetState(), p.GetLastError(), ""})
			}
			if p.GetDeliveryError() != "" {
				d.Alerts = append(d.Alerts, alert{fmt.Sprintf("plugin %s: %d events waiting", p.GetName(), p.GetEventsPending()), p.GetDeliveryError(), ""})
			}
		}
		for kind, n := range st.GetNamesToRename() {
			d.Alerts = append(d.Alerts, alert{"names to rename", fmt.Sprintf("%d %s names not in their canonical form (docs/operations.md)", n, kind), ""})
		}
	}
	plan, err := keywardv1.NewRotationServiceClient(s.api.Conn()).GetRotationPlan(c, &keywardv1.GetRotationPlanRequest{})
	if err != nil {
		d.AlertsErr = append(d.AlertsErr, "rotation plan: "+problem(err))
	}
	for _, ro := range plan.GetRotations() {
		if ro.GetOverdue() {
			d.Alerts = append(d.Alerts, alert{fmt.Sprintf("%s %s past its rotation date", strings.ReplaceAll(ro.GetKind(), "_", " "), ro.GetId()),
				fmt.Sprintf("due %s; last run: %s", fmtTime(ro.GetDueTime()), or(ro.GetOutcome(), "none yet")), "/rotation"})
		}
	}
	// Anomalies keywardd noticed in the last week (its audit records).
	an, err := s.api.Audit.ListAuditRecords(c, &keywardv1.ListAuditRecordsRequest{Operation: "keywardd.APIKeyAnomaly",
		SinceTime: timestamppb.New(s.opt.Now().Add(-7 * 24 * time.Hour)), PageSize: 20})
	if err != nil {
		d.AlertsErr = append(d.AlertsErr, "anomalies (the audit log): "+problem(err))
	}
	for _, rec := range an.GetRecords() {
		d.Alerts = append(d.Alerts, alert{"anomaly on API key " + or(rec.GetApiKeyId(), rec.GetKey()), fmtTime(rec.GetTime()) + ": " + rec.GetDetail(),
			"/audit?" + url.Values{"op": {"keywardd.APIKeyAnomaly"}, "since": {"7d"}}.Encode()})
	}
	keys, err := s.listAPIKeys(c, &keywardv1.ListAPIKeysRequest{State: keywardv1.APIKeyState_API_KEY_STATE_ACTIVE}, 5000)
	if err != nil {
		d.AlertsErr = append(d.AlertsErr, "API keys: "+problem(err))
	}
	for _, k := range keys {
		q := k.GetQuota()
		switch {
		case q == nil:
		case q.GetRemaining() <= 0:
			d.Alerts = append(d.Alerts, alert{"API key " + k.GetId() + " used up its quota", k.GetName() + ", owner " + k.GetOwner(), "/apikeys/" + k.GetId()})
		case q.GetRefill() > 0 && q.GetRemaining()*10 < q.GetRefill():
			d.Alerts = append(d.Alerts, alert{"API key " + k.GetId() + " near its quota", fmt.Sprintf("%d uses left of %d", q.GetRemaining(), q.GetRefill()), "/apikeys/" + k.GetId()})
		}
		if t := k.GetExpireTime(); t != nil && t.AsTime().Sub(s.opt.Now()) < 7*24*time.Hour {
			d.Alerts = append(d.Alerts, alert{"API key " + k.GetId() + " expires soon", fmtTime(t) + ", " + k.GetName() + ", owner " + k.GetOwner(), "/apikeys/" + k.GetId()})
		}
	}
	s.render(w, r, http.StatusOK, "overview", "Overview", d)
}

// listAPIKeys pages through ListAPIKeys, up to max keys.
func (s *Server) listAPIKeys(c context.Context, req *keywardv1.ListAPIKeysRequest, max int) ([]*keywardv1.APIKey, error) {
	var out []*keywardv1.APIKey
	req.PageSize = 1000
	for len(out) < max {
		resp, err := s.api.APIKeys.ListAPIKeys(c, req)
		if err != nil {
			return out, err
		}
		out = append(out, resp.GetKeys()...)
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	return out, nil
}

// ---- root and signing keys

type keysData struct {
	Keys []*keywardv1.Key
	Err  string
}

func (s *Server) keys(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	resp, err := s.api.Keys.ListKeys(c, &keywardv1.ListKeysRequest{})
	s.render(w, r, http.StatusOK, "keys", "Keys", keysData{Keys: resp.GetKeys(), Err: problem(err)})
}

func (s *Server) keyAction(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	name := r.PathValue("name")
	action := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
	var err error
	var ok string
	switch action {
	case "rotate":
		var resp *keywardv1.RotateKeyResponse
		resp, err = s.api.Keys.RotateKey(c, &keywardv1.RotateKeyRequest{Name: name})
		ok = fmt.Sprintf("%s rotated: version %d is the newest", name, resp.GetKey().GetLatestVersion())
	case "enable", "disable":
		st := keywardv1.KeyState_KEY_STATE_ENABLED
		if action == "disable" {
			st = keywardv1.KeyState_KEY_STATE_DISABLED
		}
		_, err = s.api.Keys.SetKeyState(c, &keywardv1.SetKeyStateRequest{Name: name, State: st})
		ok = fmt.Sprintf("%s %sd", name, action)
	case "schedule-deletion":
		days, perr := strconv.Atoi(r.PostForm.Get("days"))
		if perr != nil || days < 1 {
			s.done(w, r, "/keys", fmt.Errorf("the waiting period is a whole number of days (at least 7)"), "")
			return
		}
		var resp *keywardv1.ScheduleKeyDeletionResponse
		resp, err = s.api.Keys.ScheduleKeyDeletion(c, &keywardv1.ScheduleKeyDeletionRequest{Name: name, WaitingPeriod: durationpb.New(time.Duration(days) * 24 * time.Hour)})
		ok = fmt.Sprintf("%s will be deleted at %s unless the deletion is cancelled", name, fmtTime(resp.GetKey().GetDeletionTime()))
	case "cancel-deletion":
		_, err = s.api.Keys.CancelKeyDeletion(c, &keywardv1.CancelKeyDeletionRequest{Name: name})
		ok = fmt.Sprintf("%s is kept: its deletion is cancelled", name)
	case "panic-rotate":
		if r.PostForm.Get("confirm") != name {
			s.done(w, r, "/keys/"+url.PathEscape(name)+"/panic-rotate", fmt.Errorf("type the key's name to confirm the panic rotation"), "")
			return
		}
		var resp *keywardv1.PanicRotateResponse
		resp, err = keywardv1.NewRotationServiceClient(s.api.Conn()).PanicRotate(c, &keywardv1.PanicRotateRequest{Name: name})
		ok = fmt.Sprintf("%s panic-rotated: version %d, versions %v retired", name, resp.GetNewVersion(), resp.GetRetiredVersions())
	}
	s.done(w, r, "/keys", err, ok)
}

type panicData struct {
	Name   string
	DryRun *keywardv1.PanicRotateResponse
	Err    string
}

// panicDryRun shows what a panic rotation would do, and the button.
func (s *Server) panicDryRun(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	name := r.PathValue("name")
	resp, err := keywardv1.NewRotationServiceClient(s.api.Conn()).PanicRotate(c, &keywardv1.PanicRotateRequest{Name: name, DryRun: true})
	s.render(w, r, http.StatusOK, "panic", "Panic-rotate "+name, panicData{Name: name, DryRun: resp, Err: problem(err)})
}

// ---- API keys

type apiKeysData struct {
	Filter url.Values
	Keys   []*keywardv1.APIKey
	More   bool
	Err    string
}

// apiKeyStates are the state filter's values.
var apiKeyStates = map[string]keywardv1.APIKeyState{
	"active": keywardv1.APIKeyState_API_KEY_STATE_ACTIVE, "disabled": keywardv1.APIKeyState_API_KEY_STATE_DISABLED,
	"revoked": keywardv1.APIKeyState_API_KEY_STATE_REVOKED,
}

// maxListed is how many API keys a list page shows.
const maxListed = 500

func (s *Server) apiKeys(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	q := r.URL.Query()
	req := &keywardv1.ListAPIKeysRequest{Owner: q.Get("owner"), Tag: q.Get("tag"), Environment: q.Get("env"), State: apiKeyStates[q.Get("state")]}
	keys, err := s.listAPIKeys(c, req, maxListed+1)
	d := apiKeysData{Filter: q, Keys: keys, Err: problem(err)}
	if len(keys) > maxListed {
		d.Keys, d.More = keys[:maxListed], true
	}
	s.render(w, r, http.StatusOK, "apikeys", "API keys", d)
}

// presets are the least-privilege choices of the create form: the roles
// of docs/apikeys.md, whose default rate limits keywardd applies.
var presets = []struct{ Name, Permissions, What string }{
	{"read-only", "read-only", "reads only (*:read); 100/s, burst 200; 100 000/h"},
	{"standard", "standard", "reads and writes (*:read, *:write); 50/s, burst 100; 50 000/h"},
	{"admin", "admin", "anything (*:*); 10/s, burst 20; 5 000/h: rarely the right choice"},
	{"custom", "", "only the resource:action permissions you list, e.g. orders:read"},
}

type formData struct {
	Presets any
	Form    url.Values
	Err     string
}

func (s *Server) apiKeyForm(w http.ResponseWriter, r *http.Request) {
	f := url.Values{"preset": {"read-only"}, "days": {"90"}, "env": {"prod"}}
	s.render(w, r, http.StatusOK, "apikey-new", "New API key", formData{Presets: presets, Form: f})
}

type secretData struct {
	Key    *keywardv1.APIKey
	Secret string
	Verb   string
	Gone   string // the key whose secret was shown already, or not in time
	Late   bool   // it was kept, and not shown within its minute
}

func (s *Server) apiKeyCreate(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	f := r.PostForm
	req := &keywardv1.CreateAPIKeyRequest{Owner: strings.TrimSpace(f.Get("owner")), Name: strings.TrimSpace(f.Get("name")),
		Environment: strings.TrimSpace(f.Get("env")), AllowedIps: fields(f.Get("allowed_ips")),
		AllowedCountries: fields(f.Get("allowed_countries")), Tags: fields(f.Get("tags"))}
	bad := func(msg string) {
		s.render(w, r, http.StatusBadRequest, "apikey-new", "New API key", formData{Presets: presets, Form: f, Err: msg})
	}
	switch p := f.Get("preset"); p {
	case "read-only", "standard", "admin":
		req.Permissions = []string{p}
	case "custom":
		if req.Permissions = fields(f.Get("permissions")); len(req.Permissions) == 0 {
			bad("a custom key needs its permissions: resource:action, such as orders:read, separated by commas or spaces")
			return
		}
	default:
		bad("choose a preset: read-only, standard, admin or custom")
		return
	}
	if d := strings.TrimSpace(f.Get("days")); d != "" {
		days, err := strconv.Atoi(d)
		if err != nil || days < 1 || days > 3650 {
			bad("expires in: a whole number of days from 1 to 3650 (empty: never, which the review flags)")
			return
		}
		req.Ttl = durationpb.New(time.Duration(days) * 24 * time.Hour)
	}
	resp, err := s.api.APIKeys.CreateAPIKey(c, req)
	if err != nil {
		bad(problem(err))
		return
	}
	s.keepSecret(r, secretData{Key: resp.GetKey(), Secret: resp.GetSecret(), Verb: "created"})
	http.Redirect(w, r, s.at("/apikeys/"+url.PathEscape(resp.GetKey().GetId())+"/secret"), http.StatusSeeOther)
}

// apiKeySecret shows the secret just made, once: a reload shows that it
// was shown.
func (s *Server) apiKeySecret(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if r.Method == http.MethodHead {
		return // a HEAD does not spend it
	}
	d, ok, late := s.takeSecret(r, id)
	if !ok {
		s.render(w, r, http.StatusGone, "secret", "The secret is gone", secretData{Gone: id, Late: late})
		return
	}
	title := "API key " + d.Verb
	s.render(w, r, http.StatusOK, "secret", title, d)
}

// fields splits a form's list on commas and white space.
func fields(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\r' || r == '\t' })
}

type apiKeyData struct {
	Key      *keywardv1.APIKey
	Err      string
	Usage    *keywardv1.GetAPIKeyUsageResponse
	UsageErr string
	Window   string
	Results  template.HTML // verifications by hour and result
	Networks template.HTML
	// NetworksByHour: verifications by hour and source network.
	NetworksByHour template.HTML
	// Countries: verifications by source country, with a GeoIP database
	// (empty without: keywardd counts none).
	Countries template.HTML
	Totals    []countOf
	Headroom  []headroom
	// Latency: the window's histogram, its p50 and p99, and both by hour.
	Latency, LatencyByHour template.HTML
	P50, P99               string
}

type countOf struct {
	Name string
	N    int64
}

// headroom is a rate-limit layer against the busiest hour's use.
type headroom struct {
	Limit            string
	Busiest, Allowed float64
	Percent          float64
}

var windows = map[string]time.Duration{"24h": 24 * time.Hour, "7d": 7 * 24 * time.Hour}

func (s *Server) apiKey(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	id := r.PathValue("id")
	d := apiKeyData{Window: r.URL.Query().Get("window")}
	if _, ok := windows[d.Window]; !ok {
		d.Window = "24h"
	}
	k, err := s.api.APIKeys.GetAPIKey(c, &keywardv1.GetAPIKeyRequest{Id: id})
	if err != nil {
		d.Err = problem(err)
		s.render(w, r, http.StatusOK, "apikey", "API key "+id, d)
		return
	}
	d.Key = k.GetKey()
	u, err := s.api.APIKeys.GetAPIKeyUsage(c, &keywardv1.GetAPIKeyUsageRequest{Id: id, Window: durationpb.New(windows[d.Window])})
	d.Usage, d.UsageErr = u, problem(err)
	if u != nil {
		end := s.opt.Now().UTC().Truncate(time.Hour)
		d.Results = usageChart(u.GetHours(), end.Add(-windows[d.Window]+time.Hour), end)
		nets := sortedCounts(u.GetTotal().GetNetworks())
		d.Networks = barsChart("networks-chart", "source networks", nets)
		d.NetworksByHour = networksChart(u.GetHours(), nets, end.Add(-windows[d.Window]+time.Hour), end)
		if cs := sortedCounts(u.GetTotal().GetCountries()); len(cs) > 0 {
			d.Countries = barsChart("countries-chart", "source countries", cs)
		}
		d.Totals = sortedCounts(u.GetTotal().GetCounts())
		d.Headroom = headrooms(d.Key.GetRateLimits(), u.GetHours())
		bounds := make([]time.Duration, len(u.GetLatencyBounds()))
		for i, b := range u.GetLatencyBounds() {
			bounds[i] = b.AsDuration()
		}
		counts := u.GetTotal().GetLatencyCounts()
		d.P50, d.P99 = quantile(bounds, counts, 0.5), quantile(bounds, counts, 0.99)
		d.Latency = barsChart("latency-histogram", "verification latency", latencyBuckets(bounds, counts))
		d.LatencyByHour = latencyChart(u.GetHours(), bounds, end.Add(-windows[d.Window]+time.Hour), end)
	}
	s.render(w, r, http.StatusOK, "apikey", "API key "+id, d)
}

// quantile is the bucket bound q of the histogram falls in, "≤250µs",
// or "—" without data.
func quantile(bounds []time.Duration, counts []int64, q float64) string {
	e, ok := apikeys.LatencyQuantile(bounds, counts, q)
	if !ok {
		return "—"
	}
	return e.String()
}

// latencyBuckets are the histogram's buckets from the first to the last
// that counted any, labelled by their bounds.
func latencyBuckets(bounds []time.Duration, counts []int64) []countOf {
	if len(counts) != len(bounds)+1 {
		return nil
	}
	first, last := -1, -1
	for i, n := range counts {
		if n > 0 {
			if first < 0 {
				first = i
			}
			last = i
		}
	}
	var out []countOf
	for i := max(first, 0); first >= 0 && i <= last; i++ {
		label := "> " + bounds[len(bounds)-1].String()
		if i < len(bounds) {
			label = "≤ " + bounds[i].String()
		}
		out = append(out, countOf{label, counts[i]})
	}
	return out
}

// headrooms compares each rate-limit layer with the busiest hour's
// admitted verifications, spread evenly over the hour.
func headrooms(limits []*keywardv1.RateLimit, hours []*keywardv1.APIKeyHourUsage) []headroom {
	var busiest int64
	for _, h := range hours {
		busiest = max(busiest, h.GetUsage().GetCounts()["VALID"])
	}
	var out []headroom
	for _, l := range limits {
		per := l.GetPer().AsDuration()
		if per <= 0 {
			continue
		}
		perHour := float64(time.Hour) / float64(per) // periods in an hour
		use := float64(busiest) / perHour
		if per > time.Hour {
			use = float64(busiest) // at least the busiest hour's use
		}
		h := headroom{Limit: fmt.Sprintf("%d per %s, burst %d", l.GetLimit(), period(per), l.GetBurst()), Busiest: use, Allowed: float64(l.GetLimit())}
		if l.GetLimit() > 0 {
			h.Percent = 100 * use / float64(l.GetLimit())
		}
		out = append(out, h)
	}
	return out
}

func sortedCounts(m map[string]int64) []countOf {
	out := make([]countOf, 0, len(m))
	for k, v := range m {
		out = append(out, countOf{k, v})
	}
	slices.SortFunc(out, func(a, b countOf) int {
		if a.N != b.N {
			return int(b.N - a.N)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}

func (s *Server) apiKeyRotate(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	id := r.PathValue("id")
	hours, err := strconv.ParseFloat(or(r.PostForm.Get("overlap_hours"), "24"), 64)
	if err != nil || !(hours >= 0 && hours <= 720) {
		s.done(w, r, "/apikeys/"+url.PathEscape(id), fmt.Errorf("the overlap is a number of hours from 0 to 720 (30 days)"), "")
		return
	}
	resp, err := s.api.APIKeys.RotateAPIKey(c, &keywardv1.RotateAPIKeyRequest{Id: id, Overlap: durationpb.New(time.Duration(hours * float64(time.Hour)))})
	if err != nil {
		s.done(w, r, "/apikeys/"+url.PathEscape(id), err, "")
		return
	}
	s.keepSecret(r, secretData{Key: resp.GetKey(), Secret: resp.GetSecret(), Verb: "rotated"})
	http.Redirect(w, r, s.at("/apikeys/"+url.PathEscape(id)+"/secret"), http.StatusSeeOther)
}

func (s *Server) apiKeyRevoke(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	id := r.PathValue("id")
	_, err := s.api.APIKeys.RevokeAPIKey(c, &keywardv1.RevokeAPIKeyRequest{Id: id})
	s.done(w, r, "/apikeys/"+url.PathEscape(id), err, id+" revoked: every verification refuses it from now on")
}

type bulkData struct {
	Filter url.Values
	Count  uint32
	Ran    bool
	Err    string
}

func bulkRequest(f url.Values) *keywardv1.RevokeAPIKeysRequest {
	return &keywardv1.RevokeAPIKeysRequest{Owner: strings.TrimSpace(f.Get("owner")), Tag: strings.TrimSpace(f.Get("tag")), Environment: strings.TrimSpace(f.Get("env"))}
}

// bulkDryRun counts what a bulk revocation would revoke, before its
// button is shown.
func (s *Server) bulkDryRun(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	q := r.URL.Query()
	d := bulkData{Filter: q}
	if req := bulkRequest(q); req.Owner != "" || req.Tag != "" || req.Environment != "" {
		req.DryRun = true
		resp, err := s.api.APIKeys.RevokeAPIKeys(c, req)
		d.Count, d.Ran, d.Err = resp.GetCount(), err == nil, problem(err)
	}
	s.render(w, r, http.StatusOK, "bulk", "Revoke API keys", d)
}

// bulkRevoke revokes what the dry run counted; if the count changed
// since, it revokes nothing and shows the new count.
func (s *Server) bulkRevoke(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	f := r.PostForm
	back := "/apikeys/revoke?" + url.Values{"owner": {f.Get("owner")}, "tag": {f.Get("tag")}, "env": {f.Get("env")}}.Encode()
	req := bulkRequest(f)
	if req.Owner == "" && req.Tag == "" && req.Environment == "" {
		s.done(w, r, back, fmt.Errorf("name an owner, a tag or an environment: the dashboard does not revoke every key"), "")
		return
	}
	req.DryRun = true
	dry, err := s.api.APIKeys.RevokeAPIKeys(c, req)
	if err != nil {
		s.done(w, r, back, err, "")
		return
	}
	if strconv.FormatUint(uint64(dry.GetCount()), 10) != f.Get("expect") {
		s.done(w, r, back, fmt.Errorf("the filter now matches %d keys, not the %s of the dry run: look again before revoking", dry.GetCount(), f.Get("expect")), "")
		return
	}
	req.DryRun = false
	resp, err := s.api.APIKeys.RevokeAPIKeys(c, req)
	s.done(w, r, back, err, fmt.Sprintf("%d API keys revoked", resp.GetCount()))
}

// ---- tokens

type tokensData struct {
	Keys    []*keywardv1.Key
	KeysErr string
	JWKS    string
	JWKSErr string
}

func (s *Server) tokens(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	d := tokensData{}
	ks, err := s.api.Tokens.ListSigningKeys(c, &keywardv1.ListSigningKeysRequest{})
	d.Keys, d.KeysErr = ks.GetKeys(), problem(err)
	j, err := s.api.Tokens.GetJWKS(c, &keywardv1.GetJWKSRequest{})
	d.JWKSErr = problem(err)
	if err == nil {
		var v any
		if json.Unmarshal(j.GetJwks(), &v) == nil {
			b, _ := json.MarshalIndent(v, "", "  ")
			d.JWKS = string(b)
		}
	}
	s.render(w, r, http.StatusOK, "tokens", "Tokens", d)
}

func (s *Server) tokenRevoke(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	id := strings.TrimSpace(r.PostForm.Get("token_id"))
	if id == "" {
		s.done(w, r, "/tokens", fmt.Errorf("give the token's ID (its jti claim)"), "")
		return
	}
	_, err := s.api.Tokens.RevokeToken(c, &keywardv1.RevokeTokenRequest{TokenId: id})
	s.done(w, r, "/tokens", err, "token "+id+" revoked")
}

// ---- managed credentials

type credentialsData struct {
	Credentials []*keywardv1.Credential
	Err         string
}

// credentialSteps are a rotation's steps, in order (docs/plugins.md).
var credentialSteps = []string{"new", "created", "tested"}

func (s *Server) credentials(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	resp, err := keywardv1.NewCredentialServiceClient(s.api.Conn()).ListCredentials(c, &keywardv1.ListCredentialsRequest{})
	s.render(w, r, http.StatusOK, "credentials", "Managed credentials", credentialsData{Credentials: resp.GetCredentials(), Err: problem(err)})
}

func (s *Server) credentialRotate(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	name := r.PathValue("name")
	_, err := keywardv1.NewCredentialServiceClient(s.api.Conn()).RotateCredential(c, &keywardv1.RotateCredentialRequest{Name: name})
	s.done(w, r, "/credentials", err, name+" rotated")
}

// ---- rotation plan

type rotationData struct {
	Plan     *keywardv1.GetRotationPlanResponse
	Timeline template.HTML
	Err      string
	// Windows are the API keys' limit windows pending and active, beside
	// the rotations: both are what keywardd does on a schedule.
	Windows    []*keywardv1.LimitWindow
	WindowsErr string
}

func (s *Server) rotation(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	plan, err := keywardv1.NewRotationServiceClient(s.api.Conn()).GetRotationPlan(c, &keywardv1.GetRotationPlanRequest{
		Within: durationpb.New(90 * 24 * time.Hour), Limit: 500})
	d := rotationData{Plan: plan, Err: problem(err)}
	if err == nil {
		d.Timeline = timelineChart(plan.GetRotations(), s.opt.Now(), 90*24*time.Hour)
	}
	ws, err := s.api.APIKeys.ListLimitWindows(c, &keywardv1.ListLimitWindowsRequest{})
	d.Windows, d.WindowsErr = ws.GetWindows(), problem(err)
	s.render(w, r, http.StatusOK, "rotation", "Rotation plan", d)
}

// ---- review

type reviewData struct {
	Findings []review.Finding
	Err      string
	Audit    string    // what part of the audit log the review read
	Made     time.Time // when
}

// reviewRecords is how many audit records the review reads at most.
const reviewRecords = 50_000

// reviewKept is how long a review is shown again before it is made anew:
// it costs a call per API key (each audited).
const reviewKept = 5 * time.Minute

// reviewed is a review made, and when.
type reviewed struct {
	at   time.Time
	data reviewData
}

func (s *Server) review(w http.ResponseWriter, r *http.Request) {
	now := s.opt.Now()
	s.mu.Lock()
	last := s.reviewed
	s.mu.Unlock()
	if last != nil && now.Sub(last.at) < reviewKept && r.URL.Query().Get("fresh") == "" {
		d := last.data
		d.Made = last.at
		s.render(w, r, http.StatusOK, "review", "Review", d)
		return
	}
	c, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	d := reviewData{Audit: "the audit log's last 30 days", Made: now}
	o := review.Options{Now: now, Unused: 30 * 24 * time.Hour, Top: 5, Since: now.Add(-30 * 24 * time.Hour)}
	o.Audit = func(fn func(audit.Record) error) error {
		n := 0
		for rec, err := range s.api.AuditRecords(c, &keywardv1.ListAuditRecordsRequest{SinceTime: timestamppb.New(o.Since), PageSize: 1000}) {
			if err != nil {
				if review.IsDenied(err) {
					d.Audit = "not the audit log: " + problem(err)
					return nil
				}
				return err
			}
			if n++; n > reviewRecords {
				d.Audit = fmt.Sprintf("the newest %d records of the audit log, since %s (keyward review -audit reads it all)", reviewRecords, fmtTime(rec.GetTime()))
				return nil
			}
			err := fn(audit.Record{Time: rec.GetTime().AsTime(), Op: rec.GetOperation(), Outcome: state(rec.GetOutcome()),
				Caller: audit.Caller{UID: rec.GetCaller().GetUid(), Exe: rec.GetCaller().GetExe()}})
			if err != nil {
				return err
			}
		}
		return nil
	}
	f, err := review.Run(c, s.api, o)
	d.Findings, d.Err = f, problem(err)
	if err == nil {
		s.mu.Lock()
		s.reviewed = &reviewed{at: now, data: d}
		s.mu.Unlock()
	}
	s.render(w, r, http.StatusOK, "review", "Review", d)
}

// ---- the audit log

type auditData struct {
	Filter   url.Values
	Records  []*keywardv1.AuditRecord
	Next     string // the query of the next (older) page; empty: none
	Limited  bool   // the page stopped at keywardd's bound on bytes read
	State    *keywardv1.AuditLogState
	Verified *verified
	Err      string
}

// verified is the last verification of the chain this dashboard ran.
type verified struct {
	At     time.Time
	Result *keywardv1.VerifyAuditLogResponse
	Err    string
}

// auditSince are the time filter's choices.
var auditSince = map[string]time.Duration{"1h": time.Hour, "24h": 24 * time.Hour, "7d": 7 * 24 * time.Hour, "30d": 30 * 24 * time.Hour}

var auditOutcomes = map[string]keywardv1.AuditOutcome{
	"ok": keywardv1.AuditOutcome_AUDIT_OUTCOME_OK, "denied": keywardv1.AuditOutcome_AUDIT_OUTCOME_DENIED, "error": keywardv1.AuditOutcome_AUDIT_OUTCOME_ERROR,
}

func (s *Server) audit(w http.ResponseWriter, r *http.Request) {
	c, cancel := ctx(r)
	defer cancel()
	q := r.URL.Query()
	d := auditData{Filter: q}
	req := &keywardv1.ListAuditRecordsRequest{Operation: strings.TrimSpace(q.Get("op")), Outcome: auditOutcomes[q.Get("outcome")],
		Subject: strings.TrimSpace(q.Get("subject")), PageSize: 100, PageToken: q.Get("page")}
	if since, ok := auditSince[q.Get("since")]; ok {
		req.SinceTime = timestamppb.New(s.opt.Now().Add(-since))
	}
	if u := strings.TrimSpace(q.Get("uid")); u != "" {
		uid, err := strconv.ParseUint(u, 10, 32)
		if err != nil {
			d.Err = "uid: a number, such as 1000"
			s.render(w, r, http.StatusBadRequest, "audit", "Audit log", d)
			return
		}
		req.CallerUid = proto.Uint32(uint32(uid))
	}
	resp, err := s.api.Audit.ListAuditRecords(c, req)
	d.Err = problem(err)
	if err == nil {
		d.Records, d.Limited, d.State = resp.GetRecords(), resp.GetScanLimited(), resp.GetState()
		if t := resp.GetNextPageToken(); t != "" {
			next := url.Values{}
			for k, v := range q {
				next[k] = v
			}
			next.Set("page", t)
			d.Next = next.Encode()
		}
	}
	s.mu.Lock()
	d.Verified = s.verified
	s.mu.Unlock()
	s.render(w, r, http.StatusOK, "audit", "Audit log", d)
}

// auditVerify has keywardd verify its whole audit log (it reads it all:
// on demand only), and shows the audit page with the outcome.
func (s *Server) auditVerify(w http.ResponseWriter, r *http.Request) {
	c, cancel := context.WithTimeout(r.Context(), 10*time.Minute)
	defer cancel()
	resp, err := s.api.Audit.VerifyAuditLog(c, &keywardv1.VerifyAuditLogRequest{})
	v := &verified{At: s.opt.Now(), Result: resp, Err: problem(err)}
	s.mu.Lock()
	s.verified = v
	s.mu.Unlock()
	switch {
	case err != nil:
		s.flash(r, false, "the verification failed: "+v.Err)
	case resp.GetOk():
		s.flash(r, true, fmt.Sprintf("the audit log holds: %d records, %d checkpoints, every MAC checked", resp.GetRecords(), resp.GetCheckpoints()))
	default:
		s.flash(r, false, fmt.Sprintf("the audit log is broken at line %d: %s", resp.GetBadLine(), resp.GetProblem()))
	}
	http.Redirect(w, r, s.at("/audit"), http.StatusSeeOther)
}

// ---- template helpers

func or(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}

// period names a rate limit's period: second, minute, hour, day, or its
// length.
func period(d time.Duration) string {
	switch d {
	case time.Second:
		return "second"
	case time.Minute:
		return "minute"
	case time.Hour:
		return "hour"
	case 24 * time.Hour:
		return "day"
	}
	return human(d)
}

// state is an enum's value as the pages write it: "pending deletion" for
// KEY_STATE_PENDING_DELETION.
func state(v fmt.Stringer) string {
	s := v.String()
	for _, p := range []string{"AUDIT_OUTCOME_", "API_KEY_STATE_", "LIMIT_WINDOW_STATE_", "KEY_STATE_", "CREDENTIAL_STATE_", "KEY_PURPOSE_", "KEY_ALGORITHM_"} {
		s = strings.TrimPrefix(s, p)
	}
	return strings.ToLower(strings.ReplaceAll(s, "_", " "))
}

// human writes a duration as people say it: 30 days, 36 hours, 1h30m.
func human(d time.Duration) string {
	switch {
	case d >= 48*time.Hour && d%(24*time.Hour) == 0:
		return fmt.Sprintf("%d days", d/(24*time.Hour))
	case d > time.Hour && d%time.Hour == 0:
		return fmt.Sprintf("%d hours", d/time.Hour)
	}
	s := d.String()
	s = strings.TrimSuffix(s, "0s")
	return strings.TrimSuffix(s, "0m")
}

func fmtTime(t *timestamppb.Timestamp) string {
	if t == nil {
		return "—"
	}
	return t.AsTime().UTC().Format("2006-01-02 15:04 UTC")
}

var funcs = template.FuncMap{
	"ts":     fmtTime,
	"counts": func(c map[uint32]uint64) string { return rewrap.Counts(c).String() },
	"tsec": func(t *timestamppb.Timestamp) string {
		if t == nil {
			return "—"
		}
		return t.AsTime().UTC().Format("2006-01-02 15:04:05")
	},
	"dur": func(d *durationpb.Duration) string {
		if d == nil {
			return "—"
		}
		return human(d.AsDuration())
	},
	"join":  func(s []string) string { return strings.Join(s, ", ") },
	"state": state,
	"percent": func(a, b uint64) string {
		if b == 0 {
			return "—"
		}
		return fmt.Sprintf("%.4f %%", 100*float64(a)/float64(b))
	},
	"meter": meter,
	"steps": func(cr *keywardv1.Credential) []step {
		var out []step
		at := slices.Index(credentialSteps, cr.GetPending().GetStep())
		for i, n := range credentialSteps {
			out = append(out, step{n, cr.GetPending() != nil && i <= at, cr.GetPending() != nil && i == at})
		}
		return append(out, step{"active", cr.GetPending() == nil && cr.GetCurrent() != nil, false})
	},
	"hasPrefix": strings.HasPrefix,
	"pathesc":   url.PathEscape,
	"list":      func(s ...string) []string { return s },
	"f1":        func(f float64) string { return strconv.FormatFloat(f, 'g', 3, 64) },
}

// step is one step of a credential's rotation, for its strip.
type step struct {
	Name       string
	Done, Here bool
}
