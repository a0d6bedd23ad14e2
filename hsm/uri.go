package hsm

import (
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// URI is the part of an RFC 7512 PKCS#11 URI that selects a token, plus the
// query attributes that say where the module and the PIN are. Every
// attribute that is set must match; an empty one matches anything.
type URI struct {
	Token        string // token label
	Manufacturer string // token manufacturer ID
	Serial       string // token serial number
	Model        string // token model
	SlotID       *uint  // slot ID
	SlotDesc     string // slot description
	SlotManuf    string // slot manufacturer ID

	ModulePath string // module-path: absolute path of the PKCS#11 library
	PINSource  string // pin-source: a file holding the PIN ("file:" URI or path)
}

// uriPathAttrs are the path attributes that select a token. Object
// attributes (object, id, type) and library attributes select something
// keyward does not choose through a URI, and are refused.
var uriPathAttrs = map[string]func(u *URI, v string) error{
	"token":             func(u *URI, v string) error { u.Token = v; return nil },
	"manufacturer":      func(u *URI, v string) error { u.Manufacturer = v; return nil },
	"serial":            func(u *URI, v string) error { u.Serial = v; return nil },
	"model":             func(u *URI, v string) error { u.Model = v; return nil },
	"slot-description":  func(u *URI, v string) error { u.SlotDesc = v; return nil },
	"slot-manufacturer": func(u *URI, v string) error { u.SlotManuf = v; return nil },
	"slot-id": func(u *URI, v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("slot-id %q is not a decimal number", v)
		}
		id := uint(n)
		u.SlotID = &id
		return nil
	},
}

// ParseURI parses an RFC 7512 PKCS#11 URI that selects a token, such as
// "pkcs11:token=keyward;serial=1a2b?pin-source=file:/etc/keyward/pin".
// It refuses pin-value: a PIN never belongs in a URI, which ends up in
// configuration files, logs and process listings.
func ParseURI(s string) (*URI, error) {
	rest, ok := strings.CutPrefix(s, "pkcs11:")
	if !ok {
		return nil, errors.New(`hsm: PKCS#11 URI must start with "pkcs11:"`)
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}
	if path == "" {
		return nil, errors.New("hsm: PKCS#11 URI selects no token; give at least token=LABEL")
	}
	{
		for _, attr := range strings.Split(path, ";") {
			name, value, err := uriAttr(attr)
			if err != nil {
				return nil, err
			}
			set, ok := uriPathAttrs[name]
			if !ok {
				return nil, fmt.Errorf("hsm: PKCS#11 URI attribute %q does not select a token; use token, serial, manufacturer, model, slot-id, slot-description or slot-manufacturer", name)
			}
			if seen[name] {
				return nil, fmt.Errorf("hsm: PKCS#11 URI has %q twice", name)
			}
			seen[name] = true
			if err := set(u, value); err != nil {
				return nil, fmt.Errorf("hsm: PKCS#11 URI: %w", err)
			}
		}
	}
	if query != "" {
		for _, attr := range strings.Split(query, "&") {
			name, value, err := uriAttr(attr)
			if err != nil {
				return nil, err
			}
			if seen["?"+name] {
				return nil, fmt.Errorf("hsm: PKCS#11 URI has %q twice", name)
			}
			seen["?"+name] = true
			switch name {
			case "module-path":
				u.ModulePath = value
			case "pin-source":
				u.PINSource = value
			case "pin-value":
				return nil, errors.New("hsm: PKCS#11 URI must not carry pin-value: put the PIN in a file (pin-source=file:/path) or an environment variable")
			default:
				return nil, fmt.Errorf("hsm: PKCS#11 URI query attribute %q is not supported; use module-path or pin-source", name)
			}
		}
	}
	return u, nil
}

// uriAttr splits and percent-decodes one name=value attribute.
func uriAttr(attr string) (name, value string, err error) {
	name, raw, ok := strings.Cut(attr, "=")
	if !ok || name == "" {
		return "", "", fmt.Errorf("hsm: PKCS#11 URI attribute %q is not of the form name=value", attr)
	}
	value, err = url.PathUnescape(raw)
	if err != nil {
		return "", "", fmt.Errorf("hsm: PKCS#11 URI attribute %q: bad percent-encoding", name)
	}
	if value == "" {
		return "", "", fmt.Errorf("hsm: PKCS#11 URI attribute %q has an empty value", name)
	}
	return name, value, nil
}

// String formats u as a PKCS#11 URI that ParseURI reads back to the same value.
func (u *URI) String() string {
	var path, query []string
	add := func(list *[]string, name, value string) {
		if value != "" {
			*list = append(*list, name+"="+uriEscape(value))
		}
	}
	add(&path, "token", u.Token)
	add(&path, "manufacturer", u.Manufacturer)
	add(&path, "serial", u.Serial)
	add(&path, "model", u.Model)
	add(&path, "slot-description", u.SlotDesc)
	add(&path, "slot-manufacturer", u.SlotManuf)
	if u.SlotID != nil {
		path = append(path, "slot-id="+strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	sort.Strings(path)
	add(&query, "module-path", u.ModulePath)
	add(&query, "pin-source", u.PINSource)
	s := "pkcs11:" + strings.Join(path, ";")
	if len(query) > 0 {
		s += "?" + strings.Join(query, "&")
	}
	return s
}

// uriEscape percent-encodes everything outside RFC 7512's unreserved set
// and the few characters safe in an attribute value.
func uriEscape(v string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '.', c == '_', c == '~', c == ':', c == '/', c == '@', c == '!', c == '$', c == '\'', c == '(', c == ')', c == '*', c == '+', c == ',':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// matches reports whether a slot and its token satisfy every attribute of u.
func (u *URI) matches(t TokenInfo) bool {
	return (u.Token == "" || u.Token == t.Label) &&
		(u.Manufacturer == "" || u.Manufacturer == t.Manufacturer) &&
		(u.Serial == "" || u.Serial == t.Serial) &&
		(u.Model == "" || u.Model == t.Model) &&
		(u.SlotID == nil || *u.SlotID == t.Slot) &&
		(u.SlotDesc == "" || u.SlotDesc == t.SlotDesc) &&
		(u.SlotManuf == "" || u.SlotManuf == t.SlotManuf)
}
