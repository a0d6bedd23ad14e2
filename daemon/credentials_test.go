package daemon_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/postgres/pgtest"
	"github.com/keyward/keyward/plugins/webhook"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// pluginConfig builds a plugin's package for a keywardd of the test and
// pins it.
func pluginConfig(t *testing.T, name, pkg string, env map[string]string) daemon.PluginConfig {
	bin := conformance.Build(t, pkg)
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return daemon.PluginConfig{Name: name, Path: bin, SHA256: hex.EncodeToString(sum[:]), Env: env}
}

// filePlugin is keyward-plugin-file, allowed to write in dir.
func filePlugin(t *testing.T, dir string) daemon.PluginConfig {
	return pluginConfig(t, "file", "github.com/keyward/keyward/cmd/keyward-plugin-file", map[string]string{"KEYWARD_FILE_DIRS": dir})
}

// postgresPlugin is keyward-plugin-postgres for s, rotating role orders.
func postgresPlugin(t *testing.T, s *pgtest.Server) daemon.PluginConfig {
	pw := filepath.Join(t.TempDir(), "admin-password")
	os.WriteFile(pw, []byte(s.AdminPassword), 0o600)
	return pluginConfig(t, "postgres", "github.com/keyward/keyward/cmd/keyward-plugin-postgres", map[string]string{
		"KEYWARD_POSTGRES_DSN":           fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=postgres sslmode=disable", s.Port, s.AdminUser),
		"KEYWARD_POSTGRES_PASSWORD_FILE": pw, "KEYWARD_POSTGRES_ROLES": "orders"})
}

// TestCredentialsEndToEnd: a managed credential through keywardd's socket,
// rotated by the file plugin (a real process): the file and GetCredential
// agree after each rotation, the policy decides who gets the secret, and
// the secret is in no log and no audit record.
func TestCredentialsEndToEnd(t *testing.T) {
	dir := t.TempDir()
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) { c.Plugins = []daemon.PluginConfig{filePlugin(t, dir)} }))
	ctx := context.Background()
	cc := keywardv1.NewCredentialServiceClient(in.Conn)
	path := filepath.Join(dir, "db-password")
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
	os.WriteFile(in.Config.PolicyFile, []byte(uidPolicy("      - operations: [CredentialService.GetCredential, CredentialService.ListCredentials]\n        keys: [\"cache-*\"]")), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Contains(in.Log.String(), "policy reloaded") })
	_, err = cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "db-orders"})
	wantCode(t, err, codes.PermissionDenied, "CredentialService.GetCredential")
	if list, err := cc.ListCredentials(ctx, &keywardv1.ListCredentialsRequest{}); err != nil || len(list.Credentials) != 0 {
		t.Fatalf("ListCredentials for another name: %v, %v", list, err)
	}
	os.WriteFile(in.Config.PolicyFile, []byte(uidPolicy(allowAll)), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Count(in.Log.String(), "policy reloaded") == 2 })

	r, err := cc.RevokeCredential(ctx, &keywardv1.RevokeCredentialRequest{Name: "db-orders"})
	if err != nil || r.Credential.State != keywardv1.CredentialState_CREDENTIAL_STATE_REVOKED || r.Credential.Current != nil {
		t.Fatalf("RevokeCredential: %v, %v", r, err)
	}
	_, err = cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "db-orders"})
	wantCode(t, err, codes.FailedPrecondition, "revoked")

	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}
	verifyAudit(t, in)
	audited, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if !strings.Contains(string(audited), `"op":"CredentialService.GetCredential","key":"db-orders"`) {
		t.Error("GetCredential is not audited with the credential's name")
	}
	for _, s := range secrets {
		if strings.Contains(string(audited), s) || strings.Contains(in.Log.String(), s) {
			t.Error("a credential's secret is in the audit log or the logs")
		}
	}
}

// TestRevocationFanOut: API key revocations, one and in bulk, reach a
// plugin that subscribes to them (the test plugin, a real process), each
// once and in order, through keywardd's outbox.
func TestRevocationFanOut(t *testing.T) {
	rec := filepath.Join(t.TempDir(), "record")
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Plugins = []daemon.PluginConfig{pluginConfig(t, "test", "github.com/keyward/keyward/plugins/host/testdata/testplugin", map[string]string{"TESTPLUGIN_RECORD": rec})}
	}))

	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
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
	if _, err := keywardv1.NewTokenServiceClient(in.Conn).RevokeToken(ctx, &keywardv1.RevokeTokenRequest{TokenId: "jti-not-subscribed"}); err != nil {
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
	b, _ := os.ReadFile(rec)
	if n := strings.Count(string(b), "revoke "); n != 3 || strings.Contains(string(b), "jti-not-subscribed") {
		t.Fatalf("deliveries:\n%s", b)
	}
	if !strings.Contains(got[0], ids[0]+" team-a") || !strings.Contains(got[1]+got[2], ids[1]) || !strings.Contains(got[1]+got[2], ids[2]) {
		t.Fatalf("deliveries out of order or wrong:\n%s", strings.Join(got, ""))
	}
	st, err := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil || len(st.Plugins) != 1 || st.Plugins[0].EventsPending != 0 || st.Plugins[0].DeliveryError != "" {
		t.Fatalf("status: %v, %v", st.GetPlugins(), err)
	}
}

// TestRevocationReachesWebhookAfterOutage: an API key revoked while the
// webhook is down reaches it once it is back, exactly as docs/plugins.md
// and plugins/webhook document: signed, with the event ID as header and
// id, the type, the time and the key's ID and owner.
func TestRevocationReachesWebhookAfterOutage(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef-e2e-key")
	kf := filepath.Join(t.TempDir(), "webhook-key")
	os.WriteFile(kf, key, 0o600)
	var (
		mu     sync.Mutex
		down   = true
		tries  int
		bodies [][]byte
		heads  []http.Header
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		tries++
		if down {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		bodies, heads = append(bodies, b), append(heads, r.Header.Clone())
	}))
	defer srv.Close()
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		p := pluginConfig(t, "webhook", "github.com/keyward/keyward/cmd/keyward-plugin-webhook",
			map[string]string{"KEYWARD_WEBHOOK_URL": srv.URL, "KEYWARD_WEBHOOK_KEY_FILE": kf, "KEYWARD_WEBHOOK_EVENTS": "api_key"})
		p.CallTimeout = 5 * time.Second
		c.Plugins = []daemon.PluginConfig{p}
	}))

	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	r, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "n", Environment: "prod", Permissions: []string{"read-only"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: r.Key.Id}); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		mu.Lock()
		n := tries
		mu.Unlock()
		if n >= 3 {
			break
		}
		if i == 150 {
			t.Fatalf("the webhook was tried %d times in 15 s; log:\n%s", n, in.Log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	st, _ := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if p := st.GetPlugins(); len(p) != 1 || p[0].EventsPending != 1 || !strings.Contains(p[0].DeliveryError, "503") {
		t.Errorf("status while the webhook is down: %v", p)
	}
	mu.Lock()
	down = false
	mu.Unlock()
	deadline := time.Now().Add(20 * time.Second) // the outbox's backoff: 1 s, 2 s, 4 s, ...
	for {
		mu.Lock()
		n := len(bodies)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the revocation did not reach the webhook after it came back")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if len(bodies) != 1 {
		t.Fatalf("%d deliveries after the outage, want 1", len(bodies))
	}
	var m struct {
		ID, Type, Time string
		Data           map[string]string
	}
	if err := json.Unmarshal(bodies[0], &m); err != nil {
		t.Fatal(err)
	}
	h := heads[0]
	if err := webhook.Verify(key, h.Get("Keyward-Signature"), bodies[0], time.Now(), time.Minute); err != nil {
		t.Errorf("signature: %v", err)
	}
	if _, err := time.Parse(time.RFC3339, m.Time); err != nil || m.Type != "api_key.revoked" || !strings.HasPrefix(m.ID, "evt-") || h.Get("Keyward-Event-Id") != m.ID ||
		h.Get("Content-Type") != "application/json" || m.Data["id"] != r.Key.Id || m.Data["subject"] != "team-a" || len(m.Data) != 2 {
		t.Errorf("the event as delivered: %s %v", bodies[0], h)
	}
}

// TestPostgresRotationThroughKeywardd: a PostgreSQL login rotated through
// keywardd by the PostgreSQL plugin, against a real server: after the
// rotation the new login works with the new password, the old one too
// during the overlap, and after it the old one is refused.
func TestPostgresRotationThroughKeywardd(t *testing.T) {
	s := pgtest.Start(t)
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) { c.Plugins = []daemon.PluginConfig{postgresPlugin(t, s)} }))
	// Restart with a fast maintenance loop, so the overlap's end is seen.
	in.Stop()
	in.CredentialsEvery = 100 * time.Millisecond
	in.Restart()
	ctx := context.Background()
	cc := keywardv1.NewCredentialServiceClient(in.Conn)
	if _, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "orders-db", Plugin: "postgres",
		Config: `{"role": "orders"}`, RotationPeriod: durationpb.New(24 * time.Hour), Overlap: durationpb.New(8 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	get := func() (string, []byte) {
		r, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "orders-db"})
		if err != nil {
			t.Fatal(err)
		}
		return r.Credential.Current.Handle, r.Secret
	}
	login := s.Login
	oldUser, oldPass := get()
	if err := login(oldUser, oldPass); err != nil {
		t.Fatalf("the first login %s: %v", oldUser, err)
	}
	if _, err := cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: "orders-db"}); err != nil {
		t.Fatal(err)
	}
	newUser, newPass := get()
	if newUser == oldUser || string(newPass) == string(oldPass) {
		t.Fatalf("the rotation gave %s again", newUser)
	}
	if err := login(newUser, newPass); err != nil {
		t.Fatalf("the new login %s: %v", newUser, err)
	}
	if err := login(oldUser, oldPass); err != nil {
		t.Fatalf("the old login %s during the overlap: %v", oldUser, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for login(oldUser, oldPass) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the old login %s still works after the overlap", oldUser)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := login(newUser, newPass); err != nil {
		t.Fatalf("the new login %s after the overlap: %v", newUser, err)
	}
	if r, _ := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "orders-db"}); r.Credential.Previous != nil {
		t.Errorf("the previous version is still on the credential: %v", r.Credential.Previous)
	}
}

// TestPostgresRotationSurvivesPluginTrouble: a rotation whose plugin hangs
// (PostgreSQL holds a lock it waits for) fails at the call's deadline, and
// one whose plugin is killed with SIGKILL fails at once; each time the
// rotation stays pending, the current login keeps working, and the retry
// completes with the same operation.
func TestPostgresRotationSurvivesPluginTrouble(t *testing.T) {
	s := pgtest.Start(t)
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		p := postgresPlugin(t, s)
		p.CallTimeout = 2 * time.Second
		c.Plugins = []daemon.PluginConfig{p}
	}))

	ctx := context.Background()
	cc := keywardv1.NewCredentialServiceClient(in.Conn)
	if _, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "orders-db", Plugin: "postgres", Config: `{"role": "orders"}`}); err != nil {
		t.Fatal(err)
	}
	get := func() (string, []byte) {
		r, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "orders-db"})
		if err != nil {
			t.Fatal(err)
		}
		return r.Credential.Current.Handle, r.Secret
	}
	works := func(user string, password []byte) {
		t.Helper()
		if err := s.Login(user, password); err != nil {
			t.Fatalf("the login %s does not work: %v", user, err)
		}
	}
	user, pass := get() // orders_a; the next rotation sets orders_b
	admin := s.Connect(t)
	lock := func() pgx.Tx {
		tx, err := admin.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "ALTER ROLE orders_b CONNECTION LIMIT 5"); err != nil {
			t.Fatal(err)
		}
		return tx
	}
	pending := func() string {
		t.Helper()
		r, err := cc.ListCredentials(ctx, &keywardv1.ListCredentialsRequest{})
		if err != nil || len(r.Credentials) != 1 || r.Credentials[0].Pending == nil {
			t.Fatalf("no pending rotation: %v, %v", r, err)
		}
		return r.Credentials[0].Pending.OperationId
	}
	// orders_b does not exist before the first rotation to it: make it.
	if _, err := admin.Exec(ctx, "CREATE ROLE orders_b NOLOGIN IN ROLE orders"); err != nil {
		t.Fatal(err)
	}

	// A plugin that hangs: the call fails at its deadline.
	tx := lock()
	start := time.Now()
	_, err := cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: "orders-db"})
	wantCode(t, err, codes.Unavailable, "no answer within 2s")
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the deadline took %v", d)
	}
	op := pending()
	works(user, pass)
	tx.Rollback(ctx)

	// A plugin killed mid-call: the call fails at once.
	tx = lock()
	st, _ := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	pid := int(st.Plugins[0].Pid)
	go func() { time.Sleep(500 * time.Millisecond); syscall.Kill(pid, syscall.SIGKILL) }()
	_, err = cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: "orders-db"})
	if err == nil {
		t.Fatal("a rotation whose plugin was killed succeeded")
	}
	if got := pending(); got != op {
		t.Errorf("the pending operation changed from %s to %s", op, got)
	}
	works(user, pass)
	tx.Rollback(ctx)

	// The host restarts the plugin; the retry completes the same operation.
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := cc.RotateCredential(ctx, &keywardv1.RotateCredentialRequest{Name: "orders-db"})
		if err == nil {
			if r.Credential.Pending != nil || r.Credential.Current.Handle != "orders_b" {
				t.Fatalf("after the retry: %v", r.Credential)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the retry did not complete: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	newUser, newPass := get()
	works(newUser, newPass)
	// No overlap was asked: the old login is retired with the activation.
	if s.Login(user, pass) == nil {
		t.Errorf("the old login %s works after a rotation without overlap", user)
	}
}

// TestOwnKeysRefusedToEnvelope: keywardd's own keys cannot be used through
// EnvelopeService, even under a policy that grants every key: a managed
// credential's sealed secret opens only through GetCredential.
func TestOwnKeysRefusedToEnvelope(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	_, err := ec.Encrypt(context.Background(), &keywardv1.EncryptRequest{KeyName: daemon.CredentialsKey, Plaintext: []byte("x")})
	wantCode(t, err, codes.PermissionDenied, "keywardd's own keys")
}
