package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// planned is a rotation to come, as keyward rotation plan -output json
// prints it.
type planned struct {
	Kind    string        `json:"kind"` // key, credential, api_key
	Name    string        `json:"name"` // a key's or credential's name, an API key's ID
	Owner   string        `json:"owner,omitempty"`
	Policy  string        `json:"policy"`
	Period  time.Duration `json:"period"`
	Overlap time.Duration `json:"overlap"`
	Action  string        `json:"action"`
	Due     time.Time     `json:"due"`
	Next    time.Time     `json:"next"`
	Late    bool          `json:"overdue"`
	LastRun *time.Time    `json:"last_run,omitempty"`
	Outcome string        `json:"outcome,omitempty"`
}

// rotationCommand is keyward rotation plan: what keywardd rotates next,
// soonest first, among what the caller may see.
func rotationCommand(e *env, sub string, args []string) error {
	if sub != "plan" {
		return usageError{fmt.Sprintf("unknown rotation command %q; run keyward help", sub)}
	}
	fs := newFlags("rotation plan")
	within := fs.Duration("within", 0, "only rotations due within this long (0: all)")
	limit := fs.Uint("limit", 1000, "at most this many, the soonest (up to 10000)")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	req := &keywardv1.GetRotationPlanRequest{Limit: uint32(*limit)}
	if *within > 0 {
		req.Within = durationpb.New(*within)
	}
	r, err := keywardv1.NewRotationServiceClient(c.Conn()).GetRotationPlan(e.ctx, req)
	if err != nil {
		return client.Wrap(err)
	}
	plan := []planned{}
	for _, x := range r.GetRotations() {
		p := planned{Kind: x.GetKind(), Name: x.GetId(), Owner: x.GetOwner(), Policy: x.GetPolicy(), Period: x.GetEvery().AsDuration(),
			Overlap: x.GetOverlap().AsDuration(), Action: x.GetAction(), Due: x.GetDueTime().AsTime(), Next: x.GetNextRunTime().AsTime(),
			Late: x.GetOverdue(), Outcome: x.GetOutcome()}
		if x.GetLastRunTime() != nil {
			t := x.GetLastRunTime().AsTime()
			p.LastRun = &t
		}
		plan = append(plan, p)
	}
	if n := int(r.GetTotal()); n > len(plan) {
		fmt.Fprintf(e.stderr, "the %d soonest of %d; -within or -limit for others\n", len(plan), n)
	}
	if e.json {
		b, err := json.MarshalIndent(plan, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, string(b))
		return nil
	}
	now := time.Now()
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tPOLICY\tACTION\tDUE\tIN\tLAST RUN")
	for _, p := range plan {
		in := days(p.Due.Sub(now))
		if p.Late {
			in = "overdue by " + days(now.Sub(p.Due))
		}
		last := "-"
		if p.LastRun != nil {
			last = p.LastRun.Format(time.RFC3339) + " " + p.Outcome
		}
		fmt.Fprintf(tw, "%s\t%s\t%s (%v)\t%s\t%s\t%s\t%s\n", p.Kind, p.Name, p.Policy, p.Period, p.Action, p.Due.Format(time.RFC3339), in, last)
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

// panicRotateCommand is keyward panic-rotate KEY: a compromised key
// rotated at once, its old versions retired, timed from the command to the
// moment keywardd had it.
func panicRotateCommand(e *env, args []string) error {
	fs := newFlags("panic-rotate")
	dry := fs.Bool("dry-run", false, "say what it would do, do nothing")
	name := ""
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		name, args = args[0], args[1:]
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if name == "" {
		return usageError{"keyward panic-rotate KEY [-dry-run]: name the key"}
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	r, err := keywardv1.NewRotationServiceClient(c.Conn()).PanicRotate(e.ctx, &keywardv1.PanicRotateRequest{Name: name, DryRun: *dry})
	if err != nil {
		return client.Wrap(err)
	}
	took := time.Since(start)
	if e.json {
		b, err := json.MarshalIndent(map[string]any{"key": name, "dry_run": r.GetDryRun(), "new_version": r.GetNewVersion(),
			"retired_versions": r.GetRetiredVersions(), "encryptions": r.GetEncryptions(), "withdrawn": r.GetWithdrawn(),
			"plugin_events": r.GetPluginEvents(), "in_effect_after": took.String()}, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, string(b))
		return nil
	}
	verb := map[bool]string{true: "would", false: "did"}[*dry]
	fmt.Fprintf(e.stdout, "%s: %s make version %d; versions %v %s stop encrypting and signing\n", name, verb, r.GetNewVersion(), r.GetRetiredVersions(), verb)
	if r.GetWithdrawn() {
		fmt.Fprintf(e.stdout, "  signing key: the retired versions leave the JWKS; every token they signed is refused\n")
	} else {
		fmt.Fprintf(e.stdout, "  at most %d ciphertexts under them: re-encrypt (keyward reencrypt), then raise the minimum (keyward key set-min-version)\n", r.GetEncryptions())
	}
	fmt.Fprintf(e.stdout, "  %d event(s) for the plugins\n", r.GetPluginEvents())
	if !*dry {
		fmt.Fprintf(e.stderr, "in effect %v after the command: every call from now on uses version %d\n", took.Round(time.Millisecond), r.GetNewVersion())
	}
	return nil
}
