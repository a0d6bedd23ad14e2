package daemon

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/names"
)

// The kinds of name the survey reports, as GetStatus counts them.
const (
	kindKey         = "key"
	kindCredential  = "credential"
	kindOwner       = "api_key_owner"
	kindEnvironment = "api_key_environment"
	kindTag         = "api_key_tag"
	kindPlugin      = "plugin"
)

// renameHow says, by kind, what an operator does with a name that is not
// canonical; docs/operations.md says it at length. There is no rename call:
// every one of these names is part of what a record means (the HSM label of
// a key, the owner a policy matched when the key was issued).
var renameHow = map[string]string{
	kindKey:         "create the canonical key, move to it (ReEncrypt with destination_key_name; new tokens from it), then disable and schedule the deletion of this one",
	kindCredential:  "register the credential under the canonical name, point its readers to it, then revoke this one",
	kindOwner:       "issue each of its API keys again under the canonical owner, hand them over, then revoke the old ones (keyward apikey list -owner NAME)",
	kindEnvironment: "issue the API keys of this environment again under the canonical one, move their verifiers to it, then revoke the old ones",
	kindTag:         "issue the API keys with this tag again with the canonical tag, then revoke the old ones; until then filter on both spellings",
	kindPlugin:      "build the plugin under a new name of another canonical form (keywardd refuses two plugins of one canonical form, so not the canonical name while this one is configured), configure it beside this one, register its credentials again under it, then remove this one",
}

// surveyPause is the survey's least pause between pages of 1000 API keys;
// it rests nine times as long as the page took to read (6 ms from memory,
// several times that when the store's pages must first come from the disk,
// as at the start of a large store): the survey takes a tenth of one core
// at most, and the calls served meanwhile the rest. A store of a million
// API keys is surveyed in a few minutes; until then GetStatus counts none.
const surveyPause = 5 * time.Millisecond

// maxNameWarnings bounds the names logged one by one; the summary counts
// them all.
const maxNameWarnings = 100

// legacyNames are the names in use that are not in their canonical form
// (daemon/names): stored, or configured, before keywardd refused to create
// them. keywardd serves them as ever; at start it finds them, in the
// background (a store may hold a million API keys), logs each with what to
// do, and GetStatus counts them by kind.
type legacyNames struct {
	mu     sync.Mutex
	counts map[string]int // by kind; nil until the survey is done
}

// legacyName is one name found, and how many records use it.
type legacyName struct {
	kind, name string
	uses       int
}

// Counts is how many names of each kind are not canonical; nil while the
// survey runs.
func (l *legacyNames) Counts() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.counts)
}

// survey finds the names, logs them and keeps their counts. Keys pending
// deletion, revoked credentials and revoked API keys are left out: they
// are on their way out already.
func (l *legacyNames) survey(ctx context.Context, km *keys.Manager, akm *apikeys.Manager, cm *credentials.Manager, plugins []PluginConfig, log *slog.Logger) {
	found, err := findLegacyNames(ctx, km, akm, cm, plugins)
	if ctx.Err() != nil {
		return // stopping: the store may be closed under the survey
	}
	if err != nil {
		log.Error("looking for names not in their canonical form failed; GetStatus counts none", "error", err.Error())
	}
	counts := map[string]int{}
	for _, n := range found {
		counts[n.kind]++
	}
	l.mu.Lock()
	l.counts = counts
	l.mu.Unlock()
	if len(found) == 0 {
		return
	}
	log.Warn("names not in their canonical form (case-folded, no invisible characters, no trailing dot, dash or space): keywardd serves them but creates no new ones; rename them (docs/operations.md)", "counts", counts)
	for i, n := range found {
		if i == maxNameWarnings {
			log.Warn("more names not in their canonical form are not listed", "more", len(found)-i)
			break
		}
		log.Warn("a name is not in its canonical form", "kind", n.kind, "name", n.name, "canonical", names.Canonical(n.name), "uses", n.uses, "how", renameHow[n.kind])
	}
}

// findLegacyNames lists the names in use that are not canonical, by kind
// then name.
func findLegacyNames(ctx context.Context, km *keys.Manager, akm *apikeys.Manager, cm *credentials.Manager, plugins []PluginConfig) ([]legacyName, error) {
	uses := map[legacyName]int{} // by kind and name
	note := func(kind, name string) {
		if !names.IsCanonical(name) {
			uses[legacyName{kind: kind, name: name}]++
		}
	}
	for _, p := range plugins {
		note(kindPlugin, p.Name)
	}
	all, err := km.List()
	if err != nil {
		return nil, fmt.Errorf("keys: %w", err)
	}
	for _, k := range all {
		if k.State != keys.PendingDeletion {
			note(kindKey, k.Name)
		}
	}
	creds, err := cm.List()
	if err != nil {
		return nil, fmt.Errorf("credentials: %w", err)
	}
	for _, c := range creds {
		if c.State != credentials.Revoked {
			note(kindCredential, c.Name)
		}
	}
	for after := ""; ; {
		t0 := time.Now()
		page, next, err := akm.List(apikeys.Filter{}, after, apikeys.MaxPageSize)
		if err != nil {
			return nil, fmt.Errorf("API keys: %w", err)
		}
		for _, r := range page {
			if r.State == apikeys.StateRevoked {
				continue
			}
			note(kindOwner, r.Owner)
			note(kindEnvironment, r.Environment)
			for _, t := range r.Tags {
				note(kindTag, t)
			}
		}
		if next == "" {
			break
		}
		after = next
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(max(surveyPause, 9*time.Since(t0))):
		}
	}
	out := make([]legacyName, 0, len(uses))
	for n, u := range uses {
		n.uses = u
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b legacyName) int {
		return cmp.Or(strings.Compare(a.kind, b.kind), strings.Compare(a.name, b.name))
	})
	return out, nil
}
