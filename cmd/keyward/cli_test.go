package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNormalize: a single-dash argument that names a long flag of its
// command becomes --flag; values, unknown flags, shorthands and what
// follows -- stay as they are.
func TestNormalize(t *testing.T) {
	root := newRoot(&env{ctx: context.Background()})
	for _, tc := range []struct{ in, want string }{
		{"key create -name n -purpose encrypt", "key create --name n --purpose encrypt"},
		{"key create -name=n --purpose=encrypt", "key create --name=n --purpose=encrypt"},
		{"-output json -socket /s status", "--output json --socket /s status"},
		{"status -output=json", "status --output=json"},
		// A flag's value is never rewritten, even one that looks like a flag.
		{"key get -name -purpose", "key get --name -purpose"},
		{"key create -label -name=x -name n", "key create --label -name=x --name n"},
		// Booleans take no value: what follows is looked at.
		{"apikey revoke -dry-run -owner o", "apikey revoke --dry-run --owner o"},
		{"panic-rotate k -dry-run", "panic-rotate k --dry-run"},
		{"audit verify -module m FILE -token t", "audit verify --module m FILE --token t"},
		// Unknown flags and shorthands stay, for pflag to report.
		{"hsm check -pin 1234", "hsm check -pin 1234"},
		{"key create -h", "key create -h"},
		{"key create -help", "key create --help"},
		// A flag of another command is unknown here.
		{"key get -owner o", "key get -owner o"},
		// After --, nothing is a flag.
		{"encrypt -key k -- -in", "encrypt --key k -- -in"},
		{"help key create", "help key create"},
		{"completion bash", "completion bash"},
		// A completion request: all but the word being completed.
		{"__complete key create -name x -pur", "__complete key create --name x -pur"},
		{"__complete key create -purpose", "__complete key create -purpose"},
	} {
		got := strings.Join(normalize(root, strings.Fields(tc.in)), " ")
		if got != tc.want {
			t.Errorf("normalize(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// TestDaemonAbsent: the sentence for each way a socket does not answer,
// and that keywardd's own UNAVAILABLE (the socket answers) is left alone.
func TestDaemonAbsent(t *testing.T) {
	unavailable := status.Error(codes.Unavailable, "connection error")
	for _, tc := range []struct {
		err  error
		want string
	}{
		{syscall.ENOENT, "keywardd is not answering at /s (no such file); start it (make run, or systemctl start keywardd), or point --socket / $KEYWARD_SOCKET at its socket"},
		{syscall.ECONNREFUSED, "keywardd is not answering at /s (the socket is there, but nothing listens on it); start it (make run, or systemctl start keywardd), or point --socket / $KEYWARD_SOCKET at its socket"},
		{syscall.EACCES, "keywardd is not answering at /s (permission denied); keywardd lets its socket's group in (socket.group in keywardd.yaml): join it, or run as a user who may"},
		{errors.New("i/o timeout"), "keywardd is not answering at /s (i/o timeout); start it (make run, or systemctl start keywardd), or point --socket / $KEYWARD_SOCKET at its socket"},
	} {
		err := &daemonAbsent{path: "/s", err: &net.OpError{Op: "dial", Net: "unix", Err: &os.SyscallError{Syscall: "connect", Err: tc.err}}}
		if err.Error() != tc.want {
			t.Errorf("%v:\n got %s\nwant %s", tc.err, err, tc.want)
		}
		if exitCode(err) != exitUnavailable {
			t.Errorf("%v: exit %d", tc.err, exitCode(err))
		}
	}

	dir := t.TempDir()
	if got := notAnswering(filepath.Join(dir, "none"), unavailable); !errors.As(got, new(*daemonAbsent)) {
		t.Errorf("no socket: %v", got)
	}
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := notAnswering(filepath.Join(dir, "s"), unavailable); got != unavailable {
		t.Errorf("a socket that answers: %v", got)
	}
	notFound := status.Error(codes.NotFound, "x")
	if got := notAnswering(filepath.Join(dir, "none"), notFound); got != notFound {
		t.Errorf("NOT_FOUND: %v", got)
	}
}

// TestExitCode: one exit code per kind of refusal.
func TestExitCode(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{status.Error(codes.PermissionDenied, ""), exitDenied},
		{status.Error(codes.Unauthenticated, ""), exitDenied},
		{status.Error(codes.NotFound, ""), exitNotFound},
		{status.Error(codes.AlreadyExists, ""), exitExists},
		{status.Error(codes.InvalidArgument, ""), exitInvalid},
		{status.Error(codes.ResourceExhausted, ""), exitInvalid},
		{status.Error(codes.FailedPrecondition, ""), exitUnusable},
		{status.Error(codes.Unavailable, ""), exitUnavailable},
		{status.Error(codes.DataLoss, ""), exitUnavailable},
		{status.Error(codes.Internal, ""), exitError},
		{fmt.Errorf("keyward: %w", errRefused), exitError},
		{os.ErrNotExist, exitError},
	} {
		if got := exitCode(tc.err); got != tc.want {
			t.Errorf("%v: exit %d, want %d", tc.err, got, tc.want)
		}
	}
}

// TestEveryVerb: every entry of the table has --help, which exits 0 with
// the help on standard output; a verb without its required flags exits 2
// naming them, before it dials (the socket does not exist).
func TestEveryVerb(t *testing.T) {
	none := filepath.Join(t.TempDir(), "none")
	for _, c := range commands {
		words := strings.Fields(c.path)
		var out, errb strings.Builder
		if code := run(context.Background(), append(words, "--socket", none, "--help"), strings.NewReader(""), &out, &errb); code != exitOK || errb.Len() > 0 || !strings.Contains(out.String(), "Usage:") {
			t.Errorf("keyward %s --help: exit %d, stdout %q, stderr %q", c.path, code, out.String(), errb.String())
		}
		cmd, _, err := newRoot(&env{}).Find(words)
		if err != nil {
			t.Fatal(err)
		}
		var required []string
		cmd.Flags().VisitAll(func(f *pflag.Flag) {
			if len(f.Annotations[cobra.BashCompOneRequiredFlag]) > 0 {
				required = append(required, fmt.Sprintf("%q", f.Name))
			}
		})
		if len(required) == 0 {
			continue
		}
		errb.Reset()
		want := fmt.Sprintf("keyward %s: required flag(s) %s not set; see keyward %s --help\n", c.path, strings.Join(required, ", "), c.path)
		if code := run(context.Background(), append(words, "--socket", none), strings.NewReader(""), io.Discard, &errb); code != exitUsage || errb.String() != want {
			t.Errorf("keyward %s: exit %d, %q; want %q", c.path, code, errb.String(), want)
		}
	}
}

// TestDocumentedCommands: every keyward command line in the shell
// examples of README.md and docs/*.md names a verb and parses: its
// flags exist, take what they are given, and the required ones are there.
func TestDocumentedCommands(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, path := range append(files, filepath.Join("..", "..", "README.md")) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		inShell := false
		var line string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "```") {
				inShell = !inShell && (l == "```sh" || l == "```bash")
				continue
			}
			if line += l; !inShell || strings.HasSuffix(line, "\\") {
				line = strings.TrimSuffix(line, "\\")
				if !inShell {
					line = ""
				}
				continue
			}
			for _, segment := range strings.Split(line, "|") {
				words := shellWords(segment)
				if len(words) == 0 || (words[0] != "keyward" && words[0] != "./bin/keyward") {
					continue
				}
				n++
				if err := parseOnly(words[1:]); err != nil {
					t.Errorf("%s: %s: %v", path, strings.TrimSpace(segment), err)
				}
			}
			line = ""
		}
	}
	if n < 50 {
		t.Errorf("%d keyward command lines found in the docs; the test does not find them", n)
	}
	for _, bad := range []string{"key", "key create -name x", "key create -nme x -purpose sign", "encrypt -key k data", "frob", "key get -name x -bogus"} {
		if parseOnly(strings.Fields(bad)) == nil {
			t.Errorf("keyward %s parses", bad)
		}
	}
}

// shellWords splits a line of an example as the shell would, enough for
// the docs: quotes, and nothing from a comment or a redirection on.
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	in, quote := false, rune(0)
	for _, r := range s + " " {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == ' ' || r == '\t':
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		case !in && (r == '#' || r == '<' || r == '>'):
			return words
		default:
			w.WriteRune(r)
			in = true
		}
	}
	return words
}

// parseOnly parses a command line as keyward would, and runs nothing.
func parseOnly(args []string) error {
	root := newRoot(&env{ctx: context.Background()})
	cmd, rest, err := root.Find(normalize(root, args))
	switch {
	case err != nil:
		return err
	case cmd.HasSubCommands() || cmd == root:
		return fmt.Errorf("%s is not a verb", cmd.CommandPath())
	}
	if err := cmd.ParseFlags(rest); err != nil {
		return err
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		return err
	}
	if err := cmd.ValidateRequiredFlags(); err != nil {
		return err
	}
	return cmd.ValidateFlagGroups()
}
