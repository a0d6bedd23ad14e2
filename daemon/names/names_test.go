package names

import (
	"errors"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name, canonical, msg string
	}{
		{"orders", "orders", ""},
		{"orders-v2.eu_1", "orders-v2.eu_1", ""},
		{"a_", "a_", ""},
		{"ORDERS", "orders", `key name "ORDERS" is not canonical: use "orders"`},
		{"Orders", "orders", `key name "Orders" is not canonical: use "orders"`},
		{"orders.", "orders", `key name "orders." is not canonical: use "orders"`},
		{"orders-", "orders", `key name "orders-" is not canonical: use "orders"`},
		{"Orders.-.", "orders", `key name "Orders.-." is not canonical: use "orders"`},
		{"shop@EXAMPLE.com", "shop@example.com", `key name "shop@EXAMPLE.com" is not canonical: use "shop@example.com"`},
		{"Prüf", "prüf", `key name "Prüf" is not canonical: use "prüf"`},
		{"-", "", `key name "-" has no canonical form: a name is lower case (case-folded), has no invisible characters and does not end with a dot, a dash or a space`},
		// Lower case is not enough: these are lower case, yet differ from
		// their canonical form only in case (both upper-case alike).
		{"ſhop", "shop", `key name "ſhop" is not canonical: use "shop"`},
		{"ς-team", "σ-team", `key name "ς-team" is not canonical: use "σ-team"`},
		{"σ-team", "σ-team", ""},
		{"Σ-TEAM", "σ-team", `key name "Σ-TEAM" is not canonical: use "σ-team"`},
		{"\u212Aey", "key", "key name \"\u212aey\" is not canonical: use \"key\""}, // KELVIN SIGN
		{"Straße", "strasse", `key name "Straße" is not canonical: use "strasse"`},
		{"ǅemal", "džemal", `key name "ǅemal" is not canonical: use "džemal"`},
		{"ｐｒｏｄ", "prod", `key name "ｐｒｏｄ" is not canonical: use "prod"`},
		{"prod\u200b", "prod", `key name "prod\u200b" is not canonical: use "prod"`},
		{"prod－", "prod", `key name "prod－" is not canonical: use "prod"`},
		{"prod‐", "prod", `key name "prod‐" is not canonical: use "prod"`},
		{"prod ", "prod", `key name "prod " is not canonical: use "prod"`},
		// One accented letter, written decomposed: its composed form.
		{"cafe\u0301", "caf\u00e9", `key name "cafe\u0301" is not canonical: use "caf\u00e9", the same letters composed (Unicode NFKC)`},
		{"caf\u00e9", "caf\u00e9", ""},
		// Cherokee folds to its capitals, and cases.Fold alone swaps them.
		{"\u13a0\u13f0", "\u13a0\u13f0", ""},
		{"\uab70\u13f8", "\u13a0\u13f0", `key name "ꭰᏸ" is not canonical: use "ᎠᏰ"`},
		{"日本-", "日本", `key name "日本-" is not canonical: use "日本"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Canonical(tc.name); got != tc.canonical {
				t.Fatalf("Canonical = %q, want %q", got, tc.canonical)
			}
			if Canonical(tc.canonical) != tc.canonical || !IsCanonical(tc.canonical) {
				t.Fatalf("the canonical form %q is not canonical", tc.canonical)
			}
			err := Check("key name", tc.name)
			if tc.msg == "" {
				if err != nil || !IsCanonical(tc.name) {
					t.Fatalf("Check = %v", err)
				}
				return
			}
			if !errors.Is(err, ErrNotCanonical) || err.Error() != tc.msg || IsCanonical(tc.name) {
				t.Fatalf("Check = %v, want %s", err, tc.msg)
			}
		})
	}
}

// TestOneFormPerCaselessName: names that are one name to anyone ignoring
// case have one canonical form, so keywardd refuses all but one of them.
func TestOneFormPerCaselessName(t *testing.T) {
	for _, group := range [][]string{
		{"shop", "SHOP", "ſhop", "Shop", "ſHOP"},
		{"σ-team", "ς-team", "Σ-team", "Σ-TEAM"},
		{"strasse", "Straße", "STRASSE", "straße", "STRAẞE"},
		{"\u13a0", "\uab70"},
	} {
		canonical := 0
		for _, n := range group {
			if Canonical(n) != Canonical(group[0]) {
				t.Errorf("%q and %q have different canonical forms: %q, %q", n, group[0], Canonical(n), Canonical(group[0]))
			}
			if IsCanonical(n) {
				canonical++
			}
		}
		if canonical != 1 {
			t.Errorf("%q: %d of them are canonical, want exactly 1", group, canonical)
		}
	}
}

// FuzzCanonical: the canonical form is canonical (so Check never refuses
// what it offers), ends with neither '.' nor '-', and is the same for a
// name written in ASCII capitals.
func FuzzCanonical(f *testing.F) {
	for _, s := range []string{"orders", "Orders.-", "ſhop", "ς-team", "Straße", "cafe\u0301", "\u13a0\uab70\u13f8", "ǅ", "İı", "\u0345\u0399", "ﬃ", "\xff\xfe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		c := Canonical(name)
		if Canonical(c) != c || !IsCanonical(c) || Check("tag", c) != nil {
			t.Fatalf("Canonical(%q) = %q, whose canonical form is %q", name, c, Canonical(c))
		}
		if strings.HasSuffix(c, ".") || strings.HasSuffix(c, "-") {
			t.Fatalf("Canonical(%q) = %q ends with '.' or '-'", name, c)
		}
		if ascii := strings.ToUpper(name); isASCII(name) && Canonical(ascii) != c {
			t.Fatalf("Canonical(%q) = %q, but Canonical(%q) = %q", name, c, ascii, Canonical(ascii))
		}
		if err := Check("tag", name); (err == nil) != (c == name) {
			t.Fatalf("Check(%q) = %v, with canonical form %q", name, err, c)
		}
	})
}

func isASCII(s string) bool {
	for i := range len(s) {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
