// Package rewrap moves an application's ciphertexts to the newest version of
// their keys, so that the minimum decryption version can be raised and the
// old versions retired. keywardd cannot do this itself: the ciphertexts are
// the application's, in its files and tables. A job runs in the
// application (or as keyward rewrap) over a Source, calls ReEncrypt for each
// ciphertext under an older version, and writes the new one back:
//
//	src := &rewrap.Dir{Root: "/var/lib/app/blobs"}
//	rep, err := rewrap.Run(ctx, c, src, rewrap.Options{Rate: 50, State: "/var/lib/app/rewrap.state"})
//
// What holds:
//   - Within a budget. At most Options.Rate ciphertexts a second go to
//     keywardd, one call at a time, so a job never starves live traffic;
//     when keywardd says the caller is over its budget the job waits as long
//     as keywardd asks, and when keywardd is unavailable it backs off.
//   - Resumable. With Options.State the job checkpoints its place in the
//     source (the cursor of the last ciphertext done) and its counts to a
//     file, atomically and synced; run again after a stop, it goes on from
//     there with the counts of one pass. After a crash, a ciphertext moved
//     after the last checkpoint is found again under the newest version and
//     left alone: a job is idempotent.
//   - Nothing lost. The old ciphertext is replaced only if it is still what
//     the job read (Source.Replace compares); a ciphertext the application
//     changed meanwhile is left to the application. A ciphertext that does
//     not open (wrong context, another key's) is counted and left as it is.
//   - Reported. The job counts what it found under each key version and
//     where it left each ciphertext; at the end of a whole pass it reports
//     the counts to keywardd (KeyService.ReportRewrap), and keyward key
//     set-min-version warns before retiring a version a report still counts.
//
// The job learns a key's newest version from keywardd's answers for that
// key (again every minute, for a rotation during the job), so it needs no
// grant but ReEncrypt (Decrypt on the source key) and KeyService.ReportRewrap:
// a ciphertext under the newest version costs nothing.
//
// Written here rather than taken from a library: no library re-encrypts
// through keywardd, and the parts (x/time/rate for the budget) are libraries.
package rewrap

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// Source is where an application keeps ciphertexts: a directory (Dir), a
// PostgreSQL column (package pgrewrap), or anything else. Its
// ciphertexts are listed in a stable order of their cursors.
type Source interface {
	// Name says what the source is, in reports and checkpoints:
	// "dir:/var/lib/app", "postgres:orders.card_token".
	Name() string
	// List returns up to limit items whose cursors come after after, in
	// cursor order; none when there are no more. An empty after is the
	// start.
	List(ctx context.Context, after string, limit int) ([]Item, error)
	// Replace writes ciphertext in place of it.Ciphertext, only if the
	// source still holds it.Ciphertext there; ErrChanged if not.
	Replace(ctx context.Context, it Item, ciphertext []byte) error
}

// Counter is a Source that can say how many items it holds, for a progress
// bar; an estimate is fine.
type Counter interface {
	Count(ctx context.Context) (int64, error)
}

// Preparer is a Source with checks to make, or a name to learn, before the
// job asks its Name: Run calls Prepare first.
type Preparer interface {
	Prepare(ctx context.Context) error
}

// Item is one ciphertext of a source.
type Item struct {
	// Cursor is where the item is in the source's order: never empty,
	// unique, and increasing in List's order (byte order for Dir).
	Cursor string
	// Ciphertext is a keyward ciphertext or wrapped data key (format 1,
	// docs/formats.md); anything else is counted and left alone.
	Ciphertext []byte
	// Context is the encryption context it is bound to.
	Context map[string]string
	// Skip, if set, is why the source will not have this item replaced
	// (a file with other hard links, say); the job counts it and says why.
	Skip string
}

// ErrChanged is Replace's answer when the source no longer holds the
// ciphertext the job read: the application wrote it meanwhile.
var ErrChanged = errors.New("rewrap: the ciphertext changed in the source meanwhile")

// ErrNotReplaced, wrapped in Replace's error, says the source would not or
// could not replace this one item (a file the job may not give its owner,
// or with other hard links): the job counts it as not moved, with the
// reason, and goes on. Any other error of Replace stops the job. Errors of
// fs.ErrPermission count as ErrNotReplaced.
var ErrNotReplaced = errors.New("rewrap: not replaced")

// Options tune a job. Zero values are the defaults.
type Options struct {
	// Rate is how many ciphertexts a second the job sends keywardd at most.
	// Default 50. Ciphertexts already under the newest version cost nothing.
	Rate float64
	// Batch is how many ciphertexts go in one call (BatchReEncrypt, within
	// the caller's max_batch); default 1 (ReEncrypt).
	Batch int
	// Keys limits the job to these keys; ciphertexts of others are
	// counted as other keys' and left alone. Each named key gets a report,
	// even one with no ciphertexts found.
	Keys []string
	// State is the checkpoint file; empty means the job does not resume.
	State string
	// NoReport: do not report the counts to keywardd at the end.
	NoReport bool
	// Progress, if set, is called after each batch and at the end.
	Progress func(Progress)
	// Checkpoint is how often the state file is written at most; default a
	// second. The file is written at the end and when the job stops too.
	Checkpoint time.Duration
}

// Progress is how far a job is.
type Progress struct {
	Done  int64 // items gone over, this run and the runs it resumes
	Total int64 // items in the source, if it is a Counter; -1 if unknown
	Moved int64 // ciphertexts moved to the newest version
}

// Counts are one key's ciphertexts by version.
type Counts map[uint32]uint64

// String is "v1: 3, v2: 40", oldest first; "-" when empty.
func (c Counts) String() string {
	var parts []string
	for _, v := range slices.Sorted(maps.Keys(c)) {
		parts = append(parts, fmt.Sprintf("v%d: %d", v, c[v]))
	}
	if parts == nil {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// Under is how many are under versions below v.
func (c Counts) Under(v uint32) uint64 {
	var n uint64
	for ver, k := range c {
		if ver < v {
			n += k
		}
	}
	return n
}

// Report is what a job did, by key and in total.
type Report struct {
	Source string `json:"source"`
	// Found: each key's ciphertexts by the version they were under when the
	// job read them.
	Found map[string]Counts `json:"found"`
	// Now: where the job left them: moved ones under the version they
	// moved to, the others where they were.
	Now map[string]Counts `json:"now"`
	// Failed by key: ciphertexts that did not move (they do not open, or
	// keywardd refused them); they count in Now under their old version.
	Failed map[string]uint64 `json:"failed"`
	// Totals over the source.
	Items         uint64 `json:"items"`
	Moved         uint64 `json:"moved"`
	Current       uint64 `json:"current"`        // already under the newest version
	Changed       uint64 `json:"changed"`        // written by the application meanwhile: left to it
	OtherKeys     uint64 `json:"other_keys"`     // under keys outside Options.Keys
	NotCiphertext uint64 `json:"not_ciphertext"` // not keyward ciphertexts: left alone
	Skipped       uint64 `json:"skipped"`        // the source would not replace them (Item.Skip)
	// Errors: the first few failures, by cursor, for the operator.
	Errors []ItemFailure `json:"errors,omitempty"`
	// Complete: the job went over the whole source.
	Complete bool `json:"complete"`
	// Resumed: this run went on from a checkpoint.
	Resumed bool `json:"resumed"`
	// Cursor: the last item done.
	Cursor string `json:"cursor"`
	// Reported: the keys keywardd took the report of; ReportErrors: those
	// it did not, and why (the job itself succeeded).
	Reported     []string          `json:"reported,omitempty"`
	ReportErrors map[string]string `json:"report_errors,omitempty"`
}

// ItemFailure is why one ciphertext did not move.
type ItemFailure struct {
	Cursor string `json:"cursor"`
	Error  string `json:"error"`
}

// maxErrors is how many failures a report keeps.
const maxErrors = 20

// Header reads the key name and version a keyward ciphertext names (format
// 1, docs/formats.md), or ok false when b is not one: the magic, version,
// lengths, name characters and version are checked as keywardd checks them;
// keywardd checks the rest when it opens the ciphertext. Written here, not
// taken from keywardd's envelope package, which links the HSM's library.
func Header(b []byte) (key string, version uint32, ok bool) {
	if len(b) < 5 || string(b[:3]) != "kwe" || b[3] != 1 {
		return "", 0, false
	}
	n := int(b[4])
	if n == 0 || n > 64 || len(b) < 5+n+4+12+16 {
		return "", 0, false
	}
	name := b[5 : 5+n]
	for i, c := range name {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return "", 0, false
		}
	}
	v := binary.BigEndian.Uint32(b[5+n:])
	if v == 0 {
		return "", 0, false
	}
	return string(name), v, true
}

// job is one run of Run.
type job struct {
	c       *client.Client
	src     Source
	opt     Options
	rep     *Report
	newest  map[string]uint32 // each key's newest version, as keywardd last answered
	learned time.Time         // when newest was last cleared
	only    map[string]bool
	lim     *rate.Limiter
	total   int64
	saved   time.Time
	backoff time.Duration
}

// Run goes over src once (or what remains of it after a checkpoint) and
// returns its report. It stops with ctx, after writing its checkpoint: run
// it again to go on.
func Run(ctx context.Context, c *client.Client, src Source, opt Options) (*Report, error) {
	if opt.Rate <= 0 {
		opt.Rate = 50
	}
	if opt.Batch <= 0 {
		opt.Batch = 1
	}
	if opt.Checkpoint <= 0 {
		opt.Checkpoint = time.Second
	}
	j := &job{c: c, src: src, opt: opt, newest: map[string]uint32{}, total: -1,
		lim: rate.NewLimiter(rate.Limit(opt.Rate), max(opt.Batch, 1))}
	if len(opt.Keys) > 0 {
		j.only = map[string]bool{}
		for _, k := range opt.Keys {
			j.only[k] = true
		}
	}
	if p, ok := src.(Preparer); ok {
		if err := p.Prepare(ctx); err != nil {
			return nil, err
		}
	}
	rep, err := loadState(opt.State, src.Name())
	if err != nil {
		return nil, err
	}
	j.learned = time.Now()
	j.rep = rep
	if cn, ok := src.(Counter); ok {
		if n, err := cn.Count(ctx); err == nil {
			j.total = n
		}
	}
	for {
		items, err := src.List(ctx, j.rep.Cursor, max(opt.Batch, 100))
		if err != nil {
			return j.stop(fmt.Errorf("rewrap: listing %s: %w", src.Name(), err))
		}
		if len(items) == 0 {
			break
		}
		for start := 0; start < len(items); start += opt.Batch {
			if err := j.batch(ctx, items[start:min(start+opt.Batch, len(items))]); err != nil {
				return j.stop(err)
			}
		}
	}
	j.rep.Complete = true
	if err := j.checkpoint(true); err != nil {
		return j.rep, err
	}
	j.progress()
	if !opt.NoReport {
		j.report(ctx)
	}
	return j.rep, nil
}

// stop writes the checkpoint and returns err.
func (j *job) stop(err error) (*Report, error) {
	if cerr := j.checkpoint(true); cerr != nil {
		err = errors.Join(err, cerr)
	}
	j.progress()
	return j.rep, err
}

func (j *job) progress() {
	if j.opt.Progress != nil {
		j.opt.Progress(Progress{Done: int64(j.rep.Items), Total: j.total, Moved: int64(j.rep.Moved)})
	}
}

// count adds one ciphertext of key under version to m.
func count(m map[string]Counts, key string, version uint32) {
	if m[key] == nil {
		m[key] = Counts{}
	}
	m[key][version]++
}

// batch does items: those to move go to keywardd in one call within the
// budget, then each item in order is settled (replaced in the source, or
// not) and joins the report with the cursor past it. A batch cut short
// leaves the report and cursor at its last item settled: counted once.
func (j *job) batch(ctx context.Context, items []Item) error {
	if time.Since(j.learned) > time.Minute {
		// A rotation during the job: learn the newest versions again.
		clear(j.newest)
		j.learned = time.Now()
	}
	call := make([]bool, len(items))
	var todo []Item
	for i, it := range items {
		key, v, ok := Header(it.Ciphertext)
		if ok && (j.only == nil || j.only[key]) && it.Skip == "" && v != j.newest[key] {
			call[i] = true
			todo = append(todo, it)
		}
	}
	var results []result
	if len(todo) > 0 {
		var err error
		if results, err = j.reEncrypt(ctx, todo); err != nil {
			return err
		}
	}
	for i, it := range items {
		d := newReport("")
		d.Items = 1
		if call[i] {
			if err := j.settle(ctx, d, it, results[0]); err != nil {
				return err
			}
			results = results[1:]
		} else {
			j.classify(d, it)
		}
		j.rep.add(d)
		j.rep.Cursor = it.Cursor
	}
	j.progress()
	return j.checkpoint(false)
}

// classify counts an item that needs no call.
func (j *job) classify(d *Report, it Item) {
	key, v, ok := Header(it.Ciphertext)
	switch {
	case !ok:
		if it.Skip != "" {
			d.Skipped++
			d.fail(it.Cursor, errors.New(it.Skip))
		} else {
			d.NotCiphertext++
		}
	case j.only != nil && !j.only[key]:
		d.OtherKeys++
	case it.Skip != "":
		// Still a ciphertext under v: reported as one not moved.
		d.Skipped++
		d.fail(it.Cursor, errors.New(it.Skip))
		count(d.Found, key, v)
		count(d.Now, key, v)
		d.Failed[key]++
	default: // under the newest version
		count(d.Found, key, v)
		d.Current++
		count(d.Now, key, v)
	}
}

// add adds d's counts to r.
func (r *Report) add(d *Report) {
	for _, m := range []struct{ to, from map[string]Counts }{{r.Found, d.Found}, {r.Now, d.Now}} {
		for k, cs := range m.from {
			if m.to[k] == nil {
				m.to[k] = Counts{}
			}
			for v, n := range cs {
				m.to[k][v] += n
			}
		}
	}
	for k, n := range d.Failed {
		r.Failed[k] += n
	}
	r.Items += d.Items
	r.Moved += d.Moved
	r.Current += d.Current
	r.Changed += d.Changed
	r.OtherKeys += d.OtherKeys
	r.NotCiphertext += d.NotCiphertext
	r.Skipped += d.Skipped
	for _, e := range d.Errors {
		if len(r.Errors) < maxErrors {
			r.Errors = append(r.Errors, e)
		}
	}
}

// fail notes why an item did not move, among the first few.
func (r *Report) fail(cursor string, err error) {
	if len(r.Errors) < maxErrors {
		r.Errors = append(r.Errors, ItemFailure{Cursor: cursor, Error: err.Error()})
	}
}

// result is keywardd's answer for one item.
type result struct {
	resp *keywardv1.ReEncryptResponse
	err  error // the item's own error; the call's stop the job
}

// reEncrypt sends items to keywardd within the budget, waiting and trying
// again while keywardd is over its budget or unavailable.
func (j *job) reEncrypt(ctx context.Context, items []Item) ([]result, error) {
	if err := j.lim.WaitN(ctx, len(items)); err != nil {
		return nil, err
	}
	for {
		res, err := j.call(ctx, items)
		if err == nil {
			j.backoff = 0
			return res, nil
		}
		var ke *client.Error
		wait := time.Duration(0)
		switch {
		case errors.Is(err, client.ErrLimited):
			wait = time.Second
			if errors.As(err, &ke) && ke.RetryAfter > 0 {
				wait = ke.RetryAfter
			}
		case errors.Is(err, client.ErrUnavailable):
			j.backoff = min(max(2*j.backoff, 100*time.Millisecond), 30*time.Second)
			wait = j.backoff
		case errors.Is(err, client.ErrDenied):
			ops := "EnvelopeService.ReEncrypt and EnvelopeService.Decrypt"
			if j.opt.Batch > 1 {
				ops = "EnvelopeService.BatchReEncrypt and EnvelopeService.BatchDecrypt"
			}
			return nil, fmt.Errorf("rewrap: %w (the job needs %s on the keys it moves; or limit it to the keys it may move)", err, ops)
		default:
			return nil, fmt.Errorf("rewrap: %w", err)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// call is one ReEncrypt or BatchReEncrypt. An item's own refusal (it does
// not open, its key is disabled) is its result; a refusal of the call is
// the error.
func (j *job) call(ctx context.Context, items []Item) ([]result, error) {
	if len(items) == 1 && j.opt.Batch == 1 {
		r, err := j.c.Envelope.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: items[0].Ciphertext, EncryptionContext: items[0].Context})
		if err != nil {
			if itemErr(status(err)) {
				return []result{{err: client.Wrap(err)}}, nil
			}
			return nil, client.Wrap(err)
		}
		return []result{{resp: r}}, nil
	}
	req := &keywardv1.BatchReEncryptRequest{}
	for _, it := range items {
		req.Items = append(req.Items, &keywardv1.ReEncryptRequest{Ciphertext: it.Ciphertext, EncryptionContext: it.Context})
	}
	r, err := j.c.Envelope.BatchReEncrypt(ctx, req)
	if err != nil {
		return nil, client.Wrap(err)
	}
	if len(r.GetResults()) != len(items) {
		return nil, fmt.Errorf("rewrap: keywardd answered %d items of %d", len(r.GetResults()), len(items))
	}
	out := make([]result, len(items))
	for i, res := range r.GetResults() {
		if e := res.GetError(); e != nil {
			ie := &client.Error{Code: codes.Code(e.GetCode()), Message: e.GetMessage()}
			if !itemErr(ie.Code) {
				// Over the budget or unavailable: the whole batch again.
				return nil, ie
			}
			out[i].err = ie
			continue
		}
		out[i].resp = res.GetOk()
	}
	return out, nil
}

// status is err's gRPC code.
func status(err error) codes.Code {
	var e *client.Error
	if errors.As(client.Wrap(err), &e) {
		return e.Code
	}
	return codes.Unknown
}

// itemErr: a refusal about the item itself, not about the caller or
// keywardd's state; the job counts it and goes on.
func itemErr(c codes.Code) bool {
	return c == codes.InvalidArgument || c == codes.FailedPrecondition || c == codes.NotFound
}

// settle records one item's outcome in d and writes its new ciphertext
// back.
func (j *job) settle(ctx context.Context, d *Report, it Item, r result) error {
	key, v, _ := Header(it.Ciphertext)
	count(d.Found, key, v)
	notMoved := func(err error) {
		d.Failed[key]++
		count(d.Now, key, v)
		d.fail(it.Cursor, err)
	}
	if r.err != nil {
		notMoved(r.err)
		return nil
	}
	to := r.resp.GetKeyVersion()
	if r.resp.GetKeyName() == key {
		j.newest[key] = max(j.newest[key], to)
	}
	if r.resp.GetKeyName() == key && to <= v {
		// Already under the newest: the new ciphertext is not needed.
		d.Current++
		count(d.Now, key, v)
		return nil
	}
	switch err := j.src.Replace(ctx, it, r.resp.GetCiphertext()); {
	case errors.Is(err, ErrChanged):
		d.Changed++
		count(d.Now, key, v)
	case errors.Is(err, ErrNotReplaced) || errors.Is(err, fs.ErrPermission):
		notMoved(err)
	case err != nil:
		// The source could not be written: stop, the checkpoint before
		// this batch stands.
		return fmt.Errorf("rewrap: writing %s back to %s: %w", it.Cursor, j.src.Name(), err)
	default:
		d.Moved++
		count(d.Now, r.resp.GetKeyName(), to)
	}
	return nil
}

// report sends each key's counts to keywardd: the keys of Options.Keys,
// or every key the job found. A version above the newest keywardd named
// for the key (a header no ciphertext of this key can have) is left out.
func (j *job) report(ctx context.Context) {
	keys := slices.Sorted(maps.Keys(j.rep.Now))
	if j.only != nil {
		keys = slices.Sorted(maps.Keys(j.only))
	}
	for _, k := range keys {
		counts := Counts{}
		for v, n := range j.rep.Now[k] {
			if newest := j.newest[k]; newest == 0 || v <= newest {
				counts[v] = n
			}
		}
		_, err := j.c.Keys.ReportRewrap(ctx, &keywardv1.ReportRewrapRequest{KeyName: k, Report: &keywardv1.RewrapReport{
			Source: j.src.Name(), Ciphertexts: counts, Failed: j.rep.Failed[k], Complete: j.rep.Complete}})
		if err != nil {
			if j.rep.ReportErrors == nil {
				j.rep.ReportErrors = map[string]string{}
			}
			j.rep.ReportErrors[k] = client.Wrap(err).Error()
			continue
		}
		j.rep.Reported = append(j.rep.Reported, k)
	}
}
