// Command keyward is keyward's command-line client, for operators and for
// scripts: it manages root keys, does envelope encryption, reports keywardd's
// status, verifies audit logs and checks an HSM. Plaintext and secrets come
// through files or standard input and go to files or standard output, never
// through arguments. See docs/api.md for the commands and exit codes.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon/api/client"
)

const usage = `usage: keyward [-socket PATH] [-output table|json] <command> [flags]

keys (operators):
  key create -name N -purpose encrypt|sign|hmac [-algorithm A] [-rotation-period D] [-label k=v]...
  key get -name N | key list | key rotate -name N
  key enable -name N | key disable -name N | key set-min-version -name N -version V
  key schedule-deletion -name N [-wait D] | key cancel-deletion -name N
envelope encryption (applications):
  datakey -key K [-context k=v]... [-size 32] [-plaintext-out FILE] [-wrapped-out FILE] [-without-plaintext]
  encrypt -key K [-context k=v]... [-in FILE] [-out FILE]
  decrypt [-context k=v]... [-in FILE] [-out FILE]
  reencrypt [-context k=v]... [-to-key K] [-in FILE] [-out FILE]
API keys:
  apikey create -owner O -name N -env E -perm P... [-ttl D | -expires T] [-allow-ip CIDR]...
                [-limit N/PERIOD[,burst=B]]... [-unlimited] [-quota N] [-quota-refill N/PERIOD]
                [-tag T]... [-meta k=v]... [-secret-out FILE]
  apikey verify -env E [-perm P]... [-ip ADDR] [-cost N] [-in FILE]   (the key on standard input)
  apikey rotate -id ID [-overlap D | -risk high|moderate] [-secret-out FILE]
  apikey revoke -id ID | apikey revoke [-owner O] [-tag T] [-env E] [-all] [-dry-run]
  revoke (-id ID | -owner O | -tag T | -env E | -all) [-dry-run]   emergency: apikey revoke, timed
  apikey list [-owner O] [-tag T] [-env E] [-state S] | apikey show -id ID
  apikey update -id ID [-perm P]... [-limit L]... [-no-limits] [-allow-ip CIDR]... [-no-allowlist]
                [-expires T | -no-expiry] [-disable | -enable]
  apikey usage -id ID [-window D]
managed credentials (rotated by plugins):
  credential register -name N -plugin P [-config JSON] [-rotation-period D] [-overlap D]
  credential get -name N [-out FILE] | credential rotate -name N | credential revoke -name N
  credential list
short-lived tokens:
  token mint -key K -audience A... [-scope S]... [-claim k=v]... [-ttl 5m] [-subject S]
  token verify -audience A [-in FILE]      (the token on standard input)
  token revoke [-in FILE | -id JTI] | token jwks
  signing-key list | signing-key rotate -name K
daemon and files:
  status
  review [-unused 720h] [-top 5] [-audit FILE [-window 720h]] [-format table|json|markdown]   (monthly: keys to look at)
  rotation plan [-within D] [-limit N]   what keywardd rotates next, by its rotation policies
  panic-rotate KEY [-dry-run]        emergency: a compromised key's new version at once, the old ones retired
  audit verify FILE [-module PATH -token LABEL -pin-file FILE]
  hsm check -module PATH (-token LABEL | -uri URI) (-pin-file FILE | -pin-env VAR)
  version

The socket is -socket, else $KEYWARD_SOCKET, else /run/keyward/keyward.sock.
Exit codes: 0 ok, 1 error, 2 usage, 3 permission denied, 4 not found,
5 already exists, 6 invalid argument, 7 key not usable, 8 unavailable.
`

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

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// env is what every command gets.
type env struct {
	ctx    context.Context
	socket string
	json   bool
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
}

// usageError is a mistake in the command line.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// run executes one command line and returns the exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr}
	// Global flags come before the command.
	for len(args) > 0 {
		switch {
		case args[0] == "-socket" || args[0] == "--socket":
			if len(args) < 2 {
				return fail(e, usageError{"-socket needs a path"})
			}
			e.socket, args = args[1], args[2:]
			continue
		case args[0] == "-output" || args[0] == "--output":
			if len(args) < 2 || (args[1] != "json" && args[1] != "table") {
				return fail(e, usageError{"-output is table or json"})
			}
			e.json, args = args[1] == "json", args[2:]
			continue
		}
		break
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	var err error
	switch cmd, rest := args[0], args[1:]; {
	case cmd == "help" || cmd == "-h" || cmd == "--help", len(rest) > 0 && (rest[0] == "-h" || rest[0] == "--help" || rest[0] == "help"):
		fmt.Fprint(stdout, usage)
		return exitOK
	case cmd == "version":
		fmt.Fprintln(stdout, "keyward", version)
		return exitOK
	case cmd == "hsm" && len(rest) > 0 && rest[0] == "check":
		return hsmCheck(ctx, rest[1:], stdout, stderr)
	case cmd == "key" && len(rest) > 0:
		err = keyCommand(e, rest[0], rest[1:])
	case cmd == "rotation" && len(rest) > 0:
		err = rotationCommand(e, rest[0], rest[1:])
	case cmd == "panic-rotate":
		err = panicRotateCommand(e, rest)
	case cmd == "review":
		err = reviewCommand(e, rest)
	case cmd == "status":
		err = statusCommand(e, rest)
	case cmd == "datakey":
		err = datakeyCommand(e, rest)
	case cmd == "encrypt", cmd == "decrypt", cmd == "reencrypt":
		err = cryptCommand(e, cmd, rest)
	case cmd == "token" && len(rest) > 0:
		err = tokenCommand(e, rest[0], rest[1:])
	case cmd == "credential" && len(rest) > 0:
		err = credentialCommand(e, rest[0], rest[1:])
	case cmd == "revoke":
		// The emergency command: apikey revoke, timed from the command to
		// the moment the store has it, after which every verify refuses.
		start := time.Now()
		if err = apikeyCommand(e, "revoke", rest); err == nil && !slices.Contains(rest, "-dry-run") && !slices.Contains(rest, "--dry-run") {
			fmt.Fprintf(e.stderr, "in effect %v after the command: every verify from now on refuses the keys revoked\n", time.Since(start).Round(time.Millisecond))
		}
	case cmd == "apikey" && len(rest) > 0:
		err = apikeyCommand(e, rest[0], rest[1:])
	case cmd == "signing-key" && len(rest) > 0:
		err = signingKeyCommand(e, rest[0], rest[1:])
	case cmd == "audit" && len(rest) > 0 && rest[0] == "verify":
		err = auditVerify(e, rest[1:])
	default:
		err = usageError{fmt.Sprintf("unknown command %q; run keyward help", args[0])}
	}
	return fail(e, err)
}

// fail prints err and returns its exit code.
func fail(e *env, err error) int {
	if err == nil {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(e.stderr, "keyward: %s\n", ue.msg)
		return exitUsage
	}
	fmt.Fprintf(e.stderr, "keyward: %v\n", errorMessage(err))
	var ce *client.Error
	if !errors.As(err, &ce) {
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

func errorMessage(err error) string {
	var ce *client.Error
	if errors.As(err, &ce) {
		return ce.Message
	}
	return err.Error()
}

func (e *env) dial() (*client.Client, error) {
	return client.Dial(e.socket)
}
