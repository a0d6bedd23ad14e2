package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// finding is one thing a review turned up.
type finding struct {
	Check   string `json:"check"`
	Subject string `json:"subject"`
	Detail  string `json:"detail"`
}

// reviewCommand is keyward review: what the regular review of keys should
// look at, from what the caller may list. Run monthly (docs/apikeys.md).
func reviewCommand(e *env, args []string) error {
	fs := newFlags("review")
	unused := fs.Duration("unused", 30*24*time.Hour, "API keys not used for this long are listed")
	format := fs.String("format", "table", "table, json or markdown")
	top := fs.Int("top", 5, "how many top consumers to list")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *format != "table" && *format != "json" && *format != "markdown" {
		return usageError{"-format is table, json or markdown"}
	}
	if e.json {
		*format = "json"
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, now := e.ctx, time.Now()
	var out []finding
	add := func(check, subject, format string, a ...any) {
		out = append(out, finding{check, subject, fmt.Sprintf(format, a...)})
	}

	// Root keys past their rotation date.
	if keys, err := c.Keys.ListKeys(ctx, &keywardv1.ListKeysRequest{}); err == nil {
		for _, k := range keys.GetKeys() {
			vs := k.GetVersions()
			if k.GetRotationPeriod() == nil || len(vs) == 0 {
				continue
			}
			due := vs[len(vs)-1].GetCreateTime().AsTime().Add(k.GetRotationPeriod().AsDuration())
			if now.After(due) {
				add("key past its rotation date", k.GetName(), "due %s", due.Format(time.RFC3339))
			}
		}
	} else if !isDenied(err) {
		return client.Wrap(err)
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
			return client.Wrap(err)
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
			return client.Wrap(err)
		}
		last := u.GetLastUsedTime()
		switch {
		case last == nil && now.Sub(k.GetCreateTime().AsTime()) > *unused:
			add("API key never used", subject, "created %s", k.GetCreateTime().AsTime().Format(time.DateOnly))
		case last != nil && now.Sub(last.AsTime()) > *unused:
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
		if i == *top || u.valid == 0 {
			break
		}
		add("top consumer", u.id, "%d valid verifications in 7 days", u.valid)
	}

	switch *format {
	case "json":
		if out == nil {
			out = []finding{}
		}
		b, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, string(b))
	case "markdown":
		fmt.Fprintf(e.stdout, "# keyward review, %s\n\n| check | subject | detail |\n| --- | --- | --- |\n", now.Format(time.DateOnly))
		for _, f := range out {
			fmt.Fprintf(e.stdout, "| %s | %s | %s |\n", f.Check, strings.ReplaceAll(f.Subject, "|", "\\|"), strings.ReplaceAll(f.Detail, "|", "\\|"))
		}
	default:
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CHECK\tSUBJECT\tDETAIL")
		for _, f := range out {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Check, f.Subject, f.Detail)
		}
		return tw.Flush()
	}
	return nil
}

// isDenied: the caller may not see this part; the review covers the rest.
func isDenied(err error) bool { return errors.Is(client.Wrap(err), client.ErrDenied) }
