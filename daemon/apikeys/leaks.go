package apikeys

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
)

// LeakAction is what a confirmed leak does to its key.
type LeakAction string

// The leak actions (leaks.action in keywardd.yaml).
const (
	// LeakRevoke revokes the key: final, the default.
	LeakRevoke LeakAction = "revoke"
	// LeakDisable disables the key: refused until someone who may widen
	// it enables it again (after rotating it: the leaked secret is still
	// one of its secrets).
	LeakDisable LeakAction = "disable"
)

// Leak says who found a secret and where; never the secret. Its fields
// come from outside (a scanner, a caller) and are cleaned (control
// characters replaced, bounded) before they reach an event or a record.
type Leak struct {
	Source string // who found it: "github:content", "report-leak" and the caller
	URL    string // where, if known
	Type   string // the finder's name for the secret's type, if any
	// Reporter is who passed the report on, if not the finder (a caller
	// of keywardd: "uid 1000"); set by keywardd, not the reporter.
	Reporter string
}

// LeakVerdict is the answer to a report.
type LeakVerdict struct {
	// TruePositive: the string is a secret of a key of this daemon, current
	// or rotated out (still in the record: see RotatedGrace).
	TruePositive bool
	// Reason says why, in words; never the secret.
	Reason string
	// KeyID and Owner name the key of a true positive.
	KeyID, Owner string
	// Retired: the secret was a rotated-out one, not the key's current.
	Retired bool
	// Changed: this report stopped the key, and its event was written. A
	// report of a key already stopped (a replay, a second finder) changes
	// nothing and writes no event.
	Changed bool
	// State is the key's state after the report.
	State State
}

// Bounds on a report's fields as recorded.
const (
	maxLeakURL   = 512
	maxLeakField = 128
)

// cleanField is s made fit for an event or an audit record: control and
// format characters replaced by '?', at most n bytes (cut on a rune).
func cleanField(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || r == unicode.ReplacementChar {
			return '?'
		}
		return r
	}, s)
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8Start(s[n]) {
		n--
	}
	return s[:n] + "…"
}

func utf8Start(b byte) bool { return b&0xC0 != 0x80 }

// Describe is the leak in words, for an event's and an audit record's
// detail.
func (l Leak) Describe() string {
	var b strings.Builder
	b.WriteString("found by ")
	if l.Source == "" {
		b.WriteString("an unnamed finder")
	} else {
		b.WriteString(cleanField(l.Source, maxLeakField))
	}
	if l.Reporter != "" {
		fmt.Fprintf(&b, " (reported by %s)", cleanField(l.Reporter, maxLeakField))
	}
	if l.Type != "" {
		fmt.Fprintf(&b, " as %s", cleanField(l.Type, maxLeakField))
	}
	if l.URL != "" {
		fmt.Fprintf(&b, " at %s", cleanField(l.URL, maxLeakURL))
	}
	return b.String()
}

// errLeakGone: the key or its secret went between the lookup and the
// write (a rotation pruned the reported secret): the report found nothing.
var errLeakGone = errors.New("apikeys: the secret left the key meanwhile")

// ReportLeak acts on a report that presented, a string someone found, is
// an API key of this daemon. The checksum is checked first: a malformed
// string or one of another prefix is a false positive at once, without a
// lookup. A well-formed one is looked up as Verify does (digest cache,
// hint, HSM HMAC); a key nobody issued, or a secret the key forgot (past
// RotatedGrace or MaxSecrets), is a false positive.
//
// A secret the key has, current or rotated out, is a true positive: in
// one store transaction the key is revoked (or disabled, Options.LeakAction)
// and its events written for the plugins: APIKeyLeaked for the owner and,
// on a revocation, APIKeyRevoked as every revocation sends. A retired
// secret stops the key too: it no longer works, but whoever leaked it has
// most likely leaked its successor the same way, so the key fails closed.
// A key already stopped (revoked; or disabled, when the action disables)
// is left alone and no event is written: a report is idempotent.
//
// allow, if set, is asked about the key (its ID and owner) before anything is
// written; its error is returned as it is (a caller not granted the
// operation on that owner). The audit record is the caller's to write,
// after: see docs/leaks.md for what holds when it fails.
func (m *Manager) ReportLeak(ctx context.Context, presented string, l Leak, allow func(id, owner string) error) (LeakVerdict, error) {
	prefix, err := Parse(presented)
	if err != nil {
		return LeakVerdict{Reason: "not an API key: " + err.Error()}, nil
	}
	if prefix != m.prefix {
		return LeakVerdict{Reason: fmt.Sprintf("not a key of this daemon (its keys start %s_)", m.prefix)}, nil
	}
	k, _, found, err := m.find(ctx, presented, sha256.Sum256([]byte(presented)))
	if err != nil {
		return LeakVerdict{}, fmt.Errorf("apikeys: looking the reported key up: %w", err)
	}
	if !found {
		return LeakVerdict{Reason: "no such key"}, nil
	}
	rec, err := m.load(k.ref.ID)
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalid) {
		return LeakVerdict{Reason: "no such key"}, nil
	}
	if err != nil {
		return LeakVerdict{}, err
	}
	if secretOf(rec, k.mac) < 0 {
		return LeakVerdict{Reason: "no such key"}, nil
	}
	if allow != nil {
		if err := allow(rec.ID, rec.Owner); err != nil {
			return LeakVerdict{}, err
		}
	}
	v, err := m.stopLeaked(rec.ID, k.mac, l)
	if errors.Is(err, errLeakGone) {
		return LeakVerdict{Reason: "no such key"}, nil
	}
	return v, err
}

// stopLeaked stops the key id whose secret of MAC mac leaked, with its
// events, in one transaction, on the record as the store holds it then.
func (m *Manager) stopLeaked(id string, mac []byte, l Leak) (LeakVerdict, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forget(id)
	v := LeakVerdict{TruePositive: true, KeyID: id}
	now := m.now().UTC()
	err := m.store.UpdateEachEmit(store.BucketAPIKeys, []string{id}, func(id string, old []byte) ([]byte, [][]byte, error) {
		if old == nil {
			return nil, nil, errLeakGone
		}
		r, err := decode(id, old)
		if err != nil {
			return nil, nil, err
		}
		i := secretOf(r, mac)
		if i < 0 {
			return nil, nil, errLeakGone
		}
		v.Owner, v.State, v.Changed = r.Owner, r.State, false
		which := "the key's current secret"
		if v.Retired = i < len(r.Secrets)-1; v.Retired {
			s := r.Secrets[i]
			if !s.NotAfter.IsZero() && !s.NotAfter.After(now) {
				which = fmt.Sprintf("a rotated-out secret of the key, no longer working since %s", s.NotAfter.Format(time.RFC3339))
			} else {
				which = "a rotated-out secret of the key, still in its overlap"
			}
		}
		switch {
		case r.State == StateRevoked:
			v.Reason = fmt.Sprintf("%s; it was already revoked, nothing done", which)
			return old, nil, nil
		case r.State == StateDisabled && m.leakAction == LeakDisable:
			v.Reason = fmt.Sprintf("%s; it was already disabled, nothing done", which)
			return old, nil, nil
		}
		if q := m.quotas[id]; q != nil {
			r.Quota = q
		}
		events := [][]byte{}
		if m.leakAction == LeakDisable {
			r.State = StateDisabled
			v.Reason = fmt.Sprintf("%s; keywardd disabled the key (leaks.action: disable): rotate it, then enable it with keyward apikey update -id %s -enable", which, id)
		} else {
			r.State = StateRevoked
			v.Reason = fmt.Sprintf("%s; keywardd revoked the key (leaks.action: revoke): issue a new one", which)
			events = append(events, outbox.Encode(outbox.Event{Kind: outbox.APIKeyRevoked, ID: id, Subject: r.Owner, Time: now}))
		}
		v.State, v.Changed = r.State, true
		events = append(events, outbox.Encode(outbox.Event{Kind: outbox.APIKeyLeaked, ID: id, Subject: r.Owner, Time: now,
			Detail: l.Describe() + ": " + v.Reason}))
		b, err := json.Marshal(r)
		return b, events, err
	})
	if err != nil {
		return LeakVerdict{}, err
	}
	if v.Changed {
		delete(m.quotas, id) // saved with the record
		if v.State == StateRevoked {
			m.lim.Forget(id)
		}
	}
	return v, nil
}
