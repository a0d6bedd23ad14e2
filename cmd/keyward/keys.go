package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

func keyCommand(e *env, sub string, args []string) error {
	fs := newFlags("key " + sub)
	name := fs.String("name", "", "key name")
	var (
		purpose, algorithm *string
		rotation, wait     *time.Duration
		version            *uint
		labels             = pairs{}
	)
	switch sub {
	case "create":
		purpose = fs.String("purpose", "", "encrypt, sign or hmac")
		algorithm = fs.String("algorithm", "", "aes256-gcm, ecdsa-p256, ecdsa-p384, ed25519 or hmac-sha256 (default: the purpose's)")
		rotation = fs.Duration("rotation-period", 0, "how often the key should rotate (e.g. 2160h)")
		fs.Var(labels, "label", "k=v label (repeatable)")
	case "set-min-version":
		version = fs.Uint("version", 0, "the oldest version that may decrypt")
	case "schedule-deletion":
		wait = fs.Duration("wait", 0, "waiting period, at least 168h (default 720h)")
	case "get", "list", "rotate", "enable", "disable", "cancel-deletion":
	default:
		return usageError{fmt.Sprintf("unknown key command %q; run keyward help", sub)}
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if sub != "list" && *name == "" {
		return usageError{fmt.Sprintf("key %s needs -name", sub)}
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx := e.ctx
	var k *keywardv1.Key
	switch sub {
	case "create":
		req := &keywardv1.CreateKeyRequest{Name: *name, Labels: labels}
		p, ok := keywardv1.KeyPurpose_value["KEY_PURPOSE_"+strings.ToUpper(*purpose)]
		if !ok || *purpose == "" {
			return usageError{"key create needs -purpose encrypt, sign or hmac"}
		}
		req.Purpose = keywardv1.KeyPurpose(p)
		if *algorithm != "" {
			a, ok := keywardv1.KeyAlgorithm_value["KEY_ALGORITHM_"+strings.ToUpper(strings.ReplaceAll(*algorithm, "-", "_"))]
			if !ok {
				return usageError{fmt.Sprintf("unknown algorithm %q", *algorithm)}
			}
			req.Algorithm = keywardv1.KeyAlgorithm(a)
		}
		if *rotation > 0 {
			req.RotationPeriod = durationpb.New(*rotation)
		}
		r, err := c.Keys.CreateKey(ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "get":
		r, err := c.Keys.GetKey(ctx, &keywardv1.GetKeyRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "list":
		r, err := c.Keys.ListKeys(ctx, &keywardv1.ListKeysRequest{})
		if err != nil {
			return client.Wrap(err)
		}
		if e.json {
			return e.printJSON(r)
		}
		printKeys(e, r.GetKeys())
		return nil
	case "rotate":
		r, err := c.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "enable", "disable":
		st := keywardv1.KeyState_KEY_STATE_ENABLED
		if sub == "disable" {
			st = keywardv1.KeyState_KEY_STATE_DISABLED
		}
		r, err := c.Keys.SetKeyState(ctx, &keywardv1.SetKeyStateRequest{Name: *name, State: st})
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "set-min-version":
		r, err := c.Keys.SetMinDecryptionVersion(ctx, &keywardv1.SetMinDecryptionVersionRequest{Name: *name, Version: uint32(*version)})
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "schedule-deletion":
		req := &keywardv1.ScheduleKeyDeletionRequest{Name: *name}
		if *wait > 0 {
			req.WaitingPeriod = durationpb.New(*wait)
		}
		r, err := c.Keys.ScheduleKeyDeletion(ctx, req)
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	case "cancel-deletion":
		r, err := c.Keys.CancelKeyDeletion(ctx, &keywardv1.CancelKeyDeletionRequest{Name: *name})
		if err != nil {
			return client.Wrap(err)
		}
		k = r.GetKey()
	}
	if e.json {
		return e.printJSON(k)
	}
	printKeys(e, []*keywardv1.Key{k})
	return nil
}

// short is an enum value as the CLI writes it: KEY_ALGORITHM_AES256_GCM is
// aes256-gcm, as -algorithm takes it.
func short(s fmt.Stringer, prefix string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(s.String(), prefix)), "_", "-")
}

func printKeys(e *env, ks []*keywardv1.Key) {
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPURPOSE\tALGORITHM\tSTATE\tVERSION\tMIN DECRYPT\tCREATED\tDELETION")
	for _, k := range ks {
		del := ""
		if k.GetDeletionTime() != nil {
			del = k.GetDeletionTime().AsTime().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", k.GetName(), short(k.GetPurpose(), "KEY_PURPOSE_"),
			short(k.GetAlgorithm(), "KEY_ALGORITHM_"), short(k.GetState(), "KEY_STATE_"), k.GetLatestVersion(),
			k.GetMinDecryptionVersion(), k.GetCreateTime().AsTime().Format(time.RFC3339), del)
	}
	tw.Flush()
}

func (e *env) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(e.stdout, string(b))
	return err
}

func statusCommand(e *env, args []string) error {
	if err := parse(newFlags("status"), args); err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	r, err := c.Status.GetStatus(e.ctx, &keywardv1.GetStatusRequest{})
	if err != nil {
		return client.Wrap(err)
	}
	if e.json {
		return e.printJSON(r)
	}
	h := "healthy"
	if !r.GetHsm().GetHealthy() {
		h = "UNHEALTHY: " + r.GetHsm().GetError()
	}
	fmt.Fprintf(e.stdout, "keywardd %s, up since %s\nHSM: token %q (serial %s, %s %s), %s\nstore: %s (schema %d)\nkeys: %d (%d enabled, %d disabled, %d pending deletion)\n",
		r.GetVersion(), r.GetStartTime().AsTime().Format(time.RFC3339), r.GetHsm().GetTokenLabel(), r.GetHsm().GetTokenSerial(),
		r.GetHsm().GetManufacturer(), r.GetHsm().GetModel(), h, r.GetStore().GetPath(), r.GetStore().GetSchemaVersion(),
		r.GetKeys().GetTotal(), r.GetKeys().GetEnabled(), r.GetKeys().GetDisabled(), r.GetKeys().GetPendingDeletion())
	if msg := r.GetAuditCheckpointError(); msg != "" {
		fmt.Fprintf(e.stdout, "audit: checkpoints are not being MACed: %s\n", msg)
	}
	if n := r.GetNamesToRename(); len(n) > 0 {
		var counts []string
		for _, kind := range slices.Sorted(maps.Keys(n)) {
			counts = append(counts, fmt.Sprintf("%d %s", n[kind], kind))
		}
		fmt.Fprintf(e.stdout, "names to rename: %s (not lower case, or ending in a dot or dash; keywardd's log at start lists them, docs/operations.md says how)\n", strings.Join(counts, ", "))
	}
	for _, p := range r.GetPlugins() {
		fmt.Fprintf(e.stdout, "plugin %s %s: %s since %s (pid %d, started %d times; %s)", p.GetName(), p.GetVersion(), p.GetState(),
			p.GetSince().AsTime().Format(time.RFC3339), p.GetPid(), p.GetLaunches(), strings.Join(p.GetCapabilities(), ", "))
		if p.GetLastError() != "" {
			fmt.Fprintf(e.stdout, "; last: %s", p.GetLastError())
		}
		if n := p.GetEventsPending(); n > 0 || p.GetDeliveryError() != "" {
			fmt.Fprintf(e.stdout, "; %d revocations waiting (%s)", n, p.GetDeliveryError())
		}
		fmt.Fprintln(e.stdout)
	}
	return nil
}
