package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// auditFile is in's audit log.
func auditFile(in *daemontest.Daemon) string {
	if in.Config.AuditFile != "" {
		return in.Config.AuditFile
	}
	return filepath.Join(in.Config.DataDir, "audit.log")
}

// fileRecords is every record of the audit log file, oldest first.
func fileRecords(t *testing.T, in *daemontest.Daemon) []audit.Record {
	t.Helper()
	f, err := os.Open(auditFile(in))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []audit.Record
	if err := audit.Records(f, func(r audit.Record) error { out = append(out, r); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// listAll is every record ListAuditRecords yields for req, page by page.
func listAll(t *testing.T, c *client.Client, req *keywardv1.ListAuditRecordsRequest) []*keywardv1.AuditRecord {
	t.Helper()
	var out []*keywardv1.AuditRecord
	for r, err := range c.AuditRecords(context.Background(), req) {
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// TestAuditThroughSocket: a real keywardd's audit log read through its
// socket, as its operator: each filter against known traffic, every
// record once across pages while calls go on, a denial on record, and the
// chain verified, then found broken at the line changed on disk.
func TestAuditThroughSocket(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	uid := uint32(os.Getuid())

	// Known traffic: a key made and used, a decryption that fails, a key
	// not found.
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	dk, err := c.GenerateDataKey(ctx, "orders", map[string]string{"tenant": "42"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Decrypt(ctx, dk.Wrapped, map[string]string{"tenant": "43"}); !errors.Is(err, client.ErrInvalid) {
		t.Fatalf("Decrypt under another context: %v", err)
	}
	if _, err := c.Keys.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "nope"}); err == nil {
		t.Fatal("GetKey found nope")
	}

	line := func(r *keywardv1.AuditRecord) string {
		return fmt.Sprintf("%s %s %s", r.GetOperation(), strings.ToLower(strings.TrimPrefix(r.GetOutcome().String(), "AUDIT_OUTCOME_")), r.GetKey())
	}
	for _, tc := range []struct {
		name string
		req  *keywardv1.ListAuditRecordsRequest
		want []string
	}{
		{"a service", &keywardv1.ListAuditRecordsRequest{Operation: "EnvelopeService."},
			[]string{"EnvelopeService.Decrypt error orders", "EnvelopeService.GenerateDataKey ok orders"}},
		{"errors", &keywardv1.ListAuditRecordsRequest{Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_ERROR},
			[]string{"KeyService.GetKey error nope", "EnvelopeService.Decrypt error orders"}},
		{"a key, this caller", &keywardv1.ListAuditRecordsRequest{Subject: "orders", CallerUid: &uid},
			[]string{"EnvelopeService.Decrypt error orders", "EnvelopeService.GenerateDataKey ok orders", "KeyService.CreateKey ok orders"}},
		{"another caller", &keywardv1.ListAuditRecordsRequest{Subject: "orders", CallerUid: new(uid + 1)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, r := range listAll(t, c, tc.req) {
				got = append(got, line(r))
				if r.GetCaller().GetUid() != uid || r.GetCaller().GetPid() == 0 || r.GetCaller().GetExe() == "" || r.GetTime() == nil || r.GetSeq() == 0 {
					t.Errorf("a record without its caller, time or line: %v", r)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %q; want %q", got, tc.want)
			}
		})
	}
	t.Run("pages while calls go on", func(t *testing.T) {
		onFile := fileRecords(t, in)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := c.Status.Ping(ctx, &keywardv1.PingRequest{}); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		// Pings are audited while the pages are read: the records on file
		// before the first page must each be listed once, in order.
		got := listAll(t, c, &keywardv1.ListAuditRecordsRequest{PageSize: 2})
		close(stop)
		wg.Wait()
		if len(got) < len(onFile) {
			t.Fatalf("%d records over the pages; %d were on file before", len(got), len(onFile))
		}
		for i := 1; i < len(got); i++ {
			if got[i].GetSeq() >= got[i-1].GetSeq() {
				t.Fatalf("seq %d after %d", got[i].GetSeq(), got[i-1].GetSeq())
			}
		}
		// The oldest len(onFile) records listed are those on file before,
		// in reverse.
		tail := got[len(got)-len(onFile):]
		for i, r := range tail {
			want := onFile[len(onFile)-1-i]
			if r.GetOperation() != want.Op || r.GetKey() != want.Key || !r.GetTime().AsTime().Equal(want.Time) {
				t.Fatalf("record %d from the end: %v; on file %+v", i, r, want)
			}
		}
	})

	t.Run("denied", func(t *testing.T) {
		in.SetPolicy(uidPolicy("      - operations: [KeyService.ListKeys]\n        keys: [\"*\"]"))
		_, err := c.ListAuditRecords(ctx, &keywardv1.ListAuditRecordsRequest{})
		var e *client.Error
		if !errors.As(err, &e) || e.Code != codes.PermissionDenied || !strings.Contains(e.Message, "not granted AuditService.ListAuditRecords") {
			t.Fatalf("ListAuditRecords without the grant: %v", err)
		}
		if _, err := c.VerifyAuditLog(ctx); !errors.Is(err, client.ErrDenied) {
			t.Fatalf("VerifyAuditLog without the grant: %v", err)
		}
		in.SetPolicy(uidPolicy(allowAll))
		denials := listAll(t, c, &keywardv1.ListAuditRecordsRequest{Operation: "AuditService.*", Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_DENIED})
		if len(denials) != 2 || denials[0].GetOperation() != "AuditService.VerifyAuditLog" || denials[1].GetCode() != "PermissionDenied" ||
			!strings.Contains(denials[1].GetDetail(), "not granted AuditService.ListAuditRecords") {
			t.Fatalf("the denials on record: %v", denials)
		}
	})

	t.Run("verify", func(t *testing.T) {
		// A checkpoint follows within a second of a record.
		var v *keywardv1.VerifyAuditLogResponse
		poll(t, 20*time.Millisecond, func() bool {
			v, err = c.VerifyAuditLog(ctx)
			return err != nil || v.GetCheckpoints() > 0
		})
		if err != nil {
			t.Fatal(err)
		}
		if !v.GetOk() || !v.GetMacsChecked() || v.GetBadLine() != 0 || v.GetCheckpoints() == 0 || v.GetRecords() < uint64(len(fileRecords(t, in)))-1 ||
			v.GetState().GetPath() != auditFile(in) || v.GetState().GetLastCheckpointSeq() == 0 {
			t.Fatalf("a sound log: %v", v)
		}
		path := auditFile(in)
		b, _ := os.ReadFile(path)
		i := bytes.Index(b, []byte(`"op":"EnvelopeService.Decrypt"`))
		w, _ := os.OpenFile(path, os.O_WRONLY, 0)
		w.WriteAt([]byte(`"op":"EnvelopeService.DecrypT"`), int64(i))
		w.Close()
		v, err := c.VerifyAuditLog(ctx)
		bad := uint64(bytes.Count(b[:i], []byte("\n")) + 1)
		if err != nil || v.GetOk() || v.GetBadLine() != bad || !strings.Contains(v.GetProblem(), "the line was changed") {
			t.Fatalf("after changing line %d: %v, %v", bad, v, err)
		}
		// keywardd serves on, and the listing shows the line as it now is.
		got := listAll(t, c, &keywardv1.ListAuditRecordsRequest{Operation: "EnvelopeService.DecrypT"})
		if len(got) != 1 {
			t.Fatalf("the changed line listed: %v", got)
		}
	})
}

// TestAuditWhileStoreDamaged: once the store is found damaged keywardd
// refuses calls, but its audit log still reads, and says what happened.
func TestAuditWhileStoreDamaged(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders-kek", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(in.Config.DataDir, "keyward.db")
	b, _ := os.ReadFile(db)
	at := bytes.LastIndex(b, []byte(`"orders-kek"`))
	w, _ := os.OpenFile(db, os.O_WRONLY, 0)
	w.WriteAt([]byte("O"), int64(at+1))
	w.Close()
	_, err = c.Keys.ListKeys(ctx, &keywardv1.ListKeysRequest{})
	wantCode(t, err, codes.DataLoss, "keywardd's store is damaged")
	got, err := c.ListAuditRecords(ctx, &keywardv1.ListAuditRecordsRequest{Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_ERROR})
	if err != nil {
		t.Fatalf("the audit log while the store is damaged: %v", err)
	}
	if len(got.GetRecords()) != 1 || got.GetRecords()[0].GetOperation() != "KeyService.ListKeys" || got.GetRecords()[0].GetCode() != "DataLoss" {
		t.Fatalf("the failure on record: %v", got.GetRecords())
	}
	if v, err := c.VerifyAuditLog(ctx); err != nil || !v.GetOk() {
		t.Fatalf("verify while the store is damaged: %v, %v", v, err)
	}
}
