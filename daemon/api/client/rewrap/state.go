package rewrap

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// stateFormat is the checkpoint file's format version.
const stateFormat = 1

// state is the checkpoint file: the report so far, whose Cursor is the
// last item done.
type state struct {
	Format int       `json:"format"`
	Saved  time.Time `json:"saved"`
	Report *Report   `json:"report"`
}

// newReport is an empty report of source.
func newReport(source string) *Report {
	return &Report{Source: source, Found: map[string]Counts{}, Now: map[string]Counts{}, Failed: map[string]uint64{}}
}

// loadState reads the checkpoint at path, if any, for source: the report of
// an unfinished pass to go on with, or a new one.
func loadState(path, source string) (*Report, error) {
	if path == "" {
		return newReport(source), nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return newReport(source), nil
	}
	if err != nil {
		return nil, fmt.Errorf("rewrap: the state file: %w", err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil || s.Report == nil {
		return nil, fmt.Errorf("rewrap: the state file %s does not parse (%v): move it aside to start over", path, err)
	}
	if s.Format != stateFormat {
		return nil, fmt.Errorf("rewrap: the state file %s has format %d; this keyward reads format %d", path, s.Format, stateFormat)
	}
	if s.Report.Source != source {
		return nil, fmt.Errorf("rewrap: the state file %s is of the job over %s, not %s: give each source its own state file", path, s.Report.Source, source)
	}
	if s.Report.Complete {
		// The last pass finished: this is a new one.
		return newReport(source), nil
	}
	r := s.Report
	r.Resumed = true
	r.Reported, r.ReportErrors = nil, nil
	for _, m := range []*map[string]Counts{&r.Found, &r.Now} {
		if *m == nil {
			*m = map[string]Counts{}
		}
	}
	if r.Failed == nil {
		r.Failed = map[string]uint64{}
	}
	return r, nil
}

// checkpoint writes the state file, at most once per Options.Checkpoint
// unless now.
func (j *job) checkpoint(now bool) error {
	if j.opt.State == "" || (!now && time.Since(j.saved) < j.opt.Checkpoint) {
		return nil
	}
	b, err := json.Marshal(state{Format: stateFormat, Saved: time.Now().UTC(), Report: j.rep})
	if err != nil {
		return err
	}
	if err := writeFile(j.opt.State, b); err != nil {
		return fmt.Errorf("rewrap: writing the state file: %w", err)
	}
	j.saved = time.Now()
	return nil
}

// writeFile replaces path with b, mode 0600, through a synced temporary
// file in the same directory, renamed over it, the directory synced: a
// crash leaves the old file or the new one, never a mix.
func writeFile(path string, b []byte) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), tempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if err := fill(f, b, nil); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
