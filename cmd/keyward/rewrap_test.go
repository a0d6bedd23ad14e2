package main

import (
	"bytes"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestWarnRewrap: what set-min-version says before it raises a key's
// minimum, from the key's rewrap reports, including one a job stopped
// part way sent (keyward's own jobs send whole passes only; another
// reporter may not).
func TestWarnRewrap(t *testing.T) {
	key := func(reps ...*keywardv1.RewrapReport) *keywardv1.Key {
		return &keywardv1.Key{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT, MinDecryptionVersion: 1, LatestVersion: 4, RewrapReports: reps}
	}
	at := timestamppb.Now()
	for _, tc := range []struct {
		name string
		key  *keywardv1.Key
		v    uint32
		want []string // substrings, in order; none: no warning
	}{
		{"no report", key(), 3, []string{"no rewrap job has reported on orders"}},
		{"a whole pass, nothing below", key(&keywardv1.RewrapReport{Source: "dir:h:/a", Ciphertexts: map[uint32]uint64{3: 5, 4: 9}, Complete: true, ReportTime: at, Reporter: "uid=7"}), 3, nil},
		{"a whole pass, some below", key(&keywardv1.RewrapReport{Source: "dir:h:/a", Ciphertexts: map[uint32]uint64{2: 1, 4: 9}, Complete: true, ReportTime: at, Reporter: "uid=7 exe=/bin/job"}), 3,
			[]string{"dir:h:/a's last rewrap report", "by uid=7 exe=/bin/job", "counts 1 ciphertexts under versions below 3 (v2: 1, v4: 9)", "-version 1"}},
		{"a partial pass", key(&keywardv1.RewrapReport{Source: "dir:h:/a", Ciphertexts: map[uint32]uint64{4: 9}, ReportTime: at, Reporter: "uid=7"}), 3,
			[]string{"stopped part way: it counted only what it saw"}},
		{"lowering", key(), 1, nil},
		{"a signing key", &keywardv1.Key{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN, MinDecryptionVersion: 1}, 2, nil},
	} {
		var buf bytes.Buffer
		(&env{stderr: &buf}).warnRewrap(tc.key, tc.v)
		got := buf.String()
		if len(tc.want) == 0 && got != "" {
			t.Errorf("%s: %q; want no warning", tc.name, got)
		}
		rest := got
		for _, w := range tc.want {
			i := strings.Index(rest, w)
			if i < 0 {
				t.Errorf("%s: %q lacks %q", tc.name, got, w)
				break
			}
			rest = rest[i+len(w):]
		}
	}
}

// TestHasPassword: a connection string that gives a password, as the
// driver would read one, is refused on the command line.
func TestHasPassword(t *testing.T) {
	for dsn, want := range map[string]bool{
		"host=/run/postgresql dbname=shop user=rewrap": false,
		"host=/tmp password=x":                         true,
		"host=/tmp password = 'x y'":                   true,
		"dbname='app'password=secret":                  true,
		"host=/tmp sslpassword=x":                      true,
		"postgres://u:x@localhost/shop":                true,
		"postgres://u@localhost/shop?password=x":       true,
		"postgresql://u@localhost/shop?sslpassword=x":  true,
		"postgres://u@localhost/shop?sslmode=require":  false,
		"host=/tmp application_name=password_rotation": false,
	} {
		if got := hasPassword(dsn); got != want {
			t.Errorf("hasPassword(%q) = %v; want %v", dsn, got, want)
		}
	}
}
