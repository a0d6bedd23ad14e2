package server

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
)

// auditor may read the audit log and nothing else; reader may ping.
var auditPolicy = withAdmin(`  auditor:
    permissions:
      - operations: ["AuditService.*"]
        keys: ["*"]
  reader:
    permissions:
      - operations: [StatusService.Ping]
        keys: ["*"]
  payments:
    permissions:
      - operations: ["*"]
        keys: ["payments-*"]
`, `  - role: auditor
    callers: [{uid: 4000}]
  - role: reader
    callers: [{uid: 2000}]
  - role: payments
    callers: [{uid: 5000}]
`)

const (
	auditor  = 4000
	payments = 5000 // every operation, on its own keys only
)

// auditTraffic makes known calls, a second apart on the server's clock
// from its start: admin creates keys a and b, reader is denied a key, an
// API key is issued (its secret returned), and reader pings.
func auditTraffic(t *testing.T, ts *testServer) (start time.Time, secret string) {
	t.Helper()
	start = ts.clock.now()
	tick := func() { ts.clock.mu.Lock(); ts.clock.t = ts.clock.t.Add(time.Second); ts.clock.mu.Unlock() }
	for _, name := range []string{"a", "b"} {
		tick()
		if _, err := ts.call(t, admin, "KeyService/CreateKey", &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
			t.Fatal(err)
		}
	}
	tick()
	if _, err := ts.call(t, reader, "KeyService/GetKey", &keywardv1.GetKeyRequest{Name: "a"}); err == nil {
		t.Fatal("reader may get a key")
	}
	tick()
	resp, err := ts.call(t, admin, "APIKeyService/CreateAPIKey", &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "checkout", Environment: "live", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	tick()
	if _, err := ts.call(t, reader, "StatusService/Ping", &keywardv1.PingRequest{}); err != nil {
		t.Fatal(err)
	}
	tick()
	return start, resp.(*keywardv1.CreateAPIKeyResponse).GetSecret()
}

// ops is the records' "operation uid outcome key" lines.
func ops(recs []*keywardv1.AuditRecord) []string {
	var out []string
	for _, r := range recs {
		out = append(out, fmt.Sprintf("%s %d %s %s", r.GetOperation(), r.GetCaller().GetUid(), short(r.GetOutcome()), r.GetKey()))
	}
	return out
}

func short(o keywardv1.AuditOutcome) string {
	return strings.ToLower(strings.TrimPrefix(o.String(), "AUDIT_OUTCOME_"))
}

func TestAuditService(t *testing.T) {
	ts := newTestServer(t, auditPolicy)
	start, secret := auditTraffic(t, ts)
	at := func(s int) *timestamppb.Timestamp { return timestamppb.New(start.Add(time.Duration(s) * time.Second)) }
	uid := func(u uint32) *uint32 { return &u }
	// list checks a listing's records, newest first, and what the audit
	// record of the listing says it looked for.
	list := func(name string, req *keywardv1.ListAuditRecordsRequest, detail string, want ...string) serviceCase {
		return serviceCase{name: name, uid: auditor, method: "AuditService/ListAuditRecords", req: req, code: codes.OK,
			audit: wantAudit{outcome: "ok", detail: detail},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				r := resp.(*keywardv1.ListAuditRecordsResponse)
				if got := ops(r.GetRecords()); !slices.Equal(got, want) {
					t.Errorf("records:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
				if (r.GetNextPageToken() != "") != (req.GetPageSize() == 2) || r.GetScanLimited() || r.GetScannedBytes() == 0 {
					t.Errorf("token %q, limited %v, %d bytes read", r.GetNextPageToken(), r.GetScanLimited(), r.GetScannedBytes())
				}
				st := r.GetState()
				if st.GetPath() != ts.auditPath || st.GetSizeBytes() == 0 || st.GetLastSeq() == 0 || st.GetCheckpointError() != "" {
					t.Errorf("state %v", st)
				}
			}}
	}
	run(t, ts, []serviceCase{
		list("everything, newest first", &keywardv1.ListAuditRecordsRequest{}, "5 records",
			"StatusService.Ping 2000 ok ", "APIKeyService.CreateAPIKey 1000 ok shop", "KeyService.GetKey 2000 denied a",
			"KeyService.CreateKey 1000 ok b", "KeyService.CreateKey 1000 ok a"),
		list("denied", &keywardv1.ListAuditRecordsRequest{Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_DENIED}, "; outcome denied",
			"KeyService.GetKey 2000 denied a"),
		list("a service", &keywardv1.ListAuditRecordsRequest{Operation: "KeyService."}, "; operation KeyService.",
			"KeyService.GetKey 2000 denied a", "KeyService.CreateKey 1000 ok b", "KeyService.CreateKey 1000 ok a"),
		list("a caller", &keywardv1.ListAuditRecordsRequest{CallerUid: uid(reader)}, "; uid 2000",
			"StatusService.Ping 2000 ok ", "KeyService.GetKey 2000 denied a"),
		list("a key", &keywardv1.ListAuditRecordsRequest{Subject: "a"}, "; subject a",
			"KeyService.GetKey 2000 denied a", "KeyService.CreateKey 1000 ok a"),
		list("times", &keywardv1.ListAuditRecordsRequest{SinceTime: at(2), UntilTime: at(4)}, "; since ",
			"KeyService.GetKey 2000 denied a", "KeyService.CreateKey 1000 ok b"),
		// The listings so far are records too, and a filter finds them.
		list("the listings", &keywardv1.ListAuditRecordsRequest{Operation: "AuditService.*", Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_OK, PageSize: 2},
			"; operation AuditService.*; outcome ok", "AuditService.ListAuditRecords 4000 ok ", "AuditService.ListAuditRecords 4000 ok "),
		{name: "denied to a caller without the grant", uid: reader, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{}, code: codes.PermissionDenied, msg: "not granted AuditService.ListAuditRecords",
			audit: wantAudit{outcome: "denied"}},
		{name: "verify denied", uid: reader, method: "AuditService/VerifyAuditLog",
			req: &keywardv1.VerifyAuditLogRequest{}, code: codes.PermissionDenied, msg: "not granted AuditService.VerifyAuditLog",
			audit: wantAudit{outcome: "denied"}},
		// "*" on a team's own keys is not the grant for every key the log needs.
		{name: "denied to every operation on some keys", uid: payments, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{}, code: codes.PermissionDenied, msg: "not granted AuditService.ListAuditRecords",
			audit: wantAudit{outcome: "denied"}},
		{name: "verify denied to every operation on some keys", uid: payments, method: "AuditService/VerifyAuditLog",
			req: &keywardv1.VerifyAuditLogRequest{}, code: codes.PermissionDenied, msg: "not granted AuditService.VerifyAuditLog",
			audit: wantAudit{outcome: "denied"}},
		list("the denials are on record", &keywardv1.ListAuditRecordsRequest{Operation: "AuditService.*", Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_DENIED},
			"", "AuditService.VerifyAuditLog 5000 denied ", "AuditService.ListAuditRecords 5000 denied ", "AuditService.VerifyAuditLog 2000 denied ", "AuditService.ListAuditRecords 2000 denied "),
		{name: "a bad glob", uid: auditor, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{Subject: "[a-"}, code: codes.InvalidArgument, msg: `the subject "[a-" is not a glob`,
			audit: wantAudit{outcome: "error"}},
		{name: "a page too large", uid: auditor, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{PageSize: 1001}, code: codes.InvalidArgument, msg: "page_size is at most 1000",
			audit: wantAudit{outcome: "error"}},
		{name: "a page token of no page", uid: auditor, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{PageToken: "bm9wZQ"}, code: codes.InvalidArgument, msg: "pass next_page_token as it is",
			audit: wantAudit{outcome: "error"}},
		{name: "since after until", uid: auditor, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{SinceTime: at(3), UntilTime: at(2)}, code: codes.InvalidArgument, msg: "is not before until",
			audit: wantAudit{outcome: "error"}},
		{name: "an outcome unknown", uid: auditor, method: "AuditService/ListAuditRecords",
			req: &keywardv1.ListAuditRecordsRequest{Outcome: 9}, code: codes.InvalidArgument, msg: "outcome 9 is none of",
			audit: wantAudit{outcome: "error"}},
		{name: "verify", uid: auditor, method: "AuditService/VerifyAuditLog", req: &keywardv1.VerifyAuditLogRequest{}, code: codes.OK,
			audit: wantAudit{outcome: "ok", detail: "the chain and every checkpoint's MAC hold"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				r := resp.(*keywardv1.VerifyAuditLogResponse)
				fi, _ := os.Stat(ts.auditPath)
				if !r.GetOk() || r.GetBadLine() != 0 || !r.GetMacsChecked() || r.GetRecords() < 10 || r.GetLines() < r.GetRecords() ||
					r.GetVerifiedBytes() == 0 || r.GetVerifiedBytes() >= uint64(fi.Size()) || r.GetDuration() == nil || r.GetState().GetSizeBytes() != r.GetVerifiedBytes() {
					t.Errorf("verify: %v; the file has %d bytes (with the call's own record after)", r, fi.Size())
				}
			}},
	})

	t.Run("pages", func(t *testing.T) {
		var all []*keywardv1.AuditRecord
		onFile := ts.records(t)
		req := &keywardv1.ListAuditRecordsRequest{PageSize: 3}
		for {
			resp, err := ts.call(t, auditor, "AuditService/ListAuditRecords", req)
			if err != nil {
				t.Fatal(err)
			}
			r := resp.(*keywardv1.ListAuditRecordsResponse)
			if len(r.GetRecords()) > 3 {
				t.Fatalf("a page of %d", len(r.GetRecords()))
			}
			all = append(all, r.GetRecords()...)
			if req.PageToken = r.GetNextPageToken(); req.PageToken == "" {
				break
			}
		}
		// Every record on file when paging began, once, newest first
		// (the pages' own records come after the first page's).
		if len(all) != len(onFile) {
			t.Fatalf("%d records over the pages; %d on file", len(all), len(onFile))
		}
		for i, r := range all {
			want := onFile[len(onFile)-1-i]
			if r.GetOperation() != want.Op || r.GetCaller().GetUid() != want.Caller.UID || r.GetKey() != want.Key || r.GetDetail() != want.Detail {
				t.Fatalf("record %d: %v; on file %+v", i, r, want)
			}
			if i > 0 && r.GetSeq() >= all[i-1].GetSeq() {
				t.Fatalf("seq %d after %d", r.GetSeq(), all[i-1].GetSeq())
			}
		}
	})

	t.Run("no secret", func(t *testing.T) {
		resp, err := ts.call(t, auditor, "AuditService/ListAuditRecords", &keywardv1.ListAuditRecordsRequest{Operation: "APIKeyService.CreateAPIKey"})
		if err != nil {
			t.Fatal(err)
		}
		r := resp.(*keywardv1.ListAuditRecordsResponse)
		b, _ := protojson.Marshal(r)
		if len(r.GetRecords()) != 1 || !strings.HasPrefix(r.GetRecords()[0].GetApiKeyId(), "ak_") || bytes.Contains(b, []byte(secret)) || secret == "" {
			t.Fatalf("the API key's record: %s", b)
		}
	})

	t.Run("tampered", func(t *testing.T) {
		b, _ := os.ReadFile(ts.auditPath)
		i := bytes.Index(b, []byte(`"op":"KeyService.GetKey"`))
		w, _ := os.OpenFile(ts.auditPath, os.O_WRONLY, 0)
		w.WriteAt([]byte(`"op":"KeyService.GetKeX"`), int64(i))
		w.Close()
		line := uint64(bytes.Count(b[:i], []byte("\n")) + 1)
		resp, _ := ts.check(t, auditor, "AuditService/VerifyAuditLog", &keywardv1.VerifyAuditLogRequest{}, codes.OK, "",
			wantAudit{outcome: "ok", detail: fmt.Sprintf("line %d fails: its hash does not match its content", line)})
		r := resp.(*keywardv1.VerifyAuditLogResponse)
		if r.GetOk() || r.GetBadLine() != line || !strings.Contains(r.GetProblem(), "the line was changed") {
			t.Fatalf("after changing line %d: %v", line, r)
		}
	})
}

// TestAuditServiceOff: a keywardd without the reader says so.
func TestAuditServiceOff(t *testing.T) {
	ts := newTestServer(t, auditPolicy, func(_ *testing.T, _ *testServer, cfg *Config) { cfg.AuditReader = nil })
	mustCreate(t, ts, keys.Spec{Name: "x", Purpose: keys.Encrypt})
	for _, m := range []struct {
		method string
		req    proto.Message
	}{{"AuditService/ListAuditRecords", &keywardv1.ListAuditRecordsRequest{}}, {"AuditService/VerifyAuditLog", &keywardv1.VerifyAuditLogRequest{}}} {
		ts.check(t, auditor, m.method, m.req, codes.Unavailable, "does not serve its audit log", wantAudit{outcome: "error"})
	}
}
