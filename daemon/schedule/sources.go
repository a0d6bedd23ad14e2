package schedule

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/keys"
)

// KeySource schedules root and signing keys: enabled keys with a policy
// (a rule's or their own rotation period), whose names do not start with
// reserved (keywardd's own keys, which rotate only when asked).
func KeySource(km *keys.Manager, rules *Rules, reserved string) Source {
	return Source{Kind: Key,
		List: func() ([]Subject, error) {
			all, err := km.List()
			if err != nil {
				return nil, err
			}
			var out []Subject
			for _, k := range all {
				if k.State != keys.Enabled || len(k.Versions) == 0 || (reserved != "" && strings.HasPrefix(k.Name, reserved)) {
					continue
				}
				if p, ok := rules.ForKey(k.Name, k.RotationPeriod); ok {
					out = append(out, Subject{Kind: Key, ID: k.Name, Policy: p, Action: Rotate, Last: k.Versions[len(k.Versions)-1].Created})
				}
			}
			return out, nil
		},
		Run: func(ctx context.Context, s Subject) (string, error) {
			k, err := km.Rotate(ctx, s.ID)
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("version %d", k.Latest()), nil
		},
	}
}

// CredentialSource schedules managed credentials with a rotation period:
// their own policy, with their retry time after a failure.
func CredentialSource(cm *credentials.Manager) Source {
	return Source{Kind: Credential,
		List: func() ([]Subject, error) {
			all, err := cm.List()
			if err != nil {
				return nil, err
			}
			var out []Subject
			for _, r := range all {
				if r.State != credentials.Active || r.Current == nil || r.RotationPeriod <= 0 {
					continue
				}
				out = append(out, Subject{Kind: Credential, ID: r.Name, Action: Rotate, Last: r.Current.Activated, NotBefore: r.RetryAt,
					Policy: Policy{Name: "custom", Every: r.RotationPeriod, Overlap: r.Overlap}})
			}
			return out, nil
		},
		Run: func(ctx context.Context, s Subject) (string, error) {
			r, err := cm.Rotate(ctx, s.ID)
			if err != nil {
				return "", err
			}
			return "handle " + r.Current.Handle, nil
		},
	}
}

// APIKeySource schedules the API keys a rule gives a policy: active keys,
// last rotated when their newest secret was made. A run sends a reminder,
// or with Force sets the deadline: now plus the policy's overlap (an
// earlier deadline stays). Each run is audited; a deadline is announced
// with every run, but reminders reach an owner at most once per
// remindEvery, whatever the number of its keys that come due (a webhook
// pages a person, not once per key). Keys are
// listed every every-th Tick (each look reads every active key: about 1 s
// per 100 000).
func APIKeySource(akm *apikeys.Manager, rules *Rules, now func() time.Time, every int, remindEvery time.Duration) Source {
	notified := map[string]time.Time{} // owner -> last event; Ticks run one at a time
	return Source{Kind: APIKey, Every: every,
		List: func() ([]Subject, error) {
			if len(rules.APIKeys) == 0 {
				return nil, nil // no rule: no need to read every key
			}
			var out []Subject
			after := ""
			for {
				recs, next, err := akm.List(apikeys.Filter{State: apikeys.Active}, after, apikeys.MaxPageSize)
				if err != nil {
					return nil, err
				}
				for _, r := range recs {
					p, a, ok := rules.ForAPIKey(r.Owner, r.Environment, r.Tags)
					if !ok || len(r.Secrets) == 0 {
						continue
					}
					out = append(out, Subject{Kind: APIKey, ID: r.ID, Owner: r.Owner, Policy: p, Action: a, Last: r.Secrets[len(r.Secrets)-1].Created})
				}
				if next == "" {
					return out, nil
				}
				after = next
			}
		},
		Run: func(ctx context.Context, s Subject) (string, error) {
			detail := fmt.Sprintf("rotation policy %s (every %v): last rotated %s; rotate it (keyward apikey rotate -id %s)",
				s.Policy.Name, s.Policy.Every, s.Last.UTC().Format(time.RFC3339), s.ID)
			t := now()
			var deadline time.Time
			if s.Action == Force {
				deadline = t.Add(s.Policy.Overlap) // RotationDue names the one in force
			}
			// A deadline is always announced: a key must not stop working
			// before any notice named it. Reminders, once per owner.
			notify := s.Action == Force || t.Sub(notified[s.Owner]) >= remindEvery || t.Before(notified[s.Owner])
			if notify && s.Action != Force {
				detail += fmt.Sprintf("; other keys of %s due meanwhile are not announced again for %v: keyward rotation plan lists them", s.Owner, remindEvery)
			}
			detail, err := akm.RotationDue(s.ID, s.Last, deadline, detail, notify)
			if errors.Is(err, apikeys.ErrRotatedMeanwhile) {
				return "rotated meanwhile: nothing to do", nil
			} else if err != nil {
				return "", err
			}
			if notify {
				notified[s.Owner] = t
				return detail, nil
			}
			return detail + " (no event: " + s.Owner + " was told within " + remindEvery.String() + ")", nil
		},
	}
}
