package main

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// errRefused: apikey verify's key is not VALID (exit 1; the verdict is
// printed).
var errRefused = errors.New("the key is refused")

// limitList is a repeatable rate-limit flag: LIMIT/PERIOD[,burst=B], the
// period s, m, h, d or a duration (100/s, 5000/h,burst=500, 10/30s).
type limitList []*keywardv1.RateLimit

func (l *limitList) String() string { return fmt.Sprint(len(*l), " layers") }

func (l *limitList) Set(s string) error {
	rate, burst, hasBurst := strings.Cut(s, ",")
	n, per, err := parseRate(rate)
	if err != nil {
		return err
	}
	b := n
	if hasBurst {
		v, ok := strings.CutPrefix(burst, "burst=")
		if b, err = strconv.ParseUint(v, 10, 32); !ok || err != nil || b == 0 {
			return fmt.Errorf("%q: the burst is burst=N, N at least 1", s)
		}
	}
	*l = append(*l, &keywardv1.RateLimit{Limit: uint32(n), Per: durationpb.New(per), Burst: uint32(b)})
	return nil
}

// parseRate reads N/PERIOD.
func parseRate(s string) (uint64, time.Duration, error) {
	ns, ps, ok := strings.Cut(s, "/")
	n, err := strconv.ParseUint(ns, 10, 32)
	if !ok || err != nil || n == 0 {
		return 0, 0, fmt.Errorf("%q is not N/PERIOD (100/s, 5000/h, 10/30s)", s)
	}
	per, ok := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}[ps]
	if !ok {
		if per, err = time.ParseDuration(ps); err != nil || per <= 0 {
			return 0, 0, fmt.Errorf("%q: the period is s, m, h, d or a duration such as 30s", s)
		}
	}
	return n, per, nil
}

// apikeyCommand is keyward apikey create|verify|rotate|revoke|list|show|
// update|usage. Secrets go to standard output or a 0600 file, and are read
// from standard input or a file: never arguments.
func apikeyCommand(e *env, sub string, args []string) error {
	fs := newFlags("apikey " + sub)
	var (
		id, owner, name, envName, tag, in, out, risk, ip, state, expires, quotaRefill *string
		ttl, overlap, window                                                          *time.Duration
		quota                                                                         *int64
		cost, pageSize                                                                *uint
		unlimited, dryRun, noLimits, noAllowlist, noExpiry, disable, enable, all      *bool
		perms, ips, tags                                                              list
		limits                                                                        limitList
		meta                                                                          = pairs{}
	)
	idFlag := func() { id = fs.String("id", "", "the key's ID (ak_...)") }
	secretOut := func() {
		out = fs.String("secret-out", "", "write the secret to this file (mode 0600) instead of standard output")
	}
	switch sub {
	case "create":
		owner = fs.String("owner", "", "who the key belongs to")
		name = fs.String("name", "", "what it is for")
		envName = fs.String("env", "", "the environment it works in (dev, staging, prod)")
		fs.Var(&perms, "perm", "read-only, standard, admin or resource:action (repeatable)")
		expires = fs.String("expires", "", "expiry time (RFC 3339)")
		ttl = fs.Duration("ttl", 0, "lifetime (a temporary key)")
		fs.Var(&ips, "allow-ip", "CIDR or address it may be used from (repeatable)")
		fs.Var(&limits, "limit", "rate limit N/PERIOD[,burst=B] (repeatable; default: the role's)")
		unlimited = fs.Bool("unlimited", false, "no rate limit at all")
		quota = fs.Int64("quota", -1, "usage quota: uses left")
		quotaRefill = fs.String("quota-refill", "", "refill the quota to N every PERIOD (N/PERIOD)")
		fs.Var(&tags, "tag", "tag (repeatable)")
		fs.Var(meta, "meta", "metadata k=v (repeatable)")
		secretOut()
	case "verify":
		envName = fs.String("env", "", "the environment the caller runs in")
		fs.Var(&perms, "perm", "required permission resource:action (repeatable)")
		ip = fs.String("ip", "", "the client's address")
		cost = fs.Uint("cost", 1, "what the request costs")
		in = fs.String("in", "", "file holding the key (default standard input)")
	case "rotate":
		idFlag()
		overlap = fs.Duration("overlap", -1, "how long the old secret keeps working (0: stop it now)")
		risk = fs.String("risk", "", "default overlap by risk: high (24h) or moderate (48h, the default)")
		secretOut()
	case "revoke":
		id = fs.String("id", "", "revoke this key; or revoke in bulk with -owner, -tag, -env")
		owner = fs.String("owner", "", "bulk: every key of this owner")
		tag = fs.String("tag", "", "bulk: every key with this tag")
		envName = fs.String("env", "", "bulk: every key of this environment")
		dryRun = fs.Bool("dry-run", false, "bulk: count the keys it would revoke; revoke nothing")
		all = fs.Bool("all", false, "bulk: every API key you may revoke (the emergency brake)")
	case "list":
		owner = fs.String("owner", "", "only this owner's keys")
		tag = fs.String("tag", "", "only keys with this tag")
		envName = fs.String("env", "", "only keys of this environment")
		state = fs.String("state", "", "only keys in this state: active, disabled, revoked")
		pageSize = fs.Uint("page-size", 0, "keys per call (default 100)")
	case "show":
		idFlag()
	case "update":
		idFlag()
		fs.Var(&perms, "perm", "the new permissions (repeatable; replaces them all)")
		fs.Var(&limits, "limit", "the new rate limits N/PERIOD[,burst=B] (repeatable; replaces them all)")
		noLimits = fs.Bool("no-limits", false, "remove every rate limit")
		fs.Var(&ips, "allow-ip", "the new allowlist (repeatable; replaces it)")
		noAllowlist = fs.Bool("no-allowlist", false, "remove the allowlist")
		expires = fs.String("expires", "", "the new expiry time (RFC 3339)")
		noExpiry = fs.Bool("no-expiry", false, "remove the expiry")
		disable = fs.Bool("disable", false, "disable the key")
		enable = fs.Bool("enable", false, "enable a disabled key")
	case "usage":
		idFlag()
		window = fs.Duration("window", 0, "how far back, at most 168h (default 24h)")
	default:
		return usageError{fmt.Sprintf("unknown apikey command %q; run keyward help", sub)}
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if id != nil && *id == "" && sub != "revoke" {
		return usageError{fmt.Sprintf("apikey %s needs -id", sub)}
	}
	var expireTime *timestamppb.Timestamp
	if expires != nil && *expires != "" {
		t, err := time.Parse(time.RFC3339, *expires)
		if err != nil {
			return usageError{fmt.Sprintf("-expires %q is not an RFC 3339 time (2027-01-31T00:00:00Z)", *expires)}
		}
		expireTime = timestamppb.New(t)
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ac, ctx := c.APIKeys, e.ctx

	switch sub {
	case "create":
		if *owner == "" || *name == "" || *envName == "" || len(perms) == 0 {
			return usageError{"apikey create needs -owner, -name, -env and at least one -perm"}
		}
		req := &keywardv1.CreateAPIKeyRequest{Owner: *owner, Name: *name, Environment: *envName, Permissions: perms, ExpireTime: expireTime,
			AllowedIps: ips, RateLimits: limits, Unlimited: *unlimited, Tags: tags, Metadata: meta}
		if *ttl != 0 {
			req.Ttl = durationpb.New(*ttl)
		}
		if *quota >= 0 || *quotaRefill != "" {
			req.Quota = &keywardv1.Quota{Remaining: max(*quota, 0)}
			if *quotaRefill != "" {
				n, per, err := parseRate(*quotaRefill)
				if err != nil {
					return usageError{"-quota-refill: " + err.Error()}
				}
				req.Quota.Refill, req.Quota.RefillEvery = int64(n), durationpb.New(per)
				if *quota < 0 {
					req.Quota.Remaining = int64(n)
				}
			}
		}
		sf, err := newSecretFile(*out)
		if err != nil {
			return err
		}
		r, err := ac.CreateAPIKey(ctx, req)
		if err != nil {
			sf.discard()
			return client.Wrap(err)
		}
		return e.printSecret(sf, r.GetSecret(), r.GetKey(), "created", r)
	case "verify":
		if *envName == "" {
			return usageError{"apikey verify needs -env"}
		}
		b, err := e.readInput(*in)
		if err != nil {
			return err
		}
		r, err := c.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: strings.TrimSpace(string(b)), Permissions: perms,
			SourceIp: *ip, Environment: *envName, Cost: uint32(*cost)})
		if err != nil {
			return err
		}
		if e.json {
			if err := e.printJSON(r); err != nil {
				return err
			}
		} else {
			code := strings.TrimPrefix(r.GetCode().String(), "API_KEY_CODE_")
			fmt.Fprintf(e.stdout, "%s", code)
			if r.GetKeyId() != "" {
				fmt.Fprintf(e.stdout, ": %s (%s, owner %s), permissions %s", r.GetKeyId(), r.GetName(), r.GetOwner(), strings.Join(r.GetPermissions(), ","))
			}
			fmt.Fprintln(e.stdout)
			for _, l := range r.GetRateLimits() {
				fmt.Fprintf(e.stdout, "  limit %s: %d left, full again %s\n", fmtLimit(l.GetLimit()), l.GetRemaining(), l.GetResetTime().AsTime().Local().Format(time.TimeOnly))
			}
			if r.GetRetryAfter() != nil {
				fmt.Fprintf(e.stdout, "  retry after %v\n", r.GetRetryAfter().AsDuration().Round(time.Millisecond))
			}
			if r.GetNearLimit() {
				fmt.Fprintln(e.stdout, "  near its rate limit")
			}
			if q := r.GetQuota(); q != nil {
				fmt.Fprintf(e.stdout, "  quota: %d left\n", q.GetRemaining())
			}
		}
		if r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			return fmt.Errorf("%w: %s", errRefused, r.GetReason())
		}
	case "rotate":
		req := &keywardv1.RotateAPIKeyRequest{Id: *id, Risk: *risk}
		if *overlap >= 0 {
			req.Overlap = durationpb.New(*overlap)
		}
		sf, err := newSecretFile(*out)
		if err != nil {
			return err
		}
		r, err := ac.RotateAPIKey(ctx, req)
		if err != nil {
			sf.discard()
			return client.Wrap(err)
		}
		if err := e.printSecret(sf, r.GetSecret(), r.GetKey(), "rotated", r); err != nil {
			return err
		}
		if !e.json && r.GetOldSecretNotAfter() != nil {
			fmt.Fprintf(e.stderr, "the old secret works until %s\n", r.GetOldSecretNotAfter().AsTime().Format(time.RFC3339))
		}
	case "revoke":
		bulk := *owner != "" || *tag != "" || *envName != "" || *all
		switch {
		case *id != "" && (bulk || *dryRun):
			return usageError{"apikey revoke takes -id, or -owner/-tag/-env/-all [-dry-run] for bulk, not both"}
		case *all && (*owner != "" || *tag != "" || *envName != ""):
			return usageError{"-all revokes every key: give no -owner, -tag or -env with it"}
		case *id != "":
			r, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: *id})
			if err != nil {
				return client.Wrap(err)
			}
			if e.json {
				return e.printJSON(r)
			}
			fmt.Fprintf(e.stdout, "revoked %s (%s, owner %s)\n", r.GetKey().GetId(), r.GetKey().GetName(), r.GetKey().GetOwner())
		case bulk:
			r, err := ac.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Owner: *owner, Tag: *tag, Environment: *envName, All: *all, DryRun: *dryRun})
			if err != nil {
				return client.Wrap(err)
			}
			if e.json {
				return e.printJSON(r)
			}
			if r.GetDryRun() {
				fmt.Fprintf(e.stdout, "would revoke %d keys (dry run: nothing was revoked)\n", r.GetCount())
			} else {
				fmt.Fprintf(e.stdout, "revoked %d keys\n", r.GetCount())
			}
		default:
			return usageError{"apikey revoke needs -id, or -owner, -tag, -env or -all for bulk revocation"}
		}
	case "list":
		req := &keywardv1.ListAPIKeysRequest{Owner: *owner, Tag: *tag, Environment: *envName, PageSize: uint32(*pageSize)}
		if *state != "" {
			v, ok := keywardv1.APIKeyState_value["API_KEY_STATE_"+strings.ToUpper(*state)]
			if !ok {
				return usageError{"-state is active, disabled or revoked"}
			}
			req.State = keywardv1.APIKeyState(v)
		}
		all := &keywardv1.ListAPIKeysResponse{}
		for {
			r, err := ac.ListAPIKeys(ctx, req)
			if err != nil {
				return client.Wrap(err)
			}
			all.Keys = append(all.Keys, r.GetKeys()...)
			if req.PageToken = r.GetNextPageToken(); req.PageToken == "" {
				break
			}
		}
		if e.json {
			return e.printJSON(all)
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tOWNER\tNAME\tENV\tSTATE\tPERMISSIONS\tEXPIRES")
		for _, k := range all.GetKeys() {
			exp := "-"
			if k.GetExpireTime() != nil {
				exp = k.GetExpireTime().AsTime().Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.GetId(), k.GetOwner(), k.GetName(), k.GetEnvironment(), apiKeyStateName(k.GetState()),
				strings.Join(k.GetPermissions(), ","), exp)
		}
		return tw.Flush()
	case "show":
		r, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: *id})
		if err != nil {
			return client.Wrap(err)
		}
		return e.printAPIKey(r.GetKey(), r)
	case "update":
		k := &keywardv1.APIKey{Id: *id, Permissions: perms, RateLimits: limits, AllowedIps: ips, ExpireTime: expireTime}
		var paths []string
		for _, f := range []struct {
			set, clear bool
			path, what string
		}{
			{len(perms) > 0, false, "permissions", "-perm"},
			{len(limits) > 0, *noLimits, "rate_limits", "-limit and -no-limits"},
			{len(ips) > 0, *noAllowlist, "allowed_ips", "-allow-ip and -no-allowlist"},
			{expireTime != nil, *noExpiry, "expire_time", "-expires and -no-expiry"},
			{*enable, *disable, "state", "-enable and -disable"},
		} {
			if f.set && f.clear {
				return usageError{f.what + " contradict each other"}
			}
			if f.set || f.clear {
				paths = append(paths, f.path)
			}
		}
		if len(paths) == 0 {
			return usageError{"apikey update needs something to change: -perm, -limit, -no-limits, -allow-ip, -no-allowlist, -expires, -no-expiry, -disable or -enable"}
		}
		switch {
		case *enable:
			k.State = keywardv1.APIKeyState_API_KEY_STATE_ACTIVE
		case *disable:
			k.State = keywardv1.APIKeyState_API_KEY_STATE_DISABLED
		}
		r, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: k, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths}})
		if err != nil {
			return client.Wrap(err)
		}
		return e.printAPIKey(r.GetKey(), r)
	case "usage":
		req := &keywardv1.GetAPIKeyUsageRequest{Id: *id}
		if *window > 0 {
			req.Window = durationpb.New(*window)
		}
		r, err := ac.GetAPIKeyUsage(ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		if e.json {
			return e.printJSON(r)
		}
		last := "never"
		if r.GetLastUsedTime() != nil {
			last = r.GetLastUsedTime().AsTime().Format(time.RFC3339)
		}
		fmt.Fprintf(e.stdout, "%s: last used %s\n", r.GetId(), last)
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "HOUR\tOUTCOMES\tNETWORKS")
		for _, h := range r.GetHours() {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", h.GetHour().AsTime().Format("2006-01-02 15:04Z"), counts(h.GetUsage().GetCounts()), counts(h.GetUsage().GetNetworks()))
		}
		fmt.Fprintf(tw, "total\t%s\t%s\n", counts(r.GetTotal().GetCounts()), counts(r.GetTotal().GetNetworks()))
		return tw.Flush()
	}
	return nil
}

// secretFile is where -secret-out puts a new secret: a 0600 file made in
// the target's directory before the call, so that a path that cannot be
// written fails before a key is issued or rotated, and renamed over the
// target once the secret is in it.
type secretFile struct {
	f    *os.File
	path string
}

func newSecretFile(path string) (*secretFile, error) {
	if path == "" || path == "-" {
		return nil, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".keyward-secret-*")
	if err != nil {
		return nil, fmt.Errorf("-secret-out: %w (nothing was done)", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("-secret-out: %w (nothing was done)", err)
	}
	return &secretFile{f: f, path: path}, nil
}

// discard removes the file of a call that failed.
func (s *secretFile) discard() {
	if s != nil {
		s.f.Close()
		os.Remove(s.f.Name())
	}
}

func (s *secretFile) commit(secret string) error {
	_, err := s.f.WriteString(secret + "\n")
	if err == nil {
		err = s.f.Sync()
	}
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(s.f.Name(), s.path)
	}
	if err != nil {
		os.Remove(s.f.Name())
	}
	return err
}

// printSecret writes a new secret to standard output or its -secret-out
// file, and what it belongs to on standard error: a script reads the secret
// alone. With -output json the answer goes to standard output as JSON,
// without the secret if a file took it.
func (e *env) printSecret(out *secretFile, secret string, k *keywardv1.APIKey, did string, r proto.Message) error {
	if out == nil {
		if e.json {
			return e.printJSON(r)
		}
		if _, err := fmt.Fprintln(e.stdout, secret); err != nil {
			return err
		}
	} else if err := out.commit(secret); err != nil {
		return fmt.Errorf("%s %s, but its secret could not be written to %s (%w): the secret is lost; %s", did, k.GetId(), out.path, err,
			map[string]string{"created": "revoke the key and create another", "rotated": "rotate it again"}[did])
	} else if e.json {
		return e.printJSON(k)
	}
	fmt.Fprintf(e.stderr, "%s %s (%s, owner %s, %s); the secret is shown this once\n", did, k.GetId(), k.GetName(), k.GetOwner(), k.GetEnvironment())
	return nil
}

func (e *env) printAPIKey(k *keywardv1.APIKey, r proto.Message) error {
	if e.json {
		return e.printJSON(r)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	row := func(name, v string) { fmt.Fprintf(tw, "%s\t%s\n", name, v) }
	row("id", k.GetId())
	row("owner", k.GetOwner())
	row("name", k.GetName())
	row("environment", k.GetEnvironment())
	row("state", apiKeyStateName(k.GetState()))
	row("permissions", strings.Join(k.GetPermissions(), ", "))
	row("created", k.GetCreateTime().AsTime().Format(time.RFC3339))
	if k.GetExpireTime() != nil {
		row("expires", k.GetExpireTime().AsTime().Format(time.RFC3339))
	}
	if len(k.GetAllowedIps()) > 0 {
		row("allowed ips", strings.Join(k.GetAllowedIps(), ", "))
	}
	var ls []string
	for _, l := range k.GetRateLimits() {
		ls = append(ls, fmtLimit(l))
	}
	if len(ls) == 0 {
		ls = []string{"none"}
	}
	row("rate limits", strings.Join(ls, ", "))
	if q := k.GetQuota(); q != nil {
		s := fmt.Sprintf("%d left", q.GetRemaining())
		if q.GetRefill() > 0 {
			s += fmt.Sprintf(", refilled to %d every %v", q.GetRefill(), q.GetRefillEvery().AsDuration())
		}
		row("quota", s)
	}
	if len(k.GetTags()) > 0 {
		row("tags", strings.Join(k.GetTags(), ", "))
	}
	for _, name := range slices.Sorted(maps.Keys(k.GetMetadata())) {
		row("metadata "+name, k.GetMetadata()[name])
	}
	for i, s := range k.GetSecrets() {
		v := "created " + s.GetCreateTime().AsTime().Format(time.RFC3339)
		if s.GetNotAfter() != nil {
			v += ", works until " + s.GetNotAfter().AsTime().Format(time.RFC3339)
		}
		row(fmt.Sprintf("secret %d", i+1), v)
	}
	return tw.Flush()
}

func apiKeyStateName(s keywardv1.APIKeyState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "API_KEY_STATE_"))
}

func fmtLimit(l *keywardv1.RateLimit) string {
	return fmt.Sprintf("%d/%v,burst=%d", l.GetLimit(), l.GetPer().AsDuration(), l.GetBurst())
}

func counts(m map[string]int64) string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, fmt.Sprintf("%s=%d", k, m[k]))
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, " ")
}
