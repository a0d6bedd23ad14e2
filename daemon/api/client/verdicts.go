package client

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"slices"
	"strings"
	"sync"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// VerdictCache answers VerifyAPIKey from the VALID verdicts it has seen,
// and keeps them right by keywardd's watch stream: a key revoked, disabled,
// changed, rotated, about to expire or set off an anomaly has its verdicts
// dropped as the event arrives (within milliseconds: docs/performance.md),
// and all are dropped on a resync marker or while the stream is broken, in
// which case every verify goes to keywardd.
//
// What is cached, and what is not:
//   - VALID verdicts only, of keys whose events the caller may watch
//     (keywardd says so: VerifyAPIKeyResponse.watched), and only of keys without rate limits (created
//     -unlimited) or with CacheLimited, and never of keys with a quota: a
//     rate limit's or a quota's verdict depends on every use, which only
//     keywardd counts. With CacheLimited, keywardd's rate limits apply to
//     the verifications that reach it, at most one per MaxAge per secret,
//     environment, permissions and address: the application limits the
//     rest itself.
//   - Each for at most MaxAge, and never past the key's expiry: an old
//     secret's overlap ends on its own, with no event, and MaxAge bounds
//     how long a cached verdict may outlive it.
//   - Keyed by the secret's SHA-256 (the secret itself is not kept), the
//     environment, the permissions asked and the source address.
//
// keywardd does not see the verifications answered here: its usage counts,
// latency histograms and anomaly detection see only those it answered.
// Cache where that is the trade wanted (a gateway in front of a hot path),
// not for keys whose every use must be seen.
type VerdictCache struct {
	c       *Client
	maxAge  time.Duration
	limited bool
	now     func() time.Time

	max int

	mu      sync.Mutex
	live    bool   // the stream is open: entries may be used and stored
	gen     uint64 // counts what the stream said: a verdict asked across a change is not stored
	swept   time.Time
	entries map[[32]byte]verdict
	byKey   map[string][][32]byte // key ID → its entries
	stop    context.CancelFunc
	done    chan struct{}
	err     error // why the watch stopped for good
}

type verdict struct {
	resp    *keywardv1.VerifyAPIKeyResponse
	keyID   string
	expires time.Time
}

// VerdictCacheOptions tune a VerdictCache.
type VerdictCacheOptions struct {
	// MaxAge bounds how long a verdict is used. Default 30 s.
	MaxAge time.Duration
	// MaxEntries bounds the cache; past it, nothing more is stored until
	// entries expire. Default 100 000.
	MaxEntries int
	// CacheLimited caches the verdicts of keys with rate limits too (not
	// those with a quota): see VerdictCache.
	CacheLimited bool
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// NewVerdictCache starts following the watch stream (API key events
// only) and returns the cache; Close stops it. Only the verdicts of keys
// whose owner the caller may watch (EventService.Watch) are kept; a
// policy reload sends a resync, which drops them all.
func (c *Client) NewVerdictCache(o VerdictCacheOptions) *VerdictCache {
	if o.MaxAge <= 0 {
		o.MaxAge = 30 * time.Second
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = 100_000
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	ctx, cancel := context.WithCancel(context.Background())
	vc := &VerdictCache{c: c, maxAge: o.MaxAge, limited: o.CacheLimited, now: o.Now, max: o.MaxEntries, entries: map[[32]byte]verdict{}, byKey: map[string][][32]byte{},
		stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(vc.done)
		err := c.Watch(ctx, WatchOptions{Kinds: verdictKinds}, func(ch Change) error {
			vc.mu.Lock()
			defer vc.mu.Unlock()
			vc.gen++
			switch {
			case ch.Lost || ch.Resync:
				vc.live = false
				clear(vc.entries)
				clear(vc.byKey)
				if ch.Resync {
					vc.live = true // the stream goes on, from here
				}
			case ch.Start:
				vc.live = true
			case ch.Event != nil:
				id := strings.TrimPrefix(ch.Event.GetId(), "api_key/") // rotation_due's form
				for _, k := range vc.byKey[id] {
					delete(vc.entries, k)
				}
				delete(vc.byKey, id)
			}
			return nil
		})
		vc.mu.Lock()
		vc.live, vc.err = false, err
		clear(vc.entries)
		clear(vc.byKey)
		vc.mu.Unlock()
	}()
	return vc
}

// verdictKinds are the events that change an API key's verdict.
var verdictKinds = []string{"api_key", "api_key_disabled", "api_key_enabled", "api_key_updated", "api_key_rotated", "api_key_expiring", "api_key_leaked", "anomaly", "rotation_due"}

// Live says whether the cache answers from what it holds now (its stream
// is open), and why not if it stopped for good.
func (vc *VerdictCache) Live() (bool, error) {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	return vc.live, vc.err
}

// Close stops following the stream and drops every verdict.
func (vc *VerdictCache) Close() {
	vc.stop()
	<-vc.done
}

// cacheKey is what a verdict is for.
func cacheKey(r *keywardv1.VerifyAPIKeyRequest) [32]byte {
	h := sha256.New()
	field := func(s string) {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(s))))
		h.Write([]byte(s))
	}
	field(r.GetKey())
	field(r.GetEnvironment())
	perms := slices.Clone(r.GetPermissions())
	slices.Sort(perms)
	field(strings.Join(perms, "\x00"))
	field(r.GetSourceIp())
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// Verify is VerifyAPIKey, answered from the cache when it holds a VALID
// verdict for the same secret, environment, permissions and source
// address, and the stream is open; else by keywardd, whose VALID verdict
// of a key without limits or quota is then kept.
func (vc *VerdictCache) Verify(ctx context.Context, r *keywardv1.VerifyAPIKeyRequest) (*keywardv1.VerifyAPIKeyResponse, error) {
	if r.GetCost() > 1 {
		return vc.c.VerifyAPIKey(ctx, r) // a cost is a use to count
	}
	k := cacheKey(r)
	now := vc.now()
	vc.mu.Lock()
	if e, ok := vc.entries[k]; ok && vc.live && now.Before(e.expires) {
		vc.mu.Unlock()
		return e.resp, nil
	}
	live, gen := vc.live, vc.gen
	vc.mu.Unlock()
	resp, err := vc.c.VerifyAPIKey(ctx, r)
	if err != nil || !live || resp.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID || !resp.GetWatched() ||
		(len(resp.GetRateLimits()) > 0 && !vc.limited) || resp.GetQuota() != nil {
		return resp, err
	}
	exp := now.Add(vc.maxAge)
	if t := resp.GetExpireTime(); t != nil && t.AsTime().Before(exp) {
		exp = t.AsTime()
	}
	vc.mu.Lock()
	defer vc.mu.Unlock()
	// Stored only if the stream said nothing since the question: an event
	// that came meanwhile (and dropped nothing, there being nothing yet)
	// may be about this key.
	if len(vc.entries) >= vc.max && now.Sub(vc.swept) > time.Second {
		// Full: the expired ones out, at most once a second (a scan).
		vc.swept = now
		for k, e := range vc.entries {
			if !now.Before(e.expires) {
				delete(vc.entries, k)
			}
		}
	}
	if vc.live && vc.gen == gen && len(vc.entries) < vc.max {
		if _, had := vc.entries[k]; !had {
			vc.byKey[resp.GetKeyId()] = append(vc.byKey[resp.GetKeyId()], k)
		}
		vc.entries[k] = verdict{resp: resp, keyID: resp.GetKeyId(), expires: exp}
	}
	return resp, nil
}
