package daemon_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// revokedOnce starts keywardd, makes an API key, keeps a copy of the store
// as it is then, revokes the key (acknowledged, audited) and stops.
func revokedOnce(t *testing.T) (in *daemontest.Daemon, secret string, older []byte) {
	t.Helper()
	in = daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "web", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(in.Config.DataDir, "keyward.db")
	if older, err = os.ReadFile(db); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: k.Key.Id}); err != nil {
		t.Fatal(err)
	}
	in.Stop()
	return in, k.Secret, older
}

func apiKeyCode(t *testing.T, in *daemontest.Daemon, secret string) keywardv1.APIKeyCode {
	t.Helper()
	v, err := keywardv1.NewAPIKeyServiceClient(in.Conn).VerifyAPIKey(context.Background(), &keywardv1.VerifyAPIKeyRequest{Key: secret, Environment: "prod"})
	if err != nil {
		t.Fatal(err)
	}
	return v.Code
}

// TestRevocationNeverUndone is the first finding through keywardd:
// a bit flipped in the newest meta page's transaction ID, or an older copy
// of the store put in its place, made an acknowledged revocation come
// undone. keywardd refuses to start on either, saying what and where to
// read; an operator who accepts the rollback starts it, and that is audited.
func TestRevocationNeverUndone(t *testing.T) {
	in, secret, older := revokedOnce(t)
	db := filepath.Join(in.Config.DataDir, "keyward.db")
	current, _ := os.ReadFile(db)

	flipped := append([]byte(nil), current...)
	newest := 0
	if binary.NativeEndian.Uint64(flipped[4096+16+48:]) > binary.NativeEndian.Uint64(flipped[16+48:]) {
		newest = 4096
	}
	flipped[newest+16+48] ^= 0x01
	os.WriteFile(db, flipped, 0o600)
	err := in.RunOnce()
	if !errors.Is(err, store.ErrRolledBack) || !strings.Contains(err.Error(), "newest meta page is damaged") || !strings.Contains(err.Error(), store.Runbook) {
		t.Fatalf("a damaged newest meta page: %v", err)
	}
	os.WriteFile(db, older, 0o600)
	if err := in.RunOnce(); !errors.Is(err, store.ErrRolledBack) || !strings.Contains(err.Error(), "-accept-store-rollback") {
		t.Fatalf("an older copy: %v", err)
	}
	for _, n := range []int{0, 100, 4096, 8192} {
		os.WriteFile(db, current[:n], 0o600)
		if err := in.RunOnce(); !errors.Is(err, store.ErrDamaged) && !errors.Is(err, store.ErrRolledBack) {
			t.Fatalf("cut to %d bytes: %v", n, err)
		}
	}
	// The store as it was: the revocation holds.
	os.WriteFile(db, current, 0o600)
	in.Restart()
	if got := apiKeyCode(t, in, secret); got != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Fatalf("the revoked key after the refusals: %v", got)
	}
	in.Stop()
	// The operator restores the older copy on purpose, and says so (the
	// test runs as root, whose keywardd takes no marker file: the flag).
	os.WriteFile(db, older, 0o600)
	marker := filepath.Join(in.Config.DataDir, daemon.AcceptRollbackFile)
	os.WriteFile(marker, nil, 0o644)
	if err := in.RunOnce(); !errors.Is(err, store.ErrRolledBack) {
		t.Fatalf("a marker file of a keywardd running as root was taken: %v", err)
	}
	in.AcceptStoreRollback = true
	in.Restart()
	in.AcceptStoreRollback = false
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the marker file is still there after the start it was for")
	}
	if got := apiKeyCode(t, in, secret); got != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Fatalf("the key in the accepted older store: %v", got)
	}
	in.Stop()
	in.Restart() // accepted once is enough: the audit log now records the older store
	in.Stop()
	// The store the restore replaced, put back, is behind now.
	os.WriteFile(db, current, 0o600)
	if err := in.RunOnce(); !errors.Is(err, store.ErrRolledBack) {
		t.Fatalf("the store an accepted rollback replaced, put back: %v", err)
	}
	b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if !strings.Contains(string(b), "keywardd.AcceptStoreRollback") || !strings.Contains(in.Log.String(), "the operator accepted a store behind the audit log") {
		t.Fatal("the accepted rollback is not in the audit log and keywardd's log")
	}
	if rep := verifyAudit(t, in); rep.BadLine != 0 || rep.TailTooLong {
		t.Fatalf("audit verify: %+v", rep)
	}
}

// TestStoreDamagedWhileServing: a record damaged under a running keywardd
// is refused when it is read (DATA_LOSS, no path), and from then on
// keywardd answers nothing else and its health is NOT_SERVING.
func TestStoreDamagedWhileServing(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders-kek", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(in.Config.DataDir, "keyward.db")
	b, _ := os.ReadFile(db)
	at := strings.LastIndex(string(b), `"orders-kek"`)
	if at < 0 {
		t.Fatal("the key's record is not in the file")
	}
	w, _ := os.OpenFile(db, os.O_WRONLY, 0)
	w.WriteAt([]byte("O"), int64(at+1))
	w.Close()
	_, err := kc.ListKeys(ctx, &keywardv1.ListKeysRequest{})
	wantCode(t, err, codes.DataLoss, "keywardd's store is damaged")
	if strings.Contains(err.Error(), in.Config.DataDir) {
		t.Fatalf("the answer holds the store's path: %v", err)
	}
	_, err = keywardv1.NewStatusServiceClient(in.Conn).Ping(ctx, &keywardv1.PingRequest{})
	wantCode(t, err, codes.DataLoss, store.Runbook)
	waitFor(t, func() bool {
		hc, err := healthpb.NewHealthClient(in.Conn).Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && hc.Status == healthpb.HealthCheckResponse_NOT_SERVING
	})
	in.Stop()
	if err := in.RunOnce(); !errors.Is(err, store.ErrDamaged) {
		t.Fatalf("restart on the damaged store: %v", err)
	}
}

// TestStoreDiskFull: a write the store's disk refuses is answered
// UNAVAILABLE, without the server's paths, changes nothing, and keywardd
// keeps serving; once there is room the same call succeeds.
func TestStoreDiskFull(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	in.Stop()
	small := smallDisk(t, in, "512k")
	in.Config.AuditFile = filepath.Join(t.TempDir(), "audit.log")
	in.Config.DataDir = filepath.Join(small, "data")
	in.Restart()
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	fill(small)
	var err error
	made := 0
	for i := range 200 {
		_, err = kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: fmt.Sprintf("k-%d", i), Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC, Labels: map[string]string{"pad": strings.Repeat("x", 200)}})
		if err != nil {
			break
		}
		made++
	}
	wantCode(t, err, codes.Unavailable, "store cannot be written now")
	if strings.Contains(err.Error(), small) {
		t.Fatalf("the answer holds the store's path: %v", err)
	}
	if _, err := keywardv1.NewStatusServiceClient(in.Conn).Ping(ctx, &keywardv1.PingRequest{}); err != nil {
		t.Fatalf("keywardd stopped serving after a refused write: %v", err)
	}
	os.Remove(filepath.Join(small, "filler"))
	name := fmt.Sprintf("k-%d", made)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC}); err != nil {
		t.Fatalf("the refused write, once there was room: %v", err)
	}
	in.Stop()
	in.Restart()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).GetKey(ctx, &keywardv1.GetKeyRequest{Name: name}); err != nil {
		t.Fatalf("after a restart: %v", err)
	}
}

// TestStoreOfAnotherToken: keywardd pointed at a token without the key its
// store is sealed under refuses to start, says to check hsm.token, and
// leaves no key behind on that token.
func TestStoreOfAnotherToken(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	in.Stop()
	other := softhsmtest.New(t)
	in.Config.HSM.Token, in.Config.HSM.PINFile = other.Label, other.PINFile
	err := in.RunOnce()
	if err == nil || !strings.Contains(err.Error(), "is hsm.token the token keywardd used") {
		t.Fatalf("a store sealed under another token's key: %v", err)
	}
	h, err := hsm.Open(hsm.Config{Module: other.Module, Token: other.Label, PINFile: other.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := daemon.DeriveStoreKey(context.Background(), h); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("the other token's store key: %v", err)
	}
}
