package main

import (
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// pairs is a repeatable k=v flag.
type pairs map[string]string

func (p pairs) String() string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(p)) {
		out = append(out, k+"="+p[k])
	}
	return strings.Join(out, ",")
}

func (p pairs) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not key=value", s)
	}
	if _, dup := p[k]; dup {
		return fmt.Errorf("%q given twice", k)
	}
	p[k] = v
	return nil
}

func (p pairs) Type() string { return "k=v" }

// enumFlag takes a keyward.v1 enum value by its short name: lower case,
// without the prefix, dashes for underscores (KEY_ALGORITHM_AES256_GCM is
// aes256-gcm). Upper case and underscores are accepted too.
type enumFlag struct {
	names  map[int32]string
	prefix string
	value  int32
}

// short is an enum value's name as the CLI writes it.
func short(s fmt.Stringer, prefix string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(s.String(), prefix)), "_", "-")
}

func (f *enumFlag) name(n int32) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(f.names[n], f.prefix)), "_", "-")
}

func (f *enumFlag) choices() []string {
	var out []string
	for _, n := range slices.Sorted(maps.Keys(f.names)) {
		if n != 0 {
			out = append(out, f.name(n))
		}
	}
	return out
}

func (f *enumFlag) String() string {
	if f.value == 0 {
		return ""
	}
	return f.name(f.value)
}

func (f *enumFlag) Set(s string) error {
	s = strings.ReplaceAll(strings.ToLower(s), "_", "-")
	for n := range f.names {
		if n != 0 && f.name(n) == s {
			f.value = n
			return nil
		}
	}
	return fmt.Errorf("it is one of %s", strings.Join(f.choices(), ", "))
}

func (f *enumFlag) Type() string { return "string" }

// timeFlag is an RFC 3339 time.
type timeFlag struct{ t time.Time }

func (f *timeFlag) String() string {
	if f.t.IsZero() {
		return ""
	}
	return f.t.Format(time.RFC3339)
}

func (f *timeFlag) Set(s string) error {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return fmt.Errorf("%q is not an RFC 3339 time (2027-01-31T00:00:00Z)", s)
	}
	f.t = t
	return nil
}

func (f *timeFlag) Type() string { return "time" }

// outputFormat is the global --output: table (or text, as hsm check
// called it) for people, json for scripts.
type outputFormat string

func (o *outputFormat) json() bool { return *o == "json" }

func (o *outputFormat) String() string {
	if *o == "" {
		return "table"
	}
	return string(*o)
}

func (o *outputFormat) Set(s string) error {
	switch s {
	case "table", "text":
		*o = "table"
	case "json":
		*o = "json"
	default:
		return fmt.Errorf("it is table or json")
	}
	return nil
}

func (o *outputFormat) Type() string { return "format" }

// limitList is a repeatable rate-limit flag: LIMIT/PERIOD[,burst=B], the
// period s, m, h, d or a duration (100/s, 5000/h,burst=500, 10/30s).
type limitList []*keywardv1.RateLimit

func (l *limitList) String() string {
	var out []string
	for _, r := range *l {
		out = append(out, fmtLimit(r))
	}
	return strings.Join(out, " ")
}

func (l *limitList) Set(s string) error {
	rate, burst, hasBurst := strings.Cut(s, ",")
	n, per, err := parseRate(rate)
	if err != nil {
		return err
	}
	b := n
	if hasBurst {
		v, ok := strings.CutPrefix(burst, "burst=")
		if b, err = strconv.ParseUint(v, 10, 32); !ok || err != nil || b == 0 {
			return fmt.Errorf("%q: the burst is burst=N, N at least 1", s)
		}
	}
	*l = append(*l, &keywardv1.RateLimit{Limit: uint32(n), Per: durationpb.New(per), Burst: uint32(b)})
	return nil
}

func (l *limitList) Type() string { return "N/PERIOD[,burst=B]" }

// parseRate reads N/PERIOD.
func parseRate(s string) (uint64, time.Duration, error) {
	ns, ps, ok := strings.Cut(s, "/")
	n, err := strconv.ParseUint(ns, 10, 32)
	if !ok || err != nil || n == 0 {
		return 0, 0, fmt.Errorf("%q is not N/PERIOD (100/s, 5000/h, 10/30s)", s)
	}
	per, ok := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}[ps]
	if !ok {
		if per, err = time.ParseDuration(ps); err != nil || per <= 0 {
			return 0, 0, fmt.Errorf("%q: the period is s, m, h, d or a duration such as 30s", s)
		}
	}
	return n, per, nil
}

func fmtLimit(l *keywardv1.RateLimit) string {
	return fmt.Sprintf("%d/%v,burst=%d", l.GetLimit(), l.GetPer().AsDuration(), l.GetBurst())
}

// readInput reads a file, or standard input for "" or "-".
func (e *env) readInput(path string) ([]byte, error) {
	if path == "" || path == "-" {
		return io.ReadAll(io.LimitReader(e.stdin, 64<<20))
	}
	return os.ReadFile(path)
}

// writeOutput writes a file, or standard output for "" or "-". The file is
// mode 0600 even if it existed with another mode, and a symlink at the path
// is refused: what is written may be a data key.
func (e *env) writeOutput(path string, data []byte) error {
	if path == "" || path == "-" {
		_, err := e.stdout.Write(data)
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writeData writes what a command produced (a plaintext, a ciphertext, a
// secret): to the file out if there is one, else to standard output, raw,
// or with --output json inside the answer, base64 (the proto3 JSON
// mapping of bytes). data points at the answer's field, which is cleared
// once the file has it.
func (e *env) writeData(out string, data *[]byte, answer any) error {
	if out != "" && out != "-" {
		err := e.writeOutput(out, *data)
		clear(*data)
		*data = nil
		if err != nil || !e.output.json() {
			return err
		}
	}
	if e.output.json() {
		return e.printJSON(answer)
	}
	return e.writeOutput("", *data)
}
