package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows how far a long job is (rewrap, bulk revoke, store
// migrate, review) on standard error: a bar on a terminal, and elsewhere
// (a log, a pipe, CI) a plain line at most once a second, so that a
// captured log is not a stream of carriage returns.
type progress struct {
	w     io.Writer
	what  string
	total int64 // -1: unknown
	bar   *progressbar.ProgressBar
	last  time.Time
}

// progress starts the display of a job of total steps (-1 if unknown).
func (e *env) progress(what string, total int64) *progress {
	p := &progress{w: e.stderr, what: what, total: total, last: time.Now()}
	if f, ok := e.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		p.bar = progressbar.NewOptions64(total, progressbar.OptionSetWriter(f), progressbar.OptionSetDescription(what),
			progressbar.OptionShowCount(), progressbar.OptionShowIts(), progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSetPredictTime(total > 0), progressbar.OptionFullWidth(), progressbar.OptionClearOnFinish(),
			progressbar.OptionSpinnerType(14))
	}
	return p
}

// set says done steps are done; detail goes on the plain line.
func (p *progress) set(done int64, detail string) {
	if p.bar != nil {
		if detail != "" {
			p.bar.Describe(p.what + " " + detail)
		}
		p.bar.Set64(done)
		return
	}
	if time.Since(p.last) < time.Second {
		return
	}
	p.last = time.Now()
	switch {
	case p.total > 0:
		fmt.Fprintf(p.w, "%s: %d of %d (%.0f%%)", p.what, done, p.total, 100*float64(done)/float64(p.total))
	default:
		fmt.Fprintf(p.w, "%s: %d", p.what, done)
	}
	if detail != "" {
		fmt.Fprintf(p.w, ", %s", detail)
	}
	fmt.Fprintln(p.w)
}

// spin shows a bar of unknown length, turning by itself, until stop is
// called: for one long call (a bulk revocation), where keywardd says
// nothing until it is done.
func (p *progress) spin() (stop func()) {
	if p.bar != nil {
		p.bar.RenderBlank()
	}
	return p.finish
}

// finish takes the bar off the terminal.
func (p *progress) finish() {
	if p.bar != nil {
		p.bar.Finish()
	}
}
