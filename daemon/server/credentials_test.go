package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/host"
)

// reader may fetch and list the app-* credentials.
var credentialsPolicy = withAdmin(`  reader:
    permissions:
      - operations: [CredentialService.GetCredential, CredentialService.ListCredentials]
        keys: ["app-*"]
`, `  - role: reader
    callers: [{uid: 2000}]
`)

// withFilePlugin gives the server managed credentials rotated by the
// file plugin (cmd/keyward-plugin-file, built and run for the test), which
// writes each secret to a file under the test's secrets directory.
func withFilePlugin(t *testing.T, ts *testServer, cfg *Config) {
	t.Helper()
	path := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-file")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	secrets := filepath.Join(ts.dir, "secrets")
	if err := os.Mkdir(secrets, 0o700); err != nil {
		t.Fatal(err)
	}
	p, err := host.Start(host.Config{Name: "file", Path: path, SHA256: hex.EncodeToString(sum[:]), CallTimeout: 10 * time.Second,
		Log: slog.New(slog.DiscardHandler), Env: map[string]string{"KEYWARD_FILE_DIRS": secrets}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	cfg.Credentials = credentials.New(ts.st, host.Set{"file": p}, credentials.EnvelopeSealer{Envelope: ts.envelope, Key: credentialsKey}, ts.clock.now)
}

// fileConfig is the file plugin's configuration for a secret in name.
func fileConfig(ts *testServer, name string) string {
	return `{"path": "` + filepath.Join(ts.dir, "secrets", name) + `"}`
}

func TestCredentialService(t *testing.T) {
	ts := newTestServer(t, credentialsPolicy, withFilePlugin)
	var secret []byte // what GetCredential answered
	run(t, ts, []serviceCase{
		{name: "register", uid: admin, method: "CredentialService/RegisterCredential",
			req: &keywardv1.RegisterCredentialRequest{Name: "app-db", Plugin: "file", Config: fileConfig(ts, "db"),
				RotationPeriod: durationpb.New(24 * time.Hour), Overlap: durationpb.New(time.Hour)},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-db"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				c := resp.(*keywardv1.RegisterCredentialResponse).GetCredential()
				if c.GetName() != "app-db" || c.GetState() != keywardv1.CredentialState_CREDENTIAL_STATE_ACTIVE || c.GetCurrent() == nil ||
					c.GetRotationPeriod().AsDuration() != 24*time.Hour || c.GetOverlap().AsDuration() != time.Hour {
					t.Errorf("registered %+v", c)
				}
			}},
		{name: "register another", uid: admin, method: "CredentialService/RegisterCredential",
			req:  &keywardv1.RegisterCredentialRequest{Name: "ops-db", Plugin: "file", Config: fileConfig(ts, "ops")},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "ops-db"}},
		{name: "register denied", uid: reader, method: "CredentialService/RegisterCredential",
			req:  &keywardv1.RegisterCredentialRequest{Name: "app-x", Plugin: "file", Config: fileConfig(ts, "x")},
			code: codes.PermissionDenied, msg: `not granted CredentialService.RegisterCredential on key "app-x"`,
			audit: wantAudit{outcome: "denied", key: "app-x"},
			after: func(t *testing.T, _ *testServer, _ any, _ audit.Record) {
				if _, err := os.Stat(filepath.Join(ts.dir, "secrets", "x")); err == nil {
					t.Error("a denied registration made its secret")
				}
			}},
		{name: "register with no such plugin", uid: admin, method: "CredentialService/RegisterCredential",
			req:  &keywardv1.RegisterCredentialRequest{Name: "app-x", Plugin: "vault", Config: "{}"},
			code: codes.FailedPrecondition, msg: "vault", audit: wantAudit{outcome: "error", key: "app-x"}},
		{name: "register with an overlap as long as its period", uid: admin, method: "CredentialService/RegisterCredential",
			req: &keywardv1.RegisterCredentialRequest{Name: "app-x", Plugin: "file", Config: fileConfig(ts, "x"),
				RotationPeriod: durationpb.New(time.Hour), Overlap: durationpb.New(time.Hour)},
			code: codes.InvalidArgument, msg: "the overlap must be shorter than the rotation period", audit: wantAudit{outcome: "error", key: "app-x"}},
		{name: "register one that exists", uid: admin, method: "CredentialService/RegisterCredential",
			req:  &keywardv1.RegisterCredentialRequest{Name: "app-db", Plugin: "file", Config: fileConfig(ts, "db2")},
			code: codes.AlreadyExists, msg: "app-db", audit: wantAudit{outcome: "error", key: "app-db"}},
		{name: "get", uid: reader, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "app-db"}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-db"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				secret = resp.(*keywardv1.GetCredentialResponse).GetSecret()
				if b, err := os.ReadFile(filepath.Join(ts.dir, "secrets", "db")); err != nil || len(secret) == 0 || !bytes.Equal(b, secret) {
					t.Errorf("answered %d bytes; the plugin wrote another (%v)", len(secret), err)
				}
			}},
		{name: "get denied", uid: reader, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "ops-db"}, code: codes.PermissionDenied,
			msg: `not granted CredentialService.GetCredential on key "ops-db"`, audit: wantAudit{outcome: "denied", key: "ops-db"}},
		{name: "get not found", uid: reader, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "app-none"}, code: codes.NotFound, msg: "app-none",
			audit: wantAudit{outcome: "error", key: "app-none"}},
		{name: "list: those the caller is granted", uid: reader, method: "CredentialService/ListCredentials",
			req: &keywardv1.ListCredentialsRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				if cs := resp.(*keywardv1.ListCredentialsResponse).GetCredentials(); len(cs) != 1 || cs[0].GetName() != "app-db" || rec.Items != 1 {
					t.Errorf("listed %d credentials, audited %d; want app-db alone", len(cs), rec.Items)
				}
			}},
		{name: "rotate", uid: admin, method: "CredentialService/RotateCredential",
			req: &keywardv1.RotateCredentialRequest{Name: "app-db"}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-db"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				b, _ := os.ReadFile(filepath.Join(ts.dir, "secrets", "db"))
				if resp.(*keywardv1.RotateCredentialResponse).GetCredential().GetPrevious() == nil || bytes.Equal(b, secret) {
					t.Error("the rotation kept the secret")
				}
			}},
		{name: "rotate denied", uid: reader, method: "CredentialService/RotateCredential",
			req: &keywardv1.RotateCredentialRequest{Name: "app-db"}, code: codes.PermissionDenied,
			msg: "not granted CredentialService.RotateCredential", audit: wantAudit{outcome: "denied", key: "app-db"}},
		{name: "revoke", uid: admin, method: "CredentialService/RevokeCredential",
			req: &keywardv1.RevokeCredentialRequest{Name: "app-db"}, code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-db"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if st := resp.(*keywardv1.RevokeCredentialResponse).GetCredential().GetState(); st != keywardv1.CredentialState_CREDENTIAL_STATE_REVOKED {
					t.Errorf("state %v after revocation", st)
				}
			}},
		{name: "get a revoked credential", uid: reader, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "app-db"}, code: codes.FailedPrecondition, msg: "revoked",
			audit: wantAudit{outcome: "error", key: "app-db"}},
	})
	log, err := os.ReadFile(ts.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(secret) == 0 || bytes.Contains(log, secret) || bytes.Contains(log, []byte(hex.EncodeToString(secret))) {
		t.Error("the audit log holds the credential (or the test lost it)")
	}
}

// TestCredentialsOff: a keywardd without managed credentials says so, on
// every call, after the policy check.
func TestCredentialsOff(t *testing.T) {
	ts := newTestServer(t, credentialsPolicy)
	run(t, ts, []serviceCase{
		{name: "get", uid: reader, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "app-db"}, code: codes.Unavailable, msg: "managed credentials are off in this keywardd",
			audit: wantAudit{outcome: "error", key: "app-db"}},
		{name: "list", uid: admin, method: "CredentialService/ListCredentials",
			req: &keywardv1.ListCredentialsRequest{}, code: codes.Unavailable, msg: "managed credentials are off", audit: wantAudit{outcome: "error"}},
		{name: "get denied", uid: stranger, method: "CredentialService/GetCredential",
			req: &keywardv1.GetCredentialRequest{Name: "app-db"}, code: codes.PermissionDenied, msg: "not granted",
			audit: wantAudit{outcome: "denied", key: "app-db"}},
	})
}
