// Package review is the regular review of keys (docs/apikeys.md, "Review"):
// what an operator should look at, among what the policy lets them see.
// `keyward review` prints it; `keyward dashboard` shows it. Everything it
// reads comes from keywardd as the caller's own calls; a part the caller
// may not see is left out, not an error.
package review

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
)

// Finding is one thing a review turned up.
type Finding struct {
	Check   string `json:"check"`
	Subject string `json:"subject"`
	Detail  string `json:"detail"`
}

// Options say what a review looks at.
type Options struct {
	Now    time.Time     // zero: time.Now()
	Unused time.Duration // API keys not used for this long are listed
	Top    int           // how many top consumers to list
	// Audit, if set, hands fn the audit log's records since Since: the
	// review then adds denied calls and error-rate outliers by caller.
	Audit func(fn func(audit.Record) error) error
	Since time.Time
	// Progress, if set, is told after each API key how many of how many
	// were looked at (one usage call each: the long part of a review).
	Progress func(done, total int)
}

// Run reviews what the caller on c may list.
func Run(ctx context.Context, c *client.Client, o Options) ([]Finding, error) {
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	var out []Finding
	add := func(check, subject, detail string, a ...any) {
		out = append(out, Finding{check, subject, fmt.Sprintf(detail, a...)})
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
	} else if !IsDenied(err) {
		return nil, err
	}
	if o.Audit != nil {
		if err := auditFindings(o.Audit, o.Since, add); err != nil {
			return nil, err
		}
	}

	// API keys.
	var keys []*keywardv1.APIKey
	req := &keywardv1.ListAPIKeysRequest{State: keywardv1.APIKeyState_API_KEY_STATE_ACTIVE, PageSize: 1000}
	for {
		r, err := c.APIKeys.ListAPIKeys(ctx, req)
		if err != nil {
			if IsDenied(err) {
				break
			}
			return nil, err
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
	for i, k := range keys {
		if o.Progress != nil {
			o.Progress(i, len(keys))
		}
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
			if IsDenied(err) {
				continue
			}
			return nil, err
		}
		last := u.GetLastUsedTime()
		switch {
		case last == nil && now.Sub(k.GetCreateTime().AsTime()) > o.Unused:
			add("API key never used", subject, "created %s", k.GetCreateTime().AsTime().Format(time.DateOnly))
		case last != nil && now.Sub(last.AsTime()) > o.Unused:
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
		if q := k.GetQuota(); q != nil {
			switch {
			case q.GetRemaining() <= 0:
				add("API key's quota used up", subject, "0 uses left%s", refillNote(q))
			case q.GetRefill() > 0 && q.GetRemaining()*10 < q.GetRefill():
				add("API key near its quota", subject, "%d uses left of %d%s", q.GetRemaining(), q.GetRefill(), refillNote(q))
			}
		}
	}
	slices.SortFunc(uses, func(a, b use) int { return int(b.valid - a.valid) })
	for i, u := range uses {
		if i == o.Top || u.valid == 0 {
			break
		}
		add("top consumer", u.id, "%d valid verifications in 7 days", u.valid)
	}
	return out, nil
}

func refillNote(q *keywardv1.Quota) string {
	if q.GetRefill() == 0 || q.GetRefillEvery() == nil {
		return "; it is not refilled"
	}
	return fmt.Sprintf("; %d more every %v", q.GetRefill(), q.GetRefillEvery().AsDuration())
}

func orNone(s string) string {
	if s == "" {
		return "none yet"
	}
	return s
}

// auditFindings adds what the audit log says since a time: the callers
// whose calls were denied, and those whose calls fail far more often than
// the others'.
func auditFindings(records func(fn func(audit.Record) error) error, since time.Time, add func(check, subject, format string, a ...any)) error {
	type tally struct {
		calls, denied, errors int
		ops                   map[string]int // denied, by operation
	}
	callers := map[string]*tally{}
	var calls, errs int
	err := records(func(r audit.Record) error {
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
		return err
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

// IsDenied says the caller may not see this part; the review covers the
// rest.
func IsDenied(err error) bool { return errors.Is(client.Wrap(err), client.ErrDenied) }
