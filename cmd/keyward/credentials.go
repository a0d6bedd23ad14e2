package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// The credential verbs: the secret of get goes to standard output or a
// 0600 file, never argv.

func credentialRegister(f *flagSet) action {
	name := nameFlag(f, "the credential's name")
	plugin := f.String("plugin", "", "the plugin that rotates it")
	config := f.String("config", "{}", "the plugin's configuration, JSON (not secret)")
	period := f.Duration("rotation-period", 0, "how often keywardd rotates it (0: only when asked)")
	overlap := f.Duration("overlap", 0, "how long the previous version keeps working after a rotation")
	f.Required("plugin")
	return func(e *env, _ []string) error {
		req := &keywardv1.RegisterCredentialRequest{Name: *name, Plugin: *plugin, Config: *config, Overlap: durationpb.New(*overlap)}
		if *period > 0 {
			req.RotationPeriod = durationpb.New(*period)
		}
		r, err := credentials(e).RegisterCredential(e.ctx, req)
		return e.showCredential(r.GetCredential(), err)
	}
}

func credentials(e *env) keywardv1.CredentialServiceClient {
	return keywardv1.NewCredentialServiceClient(e.api.Conn())
}

func credentialGet(f *flagSet) action {
	name := nameFlag(f, "the credential's name")
	out := f.String("out", "", "write the secret to this file (mode 0600) instead of standard output")
	return func(e *env, _ []string) error {
		r, err := credentials(e).GetCredential(e.ctx, &keywardv1.GetCredentialRequest{Name: *name})
		if err != nil {
			return err
		}
		defer clear(r.Secret)
		return e.writeData(*out, &r.Secret, r)
	}
}

func credentialRotate(f *flagSet) action {
	name := nameFlag(f, "the credential's name")
	return func(e *env, _ []string) error {
		r, err := credentials(e).RotateCredential(e.ctx, &keywardv1.RotateCredentialRequest{Name: *name})
		return e.showCredential(r.GetCredential(), err)
	}
}

func credentialRevoke(f *flagSet) action {
	name := nameFlag(f, "the credential's name")
	return func(e *env, _ []string) error {
		r, err := credentials(e).RevokeCredential(e.ctx, &keywardv1.RevokeCredentialRequest{Name: *name})
		return e.showCredential(r.GetCredential(), err)
	}
}

func credentialList(f *flagSet) action {
	return func(e *env, _ []string) error {
		r, err := credentials(e).ListCredentials(e.ctx, &keywardv1.ListCredentialsRequest{})
		if err != nil {
			return err
		}
		return e.show(messages(r.GetCredentials()), func(w io.Writer) error {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tPLUGIN\tSTATE\tCURRENT\tSINCE\tNEXT ROTATION\tPENDING\tLAST ERROR")
			for _, c := range r.GetCredentials() {
				fmt.Fprintln(tw, credentialRow(c))
			}
			return tw.Flush()
		})
	}
}

// showCredential prints the credential a call answered with, unless the
// call failed.
func (e *env) showCredential(c *keywardv1.Credential, err error) error {
	if err != nil {
		return err
	}
	return e.showf(c, "%s\n", credentialRow(c))
}

func credentialRow(c *keywardv1.Credential) string {
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
	return strings.Join([]string{c.GetName(), c.GetPlugin(), short(c.GetState(), "CREDENTIAL_STATE_"), current,
		timeOr(c.GetCurrent().GetActivateTime(), "-"), timeOr(c.GetNextRotationTime(), "-"), pending, lastErr}, "\t")
}
