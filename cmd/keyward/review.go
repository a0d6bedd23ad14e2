package main

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
)

// finding is one thing a review turned up.
type finding struct {
	Check   string `json:"check"`
	Subject string `json:"subject"`
	Detail  string `json:"detail"`
}

// review is what the regular review of keys should look at, from what
// the caller may list. Run monthly (docs/apikeys.md).
func review(f *flagSet) action {
	unused := f.Duration("unused", 30*24*time.Hour, "API keys not used for this long are listed")
	format := f.String("format", "table", "table, json or markdown (--output json is json)")
	f.Complete("format", "table", "json", "markdown")
	top := f.Int("top", 5, "how many top consumers to list")
	auditFile := f.String("audit", "", "keywardd's audit log: adds denied calls and error-rate outliers by caller (run keyward audit verify on it first)")
	window := f.Duration("window", 30*24*time.Hour, "with -audit: how far back to read")
	return func(e *env, _ []string) error {
		form := *format
		if form != "table" && form != "json" && form != "markdown" {
			return usageError{msg: "--format is table, json or markdown"}
		}
		if e.output.json() {
			form = "json"
		}
		return e.review(*unused, *top, *auditFile, *window, form)
	}
}

func (e *env) review(unused time.Duration, top int, auditFile string, window time.Duration, format string) error {
	c := e.api
	ctx, now := e.ctx, time.Now()
	var out []finding
	add := func(check, subject, detail string, a ...any) {
		out = append(out, finding{check, subject, fmt.Sprintf(detail, a...)})
	}

	// Keys, API keys and credentials past their rotation date, from
	// keywardd's schedule.
	if plan, err := keywardv1.NewRotationServiceClient(c.Conn()).GetRotationPlan(ctx, &keywardv1.GetRotationPlanRequest{}); err == nil {
		for _, r := range plan.GetRotations() {
			if r.GetOverdue() {
				what := map[string]string{"key": "key", "api_key": "API key", "credential": "credential"}[r.GetKind()]
				add(what+" past its rotation date", r.GetId(), "due %s under policy %s; last run: %s",
					r.GetDueTime().AsTime().Format(time.RFC3339), r.GetPolicy(), orNone(r.GetOutcome()))
			}
		}
	} else if !isDenied(err) {
		return err
	}
	if auditFile != "" {
		if err := reviewAudit(auditFile, now.Add(-window), add); err != nil {
			return err
		}
	}

	// API keys.
	var keys []*keywardv1.APIKey
	req := &keywardv1.ListAPIKeysRequest{State: keywardv1.APIKeyState_API_KEY_STATE_ACTIVE, PageSize: 1000}
	for {
		r, err := c.APIKeys.ListAPIKeys(ctx, req)
		if err != nil {
			if isDenied(err) {
				break
			}
			return err
		}
		keys = append(keys, r.GetKeys()...)
		if req.PageToken = r.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	type use struct {
		id          string
		valid, fail int64
	}
	var uses []use
	for _, k := range keys {
		subject := fmt.Sprintf("%s (%s, owner %s, %s)", k.GetId(), k.GetName(), k.GetOwner(), k.GetEnvironment())
		if k.GetExpireTime() == nil {
			add("API key without expiry", subject, "created %s", k.GetCreateTime().AsTime().Format(time.DateOnly))
		}
		if slices.Contains(k.GetPermissions(), "admin") || slices.Contains(k.GetPermissions(), "*:*") {
			add("admin-scoped API key", subject, "permissions %s", strings.Join(k.GetPermissions(), ", "))
		}
		if k.GetEnvironment() == "prod" && len(k.GetAllowedIps()) == 0 {
			add("prod API key without an IP allowlist", subject, "any source address may use it")
		}
		u, err := c.APIKeys.GetAPIKeyUsage(ctx, &keywardv1.GetAPIKeyUsageRequest{Id: k.GetId(), Window: durationpb.New(7 * 24 * time.Hour)})
		if err != nil {
			if isDenied(err) {
				continue
			}
			return err
		}
		last := u.GetLastUsedTime()
		switch {
		case last == nil && now.Sub(k.GetCreateTime().AsTime()) > unused:
			add("API key never used", subject, "created %s", k.GetCreateTime().AsTime().Format(time.DateOnly))
		case last != nil && now.Sub(last.AsTime()) > unused:
			add("API key unused", subject, "last used %s", last.AsTime().Format(time.DateOnly))
		}
		var valid, fail int64
		for code, n := range u.GetTotal().GetCounts() {
			if code == "VALID" {
				valid += n
			} else {
				fail += n
			}
		}
		uses = append(uses, use{k.GetId(), valid, fail})
		if total := valid + fail; total >= 20 && fail*2 > total {
			add("API key mostly refused", subject, "%d of %d verifications in 7 days refused", fail, total)
		}
	}
	slices.SortFunc(uses, func(a, b use) int { return int(b.valid - a.valid) })
	for i, u := range uses {
		if i == top || u.valid == 0 {
			break
		}
		add("top consumer", u.id, "%d valid verifications in 7 days", u.valid)
	}

	switch format {
	case "json":
		if out == nil {
			out = []finding{}
		}
		return e.printJSON(out)
	case "markdown":
		fmt.Fprintf(e.stdout, "# keyward review, %s\n\n| check | subject | detail |\n| --- | --- | --- |\n", now.Format(time.DateOnly))
		for _, f := range out {
			fmt.Fprintf(e.stdout, "| %s | %s | %s |\n", f.Check, strings.ReplaceAll(f.Subject, "|", "\\|"), strings.ReplaceAll(f.Detail, "|", "\\|"))
		}
	default:
		if len(out) == 0 {
			fmt.Fprintln(e.stdout, "nothing to look at among what you may see")
			return nil
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CHECK\tSUBJECT\tDETAIL")
		for _, f := range out {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Check, f.Subject, f.Detail)
		}
		return tw.Flush()
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none yet"
	}
	return s
}

// reviewAudit adds what the audit log says since a time: the callers whose
// calls were denied, and those whose calls fail far more often than the
// others'.
func reviewAudit(path string, since time.Time, add func(check, subject, format string, a ...any)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("-audit: %w", err)
	}
	defer f.Close()
	type tally struct {
		calls, denied, errors int
		ops                   map[string]int // denied, by operation
	}
	callers := map[string]*tally{}
	var calls, errs int
	err = audit.Records(f, func(r audit.Record) error {
		if r.Time.Before(since) || strings.HasPrefix(r.Op, "keywardd.") {
			return nil
		}
		who := fmt.Sprintf("uid %d", r.Caller.UID)
		if r.Caller.Exe != "" {
			who += " " + r.Caller.Exe
		}
		t := callers[who]
		if t == nil {
			t = &tally{ops: map[string]int{}}
			callers[who] = t
		}
		t.calls++
		calls++
		switch r.Outcome {
		case "denied":
			t.denied++
			t.ops[r.Op]++
		case "error":
			t.errors++
			errs++
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("-audit %s: %w", path, err)
	}
	for _, who := range slices.Sorted(maps.Keys(callers)) {
		t := callers[who]
		if t.denied > 0 {
			ops := slices.SortedFunc(maps.Keys(t.ops), func(a, b string) int { return t.ops[b] - t.ops[a] })
			var parts []string
			for i, op := range ops {
				if i == 3 {
					parts = append(parts, "...")
					break
				}
				parts = append(parts, fmt.Sprintf("%s %d", op, t.ops[op]))
			}
			add("denied calls by caller", who, "%d of %d calls denied since %s: %s", t.denied, t.calls, since.Format(time.DateOnly), strings.Join(parts, ", "))
		}
		// An outlier: at least 20 calls, more than 10 % failing, and three
		// times the rate of the other callers' calls.
		others := 0.0
		if n := calls - t.calls; n > 0 {
			others = float64(errs-t.errors) / float64(n)
		}
		if rate := float64(t.errors) / float64(t.calls); t.calls >= 20 && rate > 0.1 && rate > 3*others {
			add("error-rate outlier", who, "%d of %d calls failed (%.0f %%; the other callers: %.1f %%)", t.errors, t.calls, 100*rate, 100*others)
		}
	}
	return nil
}

// isDenied: the caller may not see this part; the review covers the rest.
func isDenied(err error) bool { return errors.Is(client.Wrap(err), client.ErrDenied) }
