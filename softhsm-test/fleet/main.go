// Command fleet runs a keyward fleet on one machine, to try it (make
// fleet): a 3-member etcd cluster (etcd's own server, embedded: the code
// of the etcd binary), and three keywardd nodes sharing it and one
// throw-away SoftHSM2 token (SoftHSM2's file store takes several
// processes; a real fleet shares a network HSM). It prints what to try,
// and on Ctrl-C stops everything and removes its directory.
//
//	go run ./softhsm-test/fleet -bin ./bin -dir .run/fleet
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
	"github.com/keyward/keyward/softhsm-test/etcdtest"
)

func main() {
	bin := flag.String("bin", "bin", "the directory holding keywardd and keyward")
	dir := flag.String("dir", ".run/fleet", "the fleet's directory: made afresh, removed at the end")
	nodes := flag.Int("nodes", 3, "how many keywardd nodes")
	flag.Parse()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	if err := run(*bin, *dir, *nodes, os.Stdout, stop); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
}

// node is one keywardd process.
type node struct {
	name, dir, socket string
	cmd               *exec.Cmd
	exited            chan struct{} // closed when the process has exited, err then set
	err               error
}

// run runs the fleet until stop says, printing what to try to out.
func run(bin, dir string, n int, out io.Writer, stop <-chan os.Signal) (err error) {
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	keywardd := filepath.Join(bin, "keywardd")
	if _, err := os.Stat(keywardd); err != nil {
		return fmt.Errorf("%v: build keywardd first (make build)", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	tok, err := softhsmtest.Prepare(filepath.Join(dir, "hsm"), "keyward-fleet", "", "")
	if err != nil {
		return err
	}
	os.Setenv("SOFTHSM2_CONF", tok.Conf)
	if err := tok.Init(); err != nil {
		return err
	}

	etcdLog, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		return err
	}
	defer etcdLog.Close()
	prog := &etcdtest.Program{Dir: dir, Out: etcdLog}
	defer prog.Close()
	cluster := etcdtest.NewCluster(prog, 3)

	var started []*node
	defer func() {
		for _, nd := range started {
			nd.stop()
		}
	}()
	for i := range n {
		nd, err := startNode(keywardd, dir, fmt.Sprintf("node-%d", i+1), tok, cluster.Endpoints())
		if err != nil {
			return err
		}
		started = append(started, nd)
	}
	fmt.Fprint(out, howTo(bin, dir, tok.Label, cluster.Endpoints(), started))

	died := make(chan string, len(started))
	for _, nd := range started {
		go func() { <-nd.exited; died <- nd.name }()
	}
	select {
	case <-stop:
		fmt.Fprintln(out, "\nstopping the fleet and removing", dir)
	case name := <-died:
		log, _ := os.ReadFile(filepath.Join(dir, name, "keywardd.log"))
		return fmt.Errorf("%s exited; its log:\n%s", name, log)
	}
	return nil
}

// startNode writes a node's configuration and policy and starts it; it
// returns once the node answers.
func startNode(keywardd, dir, name string, tok *softhsmtest.Token, endpoints []string) (*node, error) {
	nd := &node{name: name, dir: filepath.Join(dir, name), exited: make(chan struct{})}
	nd.socket = filepath.Join(nd.dir, "keyward.sock")
	if err := os.MkdirAll(nd.dir, 0o750); err != nil {
		return nil, err
	}
	cfg := &daemon.Config{DataDir: filepath.Join(nd.dir, "data"), PolicyFile: filepath.Join(nd.dir, "policy.yaml"), Node: name}
	cfg.Socket.Path = nd.socket
	cfg.HSM.Module, cfg.HSM.Token, cfg.HSM.PINFile = tok.Module, tok.Label, tok.PINFile
	cfg.Store.Etcd = &daemon.EtcdConfig{Endpoints: endpoints, Prefix: "/keyward"}
	policy := fmt.Sprintf("version: 1\nroles:\n  all:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\n    tokens:\n      audiences: [orders]\nbindings:\n  - role: all\n    callers:\n      - uid: %d\n", os.Getuid())
	if err := os.WriteFile(cfg.PolicyFile, []byte(policy), 0o600); err != nil {
		return nil, err
	}
	b, err := daemontest.MarshalConfig(cfg)
	if err != nil {
		return nil, err
	}
	config := filepath.Join(nd.dir, "keywardd.yaml")
	if err := os.WriteFile(config, b, 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(nd.dir, "keywardd.log"))
	if err != nil {
		return nil, err
	}
	nd.cmd = exec.Command(keywardd, "-config", config)
	nd.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+tok.Conf)
	nd.cmd.Stdout, nd.cmd.Stderr = logf, logf
	nd.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nd.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { nd.err = nd.cmd.Wait(); logf.Close(); close(nd.exited) }()
	if err := nd.waitReady(); err != nil {
		nd.stop()
		log, _ := os.ReadFile(filepath.Join(nd.dir, "keywardd.log"))
		return nil, fmt.Errorf("%s: %w\n%s", name, err, log)
	}
	return nd, nil
}

// waitReady waits until the node answers a Ping, for a minute at most.
func (nd *node) waitReady() error {
	c, err := client.Dial(nd.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		select {
		case <-nd.exited:
			return fmt.Errorf("keywardd exited: %v", nd.err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Status.Ping(ctx, &keywardv1.PingRequest{})
		cancel()
		if err == nil {
			return nil
		}
	}
	return errors.New("keywardd did not answer within a minute")
}

// stop stops the node with SIGTERM, and kills it after 10 s.
func (nd *node) stop() {
	if nd.cmd.Process == nil {
		return
	}
	nd.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-nd.exited:
	case <-time.After(10 * time.Second):
		nd.cmd.Process.Kill()
		<-nd.exited
	}
}

func howTo(bin, dir, token string, endpoints []string, nodes []*node) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nA keyward fleet is running in %s:\n", dir)
	fmt.Fprintf(&b, "  etcd: 3 members, %s (its log: etcd.log)\n", strings.Join(endpoints, " "))
	fmt.Fprintf(&b, "  HSM: SoftHSM2 token %q, throw-away, shared by every node\n", token)
	for i, nd := range nodes {
		fmt.Fprintf(&b, "  %s: socket $n%d = %s (configuration, policy, data and log in %s)\n", nd.name, i+1, nd.socket, nd.dir)
	}
	b.WriteString("\nTry, in another terminal:\n")
	fmt.Fprintf(&b, "  export PATH=%s:$PATH\n ", bin)
	for i, nd := range nodes {
		fmt.Fprintf(&b, " n%d=%s", i+1, nd.socket)
	}
	b.WriteString(`
  keyward --socket $n1 apikey create --owner demo --name try --env prod --perm orders:read --secret-out demo.key
  keyward --socket $n3 apikey verify --env prod --perm orders:read < demo.key     # VALID: made on node 1
  keyward --socket $n2 apikey revoke -id ak_...                                   # the ID create printed
  keyward --socket $n3 apikey verify --env prod --perm orders:read < demo.key     # REVOKED: on node 2
  keyward --socket $n1 key create --name orders --purpose encrypt
  keyward --socket $n2 key rotate --name orders
  echo -n hello | keyward --socket $n3 encrypt --key orders --context app=demo > hello.kw
  keyward --socket $n1 decrypt --context app=demo < hello.kw
  keyward --socket $n1 status                                                     # each node's place: which one leads
  kill <a node's pid> and watch another lead: pgrep -a keywardd

Ctrl-C stops the fleet and removes the directory. docs/fleet.md says what is shared and what is local.
`)
	return b.String()
}
