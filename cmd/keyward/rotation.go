package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// planned is a rotation to come.
type planned struct {
	Kind   string        `json:"kind"` // key, credential
	Name   string        `json:"name"`
	Period time.Duration `json:"period"`
	Next   time.Time     `json:"next"`
	Late   bool          `json:"overdue"`
}

// rotationCommand is keyward rotation plan: what rotates next, soonest
// first, among the keys and credentials the caller may list.
func rotationCommand(e *env, sub string, args []string) error {
	if sub != "plan" {
		return usageError{fmt.Sprintf("unknown rotation command %q; run keyward help", sub)}
	}
	fs := newFlags("rotation plan")
	within := fs.Duration("within", 0, "only rotations due within this long (0: all)")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, now := e.ctx, time.Now()
	var plan []planned
	if r, err := c.Keys.ListKeys(ctx, &keywardv1.ListKeysRequest{}); err == nil {
		for _, k := range r.GetKeys() {
			vs := k.GetVersions()
			if k.GetRotationPeriod() == nil || len(vs) == 0 || k.GetState() != keywardv1.KeyState_KEY_STATE_ENABLED {
				continue
			}
			p := k.GetRotationPeriod().AsDuration()
			plan = append(plan, planned{Kind: "key", Name: k.GetName(), Period: p, Next: vs[len(vs)-1].GetCreateTime().AsTime().Add(p)})
		}
	} else if !isDenied(err) {
		return client.Wrap(err)
	}
	if r, err := keywardv1.NewCredentialServiceClient(c.Conn()).ListCredentials(ctx, &keywardv1.ListCredentialsRequest{}); err == nil {
		for _, cr := range r.GetCredentials() {
			if cr.GetNextRotationTime() == nil || cr.GetState() != keywardv1.CredentialState_CREDENTIAL_STATE_ACTIVE {
				continue
			}
			plan = append(plan, planned{Kind: "credential", Name: cr.GetName(), Period: cr.GetRotationPeriod().AsDuration(), Next: cr.GetNextRotationTime().AsTime()})
		}
	} else if !isDenied(err) {
		return client.Wrap(err)
	}
	plan = slices.DeleteFunc(plan, func(p planned) bool { return *within > 0 && p.Next.After(now.Add(*within)) })
	slices.SortFunc(plan, func(a, b planned) int { return a.Next.Compare(b.Next) })
	for i := range plan {
		plan[i].Late = plan[i].Next.Before(now)
	}
	if e.json {
		if plan == nil {
			plan = []planned{}
		}
		b, err := json.MarshalIndent(plan, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, string(b))
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tPERIOD\tNEXT\tIN")
	for _, p := range plan {
		in := p.Next.Sub(now).Round(time.Minute).String()
		if p.Late {
			in = "overdue by " + now.Sub(p.Next).Round(time.Minute).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", p.Kind, p.Name, p.Period, p.Next.Format(time.RFC3339), in)
	}
	return tw.Flush()
}
