// Package names is the one form of the names keywardd stores: root keys'
// names, managed credentials' names, and API keys' owners, environments and
// tags. Two spellings of one name ("Orders", "orders.", "orders") would be
// two keys, two owners or two tags to the store, to a policy glob, to a
// filter and to a bulk revocation that meant one; so keywardd creates a name
// only in its canonical form: NFKC_Casefold (below), with no trailing
// dot or dash.
//
// Each kind keeps its own characters (a key name is 1 to 64 letters, digits,
// '.', '_' or '-', see hsm.KeyID.Check; an owner may also hold '@', ':' and
// '+'; a tag anything): this package says only which spelling of a name is
// the one, for every kind alike. Names stored before the rule keep working;
// keywardd lists them at start so that they can be renamed
// (docs/operations.md).
//
// Environments and tags may hold any characters, and people who write them
// outside ASCII expect what they do in ASCII: that spellings which differ
// only in case are one name. strings.ToLower is not that: "ſhop" and "shop",
// or "ς-team" and "σ-team", are two lower-case strings that are one name
// to anyone who ignores case (both upper-case to "SHOP", "Σ-TEAM"). So the
// canonical form is Unicode's identifier caseless form, NFKC_Casefold (The
// Unicode Standard, 3.13, D147): the name decomposed with compatibility
// (NFKD: full-width "ｓｈｏｐ" and "ℙrod" are "shop" and "Prod"), invisible
// format characters removed (a zero-width space or a soft hyphen would
// make a name that looks like another but is not), fully case-folded
// (golang.org/x/text/cases.Fold: "Straße" is "strasse"), and composed
// again (NFKC), so that "café" typed with a combining accent is the same
// name too; then without trailing dots, dashes (any Unicode dash) or
// spaces. Restricting those names to ASCII was the other way; it would
// refuse names users have every reason to write ("équipe-paris") and that
// stores already hold.
//
// One correction is written here: cases.Fold turns Cherokee capital letters
// into the small ones, and the small ones into the capitals, so that no
// Cherokee name would have a form that folds to itself. Unicode folds
// Cherokee to the capitals (CaseFolding.txt, since Unicode 8), and
// Canonical does so after cases.Fold.
package names

import (
	"errors"
	"fmt"
	"strings"
	"unicode"

	"golang.org/x/text/cases"
	"golang.org/x/text/unicode/norm"
)

// ErrNotCanonical is what Check's errors match.
var ErrNotCanonical = errors.New("names: a name not in its canonical form")

// Canonical is name's canonical form: NFKC_Casefold, without trailing
// dots, dashes and spaces.
func Canonical(name string) string {
	visible := strings.Map(func(r rune) rune {
		if unicode.Is(unicode.Cf, r) {
			return -1
		}
		return r
	}, norm.NFKD.String(name))
	folded := strings.Map(cherokeeCapital, cases.Fold().String(visible))
	return strings.TrimRightFunc(norm.NFKC.String(folded), func(r rune) bool {
		return r == '.' || r == '\u3002' || unicode.Is(unicode.Pd, r) || unicode.IsSpace(r)
	})
}

// cherokeeCapital maps a Cherokee small letter to its capital, as Unicode's
// case folding does (CaseFolding.txt: AB70..ABBF to 13A0..13EF, 13F8..13FD
// to 13F0..13F5); cases.Fold maps the capitals to the small letters.
func cherokeeCapital(r rune) rune {
	switch {
	case r >= 0xAB70 && r <= 0xABBF:
		return r - 0xAB70 + 0x13A0
	case r >= 0x13F8 && r <= 0x13FD:
		return r - 8
	}
	return r
}

// IsCanonical says whether name is in its canonical form.
func IsCanonical(name string) bool { return Canonical(name) == name }

// notCanonical is a name refused for its spelling.
type notCanonical struct{ kind, name, canonical string }

func (e *notCanonical) Error() string {
	if e.canonical == "" {
		return fmt.Sprintf("%s %q has no canonical form: a name is lower case (case-folded), has no invisible characters and does not end with a dot, a dash or a space", e.kind, e.name)
	}
	if norm.NFC.String(e.name) == e.canonical {
		// The two look alike: show the code points.
		return fmt.Sprintf("%s %+q is not canonical: use %+q, the same letters composed (Unicode NFKC)", e.kind, e.name, e.canonical)
	}
	return fmt.Sprintf("%s %q is not canonical: use %q", e.kind, e.name, e.canonical)
}

func (e *notCanonical) Is(target error) bool { return target == ErrNotCanonical }

// Check refuses a name that is not in its canonical form, with a message
// that names its kind ("key name", "owner", ...) and gives the canonical
// form: `key name "Orders." is not canonical: use "orders"`.
func Check(kind, name string) error {
	if c := Canonical(name); c != name {
		return &notCanonical{kind: kind, name: name, canonical: c}
	}
	return nil
}
