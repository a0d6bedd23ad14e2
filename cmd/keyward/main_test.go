package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

func TestHSMCheck(t *testing.T) {
	tok := softhsmtest.New(t)
	t.Setenv("KEYWARD_TEST_PIN", tok.PIN)
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
		jsonOK bool
	}{
		{name: "text", args: []string{"hsm", "check", "-module", tok.Module, "-token", tok.Label, "-pin-file", tok.PINFile},
			stdout: "the token does everything keyward needs"},
		{name: "json with PIN variable", args: []string{"hsm", "check", "-module", tok.Module, "-uri", "pkcs11:token=" + tok.Label, "-pin-env", "KEYWARD_TEST_PIN", "-output", "json"},
			jsonOK: true},
		{name: "wrong token", args: []string{"hsm", "check", "-module", tok.Module, "-token", "nope", "-pin-file", tok.PINFile},
			code: 1, stderr: `keyward: hsm: open: token not found: no token matches pkcs11:token=nope`},
		{name: "no PIN", args: []string{"hsm", "check", "-module", tok.Module, "-token", tok.Label},
			code: 1, stderr: "give the PIN in exactly one way"},
		{name: "PIN flag does not exist", args: []string{"hsm", "check", "-pin", "1234"},
			code: 2, stderr: "flag provided but not defined: -pin"},
		{name: "bad output", args: []string{"hsm", "check", "-output", "yaml"}, code: 2, stderr: "usage: keyward hsm check"},
		{name: "unknown command", args: []string{"frobnicate"}, code: 2, stderr: `unknown command "frobnicate"`},
		{name: "version", args: []string{"version"}, stdout: "keyward dev"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, strings.NewReader(""), &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, &stdout, &stderr)
			}
			if !strings.Contains(stdout.String(), tc.stdout) || !strings.Contains(stderr.String(), tc.stderr) {
				t.Fatalf("stdout %q, stderr %q; want %q and %q", &stdout, &stderr, tc.stdout, tc.stderr)
			}
			if tc.jsonOK {
				var out struct {
					OK    bool `json:"ok"`
					Steps []struct {
						Name string `json:"name"`
					} `json:"steps"`
				}
				if err := json.Unmarshal(stdout.Bytes(), &out); err != nil || !out.OK || len(out.Steps) != 12 {
					t.Fatalf("json output %s: %+v, %v", &stdout, out, err)
				}
			}
			for _, s := range []string{stdout.String(), stderr.String()} {
				if strings.Contains(s, tok.PIN) {
					t.Fatal("the output shows the PIN")
				}
			}
		})
	}
}
