package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/limitwin"
)

// errRefused: apikey verify's key is not VALID (exit 1; the verdict is
// printed).
var errRefused = errors.New("the key is refused")

// idFlag is the required -id of a verb about one API key.
func idFlag(f *flagSet) *string {
	id := f.String("id", "", "the key's ID (ak_...)")
	f.Required("id")
	return id
}

func secretOutFlag(f *flagSet) *string {
	return f.String("secret-out", "", "write the secret to this file (mode 0600) instead of standard output")
}

func apikeyCreate(f *flagSet) action {
	owner := f.String("owner", "", "who the key belongs to")
	name := f.String("name", "", "what it is for")
	envName := f.String("env", "", "the environment it works in (dev, staging, prod)")
	perms := f.StringArray("perm", nil, "read-only, standard, admin or resource:action (repeatable)")
	expires := f.Time("expires", "expiry time (RFC 3339)")
	ttl := f.Duration("ttl", 0, "lifetime (a temporary key)")
	ips := f.StringArray("allow-ip", nil, "CIDR or address it may be used from (repeatable)")
	countries := f.StringSlice("country", nil, "ISO 3166-1 alpha-2 country it may be used from (repeatable or comma-separated; keywardd needs geoip.database)")
	var limits limitList
	f.Var(&limits, "limit", "rate limit (repeatable; default: the role's)")
	unlimited := f.Bool("unlimited", false, "no rate limit at all")
	quota := f.Int64("quota", 0, "usage quota: uses left (default: no quota)")
	quotaRefill := f.String("quota-refill", "", "refill the quota to N every PERIOD (N/PERIOD)")
	tags := f.StringArray("tag", nil, "tag (repeatable)")
	meta := f.Pairs("meta", "metadata k=v (repeatable)")
	out := secretOutFlag(f)
	f.Required("owner", "name", "env", "perm")
	return func(e *env, _ []string) error {
		if err := countriesGiven(f, *countries); err != nil {
			return err
		}
		req := &keywardv1.CreateAPIKeyRequest{Owner: *owner, Name: *name, Environment: *envName, Permissions: *perms, ExpireTime: timestamp(*expires),
			AllowedIps: *ips, AllowedCountries: *countries, RateLimits: limits, Unlimited: *unlimited, Tags: *tags, Metadata: meta}
		if *ttl != 0 {
			req.Ttl = durationpb.New(*ttl)
		}
		if f.Changed("quota") || *quotaRefill != "" {
			req.Quota = &keywardv1.Quota{Remaining: max(*quota, 0)}
			if *quotaRefill != "" {
				n, per, err := parseRate(*quotaRefill)
				if err != nil {
					return usageError{msg: "--quota-refill: " + err.Error()}
				}
				req.Quota.Refill, req.Quota.RefillEvery = int64(n), durationpb.New(per)
				if !f.Changed("quota") {
					req.Quota.Remaining = int64(n)
				}
			}
		}
		sf, err := newSecretFile(*out)
		if err != nil {
			return err
		}
		r, err := e.api.APIKeys.CreateAPIKey(e.ctx, req)
		if err != nil {
			sf.discard()
			return err
		}
		return e.printSecret(sf, &r.Secret, r.GetKey(), "created", r)
	}
}

// timestamp is t for a request; nil for the zero time.
func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func apikeyVerify(f *flagSet) action {
	envName := f.String("env", "", "the environment the caller runs in")
	perms := f.StringArray("perm", nil, "required permission resource:action (repeatable)")
	ip := f.String("ip", "", "the client's address")
	cost := f.Uint32("cost", 1, "what the request costs")
	in := f.String("in", "", "file holding the key (default standard input)")
	f.Required("env")
	return func(e *env, _ []string) error {
		b, err := e.readInput(*in)
		if err != nil {
			return err
		}
		r, err := e.api.VerifyAPIKey(e.ctx, &keywardv1.VerifyAPIKeyRequest{Key: strings.TrimSpace(string(b)), Permissions: *perms,
			SourceIp: *ip, Environment: *envName, Cost: *cost})
		if err != nil {
			return err
		}
		if err := e.show(r, func(w io.Writer) error { return printVerdict(w, r) }); err != nil {
			return err
		}
		if r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			return fmt.Errorf("%w: %s", errRefused, r.GetReason())
		}
		return nil
	}
}

func printVerdict(w io.Writer, r *keywardv1.VerifyAPIKeyResponse) error {
	fmt.Fprintf(w, "%s", strings.TrimPrefix(r.GetCode().String(), "API_KEY_CODE_"))
	if r.GetKeyId() != "" {
		fmt.Fprintf(w, ": %s (%s, owner %s), permissions %s", r.GetKeyId(), r.GetName(), r.GetOwner(), strings.Join(r.GetPermissions(), ","))
	}
	fmt.Fprintln(w)
	for _, l := range r.GetRateLimits() {
		fmt.Fprintf(w, "  limit %s: %d left, full again %s\n", fmtLimit(l.GetLimit()), l.GetRemaining(), l.GetResetTime().AsTime().Local().Format(time.TimeOnly))
	}
	if r.GetRetryAfter() != nil {
		fmt.Fprintf(w, "  retry after %v\n", r.GetRetryAfter().AsDuration().Round(time.Millisecond))
	}
	if r.GetNearLimit() {
		fmt.Fprintln(w, "  near its rate limit")
	}
	if q := r.GetQuota(); q != nil {
		fmt.Fprintf(w, "  quota: %d left\n", q.GetRemaining())
	}
	return nil
}

func apikeyRotate(f *flagSet) action {
	id := idFlag(f)
	overlap := f.Duration("overlap", 0, "how long the old secret keeps working (0: stop it now; default: by -risk)")
	risk := f.String("risk", "", "default overlap by risk: high (24h) or moderate (48h, the default)")
	f.Complete("risk", "high", "moderate")
	out := secretOutFlag(f)
	return func(e *env, _ []string) error {
		req := &keywardv1.RotateAPIKeyRequest{Id: *id, Risk: *risk}
		if f.Changed("overlap") {
			req.Overlap = durationpb.New(*overlap)
		}
		sf, err := newSecretFile(*out)
		if err != nil {
			return err
		}
		r, err := e.api.APIKeys.RotateAPIKey(e.ctx, req)
		if err != nil {
			sf.discard()
			return err
		}
		if err := e.printSecret(sf, &r.Secret, r.GetKey(), "rotated", r); err != nil {
			return err
		}
		if !e.output.json() && r.GetOldSecretNotAfter() != nil {
			fmt.Fprintf(e.stderr, "the old secret works until %s\n", r.GetOldSecretNotAfter().AsTime().Format(time.RFC3339))
		}
		return nil
	}
}

// revokeFlags are apikey revoke's, and revoke's: one key by -id, or in
// bulk.
func revokeFlags(f *flagSet) func(e *env) (dryRun bool, err error) {
	id := f.String("id", "", "revoke this key; or revoke in bulk with -owner, -tag, -env or -all")
	owner := f.String("owner", "", "bulk: every key of this owner")
	tag := f.String("tag", "", "bulk: every key with this tag")
	envName := f.String("env", "", "bulk: every key of this environment")
	dryRun := f.Bool("dry-run", false, "bulk: count the keys it would revoke; revoke nothing")
	all := f.Bool("all", false, "bulk: every API key you may revoke (the emergency brake)")
	return func(e *env) (bool, error) {
		bulk := *owner != "" || *tag != "" || *envName != "" || *all
		switch {
		case *id != "" && (bulk || *dryRun):
			return false, usageError{msg: "give -id, or -owner/-tag/-env/-all [-dry-run] for bulk, not both"}
		case *all && (*owner != "" || *tag != "" || *envName != ""):
			return false, usageError{msg: "-all revokes every key: give no -owner, -tag or -env with it"}
		case *id != "":
			r, err := e.api.APIKeys.RevokeAPIKey(e.ctx, &keywardv1.RevokeAPIKeyRequest{Id: *id})
			if err != nil {
				return false, err
			}
			k := r.GetKey()
			return false, e.showf(k, "revoked %s (%s, owner %s)\n", k.GetId(), k.GetName(), k.GetOwner())
		case bulk:
			// One call, which says nothing until it is done: a turning bar.
			stop := e.progress("revoking", -1).spin()
			r, err := e.api.APIKeys.RevokeAPIKeys(e.ctx, &keywardv1.RevokeAPIKeysRequest{Owner: *owner, Tag: *tag, Environment: *envName, All: *all, DryRun: *dryRun})
			stop()
			if err != nil {
				return false, err
			}
			if r.GetDryRun() {
				return true, e.showf(r, "would revoke %d keys (dry run: nothing was revoked)\n", r.GetCount())
			}
			return false, e.showf(r, "revoked %d keys\n", r.GetCount())
		}
		return false, usageError{msg: "name the keys: -id, or -owner, -tag, -env or -all for bulk revocation"}
	}
}

func apikeyRevoke(f *flagSet) action {
	revoke := revokeFlags(f)
	return func(e *env, _ []string) error {
		_, err := revoke(e)
		return err
	}
}

// emergencyRevoke is apikey revoke, timed from the command to the moment
// the store has it, after which every verify refuses the keys.
func emergencyRevoke(f *flagSet) action {
	revoke := revokeFlags(f)
	return func(e *env, _ []string) error {
		start := time.Now()
		dry, err := revoke(e)
		if err == nil && !dry {
			fmt.Fprintf(e.stderr, "in effect %v after the command: every verify from now on refuses the keys revoked\n", time.Since(start).Round(time.Millisecond))
		}
		return err
	}
}

func apikeyList(f *flagSet) action {
	owner := f.String("owner", "", "only this owner's keys")
	tag := f.String("tag", "", "only keys with this tag")
	envName := f.String("env", "", "only keys of this environment")
	state := f.Enum("state", "only keys in this state", keywardv1.APIKeyState_name, "API_KEY_STATE_")
	pageSize := f.Uint32("page-size", 0, "keys per call (default 100)")
	return func(e *env, _ []string) error {
		req := &keywardv1.ListAPIKeysRequest{Owner: *owner, Tag: *tag, Environment: *envName, State: keywardv1.APIKeyState(*state), PageSize: *pageSize}
		var keys []*keywardv1.APIKey
		for {
			r, err := e.api.APIKeys.ListAPIKeys(e.ctx, req)
			if err != nil {
				return err
			}
			keys = append(keys, r.GetKeys()...)
			if req.PageToken = r.GetNextPageToken(); req.PageToken == "" {
				break
			}
		}
		return e.show(messages(keys), func(w io.Writer) error {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tOWNER\tNAME\tENV\tSTATE\tPERMISSIONS\tEXPIRES")
			for _, k := range keys {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.GetId(), k.GetOwner(), k.GetName(), k.GetEnvironment(), short(k.GetState(), "API_KEY_STATE_"),
					strings.Join(k.GetPermissions(), ","), timeOr(k.GetExpireTime(), "-"))
			}
			return tw.Flush()
		})
	}
}

func apikeyShow(f *flagSet) action {
	id := idFlag(f)
	return func(e *env, _ []string) error {
		r, err := e.api.APIKeys.GetAPIKey(e.ctx, &keywardv1.GetAPIKeyRequest{Id: *id})
		if err != nil || e.output.json() {
			return e.showAPIKey(r.GetKey(), err)
		}
		if err := printAPIKey(e.stdout, r.GetKey()); err != nil {
			return err
		}
		// The limit windows covering it, past ones of the last 30 days
		// too: what the key was allowed when.
		ws, err := e.api.APIKeys.ListLimitWindows(e.ctx, &keywardv1.ListLimitWindowsRequest{KeyId: *id, IncludeEnded: true})
		if status.Code(err) == codes.PermissionDenied {
			fmt.Fprintln(e.stdout, "limit windows: not shown (you are not granted APIKeyService.ListLimitWindows on its owner)")
			return nil
		}
		if err != nil {
			return err
		}
		if f := ws.GetFactorNow(); f != 1 {
			fmt.Fprintf(e.stdout, "rate limits now: %s (×%s, window %s)\n", limitsText(ws.GetLimitsNow()),
				limitwin.FormatFactor(f), ws.GetActiveWindow())
		}
		if len(ws.GetWindows()) == 0 {
			fmt.Fprintln(e.stdout, "limit windows: none (keyward apikey schedule-limits)")
			return nil
		}
		fmt.Fprintln(e.stdout, "limit windows:")
		return printWindows(e.stdout, ws.GetWindows(), time.Now())
	}
}

// countriesGiven refuses a -country flag that names no country or an
// empty one: -country "$UNSET" must not remove a key's limit (that is
// -any-country) nor make a key without one.
func countriesGiven(f *flagSet, countries []string) error {
	if f.Changed("country") && (len(countries) == 0 || slices.Contains(countries, "")) {
		return usageError{msg: "-country takes country codes (DE, FR); an empty one is refused (to remove the limit: -any-country)"}
	}
	return nil
}

// updates are apikey update's flags, each with the field of the update
// mask it sets.
var updates = []struct{ flag, path string }{
	{"perm", "permissions"},
	{"limit", "rate_limits"}, {"no-limits", "rate_limits"},
	{"allow-ip", "allowed_ips"}, {"no-allowlist", "allowed_ips"},
	{"country", "allowed_countries"}, {"any-country", "allowed_countries"},
	{"expires", "expire_time"}, {"no-expiry", "expire_time"},
	{"enable", "state"}, {"disable", "state"},
}

func apikeyUpdate(f *flagSet) action {
	id := idFlag(f)
	perms := f.StringArray("perm", nil, "the new permissions (repeatable; replaces them all)")
	var limits limitList
	f.Var(&limits, "limit", "the new rate limits (repeatable; replaces them all)")
	f.Bool("no-limits", false, "remove every rate limit")
	ips := f.StringArray("allow-ip", nil, "the new allowlist (repeatable; replaces it)")
	f.Bool("no-allowlist", false, "remove the allowlist")
	countries := f.StringSlice("country", nil, "the new countries it may be used from (repeatable or comma-separated; replaces them)")
	f.Bool("any-country", false, "remove the limit to countries")
	expires := f.Time("expires", "the new expiry time (RFC 3339)")
	f.Bool("no-expiry", false, "remove the expiry")
	disable := f.Bool("disable", false, "disable the key")
	enable := f.Bool("enable", false, "enable a disabled key")
	f.Exclusive("limit", "no-limits")
	f.Exclusive("allow-ip", "no-allowlist")
	f.Exclusive("country", "any-country")
	f.Exclusive("expires", "no-expiry")
	f.Exclusive("disable", "enable")
	return func(e *env, _ []string) error {
		if err := countriesGiven(f, *countries); err != nil {
			return err
		}
		var paths []string
		for _, u := range updates {
			if f.Changed(u.flag) && f.Lookup(u.flag).Value.String() != "false" && !slices.Contains(paths, u.path) {
				paths = append(paths, u.path)
			}
		}
		if len(paths) == 0 {
			return usageError{msg: "name something to change: -perm, -limit, -no-limits, -allow-ip, -no-allowlist, -country, -any-country, -expires, -no-expiry, -disable or -enable"}
		}
		k := &keywardv1.APIKey{Id: *id, Permissions: *perms, RateLimits: limits, AllowedIps: *ips, AllowedCountries: *countries, ExpireTime: timestamp(*expires)}
		switch {
		case *enable:
			k.State = keywardv1.APIKeyState_API_KEY_STATE_ACTIVE
		case *disable:
			k.State = keywardv1.APIKeyState_API_KEY_STATE_DISABLED
		}
		r, err := e.api.APIKeys.UpdateAPIKey(e.ctx, &keywardv1.UpdateAPIKeyRequest{Key: k, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths}})
		return e.showAPIKey(r.GetKey(), err)
	}
}

func apikeyUsage(f *flagSet) action {
	id := idFlag(f)
	window := f.Duration("window", 0, "how far back, at most 168h (default 24h)")
	return func(e *env, _ []string) error {
		req := &keywardv1.GetAPIKeyUsageRequest{Id: *id}
		if *window > 0 {
			req.Window = durationpb.New(*window)
		}
		r, err := e.api.APIKeys.GetAPIKeyUsage(e.ctx, req)
		if err != nil {
			return err
		}
		bounds := make([]time.Duration, len(r.GetLatencyBounds()))
		for i, b := range r.GetLatencyBounds() {
			bounds[i] = b.AsDuration()
		}
		// Countries, with a GeoIP database (keywardd counts none without).
		byCountry := len(r.GetTotal().GetCountries()) > 0
		row := func(tw io.Writer, name string, u *keywardv1.APIKeyUsage) {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s", name, counts(u.GetCounts()),
				latency(bounds, u.GetLatencyCounts(), 0.5), latency(bounds, u.GetLatencyCounts(), 0.99), counts(u.GetNetworks()))
			if byCountry {
				fmt.Fprintf(tw, "\t%s", counts(u.GetCountries()))
			}
			fmt.Fprintln(tw)
		}
		return e.show(r, func(w io.Writer) error {
			fmt.Fprintf(w, "%s: last used %s\n", r.GetId(), timeOr(r.GetLastUsedTime(), "never"))
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			header := "HOUR\tOUTCOMES\tP50\tP99\tNETWORKS"
			if byCountry {
				header += "\tCOUNTRIES"
			}
			fmt.Fprintln(tw, header)
			for _, h := range r.GetHours() {
				row(tw, h.GetHour().AsTime().Format("2006-01-02 15:04Z"), h.GetUsage())
			}
			row(tw, "total", r.GetTotal())
			return tw.Flush()
		})
	}
}

// latency is a latency quantile in a table: the bound of the bucket it
// falls in (apikeys.LatencyQuantile), "≤1ms" or ">1s"; "-" without data.
func latency(bounds []time.Duration, counts []int64, q float64) string {
	e, ok := apikeys.LatencyQuantile(bounds, counts, q)
	if !ok {
		return "-"
	}
	return e.String()
}

// secretFile is where -secret-out puts a new secret: a 0600 file made in
// the target's directory before the call, so that a path that cannot be
// written fails before a key is issued or rotated, and renamed over the
// target once the secret is in it. The target is never followed nor
// replaced where that would hand the secret to someone else or destroy
// something: a symbolic link is refused (renamed over, the link would
// go); /dev/stdout and its kin are standard output; a character device
// (/dev/null) and a FIFO of the caller's own are written to, a FIFO only
// while a reader has it open; anything else is refused.
type secretFile struct {
	f      *os.File
	path   string
	direct bool // f is the target itself
}

func newSecretFile(path string) (*secretFile, error) {
	switch path {
	case "", "-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1":
		return nil, nil
	}
	refuse := func(format string, a ...any) error {
		return fmt.Errorf("--secret-out: "+format+" (nothing was done)", a...)
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, refuse("%w", err)
	case fi.Mode()&fs.ModeSymlink != 0:
		return nil, refuse("%s is a symbolic link: name the file itself", path)
	case fi.IsDir():
		return nil, refuse("%s is a directory: name a file in it", path)
	case fi.Mode()&fs.ModeCharDevice != 0:
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, refuse("%w", err)
		}
		return &secretFile{f: f, path: path, direct: true}, nil
	case fi.Mode()&fs.ModeNamedPipe != 0:
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Getuid() {
			return nil, refuse("%s is a FIFO not of yours: the secret would go to its reader", path)
		}
		// Without a reader, an open for writing would wait for ever (and
		// past Ctrl-C): ask for none, then write as usual.
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if errors.Is(err, syscall.ENXIO) {
			return nil, refuse("no process is reading the FIFO %s: start its reader first", path)
		}
		if err != nil {
			return nil, refuse("%w", err)
		}
		f.Fd() // back to blocking writes
		return &secretFile{f: f, path: path, direct: true}, nil
	case !fi.Mode().IsRegular():
		return nil, refuse("%s is neither a file nor a device", path)
	default:
		// A file of someone else's in a sticky directory (/tmp) cannot be
		// replaced: say so now, not after the key is issued.
		dir := filepath.Dir(path)
		if di, err := os.Stat(dir); err == nil && di.Mode()&fs.ModeSticky != 0 && os.Getuid() != 0 {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
				return nil, refuse("%s belongs to uid %d in the sticky directory %s: you cannot replace it", path, st.Uid, dir)
			}
		}
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".keyward-secret-*")
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, refuse("cannot write a file in %s: %v", dir, err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, refuse("%w", err)
	}
	return &secretFile{f: f, path: path}, nil
}

// discard removes the file of a call that failed.
func (s *secretFile) discard() {
	if s != nil {
		s.f.Close()
		if !s.direct {
			os.Remove(s.f.Name())
		}
	}
}

func (s *secretFile) commit(secret string) error {
	_, err := s.f.WriteString(secret + "\n")
	if s.direct {
		if cerr := s.f.Close(); err == nil {
			err = cerr
		}
		return err
	}
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
// alone. With --output json the answer goes to standard output as JSON,
// without the secret if a file took it.
func (e *env) printSecret(out *secretFile, secret *string, k *keywardv1.APIKey, did string, answer proto.Message) error {
	if out != nil {
		if err := out.commit(*secret); err != nil {
			return fmt.Errorf("%s %s, but its secret could not be written to %s (%w): the secret is lost; %s", did, k.GetId(), out.path, err,
				map[string]string{"created": "revoke the key and create another", "rotated": "rotate it again"}[did])
		}
		*secret = ""
	}
	if e.output.json() {
		return e.printJSON(answer)
	}
	if out == nil {
		if _, err := fmt.Fprintln(e.stdout, *secret); err != nil {
			return err
		}
	}
	fmt.Fprintf(e.stderr, "%s %s (%s, owner %s, %s); the secret is shown this once\n", did, k.GetId(), k.GetName(), k.GetOwner(), k.GetEnvironment())
	return nil
}

// showAPIKey prints the API key a call answered with, unless the call
// failed.
func (e *env) showAPIKey(k *keywardv1.APIKey, err error) error {
	if err != nil {
		return err
	}
	return e.show(k, func(w io.Writer) error { return printAPIKey(w, k) })
}

func printAPIKey(w io.Writer, k *keywardv1.APIKey) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(name, v string) { fmt.Fprintf(tw, "%s\t%s\n", name, v) }
	row("id", k.GetId())
	row("owner", k.GetOwner())
	row("name", k.GetName())
	row("environment", k.GetEnvironment())
	row("state", short(k.GetState(), "API_KEY_STATE_"))
	row("permissions", strings.Join(k.GetPermissions(), ", "))
	row("created", k.GetCreateTime().AsTime().Format(time.RFC3339))
	if k.GetExpireTime() != nil {
		row("expires", k.GetExpireTime().AsTime().Format(time.RFC3339))
	}
	if len(k.GetAllowedIps()) > 0 {
		row("allowed ips", strings.Join(k.GetAllowedIps(), ", "))
	}
	if len(k.GetAllowedCountries()) > 0 {
		row("allowed countries", strings.Join(k.GetAllowedCountries(), ", "))
	}
	row("rate limits", limitsText(k.GetRateLimits()))
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

func apikeyReportLeak(f *flagSet) action {
	in := f.String("in", "", "file holding the string found (default standard input)")
	source := f.String("source", "", "who or what found it, for the record")
	url := f.String("url", "", "where it was found, for the record")
	return func(e *env, _ []string) error {
		b, err := e.readInput(*in)
		if err != nil {
			return err
		}
		r, err := e.api.APIKeys.ReportLeak(e.ctx, &keywardv1.ReportLeakRequest{Secret: strings.TrimSpace(string(b)), Source: *source, Url: *url})
		if err != nil {
			return err
		}
		return e.show(r, func(w io.Writer) error {
			if !r.GetTruePositive() {
				_, err := fmt.Fprintf(w, "false positive: %s\n", r.GetReason())
				return err
			}
			k := r.GetKey()
			_, err := fmt.Fprintf(w, "true positive: %s (%s, owner %s) is %s: %s\n", k.GetId(), k.GetName(), k.GetOwner(),
				short(k.GetState(), "API_KEY_STATE_"), r.GetReason())
			return err
		})
	}
}
