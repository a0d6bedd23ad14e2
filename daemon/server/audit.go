package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
)

// AuditService's operations are on no key: a grant of either reads the
// records of every caller.

// AuditReader is keywardd's own audit log as the AuditService reads it:
// daemon/audit.Log.
type AuditReader interface {
	// List reads the records q selects, newest first, up to the length
	// the log had synced when it was called.
	List(ctx context.Context, q audit.Query) (audit.Page, error)
	// Verify checks the whole log as it stands, with the log's MAC key,
	// and returns the length it checked.
	Verify(ctx context.Context) (audit.Report, int64, error)
	// State is the log's state, without reading its file.
	State() audit.State
	// CheckpointErr is why the last checkpoint could not be MACed, or nil.
	CheckpointErr() error
}

// outcomes are the audit log's outcomes by their API name.
var outcomes = map[keywardv1.AuditOutcome]string{
	keywardv1.AuditOutcome_AUDIT_OUTCOME_OK:     "ok",
	keywardv1.AuditOutcome_AUDIT_OUTCOME_DENIED: "denied",
	keywardv1.AuditOutcome_AUDIT_OUTCOME_ERROR:  "error",
}

func toOutcome(s string) keywardv1.AuditOutcome {
	for o, name := range outcomes {
		if name == s {
			return o
		}
	}
	return keywardv1.AuditOutcome_AUDIT_OUTCOME_UNSPECIFIED
}

// allowAudit grants an AuditService call only on a grant for every key
// (keys: ["*"]): the log names every caller's keys, API keys and binaries,
// and a role granted "*" operations on some keys (a team's own) must not
// read them, nor hold up the operator's verification.
func (s *Server) allowAudit(ctx context.Context, op string) error {
	if err := s.allow(ctx, op, ""); err != nil {
		return err
	}
	return s.policy.Load().AllowEveryKey(subject(callFrom(ctx).caller), op)
}

func (s *Server) auditOn() error {
	if s.cfg.AuditReader == nil {
		return fmt.Errorf("%w: this keywardd does not serve its audit log through the socket", errUnavailable)
	}
	return nil
}

func (s *Server) ListAuditRecords(ctx context.Context, r *keywardv1.ListAuditRecordsRequest) (*keywardv1.ListAuditRecordsResponse, error) {
	if err := s.allowAudit(ctx, "AuditService.ListAuditRecords"); err != nil {
		return nil, err
	}
	if err := s.auditOn(); err != nil {
		return nil, err
	}
	q, err := auditQuery(r)
	if err != nil {
		return nil, err
	}
	page, err := s.cfg.AuditReader.List(ctx, q)
	if err != nil {
		return nil, err
	}
	state := s.auditState() // after: it covers every record the page holds
	out := &keywardv1.ListAuditRecordsResponse{NextPageToken: page.NextPageToken, ScanLimited: page.ScanLimited,
		ScannedBytes: uint64(page.Scanned), State: state}
	for _, e := range page.Records {
		out.Records = append(out.Records, toAuditRecord(e))
	}
	callFrom(ctx).detail = fmt.Sprintf("%d records, %d bytes read%s", len(out.Records), page.Scanned, describeQuery(r))
	return out, nil
}

// auditQuery is the request's filters, checked.
func auditQuery(r *keywardv1.ListAuditRecordsRequest) (audit.Query, error) {
	if r.GetPageSize() > audit.MaxPageSize {
		return audit.Query{}, fmt.Errorf("%w: page_size is at most %d", errInvalid, audit.MaxPageSize)
	}
	outcome, ok := outcomes[r.GetOutcome()]
	if !ok && r.GetOutcome() != keywardv1.AuditOutcome_AUDIT_OUTCOME_UNSPECIFIED {
		return audit.Query{}, fmt.Errorf("%w: outcome %d is none of AUDIT_OUTCOME_OK, _DENIED, _ERROR", errInvalid, r.GetOutcome())
	}
	q := audit.Query{Op: r.GetOperation(), Outcome: outcome, Subject: r.GetSubject(), PageSize: int(r.GetPageSize()), PageToken: r.GetPageToken()}
	for _, t := range []struct {
		name string
		ts   *timestamppb.Timestamp
		to   *time.Time
	}{{"since_time", r.GetSinceTime(), &q.Since}, {"until_time", r.GetUntilTime(), &q.Until}} {
		if t.ts == nil {
			continue
		}
		if err := t.ts.CheckValid(); err != nil {
			return audit.Query{}, fmt.Errorf("%w: %s: %v", errInvalid, t.name, err)
		}
		*t.to = t.ts.AsTime()
	}
	if r.CallerUid != nil {
		uid := r.GetCallerUid()
		q.UID = &uid
	}
	return q, nil
}

// describeQuery is a listing's filters, for its audit record: what the
// operator looked for.
func describeQuery(r *keywardv1.ListAuditRecordsRequest) string {
	var b strings.Builder
	add := func(name, v string) {
		if v != "" {
			fmt.Fprintf(&b, "; %s %s", name, v)
		}
	}
	for _, t := range []struct {
		name string
		ts   *timestamppb.Timestamp
	}{{"since", r.GetSinceTime()}, {"until", r.GetUntilTime()}} {
		if t.ts != nil {
			add(t.name, t.ts.AsTime().Format(time.RFC3339Nano))
		}
	}
	add("operation", r.GetOperation())
	add("outcome", outcomes[r.GetOutcome()])
	if r.CallerUid != nil {
		add("uid", fmt.Sprint(r.GetCallerUid()))
	}
	add("subject", r.GetSubject())
	if r.GetPageToken() != "" {
		add("from", "a page token")
	}
	return b.String()
}

func toAuditRecord(e audit.Entry) *keywardv1.AuditRecord {
	out := &keywardv1.AuditRecord{Seq: e.Seq, Node: e.Node, Operation: e.Op, Key: e.Key, KeyVersion: e.Version, ApiKeyId: e.APIKey,
		Items: uint32(e.Items), ContextSha256: e.ContextSHA256, Outcome: toOutcome(e.Outcome), Code: e.Code, Detail: e.Detail,
		Result: e.Result, StoreWrites: e.StoreWrites,
		Caller: &keywardv1.AuditCaller{Uid: e.Caller.UID, Gid: e.Caller.GID, Pid: uint32(e.Caller.PID), Exe: e.Caller.Exe, ExeSha256: e.Caller.SHA256, Cgroup: e.Caller.Cgroup}}
	if !e.Time.IsZero() {
		out.Time = timestamppb.New(e.Time)
	}
	for _, it := range e.Batch {
		out.Batch = append(out.Batch, &keywardv1.AuditItem{Key: it.Key, KeyVersion: it.Version, ContextSha256: it.ContextSHA256,
			Outcome: toOutcome(it.Outcome), Code: it.Code, Detail: it.Detail})
	}
	return out
}

// auditState is the log's state, as AuditLogState.
func (s *Server) auditState() *keywardv1.AuditLogState {
	st := s.cfg.AuditReader.State()
	out := &keywardv1.AuditLogState{Path: st.Path, SizeBytes: uint64(st.Size), LastSeq: st.LastSeq, LastCheckpointSeq: st.LastCheckpointSeq,
		LastCheckpointTime: timeOrNil(st.LastCheckpointTime)}
	if err := s.cfg.AuditReader.CheckpointErr(); err != nil {
		out.CheckpointError = err.Error()
	}
	return out
}

func (s *Server) VerifyAuditLog(ctx context.Context, _ *keywardv1.VerifyAuditLogRequest) (*keywardv1.VerifyAuditLogResponse, error) {
	if err := s.allowAudit(ctx, "AuditService.VerifyAuditLog"); err != nil {
		return nil, err
	}
	if err := s.auditOn(); err != nil {
		return nil, err
	}
	state := s.auditState()
	started := time.Now()
	rep, size, err := s.cfg.AuditReader.Verify(ctx)
	if err != nil {
		return nil, err
	}
	out := &keywardv1.VerifyAuditLogResponse{Ok: rep.BadLine == 0 && !rep.TailTooLong, Lines: rep.Lines, Records: rep.Records,
		Checkpoints: rep.Checkpoints, MacsChecked: true, Unverified: rep.Unverified, BadLine: rep.BadLine, Problem: rep.Problem,
		TailTooLong: rep.TailTooLong, VerifiedBytes: uint64(size), Duration: durationpb.New(time.Since(started)), State: state}
	c := callFrom(ctx)
	c.detail = fmt.Sprintf("%d lines, %d bytes: the chain and every checkpoint's MAC hold", rep.Lines, size)
	if !out.Ok {
		c.detail = fmt.Sprintf("%d lines, %d bytes: line %d fails: %s", rep.Lines, size, rep.BadLine, rep.Problem)
	}
	return out, nil
}
