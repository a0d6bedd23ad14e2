package rewrap_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/rewrap"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// policy grants the test's uid everything, with batches of up to 10 and,
// when rate is set, a budget of calls.
func policy(rate string) string {
	p := strings.Replace(daemontest.AllowAll(), "  all:\n", "  all:\n    max_batch: 10\n", 1)
	if rate != "" {
		p = strings.Replace(p, "  all:\n", "  all:\n    limits:\n      rate: ["+rate+"]\n", 1)
	}
	return p
}

// setup starts keywardd and makes key k with three versions.
func setup(t *testing.T, pol string) (*daemontest.Daemon, *client.Client) {
	t.Helper()
	in := daemontest.Start(t, daemontest.Policy(pol))
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Keys.CreateKey(context.Background(), &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	return in, c
}

func rotate(t *testing.T, c *client.Client, name string) {
	t.Helper()
	limited(t, func() error {
		_, err := c.Keys.RotateKey(context.Background(), &keywardv1.RotateKeyRequest{Name: name})
		return err
	})
}

// ctxOf is the test's encryption context for a file: its path.
func ctxOf(rel string) map[string]string { return map[string]string{"file": rel} }

// fill writes n ciphertexts of plaintext "rel" under the key's newest
// version into dir/sub, and returns their relative paths.
func fill(t *testing.T, c *client.Client, dir, sub string, n int) []string {
	t.Helper()
	os.MkdirAll(filepath.Join(dir, sub), 0o700)
	var out []string
	for i := range n {
		rel := fmt.Sprintf("%s/%03d", sub, i)
		var ct []byte
		limited(t, func() (err error) {
			ct, err = c.Encrypt(context.Background(), "k", []byte(rel), ctxOf(rel))
			return err
		})
		if err := os.WriteFile(filepath.Join(dir, rel), ct, 0o640); err != nil {
			t.Fatal(err)
		}
		out = append(out, rel)
	}
	return out
}

// versionOf is the key version a file's ciphertext names.
func versionOf(t *testing.T, path string) uint32 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, v, ok := rewrap.Header(b)
	if !ok {
		t.Fatalf("%s is not a ciphertext", path)
	}
	return v
}

// TestDir: a job over a directory moves every ciphertext under an older
// version to the newest, each still opening to its plaintext under its
// context; it counts what it found, leaves alone what it must not touch,
// reports to keywardd, and a second pass finds nothing to do.
func TestDir(t *testing.T) {
	_, c := setup(t, policy(""))
	ctx := context.Background()
	dir := t.TempDir()
	v1 := fill(t, c, dir, "a", 4)
	rotate(t, c, "k")
	v2 := fill(t, c, dir, "b/deep", 3)
	rotate(t, c, "k")
	v3 := fill(t, c, dir, "c", 2)

	// What the job must not touch or cannot move.
	os.WriteFile(filepath.Join(dir, "plain.txt"), []byte("not a ciphertext"), 0o600)
	os.Symlink(filepath.Join(dir, v1[0]), filepath.Join(dir, "link"))
	linked := fill(t, c, dir, "h", 1)[0]
	os.Link(filepath.Join(dir, linked), filepath.Join(dir, "h-other-name"))
	// Sealed under v3 then v1 of the context: "wrong" never opens.
	wrong, _ := c.Encrypt(ctx, "k", []byte("x"), map[string]string{"file": "elsewhere"})
	os.WriteFile(filepath.Join(dir, "wrong"), wrong, 0o600)
	rotate(t, c, "k") // v4: every file above is old now

	src := &rewrap.Dir{Root: dir, Context: ctxOf}
	var last rewrap.Progress
	rep, err := rewrap.Run(ctx, c, src, rewrap.Options{Rate: 1000, Progress: func(p rewrap.Progress) { last = p }})
	if err != nil {
		t.Fatal(err)
	}
	moved := append(append(append([]string{}, v1...), v2...), v3...)
	for _, rel := range moved {
		if v := versionOf(t, filepath.Join(dir, rel)); v != 4 {
			t.Errorf("%s under v%d after the job; want v4", rel, v)
		}
		b, _ := os.ReadFile(filepath.Join(dir, rel))
		pt, err := c.Decrypt(ctx, b, ctxOf(rel))
		if err != nil || string(pt) != rel {
			t.Errorf("%s opens to %q, %v", rel, pt, err)
		}
		if fi, _ := os.Stat(filepath.Join(dir, rel)); fi.Mode().Perm() != 0o640 {
			t.Errorf("%s has mode %v after the job; want its own, 0640", rel, fi.Mode().Perm())
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "wrong")); !bytes.Equal(b, wrong) {
		t.Error("a ciphertext that does not open was changed")
	}
	if v := versionOf(t, filepath.Join(dir, linked)); v != 3 {
		t.Errorf("a file with another hard link was moved to v%d", v)
	}
	if fi, err := os.Lstat(filepath.Join(dir, "link")); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the symbolic link: %v, %v", fi, err)
	}
	want := rewrap.Counts{1: 4, 2: 3, 3: 5} // the wrong one and the two names of the linked one under v3 too
	if got := rep.Found["k"]; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("found %v; want %v", got, want)
	}
	if got := rep.Now["k"]; fmt.Sprint(got) != fmt.Sprint(rewrap.Counts{3: 3, 4: 9}) {
		t.Errorf("now %v; want 9 under v4, the wrong one and the linked one's two names under v3", got)
	}
	if rep.Moved != 9 || rep.Failed["k"] != 3 || len(rep.Errors) != 3 || !strings.Contains(rep.Errors[0].Error, "2 hard links") ||
		!strings.Contains(rep.Errors[2].Error, "does not match") ||
		rep.NotCiphertext != 1 || rep.Skipped != 2 || !rep.Complete || rep.Items != 13 {
		t.Errorf("report %+v", rep)
	}
	if last.Done != 13 || last.Total != 13 || last.Moved != 9 {
		t.Errorf("last progress %+v", last)
	}
	k, err := c.Keys.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "k"})
	if err != nil {
		t.Fatal(err)
	}
	reps := k.GetKey().GetRewrapReports()
	if len(reps) != 1 || reps[0].GetSource() != src.Name() || reps[0].GetCiphertexts()[4] != 9 || reps[0].GetCiphertexts()[3] != 3 ||
		reps[0].GetFailed() != 3 || !reps[0].GetComplete() || fmt.Sprint(rep.Reported) != "[k]" {
		t.Errorf("keywardd's report %v; reported %v %v", reps, rep.Reported, rep.ReportErrors)
	}

	// A second pass: nothing to move, one call to learn the newest version.
	rep, err = rewrap.Run(ctx, c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 1000, Batch: 10})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Moved != 0 || rep.Current != 9 || rep.Failed["k"] != 3 {
		t.Errorf("second pass %+v", rep)
	}
}

// stopAfter is a Source that cancels the job after n replacements: a crash
// in the middle.
type stopAfter struct {
	rewrap.Source
	n      int
	cancel context.CancelFunc
}

func (s *stopAfter) Replace(ctx context.Context, it rewrap.Item, ct []byte) error {
	if s.n == 0 {
		s.cancel()
		return ctx.Err()
	}
	s.n--
	return s.Source.Replace(ctx, it, ct)
}

// TestResume: a job stopped in the middle goes on from its checkpoint, and
// its counts add up over the two runs as one pass's would.
func TestResume(t *testing.T) {
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	files := fill(t, c, dir, "x", 30)
	rotate(t, c, "k")
	state := filepath.Join(t.TempDir(), "state")

	ctx, cancel := context.WithCancel(context.Background())
	src := &stopAfter{Source: &rewrap.Dir{Root: dir, Context: ctxOf}, n: 12, cancel: cancel}
	rep, err := rewrap.Run(ctx, c, src, rewrap.Options{Rate: 1000, Batch: 5, State: state, Checkpoint: time.Hour})
	if !errors.Is(err, context.Canceled) || rep.Complete || rep.Items != 12 || rep.Moved != 12 {
		// Two batches of 5 done; the third moved 2 and stopped: those two
		// are done, the rest are gone over again.
		t.Fatalf("stopped run: %+v, %v", rep, err)
	}
	if b, err := os.ReadFile(state); err != nil || !strings.Contains(string(b), `"cursor":"x/011"`) {
		t.Fatalf("state file %s, %v", b, err)
	}
	if fi, _ := os.Stat(state); fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v", fi.Mode().Perm())
	}
	// Another source's job refuses this state file.
	if _, err := rewrap.Run(context.Background(), c, &rewrap.Dir{Root: t.TempDir()}, rewrap.Options{State: state}); err == nil || !strings.Contains(err.Error(), "give each source its own state file") {
		t.Fatalf("another source: %v", err)
	}
	rep, err = rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 1000, Batch: 5, State: state})
	if err != nil {
		t.Fatal(err)
	}
	// 12 moved before the stop, 18 now: the counts of one pass.
	if !rep.Resumed || !rep.Complete || rep.Items != 30 || rep.Moved != 30 || rep.Current != 0 ||
		fmt.Sprint(rep.Now["k"]) != fmt.Sprint(rewrap.Counts{2: 30}) || fmt.Sprint(rep.Found["k"]) != fmt.Sprint(rewrap.Counts{1: 30}) {
		t.Fatalf("resumed run %+v", rep)
	}
	for _, rel := range files {
		if v := versionOf(t, filepath.Join(dir, rel)); v != 2 {
			t.Errorf("%s under v%d", rel, v)
		}
	}
	// The pass is complete: the next run is a new pass.
	rep, err = rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{State: state, NoReport: true})
	if err != nil || rep.Resumed || rep.Current != 30 || rep.Reported != nil {
		t.Fatalf("new pass %+v, %v", rep, err)
	}
}

// TestChanged: a ciphertext the application rewrote after the job read it
// is left as the application wrote it.
func TestChanged(t *testing.T) {
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	fill(t, c, dir, "x", 2)
	rotate(t, c, "k")
	src := &rewrite{Dir: &rewrap.Dir{Root: dir, Context: ctxOf}, dir: dir}
	rep, err := rewrap.Run(context.Background(), c, src, rewrap.Options{Rate: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Changed != 2 || rep.Moved != 0 || fmt.Sprint(rep.Now["k"]) != fmt.Sprint(rewrap.Counts{1: 2}) {
		t.Fatalf("report %+v", rep)
	}
	for _, rel := range []string{"x/000", "x/001"} {
		if b, _ := os.ReadFile(filepath.Join(dir, rel)); string(b) != "the application's" {
			t.Errorf("%s: %q", rel, b)
		}
	}
}

// rewrite is a Dir whose files the application rewrites just before the
// job replaces them.
type rewrite struct {
	*rewrap.Dir
	dir string
}

func (r *rewrite) Replace(ctx context.Context, it rewrap.Item, ct []byte) error {
	os.WriteFile(filepath.Join(r.dir, it.Cursor), []byte("the application's"), 0o600)
	return r.Dir.Replace(ctx, it, ct)
}

// TestBudget: the job keeps to its rate, and waits when keywardd says the
// caller is over its budget instead of failing.
func TestBudget(t *testing.T) {
	_, c := setup(t, policy("{limit: 20, per: 1s, burst: 5}"))
	dir := t.TempDir()
	fill(t, c, dir, "x", 20)
	rotate(t, c, "k")
	// 20 ciphertexts at a rate of 1000 a second, in keywardd's budget of
	// 20 calls a second in bursts of 5: refused, the job waits as told.
	rep, err := rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 1000, NoReport: true})
	if err != nil || rep.Moved != 20 {
		t.Fatalf("over keywardd's budget: %+v, %v", rep, err)
	}
	// Its own rate: 4 ciphertexts at 8 a second, bursts of 1, take at least
	// 3/8 s (a lower bound the limiter guarantees, not a timing of speed).
	dir = t.TempDir()
	fill(t, c, dir, "y", 4)
	rotate(t, c, "k")
	start := time.Now()
	rep, err = rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 8, NoReport: true})
	if err != nil || rep.Moved != 4 {
		t.Fatalf("%+v, %v", rep, err)
	}
	if took := time.Since(start); took < 350*time.Millisecond {
		t.Errorf("4 ciphertexts at 8 a second took %v", took)
	}
}

// limited calls f until keywardd does not refuse it for the caller's budget.
func limited(t *testing.T, f func() error) {
	t.Helper()
	for {
		err := f()
		var ke *client.Error
		if errors.As(client.Wrap(err), &ke) && errors.Is(ke, client.ErrLimited) {
			time.Sleep(max(ke.RetryAfter, 50*time.Millisecond))
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		return
	}
}

// TestDenied: a caller not granted ReEncrypt is told which grant it lacks,
// and nothing is changed.
func TestDenied(t *testing.T) {
	pol := strings.Replace(policy(""), `operations: ["*"]`, `operations: [EnvelopeService.Encrypt, KeyService.CreateKey, KeyService.RotateKey]`, 1)
	_, c := setup(t, pol)
	dir := t.TempDir()
	fill(t, c, dir, "x", 1)
	rotate(t, c, "k")
	_, err := rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{})
	if !errors.Is(err, client.ErrDenied) || !strings.Contains(err.Error(), "EnvelopeService.ReEncrypt") {
		t.Fatalf("%v", err)
	}
	if v := versionOf(t, filepath.Join(dir, "x/000")); v != 1 {
		t.Errorf("moved to v%d", v)
	}
}

// TestNotOwner: a job that cannot give the new file the old one's owner
// says so and changes nothing.
func TestNotOwner(t *testing.T) {
	if os.Getuid() != 0 {
		t.Log("not root: the owner is the caller's own, nothing to check")
		return
	}
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	fill(t, c, dir, "x", 1)
	rotate(t, c, "k")
	p := filepath.Join(dir, "x/000")
	if err := os.Chown(p, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if _, err := rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{NoReport: true}); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 4242 || st.Gid != 4242 || versionOf(t, p) != 2 {
		t.Errorf("owner %d:%d, version %d; want 4242:4242 kept and v2", st.Uid, st.Gid, versionOf(t, p))
	}
}

// TestSymlinkRoot: a Root that is a symbolic link to the directory is the
// directory, named by its real path.
func TestSymlinkRoot(t *testing.T) {
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	fill(t, c, dir, "x", 3)
	rotate(t, c, "k")
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	src := &rewrap.Dir{Root: link, Context: ctxOf}
	rep, err := rewrap.Run(context.Background(), c, src, rewrap.Options{Rate: 1000, Keys: []string{"k"}})
	if err != nil || rep.Moved != 3 || rep.Items != 3 {
		t.Fatalf("%+v, %v", rep, err)
	}
	real, _ := filepath.EvalSymlinks(dir)
	if host, _ := os.Hostname(); src.Name() != "dir:"+host+":"+real {
		t.Errorf("Name %q; want the host and the real path %s", src.Name(), real)
	}
}

// TestOnlyKeys: a job limited to key a reports on a alone, however the
// ciphertexts of b it left alone look (here one with other hard links).
func TestOnlyKeys(t *testing.T) {
	_, c := setup(t, policy(""))
	ctx := context.Background()
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "b", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	fill(t, c, dir, "a", 2)
	ct, _ := c.Encrypt(ctx, "b", []byte("b"), ctxOf("b/0"))
	os.Mkdir(filepath.Join(dir, "b"), 0o700)
	os.WriteFile(filepath.Join(dir, "b/0"), ct, 0o600)
	os.Link(filepath.Join(dir, "b/0"), filepath.Join(dir, "b/1"))
	rotate(t, c, "k")
	rotate(t, c, "b")
	rep, err := rewrap.Run(ctx, c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 1000, Keys: []string{"k"}})
	if err != nil || rep.Moved != 2 || rep.OtherKeys != 2 || rep.Skipped != 0 || fmt.Sprint(rep.Reported) != "[k]" || rep.Found["b"] != nil {
		t.Fatalf("%+v, %v", rep, err)
	}
	if k, _ := c.Keys.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "b"}); len(k.GetKey().GetRewrapReports()) != 0 {
		t.Errorf("a job limited to k reported on b: %v", k.GetKey().GetRewrapReports())
	}
}

// TestBogusVersion: a header naming a version the key does not have is
// not taken as under the newest; it does not move, and keywardd still
// takes the key's report.
func TestBogusVersion(t *testing.T) {
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	files := fill(t, c, dir, "x", 2)
	rotate(t, c, "k")
	b, _ := os.ReadFile(filepath.Join(dir, files[0]))
	b[5+1+3] = 99 // the version's low byte, after "kwe", 1, the name's length and "k"
	os.WriteFile(filepath.Join(dir, "x/bogus"), b, 0o600)
	rep, err := rewrap.Run(context.Background(), c, &rewrap.Dir{Root: dir, Context: ctxOf}, rewrap.Options{Rate: 1000})
	if err != nil || rep.Moved != 2 || rep.Current != 0 || rep.Failed["k"] != 1 || len(rep.ReportErrors) != 0 || fmt.Sprint(rep.Reported) != "[k]" {
		t.Fatalf("%+v, %v", rep, err)
	}
	k, _ := c.Keys.GetKey(context.Background(), &keywardv1.GetKeyRequest{Name: "k"})
	if r := k.GetKey().GetRewrapReports(); len(r) != 1 || fmt.Sprint(rewrap.Counts(r[0].GetCiphertexts())) != "v2: 2" || r[0].GetFailed() != 1 {
		t.Errorf("keywardd's report %v", r)
	}
}

// refuse is a Dir whose Replace is refused for one file, as a file the job
// may not give its owner is.
type refuse struct {
	*rewrap.Dir
	cursor string
}

func (r *refuse) Replace(ctx context.Context, it rewrap.Item, ct []byte) error {
	if it.Cursor == r.cursor {
		return &os.PathError{Op: "chown", Path: it.Cursor, Err: fs.ErrPermission}
	}
	return r.Dir.Replace(ctx, it, ct)
}

// TestNotReplaced: one ciphertext the source may not replace is counted as
// not moved, with its reason, and the job goes on.
func TestNotReplaced(t *testing.T) {
	_, c := setup(t, policy(""))
	dir := t.TempDir()
	fill(t, c, dir, "x", 3)
	rotate(t, c, "k")
	rep, err := rewrap.Run(context.Background(), c, &refuse{Dir: &rewrap.Dir{Root: dir, Context: ctxOf}, cursor: "x/001"}, rewrap.Options{Rate: 1000})
	if err != nil || rep.Moved != 2 || rep.Failed["k"] != 1 || len(rep.Errors) != 1 || rep.Errors[0].Cursor != "x/001" ||
		!strings.Contains(rep.Errors[0].Error, "permission denied") || fmt.Sprint(rep.Now["k"]) != "v1: 1, v2: 2" {
		t.Fatalf("%+v, %v", rep, err)
	}
}
