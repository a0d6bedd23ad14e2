package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// nameFlag is the required -name of a verb about one key or credential.
func nameFlag(f *flagSet, usage string) *string {
	name := f.String("name", "", usage)
	f.Required("name")
	return name
}

func keyCreate(f *flagSet) action {
	name := nameFlag(f, "the key's name")
	purpose := f.Enum("purpose", "what the key is for", keywardv1.KeyPurpose_name, "KEY_PURPOSE_")
	algorithm := f.Enum("algorithm", "the algorithm (default: the purpose's)", keywardv1.KeyAlgorithm_name, "KEY_ALGORITHM_")
	rotation := f.Duration("rotation-period", 0, "how often the key should rotate (e.g. 2160h)")
	labels := f.Pairs("label", "a label k=v (repeatable)")
	f.Required("purpose")
	return func(e *env, _ []string) error {
		req := &keywardv1.CreateKeyRequest{Name: *name, Purpose: keywardv1.KeyPurpose(*purpose), Algorithm: keywardv1.KeyAlgorithm(*algorithm), Labels: labels}
		if *rotation > 0 {
			req.RotationPeriod = durationpb.New(*rotation)
		}
		r, err := e.api.Keys.CreateKey(e.ctx, req)
		return e.showKey(r.GetKey(), err)
	}
}

// keyByName is a verb that takes a key's -name and answers with the key.
func keyByName(call func(e *env, name string) (*keywardv1.Key, error)) func(*flagSet) action {
	return func(f *flagSet) action {
		name := nameFlag(f, "the key's name")
		return func(e *env, _ []string) error {
			k, err := call(e, *name)
			return e.showKey(k, err)
		}
	}
}

var (
	keyGet = keyByName(func(e *env, name string) (*keywardv1.Key, error) {
		r, err := e.api.Keys.GetKey(e.ctx, &keywardv1.GetKeyRequest{Name: name})
		return r.GetKey(), err
	})
	keyRotate = keyByName(func(e *env, name string) (*keywardv1.Key, error) {
		r, err := e.api.Keys.RotateKey(e.ctx, &keywardv1.RotateKeyRequest{Name: name})
		return r.GetKey(), err
	})
	keyEnable         = keySetState(keywardv1.KeyState_KEY_STATE_ENABLED)
	keyDisable        = keySetState(keywardv1.KeyState_KEY_STATE_DISABLED)
	keyCancelDeletion = keyByName(func(e *env, name string) (*keywardv1.Key, error) {
		r, err := e.api.Keys.CancelKeyDeletion(e.ctx, &keywardv1.CancelKeyDeletionRequest{Name: name})
		return r.GetKey(), err
	})
)

func keySetState(st keywardv1.KeyState) func(*flagSet) action {
	return keyByName(func(e *env, name string) (*keywardv1.Key, error) {
		r, err := e.api.Keys.SetKeyState(e.ctx, &keywardv1.SetKeyStateRequest{Name: name, State: st})
		return r.GetKey(), err
	})
}

func keyList(f *flagSet) action {
	return func(e *env, _ []string) error {
		r, err := e.api.Keys.ListKeys(e.ctx, &keywardv1.ListKeysRequest{})
		if err != nil {
			return err
		}
		return e.show(messages(r.GetKeys()), func(w io.Writer) error { return printKeys(w, r.GetKeys()) })
	}
}

func keySetMinVersion(f *flagSet) action {
	name := nameFlag(f, "the key's name")
	version := f.Uint32("version", 0, "the oldest version that may decrypt")
	return func(e *env, _ []string) error {
		// The warning is read before the change; a caller who may not read
		// the key is told so, and the change goes on.
		if k, err := e.api.Keys.GetKey(e.ctx, &keywardv1.GetKeyRequest{Name: *name}); err == nil {
			e.warnRewrap(k.GetKey(), *version)
		} else if status.Code(err) == codes.PermissionDenied {
			fmt.Fprintf(e.stderr, "warning: the rewrap reports of %s were not read (%v): nothing says whether ciphertexts are still under the versions this retires\n", *name, status.Convert(err).Message())
		}
		r, err := e.api.Keys.SetMinDecryptionVersion(e.ctx, &keywardv1.SetMinDecryptionVersionRequest{Name: *name, Version: *version})
		return e.showKey(r.GetKey(), err)
	}
}

func keyScheduleDeletion(f *flagSet) action {
	name := nameFlag(f, "the key's name")
	wait := f.Duration("wait", 0, "waiting period, at least 168h (default 720h)")
	return func(e *env, _ []string) error {
		req := &keywardv1.ScheduleKeyDeletionRequest{Name: *name}
		if *wait > 0 {
			req.WaitingPeriod = durationpb.New(*wait)
		}
		r, err := e.api.Keys.ScheduleKeyDeletion(e.ctx, req)
		return e.showKey(r.GetKey(), err)
	}
}

// showKey prints the key a call answered with, unless the call failed.
func (e *env) showKey(k *keywardv1.Key, err error) error {
	if err != nil {
		return err
	}
	return e.show(k, func(w io.Writer) error {
		if err := printKeys(w, []*keywardv1.Key{k}); err != nil {
			return err
		}
		printRewrapReports(w, k)
		return nil
	})
}

func printKeys(w io.Writer, ks []*keywardv1.Key) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPURPOSE\tALGORITHM\tSTATE\tVERSION\tMIN DECRYPT\tCREATED\tDELETION")
	for _, k := range ks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", k.GetName(), short(k.GetPurpose(), "KEY_PURPOSE_"),
			short(k.GetAlgorithm(), "KEY_ALGORITHM_"), short(k.GetState(), "KEY_STATE_"), k.GetLatestVersion(),
			k.GetMinDecryptionVersion(), k.GetCreateTime().AsTime().Format(time.RFC3339), timeOr(k.GetDeletionTime(), ""))
	}
	return tw.Flush()
}

func statusCommand(f *flagSet) action {
	return func(e *env, _ []string) error {
		r, err := e.api.Status.GetStatus(e.ctx, &keywardv1.GetStatusRequest{})
		if err != nil {
			return err
		}
		return e.show(r, func(w io.Writer) error { return printStatus(w, r) })
	}
}

func printStatus(w io.Writer, r *keywardv1.GetStatusResponse) error {
	h := "healthy"
	if !r.GetHsm().GetHealthy() {
		h = "UNHEALTHY: " + r.GetHsm().GetError()
	}
	fmt.Fprintf(w, "keywardd %s, up since %s\nHSM: token %q (serial %s, %s %s), %s\nstore: %s (schema %d)\nkeys: %d (%d enabled, %d disabled, %d pending deletion)\n",
		r.GetVersion(), r.GetStartTime().AsTime().Format(time.RFC3339), r.GetHsm().GetTokenLabel(), r.GetHsm().GetTokenSerial(),
		r.GetHsm().GetManufacturer(), r.GetHsm().GetModel(), h, r.GetStore().GetPath(), r.GetStore().GetSchemaVersion(),
		r.GetKeys().GetTotal(), r.GetKeys().GetEnabled(), r.GetKeys().GetDisabled(), r.GetKeys().GetPendingDeletion())
	if msg := r.GetStore().GetError(); msg != "" {
		fmt.Fprintf(w, "store: REFUSING CALLS: %s\n", msg)
	}
	if f := r.GetFleet(); f != nil {
		role := "a follower"
		if f.GetLeader() {
			role = "the leader (it runs the fleet's jobs)"
		}
		fresh := "never"
		if t := f.GetFreshTime(); t != nil {
			fresh = time.Since(t.AsTime()).Round(time.Millisecond).String() + " ago"
		}
		fmt.Fprintf(w, "fleet: node %s, %s; local copy at etcd revision %d, last known current %s (bound %s)\n",
			f.GetNode(), role, f.GetRevision(), fresh, f.GetStalenessBound().AsDuration())
		if len(f.GetNodes()) > 0 {
			fmt.Fprintf(w, "fleet: nodes %s, led by %s\n", strings.Join(f.GetNodes(), ", "), cmp.Or(f.GetLeaderNode(), "none yet"))
		}
	}
	if msg := r.GetAuditCheckpointError(); msg != "" {
		fmt.Fprintf(w, "audit: checkpoints are not being MACed: %s\n", msg)
	}
	if n := r.GetNamesToRename(); len(n) > 0 {
		var counts []string
		for _, kind := range slices.Sorted(maps.Keys(n)) {
			counts = append(counts, fmt.Sprintf("%d %s", n[kind], kind))
		}
		fmt.Fprintf(w, "names to rename: %s (not lower case, or ending in a dot or dash; keywardd's log at start lists them, docs/operations.md says how)\n", strings.Join(counts, ", "))
	}
	for _, p := range r.GetPlugins() {
		fmt.Fprintf(w, "plugin %s %s: %s since %s (pid %d, started %d times; %s)", p.GetName(), p.GetVersion(), p.GetState(),
			p.GetSince().AsTime().Format(time.RFC3339), p.GetPid(), p.GetLaunches(), strings.Join(p.GetCapabilities(), ", "))
		if p.GetLastError() != "" {
			fmt.Fprintf(w, "; last: %s", p.GetLastError())
		}
		if n := p.GetEventsPending(); n > 0 || p.GetDeliveryError() != "" {
			fmt.Fprintf(w, "; %d revocations waiting (%s)", n, p.GetDeliveryError())
		}
		fmt.Fprintln(w)
	}
	for _, a := range r.GetAuditSinks() {
		fmt.Fprintf(w, "audit sink %s (%s, on failure %s): %s, %d bytes behind (bound %d), last seq %d; %d shipped, %d filtered, %d failed deliveries",
			a.GetName(), a.GetType(), a.GetOnFailure(), a.GetState(), a.GetLagBytes(), a.GetMaxLagBytes(), a.GetSeq(), a.GetShipped(), a.GetFiltered(), a.GetFailures())
		if a.GetOverBound() {
			fmt.Fprint(w, "; PAST ITS BOUND")
		}
		if e := a.GetLastError(); e != "" {
			fmt.Fprintf(w, "; last: %s", e)
		}
		fmt.Fprintln(w)
	}
	return nil
}
