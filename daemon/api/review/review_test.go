package review

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/audit"
)

// fileRecords reads the audit log at path, as keyward review -audit does.
func fileRecords(path string) func(fn func(audit.Record) error) error {
	return func(fn func(audit.Record) error) error {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		return audit.Records(f, fn)
	}
}

// TestReviewAudit: the review of an audit log finds in the audit log the
// callers whose calls were denied, and those whose calls fail far more
// often than the others', within the window; keywardd's own calls and
// older ones do not count.
func TestReviewAudit(t *testing.T) {
	var log strings.Builder
	seq := 0
	rec := func(age time.Duration, uid int, exe, op, outcome string) {
		seq++
		body, _ := json.Marshal(map[string]any{"time": time.Now().Add(-age), "caller": map[string]any{"uid": uid, "gid": uid, "exe": exe}, "op": op, "outcome": outcome})
		fmt.Fprintf(&log, `{"seq":%d,"prev":"","kind":"record","body":%s,"hash":""}`+"\n", seq, body)
	}
	for i := range 40 {
		outcome := "ok"
		if i < 2 {
			outcome = "denied"
		}
		rec(time.Hour, 1000, "/usr/bin/shop", "KeyService.CreateKey", outcome)
	}
	for i := range 25 {
		outcome := "ok"
		if i < 15 {
			outcome = "error"
		}
		rec(time.Hour, 1001, "/usr/bin/batch", "EnvelopeService.Decrypt", outcome)
	}
	for range 5 {
		rec(90*24*time.Hour, 1002, "/usr/bin/old", "KeyService.GetKey", "denied") // before the window
	}
	rec(time.Hour, 0, "/usr/sbin/keywardd", "keywardd.RotateKey", "error") // keywardd's own
	fmt.Fprintf(&log, `{"seq":%d,"prev":"","kind":"checkpoint","body":{"key":"keyward-audit v1","mac":"00"},"hash":""}`+"\n", seq+1)
	path := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(path, []byte(log.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	got := map[string]string{}
	err := auditFindings(fileRecords(path), time.Now().Add(-720*time.Hour), func(check, subject, format string, a ...any) {
		got[check+" "+subject] = fmt.Sprintf(format, a...)
	})
	if err != nil {
		t.Fatal(err)
	}
	if d := got["denied calls by caller uid 1000 /usr/bin/shop"]; !strings.Contains(d, "2 of 40 calls denied") || !strings.Contains(d, "KeyService.CreateKey 2") {
		t.Errorf("denied calls: %v", got)
	}
	if d := got["error-rate outlier uid 1001 /usr/bin/batch"]; !strings.Contains(d, "15 of 25 calls failed") {
		t.Errorf("outlier: %v", got)
	}
	if len(got) != 2 {
		t.Errorf("findings from the audit log: %v; want the two above only", got)
	}
	if err := os.WriteFile(path, []byte("not json\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := auditFindings(fileRecords(path), time.Now().Add(-720*time.Hour), func(string, string, string, ...any) {}); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a broken audit log: %v", err)
	}
}
