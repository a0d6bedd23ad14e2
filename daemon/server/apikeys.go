package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/ratelimit"
)

// For APIKeyService the policy's key globs match API key owners.

// APIKeys is the API key manager the APIKeyService translates to:
// daemon/apikeys.Manager.
type APIKeys interface {
	Create(ctx context.Context, s apikeys.Spec) (secret string, rec *apikeys.Record, err error)
	Get(id string) (*apikeys.Record, error)
	List(f apikeys.Filter, after string, size int) (recs []*apikeys.Record, next string, err error)
	Verify(ctx context.Context, presented string, req apikeys.Request) apikeys.Result
	Rotate(ctx context.Context, id string, overlap time.Duration) (string, *apikeys.Record, error)
	Revoke(id string) (*apikeys.Record, error)
	RevokeWhere(f apikeys.Filter, dryRun bool) (int, error)
	Update(id string, c apikeys.Change, admin bool) (*apikeys.Record, error)
	GetUsage(id string, window time.Duration) (*apikeys.Usage, error)
	ReportLeak(ctx context.Context, presented string, l apikeys.Leak, allow func(id, owner string) error) (apikeys.LeakVerdict, error)
}

var apiKeyStates = map[apikeys.State]keywardv1.APIKeyState{
	apikeys.Active:        keywardv1.APIKeyState_API_KEY_STATE_ACTIVE,
	apikeys.StateDisabled: keywardv1.APIKeyState_API_KEY_STATE_DISABLED,
	apikeys.StateRevoked:  keywardv1.APIKeyState_API_KEY_STATE_REVOKED,
}

func apiKeyState(st keywardv1.APIKeyState) (apikeys.State, error) {
	for s, ps := range apiKeyStates {
		if ps == st {
			return s, nil
		}
	}
	return "", fmt.Errorf("%w: state %v: use API_KEY_STATE_ACTIVE, _DISABLED or _REVOKED", errInvalid, st)
}

func apiKeyCode(c apikeys.Code) keywardv1.APIKeyCode {
	return keywardv1.APIKeyCode(keywardv1.APIKeyCode_value["API_KEY_CODE_"+string(c)])
}

func timeOrNil(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func toLimits(ls []ratelimit.Layer) []*keywardv1.RateLimit {
	out := make([]*keywardv1.RateLimit, len(ls))
	for i, l := range ls {
		out[i] = &keywardv1.RateLimit{Limit: uint32(l.Limit), Per: durationpb.New(l.Per), Burst: uint32(l.Burst)}
	}
	return out
}

// toLimitStates is each rate-limit layer's state after a check.
func toLimitStates(layers []ratelimit.LayerResult) []*keywardv1.RateLimitState {
	var out []*keywardv1.RateLimitState
	for _, l := range layers {
		out = append(out, &keywardv1.RateLimitState{Limit: toLimits([]ratelimit.Layer{l.Layer})[0],
			Remaining: uint32(l.Remaining), ResetTime: timestamppb.New(l.Reset), Refused: l.Refused})
	}
	return out
}

func toQuota(q *apikeys.Quota) *keywardv1.Quota {
	if q == nil {
		return nil
	}
	out := &keywardv1.Quota{Remaining: q.Remaining, Refill: q.Refill}
	if q.RefillEvery > 0 {
		out.RefillEvery = durationpb.New(q.RefillEvery)
	}
	return out
}

func toAPIKey(r *apikeys.Record) *keywardv1.APIKey {
	out := &keywardv1.APIKey{
		Id: r.ID, Owner: r.Owner, Name: r.Name, Environment: r.Environment, Permissions: r.Permissions,
		ExpireTime: timeOrNil(r.Expires), RateLimits: toLimits(r.Limits), Quota: toQuota(r.Quota),
		Tags: r.Tags, Metadata: r.Metadata, State: apiKeyStates[r.State], CreateTime: timestamppb.New(r.Created),
		AllowedCountries: r.AllowedCountries,
	}
	for _, p := range r.AllowedIPs {
		out.AllowedIps = append(out.AllowedIps, p.String())
	}
	for _, s := range r.Secrets {
		out.Secrets = append(out.Secrets, &keywardv1.APIKeySecret{CreateTime: timestamppb.New(s.Created), NotAfter: timeOrNil(s.NotAfter)})
	}
	return out
}

func fromLimits(ls []*keywardv1.RateLimit) ([]ratelimit.Layer, error) {
	out := make([]ratelimit.Layer, len(ls))
	for i, l := range ls {
		if l.GetPer() == nil || l.GetPer().CheckValid() != nil {
			return nil, fmt.Errorf("%w: rate_limits[%d] has no valid period (per: 1s, 60s, 3600s or 86400s)", errInvalid, i)
		}
		out[i] = ratelimit.Layer{Limit: int(l.GetLimit()), Per: l.GetPer().AsDuration(), Burst: int(l.GetBurst())}
	}
	return out, apikeys.CheckLayers(out)
}

func fromQuota(q *keywardv1.Quota) (*apikeys.Quota, error) {
	if q == nil {
		return nil, nil
	}
	out := &apikeys.Quota{Remaining: q.GetRemaining(), Refill: q.GetRefill(), RefillEvery: q.GetRefillEvery().AsDuration()}
	return out, out.Check()
}

// owners says which API key owners the caller may reach with op.
func (s *Server) owners(ctx context.Context, op string) func(string) bool {
	pol, sub := s.policy.Load(), subject(callFrom(ctx).caller)
	return func(owner string) bool { return pol.Allow(sub, op, owner) == nil }
}

// reach is what a bulk revocation records of its caller's reach
// (apikeys.Filter.Reach): the policy's subject and the operation, so that
// a resumption after a crash revokes only keys of owners the caller may
// reach under the policy then (a narrower policy, fewer keys), among the
// owners it reached when it asked (apikeys records those; every node of a
// fleet must run the same policy: docs/fleet.md).
type reach struct {
	Subject *policy.Subject `json:"subject"`
	Op      string          `json:"op"`
}

func reachOf(ctx context.Context, op string) json.RawMessage {
	sub := subject(callFrom(ctx).caller)
	b, _ := json.Marshal(reach{Subject: &sub, Op: op})
	return b
}

// Owners turns a reach recorded with a bulk revocation back into the
// owners its caller may reach, under the policy loaded now.
func (s *Server) Owners(raw json.RawMessage) (func(owner string) bool, error) {
	var r reach
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("the caller's reach recorded with the revocation does not parse (%v): it is not finished", err)
	}
	if r.Op == "" || r.Subject == nil {
		return nil, errors.New("the caller's reach recorded with the revocation names no caller or operation: it is not finished")
	}
	pol, sub := s.policy.Load(), *r.Subject
	return func(owner string) bool { return pol.Allow(sub, r.Op, owner) == nil }, nil
}

// apiKey loads a key for op and checks the caller may reach its owner.
// The ID goes on record only once it is known to be one: a secret pasted in
// its place must not reach the audit log.
func (s *Server) apiKey(ctx context.Context, op, id string) (*apikeys.Record, error) {
	c := callFrom(ctx)
	// Nothing is read for a caller granted op on no owner at all.
	if err := s.policy.Load().Allow(subject(c.caller), op, ""); err != nil {
		return nil, err
	}
	rec, err := s.cfg.APIKeys.Get(id)
	if err != nil {
		return nil, err
	}
	c.apiKey = rec.ID
	if err := s.allow(ctx, op, rec.Owner); err != nil {
		// The audit record names the owner; the caller learns nothing of it.
		return nil, &policy.Denied{Op: op + " on this key's owner"}
	}
	return rec, nil
}

// timestamp converts a Timestamp, refusing one out of range.
func timestamp(field string, ts *timestamppb.Timestamp) (time.Time, error) {
	if err := ts.CheckValid(); err != nil {
		return time.Time{}, fmt.Errorf("%w: %s: %v", errInvalid, field, err)
	}
	return ts.AsTime(), nil
}

func (s *Server) CreateAPIKey(ctx context.Context, r *keywardv1.CreateAPIKeyRequest) (*keywardv1.CreateAPIKeyResponse, error) {
	if err := s.allow(ctx, "APIKeyService.CreateAPIKey", r.GetOwner()); err != nil {
		return nil, err
	}
	spec := apikeys.Spec{Owner: r.GetOwner(), Name: r.GetName(), Environment: r.GetEnvironment(), Permissions: r.GetPermissions(),
		Tags: r.GetTags(), Metadata: r.GetMetadata()}
	var err error
	switch {
	case r.GetExpireTime() != nil && r.GetTtl() != nil:
		return nil, fmt.Errorf("%w: give expire_time or ttl, not both", errInvalid)
	case r.GetExpireTime() != nil:
		if spec.Expires, err = timestamp("expire_time", r.GetExpireTime()); err != nil {
			return nil, err
		}
	case r.GetTtl() != nil:
		if err := r.GetTtl().CheckValid(); err != nil {
			return nil, fmt.Errorf("%w: ttl: %v", errInvalid, err)
		}
		if spec.Expires, err = apikeys.Lifetime(s.cfg.Now(), r.GetTtl().AsDuration()); err != nil {
			return nil, err
		}
	}
	if spec.AllowedIPs, err = apikeys.ParseAllowlist(r.GetAllowedIps()); err != nil {
		return nil, err
	}
	spec.AllowedCountries = r.GetAllowedCountries()
	switch {
	case r.GetUnlimited() && len(r.GetRateLimits()) > 0:
		return nil, fmt.Errorf("%w: unlimited and rate_limits contradict each other", errInvalid)
	case r.GetUnlimited():
		spec.Limits = []ratelimit.Layer{}
	case len(r.GetRateLimits()) > 0:
		if spec.Limits, err = fromLimits(r.GetRateLimits()); err != nil {
			return nil, err
		}
	}
	if spec.Quota, err = fromQuota(r.GetQuota()); err != nil {
		return nil, err
	}
	secret, rec, err := s.cfg.APIKeys.Create(ctx, spec)
	if err != nil {
		return nil, err
	}
	callFrom(ctx).apiKey = rec.ID
	return &keywardv1.CreateAPIKeyResponse{Secret: secret, Key: toAPIKey(rec)}, nil
}

func (s *Server) VerifyAPIKey(ctx context.Context, r *keywardv1.VerifyAPIKeyRequest) (*keywardv1.VerifyAPIKeyResponse, error) {
	const op = "APIKeyService.VerifyAPIKey"
	c := callFrom(ctx)
	if err := s.policy.Load().Allow(subject(c.caller), op, ""); err != nil {
		return nil, err
	}
	req := apikeys.Request{Permissions: r.GetPermissions(), Environment: r.GetEnvironment(), Cost: int(r.GetCost()), Owners: s.owners(ctx, op)}
	if err := req.Check(); err != nil {
		return nil, err
	}
	if ip := r.GetSourceIp(); ip != "" {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			return nil, fmt.Errorf("%w: source_ip is not an IP address; pass the client's address without a port", errInvalid)
		}
		req.SourceIP = a.WithZone("")
	}
	res := s.cfg.APIKeys.Verify(ctx, r.GetKey(), req)
	c.result = string(res.Code)
	s.cfg.Metrics.Verified(string(res.Code))
	if res.Code == apikeys.Unavailable {
		return nil, fmt.Errorf("%w: the key could not be checked, so it is not valid: %s", errUnavailable, res.Detail)
	}
	out := &keywardv1.VerifyAPIKeyResponse{Code: apiKeyCode(res.Code), Reason: res.Detail, NearLimit: res.Limits.NearLimit}
	if k := res.Key; k != nil {
		c.key, c.apiKey = k.Owner, k.ID
		out.KeyId, out.Owner, out.Name, out.Permissions, out.Metadata = k.ID, k.Owner, k.Name, k.Permissions, k.Metadata
		out.ExpireTime, out.Quota = timeOrNil(k.Expires), toQuota(k.Quota)
	}
	out.RateLimits = toLimitStates(res.Limits.Layers)
	if res.Code == apikeys.Valid && res.Key != nil {
		out.Watched = s.policy.Load().Allow(subject(c.caller), watchOp, res.Key.Owner) == nil
	}
	if res.Code == apikeys.RateLimited && !res.Limits.TooLarge {
		out.RetryAfter = durationpb.New(res.Limits.RetryAfter)
	}
	if res.Key != nil && res.Key.Quota != nil {
		// A quota that refills: when it does, and for a refusal by it, the
		// time until then.
		if next := res.Key.Quota.NextRefill(); !next.IsZero() {
			out.QuotaRefillTime = timestamppb.New(next)
			if res.Code == apikeys.UsageExceeded {
				wait := max(next.Sub(s.cfg.Now()), 0)
				if ra := res.Limits.RetryAfter; ra > 0 {
					wait = ra // a fleet's, from the store's own refusal
				}
				out.RetryAfter = durationpb.New(wait)
			}
		}
	}
	return out, nil
}

func (s *Server) RotateAPIKey(ctx context.Context, r *keywardv1.RotateAPIKeyRequest) (*keywardv1.RotateAPIKeyResponse, error) {
	var asked *time.Duration
	if r.GetOverlap() != nil {
		d := r.GetOverlap().AsDuration()
		asked = &d
	}
	overlap, err := apikeys.RotationOverlap(asked, r.GetRisk())
	if err != nil {
		return nil, err
	}
	if _, err := s.apiKey(ctx, "APIKeyService.RotateAPIKey", r.GetId()); err != nil {
		return nil, err
	}
	secret, rec, err := s.cfg.APIKeys.Rotate(ctx, r.GetId(), overlap)
	if err != nil {
		return nil, err
	}
	out := &keywardv1.RotateAPIKeyResponse{Secret: secret, Key: toAPIKey(rec)}
	if n := len(rec.Secrets); n > 1 {
		out.OldSecretNotAfter = timeOrNil(rec.Secrets[n-2].NotAfter)
	}
	return out, nil
}

func (s *Server) RevokeAPIKey(ctx context.Context, r *keywardv1.RevokeAPIKeyRequest) (*keywardv1.RevokeAPIKeyResponse, error) {
	if _, err := s.apiKey(ctx, "APIKeyService.RevokeAPIKey", r.GetId()); err != nil {
		return nil, err
	}
	rec, err := s.cfg.APIKeys.Revoke(r.GetId())
	if err != nil {
		return nil, err
	}
	return &keywardv1.RevokeAPIKeyResponse{Key: toAPIKey(rec)}, nil
}

func (s *Server) RevokeAPIKeys(ctx context.Context, r *keywardv1.RevokeAPIKeysRequest) (*keywardv1.RevokeAPIKeysResponse, error) {
	const op = "APIKeyService.RevokeAPIKeys"
	if err := s.allow(ctx, op, r.GetOwner()); err != nil {
		return nil, err
	}
	n, err := s.cfg.APIKeys.RevokeWhere(apikeys.Filter{Owner: r.GetOwner(), Tag: r.GetTag(), Environment: r.GetEnvironment(),
		All: r.GetAll(), Owners: s.owners(ctx, op), Reach: reachOf(ctx, op)}, r.GetDryRun())
	c := callFrom(ctx)
	c.items = n
	c.detail = fmt.Sprintf("owner %q, tag %q, environment %q, all %v, dry run %v", r.GetOwner(), r.GetTag(), r.GetEnvironment(), r.GetAll(), r.GetDryRun())
	if err != nil {
		return nil, err
	}
	return &keywardv1.RevokeAPIKeysResponse{Count: uint32(n), DryRun: r.GetDryRun()}, nil
}

func (s *Server) GetAPIKey(ctx context.Context, r *keywardv1.GetAPIKeyRequest) (*keywardv1.GetAPIKeyResponse, error) {
	rec, err := s.apiKey(ctx, "APIKeyService.GetAPIKey", r.GetId())
	if err != nil {
		return nil, err
	}
	return &keywardv1.GetAPIKeyResponse{Key: toAPIKey(rec)}, nil
}

func (s *Server) ListAPIKeys(ctx context.Context, r *keywardv1.ListAPIKeysRequest) (*keywardv1.ListAPIKeysResponse, error) {
	const op = "APIKeyService.ListAPIKeys"
	if err := s.allow(ctx, op, r.GetOwner()); err != nil {
		return nil, err
	}
	f := apikeys.Filter{Owner: r.GetOwner(), Tag: r.GetTag(), Environment: r.GetEnvironment(), Owners: s.owners(ctx, op)}
	if r.GetState() != keywardv1.APIKeyState_API_KEY_STATE_UNSPECIFIED {
		st, err := apiKeyState(r.GetState())
		if err != nil {
			return nil, err
		}
		f.State = st
	}
	if r.GetPageSize() > apikeys.MaxPageSize {
		return nil, fmt.Errorf("%w: page_size is at most %d", errInvalid, apikeys.MaxPageSize)
	}
	recs, next, err := s.cfg.APIKeys.List(f, r.GetPageToken(), int(r.GetPageSize()))
	if err != nil {
		return nil, err
	}
	out := &keywardv1.ListAPIKeysResponse{NextPageToken: next}
	for _, rec := range recs {
		out.Keys = append(out.Keys, toAPIKey(rec))
	}
	callFrom(ctx).items = len(recs)
	return out, nil
}

// updatable are the fields UpdateAPIKey changes.
var updatable = []string{"permissions", "rate_limits", "allowed_ips", "allowed_countries", "expire_time", "state"}

func (s *Server) UpdateAPIKey(ctx context.Context, r *keywardv1.UpdateAPIKeyRequest) (*keywardv1.UpdateAPIKeyResponse, error) {
	k := r.GetKey()
	paths := r.GetUpdateMask().GetPaths()
	if len(paths) == 0 {
		return nil, fmt.Errorf("%w: update_mask names no field; name some of %s", errInvalid, strings.Join(updatable, ", "))
	}
	var ch apikeys.Change
	for _, p := range paths {
		switch p {
		case "permissions":
			ch.Permissions = k.GetPermissions()
			if ch.Permissions == nil {
				ch.Permissions = []string{} // refused below: a key needs one
			}
		case "rate_limits":
			ls, err := fromLimits(k.GetRateLimits())
			if err != nil {
				return nil, err
			}
			ch.Limits = &ls
		case "allowed_ips":
			ps, err := apikeys.ParseAllowlist(k.GetAllowedIps())
			if err != nil {
				return nil, err
			}
			ch.AllowedIPs = &ps
		case "allowed_countries":
			cs := k.GetAllowedCountries()
			if cs == nil {
				cs = []string{}
			}
			ch.AllowedCountries = &cs
		case "expire_time":
			var t time.Time
			if k.GetExpireTime() != nil {
				var err error
				if t, err = timestamp("expire_time", k.GetExpireTime()); err != nil {
					return nil, err
				}
			}
			ch.Expires = &t
		case "state":
			st, err := apiKeyState(k.GetState())
			if err != nil {
				return nil, err
			}
			ch.State = &st
		default:
			return nil, fmt.Errorf("%w: update_mask path %q: UpdateAPIKey changes %s", errInvalid, p, strings.Join(updatable, ", "))
		}
	}
	rec, err := s.apiKey(ctx, "APIKeyService.UpdateAPIKey", k.GetId())
	if err != nil {
		return nil, err
	}
	// Whoever may issue this owner's keys may widen them; others narrow.
	admin := s.policy.Load().Allow(subject(callFrom(ctx).caller), "APIKeyService.CreateAPIKey", rec.Owner) == nil
	rec, err = s.cfg.APIKeys.Update(k.GetId(), ch, admin)
	if err != nil {
		return nil, err
	}
	return &keywardv1.UpdateAPIKeyResponse{Key: toAPIKey(rec)}, nil
}

func (s *Server) GetAPIKeyUsage(ctx context.Context, r *keywardv1.GetAPIKeyUsageRequest) (*keywardv1.GetAPIKeyUsageResponse, error) {
	window := apikeys.DefaultUsageWindow
	if r.GetWindow() != nil {
		window = r.GetWindow().AsDuration()
	}
	if _, err := s.apiKey(ctx, "APIKeyService.GetAPIKeyUsage", r.GetId()); err != nil {
		return nil, err
	}
	u, err := s.cfg.APIKeys.GetUsage(r.GetId(), window)
	if err != nil {
		return nil, err
	}
	usage := func(counts map[apikeys.Code]int64, nets, countries map[string]int64, latency *apikeys.LatencyHistogram) *keywardv1.APIKeyUsage {
		out := &keywardv1.APIKeyUsage{Counts: map[string]int64{}, Networks: nets, Countries: countries}
		for c, n := range counts {
			out.Counts[string(c)] = n
		}
		if *latency != (apikeys.LatencyHistogram{}) {
			out.LatencyCounts = latency[:]
		}
		return out
	}
	out := &keywardv1.GetAPIKeyUsageResponse{Id: r.GetId(), LastUsedTime: timeOrNil(u.LastUsed), Total: usage(u.Counts, u.Networks, u.Countries, &u.Latency)}
	for i := range u.Hours {
		h := &u.Hours[i]
		out.Hours = append(out.Hours, &keywardv1.APIKeyHourUsage{Hour: timestamppb.New(h.Hour), Usage: usage(h.Counts, h.Networks, h.Countries, &h.Latency)})
	}
	for _, b := range apikeys.LatencyBounds {
		out.LatencyBounds = append(out.LatencyBounds, durationpb.New(b))
	}
	return out, nil
}

// ReportLeak takes a string someone found. The caller needs
// APIKeyService.ReportLeak on some owner to be heard at all, and on the
// key's owner for a true positive to act: a key of another owner is
// PERMISSION_DENIED, naming the operation, not the owner. The audit record
// has the key, the verdict and where the string was found; never the
// string.
func (s *Server) ReportLeak(ctx context.Context, r *keywardv1.ReportLeakRequest) (*keywardv1.ReportLeakResponse, error) {
	const op = "APIKeyService.ReportLeak"
	c := callFrom(ctx)
	if err := s.policy.Load().Allow(subject(c.caller), op, ""); err != nil {
		return nil, err
	}
	if r.GetSecret() == "" {
		return nil, fmt.Errorf("%w: secret is empty: pass the string as found (keyward apikey report-leak reads it from standard input)", errInvalid)
	}
	l := apikeys.Leak{Source: r.GetSource(), URL: r.GetUrl(), Reporter: fmt.Sprintf("uid %d", c.caller.UID)}
	v, err := s.cfg.APIKeys.ReportLeak(ctx, r.GetSecret(), l, func(id, owner string) error {
		c.apiKey, c.key = id, owner
		if err := s.allow(ctx, op, owner); err != nil {
			return &policy.Denied{Op: op + " on this key's owner"}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.cfg.Metrics.Leak("api", v.TruePositive, v.Changed)
	c.result, c.detail = "FALSE_POSITIVE", l.Describe()+": "+v.Reason
	out := &keywardv1.ReportLeakResponse{TruePositive: v.TruePositive, Reason: v.Reason, Changed: v.Changed, Retired: v.Retired}
	if !v.TruePositive {
		return out, nil
	}
	c.result, c.apiKey, c.key = "TRUE_POSITIVE", v.KeyID, v.Owner
	rec, err := s.cfg.APIKeys.Get(v.KeyID)
	if err != nil {
		return nil, err
	}
	out.Key = toAPIKey(rec)
	return out, nil
}
