package daemon_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

func uidPolicy(rules string) string {
	return fmt.Sprintf("version: 1\nroles:\n  r:\n    max_batch: 5\n    permissions:\n%s\nbindings:\n  - role: r\n    callers:\n      - uid: %d\n", rules, os.Getuid())
}

const allowAll = "      - operations: [\"*\"]\n        keys: [\"*\"]"

func wantCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || !strings.Contains(st.Message(), msg) {
		t.Fatalf("got %v %q; want %v containing %q", st.Code(), st.Message(), code, msg)
	}
}

func TestEndToEnd(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)

	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "app", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	_, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "app", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT})
	wantCode(t, err, codes.AlreadyExists, `key already exists: "app"`)
	_, err = kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "keyward-x", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC})
	wantCode(t, err, codes.InvalidArgument, "keywardd's own")
	_, err = kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "x"})
	wantCode(t, err, codes.InvalidArgument, "purpose is required")

	canary := "canary-plaintext-7f3a9c"
	ectx := map[string]string{"tenant": "42"}
	dk, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "app", EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	if len(dk.Plaintext) != 32 || dk.KeyVersion != 1 || dk.KeyName != "app" {
		t.Fatalf("GenerateDataKey = %d bytes, %s v%d", len(dk.Plaintext), dk.KeyName, dk.KeyVersion)
	}
	got, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey, EncryptionContext: ectx})
	if err != nil || !bytes.Equal(got.Plaintext, dk.Plaintext) {
		t.Fatalf("Decrypt: %v", err)
	}
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey})
	wantCode(t, err, codes.InvalidArgument, "the ciphertext or the encryption context does not match")
	tampered := bytes.Clone(dk.WrappedKey)
	tampered[len(tampered)-1] ^= 1
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: tampered, EncryptionContext: ectx})
	wantCode(t, err, codes.InvalidArgument, "the ciphertext or the encryption context does not match")
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: []byte("garbage")})
	wantCode(t, err, codes.InvalidArgument, "not a keyward ciphertext")

	enc, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "app", Plaintext: []byte(canary), EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "app", Plaintext: make([]byte, 64<<10+1)})
	wantCode(t, err, codes.ResourceExhausted, "at most 65536")

	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "app"}); err != nil {
		t.Fatal(err)
	}
	re, err := ec.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: enc.Ciphertext, EncryptionContext: ectx})
	if err != nil || re.SourceKeyVersion != 1 || re.KeyVersion != 2 {
		t.Fatalf("ReEncrypt = %v, %v", re, err)
	}
	if _, err := kc.SetMinDecryptionVersion(ctx, &keywardv1.SetMinDecryptionVersionRequest{Name: "app", Version: 2}); err != nil {
		t.Fatal(err)
	}
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: enc.Ciphertext, EncryptionContext: ectx})
	wantCode(t, err, codes.FailedPrecondition, "below the minimum decryption version 2")
	pt, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: re.Ciphertext, EncryptionContext: ectx})
	if err != nil || string(pt.Plaintext) != canary {
		t.Fatalf("Decrypt of the re-encrypted copy: %v", err)
	}

	// Batches: per-item answers, and a cap checked before any work.
	items := []*keywardv1.DecryptRequest{{Ciphertext: re.Ciphertext, EncryptionContext: ectx}, {Ciphertext: enc.Ciphertext, EncryptionContext: ectx}, {Ciphertext: []byte("x")}}
	br, err := ec.BatchDecrypt(ctx, &keywardv1.BatchDecryptRequest{Items: items})
	if err != nil || len(br.Results) != 3 || br.Results[0].GetOk() == nil || br.Results[1].GetError().GetCode() != int32(codes.FailedPrecondition) || br.Results[2].GetError().GetCode() != int32(codes.InvalidArgument) {
		t.Fatalf("BatchDecrypt = %v, %v", br, err)
	}
	big := make([]*keywardv1.GenerateDataKeyRequest, 6)
	for i := range big {
		big[i] = &keywardv1.GenerateDataKeyRequest{KeyName: "app"}
	}
	_, err = ec.BatchGenerateDataKey(ctx, &keywardv1.BatchGenerateDataKeyRequest{Items: big})
	wantCode(t, err, codes.InvalidArgument, "a batch of 6 items; this caller may send at most 5")
	bg, err := ec.BatchGenerateDataKey(ctx, &keywardv1.BatchGenerateDataKeyRequest{Items: big[:5]})
	if err != nil || len(bg.Results) != 5 || bg.Results[4].GetOk() == nil {
		t.Fatalf("BatchGenerateDataKey of 5: %v", err)
	}

	// Key states.
	if _, err := kc.SetKeyState(ctx, &keywardv1.SetKeyStateRequest{Name: "app", State: keywardv1.KeyState_KEY_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	_, err = ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "app"})
	wantCode(t, err, codes.FailedPrecondition, "key is disabled")
	sk, err := kc.ScheduleKeyDeletion(ctx, &keywardv1.ScheduleKeyDeletionRequest{Name: "app"})
	if err != nil || sk.Key.State != keywardv1.KeyState_KEY_STATE_PENDING_DELETION {
		t.Fatalf("ScheduleKeyDeletion: %v", err)
	}
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: re.Ciphertext, EncryptionContext: ectx})
	wantCode(t, err, codes.FailedPrecondition, "scheduled for deletion")
	_, err = ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "nope"})
	wantCode(t, err, codes.NotFound, `key not found: "nope"`)

	// Status and health: keywardd's own four keys (audit, API key pepper,
	// credentials, store) and the app's.
	stc, err := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil || stc.Hsm.TokenLabel != in.Token.Label || !stc.Hsm.Healthy || stc.Keys.Total != 5 || stc.Keys.PendingDeletion != 1 || stc.Store.SchemaVersion != store.SchemaVersion {
		t.Fatalf("GetStatus = %v, %v", stc, err)
	}
	hc, err := healthpb.NewHealthClient(in.Conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v, %v", hc, err)
	}

	// Stop: the socket goes, the audit chain verifies, and nothing secret
	// reached the audit log or the daemon's log.
	if err := in.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := os.Lstat(in.Config.Socket.Path); !os.IsNotExist(err) {
		t.Fatalf("socket left after stop: %v", err)
	}
	auditLog, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	logs := in.Log.String()
	pin, _ := os.ReadFile(in.Token.PINFile)
	for _, secret := range []string{canary, strings.TrimSpace(string(pin)), hex.EncodeToString(dk.Plaintext), base64.StdEncoding.EncodeToString(dk.Plaintext), string(dk.Plaintext)} {
		if strings.Contains(string(auditLog), secret) || strings.Contains(logs, secret) {
			t.Fatalf("a secret reached the audit log or the log: %q", secret)
		}
	}
	rep := verifyAudit(t, in)
	if rep.BadLine != 0 || rep.Records < 20 || rep.Unverified != 0 {
		t.Fatalf("audit: %+v", rep)
	}
	for _, want := range []string{`"op":"EnvelopeService.Decrypt"`, `"outcome":"error","code":"InvalidArgument"`, `"context_sha256":"`, `"op":"KeyService.RotateKey","key":"app","version":2`, `"items":5`,
		`"items":3,"outcome":"ok","batch":[{"key":"app","version":2,"context_sha256":"`, `{"key":"app","version":1,"context_sha256":"`, `"outcome":"error","code":"FailedPrecondition","detail":"key version not usable: \"app\" v1 is below the minimum decryption version 2"}`} {
		if !strings.Contains(string(auditLog), want) {
			t.Errorf("the audit log lacks %s", want)
		}
	}
}

// verifyAudit checks the stopped daemon's audit log with the HSM key.
func verifyAudit(t *testing.T, in *daemontest.Daemon) audit.Report {
	t.Helper()
	h, err := hsm.Open(hsm.Config{Module: in.Token.Module, Token: in.Token.Label, PINFile: in.Token.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	f, err := os.Open(auditFile(in))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := audit.Verify(context.Background(), f, h)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// TestPolicyDenies: a caller gets what the policy grants and nothing else;
// denials name the missing permission and are audited; a bad policy on
// reload keeps the old one, a good one takes over.
func TestPolicyDenies(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	for _, n := range []string{"app-a", "other"} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: n, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
			t.Fatal(err)
		}
	}
	other, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "other", Plaintext: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}

	// A broken policy on reload: the old one stays.
	os.WriteFile(in.Config.PolicyFile, []byte("version: 1\nroles: {r: {permisions: []}}\n"), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Contains(in.Log.String(), "policy reload failed") })
	if _, err := kc.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "other"}); err != nil {
		t.Fatalf("after a bad reload: %v", err)
	}

	// An application role: data keys and decryption on app-* only.
	os.WriteFile(in.Config.PolicyFile, []byte(uidPolicy("      - operations: [EnvelopeService.GenerateDataKey, EnvelopeService.Decrypt]\n        keys: [\"app-*\"]")), 0o600)
	in.Reload()
	waitFor(t, func() bool { return strings.Contains(in.Log.String(), "policy reloaded") })

	dk, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "app-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		call func() error
		msg  string
	}{
		{"other key", func() error {
			_, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "other"})
			return err
		}, `not granted EnvelopeService.GenerateDataKey on key "other"`},
		{"decrypt under another key", func() error {
			_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: other.Ciphertext})
			return err
		}, `not granted EnvelopeService.Decrypt on key "other"`},
		{"encrypt", func() error {
			_, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "app-a"})
			return err
		}, `not granted EnvelopeService.Encrypt on key "app-a"`},
		{"rotate", func() error {
			_, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "app-a"})
			return err
		}, `not granted KeyService.RotateKey on key "app-a"`},
		{"list", func() error {
			_, err := kc.ListKeys(ctx, &keywardv1.ListKeysRequest{})
			return err
		}, "not granted KeyService.ListKeys"},
		{"status", func() error {
			_, err := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
			return err
		}, "not granted StatusService.GetStatus"},
		{"batch form not granted", func() error {
			_, err := ec.BatchDecrypt(ctx, &keywardv1.BatchDecryptRequest{Items: []*keywardv1.DecryptRequest{{Ciphertext: dk.WrappedKey}}})
			return err
		}, "not granted EnvelopeService.BatchDecrypt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			wantCode(t, err, codes.PermissionDenied, tc.msg)
			if strings.Contains(err.Error(), "app-*") || strings.Contains(err.Error(), fmt.Sprint(os.Getuid())+"\n") {
				t.Fatalf("the denial shows the policy: %v", err)
			}
		})
	}
	in.Stop()
	auditLog, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if n := strings.Count(string(auditLog), `"outcome":"denied"`); n < 6 {
		t.Fatalf("%d denials audited, want at least 6", n)
	}
	if rep := verifyAudit(t, in); rep.BadLine != 0 {
		t.Fatalf("audit: %+v", rep)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	poll(t, 10*time.Millisecond, cond)
}

// poll waits until cond, trying 200 times, every.
func poll(t *testing.T, every time.Duration, cond func() bool) {
	t.Helper()
	for range 200 {
		if cond() {
			return
		}
		time.Sleep(every)
	}
	t.Fatal("timed out waiting")
}

// TestSecondDaemonRefused: a second keywardd on the same socket stops at
// once with a clear error; after a restart the keys are still there.
func TestSecondDaemonRefused(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	err := daemon.Run(ctx, in.Config, daemon.Options{Log: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "another keywardd is serving") {
		t.Fatalf("second daemon: %v", err)
	}
	if got := daemon.ExitCode(err); got != daemon.ExitTransient {
		t.Fatalf("second daemon: exit code %d, want %d (transient: it may start once the first stops)", got, daemon.ExitTransient)
	}
	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}
	in.Restart()
	k, err := keywardv1.NewKeyServiceClient(in.Conn).GetKey(ctx, &keywardv1.GetKeyRequest{Name: "k"})
	if err != nil || k.Key.LatestVersion != 1 {
		t.Fatalf("after restart: %v", err)
	}
}

// TestHSMDown: while the HSM is unreachable the health service says
// NOT_SERVING, GetStatus says why, and calls that need the HSM fail with
// UNAVAILABLE; when it is back, everything serves again, without a restart.
func TestHSMDown(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	in.Stop()
	faults := softhsmtest.NewFaults(t, in.Token)
	in.Config.HSM.Module = faults.Module
	in.HealthEvery = 50 * time.Millisecond
	in.Restart()
	ctx := context.Background()
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	hc := healthpb.NewHealthClient(in.Conn)
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	serving := func() healthpb.HealthCheckResponse_ServingStatus {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	waitFor(t, func() bool { return serving() == healthpb.HealthCheckResponse_SERVING })

	faults.Set("* 0xE0") // CKR_TOKEN_NOT_PRESENT from every call
	waitFor(t, func() bool { return serving() == healthpb.HealthCheckResponse_NOT_SERVING })
	_, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "k"})
	wantCode(t, err, codes.Unavailable, "token unavailable")
	time.Sleep(1100 * time.Millisecond) // a checkpoint falls due and cannot be MACed
	st, err := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil || st.Hsm.Healthy || !strings.Contains(st.Hsm.Error, "token unavailable") || !strings.Contains(st.AuditCheckpointError, "token unavailable") {
		t.Fatalf("GetStatus with the HSM down: %v, %v", st, err)
	}

	faults.Set()
	waitFor(t, func() bool { return serving() == healthpb.HealthCheckResponse_SERVING })
	if _, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "k"}); err != nil {
		t.Fatalf("after the HSM came back: %v", err)
	}
}

// TestAuditDiskFull: when the audit log cannot be written (its disk is
// full) no call succeeds: the one that finds out is answered UNAVAILABLE,
// every call after it is refused before doing anything, and health says
// NOT_SERVING. Once there is room again keywardd serves again by itself,
// with the outage and the record of the call that found out in the log,
// which verifies.
func TestAuditDiskFull(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	in.Stop()
	small := smallDisk(t, in, "256k")
	in.Config.AuditFile = filepath.Join(small, "audit.log")
	in.Restart()
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	fill(small)
	// The audit log's last page may still hold a few records; the call that
	// finds the disk full is answered UNAVAILABLE, never OK.
	var err error
	oks := 0
	for range 100 {
		if _, err = ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "k"}); err != nil {
			break
		}
		oks++
	}
	wantCode(t, err, codes.Unavailable, "could not be audited, so its answer is withheld")
	b, _ := os.ReadFile(in.Config.AuditFile)
	// Every answer was audited. The call refused may be on record too: a
	// write cut short by the full disk can end after its line and before
	// the checkpoint that followed it in the same write (more on record
	// than answered is the safe side).
	if got := strings.Count(string(b), `"op":"EnvelopeService.GenerateDataKey"`); got != oks && got != oks+1 {
		t.Fatalf("%d data keys answered, %d audited", oks, got)
	}
	for range 3 {
		_, err = ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "k"})
		wantCode(t, err, codes.Unavailable, "the audit log cannot be written, so nothing is done")
		if strings.Contains(err.Error(), small) {
			t.Fatalf("the answer holds the audit log's path: %v", err)
		}
	}
	_, err = kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "k"})
	wantCode(t, err, codes.Unavailable, "nothing is done")
	hc := healthpb.NewHealthClient(in.Conn)
	waitFor(t, func() bool {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && r.Status == healthpb.HealthCheckResponse_NOT_SERVING
	})
	// Room again: keywardd serves again without a restart.
	os.Remove(filepath.Join(small, "filler"))
	waitFor(t, func() bool {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && r.Status == healthpb.HealthCheckResponse_SERVING
	})
	if _, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "k"}); err != nil {
		t.Fatalf("after the disk had room again: %v", err)
	}
	k, err := kc.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "k"})
	if err != nil || k.Key.LatestVersion != 1 {
		t.Fatalf("the refused rotation happened: %v, %v", k, err)
	}
	in.Stop()
	b, _ = os.ReadFile(in.Config.AuditFile)
	if !strings.Contains(string(b), `"op":"audit.outage"`) {
		t.Fatal("the outage is not on record")
	}
	// Every answered call is on record, and the one that found the disk
	// full too (written late): oks + the one refused + the one after.
	if got := strings.Count(string(b), `"op":"EnvelopeService.GenerateDataKey"`); got != oks+2 {
		t.Fatalf("%d data keys answered before the outage and 1 after, %d audited", oks, got)
	}
	if rep := verifyAudit(t, in); rep.BadLine != 0 || rep.TailTooLong {
		t.Fatalf("audit verify after the outage: %+v", rep)
	}
}

// smallDisk mounts a tmpfs of size for a stopped daemon's files; it is
// unmounted once the daemon has stopped again.
func smallDisk(t *testing.T, in *daemontest.Daemon, size string) string {
	t.Helper()
	softhsmtest.RequireRoot(t, "mounts a small tmpfs")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	// The daemon must let go of its files first, or the tmpfs stays busy.
	t.Cleanup(func() { in.Stop(); exec.Command("umount", "-l", dir).Run() })
	return dir
}

// fill fills the disk of dir with the file dir/filler.
func fill(dir string) {
	filler, _ := os.Create(filepath.Join(dir, "filler"))
	defer filler.Close()
	for {
		if _, err := filler.Write(make([]byte, 4096)); err != nil {
			return
		}
	}
}
