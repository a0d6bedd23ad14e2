package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/daemon/api/review"
	"github.com/keyward/keyward/daemon/audit"
)

// reviewCommand is what the regular review of keys should look at, from what
// the caller may list. Run monthly (docs/apikeys.md).
func reviewCommand(f *flagSet) action {
	unused := f.Duration("unused", 30*24*time.Hour, "API keys not used for this long are listed")
	format := f.String("format", "table", "table, json or markdown (--output json is json)")
	f.Complete("format", "table", "json", "markdown")
	top := f.Int("top", 5, "how many top consumers to list")
	auditFile := f.String("audit", "", "keywardd's audit log: adds denied calls and error-rate outliers by caller (run keyward audit verify on it first)")
	window := f.Duration("window", 30*24*time.Hour, "with -audit: how far back to read")
	return func(e *env, _ []string) error {
		form := *format
		if form != "table" && form != "json" && form != "markdown" {
			return usageError{msg: "--format is table, json or markdown"}
		}
		if e.output.json() {
			form = "json"
		}
		return e.review(*unused, *top, *auditFile, *window, form)
	}
}

func (e *env) review(unused time.Duration, top int, auditFile string, window time.Duration, format string) error {
	now := time.Now()
	o := review.Options{Now: now, Unused: unused, Top: top, Since: now.Add(-window)}
	if auditFile != "" {
		o.Audit = func(fn func(audit.Record) error) error {
			f, err := os.Open(auditFile)
			if err != nil {
				return fmt.Errorf("-audit: %w", err)
			}
			defer f.Close()
			if err := audit.Records(f, fn); err != nil {
				return fmt.Errorf("-audit %s: %w", auditFile, err)
			}
			return nil
		}
	}
	var bar *progress
	o.Progress = func(done, total int) {
		if bar == nil {
			bar = e.progress("review: API keys", int64(total))
		}
		bar.set(int64(done), "")
	}
	out, err := review.Run(e.ctx, e.api, o)
	if bar != nil {
		bar.finish()
	}
	if err != nil {
		return err
	}
	switch format {
	case "json":
		if out == nil {
			out = []review.Finding{}
		}
		return e.printJSON(out)
	case "markdown":
		fmt.Fprintf(e.stdout, "# keyward review, %s\n\n| check | subject | detail |\n| --- | --- | --- |\n", now.Format(time.DateOnly))
		for _, f := range out {
			fmt.Fprintf(e.stdout, "| %s | %s | %s |\n", f.Check, strings.ReplaceAll(f.Subject, "|", "\\|"), strings.ReplaceAll(f.Detail, "|", "\\|"))
		}
	default:
		if len(out) == 0 {
			fmt.Fprintln(e.stdout, "nothing to look at among what you may see")
			return nil
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CHECK\tSUBJECT\tDETAIL")
		for _, f := range out {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Check, f.Subject, f.Detail)
		}
		return tw.Flush()
	}
	return nil
}
