package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/jackc/pgx/v5"

	"github.com/keyward/keyward/daemon/api/client/rewrap"
	"github.com/keyward/keyward/daemon/api/client/rewrap/pgrewrap"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// rewrapCommand moves a directory's or a PostgreSQL column's ciphertexts
// to the newest version of their keys (package rewrap).
func rewrapCommand(f *flagSet) action {
	dir := f.String("dir", "", "a directory of files, each a keyward ciphertext (what keyward encrypt writes)")
	pathKey := f.String("context-path", "", "with -dir: bind each file to its path under -dir, in this encryption context key")
	dsn := f.String("postgres", "", `with -table and -column: the database, as "host=/run/postgresql dbname=app user=rewrap" (the password from PGPASSWORD or ~/.pgpass, never here)`)
	table := f.String("table", "", "with -postgres: the table, optionally schema.table")
	idCol := f.String("id", "id", "with -postgres: the unique, ordered column naming a row (its primary key)")
	column := f.String("column", "", "with -postgres: the bytea column of ciphertexts")
	ctxCols := f.Pairs("context-column", "with -postgres: encryption context key=column, read from each row (repeatable)")
	encCtx := f.Pairs("context", "encryption context k=v, the same for every ciphertext (repeatable)")
	state := f.String("state", "", "the checkpoint file: a job stopped or crashed goes on from where it was when run again with it")
	rate := f.Float64("rate", 50, "ciphertexts a second sent to keywardd at most, so that live traffic keeps its share")
	batch := f.Int("batch", 1, "ciphertexts per call (BatchReEncrypt, up to the role's max_batch)")
	keys := f.StringSlice("key", nil, "move only ciphertexts of this key (repeatable); each gets a report even with none found")
	noReport := f.Bool("no-report", false, "do not report the counts to keywardd (keyward key set-min-version reads them)")
	return func(e *env, _ []string) error {
		src, closeSrc, err := e.rewrapSource(*dir, *pathKey, *dsn, *table, *idCol, *column, ctxCols, encCtx)
		if err != nil {
			return err
		}
		defer closeSrc()
		if *rate <= 0 || *batch < 1 {
			return usageError{msg: "-rate must be above 0 and -batch at least 1"}
		}
		bar := e.progress("rewrap "+src.Name(), -1)
		started := false
		rep, err := rewrap.Run(e.ctx, e.api, src, rewrap.Options{Rate: *rate, Batch: *batch, Keys: *keys, State: *state, NoReport: *noReport,
			Progress: func(p rewrap.Progress) {
				if !started && p.Total > 0 {
					bar.finish()
					bar = e.progress("rewrap "+src.Name(), p.Total)
				}
				started = true
				bar.set(p.Done, fmt.Sprintf("%d moved", p.Moved))
			}})
		bar.finish()
		if rep == nil {
			return err
		}
		if serr := e.show(rep, func(w io.Writer) error { return printRewrap(w, rep) }); serr != nil {
			return serr
		}
		switch {
		case errors.Is(err, context.Canceled):
			if *state == "" {
				return fmt.Errorf("the job stopped (%w); give -state FILE to go on from where a job stopped", err)
			}
			return fmt.Errorf("the job stopped (%w): run it again with -state %s to go on from where it was", err, *state)
		case err != nil:
			return err
		}
		if rep.Items == 0 {
			fmt.Fprintf(e.stderr, "warning: %s held nothing: is it the right place?\n", src.Name())
		}
		for _, k := range slices.Sorted(maps.Keys(rep.ReportErrors)) {
			fmt.Fprintf(e.stderr, "keywardd did not take the report on %s: %s\n", k, rep.ReportErrors[k])
		}
		if failed := sum(rep.Failed); failed > 0 {
			return fmt.Errorf("%d ciphertexts did not move (the first reasons are above); they still need their old versions", failed)
		}
		if len(rep.ReportErrors) > 0 {
			return errors.New("the job is done, but keywardd did not take its report: keyward key set-min-version cannot warn by it")
		}
		return nil
	}
}

// rewrapSource is the source the flags name, and how to let it go.
func (e *env) rewrapSource(dir, pathKey, dsn, table, idCol, column string, ctxCols, encCtx map[string]string) (rewrap.Source, func(), error) {
	switch {
	case (dir == "") == (dsn == ""):
		return nil, nil, usageError{msg: "give -dir, or -postgres with -table and -column"}
	case dir != "":
		if table != "" || column != "" || len(ctxCols) > 0 {
			return nil, nil, usageError{msg: "-table, -column and -context-column go with -postgres, not -dir"}
		}
		fixed := maps.Clone(encCtx)
		d := &rewrap.Dir{Root: dir}
		if len(fixed) > 0 || pathKey != "" {
			d.Context = func(rel string) map[string]string {
				c := maps.Clone(fixed)
				if c == nil {
					c = map[string]string{}
				}
				if pathKey != "" {
					c[pathKey] = rel
				}
				return c
			}
		}
		return d, func() {}, nil
	}
	if table == "" || column == "" {
		return nil, nil, usageError{msg: "-postgres needs -table and -column"}
	}
	if pathKey != "" {
		return nil, nil, usageError{msg: "-context-path goes with -dir; a table's context comes from -context-column"}
	}
	if hasPassword(dsn) {
		return nil, nil, usageError{msg: "-postgres holds a password, which every user can read in the process list: put it in PGPASSWORD or ~/.pgpass (PGPASSFILE) instead"}
	}
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, nil, fmt.Errorf("-postgres: %w", err)
	}
	return &pgrewrap.Column{DB: conn, Table: table, ID: idCol, Column: column, ContextColumns: ctxCols, Context: encCtx},
		func() { conn.Close(context.Background()) }, nil
}

// passwordKey is a password or sslpassword (the client key's passphrase)
// in a key=value connection string, as the driver reads one: after the
// start, a space or a quoted value's closing quote.
var passwordKey = regexp.MustCompile(`(^|[\s'])(ssl)?password\s*=`)

// hasPassword: a connection string that gives a password.
func hasPassword(dsn string) bool {
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		_, set := u.User.Password()
		return set || u.Query().Has("password") || u.Query().Has("sslpassword")
	}
	return passwordKey.MatchString(dsn)
}

// printRewrap is a job's report as tables.
func printRewrap(w io.Writer, r *rewrap.Report) error {
	how := "went over the whole of"
	if !r.Complete {
		how = "stopped part way through"
	}
	if r.Resumed {
		how = "resumed, and " + how
	}
	fmt.Fprintf(w, "%s %s: %d items, %d moved to the newest version, %d there already, %d did not move, %d changed by the application meanwhile, %d not keyward ciphertexts",
		how, r.Source, r.Items, r.Moved, r.Current, sum(r.Failed), r.Changed, r.NotCiphertext)
	if r.OtherKeys > 0 {
		fmt.Fprintf(w, ", %d of other keys", r.OtherKeys)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tFOUND UNDER\tNOW UNDER\tNOT MOVED")
	for _, k := range slices.Sorted(maps.Keys(r.Found)) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", k, r.Found[k], r.Now[k], r.Failed[k])
	}
	tw.Flush()
	for _, f := range r.Errors {
		fmt.Fprintf(w, "  %s: %s\n", printableOr(f.Cursor), printableOr(f.Error))
	}
	if len(r.Reported) > 0 {
		_, err := fmt.Fprintf(w, "reported to keywardd on %s: keyward key get shows it, and keyward key set-min-version reads it\n", strings.Join(r.Reported, ", "))
		return err
	}
	return nil
}

// printableOr is s, or s quoted when it holds a control or format
// character: a file's name goes to the operator's terminal.
func printableOr(s string) string {
	for _, c := range s {
		if unicode.IsControl(c) || unicode.Is(unicode.Cf, c) {
			return strconv.Quote(s)
		}
	}
	return s
}

func sum(m map[string]uint64) uint64 {
	var n uint64
	for _, v := range m {
		n += v
	}
	return n
}

// warnRewrap warns, before the minimum decryption version of key is raised
// to v, of the ciphertexts the rewrap reports still count under the
// versions it retires, and of a key no job has reported on.
func (e *env) warnRewrap(k *keywardv1.Key, v uint32) {
	if k.GetPurpose() != keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT || v <= k.GetMinDecryptionVersion() {
		return
	}
	reps := k.GetRewrapReports()
	if len(reps) == 0 {
		fmt.Fprintf(e.stderr, "warning: no rewrap job has reported on %s: a ciphertext still under a version below %d will not open (keyward rewrap moves them, and reports)\n", k.GetName(), v)
		return
	}
	for _, r := range reps {
		n := rewrap.Counts(r.GetCiphertexts()).Under(v)
		partial := ""
		if !r.GetComplete() {
			partial = " (a job that stopped part way: it counted only what it saw)"
		}
		if n > 0 {
			fmt.Fprintf(e.stderr, "warning: %s's last rewrap report (%s, by %s)%s counts %d ciphertexts under versions below %d (%s): they will not open until the minimum is lowered again (keyward key set-min-version -name %s -version %d)\n",
				r.GetSource(), r.GetReportTime().AsTime().Format(time.RFC3339), r.GetReporter(), partial, n, v, rewrap.Counts(r.GetCiphertexts()), k.GetName(), k.GetMinDecryptionVersion())
		} else if partial != "" {
			fmt.Fprintf(e.stderr, "warning: %s's last rewrap report (%s)%s\n", r.GetSource(), r.GetReportTime().AsTime().Format(time.RFC3339), partial)
		}
	}
}

// printRewrapReports lists a key's rewrap reports under its table.
func printRewrapReports(w io.Writer, k *keywardv1.Key) {
	if len(k.GetRewrapReports()) == 0 {
		return
	}
	fmt.Fprintln(w, "rewrap reports:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  SOURCE\tREPORTED\tBY\tPASS\tCIPHERTEXTS UNDER\tNOT MOVED")
	for _, r := range k.GetRewrapReports() {
		pass := "complete"
		if !r.GetComplete() {
			pass = "partial"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%d\n", r.GetSource(), r.GetReportTime().AsTime().Format(time.RFC3339), r.GetReporter(), pass, rewrap.Counts(r.GetCiphertexts()), r.GetFailed())
	}
	tw.Flush()
}
