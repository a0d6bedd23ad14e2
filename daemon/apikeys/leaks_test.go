package apikeys

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
)

// events are the outbox's events, oldest first.
func (f *fixture) events(t *testing.T) []outbox.Event {
	t.Helper()
	var out []outbox.Event
	err := f.store.ForEach(store.BucketOutbox, "", func(_ string, b []byte) error {
		var e outbox.Event
		if err := json.Unmarshal(b, &e); err != nil {
			return err
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func kinds(es []outbox.Event) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Kind+":"+e.ID+":"+e.Subject)
	}
	return out
}

func TestReportLeak(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	other, _ := f.create(t, spec())
	leak := Leak{Source: "github:content", URL: "https://example.com/repo/blob/x/.env\x1b[31m", Type: "keyward_api_key"}
	ctx := context.Background()

	// False positives first: nothing is written, and a malformed string
	// costs no HSM call.
	unknown := mustKey(t, "kwtest")
	for _, tc := range []struct {
		name, s, reason string
		hsmCalls        int
	}{
		{"malformed", key[:len(key)-1] + "x", "not an API key", 0},
		{"other prefix", mustKey(t, "other"), "not a key of this daemon", 0},
		{"unknown", unknown, "no such key", 0}, // no hint: refused after one store read
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.mac.calls()
			v, err := f.m.ReportLeak(ctx, tc.s, leak, nil)
			if err != nil || v.TruePositive || !strings.Contains(v.Reason, tc.reason) || v.KeyID != "" {
				t.Fatalf("ReportLeak = %+v, %v; want a false positive saying %q", v, err, tc.reason)
			}
			if strings.Contains(v.Reason, tc.s) {
				t.Fatalf("the reason echoes the reported string: %q", v.Reason)
			}
			if n := f.mac.calls() - before; n != tc.hsmCalls {
				t.Fatalf("%d HSM calls, want %d", n, tc.hsmCalls)
			}
		})
	}
	if es := f.events(t); len(es) != 0 {
		t.Fatalf("false positives wrote events: %v", kinds(es))
	}

	// A policy that refuses the owner: nothing done.
	denied := errors.New("not yours")
	if _, err := f.m.ReportLeak(ctx, key, leak, func(id, owner string) error {
		if owner != "team-a" || id != rec.ID {
			t.Errorf("allow asked about %q", owner)
		}
		return denied
	}); !errors.Is(err, denied) {
		t.Fatalf("ReportLeak with a refusing allow = %v, want its error", err)
	}
	f.verify(t, key, prod, Valid)

	v, err := f.m.ReportLeak(ctx, key, leak, nil)
	if err != nil || !v.TruePositive || !v.Changed || v.KeyID != rec.ID || v.Owner != "team-a" || v.State != StateRevoked || v.Retired {
		t.Fatalf("ReportLeak = %+v, %v; want a true positive revoking %s", v, err, rec.ID)
	}
	// Revoked within the call, for the next verify (the digest and record
	// caches included), and the other key of the owner untouched.
	f.verify(t, key, prod, Revoked)
	f.verify(t, other, prod, Valid)
	es := f.events(t)
	if got := kinds(es); len(got) != 2 || got[0] != "api_key:"+rec.ID+":team-a" || got[1] != "api_key_leaked:"+rec.ID+":team-a" {
		t.Fatalf("events = %v, want the revocation and the leak, for the owner", got)
	}
	d := es[1].Detail
	if !strings.Contains(d, "found by github:content as keyward_api_key at https://example.com/repo/blob/x/.env?[31m") ||
		!strings.Contains(d, "revoked") || strings.Contains(d, key) || strings.ContainsRune(d, '\x1b') {
		t.Fatalf("leak event detail = %q", d)
	}

	// A replay: still a true positive, nothing written again.
	v, err = f.m.ReportLeak(ctx, key, leak, nil)
	if err != nil || !v.TruePositive || v.Changed || !strings.Contains(v.Reason, "already revoked") {
		t.Fatalf("replayed ReportLeak = %+v, %v", v, err)
	}
	if n := len(f.events(t)); n != 2 {
		t.Fatalf("a replay wrote events: %d, want 2", n)
	}
}

// mustKey is a well-formed key nobody issued.
func mustKey(t *testing.T, prefix string) string {
	t.Helper()
	k, err := Generate(prefix, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestReportLeakRetiredSecret(t *testing.T) {
	f := newFixture(t)
	old, rec := f.create(t, spec())
	ctx := context.Background()
	cur, _, err := f.m.Rotate(ctx, rec.ID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f.clk.add(2 * time.Hour) // the old secret's overlap is over
	f.verify(t, old, prod, Expired)
	v, err := f.m.ReportLeak(ctx, old, Leak{Source: "report-leak"}, nil)
	if err != nil || !v.TruePositive || !v.Retired || !v.Changed || !strings.Contains(v.Reason, "no longer working since") {
		t.Fatalf("ReportLeak(retired) = %+v, %v", v, err)
	}
	// Fail closed: the current secret stops too.
	f.verify(t, cur, prod, Revoked)
}

func TestReportLeakDisable(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	m, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, LeakAction: LeakDisable})
	if err != nil {
		t.Fatal(err)
	}
	f.m = m
	ctx := context.Background()
	v, err := m.ReportLeak(ctx, key, Leak{Source: "report-leak"}, nil)
	if err != nil || !v.TruePositive || !v.Changed || v.State != StateDisabled || !strings.Contains(v.Reason, "-enable") {
		t.Fatalf("ReportLeak = %+v, %v; want the key disabled", v, err)
	}
	f.verify(t, key, prod, Disabled)
	if got := kinds(f.events(t)); len(got) != 1 || got[0] != "api_key_leaked:"+rec.ID+":team-a" {
		t.Fatalf("events = %v, want the leak alone (no revocation)", got)
	}
	if v, _ := m.ReportLeak(ctx, key, Leak{}, nil); v.Changed || !v.TruePositive {
		t.Fatalf("a second report changed the disabled key again: %+v", v)
	}
	// Enabled again by someone (without rotating): a new report stops it
	// again, and says so.
	active := Active
	if _, err := m.Update(rec.ID, Change{State: &active}, true); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.ReportLeak(ctx, key, Leak{}, nil); !v.Changed || v.State != StateDisabled {
		t.Fatalf("a report of a re-enabled key = %+v, want it disabled again", v)
	}
	if _, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", LeakAction: "delete"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("NewManager with leak action delete = %v, want ErrInvalid", err)
	}
}

func TestCleanField(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"plain", "plain"},
		{"a\nb\x00c\u202ed", "a?b?c?d"},
		{strings.Repeat("é", 100), strings.Repeat("é", 64) + "…"},
	} {
		if got := cleanField(tc.in, 128); got != tc.want {
			t.Errorf("cleanField(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestLeakDescribe(t *testing.T) {
	long := strings.Repeat("s", 300)
	for _, tc := range []struct {
		l    Leak
		want string
	}{
		{Leak{}, "found by an unnamed finder"},
		{Leak{Source: "github:content", Type: "t", URL: "https://x/y"}, "found by github:content as t at https://x/y"},
		// The reporter survives a source at its bound.
		{Leak{Source: long, Reporter: "uid 1000"}, "found by " + long[:128] + "… (reported by uid 1000)"},
	} {
		if got := tc.l.Describe(); got != tc.want {
			t.Errorf("Describe(%+v) = %q, want %q", tc.l, got, tc.want)
		}
	}
}
