package main

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// credentialCommand is keyward credential register|get|rotate|revoke|list.
// get writes the secret to standard output or a 0600 file, never argv.
func credentialCommand(e *env, sub string, args []string) error {
	fs := newFlags("credential " + sub)
	var (
		name, plugin, config, out *string
		period, overlap           *time.Duration
	)
	if sub != "list" {
		name = fs.String("name", "", "the credential's name")
	}
	switch sub {
	case "register":
		plugin = fs.String("plugin", "", "the plugin that rotates it")
		config = fs.String("config", "{}", "the plugin's configuration, JSON (not secret)")
		period = fs.Duration("rotation-period", 0, "how often keywardd rotates it (0: only when asked)")
		overlap = fs.Duration("overlap", 0, "how long the previous version keeps working after a rotation")
	case "get":
		out = fs.String("out", "", "write the secret to this file (mode 0600) instead of standard output")
	case "rotate", "revoke", "list":
	default:
		return usageError{fmt.Sprintf("unknown credential command %q; run keyward help", sub)}
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if name != nil && *name == "" {
		return usageError{fmt.Sprintf("credential %s needs -name", sub)}
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	cc, ctx := keywardv1.NewCredentialServiceClient(c.Conn()), e.ctx
	var cred *keywardv1.Credential
	switch sub {
	case "register":
		if *plugin == "" {
			return usageError{"credential register needs -plugin"}
		}
		req := &keywardv1.RegisterCredentialRequest{Name: *name, Plugin: *plugin, Config: *config, Overlap: durationpb.New(*overlap)}
		if *period > 0 {
			req.RotationPeriod = durationpb.New(*period)
		}
		r, err := cc.RegisterCredential(ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		cred = r.GetCredential()
	case "get":
		r, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		return e.writeOutput(*out, r.GetSecret())
	case "rotate":
		r, err := cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		cred = r.GetCredential()
	case "revoke":
		r, err := cc.RevokeCredential(ctx, &keywardv1.RevokeCredentialRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		cred = r.GetCredential()
	case "list":
		r, err := cc.ListCredentials(ctx, &keywardv1.ListCredentialsRequest{})
		if err != nil {
			return client.Wrap(err)
		}
		if e.json {
			return e.printJSON(r)
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tPLUGIN\tSTATE\tCURRENT\tSINCE\tNEXT ROTATION\tPENDING\tLAST ERROR")
		for _, c := range r.GetCredentials() {
			fmt.Fprintln(tw, credentialRow(c))
		}
		return tw.Flush()
	}
	if e.json {
		return e.printJSON(cred)
	}
	fmt.Fprintln(e.stdout, credentialRow(cred))
	return nil
}

func credentialRow(c *keywardv1.Credential) string {
	ts := func(t interface{ AsTime() time.Time }, ok bool) string {
		if !ok {
			return "-"
		}
		return t.AsTime().Format(time.RFC3339)
	}
	current, pending, lastErr := "-", "-", "-"
	if c.GetCurrent() != nil {
		current = c.GetCurrent().GetHandle()
	}
	if p := c.GetPending(); p != nil {
		pending = p.GetStep() + " " + p.GetOperationId()
	}
	if c.GetLastError() != "" {
		lastErr = c.GetLastError()
	}
	return strings.Join([]string{c.GetName(), c.GetPlugin(), strings.ToLower(strings.TrimPrefix(c.GetState().String(), "CREDENTIAL_STATE_")), current,
		ts(c.GetCurrent().GetActivateTime(), c.GetCurrent() != nil), ts(c.GetNextRotationTime(), c.GetNextRotationTime() != nil), pending, lastErr}, "\t")
}
