// Package names is the one form of the names keywardd stores: root keys'
// names, managed credentials' names, and API keys' owners, environments and
// tags. Two spellings of one name ("Orders", "orders.", "orders") would be
// two keys, two owners or two tags to the store, to a policy glob, to a
// filter and to a bulk revocation that meant one; so keywardd creates a name
// only in its canonical form: case-folded, composed (NFC), with no trailing
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
// canonical form is Unicode's canonical caseless form (The Unicode Standard,
// 3.13, D145): full case folding (golang.org/x/text/cases.Fold: "Straße"
// is "strasse") of the decomposed name, composed again (NFC), so that
// "café" typed with a combining accent is the same name too. Restricting
// those names to ASCII was the other way; it would refuse names users have
// every reason to write ("équipe-paris") and that stores already hold.
// Compatibility forms stay distinct (full-width "ｓｈｏｐ" is not "shop"):
// they are not case.
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

	"golang.org/x/text/cases"
	"golang.org/x/text/unicode/norm"
)

// ErrNotCanonical is what Check's errors match.
var ErrNotCanonical = errors.New("names: a name not in its canonical form")

// Canonical is name's canonical form: case-folded, composed, without
// trailing dots and dashes.
func Canonical(name string) string {
	folded := cases.Fold().String(norm.NFD.String(name))
	return strings.TrimRight(norm.NFC.String(strings.Map(cherokeeCapital, folded)), ".-")
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
		return fmt.Sprintf("%s %q has no canonical form: a name is lower case (case-folded) and does not end with '.' or '-'", e.kind, e.name)
	}
	if norm.NFC.String(e.name) == e.canonical {
		// The two look alike: show the code points.
		return fmt.Sprintf("%s %+q is not canonical: use %+q, the same letters composed (Unicode NFC)", e.kind, e.name, e.canonical)
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
