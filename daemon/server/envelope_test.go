package server

import (
	"bytes"
	"context"
	"testing"

	"google.golang.org/grpc/codes"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
)

// app may use the app-* keys for envelope encryption, in batches of at
// most 3, but not read the keys (KeyService.GetKey): it is not told why
// a ciphertext does not open. admin may do everything and is told.
var envelopePolicy = withAdmin(`  app:
    max_batch: 3
    permissions:
      - operations: [EnvelopeService.GenerateDataKey, EnvelopeService.GenerateDataKeyWithoutPlaintext, EnvelopeService.Encrypt,
          EnvelopeService.Decrypt, EnvelopeService.ReEncrypt, EnvelopeService.BatchEncrypt, EnvelopeService.BatchDecrypt]
        keys: ["app-*"]
`, `  - role: app
    callers: [{uid: 2000}]
`)

const app = 2000

// sealed is a ciphertext of plaintext under key, with encCtx, made before
// the cases run.
func sealed(t *testing.T, ts *testServer, key string, plaintext string, encCtx map[string]string) []byte {
	t.Helper()
	ct, err := ts.envelope.Encrypt(context.Background(), key, []byte(plaintext), encCtx)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// opens checks that an answer's ciphertext opens, with encCtx, to
// plaintext under key, and that the audit record holds its version and
// the digest of its context.
func opens(key, plaintext string, encCtx map[string]string) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
		t.Helper()
		ct := resp.(interface{ GetCiphertext() []byte }).GetCiphertext()
		pt, h, err := ts.envelope.Decrypt(context.Background(), ct, encCtx)
		if err != nil || string(pt) != plaintext || h.KeyName != key {
			t.Errorf("the answer opens to %q under %s, %v; want %q under %s", pt, h.KeyName, err, plaintext, key)
		}
		if rec.Version != h.KeyVersion || (len(encCtx) > 0) != (rec.ContextSHA256 != "") {
			t.Errorf("audited version %d, context digest %q; want version %d and a digest iff a context", rec.Version, rec.ContextSHA256, h.KeyVersion)
		}
	}
}

// batchIs checks a batch call's audit record: how many items, and each
// one's key and outcome.
func batchIs(items ...audit.Item) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, _ *testServer, _ any, rec audit.Record) {
		t.Helper()
		if rec.Items != len(items) || len(rec.Batch) != len(items) {
			t.Fatalf("audited %d items, %d in the batch; want %d", rec.Items, len(rec.Batch), len(items))
		}
		for i, want := range items {
			if got := rec.Batch[i]; got.Key != want.Key || got.Outcome != want.Outcome || got.Code != want.Code {
				t.Errorf("item %d audited as %s %s %s; want %s %s %s", i, got.Key, got.Outcome, got.Code, want.Key, want.Outcome, want.Code)
			}
		}
	}
}

func TestEnvelopeService(t *testing.T) {
	ts := newTestServer(t, envelopePolicy)
	mustCreate(t, ts, keys.Spec{Name: "app-orders", Purpose: keys.Encrypt}, keys.Spec{Name: "app-archive", Purpose: keys.Encrypt},
		keys.Spec{Name: "app-off", Purpose: keys.Encrypt}, keys.Spec{Name: "ops-db", Purpose: keys.Encrypt},
		keys.Spec{Name: "app-signer", Purpose: keys.Sign})
	tenant := map[string]string{"tenant": "a"}
	orders := sealed(t, ts, "app-orders", "order 1", tenant)
	ops := sealed(t, ts, "ops-db", "row 1", nil)
	off := sealed(t, ts, "app-off", "old", nil)
	if _, err := ts.keys.SetEnabled("app-off", false); err != nil {
		t.Fatal(err)
	}
	garbage := []byte("not a keyward ciphertext")
	run(t, ts, []serviceCase{
		{name: "encrypt", uid: app, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "app-orders", Plaintext: []byte("hello"), EncryptionContext: tenant},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-orders"}, after: opens("app-orders", "hello", tenant)},
		{name: "encrypt denied", uid: app, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "ops-db", Plaintext: []byte("hello")},
			code: codes.PermissionDenied, msg: `not granted EnvelopeService.Encrypt on key "ops-db"`,
			audit: wantAudit{outcome: "denied", key: "ops-db", detail: "not granted"}},
		{name: "encrypt under one of keywardd's own keys", uid: admin, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: credentialsKey, Plaintext: []byte("hello")},
			code: codes.PermissionDenied, msg: `"keyward-credentials" is one of keywardd's own keys, which no caller may use`,
			audit: wantAudit{outcome: "denied", key: credentialsKey}},
		{name: "encrypt under a disabled key", uid: admin, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "app-off", Plaintext: []byte("hello")},
			code: codes.FailedPrecondition, msg: "disabled", audit: wantAudit{outcome: "error", key: "app-off", detail: "disabled"}},
		{name: "encrypt under a signing key", uid: admin, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "app-signer", Plaintext: []byte("hello")},
			code: codes.FailedPrecondition, msg: "app-signer", audit: wantAudit{outcome: "error", key: "app-signer"}},
		{name: "encrypt under no key", uid: admin, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "app-none", Plaintext: []byte("hello")},
			code: codes.NotFound, msg: "app-none", audit: wantAudit{outcome: "error", key: "app-none"}},
		{name: "encrypt too much", uid: app, method: "EnvelopeService/Encrypt",
			req:  &keywardv1.EncryptRequest{KeyName: "app-orders", Plaintext: make([]byte, 65<<10)},
			code: codes.ResourceExhausted, msg: "encrypt larger data locally under a data key",
			audit: wantAudit{outcome: "error", key: "app-orders"}},
		{name: "generate a data key", uid: app, method: "EnvelopeService/GenerateDataKey",
			req:  &keywardv1.GenerateDataKeyRequest{KeyName: "app-orders", EncryptionContext: tenant},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-orders"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				r := resp.(*keywardv1.GenerateDataKeyResponse)
				pt, _, err := ts.envelope.Decrypt(context.Background(), r.GetWrappedKey(), tenant)
				if err != nil || len(r.GetPlaintext()) != 32 || !bytes.Equal(pt, r.GetPlaintext()) {
					t.Errorf("a data key of %d bytes whose wrapped form opens to another (%v)", len(r.GetPlaintext()), err)
				}
				if rec.Version != 1 || rec.ContextSHA256 == "" {
					t.Errorf("audited version %d, context digest %q", rec.Version, rec.ContextSHA256)
				}
			}},
		{name: "generate a data key of a size AES has not", uid: app, method: "EnvelopeService/GenerateDataKey",
			req:  &keywardv1.GenerateDataKeyRequest{KeyName: "app-orders", KeySize: 20},
			code: codes.InvalidArgument, msg: "data key size 20; use 16, 24 or 32 bytes",
			audit: wantAudit{outcome: "error", key: "app-orders", detail: "use 16, 24 or 32"}},
		{name: "generate a data key without its plaintext", uid: app, method: "EnvelopeService/GenerateDataKeyWithoutPlaintext",
			req:  &keywardv1.GenerateDataKeyWithoutPlaintextRequest{KeyName: "app-orders", KeySize: 16},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-orders"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				pt, _, err := ts.envelope.Decrypt(context.Background(), resp.(*keywardv1.GenerateDataKeyWithoutPlaintextResponse).GetWrappedKey(), nil)
				if err != nil || len(pt) != 16 {
					t.Errorf("the wrapped key opens to %d bytes, %v; want 16", len(pt), err)
				}
			}},
		{name: "decrypt", uid: app, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: orders, EncryptionContext: tenant},
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-orders"},
			after: func(t *testing.T, _ *testServer, resp any, rec audit.Record) {
				if r := resp.(*keywardv1.DecryptResponse); string(r.GetPlaintext()) != "order 1" || r.GetKeyName() != "app-orders" || rec.Version != 1 {
					t.Errorf("decrypted %q under %s, audited version %d", r.GetPlaintext(), r.GetKeyName(), rec.Version)
				}
			}},
		{name: "decrypt denied", uid: app, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: ops},
			code: codes.PermissionDenied, msg: `not granted EnvelopeService.Decrypt on key "ops-db"`,
			audit: wantAudit{outcome: "denied", key: "ops-db"}},
		{name: "decrypt in another context, not told why", uid: app, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: orders, EncryptionContext: map[string]string{"tenant": "b"}},
			code: codes.InvalidArgument, msg: errUnopened.Error(),
			audit: wantAudit{outcome: "error", key: "app-orders", detail: "withheld from the caller: "}},
		{name: "decrypt in another context, told why", uid: admin, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: orders},
			code: codes.InvalidArgument, msg: "the ciphertext or the encryption context does not match", audit: wantAudit{outcome: "error", key: "app-orders"},
			after: func(t *testing.T, _ *testServer, _ any, rec audit.Record) {
				if rec.Detail == errUnopened.Error() {
					t.Error("a caller granted GetKey was not told why")
				}
			}},
		{name: "decrypt under a disabled key, not told why", uid: app, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: off},
			code: codes.InvalidArgument, msg: errUnopened.Error(),
			audit: wantAudit{outcome: "error", key: "app-off", detail: "withheld from the caller: "},
			after: func(t *testing.T, _ *testServer, _ any, rec audit.Record) {
				if !bytes.Contains([]byte(rec.Detail), []byte("disabled")) {
					t.Errorf("the audit record does not keep the reason: %q", rec.Detail)
				}
			}},
		{name: "decrypt under a disabled key, told why", uid: admin, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: off},
			code: codes.FailedPrecondition, msg: "disabled", audit: wantAudit{outcome: "error", key: "app-off", detail: "disabled"}},
		{name: "decrypt what is no ciphertext", uid: app, method: "EnvelopeService/Decrypt",
			req:  &keywardv1.DecryptRequest{Ciphertext: garbage},
			code: codes.InvalidArgument, msg: errUnopened.Error(), audit: wantAudit{outcome: "error", detail: "withheld from the caller: "}},
		{name: "re-encrypt under another key", uid: app, method: "EnvelopeService/ReEncrypt",
			req: &keywardv1.ReEncryptRequest{Ciphertext: orders, EncryptionContext: tenant, DestinationKeyName: "app-archive"},
			// Audited under the source key; the answer's key is checked below.
			code: codes.OK, audit: wantAudit{outcome: "ok", key: "app-orders"}, after: opens("app-archive", "order 1", tenant)},
		{name: "re-encrypt to a key not granted", uid: app, method: "EnvelopeService/ReEncrypt",
			req:  &keywardv1.ReEncryptRequest{Ciphertext: orders, EncryptionContext: tenant, DestinationKeyName: "ops-db"},
			code: codes.PermissionDenied, msg: `not granted EnvelopeService.ReEncrypt on key "ops-db"`,
			audit: wantAudit{outcome: "denied", key: "app-orders"}},
		{name: "batch encrypt: each item on its own key", uid: app, method: "EnvelopeService/BatchEncrypt",
			req: &keywardv1.BatchEncryptRequest{Items: []*keywardv1.EncryptRequest{
				{KeyName: "app-orders", Plaintext: []byte("a")}, {KeyName: "ops-db", Plaintext: []byte("b")}}},
			code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, ts *testServer, resp any, rec audit.Record) {
				batchIs(audit.Item{Key: "app-orders", Outcome: "ok"}, audit.Item{Key: "ops-db", Outcome: "denied", Code: "PermissionDenied"})(t, ts, resp, rec)
				res := resp.(*keywardv1.BatchEncryptResponse).GetResults()
				if len(res) != 2 || res[0].GetOk() == nil || res[1].GetError().GetCode() != int32(codes.PermissionDenied) {
					t.Errorf("results %v; want the first sealed, the second denied", res)
				}
			}},
		{name: "batch decrypt", uid: app, method: "EnvelopeService/BatchDecrypt",
			req: &keywardv1.BatchDecryptRequest{Items: []*keywardv1.DecryptRequest{
				{Ciphertext: orders, EncryptionContext: tenant}, {Ciphertext: garbage}}},
			code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: batchIs(audit.Item{Key: "app-orders", Outcome: "ok"}, audit.Item{Outcome: "error", Code: "InvalidArgument"})},
		{name: "batch over the caller's limit", uid: app, method: "EnvelopeService/BatchEncrypt",
			req: &keywardv1.BatchEncryptRequest{Items: []*keywardv1.EncryptRequest{
				{KeyName: "app-orders"}, {KeyName: "app-orders"}, {KeyName: "app-orders"}, {KeyName: "app-orders"}}},
			code: codes.InvalidArgument, msg: "a batch of 4 items; this caller may send at most 3",
			audit: wantAudit{outcome: "error", detail: "at most 3"}},
		{name: "empty batch", uid: app, method: "EnvelopeService/BatchDecrypt",
			req:  &keywardv1.BatchDecryptRequest{},
			code: codes.InvalidArgument, msg: "an empty batch", audit: wantAudit{outcome: "error"}},
		{name: "batch denied whole", uid: app, method: "EnvelopeService/BatchReEncrypt",
			req:  &keywardv1.BatchReEncryptRequest{Items: []*keywardv1.ReEncryptRequest{{Ciphertext: orders}}},
			code: codes.PermissionDenied, msg: "not granted EnvelopeService.BatchReEncrypt", audit: wantAudit{outcome: "denied"}},
	})
}
