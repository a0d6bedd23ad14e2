package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/limitwin"
)

// apikeySchedule schedules a limit window: a key's, an owner's or an
// environment's rate limits times a factor, from -from until -until (or
// for -for).
func apikeySchedule(f *flagSet) action {
	id := f.String("id", "", "one key (ak_...)")
	owner := f.String("owner", "", "every key of this owner (with -env: in that environment)")
	envName := f.String("env", "", "every key of this environment (with -owner: that owner's)")
	factor := f.Float64("factor", 0, "the limits times this: over 1 raises them, under 1 cuts them (0.001 to 100)")
	from := f.Time("from", "when it starts (RFC 3339); now if not given")
	until := f.Time("until", "when it ends (RFC 3339)")
	length := f.Duration("for", 0, "how long it lasts, from its start (instead of -until)")
	reason := f.String("reason", "", "why (a sale, a launch): for the audit log and the plan")
	dry := f.Bool("dry-run", false, "say what would change; schedule nothing")
	f.Required("factor", "reason")
	f.Exclusive("id", "owner")
	f.Exclusive("id", "env")
	f.Exclusive("until", "for")
	return func(e *env, _ []string) error {
		req := &keywardv1.ScheduleLimitsRequest{KeyId: *id, Owner: *owner, Environment: *envName, Factor: *factor, Reason: *reason, DryRun: *dry}
		start := time.Now()
		if !from.IsZero() {
			start = *from
			req.StartTime = timestamppb.New(start)
		}
		switch {
		case !until.IsZero():
			req.EndTime = timestamppb.New(*until)
		case *length > 0:
			req.EndTime = timestamppb.New(start.Add(*length))
		default:
			return fmt.Errorf("say when it ends: -until TIME or -for DURATION")
		}
		r, err := e.api.APIKeys.ScheduleLimits(e.ctx, req)
		if err != nil {
			return err
		}
		return e.show(r, func(w io.Writer) error { return printSchedule(w, r) })
	}
}

func printSchedule(w io.Writer, r *keywardv1.ScheduleLimitsResponse) error {
	win := r.GetWindow()
	verb := "scheduled " + win.GetId()
	if r.GetDryRun() {
		verb = "would schedule (dry run, nothing written)"
	}
	fmt.Fprintf(w, "%s: %s, rate limits ×%s from %s to %s\n", verb, target(win), limitwin.FormatFactor(win.GetFactor()),
		timeOr(win.GetStartTime(), "now"), timeOr(win.GetEndTime(), "-"))
	if !r.GetDryRun() {
		return nil // only a dry run lists the keys
	}
	fmt.Fprintf(w, "%d keys covered now (keys made later are covered too)", r.GetKeys())
	if r.GetUnlimited() > 0 {
		fmt.Fprintf(w, "; %d of them have no rate limit, which no factor changes", r.GetUnlimited())
	}
	fmt.Fprintln(w)
	if len(r.GetChanges()) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tOWNER\tNAME\tENV\tLIMITS NOW\tDURING\tNOTE")
	for _, c := range r.GetChanges() {
		note := ""
		if c.GetOverriddenBy() != "" {
			note = "a more specific window wins for part of it: " + c.GetOverriddenBy()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.GetKeyId(), c.GetOwner(), c.GetName(), c.GetEnvironment(),
			limitsText(c.GetBefore()), limitsText(c.GetDuring()), note)
	}
	if n := int(r.GetKeys()); n > len(r.GetChanges()) {
		fmt.Fprintf(tw, "... and %d more\n", n-len(r.GetChanges()))
	}
	return tw.Flush()
}

// apikeyLimitPlan lists the limit windows scheduled, like rotation plan.
func apikeyLimitPlan(f *flagSet) action {
	owner := f.String("owner", "", "only the windows of this owner's keys (exactly this target)")
	envName := f.String("env", "", "only the windows of this environment's keys (exactly this target)")
	id := f.String("id", "", "the windows covering this key (its own, its owner's, its environment's)")
	all := f.Bool("all", false, "also the windows over or cancelled (kept 30 days)")
	f.Exclusive("id", "owner")
	f.Exclusive("id", "env")
	return func(e *env, _ []string) error {
		r, err := e.api.APIKeys.ListLimitWindows(e.ctx, &keywardv1.ListLimitWindowsRequest{KeyId: *id, Owner: *owner, Environment: *envName, IncludeEnded: *all})
		if err != nil {
			return err
		}
		return e.show(r, func(w io.Writer) error {
			if len(r.GetWindows()) == 0 {
				_, err := fmt.Fprintln(w, "no limit windows scheduled (keyward apikey schedule-limits)")
				return err
			}
			return printWindows(w, r.GetWindows(), time.Now())
		})
	}
}

func printWindows(w io.Writer, ws []*keywardv1.LimitWindow, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WINDOW\tCOVERS\tFACTOR\tFROM\tUNTIL\tSTATE\tWHEN\tREASON")
	for _, win := range ws {
		start, end := win.GetStartTime().AsTime(), win.GetEndTime().AsTime()
		when := ""
		switch win.GetState() {
		case keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_PENDING:
			when = "starts in " + days(start.Sub(now))
		case keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_ACTIVE:
			when = "ends in " + days(end.Sub(now))
		case keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_CANCELLED:
			when = "by " + win.GetCancelledBy() + " at " + timeOr(win.GetCancelTime(), "-")
		}
		fmt.Fprintf(tw, "%s\t%s\t×%s\t%s\t%s\t%s\t%s\t%s\n", win.GetId(), target(win), limitwin.FormatFactor(win.GetFactor()),
			start.Format(time.RFC3339), end.Format(time.RFC3339), short(win.GetState(), "LIMIT_WINDOW_STATE_"), when, win.GetReason())
	}
	return tw.Flush()
}

// apikeyCancelLimits cancels a limit window.
func apikeyCancelLimits(f *flagSet) action {
	id := f.String("window", "", "the window (lw_...)")
	f.Required("window")
	return func(e *env, _ []string) error {
		r, err := e.api.APIKeys.CancelLimitWindow(e.ctx, &keywardv1.CancelLimitWindowRequest{Id: *id})
		if err != nil {
			return err
		}
		win := r.GetWindow()
		return e.showf(r, "cancelled %s: %s, rate limits ×%s, %s\n", win.GetId(), target(win), limitwin.FormatFactor(win.GetFactor()),
			strings.ToLower(short(win.GetState(), "LIMIT_WINDOW_STATE_")))
	}
}

// target is what a window covers, for people.
func target(w *keywardv1.LimitWindow) string {
	return limitwin.Target{Key: w.GetKeyId(), Owner: w.GetOwner(), Environment: w.GetEnvironment()}.String()
}

// limitsText is a key's limits in a table cell.
func limitsText(ls []*keywardv1.RateLimit) string {
	if len(ls) == 0 {
		return "none"
	}
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = fmtLimit(l)
	}
	return strings.Join(out, ", ")
}
