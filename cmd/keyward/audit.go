package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/hsm"
)

// hsmFlags are the flags that open an HSM token: the PIN comes from a file
// or a variable, never a flag (it would show in the process list).
func hsmFlags(f *flagSet, module string) *hsm.Config {
	var cfg hsm.Config
	f.StringVar(&cfg.Module, "module", "", module)
	f.StringVar(&cfg.Token, "token", "", "label of the token")
	f.StringVar(&cfg.URI, "uri", "", "RFC 7512 PKCS#11 URI of the token, instead of -token (pkcs11:token=...;serial=...)")
	f.StringVar(&cfg.PINFile, "pin-file", "", "file holding the user PIN")
	f.StringVar(&cfg.PINEnv, "pin-env", "", "environment variable holding the user PIN")
	return &cfg
}

// auditReport is audit verify's answer.
type auditReport struct {
	File        string `json:"file"`
	OK          bool   `json:"ok"`
	Records     uint64 `json:"records"`
	Checkpoints uint64 `json:"checkpoints"`
	MACsChecked bool   `json:"macsChecked"` // with the HSM: every checkpoint's MAC was checked
	Unverified  uint64 `json:"unverified"`  // records after the last checkpoint: chained, not yet MACed
	BadLine     uint64 `json:"badLine"`     // the first line that fails, 0 if none
	Problem     string `json:"problem"`     // why
}

// auditVerify checks an audit log's chain, and with the HSM its checkpoint
// MACs, and names the first bad line: the FILE given, or, without one,
// keywardd's own log, which keywardd checks with its HSM key
// (VerifyAuditLog).
func auditVerify(f *flagSet) action {
	cfg := hsmFlags(f, "PKCS#11 library, to check the checkpoint MACs of FILE")
	received := f.Bool("received", false, "FILE is what a receiver got from an audit sink (its newline-JSON lines, or a syslog file): say what is missing, altered, reordered or filtered")
	var o audit.ReceivedOptions
	f.BoolVar(&o.Filtered, "filtered", false, "with -received: the sink has a filter (exclude_ops), so stubs are the records it left out; without it a stub is a fault (a record may have been replaced at the receiver)")
	f.BoolVar(&o.AnyOrder, "any-order", false, "with -received: the lines carry no arrival order (a SIEM's export, newest first): do not check it")
	f.Uint64Var(&o.From, "from", 0, "with -received: the first seq the receiver should hold; records absent before the first received are missing")
	f.Uint64Var(&o.Through, "through", 0, "with -received: the last seq the receiver should hold (keywardd's last, or the last it had shipped); records absent after the last received are missing")
	return func(e *env, args []string) error {
		if *received && len(args) == 0 {
			return usageError{msg: "-received checks a FILE a receiver got from an audit sink: name it"}
		}
		for _, name := range []string{"filtered", "any-order", "from", "through"} {
			if f.Changed(name) && !*received {
				return usageError{msg: "-" + name + " is for what a receiver got: add -received"}
			}
		}
		if o.From != 0 && o.Through != 0 && o.From > o.Through {
			return usageError{msg: fmt.Sprintf("-from %d is after -through %d: the range the receiver should hold starts at -from", o.From, o.Through)}
		}
		if len(args) == 0 {
			for _, name := range []string{"module", "token", "uri", "pin-file", "pin-env"} {
				if f.Changed(name) {
					return usageError{msg: "-" + name + " is for a FILE: without one, keywardd checks its own log with its own HSM"}
				}
			}
			return e.verifyDaemonAudit()
		}
		path := args[0]
		file, err := os.Open(path)
		if err != nil {
			return err
		}
		defer file.Close()
		var mac audit.MACer
		if cfg.Module != "" {
			h, err := hsm.Open(*cfg)
			if err != nil {
				return err
			}
			defer h.Close()
			mac = h
		}
		if *received {
			rep, err := audit.VerifyReceivedWith(e.ctx, file, mac, o)
			if err != nil {
				return err
			}
			return e.showReceived(receivedReport{File: path, OK: rep.OK(), AnyOrder: o.AnyOrder, Received: rep})
		}
		rep, err := audit.Verify(e.ctx, file, mac)
		if err != nil {
			return err
		}
		out := auditReport{File: path, OK: rep.BadLine == 0 && !rep.TailTooLong, Records: rep.Records, Checkpoints: rep.Checkpoints,
			MACsChecked: mac != nil, Unverified: rep.Unverified, BadLine: rep.BadLine}
		if !out.OK {
			out.Problem = rep.Problem
		}
		return e.showAuditReport(out)
	}
}

// receivedReport is audit verify -received's answer.
type receivedReport struct {
	File     string `json:"file"`
	OK       bool   `json:"ok"`
	AnyOrder bool   `json:"anyOrder"` // the order of the lines was not checked
	audit.Received
}

// showReceived prints what a receiver got, and fails unless it is whole
// from its first line to its last, in order and unchanged.
func (e *env) showReceived(r receivedReport) error {
	if e.output.json() {
		if err := e.printJSON(r); err != nil {
			return err
		}
	}
	var faults []string
	for _, m := range r.Missing {
		if m.From == m.To {
			faults = append(faults, fmt.Sprintf("seq %d is missing", m.From))
		} else {
			faults = append(faults, fmt.Sprintf("seq %d to %d are missing", m.From, m.To))
		}
	}
	for _, a := range r.Altered {
		faults = append(faults, fmt.Sprintf("seq %d was altered: %s", a.Seq, a.Why))
	}
	for _, m := range r.Malformed {
		faults = append(faults, fmt.Sprintf("line %d: %s", m.Line, m.Why))
	}
	if r.Reordered > 0 {
		faults = append(faults, fmt.Sprintf("%d lines came after a line of a higher seq, the first seq %d: reordered (the chain holds once sorted; add -any-order for an export that keeps no arrival order)", r.Reordered, r.FirstReordered))
	}
	if r.Filtered > 0 && !r.StubsExpected {
		faults = append(faults, fmt.Sprintf("%d records are stubs (their place in the chain, not their content), at seq %s, and the sink was not said to filter: a record may have been replaced at the receiver (add -filtered if the sink has exclude_ops)", r.Filtered, seqRanges(r.Stubs)))
	}
	if r.TailTooLong {
		faults = append(faults, fmt.Sprintf("the last %d records follow no checked checkpoint, more than keywardd leaves (%d) while its HSM works: the end of the stream was cut or rewritten, or the HSM could not MAC for a long time", r.Unverified, audit.MaxTail))
	}
	if len(faults) > 0 {
		return fmt.Errorf("%s: %s", r.File, strings.Join(faults, "; "))
	}
	if e.output.json() {
		return nil
	}
	if r.Lines == 0 {
		_, err := fmt.Fprintf(e.stdout, "%s: no audit line received\n", r.File)
		return err
	}
	whole := "whole and in order"
	if r.AnyOrder {
		whole = "whole (its order not checked)"
	}
	fmt.Fprintf(e.stdout, "%s: seq %d to %d, %s: %d records and %d checkpoints hold", r.File, r.FirstSeq, r.LastSeq, whole, r.Records, r.Checkpoints)
	if r.Filtered > 0 {
		fmt.Fprintf(e.stdout, "; %d records are stubs, taken for records the sink's filter left out (their place in the chain holds, not their content)", r.Filtered)
	}
	if r.Duplicates > 0 {
		fmt.Fprintf(e.stdout, "; %d lines received twice (shipped again after a retry)", r.Duplicates)
	}
	return printMACState(e.stdout, r.MACsChecked, r.Unverified)
}

// seqRanges prints runs of seqs: 3, 5-9, 12; the first 10 runs and how
// many more.
func seqRanges(rs []audit.SeqRange) string {
	var parts []string
	for i, r := range rs {
		if i == 10 {
			parts = append(parts, fmt.Sprintf("and %d runs more", len(rs)-i))
			break
		}
		if r.From == r.To {
			parts = append(parts, fmt.Sprint(r.From))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", r.From, r.To))
		}
	}
	return strings.Join(parts, ", ")
}

// verifyDaemonAudit has keywardd verify its own audit log.
func (e *env) verifyDaemonAudit() error {
	v, err := e.api.Audit.VerifyAuditLog(e.ctx, &keywardv1.VerifyAuditLogRequest{})
	if err != nil {
		return err
	}
	out := auditReport{File: v.GetState().GetPath(), OK: v.GetOk(), Records: v.GetRecords(), Checkpoints: v.GetCheckpoints(),
		MACsChecked: v.GetMacsChecked(), Unverified: v.GetUnverified(), BadLine: v.GetBadLine()}
	if !out.OK {
		out.Problem = v.GetProblem()
	}
	return e.showAuditReport(out)
}

// showAuditReport prints a verification's report, and fails unless the
// log holds.
func (e *env) showAuditReport(out auditReport) error {
	if e.output.json() {
		if err := e.printJSON(out); err != nil {
			return err
		}
	}
	switch {
	case out.BadLine != 0:
		return fmt.Errorf("%s: line %d: %s (%d lines before it hold)", out.File, out.BadLine, out.Problem, out.BadLine-1)
	case !out.OK:
		return fmt.Errorf("%s: %s", out.File, out.Problem)
	case e.output.json():
		return nil
	}
	return printAuditReport(e.stdout, out)
}

// auditList prints the records of keywardd's audit log the flags select,
// newest first, a page after another until -limit.
func auditList(f *flagSet) action {
	var since, until agoFlag
	f.Var(&since, "since", "records at or after this time: RFC 3339 (2027-01-31T00:00:00Z), or a duration ago (1h, 30m)")
	f.Var(&until, "until", "records before this time: RFC 3339, or a duration ago")
	op := f.String("op", "", "the operation: exact, a glob (APIKeyService.*, keywardd.*) or a prefix ending in .")
	outcome := f.Enum("outcome", "the outcome", keywardv1.AuditOutcome_name, "AUDIT_OUTCOME_")
	uid := f.Uint32("uid", 0, "the caller's uid")
	subject := f.String("subject", "", "the key, API key ID or batch item's key: exact, or a glob (orders-*)")
	limit := f.Int("limit", 100, "the most records to print (0: every one; a large log takes a while)")
	token := f.String("page-token", "", "go on from a previous listing's next page token")
	return func(e *env, _ []string) error {
		if *limit < 0 {
			return usageError{msg: "-limit is 0 (every record) or more"}
		}
		req := &keywardv1.ListAuditRecordsRequest{SinceTime: since.timestamp(), UntilTime: until.timestamp(), Operation: *op,
			Outcome: keywardv1.AuditOutcome(*outcome), Subject: *subject, PageToken: *token}
		if f.Changed("uid") {
			req.CallerUid = uid
		}
		all := &keywardv1.ListAuditRecordsResponse{}
		for {
			req.PageSize = audit.MaxPageSize
			if *limit > 0 {
				req.PageSize = uint32(min(*limit-len(all.Records), audit.MaxPageSize))
			}
			r, err := e.api.Audit.ListAuditRecords(e.ctx, req)
			if err != nil {
				return err
			}
			if all.State == nil {
				all.State = r.GetState()
			}
			all.Records = append(all.Records, r.GetRecords()...)
			all.ScannedBytes += r.GetScannedBytes()
			all.NextPageToken, all.ScanLimited = r.GetNextPageToken(), r.GetScanLimited()
			if req.PageToken = r.GetNextPageToken(); req.PageToken == "" || (*limit > 0 && len(all.Records) >= *limit) {
				break
			}
		}
		if all.NextPageToken != "" {
			fmt.Fprintf(e.stderr, "keyward: more records may follow: add -page-token %s for the next ones\n", all.NextPageToken)
		}
		return e.show(all, func(w io.Writer) error {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SEQ\tTIME\tUID\tOPERATION\tSUBJECT\tOUTCOME\tDETAIL")
			for _, r := range all.GetRecords() {
				fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\n", r.GetSeq(), timeOr(r.GetTime(), "-"), r.GetCaller().GetUid(), r.GetOperation(),
					auditSubject(r), short(r.GetOutcome(), "AUDIT_OUTCOME_"), auditDetail(r))
			}
			return tw.Flush()
		})
	}
}

// auditSubject is what a record is about, in a table.
func auditSubject(r *keywardv1.AuditRecord) string {
	var parts []string
	if r.GetKey() != "" {
		s := r.GetKey()
		if r.GetKeyVersion() != 0 {
			s += fmt.Sprintf(" v%d", r.GetKeyVersion())
		}
		parts = append(parts, s)
	}
	if r.GetApiKeyId() != "" {
		parts = append(parts, r.GetApiKeyId())
	}
	if n := len(r.GetBatch()); n > 0 {
		parts = append(parts, fmt.Sprintf("%d items", n))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

// auditDetail is a record's code and detail, in a table: one line, cut
// to 100 characters (--output json has it whole).
func auditDetail(r *keywardv1.AuditRecord) string {
	s := r.GetDetail()
	if r.GetCode() != "" {
		s = r.GetCode() + ": " + s
	}
	if r.GetResult() != "" {
		s = strings.TrimSpace(r.GetResult() + " " + s)
	}
	s = strings.Join(strings.Fields(s), " ")
	if rs := []rune(s); len(rs) > 100 {
		s = string(rs[:99]) + "…"
	}
	return s
}

// agoFlag is a time: RFC 3339 (as timeFlag), or a duration before now.
type agoFlag struct{ timeFlag }

func (f *agoFlag) Set(s string) error {
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		f.t = time.Now().Add(-d)
		return nil
	}
	if f.timeFlag.Set(s) != nil {
		return fmt.Errorf("%q is neither an RFC 3339 time (2027-01-31T00:00:00Z) nor a duration ago (1h)", s)
	}
	return nil
}

func (f *agoFlag) timestamp() *timestamppb.Timestamp {
	if f.t.IsZero() {
		return nil
	}
	return timestamppb.New(f.t)
}

func printAuditReport(w io.Writer, r auditReport) error {
	fmt.Fprintf(w, "%s: %d records and %d checkpoints hold", r.File, r.Records, r.Checkpoints)
	return printMACState(w, r.MACsChecked, r.Unverified)
}

// printMACState ends a verification's line with what the MACs say.
func printMACState(w io.Writer, checked bool, unverified uint64) error {
	var err error
	switch {
	case !checked:
		_, err = fmt.Fprintln(w, "; the chain is intact, but without -module/-token/-pin-file the checkpoint MACs were not checked")
	case unverified > 0:
		_, err = fmt.Fprintf(w, "; the last %d records follow the last checkpoint and are chained but not yet MACed\n", unverified)
	default:
		_, err = fmt.Fprintln(w, "; every record is covered by a checked MAC")
	}
	return err
}
