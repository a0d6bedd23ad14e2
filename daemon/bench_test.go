package daemon_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/anomaly"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/dynlimits"
	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/benchload"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

var benchLevels = []int{1, 4, 16, 64}

// BenchmarkDaemon measures, in one run, the floor (floor_test.go: a bare
// grpc-go server on a Unix socket, without and with a group-committed
// fsync per call), the HSM alone (through the hsm package) and keywardd
// over its socket (Ping, the API key and token calls, GenerateDataKey,
// Decrypt, ReEncrypt, a 100-item BatchGenerateDataKey) at 1, 4, 16 and 64
// concurrent clients, and prints one table with each call's ratio to its
// floor, the targets stated in.
func BenchmarkDaemon(b *testing.B) {
	res := map[string]benchload.Result{}
	key := func(op string, n int) string { return fmt.Sprintf("%s/%d", op, n) }
	ctx := context.Background()

	// The floor (floor_test.go): a bare grpc-go server's no-op, and the
	// same with a group-committed fsync per call.
	floors := map[string]keywardv1.StatusServiceClient{}
	for _, fl := range []struct {
		name    string
		durable bool
	}{{"noop", false}, {"durable", true}} {
		sc := keywardv1.NewStatusServiceClient(startFloor(b, fl.durable))
		floors[fl.name] = sc
		for _, n := range benchLevels {
			b.Run(fmt.Sprintf("floor=%s/callers=%d", fl.name, n), func(b *testing.B) {
				res[key("floor-"+fl.name, n)] = benchload.Run(b, n, func() error { _, err := sc.Ping(ctx, &keywardv1.PingRequest{}); return err })
			})
		}
	}
	// Each of keywardd's rows runs right after the durable floor at the
	// same level, and is compared with that: what a shared machine can do
	// moves by tens of percent within minutes.
	row := func(op string, n int, call func() error) {
		b.Run(fmt.Sprintf("daemon=%s/floor=durable/callers=%d", op, n), func(b *testing.B) {
			res[key("pair:"+op, n)] = benchload.Run(b, n, func() error { _, err := floors["durable"].Ping(ctx, &keywardv1.PingRequest{}); return err })
		})
		b.Run(fmt.Sprintf("daemon=%s/callers=%d", op, n), func(b *testing.B) {
			res[key(op, n)] = benchload.Run(b, n, call)
		})
	}

	// The HSM alone: keywardd must be the library's only user in its
	// process, so this runs first, on the token the daemon then uses.
	in := daemontest.Start(b, daemontest.Policy(strings.Replace(uidPolicy(allowAll+"\n    tokens:\n      audiences: [bench]"), "max_batch: 5", "max_batch: 100", 1)))
	h, raw := benchHSM(b, in)
	dataKey := make([]byte, 32)
	aad := make([]byte, 40)
	nonce, sealed, _ := h.Encrypt(ctx, raw, dataKey, aad)
	rawSig := hsm.KeyID{Name: "bench-raw-sig", Version: 1}
	if err := h.CreateKey(ctx, rawSig, hsm.ECDSAP256); err != nil {
		b.Fatal(err)
	}
	signer, err := h.Signer(ctx, rawSig)
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("bench"))
	for _, n := range benchLevels {
		b.Run(fmt.Sprintf("hsm=encrypt/callers=%d", n), func(b *testing.B) {
			res[key("hsm-encrypt", n)] = benchload.Run(b, n, func() error { _, _, err := h.Encrypt(ctx, raw, dataKey, aad); return err })
		})
		b.Run(fmt.Sprintf("hsm=decrypt/callers=%d", n), func(b *testing.B) {
			res[key("hsm-decrypt", n)] = benchload.Run(b, n, func() error { _, err := h.Decrypt(ctx, raw, nonce, sealed, aad); return err })
		})
		b.Run(fmt.Sprintf("hsm=sign-es256/callers=%d", n), func(b *testing.B) {
			res[key("hsm-sign", n)] = benchload.Run(b, n, func() error { _, err := signer.Sign(nil, digest[:], crypto.SHA256); return err })
		})
	}
	h.Close()

	// keywardd over its socket.
	in.Restart()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ec := keywardv1.NewEnvelopeServiceClient(in.Conn)
	sc := keywardv1.NewStatusServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "bench", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		b.Fatal(err)
	}
	ectx := map[string]string{"app": "bench"}
	dk, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "bench", EncryptionContext: ectx})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		b.Fatal(err)
	}
	tc := keywardv1.NewTokenServiceClient(in.Conn)
	mintReq := &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"bench"}}
	minted, err := tc.MintToken(ctx, mintReq)
	if err != nil {
		b.Fatal(err)
	}
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	unlimitedKey, limitedKey := benchAPIKeys(b, ac)
	verifyAPIKey := func(key string) func() error { return benchVerify(ac, key) }
	batch := make([]*keywardv1.GenerateDataKeyRequest, 100)
	for i := range batch {
		batch[i] = &keywardv1.GenerateDataKeyRequest{KeyName: "bench", EncryptionContext: ectx}
	}
	ops := []struct {
		name string
		call func() error
	}{
		{"ping", func() error { _, err := sc.Ping(ctx, &keywardv1.PingRequest{}); return err }},
		{"generate-data-key", func() error {
			_, err := ec.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "bench", EncryptionContext: ectx})
			return err
		}},
		{"decrypt", func() error {
			_, err := ec.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: dk.WrappedKey, EncryptionContext: ectx})
			return err
		}},
		{"re-encrypt", func() error {
			_, err := ec.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: dk.WrappedKey, EncryptionContext: ectx})
			return err
		}},
		{"batch-generate-data-key-100", func() error {
			_, err := ec.BatchGenerateDataKey(ctx, &keywardv1.BatchGenerateDataKeyRequest{Items: batch})
			return err
		}},
		{"verify-api-key", verifyAPIKey(unlimitedKey)},
		{"verify-api-key-limits", verifyAPIKey(limitedKey)},
		{"mint-token-cached", func() error { _, err := tc.MintToken(ctx, mintReq); return err }},
		{"verify-token", func() error {
			v, err := tc.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: minted.Token, Audience: "bench"})
			if err == nil && !v.Valid {
				err = fmt.Errorf("token invalid: %s", v.Reason)
			}
			return err
		}},
	}
	for _, op := range ops {
		for _, n := range benchLevels {
			row(op.name, n, op.call)
		}
	}
	// Uncached minting, and verification watched by the anomaly detector
	// under dynamic limits: the same daemon with the mint cache off and
	// both on (thresholds no load here reaches, so nothing is tightened).
	in.Stop()
	in.Config.Tokens.NoCache = true
	in.Config.Anomaly = anomaly.Config{Enabled: true, NewNetworks: true, MinRate: 1e9}
	in.Config.DynamicLimits = dynlimits.Config{Enabled: true, CPU: 1, HSMLatency: time.Hour, Raise: 2}
	in.Restart()
	tc = keywardv1.NewTokenServiceClient(in.Conn)
	ac = keywardv1.NewAPIKeyServiceClient(in.Conn)
	for _, n := range benchLevels {
		row("mint-token-uncached", n, func() error { _, err := tc.MintToken(ctx, mintReq); return err })
		row("verify-api-key-watched", n, verifyAPIKey(limitedKey))
	}
	in.Stop()
	printTable(res, key)
}

// printTable writes the one table: each call against its floor. The
// floor of a call is what the machine did, in this run, for the parts it
// cannot do without: a durable gRPC call (floor-durable: the bare server's
// no-op with a group-committed fsync), and for the calls that use the HSM,
// the HSM's operations in series with it.
func printTable(res map[string]benchload.Result, key func(string, int) string) {
	rate := func(op string, n int) float64 { return res[key(op, n)].OpsPerSec }
	// durable is the durable floor measured right before op's row (the
	// first one, if op's row ran alone).
	durable := func(op string, n int) float64 {
		if r, ok := res[key("pair:"+op, n)]; ok {
			return r.OpsPerSec
		}
		return rate("floor-durable", n)
	}
	// serial is the rate of calls that each do the HSM operations hsm
	// and a durable call, in series: their times add up.
	serial := func(hsm ...string) func(string, int) float64 {
		return func(op string, n int) float64 {
			t, d := 0.0, durable(op, n)
			if d == 0 {
				return 0
			}
			for _, h := range hsm {
				r := rate(h, n)
				if r == 0 {
					return 0
				}
				t += 1 / r
			}
			return 1 / (t + 1/d)
		}
	}
	rows := []struct {
		op    string
		items float64
		floor func(op string, n int) float64
		want  float64 // the least ratio to the floor
	}{
		{"floor-noop", 1, nil, 0},
		{"floor-durable", 1, nil, 0},
		{"hsm-encrypt", 1, nil, 0},
		{"hsm-decrypt", 1, nil, 0},
		{"hsm-sign", 1, nil, 0},
		{"ping", 1, durable, 0.8},
		{"verify-api-key", 1, durable, 0.8},
		{"verify-api-key-limits", 1, durable, 0.8},
		// -limits' ratio to its floor, on this row's floor: the two ran
		// minutes apart, on two keywardds.
		{"verify-api-key-watched", 1, func(op string, n int) float64 {
			if d := durable("verify-api-key-limits", n); d > 0 {
				return rate("verify-api-key-limits", n) / d * durable(op, n)
			}
			return 0
		}, 0.9},
		{"verify-token", 1, durable, 0.8},
		{"mint-token-cached", 1, durable, 0.8},
		{"mint-token-uncached", 1, serial("hsm-sign"), 0.9},
		{"generate-data-key", 1, serial("hsm-encrypt"), 0.9},
		{"decrypt", 1, serial("hsm-decrypt"), 0.9},
		{"re-encrypt", 1, serial("hsm-decrypt", "hsm-encrypt"), 0.9},
		{"batch-generate-data-key-100", 100, func(_ string, n int) float64 { return rate("hsm-encrypt", n) }, 0.9},
	}
	var b strings.Builder
	var missed, unjudged []string
	fmt.Fprintf(&b, "\nkeywardd against its floor, one run (%s)\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&b, "%-28s %7s %9s %9s %9s %7s %8s %9s %6s %5s\n", "call", "clients", "ops/s", "p50", "p99", "p99/p50", "cpu/op", "floor/s", "ratio", "want")
	for _, row := range rows {
		for _, n := range benchLevels {
			r, ok := res[key(row.op, n)]
			if !ok {
				continue
			}
			ops := r.OpsPerSec * row.items
			name := row.op
			if row.items > 1 {
				name += " (items/s)"
			}
			tail := float64(r.P99) / float64(max(r.P50, 1))
			mark := ""
			if row.floor != nil && n >= 16 && tail > 3 {
				mark = " tail"
				missed = append(missed, fmt.Sprintf("%s at %d clients: p99 %.1f x p50", row.op, n, tail))
			}
			fl, ratio, want := "", "", ""
			if row.floor != nil {
				if f := row.floor(row.op, n); f > 0 {
					fl, ratio, want = fmt.Sprintf("%.0f", f), fmt.Sprintf("%.2f", ops/f), fmt.Sprintf("%.1f", row.want)
					if ops/f < row.want {
						mark += " slow"
						missed = append(missed, fmt.Sprintf("%s at %d clients: %.2f of its floor", row.op, n, ops/f))
					}
				} else {
					mark += " unjudged"
					unjudged = append(unjudged, fmt.Sprintf("%s at %d clients", row.op, n))
				}
			}
			fmt.Fprintf(&b, "%-28s %7d %9.0f %9s %9s %7.1f %8s %9s %6s %5s%s\n", name, n, ops, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond),
				tail, r.CPU.Round(time.Microsecond), fl, ratio, want, mark)
		}
	}
	b.WriteString(`floors: floor-noop is a bare grpc-go server's no-op on a Unix socket (the transport alone); floor-durable is the same
        with a ~300-byte line appended and group-committed (fsync) per call: what a call costs that must be on disk
        before it is answered. Each of keywardd's rows is compared with floor-durable run right before it (floor/s).
        An HSM-bound call's floor is 1/(1/HSM rate + 1/floor-durable); a batch's is the HSM rate;
        verify-api-key-watched (anomaly detection and dynamic limits on) is against verify-api-key-limits, each
        on its own floor.
targets: ratio >= want; p99 <= 3 x p50 at 16 and 64 clients. cpu/op is the process's CPU (callers and server) per call.
`)
	if len(unjudged) > 0 {
		fmt.Fprintf(&b, "not judged (their floor's rows did not run: run the whole benchmark) (%d): %s\n", len(unjudged), strings.Join(unjudged, "; "))
	}
	switch {
	case len(missed) > 0:
		fmt.Fprintf(&b, "missed in this run (%d): %s\n", len(missed), strings.Join(missed, "; "))
	case len(unjudged) == 0:
		b.WriteString("every target met in this run\n")
	}
	fmt.Fprint(os.Stdout, b.String())
}

// BenchmarkHostileCaller measures another uid's calls (Ping, and
// GenerateDataKey, from 1 and 4 concurrent callers on one connection) while
// nobody holds 10 000 connections and floods Pings (see flood): with no
// flood, with nobody bound to no role (the unbound budget), bound to a role
// whose budget is 4 connections, 8 calls in flight and 200 calls a second,
// and so bound but holding only its 4 connections and flooding calls on
// them; and prints one table of latencies. The target: p99 within a few
// milliseconds of the p99 with no flood.
func BenchmarkHostileCaller(b *testing.B) {
	softhsmtest.RequireRoot(b, "runs a hostile caller as another user")
	policy := withNoisy(uidPolicy(allowAll))
	in := daemontest.Start(b, daemontest.Policy(policy))
	bin := openToNobody(b, in)
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "bench", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		b.Fatal(err)
	}
	ops := []struct {
		name string
		call func() error
	}{
		{"ping", func() error { return ping(in.Conn) }},
		{"generate-data-key", func() error {
			_, err := keywardv1.NewEnvelopeServiceClient(in.Conn).GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "bench"})
			return err
		}},
	}
	floods := []string{"none", "unbound", "bound", "bound-calls"}
	conns := map[string]int{"unbound": 10_000, "bound": 10_000, "bound-calls": 4}
	res := map[string]benchload.Result{}
	key := func(flood, op string, n int) string { return fmt.Sprintf("flood=%s/call=%s/callers=%d", flood, op, n) }
	reports := map[string]floodReport{}
	for _, flood := range floods {
		if flood != "none" { // a keywardd of its own: what a flood owes would outlast it
			in.Stop()
			if strings.HasPrefix(flood, "bound") {
				os.WriteFile(in.Config.PolicyFile, []byte(policy+noisyBinding), 0o600)
			}
			in.Restart()
		}
		var h *hostile
		if flood != "none" {
			h = startFlood(b, bin, in.Config.Socket.Path, conns[flood])
		}
		for _, op := range ops {
			for _, n := range []int{1, 4} {
				b.Run(key(flood, op.name, n), func(b *testing.B) { res[key(flood, op.name, n)] = benchload.Run(b, n, op.call) })
			}
		}
		if h != nil {
			reports[flood] = h.stop(b)
		}
	}
	var t strings.Builder
	fmt.Fprintf(&t, "\nanother uid's calls while uid 65534 floods, one run (%s)\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&t, "%-18s %7s %-12s %9s %9s %9s %13s\n", "call", "callers", "flood", "ops/s", "p50", "p99", "p99 - none")
	for _, op := range ops {
		for _, n := range []int{1, 4} {
			for _, flood := range floods {
				r, base := res[key(flood, op.name, n)], res[key("none", op.name, n)]
				fmt.Fprintf(&t, "%-18s %7d %-12s %9.0f %9s %9s %13s\n", op.name, n, flood, r.OpsPerSec, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), (r.P99 - base.P99).Round(time.Microsecond))
			}
		}
	}
	for _, flood := range floods[1:] {
		r := reports[flood]
		fmt.Fprintf(&t, "flood %s: of %d connections, %d served, %d kept unread (it owed for refusals), %d refused with a reason, %d closed at once; its calls: %v; refused for %v\n",
			flood, r.Conns, r.Admitted, r.Stalled, r.Refused, r.Closed, r.Codes, r.Budgets)
	}
	fmt.Fprint(os.Stdout, t.String())
}
