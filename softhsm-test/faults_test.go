package softhsmtest

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// faultSession loads the fault module on tok as a plain PKCS#11 client and
// opens a logged-in session.
func faultSession(t *testing.T) (*Faults, *pkcs11.Ctx, pkcs11.SessionHandle) {
	t.Helper()
	tok := New(t)
	f := NewFaults(t, tok)
	p := pkcs11.New(f.Module)
	if p == nil {
		t.Fatalf("the fault module %s does not load", f.Module)
	}
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Finalize(); p.Destroy() })
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	slot := -1
	for _, id := range slots {
		if ti, err := p.GetTokenInfo(id); err == nil && strings.TrimRight(ti.SerialNumber, " ") == tok.Serial {
			slot = int(id)
		}
	}
	if slot < 0 {
		t.Fatalf("%v not found through the fault module", tok)
	}
	s, err := p.OpenSession(uint(slot), pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil {
		t.Fatal(err)
	}
	return f, p, s
}

// pattern calls C_GenerateRandom n times and says which calls failed.
func pattern(t *testing.T, p *pkcs11.Ctx, s pkcs11.SessionHandle, n int) []bool {
	t.Helper()
	failed := make([]bool, n)
	for i := range failed {
		_, err := p.GenerateRandom(s, 8)
		switch {
		case errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)):
			failed[i] = true
		case err != nil:
			t.Fatalf("call %d: %v, want nil or CKR_DEVICE_ERROR", i, err)
		}
	}
	return failed
}

func countTrue(b []bool) int {
	n := 0
	for _, v := range b {
		if v {
			n++
		}
	}
	return n
}

// TestFaultRate: a "%" rule fails about that share of the calls, the same
// calls for the same seed every time the rules are set, other calls for
// another seed; the counters see every call, every injected fault and every
// success.
func TestFaultRate(t *testing.T) {
	f, p, s := faultSession(t)
	const n, rate = 2000, 0.05
	rule := "C_GenerateRandom 0x30 5%"
	f.Set(rule, "seed 7")
	first := pattern(t, p, s, n)
	f.Set()
	f.Set(rule, "seed 7")
	again := pattern(t, p, s, n)
	f.Set(rule, "seed 8")
	other := pattern(t, p, s, n)

	for i := range first {
		if first[i] != again[i] {
			t.Fatalf("call %d: seed 7 failed it once and not the other time; the draws must repeat", i)
		}
	}
	same := 0
	for i := range first {
		if first[i] && other[i] {
			same++
		}
	}
	if same == countTrue(first) {
		t.Fatal("seeds 7 and 8 failed the same calls")
	}
	// Binomial: mean n·rate = 100, σ ≈ 9.7; 6σ either side cannot be missed
	// by a working generator.
	sigma := math.Sqrt(n * rate * (1 - rate))
	for _, got := range []int{countTrue(first), countTrue(other)} {
		if math.Abs(float64(got)-n*rate) > 6*sigma {
			t.Errorf("%d of %d calls failed at 5%%; want about %d", got, n, int(n*rate))
		}
	}

	f.Set()
	if err := p.CloseSession(s); err != nil {
		t.Fatal(err)
	}
	c := f.Counts()
	injected := countTrue(first) + countTrue(again) + countTrue(other)
	if got := c["C_GenerateRandom"]; got.Calls != 3*n || got.Injected != uint64(injected) || got.OK != uint64(3*n-injected) {
		t.Errorf("C_GenerateRandom counted %+v; want %d calls, %d injected, %d ok", got, 3*n, injected, 3*n-injected)
	}
	for name, want := range map[string]Count{
		"C_Login":        {Calls: 1, OK: 1},
		"C_OpenSession":  {Calls: 1, OK: 1},
		"C_CloseSession": {Calls: 1, OK: 1},
		"C_Sign":         {},
	} {
		if got := c[name]; got != want {
			t.Errorf("%s counted %+v, want %+v", name, got, want)
		}
	}
}

// TestFaultOnceAndAlways: "once" fails the first matching call after each
// Set, a plain rule every call, and the first rule that fires wins.
func TestFaultOnceAndAlways(t *testing.T) {
	f, p, s := faultSession(t)
	f.Set("C_GenerateRandom 0x30 once")
	if got := pattern(t, p, s, 3); !got[0] || got[1] || got[2] {
		t.Fatalf("once: failed %v, want only the first", got)
	}
	f.Set("C_GenerateRandom 0xB3 once", "* 0x30")
	if _, err := p.GenerateRandom(s, 8); !errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)) {
		t.Fatalf("first call: %v, want the once rule's CKR_SESSION_HANDLE_INVALID", err)
	}
	if _, err := p.GetSessionInfo(s); !errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)) {
		t.Fatalf("another call: %v, want the * rule's CKR_DEVICE_ERROR", err)
	}
	f.Set()
	if _, err := p.GenerateRandom(s, 8); err != nil {
		t.Fatal(err)
	}
}
