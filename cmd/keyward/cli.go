package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/api/client"
)

// command is one entry of the command table: a verb, what its --help says,
// its flags and what it does. An entry without flags is a group of verbs
// ("key", "apikey"): it does nothing but list them.
type command struct {
	path    string   // the words after keyward: "key create"
	group   string   // a top-level entry: the heading keyward --help lists it under
	args    []string // its positional arguments: required ("KEY"), or optional ("[FILE]"), after those required; data and secrets are never arguments
	short   string   // one line, for the list of commands
	long    string   // the rest of its --help
	example string
	offline bool // runs without keywardd
	// flags declares the verb's flags and returns what it does with their
	// values once they are parsed.
	flags func(f *flagSet) action
}

// action is what a verb does; args are its positional arguments.
type action func(e *env, args []string) error

// flagSet is where a verb declares its flags: pflag's, plus the kinds
// keyward has (k=v pairs, enums, rate limits) and the marks cobra checks
// and completes (required, mutually exclusive, the values to complete).
type flagSet struct {
	*pflag.FlagSet
	cmd *cobra.Command
}

// Required marks flags the verb cannot do without.
func (f *flagSet) Required(names ...string) {
	for _, n := range names {
		if err := f.cmd.MarkFlagRequired(n); err != nil {
			panic(err) // a flag of the table that does not exist
		}
		f.Lookup(n).Usage += " (required)"
	}
}

// Exclusive marks flags that contradict each other.
func (f *flagSet) Exclusive(names ...string) { f.cmd.MarkFlagsMutuallyExclusive(names...) }

// Complete makes the shell complete a flag with values.
func (f *flagSet) Complete(name string, values ...string) {
	if err := f.cmd.RegisterFlagCompletionFunc(name, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp)); err != nil {
		panic(err)
	}
}

// Pairs is a repeatable k=v flag.
func (f *flagSet) Pairs(name, usage string) map[string]string {
	p := pairs{}
	f.Var(p, name, usage)
	return p
}

// Enum is a flag that takes the short form of a keyward.v1 enum's names
// (KEY_PURPOSE_ENCRYPT is encrypt), and completes them.
func (f *flagSet) Enum(name, usage string, names map[int32]string, prefix string) *int32 {
	v := &enumFlag{names: names, prefix: prefix}
	f.Var(v, name, usage+" ("+strings.Join(v.choices(), ", ")+")")
	f.Complete(name, v.choices()...)
	return &v.value
}

// Time is an RFC 3339 time flag; its zero value is unset.
func (f *flagSet) Time(name, usage string) *time.Time {
	v := &timeFlag{}
	f.Var(v, name, usage)
	return &v.t
}

// env is what every verb gets: the global flags, the standard streams and,
// for a verb that talks to keywardd, the connection.
type env struct {
	ctx    context.Context
	socket string
	output outputFormat
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	api    *client.Client // the connection to keywardd, for a verb that is not offline
	root   *cobra.Command
}

// usageError is a mistake in the command line (exit 2); see is the
// command whose --help the message points to, if not the one that failed.
type usageError struct{ msg, see string }

func (e usageError) Error() string { return e.msg }

// actionError is an error of a verb's action, as opposed to one cobra
// found in the command line: everything that is not an actionError is a
// usage mistake.
type actionError struct{ err error }

func (e actionError) Error() string { return e.err.Error() }
func (e actionError) Unwrap() error { return e.err }

// Top-level groups of keyward --help.
const (
	groupKeys        = "keys"
	groupEnvelope    = "envelope"
	groupCrypto      = "crypto"
	groupAPIKeys     = "apikeys"
	groupCredentials = "credentials"
	groupTokens      = "tokens"
	groupDaemon      = "daemon"
)

const rootLong = `keyward is keyward's command-line client, for operators and for scripts:
it manages root keys, API keys, managed credentials and tokens, does
envelope encryption, reports keywardd's status, verifies audit logs and
checks an HSM.

The socket is --socket, else $KEYWARD_SOCKET, else ` + client.DefaultSocket + `.
Flags are written -flag or --flag, their values after a space or an =;
global flags go before or after the command.
--output json prints every answer as JSON (docs/api.md has the shapes).
Data and secrets come through files or standard input, never arguments.

Exit codes: 0 ok, 1 error, 2 usage, 3 permission denied, 4 not found,
5 already exists, 6 invalid argument, 7 key not usable, 8 unavailable.`

// usageTemplate is cobra's, but for the usage line: a group's own line
// would show flags, and it takes none.
const usageTemplate = `Usage:{{if not .HasAvailableSubCommands}}
  {{.UseLine}}{{else}}
  {{.CommandPath}} [command]{{end}}{{if .HasExample}}

Examples:
{{.Example}}{{end}}{{if .HasAvailableSubCommands}}{{$cmds := .Commands}}{{if eq (len .Groups) 0}}

Commands:{{range $cmds}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{else}}{{range $group := .Groups}}

{{.Title}}{{range $cmds}}{{if (and (eq .GroupID $group.ID) (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{end}}{{end}}{{if .HasAvailableLocalFlags}}

Flags:
{{.LocalFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableInheritedFlags}}

Global flags:
{{.InheritedFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableSubCommands}}

"{{.CommandPath}} COMMAND --help" says more about a command.{{end}}
`

// newRoot makes keyward's command tree from the table, bound to e.
func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:           "keyward",
		Short:         "keyward's command-line client",
		Long:          rootLong,
		SilenceErrors: true,
		SilenceUsage:  true,
		// A group takes no flags of its own: one meant for a verb is
		// skipped, so that the message is about the verb (unknown, or
		// not named), not about the flag.
		FParseErrWhitelist: cobra.FParseErrWhitelist{UnknownFlags: true},
		Args:               cobra.ArbitraryArgs,
		RunE:               groupRun,
		CompletionOptions:  cobra.CompletionOptions{DisableDefaultCmd: true},
	}
	root.PersistentFlags().StringVar(&e.socket, "socket", "", "keywardd's socket (default $KEYWARD_SOCKET, else "+client.DefaultSocket+")")
	root.PersistentFlags().Var(&e.output, "output", "table or json")
	if err := root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp)); err != nil {
		panic(err)
	}
	root.SetFlagErrorFunc(flagError)
	root.SetUsageTemplate(usageTemplate)
	root.AddGroup(
		&cobra.Group{ID: groupKeys, Title: "Root keys (operators):"},
		&cobra.Group{ID: groupEnvelope, Title: "Envelope encryption (applications):"},
		&cobra.Group{ID: groupCrypto, Title: "Signatures, MACs and random bytes (applications):"},
		&cobra.Group{ID: groupAPIKeys, Title: "API keys:"},
		&cobra.Group{ID: groupCredentials, Title: "Managed credentials (rotated by plugins):"},
		&cobra.Group{ID: groupTokens, Title: "Short-lived tokens:"},
		&cobra.Group{ID: groupDaemon, Title: "keywardd, files and this program:"},
	)
	root.SetHelpCommand(&cobra.Command{
		Use:   "help [COMMAND]...",
		Short: "the help of a command (the same as COMMAND --help)",
		Args:  cobra.ArbitraryArgs,
		RunE: func(cc *cobra.Command, args []string) error {
			c, rest, err := cc.Root().Find(args)
			switch {
			case err != nil:
				return usageError{msg: err.Error()}
			case len(rest) > 0:
				return unknownCommand(c, rest[0])
			}
			return c.Help()
		},
		ValidArgsFunction: func(cc *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			c, _, err := cc.Root().Find(args)
			if err != nil {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			var names []cobra.Completion
			for _, s := range c.Commands() {
				if s.IsAvailableCommand() {
					names = append(names, cobra.CompletionWithDesc(s.Name(), s.Short))
				}
			}
			return names, cobra.ShellCompDirectiveNoFileComp
		},
	})
	root.SetHelpCommandGroupID(groupDaemon)

	for _, c := range commands {
		words := strings.Fields(c.path)
		parent := root
		for _, w := range words[:len(words)-1] {
			if parent = subcommand(parent, w); parent == nil {
				panic("keyward: the table lists " + c.path + " before its group")
			}
		}
		cc := &cobra.Command{
			Use:     strings.Join(append([]string{words[len(words)-1]}, c.args...), " "),
			Short:   c.short,
			Long:    strings.TrimSpace(c.short + "\n\n" + c.long),
			Example: c.example,
			GroupID: c.group,
		}
		if c.flags == nil {
			cc.FParseErrWhitelist.UnknownFlags, cc.Args, cc.RunE = true, cobra.ArbitraryArgs, groupRun
		} else {
			cc.Args = positional(c.args)
			act := c.flags(&flagSet{FlagSet: cc.Flags(), cmd: cc})
			cc.RunE = func(cc *cobra.Command, args []string) error { return e.do(c, act, args) }
		}
		parent.AddCommand(cc)
	}
	// The help command, and every verb's --help, are there before the
	// command line is looked at, so that normalize knows them.
	root.InitDefaultHelpCmd()
	var initHelp func(*cobra.Command)
	initHelp = func(c *cobra.Command) {
		c.InitDefaultHelpFlag()
		for _, s := range c.Commands() {
			initHelp(s)
		}
	}
	initHelp(root)
	return root
}

// do runs a verb: connected to keywardd unless it runs offline.
func (e *env) do(c command, act action, args []string) error {
	if !c.offline {
		api, err := client.Dial(e.socket)
		if err != nil {
			return actionError{err}
		}
		defer api.Close()
		e.api = api
	}
	if err := act(e, args); err != nil {
		if !c.offline {
			err = notAnswering(client.SocketPath(e.socket), err)
		}
		return actionError{err}
	}
	return nil
}

// positional checks a verb's positional arguments: those names requires,
// those it takes ("[FILE]"), and nothing else, since data and secrets
// never come that way.
func positional(names []string) cobra.PositionalArgs {
	required := 0
	for _, n := range names {
		if !strings.HasPrefix(n, "[") {
			required++
		}
	}
	return func(cc *cobra.Command, args []string) error {
		switch {
		case len(args) > len(names):
			return usageError{msg: fmt.Sprintf("unexpected %q (secrets and data go through files or standard input, never arguments)", clip(args[len(names)]))}
		case len(args) < required:
			return usageError{msg: fmt.Sprintf("name the %s: %s", strings.ToLower(names[len(args)]), cc.UseLine())}
		}
		return nil
	}
}

// groupRun is what a group does when no verb of it is named: a usage
// error that says which verbs there are.
func groupRun(cc *cobra.Command, args []string) error {
	if len(args) > 0 {
		return unknownCommand(cc, args[0])
	}
	var names []string
	for _, s := range cc.Commands() {
		if s.IsAvailableCommand() && s.Name() != "help" {
			names = append(names, s.Name())
		}
	}
	return usageError{msg: "name a command: " + strings.Join(names, ", ")}
}

func unknownCommand(cc *cobra.Command, word string) error {
	cc.SuggestionsMinimumDistance = 2
	msg := fmt.Sprintf("unknown command %q", word)
	if s := cc.SuggestionsFor(word); len(s) > 0 {
		msg += fmt.Sprintf(" (did you mean %s?)", strings.Join(s, " or "))
	}
	return usageError{msg: msg, see: cc.CommandPath()}
}

// clip shortens an argument echoed in an error: it may be a secret pasted
// where it does not belong, and a few characters say which argument.
func clip(arg string) string {
	if r := []rune(arg); len(r) > 8 {
		return string(r[:4]) + "…"
	}
	return arg
}

// flagError is how a flag that cobra cannot parse is reported; pflag
// reads an unknown -pin as the shorthands p, i, n, and says so: keyward
// has no shorthands but -h, so it speaks of the flag.
func flagError(_ *cobra.Command, err error) error {
	var ne *pflag.NotExistError
	if errors.As(err, &ne) && len(ne.GetSpecifiedShortnames()) > 1 {
		// Only the name: what follows an = may be a secret typed where
		// it does not belong (-pin=...).
		name, _, _ := strings.Cut(ne.GetSpecifiedShortnames(), "=")
		return usageError{msg: "unknown flag: -" + name}
	}
	return usageError{msg: err.Error()}
}

// normalize rewrites each single-dash argument that names a long flag of
// its command ("-name", "-output=json") into the double-dash form. keyward
// has always taken Go's single-dash flags, which pflag would read as
// shorthands (n, a, m, e); the value of a flag, and everything after "--",
// is left as it is. A shell's completion request (cobra's __complete) is
// normalized but for the word being completed.
func normalize(root *cobra.Command, args []string) []string {
	if len(args) > 1 && (args[0] == cobra.ShellCompRequestCmd || args[0] == cobra.ShellCompNoDescRequestCmd) {
		return slices.Concat(args[:1], normalize(root, args[1:len(args)-1]), args[len(args)-1:])
	}
	out := make([]string, 0, len(args))
	cmd, words := root, true
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return append(out, args[i:]...)
		case len(a) > 2 && a[0] == '-':
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			f := lookupFlag(cmd, name)
			if f == nil {
				break
			}
			if a[1] != '-' {
				a = "-" + a
			}
			if takesValue(f, a) && i+1 < len(args) {
				out = append(out, a, args[i+1])
				i++
				continue
			}
		case words && a != "" && a[0] != '-':
			if sub := subcommand(cmd, a); sub != nil {
				cmd = sub
			} else {
				words = false
			}
		}
		out = append(out, a)
	}
	return out
}

// takesValue: the flag, as written in arg, takes the next argument as
// its value.
func takesValue(f *pflag.Flag, arg string) bool {
	return f.NoOptDefVal == "" && !strings.Contains(arg, "=")
}

// lookupFlag finds a long flag of cmd, its own or inherited.
func lookupFlag(cmd *cobra.Command, name string) *pflag.Flag {
	if f := cmd.Flags().Lookup(name); f != nil {
		return f
	}
	for p := cmd.Parent(); p != nil; p = p.Parent() {
		if f := p.PersistentFlags().Lookup(name); f != nil {
			return f
		}
	}
	return nil
}

func subcommand(cmd *cobra.Command, name string) *cobra.Command {
	for _, c := range cmd.Commands() {
		if c.Name() == name || c.HasAlias(name) {
			return c
		}
	}
	return nil
}

// notAnswering turns a call that found no keywardd behind the socket into
// a sentence that says what to do. keywardd's own UNAVAILABLE (its HSM,
// say) has a message of its own, and the socket answers: that stays.
func notAnswering(path string, err error) error {
	if st, ok := status.FromError(err); !ok || st.Code() != codes.Unavailable {
		return err
	}
	conn, dialErr := net.DialTimeout("unix", path, time.Second)
	if dialErr == nil {
		conn.Close()
		return err
	}
	return &daemonAbsent{path: path, err: dialErr}
}

// daemonAbsent: nothing answers at the socket.
type daemonAbsent struct {
	path string
	err  error
}

func (d *daemonAbsent) Error() string {
	cause := d.err
	for errors.Unwrap(cause) != nil {
		cause = errors.Unwrap(cause)
	}
	reason, hint := cause.Error(), "start it (make run, or systemctl start keywardd), or point --socket / $KEYWARD_SOCKET at its socket"
	switch {
	case errors.Is(d.err, syscall.ENOENT):
		reason = "no such file"
	case errors.Is(d.err, syscall.ECONNREFUSED):
		reason = "the socket is there, but nothing listens on it"
		if fi, err := os.Stat(d.path); err == nil && fi.Mode()&fs.ModeSocket == 0 {
			reason, hint = "it is not a socket but a "+map[bool]string{true: "directory", false: "file"}[fi.IsDir()], "point --socket / $KEYWARD_SOCKET at keywardd's socket (socket.path in keywardd.yaml)"
		}
	case errors.Is(d.err, syscall.EACCES):
		reason, hint = "permission denied", "keywardd lets its socket's group in (socket.group in keywardd.yaml): join it, or run as a user who may"
	}
	return fmt.Sprintf("keywardd is not answering at %s (%s); %s", d.path, reason, hint)
}

// show writes an answer: as JSON with --output json, else as table
// writes it.
func (e *env) show(v any, table func(w io.Writer) error) error {
	if e.output.json() {
		return e.printJSON(v)
	}
	return table(e.stdout)
}

// showf is show for an answer that is one line of text in a table.
func (e *env) showf(v any, format string, a ...any) error {
	return e.show(v, func(w io.Writer) error {
		_, err := fmt.Fprintf(w, format, a...)
		return err
	})
}

// timeOr is an optional time in a table: RFC 3339, or none if unset.
func timeOr(t *timestamppb.Timestamp, none string) string {
	if t == nil {
		return none
	}
	return t.AsTime().Format(time.RFC3339)
}

// printJSON writes v as indented JSON: a keyward.v1 message in the proto3
// JSON mapping (so a resource has the same shape in every command that
// shows it, and the same as the API's), a list of messages as an array,
// anything else through encoding/json.
func (e *env) printJSON(v any) error {
	raw, err := toJSON(v)
	if err != nil {
		return err
	}
	var compact, out bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		return err
	}
	if err := json.Indent(&out, compact.Bytes(), "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = e.stdout.Write(out.Bytes())
	return err
}

// jsonMapping is how keyward.v1 messages are printed: every field is
// there, with its zero value if it has none (0, false, "", [], {}), so
// that a script finds the same fields every time; a message field that is
// not set (a time, say) is left out.
var jsonMapping = protojson.MarshalOptions{EmitDefaultValues: true}

func toJSON(v any) ([]byte, error) {
	switch v := v.(type) {
	case proto.Message:
		return jsonMapping.Marshal(v)
	case []proto.Message:
		items := make([]json.RawMessage, len(v))
		for i, m := range v {
			b, err := jsonMapping.Marshal(m)
			if err != nil {
				return nil, err
			}
			items[i] = b
		}
		return json.Marshal(items)
	}
	return json.Marshal(v)
}

// messages is a list for printJSON.
func messages[M proto.Message](ms []M) []proto.Message {
	out := make([]proto.Message, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}
