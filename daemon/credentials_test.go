package daemon_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/plugins/conformance"
)

// filePlugin builds keyward-plugin-file for a keywardd of the test.
func filePlugin(t *testing.T) daemon.PluginConfig {
	bin := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-file")
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return daemon.PluginConfig{Name: "file", Path: bin, SHA256: hex.EncodeToString(sum[:])}
}

// TestCredentialsEndToEnd: a managed credential through keywardd's socket,
// rotated by the file plugin (a real process): the file and GetCredential
// agree after each rotation, the policy decides who gets the secret, and
// the secret is in no log and no audit record.
func TestCredentialsEndToEnd(t *testing.T) {
	in := startWith(t, uidPolicy(allowAll), func(c *daemon.Config) { c.Plugins = []daemon.PluginConfig{filePlugin(t)} })
	ctx := context.Background()
	cc := keywardv1.NewCredentialServiceClient(in.conn)
	path := filepath.Join(t.TempDir(), "db-password")
	reg, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "db-orders", Plugin: "file",
		Config: `{"path": "` + path + `"}`, RotationPeriod: durationpb.New(24 * time.Hour), Overlap: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if c := reg.Credential; c.Current == nil || c.Pending != nil || c.State != keywardv1.CredentialState_CREDENTIAL_STATE_ACTIVE || c.NextRotationTime == nil {
		t.Fatalf("registered: %v", c)
	}
	var secrets []string
	for round := range 2 {
		got, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "db-orders"})
		if err != nil {
			t.Fatal(err)
		}
		file, _ := os.ReadFile(path)
		if len(got.Secret) != 32 || string(file) != string(got.Secret) {
			t.Fatalf("round %d: GetCredential and the file disagree", round)
		}
		secrets = append(secrets, string(got.Secret))
		if round == 0 {
			r, err := cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: "db-orders"})
			if err != nil || r.Credential.Previous == nil {
				t.Fatalf("RotateCredential: %v, %v", r, err)
			}
		}
	}
	if secrets[0] == secrets[1] {
		t.Fatal("the rotation kept the secret")
	}
	list, err := cc.ListCredentials(ctx, &keywardv1.ListCredentialsRequest{})
	if err != nil || len(list.Credentials) != 1 || list.Credentials[0].Name != "db-orders" {
		t.Fatalf("ListCredentials: %v, %v", list, err)
	}
	for _, c := range []struct {
		call func() error
		code codes.Code
		msg  string
	}{
		{func() error {
			_, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "x", Plugin: "file", Config: `{"path": "rel"}`})
			return err
		}, codes.FailedPrecondition, "must be absolute"},
		{func() error {
			_, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "x", Plugin: "nope"})
			return err
		}, codes.FailedPrecondition, `no plugin "nope"`},
		{func() error {
			_, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "db-orders", Plugin: "file", Config: `{"path": "` + path + `"}`})
			return err
		}, codes.AlreadyExists, "db-orders"},
		{func() error {
			_, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "nope"})
			return err
		}, codes.NotFound, "nope"},
	} {
		wantCode(t, c.call(), c.code, c.msg)
	}

	// A caller granted GetCredential on other names gets nothing here.
	os.WriteFile(in.cfg.PolicyFile, []byte(uidPolicy("      - operations: [CredentialService.GetCredential, CredentialService.ListCredentials]\n        keys: [\"cache-*\"]")), 0o600)
	in.reload <- struct{}{}
	waitFor(t, func() bool { return strings.Contains(in.logs.String(), "policy reloaded") })
	_, err = cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "db-orders"})
	wantCode(t, err, codes.PermissionDenied, "CredentialService.GetCredential")
	if list, err := cc.ListCredentials(ctx, &keywardv1.ListCredentialsRequest{}); err != nil || len(list.Credentials) != 0 {
		t.Fatalf("ListCredentials for another name: %v, %v", list, err)
	}
	os.WriteFile(in.cfg.PolicyFile, []byte(uidPolicy(allowAll)), 0o600)
	in.reload <- struct{}{}
	waitFor(t, func() bool { return strings.Count(in.logs.String(), "policy reloaded") == 2 })

	r, err := cc.RevokeCredential(ctx, &keywardv1.RevokeCredentialRequest{Name: "db-orders"})
	if err != nil || r.Credential.State != keywardv1.CredentialState_CREDENTIAL_STATE_REVOKED || r.Credential.Current != nil {
		t.Fatalf("RevokeCredential: %v, %v", r, err)
	}
	_, err = cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "db-orders"})
	wantCode(t, err, codes.FailedPrecondition, "revoked")

	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	verifyAudit(t, in)
	audited, _ := os.ReadFile(filepath.Join(in.cfg.DataDir, "audit.log"))
	if !strings.Contains(string(audited), `"op":"CredentialService.GetCredential","key":"db-orders"`) {
		t.Error("GetCredential is not audited with the credential's name")
	}
	for _, s := range secrets {
		if strings.Contains(string(audited), s) || strings.Contains(in.logs.String(), s) {
			t.Error("a credential's secret is in the audit log or the logs")
		}
	}
}

// TestRevocationFanOut: API key revocations, one and in bulk, reach a
// plugin that subscribes to them (the test plugin, a real process), each
// once and in order, through keywardd's outbox.
func TestRevocationFanOut(t *testing.T) {
	bin := conformance.Build(t, "github.com/keyward/keyward/plugins/host/testdata/testplugin")
	b, _ := os.ReadFile(bin)
	sum := sha256.Sum256(b)
	rec := filepath.Join(t.TempDir(), "record")
	in := startWith(t, uidPolicy(allowAll), func(c *daemon.Config) {
		c.Plugins = []daemon.PluginConfig{{Name: "test", Path: bin, SHA256: hex.EncodeToString(sum[:]), Env: map[string]string{"TESTPLUGIN_RECORD": rec}}}
	})
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.conn)
	var ids []string
	for _, owner := range []string{"team-a", "team-b", "team-b"} {
		r, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "n", Environment: "prod", Permissions: []string{"read-only"}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.Key.Id)
	}
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: ids[0]}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Owner: "team-b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := keywardv1.NewTokenServiceClient(in.conn).RevokeToken(ctx, &keywardv1.RevokeTokenRequest{TokenId: "jti-not-subscribed"}); err != nil {
		t.Fatal(err)
	}
	var got []string
	waitFor(t, func() bool {
		b, _ := os.ReadFile(rec)
		got = nil
		for line := range strings.Lines(string(b)) {
			if strings.HasPrefix(line, "revoke ") {
				got = append(got, line)
			}
		}
		return len(got) >= 3
	})
	time.Sleep(300 * time.Millisecond) // nothing more may come
	b, _ = os.ReadFile(rec)
	if n := strings.Count(string(b), "revoke "); n != 3 || strings.Contains(string(b), "jti-not-subscribed") {
		t.Fatalf("deliveries:\n%s", b)
	}
	if !strings.Contains(got[0], ids[0]+" team-a") || !strings.Contains(got[1]+got[2], ids[1]) || !strings.Contains(got[1]+got[2], ids[2]) {
		t.Fatalf("deliveries out of order or wrong:\n%s", strings.Join(got, ""))
	}
	st, err := keywardv1.NewStatusServiceClient(in.conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil || len(st.Plugins) != 1 || st.Plugins[0].EventsPending != 0 || st.Plugins[0].DeliveryError != "" {
		t.Fatalf("status: %v, %v", st.GetPlugins(), err)
	}
}
