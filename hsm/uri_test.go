package hsm

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	slot := uint(7)
	for _, tc := range []struct {
		in   string
		want *URI
		err  string
	}{
		{"pkcs11:token=keyward", &URI{Token: "keyward"}, ""},
		{"pkcs11:token=My%20Token;serial=1a2b;manufacturer=SoftHSM%20project", &URI{Token: "My Token", Serial: "1a2b", Manufacturer: "SoftHSM project"}, ""},
		{"pkcs11:model=SoftHSM%20v2;slot-id=7;slot-description=x;slot-manufacturer=y", &URI{Model: "SoftHSM v2", SlotID: &slot, SlotDesc: "x", SlotManuf: "y"}, ""},
		{"pkcs11:token=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyward/pin", &URI{Token: "k", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "file:/etc/keyward/pin"}, ""},
		{"pkcs11:token=a%3Bb%3Fc", &URI{Token: "a;b?c"}, ""},
		{"token=k", nil, `must start with "pkcs11:"`},
		{"pkcs11:", nil, "selects no token"},
		{"pkcs11:?module-path=/usr/lib/x.so", nil, "selects no token"},
		{"pkcs11:token", nil, "not of the form name=value"},
		{"pkcs11:token=", nil, "empty value"},
		{"pkcs11:token=a;token=b", nil, "twice"},
		{"pkcs11:object=kek;token=k", nil, `"object" does not select a token`},
		{"pkcs11:token=%zz", nil, "bad percent-encoding"},
		{"pkcs11:slot-id=-1", nil, "not a decimal number"},
		{"pkcs11:token=k?pin-value=1234", nil, "must not carry pin-value"},
		{"pkcs11:token=k?module-name=softhsm2", nil, "not supported"},
	} {
		got, err := ParseURI(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseURI(%q) = %v, %v; want error containing %q", tc.in, got, err, tc.err)
			}
			if err != nil && strings.Contains(err.Error(), "1234") {
				t.Errorf("ParseURI(%q): the error repeats the PIN: %v", tc.in, err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		again, err := ParseURI(got.String())
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("ParseURI(%q).String() = %q does not read back: %+v, %v", tc.in, got.String(), again, err)
		}
	}
}

// FuzzParseURI: the parser never panics, and what it accepts formats to a
// URI that parses back to the same value.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=keyward",
		"pkcs11:token=My%20Token;serial=1a2b?pin-source=file:/etc/pin",
		"pkcs11:slot-id=3;model=x?module-path=/usr/lib/x.so",
		"pkcs11:token=a%3Bb",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("ParseURI(%q).String() = %q does not parse: %v", s, u.String(), err)
		}
		if !reflect.DeepEqual(u, again) {
			t.Fatalf("round trip of %q changed %+v to %+v", s, u, again)
		}
	})
}

// FuzzParsePublicKey: CKA_EC_POINT comes from the token; whatever it holds,
// parsing returns a key or an error, never a panic.
func FuzzParsePublicKey(f *testing.F) {
	f.Add(byte(ECDSAP256), append([]byte{0x04, 0x41, 0x04}, make([]byte, 64)...))
	f.Add(byte(Ed25519), append([]byte{0x04, 0x20}, make([]byte, 32)...))
	f.Add(byte(Ed25519), make([]byte, 32))
	f.Add(byte(ECDSAP384), []byte{0x04, 0x81, 0x61, 0x04})
	f.Fuzz(func(t *testing.T, alg byte, point []byte) {
		pub, err := parsePublicKey(Algorithm(alg%6), point)
		if err == nil && pub == nil {
			t.Fatal("no key and no error")
		}
	})
}
