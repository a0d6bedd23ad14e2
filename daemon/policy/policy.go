// Package policy decides what a caller may do. A policy file binds callers,
// picked by what the kernel says about them (uid, user, gid, group, binary
// path, binary SHA-256, and the cgroup: its path, systemd unit, Kubernetes
// pod UID and container ID), to roles, and grants roles operations on keys whose
// names match a glob. Everything not granted is denied, and a denial names the
// permission that was missing, never the policy's contents.
//
// Each caller also has a budget (Limits): the connections it may hold, the
// calls it may have in flight and the rate it may call at, set per role,
// with defaults for roles that set none and a small budget for callers no
// binding matches (package admission enforces them).
//
// The file is YAML, read strictly: an unknown field, an unknown operation, a
// user or group the system does not know, or a bad glob is an error that names
// its line. See docs/policy.md.
package policy

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os/user"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// ErrDenied is what every refusal matches with errors.Is.
var ErrDenied = errors.New("permission denied")

// Denied says which permission a caller lacked.
type Denied struct {
	Op  string // the operation, e.g. "EnvelopeService.Decrypt"
	Key string // the key name; empty for operations on no key
}

func (d *Denied) Error() string {
	if d.Key == "" {
		return fmt.Sprintf("permission denied: this caller is not granted %s", d.Op)
	}
	return fmt.Sprintf("permission denied: this caller is not granted %s on key %q", d.Op, d.Key)
}

// Is makes errors.Is(err, ErrDenied) true.
func (d *Denied) Is(target error) bool { return target == ErrDenied }

// Subject is what the policy knows of a caller: the kernel's account.
type Subject struct {
	UID       uint32
	GIDs      []uint32 // the primary group first, then the supplementary ones
	Exe       string   // absolute path of the binary; empty if unknown
	ExeSHA256 string   // hex; empty if unknown
	// Cgroup is the path of the caller's cgroup as the kernel said it when
	// the caller connected; empty if unknown. SystemdUnit, PodUID and
	// ContainerID are derived from it (identity.Cgroup); empty if it names
	// none.
	Cgroup      string
	SystemdUnit string
	PodUID      string
	ContainerID string
}

// Policy is a parsed policy file. It is immutable and safe for concurrent
// use; a reload makes a new one.
type Policy struct {
	bindings []binding
	roles    map[string]*role
	unbound  Limits // the budget of a caller no binding matches
}

// SelectsCgroups says whether a binding names callers by their cgroup
// (cgroup, systemd_unit, k8s_pod_uid, container_id): on a host without
// the cgroup v2 hierarchy those selectors match nobody.
func (p *Policy) SelectsCgroups() bool {
	for _, b := range p.bindings {
		for _, s := range b.selectors {
			if s.cgroup != "" || s.unit != "" || s.pod != "" || s.container != "" {
				return true
			}
		}
	}
	return false
}

type binding struct {
	role      string
	selectors []selector
}

// selector matches a caller when every field it sets matches.
type selector struct {
	uid, gid  *uint32
	exe, hash string
	cgroup    string // a glob over cgroup paths, matching the cgroup or one above it
	unit      string // a glob over systemd unit names
	pod       string // a pod UID
	container string // a container ID or its first 12 or more hex digits
}

type role struct {
	perms    []perm
	maxBatch int
	tokens   TokenGrant
	limits   Limits // its own, over the policy's default, over DefaultLimits
}

// Limits is a caller's budget. A caller is a uid: every connection of the
// uid counts against one budget, whatever process or binary holds it.
type Limits struct {
	// Connections is how many connections the caller may hold at once.
	Connections int
	// Calls is how many calls the caller may have in flight at once.
	Calls int
	// Rate limits the calls it starts; empty: no limit.
	Rate []ratelimit.Layer
	// Lifetime, if not 0, closes each of its connections this long after
	// it was made: for callers no binding matches, so that they cannot hold
	// connections that serve them nothing.
	Lifetime time.Duration
}

// DefaultLimits is the budget of a role that sets none, where the policy's
// limits.default does not say otherwise: enough for an application that
// keeps a few connections busy, small enough that 2 000 callers cannot
// hold a million connections between them.
var DefaultLimits = Limits{Connections: 32, Calls: 64}

// UnboundLimits is the budget of a caller no binding matches, where the
// policy's limits.unbound does not say otherwise: enough to be told what
// it lacks (every call it makes is denied and audited), not to keep
// keywardd busy.
var UnboundLimits = Limits{Connections: 2, Calls: 2, Rate: []ratelimit.Layer{{Limit: 10, Per: time.Second, Burst: 20}}, Lifetime: 2 * time.Second}

// TokenGrant is what a caller may put in the tokens it mints: audience and
// scope globs, custom claim names, the longest lifetime, and whether it may
// name the subject (otherwise the subject is the caller's own identity).
type TokenGrant struct {
	Audiences  []string
	Scopes     []string
	Claims     []string
	MaxTTL     time.Duration
	AnySubject bool
}

type perm struct {
	ops  []string // exact operation names, "Service.*" or "*"
	keys []string // path.Match globs
}

// file is the YAML form.
type file struct {
	Version  int                 `yaml:"version"`
	Limits   policyLimitsSpec    `yaml:"limits"`
	Roles    map[string]roleSpec `yaml:"roles"`
	Bindings []bindingSpec       `yaml:"bindings"`
}

type roleSpec struct {
	Permissions []permSpec  `yaml:"permissions"`
	MaxBatch    int         `yaml:"max_batch"`
	Tokens      *tokensSpec `yaml:"tokens"`
	Limits      limitsSpec  `yaml:"limits"`
}

type policyLimitsSpec struct {
	Default limitsSpec `yaml:"default"`
	Unbound limitsSpec `yaml:"unbound"`
}

// limitsSpec is a budget as written: a field not given is taken from the
// budget below it (a role's from the default's).
type limitsSpec struct {
	Connections *int              `yaml:"connections"`
	Calls       *int              `yaml:"calls"`
	Rate        []ratelimit.Layer `yaml:"rate"` // nil: not given; []: no limit
	Lifetime    *time.Duration    `yaml:"lifetime"`
}

// over returns base with what ls gives put over it. where names ls in
// errors; lifetime says whether it may set one.
func (ls limitsSpec) over(base Limits, where string, lifetime bool) (Limits, error) {
	l := base
	for _, n := range []struct {
		v    *int
		to   *int
		name string
	}{{ls.Connections, &l.Connections, "connections"}, {ls.Calls, &l.Calls, "calls"}} {
		if n.v == nil {
			continue
		}
		if *n.v < 1 {
			return l, fmt.Errorf("policy: %s: limits.%s is %d; give at least 1", where, n.name, *n.v)
		}
		*n.to = *n.v
	}
	if ls.Rate != nil {
		if err := ratelimit.CheckLayers(ls.Rate); err != nil {
			return l, fmt.Errorf("policy: %s: limits.rate: %v", where, err)
		}
		l.Rate = ls.Rate
	}
	switch {
	case ls.Lifetime == nil:
	case !lifetime:
		return l, fmt.Errorf("policy: %s: limits.lifetime is for limits.unbound only (callers no binding matches)", where)
	case *ls.Lifetime < 0:
		return l, fmt.Errorf("policy: %s: limits.lifetime %v is negative; 0 keeps connections open", where, *ls.Lifetime)
	default:
		l.Lifetime = *ls.Lifetime
	}
	return l, nil
}

type tokensSpec struct {
	Audiences []lined[string] `yaml:"audiences"`
	Scopes    []lined[string] `yaml:"scopes"`
	Claims    []lined[string] `yaml:"claims"`
	MaxTTL    lined[string]   `yaml:"max_ttl"`
	Subject   lined[string]   `yaml:"subject"` // "self" (default) or "any"
}

type permSpec struct {
	Operations []lined[string] `yaml:"operations"`
	Keys       []lined[string] `yaml:"keys"`
}

type bindingSpec struct {
	Role    lined[string]  `yaml:"role"`
	Callers []selectorSpec `yaml:"callers"`
}

type selectorSpec struct {
	UID    lined[uint32] `yaml:"uid"`
	User   lined[string] `yaml:"user"`
	GID    lined[uint32] `yaml:"gid"`
	Group  lined[string] `yaml:"group"`
	Binary lined[string] `yaml:"binary"`
	SHA256 lined[string] `yaml:"sha256"`
	// The caller's cgroup, and names derived from it.
	Cgroup      lined[string] `yaml:"cgroup"`
	SystemdUnit lined[string] `yaml:"systemd_unit"`
	PodUID      lined[string] `yaml:"k8s_pod_uid"`
	ContainerID lined[string] `yaml:"container_id"`
}

// lined is a scalar with the line it stood on, for error messages.
type lined[T any] struct {
	V    T
	Line int
	Set  bool
}

func (l *lined[T]) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: expected a single value", n.Line)
	}
	l.Line, l.Set = n.Line, true
	return n.Decode(&l.V)
}

// Parse reads a policy. ops are the operation names the daemon has; the
// policy may name them, "Service.*" for all of a service's, or "*".
func Parse(data []byte, ops []string) (*Policy, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f file
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	var extra yaml.Node
	if dec.Decode(&extra) == nil {
		return nil, fmt.Errorf("policy: line %d: a second YAML document; a policy is one document", extra.Line)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("policy: version %d is not supported; write version: 1", f.Version)
	}
	def, err := f.Limits.Default.over(DefaultLimits, "limits.default", false)
	if err != nil {
		return nil, err
	}
	p := &Policy{roles: map[string]*role{}}
	if p.unbound, err = f.Limits.Unbound.over(UnboundLimits, "limits.unbound", true); err != nil {
		return nil, err
	}
	for name, rs := range f.Roles {
		r, err := parseRole(name, rs, ops, def)
		if err != nil {
			return nil, err
		}
		p.roles[name] = r
	}
	for _, bs := range f.Bindings {
		if !bs.Role.Set {
			return nil, errors.New("policy: a binding without a role")
		}
		if _, ok := p.roles[bs.Role.V]; !ok {
			return nil, fmt.Errorf("policy: line %d: role %q is not defined under roles", bs.Role.Line, bs.Role.V)
		}
		if len(bs.Callers) == 0 {
			return nil, fmt.Errorf("policy: line %d: the binding of role %q has no callers", bs.Role.Line, bs.Role.V)
		}
		b := binding{role: bs.Role.V}
		for _, ss := range bs.Callers {
			s, err := parseSelector(ss, bs.Role)
			if err != nil {
				return nil, err
			}
			b.selectors = append(b.selectors, s)
		}
		p.bindings = append(p.bindings, b)
	}
	return p, nil
}

func parseRole(name string, rs roleSpec, ops []string, def Limits) (*role, error) {
	if rs.MaxBatch < 0 {
		return nil, fmt.Errorf("policy: role %q: max_batch %d is negative", name, rs.MaxBatch)
	}
	r := &role{maxBatch: rs.MaxBatch}
	var err error
	if r.limits, err = rs.Limits.over(def, fmt.Sprintf("role %q", name), false); err != nil {
		return nil, err
	}
	if rs.Tokens != nil {
		g, err := parseTokens(name, rs.Tokens)
		if err != nil {
			return nil, err
		}
		r.tokens = g
	}
	for _, ps := range rs.Permissions {
		if len(ps.Operations) == 0 || len(ps.Keys) == 0 {
			return nil, fmt.Errorf("policy: role %q: every permission needs operations and keys (use keys: [\"*\"] for all)", name)
		}
		var pm perm
		for _, op := range ps.Operations {
			if !knownOp(op.V, ops) {
				return nil, fmt.Errorf("policy: line %d: unknown operation %q; known: %s, Service.* or *", op.Line, op.V, strings.Join(ops, ", "))
			}
			pm.ops = append(pm.ops, op.V)
		}
		for _, k := range ps.Keys {
			if _, err := path.Match(k.V, ""); err != nil || k.V == "" || strings.Contains(k.V, "/") {
				return nil, fmt.Errorf("policy: line %d: key pattern %q is not a valid glob of key names", k.Line, k.V)
			}
			pm.keys = append(pm.keys, k.V)
		}
		r.perms = append(r.perms, pm)
	}
	return r, nil
}

var claimName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

func parseTokens(role string, ts *tokensSpec) (TokenGrant, error) {
	var g TokenGrant
	for _, set := range []struct {
		from []lined[string]
		to   *[]string
		what string
	}{{ts.Audiences, &g.Audiences, "audience"}, {ts.Scopes, &g.Scopes, "scope"}} {
		for _, v := range set.from {
			if _, err := path.Match(v.V, ""); err != nil || v.V == "" {
				return g, fmt.Errorf("policy: line %d: %s pattern %q is not a valid glob", v.Line, set.what, v.V)
			}
			*set.to = append(*set.to, v.V)
		}
	}
	for _, c := range ts.Claims {
		if !claimName.MatchString(c.V) {
			return g, fmt.Errorf("policy: line %d: claim name %q: use lower-case letters, digits and _", c.Line, c.V)
		}
		g.Claims = append(g.Claims, c.V)
	}
	if ts.MaxTTL.Set {
		d, err := time.ParseDuration(ts.MaxTTL.V)
		if err != nil || d <= 0 {
			return g, fmt.Errorf("policy: line %d: max_ttl %q is not a positive duration such as 15m", ts.MaxTTL.Line, ts.MaxTTL.V)
		}
		g.MaxTTL = d
	}
	switch ts.Subject.V {
	case "", "self":
	case "any":
		g.AnySubject = true
	default:
		return g, fmt.Errorf("policy: line %d: subject %q: use self or any", ts.Subject.Line, ts.Subject.V)
	}
	if len(g.Audiences) == 0 {
		return g, fmt.Errorf("policy: role %q: tokens need at least one audience", role)
	}
	return g, nil
}

// Tokens is what the subject's roles together let it put in tokens: the
// union of their audiences, scopes and claims, the longest max TTL, and any
// subject if one of them allows it. A subject with no token grant gets the
// zero TokenGrant, which allows no audience.
func (p *Policy) Tokens(sub Subject) TokenGrant {
	var g TokenGrant
	for _, name := range p.Roles(sub) {
		t := p.roles[name].tokens
		g.Audiences = append(g.Audiences, t.Audiences...)
		g.Scopes = append(g.Scopes, t.Scopes...)
		g.Claims = append(g.Claims, t.Claims...)
		g.MaxTTL = max(g.MaxTTL, t.MaxTTL)
		g.AnySubject = g.AnySubject || t.AnySubject
	}
	return g
}

// Check says whether a token with these audiences, scopes, custom claim
// names, lifetime and subject choice is within the grant, naming the first
// thing that is not.
func (g TokenGrant) Check(audiences, scopes, claims []string, ttl time.Duration, namesSubject bool) error {
	match := func(globs []string, v string) bool {
		return slices.ContainsFunc(globs, func(pat string) bool { ok, _ := path.Match(pat, v); return ok })
	}
	for _, a := range audiences {
		if !match(g.Audiences, a) {
			return &Denied{Op: fmt.Sprintf("a token for audience %q", a)}
		}
	}
	for _, s := range scopes {
		if !match(g.Scopes, s) {
			return &Denied{Op: fmt.Sprintf("a token with scope %q", s)}
		}
	}
	for _, c := range claims {
		if !slices.Contains(g.Claims, c) {
			return &Denied{Op: fmt.Sprintf("a token with claim %q", c)}
		}
	}
	if g.MaxTTL > 0 && ttl > g.MaxTTL {
		return &Denied{Op: fmt.Sprintf("a token living %v (at most %v)", ttl, g.MaxTTL)}
	}
	if namesSubject && !g.AnySubject {
		return &Denied{Op: "a token with a subject of its choosing (it gets its own identity)"}
	}
	return nil
}

func knownOp(op string, ops []string) bool {
	if op == "*" || slices.Contains(ops, op) {
		return true
	}
	if svc, ok := strings.CutSuffix(op, ".*"); ok {
		return slices.ContainsFunc(ops, func(o string) bool { return strings.HasPrefix(o, svc+".") })
	}
	return false
}

func parseSelector(ss selectorSpec, role lined[string]) (selector, error) {
	var s selector
	line := role.Line
	for _, l := range []int{ss.UID.Line, ss.User.Line, ss.GID.Line, ss.Group.Line, ss.Binary.Line, ss.SHA256.Line,
		ss.Cgroup.Line, ss.SystemdUnit.Line, ss.PodUID.Line, ss.ContainerID.Line} {
		if l > 0 {
			line = l
			break
		}
	}
	fail := func(format string, a ...any) (selector, error) {
		return selector{}, fmt.Errorf("policy: line %d: "+format, append([]any{line}, a...)...)
	}
	if ss.UID.Set && ss.User.Set || ss.GID.Set && ss.Group.Set {
		return fail("give uid or user, gid or group, not both")
	}
	switch {
	case ss.UID.Set:
		s.uid = &ss.UID.V
	case ss.User.Set:
		u, err := user.Lookup(ss.User.V)
		if err != nil {
			return fail("user %q is not known on this system", ss.User.V)
		}
		n, _ := strconv.ParseUint(u.Uid, 10, 32)
		uid := uint32(n)
		s.uid = &uid
	}
	switch {
	case ss.GID.Set:
		s.gid = &ss.GID.V
	case ss.Group.Set:
		g, err := user.LookupGroup(ss.Group.V)
		if err != nil {
			return fail("group %q is not known on this system", ss.Group.V)
		}
		n, _ := strconv.ParseUint(g.Gid, 10, 32)
		gid := uint32(n)
		s.gid = &gid
	}
	if ss.Binary.Set {
		if !filepath.IsAbs(ss.Binary.V) || filepath.Clean(ss.Binary.V) != ss.Binary.V {
			return fail("binary %q must be a clean absolute path", ss.Binary.V)
		}
		s.exe = ss.Binary.V
	}
	if ss.SHA256.Set {
		h := strings.ToLower(ss.SHA256.V)
		if b, err := hex.DecodeString(h); err != nil || len(b) != 32 {
			return fail("sha256 %q is not 64 hex digits", ss.SHA256.V)
		}
		s.hash = h
	}
	if err := parseCgroupFields(ss, &s); err != nil {
		return fail("%v", err)
	}
	inCgroup := s.cgroup != "" || s.unit != "" || s.pod != "" || s.container != ""
	if s.uid == nil && s.gid == nil && s.exe == "" && s.hash == "" && !inCgroup {
		return fail("a caller entry must give at least one of uid, user, gid, group, cgroup, systemd_unit, k8s_pod_uid, container_id, binary, sha256")
	}
	if s.uid == nil && s.gid == nil && !inCgroup {
		// A process can connect and then exec an allowed binary, and any
		// process of a user (or of a container) can act as another process
		// of it: the binary narrows a grant, it does not stand for one.
		return fail("binary and sha256 narrow a grant to a user, group or cgroup; add the uid/user or gid/group the program runs as, or its cgroup, systemd_unit, k8s_pod_uid or container_id")
	}
	return s, nil
}

// unitSuffixes are the kinds of systemd unit that hold processes.
var unitSuffixes = []string{".service", ".scope", ".socket", ".mount", ".swap"}

var (
	podUID      = regexp.MustCompile(`^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$`)
	containerID = regexp.MustCompile(`^[0-9a-f]{12,64}$`)
)

// parseCgroupFields checks and sets the selector's cgroup fields.
func parseCgroupFields(ss selectorSpec, s *selector) error {
	if v := ss.Cgroup; v.Set {
		if _, err := path.Match(v.V, ""); err != nil || !strings.HasPrefix(v.V, "/") || path.Clean(v.V) != v.V || slices.Contains(strings.Split(v.V, "/"), "..") {
			return fmt.Errorf("cgroup %q must be a clean absolute path (a glob: * stands for one name) such as /system.slice/orders.service", v.V)
		}
		s.cgroup = v.V
	}
	if v := ss.SystemdUnit; v.Set {
		_, err := path.Match(v.V, "")
		if err != nil || v.V == "" || strings.Contains(v.V, "/") ||
			!strings.HasSuffix(v.V, "*") && !slices.ContainsFunc(unitSuffixes, func(x string) bool { return strings.HasSuffix(v.V, x) }) {
			return fmt.Errorf("systemd_unit %q must be a unit's name (a glob) ending in %s, such as orders.service", v.V, strings.Join(unitSuffixes, ", "))
		}
		s.unit = v.V
	}
	if v := ss.PodUID; v.Set {
		if s.pod = strings.ToLower(v.V); !podUID.MatchString(s.pod) {
			return fmt.Errorf("k8s_pod_uid %q is not a pod's UID (metadata.uid, such as 1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901)", v.V)
		}
	}
	if v := ss.ContainerID; v.Set {
		if s.container = strings.ToLower(v.V); !containerID.MatchString(s.container) {
			return fmt.Errorf("container_id %q is not a container's ID: 12 to 64 hex digits (docker ps shows 12)", v.V)
		}
	}
	return nil
}

// inCgroup says whether the cgroup path p is matched by the glob pat or
// is below a cgroup that is: a process below a cgroup can move only
// within it (or be moved by one allowed to write above it).
func inCgroup(pat, p string) bool {
	if !strings.HasPrefix(p, "/") || p == "/.." || strings.HasPrefix(p, "/../") {
		return false // unknown, or outside keywardd's cgroup namespace
	}
	for {
		if ok, _ := path.Match(pat, p); ok {
			return true
		}
		if p == "/" {
			return false
		}
		p = path.Dir(p)
	}
}

func (s selector) matches(sub Subject) bool {
	return (s.uid == nil || *s.uid == sub.UID) &&
		(s.gid == nil || slices.Contains(sub.GIDs, *s.gid)) &&
		(s.exe == "" || s.exe == sub.Exe) &&
		(s.hash == "" || s.hash == sub.ExeSHA256) &&
		(s.cgroup == "" || inCgroup(s.cgroup, sub.Cgroup)) &&
		(s.unit == "" || sub.SystemdUnit != "" && globMatch(s.unit, sub.SystemdUnit)) &&
		(s.pod == "" || s.pod == sub.PodUID) &&
		(s.container == "" || sub.ContainerID != "" && strings.HasPrefix(sub.ContainerID, s.container))
}

func globMatch(pat, name string) bool {
	ok, _ := path.Match(pat, name)
	return ok
}

// Roles lists the roles the subject holds.
func (p *Policy) Roles(sub Subject) []string {
	var out []string
	for _, b := range p.bindings {
		if !slices.Contains(out, b.role) && slices.ContainsFunc(b.selectors, func(s selector) bool { return s.matches(sub) }) {
			out = append(out, b.role)
		}
	}
	return out
}

// Allow returns nil if a role of the subject grants op on the key named key,
// and a *Denied otherwise. For an operation on no key (key empty) a
// permission that lists the operation is enough, whatever its key globs.
func (p *Policy) Allow(sub Subject, op, key string) error {
	for _, name := range p.Roles(sub) {
		if p.roles[name].grants(op, key) {
			return nil
		}
	}
	return &Denied{Op: op, Key: key}
}

// AllowEveryKey returns nil if a role of the subject grants op with the key
// glob "*" itself (not merely a glob that happens to match the text "*"),
// and a *Denied otherwise: for operations that reach any key at all.
func (p *Policy) AllowEveryKey(sub Subject, op string) error {
	for _, name := range p.Roles(sub) {
		for _, pm := range p.roles[name].perms {
			if pm.hasOp(op) && slices.Contains(pm.keys, "*") {
				return nil
			}
		}
	}
	return &Denied{Op: op, Key: "*"}
}

// Limits is the budget of a caller with the subject's identity, and
// whether any binding matched it (if none did, the budget is the policy's
// for unbound callers). A caller with several roles gets the most
// generous of each part of their budgets: the most connections, the most
// calls, and a rate limit only on the periods every one of its roles
// limits, at the highest of their limits and bursts.
func (p *Policy) Limits(sub Subject) (Limits, bool) {
	names := p.Roles(sub)
	if len(names) == 0 {
		return p.unbound, false
	}
	l := p.roles[names[0]].limits
	for _, name := range names[1:] {
		r := p.roles[name].limits
		l.Connections = max(l.Connections, r.Connections)
		l.Calls = max(l.Calls, r.Calls)
		var rate []ratelimit.Layer
		for _, a := range l.Rate {
			if i := slices.IndexFunc(r.Rate, func(b ratelimit.Layer) bool { return b.Per == a.Per }); i >= 0 {
				rate = append(rate, ratelimit.Layer{Limit: max(a.Limit, r.Rate[i].Limit), Per: a.Per, Burst: max(a.Burst, r.Rate[i].Burst)})
			}
		}
		l.Rate = rate
	}
	return l, true
}

// MaxConnections is the most connections any caller with this uid could
// be allowed, whatever its groups and binary, and whether any binding could
// match the uid at all: what keywardd can tell from the uid alone, before
// it reads anything else about the caller.
func (p *Policy) MaxConnections(uid uint32) (n int, bindable bool) {
	n = p.unbound.Connections
	for _, b := range p.bindings {
		if slices.ContainsFunc(b.selectors, func(s selector) bool { return s.uid == nil || *s.uid == uid }) {
			n, bindable = max(n, p.roles[b.role].limits.Connections), true
		}
	}
	return n, bindable
}

// MaxBatch is the largest batch the subject may send to op: the most any of
// its roles granting op allows (0 if none sets it).
func (p *Policy) MaxBatch(sub Subject, op string) int {
	n := 0
	for _, name := range p.Roles(sub) {
		if r := p.roles[name]; r.grants(op, "") {
			n = max(n, r.maxBatch)
		}
	}
	return n
}

func (r *role) grants(op, key string) bool {
	for _, pm := range r.perms {
		if !pm.hasOp(op) {
			continue
		}
		if key == "" {
			return true
		}
		for _, k := range pm.keys {
			if ok, _ := path.Match(k, key); ok {
				return true
			}
		}
	}
	return false
}

func (pm perm) hasOp(op string) bool {
	for _, o := range pm.ops {
		if o == "*" || o == op {
			return true
		}
		if svc, ok := strings.CutSuffix(o, ".*"); ok && strings.HasPrefix(op, svc+".") {
			return true
		}
	}
	return false
}
