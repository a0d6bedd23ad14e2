package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

func rotations(e *env) keywardv1.RotationServiceClient {
	return keywardv1.NewRotationServiceClient(e.api.Conn())
}

// rotationPlan is what keywardd rotates next, soonest first, among what
// the caller may see.
func rotationPlan(f *flagSet) action {
	within := f.Duration("within", 0, "only rotations due within this long (0: all)")
	limit := f.Uint32("limit", 1000, "at most this many, the soonest (up to 10000)")
	return func(e *env, _ []string) error {
		req := &keywardv1.GetRotationPlanRequest{Limit: *limit}
		if *within > 0 {
			req.Within = durationpb.New(*within)
		}
		r, err := rotations(e).GetRotationPlan(e.ctx, req)
		if err != nil {
			return err
		}
		plan := r.GetRotations()
		if n := int(r.GetTotal()); n > len(plan) {
			fmt.Fprintf(e.stderr, "the %d soonest of %d; -within or -limit for others\n", len(plan), n)
		}
		return e.show(messages(plan), func(w io.Writer) error { return printPlan(w, plan, time.Now()) })
	}
}

func printPlan(w io.Writer, plan []*keywardv1.ScheduledRotation, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tPOLICY\tACTION\tDUE\tIN\tLAST RUN")
	for _, p := range plan {
		due := p.GetDueTime().AsTime()
		in := days(due.Sub(now))
		if p.GetOverdue() {
			in = "overdue by " + days(now.Sub(due))
		}
		last := "-"
		if p.GetLastRunTime() != nil {
			last = p.GetLastRunTime().AsTime().Format(time.RFC3339) + " " + p.GetOutcome()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s (%v)\t%s\t%s\t%s\t%s\n", p.GetKind(), p.GetId(), p.GetPolicy(), p.GetEvery().AsDuration(), p.GetAction(),
			due.Format(time.RFC3339), in, last)
	}
	return tw.Flush()
}

// days is a duration as days and hours, or hours and minutes under a day.
func days(d time.Duration) string {
	if d < 24*time.Hour {
		return d.Round(time.Minute).String()
	}
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
}

// panicRotate is a compromised key rotated at once, its old versions
// retired, timed from the command to the moment keywardd had it.
func panicRotate(f *flagSet) action {
	dry := f.Bool("dry-run", false, "say what it would do, do nothing")
	return func(e *env, args []string) error {
		name := args[0]
		start := time.Now()
		r, err := rotations(e).PanicRotate(e.ctx, &keywardv1.PanicRotateRequest{Name: name, DryRun: *dry})
		if err != nil {
			return err
		}
		took := time.Since(start)
		err = e.show(r, func(w io.Writer) error {
			verb := map[bool]string{true: "would", false: "did"}[*dry]
			fmt.Fprintf(w, "%s: %s make version %d; versions %v %s stop encrypting and signing\n", name, verb, r.GetNewVersion(), r.GetRetiredVersions(), verb)
			if r.GetWithdrawn() {
				fmt.Fprintf(w, "  signing key: the retired versions leave the JWKS; every token they signed is refused\n")
			} else {
				fmt.Fprintf(w, "  at most %d ciphertexts under them: re-encrypt (keyward reencrypt), then raise the minimum (keyward key set-min-version)\n", r.GetEncryptions())
			}
			_, err := fmt.Fprintf(w, "  %d event(s) for the plugins\n", r.GetPluginEvents())
			return err
		})
		if err == nil && !*dry {
			fmt.Fprintf(e.stderr, "in effect %v after the command: every call from now on uses version %d\n", took.Round(time.Millisecond), r.GetNewVersion())
		}
		return err
	}
}
