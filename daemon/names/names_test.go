package names

import (
	"errors"
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
		{"-", "", `key name "-" has no canonical form: a name is lower case and does not end with '.' or '-'`},
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
