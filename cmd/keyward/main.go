// Command keyward is keyward's command-line client, for operators and for
// scripts: it manages root keys, API keys, managed credentials and tokens,
// does envelope encryption, reports keywardd's status, verifies audit logs
// and checks an HSM. Plaintext and secrets come through files or standard
// input and go to files or standard output, never through arguments. See
// docs/api.md for the commands, their JSON and the exit codes.
//
// The commands are a table (commands.go): one entry per verb with its
// flags and its action, from which github.com/spf13/cobra makes the
// parsing, the help and the shell completion. What every verb shares is in
// one place (cli.go): dialling keywardd, printing an answer as a table or
// JSON, and turning an error into a message and an exit code.
//
// One piece is hand-written: keyward has always taken Go's single-dash
// long flags (keyward key create -name N), which pflag would read as
// shorthands (-n -a -m -e). normalize rewrites a single-dash argument that
// names a known long flag of its command into the double-dash form before
// cobra parses, and leaves flag values and everything after "--" alone;
// cobra has no hook for this, and pflag's own normalization sees names,
// not the dashes.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon/api/client"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes, one per kind of refusal, so that scripts can tell them apart.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitDenied      = 3
	exitNotFound    = 4
	exitExists      = 5
	exitInvalid     = 6
	exitUnusable    = 7
	exitUnavailable = 8
)

func main() { os.Exit(mainCode()) }

// mainCode is main, but for the exit.
func mainCode() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
}

// run executes one command line and returns the exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr}
	root := newRoot(e)
	e.root = root
	root.SetArgs(normalize(root, args))
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	var ae actionError
	var ue usageError
	if isUsage := errors.As(err, &ue); isUsage || !errors.As(err, &ae) {
		see := cmd.CommandPath()
		if ue.see != "" {
			see = ue.see
		}
		fmt.Fprintf(stderr, "%s: %v; see %s --help\n", cmd.CommandPath(), err, see)
		return exitUsage
	}
	fmt.Fprintf(stderr, "keyward: %s\n", errorMessage(ae.err))
	return exitCode(ae.err)
}

// exitCode is the exit code of a verb's error.
func exitCode(err error) int {
	var absent *daemonAbsent
	if errors.As(err, &absent) {
		return exitUnavailable
	}
	var ce *client.Error
	if !errors.As(client.Wrap(err), &ce) {
		return exitError
	}
	switch ce.Code {
	case codes.PermissionDenied, codes.Unauthenticated:
		return exitDenied
	case codes.NotFound:
		return exitNotFound
	case codes.AlreadyExists:
		return exitExists
	case codes.InvalidArgument, codes.ResourceExhausted:
		return exitInvalid
	case codes.FailedPrecondition:
		return exitUnusable
	case codes.Unavailable, codes.DataLoss:
		return exitUnavailable
	}
	return exitError
}

// errorMessage is keywardd's message for a refusal, else the error.
func errorMessage(err error) string {
	var ce *client.Error
	if errors.As(client.Wrap(err), &ce) {
		return ce.Message
	}
	return err.Error()
}

func versionCommand(f *flagSet) action {
	return func(e *env, _ []string) error {
		return e.showf(struct {
			Version string `json:"version"`
		}{version}, "keyward %s\n", version)
	}
}

// completion writes the shell's completion script, which asks keyward
// itself (cobra's __complete) what to offer.
func completion(f *flagSet) action {
	return func(e *env, args []string) error {
		switch args[0] {
		case "bash":
			return e.root.GenBashCompletionV2(e.stdout, true)
		case "zsh":
			return e.root.GenZshCompletion(e.stdout)
		}
		return usageError{msg: fmt.Sprintf("no completion for %q: bash or zsh", args[0])}
	}
}
