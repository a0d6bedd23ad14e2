package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// notCanonical are spellings of "orders" keywardd no longer creates.
var notCanonical = []string{"ORDERS", "Orders", "orders.", "orders-"}

// TestNamesRefused: every kind of name keywardd stores is refused unless
// canonical (lower case, no trailing dot or dash), with a message that
// gives the canonical form; the canonical one is taken.
func TestNamesRefused(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	cc := keywardv1.NewCredentialServiceClient(in.Conn)
	apiKey := func(owner, env, tag string) error {
		_, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "Checkout API", Environment: env, Permissions: []string{"orders:read"}, Tags: []string{"checkout", tag}})
		return err
	}
	for _, name := range notCanonical {
		for _, tc := range []struct {
			kind string
			call func() error
		}{
			{"key name", func() error {
				_, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT})
				return err
			}},
			{"owner", func() error { return apiKey(name, "prod", "x") }},
			{"environment", func() error { return apiKey("shop", name, "x") }},
			{"tag", func() error { return apiKey("shop", "prod", name) }},
			{"credential name", func() error {
				_, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: name, Plugin: "file"})
				return err
			}},
		} {
			t.Run(tc.kind+" "+name, func(t *testing.T) {
				wantCode(t, tc.call(), codes.InvalidArgument, fmt.Sprintf(`%s %q is not canonical: use "orders"`, tc.kind, name))
			})
		}
	}
	// Other characters are refused as before, not told a canonical form.
	_, err := cc.RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "Orders DB", Plugin: "file"})
	wantCode(t, err, codes.InvalidArgument, "a credential name is 1 to 128 of a-z 0-9 . _ -")
	_, err = kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders eu", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT})
	wantCode(t, err, codes.InvalidArgument, "use 1 to 64 letters, digits")
	// The canonical names are taken; an API key's own name is a
	// description, not a name keywardd matches on, and keeps its case.
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	if err := apiKey("shop@example.com", "prod", "orders_v2"); err != nil {
		t.Fatal(err)
	}
}

// TestLegacyNamesServed: a store that holds names of every kind written
// before the rule (a key "Orders" and one "orders-", an API key of owner
// "SHOP" in environment "Prod" tagged "Leaked", a credential "orders-db.",
// and a plugin "file-" in the configuration) starts; keywardd serves each of them as before, logs each with its
// canonical form and what to do, and GetStatus counts them. The records are
// written through the store and the HSM directly, as an older keywardd left
// them.
func TestLegacyNamesServed(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	created, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "checkout", Environment: "prod", Permissions: []string{"orders:read"}, Tags: []string{"checkout"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}

	// What an older keywardd left: written with the store and the HSM.
	credSecret := []byte("the password of orders-db.")
	func() {
		h, err := hsm.Open(hsm.Config{Module: in.Token.Module, Token: in.Token.Label, PINFile: in.Token.PINFile})
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		key, err := daemon.DeriveStoreKey(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		st, err := store.Open(filepath.Join(in.Config.DataDir, "keyward.db"), store.Options{Key: key})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		now := time.Now().UTC()
		for _, name := range []string{"Orders", "orders-"} {
			if err := h.CreateKey(ctx, hsm.KeyID{Name: name, Version: 1}, hsm.AES256GCM); err != nil {
				t.Fatal(err)
			}
			rec, _ := json.Marshal(keys.Key{Name: name, Purpose: keys.Encrypt, Algorithm: hsm.AES256GCM.String(), State: keys.Enabled,
				Versions: []keys.Version{{Number: 1, Created: now}}, MinDecryptionVersion: 1, Created: now})
			if err := st.Update(store.BucketKeys, name, func([]byte) ([]byte, error) { return rec, nil }); err != nil {
				t.Fatal(err)
			}
		}
		err = st.Update(store.BucketAPIKeys, created.Key.Id, func(old []byte) ([]byte, error) {
			var r apikeys.Record
			if err := json.Unmarshal(old, &r); err != nil {
				return nil, err
			}
			r.Owner, r.Environment, r.Tags = "SHOP", "Prod", []string{"Leaked"}
			return json.Marshal(r)
		})
		if err != nil {
			t.Fatal(err)
		}
		km, err := keys.New(st, h, keys.Options{})
		if err != nil {
			t.Fatal(err)
		}
		sealer := credentials.EnvelopeSealer{Envelope: envelope.New(km, h, envelope.Options{}), Key: daemon.CredentialsKey}
		sealed, err := sealer.Seal(ctx, "orders-db.", credSecret)
		if err != nil {
			t.Fatal(err)
		}
		rec, _ := json.Marshal(credentials.Record{Name: "orders-db.", Plugin: "file", Config: json.RawMessage("{}"), State: credentials.Active, Created: now,
			Current: &credentials.Version{Handle: "1", Sealed: sealed, Activated: now}})
		if err := st.Update(store.BucketCredentials, "orders-db.", func([]byte) ([]byte, error) { return rec, nil }); err != nil {
			t.Fatal(err)
		}
	}()

	// And a plugin configured under a name with a trailing dash (the host
	// refuses to launch it, for its binary is not there: keywardd serves).
	in.Config.Plugins = []daemon.PluginConfig{{Name: "file-", Path: "/nonexistent/keyward-plugin-file", SHA256: strings.Repeat("0", 64)}}
	in.Restart()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	ac = keywardv1.NewAPIKeyServiceClient(in.Conn)
	cc := keywardv1.NewCredentialServiceClient(in.Conn)

	// The warnings, then the count in GetStatus.
	for _, want := range []string{`"kind":"key","name":"Orders","canonical":"orders"`, `"kind":"key","name":"orders-","canonical":"orders"`,
		`"kind":"api_key_owner","name":"SHOP","canonical":"shop","uses":1`, `"kind":"api_key_environment","name":"Prod","canonical":"prod"`,
		`"kind":"api_key_tag","name":"Leaked","canonical":"leaked"`, `"kind":"credential","name":"orders-db.","canonical":"orders-db"`,
		`"kind":"plugin","name":"file-","canonical":"file"`} {
		waitFor(t, func() bool { return strings.Contains(in.Log.String(), want) })
	}
	if !strings.Contains(in.Log.String(), `"level":"WARN","msg":"names not in their canonical form`) || !strings.Contains(in.Log.String(), "docs/operations.md") {
		t.Fatalf("no summary warning:\n%s", in.Log.String())
	}
	st, err := keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint32{"key": 2, "api_key_owner": 1, "api_key_environment": 1, "api_key_tag": 1, "credential": 1, "plugin": 1}
	if fmt.Sprint(st.NamesToRename) != fmt.Sprint(want) {
		t.Fatalf("GetStatus names_to_rename = %v, want %v", st.NamesToRename, want)
	}

	// Keys: used as ever, and moved to the canonical key, the way out.
	ectx := map[string]string{"table": "orders"}
	enc, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "Orders", Plaintext: []byte("order 1"), EncryptionContext: ectx})
	if err != nil {
		t.Fatalf("Encrypt under Orders: %v", err)
	}
	if got, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: enc.Ciphertext, EncryptionContext: ectx}); err != nil || string(got.Plaintext) != "order 1" || got.KeyName != "Orders" {
		t.Fatalf("Decrypt under Orders: %v", err)
	}
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders-"}); err != nil {
		t.Fatalf("RotateKey orders-: %v", err)
	}
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	moved, err := ec.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: enc.Ciphertext, EncryptionContext: ectx, DestinationKeyName: "orders"})
	if err != nil || moved.KeyName != "orders" {
		t.Fatalf("ReEncrypt from Orders to orders: %v", err)
	}
	if _, err := kc.ScheduleKeyDeletion(ctx, &keywardv1.ScheduleKeyDeletionRequest{Name: "Orders"}); err != nil {
		t.Fatal(err)
	}

	// The API key verifies in its environment, and the filters find it by
	// its names as stored.
	verifyCode(t, ac, created.Secret, &keywardv1.VerifyAPIKeyRequest{Environment: "Prod", Permissions: []string{"orders:read"}}, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	list, err := ac.ListAPIKeys(ctx, &keywardv1.ListAPIKeysRequest{Owner: "SHOP", Tag: "Leaked", Environment: "Prod"})
	if err != nil || len(list.Keys) != 1 {
		t.Fatalf("ListAPIKeys of owner SHOP: %v, %v", list, err)
	}
	// It can still be narrowed: an update checks what it changes, not the
	// names the key was issued with.
	if _, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: created.Key.Id, Permissions: []string{"orders:read"}, AllowedIps: []string{"192.0.2.0/24"}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"permissions", "allowed_ips"}}}); err != nil {
		t.Fatalf("UpdateAPIKey of owner SHOP: %v", err)
	}

	// The credential is served.
	got, err := cc.GetCredential(ctx, &keywardv1.GetCredentialRequest{Name: "orders-db."})
	if err != nil || string(got.Secret) != string(credSecret) {
		t.Fatalf("GetCredential orders-db.: %v", err)
	}
	if n, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Owner: "SHOP"}); err != nil || n.Count != 1 {
		t.Fatalf("RevokeAPIKeys of owner SHOP: %v, %v", n, err)
	}

	// After a restart, what was moved away is not counted any more.
	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}
	in.Log.Reset()
	in.Config.Plugins = nil
	in.Restart()
	waitFor(t, func() bool { return strings.Contains(in.Log.String(), "names not in their canonical form") })
	st, err = keywardv1.NewStatusServiceClient(in.Conn).GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if want := map[string]uint32{"key": 1, "credential": 1}; err != nil || fmt.Sprint(st.NamesToRename) != fmt.Sprint(want) {
		t.Fatalf("after the moves, names_to_rename = %v, %v; want %v", st.GetNamesToRename(), err, want)
	}
}
