package server

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
)

// The callers of the tests: an administrator granted everything, a
// reader granted to read the app-* keys, and a uid no binding names.
const (
	admin    = 1000
	reader   = 2000
	stranger = 3000
)

var keysPolicy = withAdmin(`  reader:
    permissions:
      - operations: [KeyService.GetKey, KeyService.ListKeys]
        keys: ["app-*"]
`, `  - role: reader
    callers: [{uid: 2000}]
`)

// mustCreate makes keys for a test's cases.
func mustCreate(t *testing.T, ts *testServer, specs ...keys.Spec) {
	t.Helper()
	for _, s := range specs {
		if _, err := ts.keys.Create(context.Background(), s); err != nil {
			t.Fatal(err)
		}
	}
}

// keyIs checks a KeyService answer's key: its name, state and latest
// version, and that the audit record holds that version.
func keyIs(name string, state keywardv1.KeyState, latest uint32) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
		t.Helper()
		k := resp.(interface{ GetKey() *keywardv1.Key }).GetKey()
		if k.GetName() != name || k.GetState() != state || k.GetLatestVersion() != latest {
			t.Errorf("answered key %s %v v%d; want %s %v v%d", k.GetName(), k.GetState(), k.GetLatestVersion(), name, state, latest)
		}
	}
}

// keyNames is the names of keys, sorted, space-separated.
func keyNames(ks []*keywardv1.Key) string {
	var names []string
	for _, k := range ks {
		names = append(names, k.GetName())
	}
	slices.Sort(names)
	return strings.Join(names, " ")
}

func TestKeyService(t *testing.T) {
	ts := newTestServer(t, keysPolicy)
	mustCreate(t, ts, keys.Spec{Name: "app-orders", Purpose: keys.Encrypt}, keys.Spec{Name: "ops-db", Purpose: keys.Encrypt},
		keys.Spec{Name: "app-rotate", Purpose: keys.Encrypt}, keys.Spec{Name: "app-off", Purpose: keys.Encrypt},
		keys.Spec{Name: "app-gone", Purpose: keys.Encrypt})
	run(t, ts, []serviceCase{
		{name: "create", uid: admin, method: "KeyService/CreateKey",
			req:   &keywardv1.CreateKeyRequest{Name: "app-new", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT, RotationPeriod: durationpb.New(720 * 3600e9)},
			code:  codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-new"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				keyIs("app-new", keywardv1.KeyState_KEY_STATE_ENABLED, 1)(t, ts, resp, rec)
				if rec.Version != 1 {
					t.Errorf("audited version %d; want 1", rec.Version)
				}
				if k, err := ts.keys.Get("app-new"); err != nil || k.RotationPeriod != 720*3600e9 {
					t.Errorf("the key made: %+v, %v", k, err)
				}
			}},
		{name: "create denied", uid: reader, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "app-mine", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT},
			code: codes.PermissionDenied, msg: `not granted KeyService.CreateKey on key "app-mine"`,
			audit: wantAudit{outcome: "denied", key: "app-mine", detail: "not granted"},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				if _, err := ts.keys.Get("app-mine"); err == nil {
					t.Error("a denied CreateKey made its key")
				}
			}},
		{name: "create by a caller with no role", uid: stranger, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "app-x", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT},
			code: codes.PermissionDenied, msg: "not granted KeyService.CreateKey",
			audit: wantAudit{outcome: "denied", key: "app-x"}},
		{name: "create without a purpose", uid: admin, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "app-x"},
			code: codes.InvalidArgument, msg: "purpose is required: KEY_PURPOSE_ENCRYPT, KEY_PURPOSE_SIGN or KEY_PURPOSE_HMAC",
			audit: wantAudit{outcome: "error", key: "app-x", detail: "purpose is required"}},
		{name: "create with an algorithm of no name", uid: admin, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "app-x", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT, Algorithm: 99},
			code: codes.InvalidArgument, msg: "unknown algorithm 99",
			audit: wantAudit{outcome: "error", key: "app-x", detail: "unknown algorithm"}},
		{name: "create one of keywardd's own", uid: admin, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "keyward-mine", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT},
			code: codes.InvalidArgument, msg: `key names starting with "keyward-" are keywardd's own`,
			audit: wantAudit{outcome: "error", key: "keyward-mine", detail: "keywardd's own"}},
		{name: "create one that exists", uid: admin, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "app-orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN},
			code: codes.AlreadyExists, msg: "app-orders",
			audit: wantAudit{outcome: "error", key: "app-orders"}},
		{name: "create with a bad name", uid: admin, method: "KeyService/CreateKey",
			req:  &keywardv1.CreateKeyRequest{Name: "App Orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT},
			code: codes.InvalidArgument, msg: "App Orders",
			audit: wantAudit{outcome: "error", key: "App Orders"}},
		{name: "get", uid: reader, method: "KeyService/GetKey",
			req: &keywardv1.GetKeyRequest{Name: "app-orders"}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-orders"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				keyIs("app-orders", keywardv1.KeyState_KEY_STATE_ENABLED, 1)(t, ts, resp, rec)
				// The encryptions reserved, against the limit: an AES-GCM key's.
				k := resp.(*keywardv1.GetKeyResponse).GetKey()
				stored, err := ts.keys.Get("app-orders")
				if err != nil {
					t.Fatal(err)
				}
				if k.GetEncryptionLimit() != ts.keys.EncryptionLimit() || k.GetEncryptionLimit() == 0 ||
					k.GetVersions()[0].GetEncryptionsReserved() != stored.Versions[0].Reserved {
					t.Errorf("encryptions %d of %d; want %d of %d", k.GetVersions()[0].GetEncryptionsReserved(), k.GetEncryptionLimit(),
						stored.Versions[0].Reserved, ts.keys.EncryptionLimit())
				}
			}},
		{name: "get denied", uid: reader, method: "KeyService/GetKey",
			req: &keywardv1.GetKeyRequest{Name: "ops-db"}, code: codes.PermissionDenied, msg: `not granted KeyService.GetKey on key "ops-db"`,
			audit: wantAudit{outcome: "denied", key: "ops-db"}},
		{name: "get not found", uid: reader, method: "KeyService/GetKey",
			req: &keywardv1.GetKeyRequest{Name: "app-none"}, code: codes.NotFound, msg: "app-none",
			audit: wantAudit{outcome: "error", key: "app-none"}},
		{name: "get no name", uid: admin, method: "KeyService/GetKey",
			req: &keywardv1.GetKeyRequest{}, code: codes.NotFound, msg: "not found",
			audit: wantAudit{outcome: "error"}},
		{name: "list shows only what the caller may get", uid: reader, method: "KeyService/ListKeys",
			req: &keywardv1.ListKeysRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
				if got := keyNames(resp.(*keywardv1.ListKeysResponse).GetKeys()); got != "app-gone app-new app-off app-orders app-rotate" {
					t.Errorf("listed %s; want the app-* keys alone", got)
				}
			}},
		{name: "list denied", uid: stranger, method: "KeyService/ListKeys",
			req: &keywardv1.ListKeysRequest{}, code: codes.PermissionDenied, msg: "not granted KeyService.ListKeys",
			audit: wantAudit{outcome: "denied"}},
		{name: "rotate", uid: admin, method: "KeyService/RotateKey",
			req: &keywardv1.RotateKeyRequest{Name: "app-rotate"}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-rotate"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				keyIs("app-rotate", keywardv1.KeyState_KEY_STATE_ENABLED, 2)(t, ts, resp, rec)
				if rec.Version != 2 {
					t.Errorf("audited version %d; want 2", rec.Version)
				}
			}},
		{name: "rotate denied", uid: reader, method: "KeyService/RotateKey",
			req: &keywardv1.RotateKeyRequest{Name: "app-rotate"}, code: codes.PermissionDenied, msg: "not granted KeyService.RotateKey",
			audit: wantAudit{outcome: "denied", key: "app-rotate"},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				if k, _ := ts.keys.Get("app-rotate"); k.Latest() != 2 {
					t.Errorf("a denied rotation made version %d", k.Latest())
				}
			}},
		{name: "rotate not found", uid: admin, method: "KeyService/RotateKey",
			req: &keywardv1.RotateKeyRequest{Name: "app-none"}, code: codes.NotFound, msg: "app-none",
			audit: wantAudit{outcome: "error", key: "app-none"}},
		{name: "disable", uid: admin, method: "KeyService/SetKeyState",
			req:  &keywardv1.SetKeyStateRequest{Name: "app-off", State: keywardv1.KeyState_KEY_STATE_DISABLED},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-off"},
			after: keyIs("app-off", keywardv1.KeyState_KEY_STATE_DISABLED, 1)},
		{name: "enable", uid: admin, method: "KeyService/SetKeyState",
			req:  &keywardv1.SetKeyStateRequest{Name: "app-off", State: keywardv1.KeyState_KEY_STATE_ENABLED},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-off"},
			after: keyIs("app-off", keywardv1.KeyState_KEY_STATE_ENABLED, 1)},
		{name: "set state to pending deletion", uid: admin, method: "KeyService/SetKeyState",
			req:  &keywardv1.SetKeyStateRequest{Name: "app-off", State: keywardv1.KeyState_KEY_STATE_PENDING_DELETION},
			code: codes.InvalidArgument, msg: "state must be KEY_STATE_ENABLED or KEY_STATE_DISABLED (use ScheduleKeyDeletion to delete)",
			audit: wantAudit{outcome: "error", key: "app-off", detail: "state must be"}},
		{name: "disable one of keywardd's own", uid: admin, method: "KeyService/SetKeyState",
			req:  &keywardv1.SetKeyStateRequest{Name: auditKey.Name, State: keywardv1.KeyState_KEY_STATE_DISABLED},
			code: codes.InvalidArgument, msg: "keywardd's own",
			audit: wantAudit{outcome: "error", key: auditKey.Name},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				if k, _ := ts.keys.Get(auditKey.Name); k.State != keys.Enabled {
					t.Errorf("the audit key is %v", k.State)
				}
			}},
		{name: "set the minimum decryption version", uid: admin, method: "KeyService/SetMinDecryptionVersion",
			req: &keywardv1.SetMinDecryptionVersionRequest{Name: "app-rotate", Version: 2}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-rotate"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				if got := resp.(*keywardv1.SetMinDecryptionVersionResponse).GetKey().GetMinDecryptionVersion(); got != 2 || rec.Version != 2 {
					t.Errorf("minimum %d, audited version %d; want 2, 2", got, rec.Version)
				}
			}},
		{name: "set the minimum decryption version past the latest", uid: admin, method: "KeyService/SetMinDecryptionVersion",
			req: &keywardv1.SetMinDecryptionVersionRequest{Name: "app-rotate", Version: 9}, code: codes.InvalidArgument,
			msg:   `minimum decryption version 9 of "app-rotate" must be from 1 to 2`,
			audit: wantAudit{outcome: "error", key: "app-rotate"}},
		{name: "report a rewrap", uid: admin, method: "KeyService/ReportRewrap",
			req: &keywardv1.ReportRewrapRequest{KeyName: "app-rotate", Report: &keywardv1.RewrapReport{Source: "dir:/var/lib/app",
				Ciphertexts: map[uint32]uint64{1: 3, 2: 40}, Failed: 3, Complete: true}},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-rotate"},
			after: func(t *testing.T, ts *testServer, _ any, _ audit.Record) {
				r, err := ts.call(t, admin, "KeyService/GetKey", &keywardv1.GetKeyRequest{Name: "app-rotate"})
				if err != nil {
					t.Fatal(err)
				}
				reps := r.(*keywardv1.GetKeyResponse).GetKey().GetRewrapReports()
				if len(reps) != 1 || reps[0].GetSource() != "dir:/var/lib/app" || reps[0].GetCiphertexts()[1] != 3 || reps[0].GetCiphertexts()[2] != 40 ||
					reps[0].GetFailed() != 3 || !reps[0].GetComplete() || reps[0].GetReportTime() == nil || !strings.HasPrefix(reps[0].GetReporter(), fmt.Sprintf("uid=%d", admin)) {
					t.Errorf("GetKey's reports: %v", reps)
				}
			}},
		{name: "report a rewrap under a version the key lacks", uid: admin, method: "KeyService/ReportRewrap",
			req: &keywardv1.ReportRewrapRequest{KeyName: "app-rotate", Report: &keywardv1.RewrapReport{Source: "dir:/x",
				Ciphertexts: map[uint32]uint64{3: 1}}},
			code: codes.InvalidArgument, msg: `version 3 of "app-rotate", which has versions 1 to 2`,
			audit: wantAudit{outcome: "error", key: "app-rotate"}},
		{name: "report a rewrap without a report", uid: admin, method: "KeyService/ReportRewrap",
			req: &keywardv1.ReportRewrapRequest{KeyName: "app-rotate"}, code: codes.InvalidArgument, msg: "report is required",
			audit: wantAudit{outcome: "error", key: "app-rotate"}},
		{name: "report a rewrap with a control character in its source", uid: admin, method: "KeyService/ReportRewrap",
			req:  &keywardv1.ReportRewrapRequest{KeyName: "app-rotate", Report: &keywardv1.RewrapReport{Source: "dir:\n/x"}},
			code: codes.InvalidArgument, msg: "printable", audit: wantAudit{outcome: "error", key: "app-rotate"}},
		{name: "report a rewrap with a bidirectional override in its source", uid: admin, method: "KeyService/ReportRewrap",
			req:  &keywardv1.ReportRewrapRequest{KeyName: "app-rotate", Report: &keywardv1.RewrapReport{Source: "dir:/x\u202e"}},
			code: codes.InvalidArgument, msg: "printable", audit: wantAudit{outcome: "error", key: "app-rotate"}},
		{name: "report a rewrap denied", uid: reader, method: "KeyService/ReportRewrap",
			req:  &keywardv1.ReportRewrapRequest{KeyName: "app-rotate", Report: &keywardv1.RewrapReport{Source: "dir:/x"}},
			code: codes.PermissionDenied, msg: "not granted KeyService.ReportRewrap", audit: wantAudit{outcome: "denied", key: "app-rotate"}},
		{name: "schedule deletion", uid: admin, method: "KeyService/ScheduleKeyDeletion",
			req:  &keywardv1.ScheduleKeyDeletionRequest{Name: "app-gone", WaitingPeriod: durationpb.New(7 * 24 * 3600e9)},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-gone"},
			after: keyIs("app-gone", keywardv1.KeyState_KEY_STATE_PENDING_DELETION, 1)},
		{name: "schedule deletion of one of keywardd's own", uid: admin, method: "KeyService/ScheduleKeyDeletion",
			req:  &keywardv1.ScheduleKeyDeletionRequest{Name: pepperKey.Name, WaitingPeriod: durationpb.New(7 * 24 * 3600e9)},
			code: codes.InvalidArgument, msg: "keywardd's own",
			audit: wantAudit{outcome: "error", key: pepperKey.Name}},
		{name: "schedule deletion denied", uid: reader, method: "KeyService/ScheduleKeyDeletion",
			req:  &keywardv1.ScheduleKeyDeletionRequest{Name: "app-orders", WaitingPeriod: durationpb.New(7 * 24 * 3600e9)},
			code: codes.PermissionDenied, msg: "not granted KeyService.ScheduleKeyDeletion",
			audit: wantAudit{outcome: "denied", key: "app-orders"}},
		{name: "cancel deletion", uid: admin, method: "KeyService/CancelKeyDeletion",
			req: &keywardv1.CancelKeyDeletionRequest{Name: "app-gone"}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-gone"},
			after: keyIs("app-gone", keywardv1.KeyState_KEY_STATE_DISABLED, 1)},
		{name: "cancel deletion not found", uid: admin, method: "KeyService/CancelKeyDeletion",
			req: &keywardv1.CancelKeyDeletionRequest{Name: "app-none"}, code: codes.NotFound, msg: "app-none",
			audit: wantAudit{outcome: "error", key: "app-none"}},
	})
}
