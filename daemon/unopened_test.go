package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/envelope"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// decryptGlob is what the application role of the tests below may decrypt.
const decryptGlob = "tenant-*"

// decryptPolicy grants Decrypt, ReEncrypt and their batch forms on
// decryptGlob, and KeyService.GetKey too if getKey.
func decryptPolicy(getKey bool) string {
	ops := "EnvelopeService.Decrypt, EnvelopeService.ReEncrypt, EnvelopeService.BatchDecrypt, EnvelopeService.BatchReEncrypt"
	if getKey {
		ops += ", KeyService.GetKey"
	}
	return strings.Replace(uidPolicy(fmt.Sprintf("      - operations: [%s]\n        keys: [%q]", ops, decryptGlob)), "max_batch: 5", "max_batch: 100", 1)
}

// withName is ct with the key name in its header replaced.
func withName(ct []byte, name string) []byte {
	n := int(ct[4])
	out := append([]byte{}, ct[:4]...)
	out = append(out, byte(len(name)))
	out = append(out, name...)
	return append(out, ct[5+n:]...)
}

// withVersion is ct with the key version in its header replaced.
func withVersion(ct []byte, v uint32) []byte {
	out := bytes.Clone(ct)
	binary.BigEndian.PutUint32(out[5+int(ct[4]):], v)
	return out
}

// mutation is a ciphertext that must not open, and what it is.
type mutation struct {
	what string
	ct   []byte
	ctx  map[string]string
}

// mutations are every byte of ct flipped by 0x01, 0x80 and 0xff, every
// truncation, a byte appended, and the other context.
func mutations(what string, ct []byte, ctx map[string]string) []mutation {
	var out []mutation
	for i := range ct {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			b := bytes.Clone(ct)
			b[i] ^= x
			out = append(out, mutation{fmt.Sprintf("%s byte %d ^ %#x", what, i, x), b, ctx})
		}
	}
	for n := range len(ct) {
		out = append(out, mutation{fmt.Sprintf("%s cut to %d bytes", what, n), bytes.Clone(ct[:n]), ctx})
	}
	out = append(out, mutation{what + " with a byte more", append(bytes.Clone(ct), 0), ctx},
		mutation{what + " under another context", ct, map[string]string{"tenant": "b"}},
		mutation{what + " under no context", ct, nil})
	return out
}

// answer is a status as the caller gets it, byte for byte.
func answer(t *testing.T, err error) string {
	t.Helper()
	if err == nil {
		return "OK"
	}
	b, merr := proto.MarshalOptions{Deterministic: true}.Marshal(status.Convert(err).Proto())
	if merr != nil {
		t.Fatal(merr)
	}
	return string(b)
}

func itemAnswer(t *testing.T, e *keywardv1.ItemError) string {
	t.Helper()
	if e == nil {
		return "OK"
	}
	return answer(t, status.Error(codes.Code(e.Code), e.Message))
}

// decode reads an answer back.
func decode(a string) *spb.Status {
	var st spb.Status
	proto.Unmarshal([]byte(a), &st)
	return &st
}

// show is an answer for a failure message.
func show(a string) string {
	if a == "OK" {
		return a
	}
	st := decode(a)
	return fmt.Sprintf("%v %q", codes.Code(st.Code), st.Message)
}

// TestUnopenedAnswers: a caller granted Decrypt on tenant-* but not
// KeyService.GetKey learns nothing from a ciphertext that does not open
// but that it does not open. Every byte of a real ciphertext and of a real
// wrapped data key is flipped three ways, every truncation and other
// contexts are tried, and the header is rewritten to name every kind of key
// and version (missing, disabled, pending deletion, of another purpose, below
// the minimum decryption version, past the newest): Decrypt, ReEncrypt and
// their batch forms give one answer, byte for byte, to all of them, except
// PERMISSION_DENIED for a header naming a key outside the grant, which
// depends on the name alone. A caller granted GetKey too is told the
// specific reason, and the audit record keeps it for both.
func TestUnopenedAnswers(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(strings.Replace(uidPolicy(allowAll), "max_batch: 5", "max_batch: 100", 1)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	create := func(name string, p keywardv1.KeyPurpose) {
		t.Helper()
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: p}); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"tenant-a", "tenant-b", "tenant-c", "admin-kek"} {
		create(n, keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT)
	}
	create("tenant-s", keywardv1.KeyPurpose_KEY_PURPOSE_SIGN)
	ectx := map[string]string{"tenant": "a"}
	old, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "tenant-a", Plaintext: []byte("old data"), EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "tenant-a"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kc.SetMinDecryptionVersion(ctx, &keywardv1.SetMinDecryptionVersionRequest{Name: "tenant-a", Version: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.SetKeyState(ctx, &keywardv1.SetKeyStateRequest{Name: "tenant-b", State: keywardv1.KeyState_KEY_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.ScheduleKeyDeletion(ctx, &keywardv1.ScheduleKeyDeletionRequest{Name: "tenant-c"}); err != nil {
		t.Fatal(err)
	}
	enc, err := ec.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "tenant-a", Plaintext: []byte("the data"), EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	dk, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "tenant-a", EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	if enc.KeyVersion != 3 || dk.KeyVersion != 3 {
		t.Fatalf("sealed under v%d and v%d, want v3", enc.KeyVersion, dk.KeyVersion)
	}

	// What the header can name: every state a key can be in, and names
	// outside the grant.
	named := []struct {
		what string
		ct   []byte
		code codes.Code // what a caller granted GetKey is told
		msg  string
	}{
		{"a key that does not exist", withName(enc.Ciphertext, "tenant-d"), codes.NotFound, `key not found: "tenant-d"`},
		{"a disabled key", withName(enc.Ciphertext, "tenant-b"), codes.FailedPrecondition, `key is disabled: "tenant-b"`},
		{"a key pending deletion", withName(enc.Ciphertext, "tenant-c"), codes.FailedPrecondition, `key is scheduled for deletion: "tenant-c"`},
		{"a signing key", withName(enc.Ciphertext, "tenant-s"), codes.FailedPrecondition, `"tenant-s" is a sign key, not an encryption key`},
		{"a version below the minimum", withVersion(enc.Ciphertext, 1), codes.FailedPrecondition, `"tenant-a" v1 is below the minimum decryption version 2`},
		{"an authentic ciphertext below the minimum", old.Ciphertext, codes.FailedPrecondition, `"tenant-a" v1 is below the minimum decryption version 2`},
		{"a version past the newest", withVersion(enc.Ciphertext, 4), codes.FailedPrecondition, `"tenant-a" has no version 4`},
		{"version 257", withVersion(enc.Ciphertext, 257), codes.FailedPrecondition, `"tenant-a" has no version 257`},
		{"another version of the key", withVersion(enc.Ciphertext, 2), codes.InvalidArgument, "the ciphertext or the encryption context does not match"},
		{"a malformed name", withName(enc.Ciphertext, "tenant a"), codes.InvalidArgument, "not a keyward ciphertext"},
		{"another magic", append([]byte("kwx"), enc.Ciphertext[3:]...), codes.InvalidArgument, "not a keyward ciphertext"},
		{"format version 2", append([]byte("kwe\x02"), enc.Ciphertext[4:]...), codes.InvalidArgument, "format version 2"},
		{"a key outside the grant", withName(enc.Ciphertext, "admin-kek"), codes.PermissionDenied, `not granted EnvelopeService.Decrypt on key "admin-kek"`},
		{"keywardd's own key", withName(enc.Ciphertext, "keyward-credentials"), codes.PermissionDenied, "one of keywardd's own keys"},
	}
	var all []mutation
	for _, n := range named {
		all = append(all, mutation{n.what, n.ct, ectx})
	}
	all = append(all, mutations("ciphertext", enc.Ciphertext, ectx)...)
	all = append(all, mutations("wrapped key", dk.WrappedKey, ectx)...)

	// expectDenied says whether the mutation names a key outside the
	// grant, and which.
	expectDenied := func(ct []byte) (string, bool) {
		c, err := envelope.Parse(ct)
		if err != nil {
			return "", false
		}
		ok, _ := path.Match(decryptGlob, c.KeyName)
		return c.KeyName, !ok || strings.HasPrefix(c.KeyName, "keyward-")
	}

	in.SetPolicy(decryptPolicy(false))
	// The grant works: the originals open.
	if got, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: enc.Ciphertext, EncryptionContext: ectx}); err != nil || string(got.Plaintext) != "the data" {
		t.Fatalf("Decrypt of the original: %v", err)
	}
	if got, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey, EncryptionContext: ectx}); err != nil || !bytes.Equal(got.Plaintext, dk.Plaintext) {
		t.Fatalf("Decrypt of the data key: %v", err)
	}

	// run sends every mutation to Decrypt, ReEncrypt, BatchDecrypt and
	// BatchReEncrypt and calls check with each answer.
	run := func(check func(m mutation, call, answer string)) {
		for _, m := range all {
			_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: m.ct, EncryptionContext: m.ctx})
			check(m, "Decrypt", answer(t, err))
			_, err = ec.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: m.ct, EncryptionContext: m.ctx})
			check(m, "ReEncrypt", answer(t, err))
		}
		for i := 0; i < len(all); i += 100 {
			chunk := all[i:min(i+100, len(all))]
			var dreq keywardv1.BatchDecryptRequest
			var rreq keywardv1.BatchReEncryptRequest
			for _, m := range chunk {
				dreq.Items = append(dreq.Items, &keywardv1.DecryptRequest{Ciphertext: m.ct, EncryptionContext: m.ctx})
				rreq.Items = append(rreq.Items, &keywardv1.ReEncryptRequest{Ciphertext: m.ct, EncryptionContext: m.ctx})
			}
			dres, err := ec.BatchDecrypt(ctx, &dreq)
			if err != nil || len(dres.Results) != len(chunk) {
				t.Fatalf("BatchDecrypt: %v", err)
			}
			rres, err := ec.BatchReEncrypt(ctx, &rreq)
			if err != nil || len(rres.Results) != len(chunk) {
				t.Fatalf("BatchReEncrypt: %v", err)
			}
			for j, m := range chunk {
				check(m, "BatchDecrypt", itemAnswer(t, dres.Results[j].GetError()))
				check(m, "BatchReEncrypt", itemAnswer(t, rres.Results[j].GetError()))
			}
		}
	}

	// Without GetKey: one answer for everything inside the grant.
	uniform := map[string][]string{}
	run(func(m mutation, call, a string) {
		if a == "OK" {
			t.Fatalf("%s: %s opened", call, m.what)
		}
		if name, denied := expectDenied(m.ct); denied {
			if st := decode(a); codes.Code(st.Code) != codes.PermissionDenied || !strings.Contains(st.Message, fmt.Sprintf("%q", name)) {
				t.Errorf("%s: %s: %s; want PERMISSION_DENIED naming %q", call, m.what, show(a), name)
			}
			return
		}
		uniform[a] = append(uniform[a], call+": "+m.what)
	})
	if len(uniform) != 1 {
		for a, whats := range uniform {
			t.Errorf("%d answers %s, such as %s", len(whats), show(a), whats[0])
		}
		t.Fatalf("%d different answers to a caller not granted GetKey; want 1", len(uniform))
	}
	for a, whats := range uniform {
		if st := decode(a); codes.Code(st.Code) != codes.InvalidArgument || !strings.Contains(st.Message, "does not open") || strings.Contains(st.Message, "tenant") || len(st.Details) != 0 {
			t.Fatalf("the one answer is %s", show(a))
		}
		if len(whats) < 4*len(all)*9/10 {
			t.Fatalf("only %d of %d answers are the uniform one", len(whats), 4*len(all))
		}
	}

	// With GetKey: the specific reason.
	in.SetPolicy(decryptPolicy(true))
	for _, n := range named {
		_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: n.ct, EncryptionContext: ectx})
		wantCode(t, err, n.code, n.msg)
		_, err = ec.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: n.ct, EncryptionContext: ectx})
		wantCode(t, err, n.code, n.msg)
	}
	distinct := map[string]bool{}
	run(func(m mutation, call, a string) {
		if a == "OK" {
			t.Fatalf("%s: %s opened", call, m.what)
		}
		distinct[a] = true
	})
	if len(distinct) < 10 {
		t.Fatalf("a caller granted GetKey got %d different answers; want the specific reasons", len(distinct))
	}

	// The audit record keeps the specific reason of what the caller was
	// not told, for single calls and batch items alike.
	in.Stop()
	recs := readAudit(t, in)
	var single, item bool
	for _, r := range recs {
		if r.Op == "EnvelopeService.Decrypt" && r.Key == "tenant-d" && r.Code == codes.InvalidArgument.String() && strings.Contains(r.Detail, `key not found: "tenant-d"`) {
			single = true
		}
		for _, it := range r.Batch {
			if r.Op == "EnvelopeService.BatchDecrypt" && it.Key == "tenant-b" && it.Code == codes.InvalidArgument.String() && strings.Contains(it.Detail, `key is disabled: "tenant-b"`) {
				item = true
			}
		}
	}
	if !single || !item {
		t.Fatalf("the audit log lacks the withheld reasons (single call %v, batch item %v)", single, item)
	}
	if rep := verifyAudit(t, in); rep.BadLine != 0 {
		t.Fatalf("audit: %+v", rep)
	}
}

// TestUnopenedHSMDown: while the HSM cannot decrypt, a ciphertext naming a
// key that exists and one naming a key or version that does not get the
// same UNAVAILABLE, to be retried: the decoy decryption fails as the real
// one would.
func TestUnopenedHSMDown(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "tenant-a", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	ectx := map[string]string{"tenant": "a"}
	dk, err := keywardv1.NewEnvelopeServiceClient(in.Conn).GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "tenant-a", EncryptionContext: ectx})
	if err != nil {
		t.Fatal(err)
	}
	in.Stop()
	faults := softhsmtest.NewFaults(t, in.Token)
	in.Config.HSM.Module = faults.Module
	os.WriteFile(in.Config.PolicyFile, []byte(decryptPolicy(false)), 0o600)
	in.Restart()
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	faults.Set("C_DecryptInit 0xE0") // CKR_TOKEN_NOT_PRESENT
	cts := map[string][]byte{"existing key": dk.WrappedKey, "missing key": withName(dk.WrappedKey, "tenant-d"), "missing version": withVersion(dk.WrappedKey, 9)}
	answers := map[string][]string{}
	for what, ct := range cts {
		_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: ct, EncryptionContext: ectx})
		wantCode(t, err, codes.Unavailable, "retry later")
		answers[answer(t, err)] = append(answers[answer(t, err)], what)
	}
	if len(answers) != 1 {
		t.Fatalf("%d different answers with the HSM down: %v", len(answers), answers)
	}
	in.SetPolicy(decryptPolicy(true))
	_, err = ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: cts["missing key"], EncryptionContext: ectx})
	wantCode(t, err, codes.NotFound, `key not found: "tenant-d" (and the HSM could not try the decoy decryption: hsm: decrypt`)
	faults.Set()
	if _, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey, EncryptionContext: ectx}); err != nil {
		t.Fatalf("after the HSM came back: %v", err)
	}
}

// readAudit reads the records of the stopped daemon's audit log.
func readAudit(t *testing.T, in *daemontest.Daemon) []audit.Record {
	t.Helper()
	f, err := os.Open(filepath.Join(in.Config.DataDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []audit.Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var ln struct {
			Kind string          `json:"kind"`
			Body json.RawMessage `json:"body"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ln); err != nil {
			t.Fatal(err)
		}
		if ln.Kind != "record" {
			continue
		}
		var r audit.Record
		if err := json.Unmarshal(ln.Body, &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// BenchmarkUnopened measures, over the socket, the one answer a caller not
// granted KeyService.GetKey gets for a ciphertext that does not open: a
// forged one naming a key that exists (its tag fails in the HSM), one
// naming a key that does not, and one naming a version that does not. The
// three should take about as long: the decoy decryption stands in for the
// HSM work a missing key or version would skip.
func BenchmarkUnopened(b *testing.B) {
	in := daemontest.Start(b, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "tenant-a", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		b.Fatal(err)
	}
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	ectx := map[string]string{"tenant": "a"}
	dk, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "tenant-a", EncryptionContext: ectx})
	if err != nil {
		b.Fatal(err)
	}
	forged := bytes.Clone(dk.WrappedKey)
	forged[len(forged)-1] ^= 1
	if err := os.WriteFile(in.Config.PolicyFile, []byte(decryptPolicy(false)), 0o600); err != nil {
		b.Fatal(err)
	}
	in.Reload()
	for range 200 {
		if strings.Contains(in.Log.String(), "policy reloaded") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, c := range []struct {
		name string
		ct   []byte
	}{{"existing-key", forged}, {"missing-key", withName(forged, "tenant-d")}, {"missing-version", withVersion(forged, 9)}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: c.ct, EncryptionContext: ectx})
				if status.Code(err) != codes.InvalidArgument {
					b.Fatal(err)
				}
			}
		})
	}
}
