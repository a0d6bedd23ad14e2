package daemon_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// cgroupClient is the client of the cgroup tests, run as another process
// (TestMain, KEYWARD_TEST_CGROUP_CLIENT): it says "ready", then for each
// line of its stdin, "call" asks keywardd for a data key of "app" on its
// connection (made at its first call) and prints the status code and
// message; "new" drops its connection, so that the next call makes
// another.
func cgroupClient(sock string) int {
	var conn *grpc.ClientConn
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "new":
			if conn != nil {
				conn.Close()
				conn = nil
			}
			fmt.Println("ok")
		case "call":
			var err error
			if conn == nil {
				if conn, err = grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
					fmt.Println(err)
					return 3
				}
			}
			_, err = keywardv1.NewEnvelopeServiceClient(conn).GenerateDataKey(context.Background(), &keywardv1.GenerateDataKeyRequest{KeyName: "app"})
			fmt.Printf("%s %s\n", status.Code(err), status.Convert(err).Message())
		}
	}
	return 0
}

// cgroupTree is a cgroup v2 subtree the test makes at the root of the
// hierarchy and removes when it ends.
type cgroupTree struct {
	dir  string // in the file system
	path string // as /proc/PID/cgroup shows it
}

// newCgroupTree makes a cgroup for the test. It fails, saying why, where
// the host has no writable cgroup v2 hierarchy: keyward's cgroup selectors
// read that one, and CI (root on a Debian VM) has it.
func newCgroupTree(t *testing.T) *cgroupTree { t.Helper(); return newCgroupTreeNamed(t, "") }

// newCgroupTreeNamed is newCgroupTree, its name ending in suffix (".slice":
// a tree keyward reads as systemd's).
func newCgroupTreeNamed(t *testing.T, suffix string) *cgroupTree {
	t.Helper()
	softhsmtest.RequireRoot(t, "creates cgroups and moves processes into them")
	mount, root := cgroup2Mount(t)
	name := fmt.Sprintf("keyward-test-%d-%d%s", os.Getpid(), time.Now().UnixNano(), suffix)
	c := &cgroupTree{dir: filepath.Join(mount, name), path: path.Join(root, name)}
	if err := os.Mkdir(c.dir, 0o755); err != nil {
		t.Fatalf("cannot make a cgroup in the cgroup v2 hierarchy mounted at %s: %v; the test needs it writable, as root", mount, err)
	}
	t.Cleanup(func() {
		leaves, _ := filepath.Glob(filepath.Join(c.dir, "*", "cgroup.procs"))
		for _, l := range append(leaves, filepath.Join(c.dir, "cgroup.procs")) {
			dir := filepath.Dir(l)
			var err error
			for range 50 { // a process just reaped may hold its cgroup a moment longer
				if err = os.Remove(dir); err == nil || !errors.Is(err, syscall.EBUSY) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				t.Errorf("removing the test's cgroup %s: %v", dir, err)
			}
		}
	})
	return c
}

// cgroup2Mount finds the cgroup v2 hierarchy in /proc/self/mountinfo: where
// it is mounted (/sys/fs/cgroup; /sys/fs/cgroup/unified on a hybrid host),
// and the cgroup its mount shows at its root.
func cgroup2Mount(t *testing.T) (dir, root string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "cgroup2" {
			return f[4], f[3]
		}
	}
	t.Fatalf("no cgroup v2 hierarchy is mounted (stat -fc %%T /sys/fs/cgroup says what is); keyward's cgroup selectors read it, and this test needs it")
	return "", ""
}

// leaf makes the cgroup name below the tree and returns its path as
// /proc shows it.
func (c *cgroupTree) leaf(t *testing.T, name string) string {
	t.Helper()
	if err := os.Mkdir(filepath.Join(c.dir, name), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatal(err)
	}
	return path.Join(c.path, name)
}

// move puts process pid into the cgroup name below the tree.
func (c *cgroupTree) move(t *testing.T, pid int, name string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(c.dir, name, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0); err != nil {
		t.Fatalf("moving PID %d into cgroup %s: %v", pid, name, err)
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if !strings.Contains(string(b), "0::"+path.Join(c.path, name)+"\n") {
		t.Fatalf("PID %d moved into %s, yet /proc says:\n%s", pid, name, b)
	}
}

// cgClient is a running cgroupClient.
type cgClient struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startCgClient runs cmd (which runs the cgroup client) and waits until it
// is ready; it is stopped when the test ends.
func startCgClient(t *testing.T, cmd *exec.Cmd) *cgClient {
	t.Helper()
	c := &cgClient{cmd: cmd}
	var err error
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("cgroup client: %v\n%s", err, stderr.String())
		}
	})
	c.out = bufio.NewReader(stdout)
	if line := c.do(t, ""); line != "ready" {
		t.Fatalf("cgroup client: %q\n%s", line, stderr.String())
	}
	return c
}

// do sends the client a command (none if empty) and returns its answer.
func (c *cgClient) do(t *testing.T, command string) string {
	t.Helper()
	if command != "" {
		if _, err := io.WriteString(c.stdin, command+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	line, err := c.out.ReadString('\n')
	if err != nil {
		t.Fatalf("cgroup client, after %q: %v", command, err)
	}
	return strings.TrimSpace(line)
}

// auditedCgroups are the outcome and caller cgroup of each GenerateDataKey
// of uid 65534 in the audit log, oldest first, as ListAuditRecords shows
// them (newest first).
func auditedCgroups(t *testing.T, in *daemontest.Daemon) []string {
	t.Helper()
	uid := uint32(65534)
	resp, err := keywardv1.NewAuditServiceClient(in.Conn).ListAuditRecords(context.Background(),
		&keywardv1.ListAuditRecordsRequest{Operation: "EnvelopeService.GenerateDataKey", CallerUid: &uid, PageSize: 100})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range resp.GetRecords() {
		out = append(out, fmt.Sprintf("%s %s", r.GetOutcome(), r.GetCaller().GetCgroup()))
	}
	slices.Reverse(out)
	return out
}

// TestCgroupCallers runs a client as nobody in cgroups the test makes: a
// binding by cgroup grants it in one cgroup and not in its sibling, in a
// real keywardd; every call's audit record names the cgroup; a client moved
// to another cgroup after it connected keeps, on that connection, the
// cgroup it connected from, and its next connection is judged by the one
// it is in then.
func TestCgroupCallers(t *testing.T) {
	tree := newCgroupTree(t)
	allowed, denied := tree.leaf(t, "allowed"), tree.leaf(t, "denied")
	in, bin := appDaemon(t, "      - cgroup: "+allowed+"\n")
	c := startCgClient(t, asNobody(bin, "KEYWARD_TEST_CGROUP_CLIENT="+in.Config.Socket.Path))

	const ok, no = "OK", `PermissionDenied permission denied: this caller is not granted EnvelopeService.GenerateDataKey on key "app"`
	tree.move(t, c.cmd.Process.Pid, "allowed")
	if got := c.do(t, "call"); got != ok {
		t.Fatalf("in %s: %q, want %q", allowed, got, ok)
	}
	tree.move(t, c.cmd.Process.Pid, "denied")
	if got := c.do(t, "call"); got != ok {
		t.Fatalf("moved to %s after connecting from %s: %q; want the connection to keep its cgroup, %q", denied, allowed, got, ok)
	}
	c.do(t, "new")
	if got := c.do(t, "call"); got != no {
		t.Fatalf("a new connection from %s: %q, want %q", denied, got, no)
	}
	tree.move(t, c.cmd.Process.Pid, "allowed")
	c.do(t, "new")
	if got := c.do(t, "call"); got != ok {
		t.Fatalf("a new connection from %s again: %q, want %q", allowed, got, ok)
	}
	want := []string{"AUDIT_OUTCOME_OK " + allowed, "AUDIT_OUTCOME_OK " + allowed, "AUDIT_OUTCOME_DENIED " + denied, "AUDIT_OUTCOME_OK " + allowed}
	if got := auditedCgroups(t, in); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("audited:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	auditLog, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if !strings.Contains(string(auditLog), `"caller":{"uid":65534,"gid":65534,"pid":`) || !strings.Contains(string(auditLog), `,"cgroup":"`+denied+`"},"op":"EnvelopeService.GenerateDataKey"`) {
		t.Fatal("audit.log does not name the caller's cgroup as docs/formats.md says")
	}
}

// TestCgroupSelectorsNarrow: all fields of an entry must match (a cgroup
// and a uid the client does not have grants nothing), and an entry naming
// a cgroup does not match a client whose cgroup keywardd cannot tell
// apart, while a reload with a binding by uid alone does.
func TestCgroupSelectorsNarrow(t *testing.T) {
	tree := newCgroupTree(t)
	allowed := tree.leaf(t, "allowed")
	in, bin := appDaemon(t, "      - cgroup: "+path.Dir(allowed)+"\n        uid: 65533\n")
	c := startCgClient(t, asNobody(bin, "KEYWARD_TEST_CGROUP_CLIENT="+in.Config.Socket.Path))
	tree.move(t, c.cmd.Process.Pid, "allowed")
	if got := c.do(t, "call"); !strings.HasPrefix(got, "PermissionDenied ") {
		t.Fatalf("uid 65534 below %s, bound as uid 65533 there: %q; want PermissionDenied", path.Dir(allowed), got)
	}
	in.SetPolicy(withAppRole(uidPolicy(allowAll) + "  - role: app\n    callers:\n      - cgroup: " + path.Dir(allowed) + "\n        uid: 65534\n"))
	c.do(t, "new")
	if got := c.do(t, "call"); got != "OK" {
		t.Fatalf("uid 65534 below %s, bound there: %q; want OK (a cgroup matches the cgroups below it)", path.Dir(allowed), got)
	}
}

// TestCgroupSystemdScope: a client in a systemd scope is known by the
// scope's unit name. Where systemd runs, systemd-run --scope makes the
// scope; where it does not (CI has no init), the test makes the cgroups
// systemd would, a slice and a scope below it, and moves the client in.
func TestCgroupSystemdScope(t *testing.T) {
	softhsmtest.RequireRoot(t, "starts a systemd scope")
	unit := fmt.Sprintf("keyward-test-%d-%d.scope", os.Getpid(), time.Now().UnixNano()%1e6)
	in, bin := appDaemon(t, "      - systemd_unit: \"keyward-test-*.scope\"\n")
	env := "KEYWARD_TEST_CGROUP_CLIENT=" + in.Config.Socket.Path
	var c *cgClient
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		cmd := exec.Command("systemd-run", "--scope", "--quiet", "--unit="+unit, "--uid=65534", "--gid=65534", "--", bin)
		cmd.Env = []string{env, "PATH=" + os.Getenv("PATH")}
		c = startCgClient(t, cmd)
	} else {
		tree := newCgroupTreeNamed(t, ".slice")
		tree.leaf(t, unit)
		c = startCgClient(t, asNobody(bin, env))
		tree.move(t, c.cmd.Process.Pid, unit)
		c.do(t, "new") // a connection made from the scope
	}
	if got := c.do(t, "call"); got != "OK" {
		t.Fatalf("in scope %s: %q; want OK", unit, got)
	}
	got := auditedCgroups(t, in)
	if len(got) != 1 || !strings.HasPrefix(got[0], "AUDIT_OUTCOME_OK /") || !strings.HasSuffix(got[0], "/"+unit) {
		t.Fatalf("audited %q; want one call from a cgroup ending in /%s", got, unit)
	}
}

// appDaemon runs keywardd with a key "app", uid 0 granted everything and
// the role app granted to callers (YAML lines of caller entries), its
// socket open to nobody; it returns the daemon and a copy of this test
// binary that nobody may run.
func appDaemon(t *testing.T, callers string) (*daemontest.Daemon, string) {
	t.Helper()
	in := daemontest.Start(t, daemontest.Policy(withAppRole(uidPolicy(allowAll)+"  - role: app\n    callers:\n"+callers)))
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(context.Background(),
		&keywardv1.CreateKeyRequest{Name: "app", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	bin := openToNobody(t, in)
	return in, bin
}

// withAppRole adds the role app (GenerateDataKey on "app") to a policy of
// uidPolicy.
func withAppRole(policy string) string {
	return strings.Replace(policy, "bindings:", `  app:
    permissions:
      - operations: [EnvelopeService.GenerateDataKey]
        keys: [app]
bindings:`, 1)
}
