// Package names is the one form of the names keywardd stores: root keys'
// names, managed credentials' names, and API keys' owners, environments and
// tags. Two spellings of one name ("Orders", "orders.", "orders") would be
// two keys, two owners or two tags to the store, to a policy glob, to a
// filter and to a bulk revocation that meant one; so keywardd creates a name
// only in its canonical form: lower case, with no trailing dot or dash.
//
// Each kind keeps its own characters (a key name is 1 to 64 letters, digits,
// '.', '_' or '-', see hsm.KeyID.Check; an owner may also hold '@', ':' and
// '+'; a tag anything): this package says only which spelling of a name is
// the one, for every kind alike. Names stored before the rule keep working;
// keywardd lists them at start so that they can be renamed
// (docs/operations.md).
package names

import (
	"errors"
	"fmt"
	"strings"
)

// ErrNotCanonical is what Check's errors match.
var ErrNotCanonical = errors.New("names: a name not in its canonical form")

// Canonical is name's canonical form: lower case, without trailing dots
// and dashes.
func Canonical(name string) string {
	return strings.TrimRight(strings.ToLower(name), ".-")
}

// IsCanonical says whether name is in its canonical form.
func IsCanonical(name string) bool { return Canonical(name) == name }

// notCanonical is a name refused for its spelling.
type notCanonical struct{ kind, name, canonical string }

func (e *notCanonical) Error() string {
	if e.canonical == "" {
		return fmt.Sprintf("%s %q has no canonical form: a name is lower case and does not end with '.' or '-'", e.kind, e.name)
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
