// Command keywardd is the keyward daemon: it keeps root keys in a PKCS#11
// HSM and serves keyward.v1 on a Unix socket. See docs/operations.md, which
// also lists its exit codes (daemon.ExitCode).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/devmode"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() { os.Exit(run()) }

func run() int {
	// Processes of keywardd's own user (a plugin, say) may not read its
	// memory (which holds the PIN for logging in again) or
	// /proc/PID/environ (where a PIN variable stays until Run has read it
	// and overwrites it, before the HSM's module is loaded), nor attach
	// to it; and a crash leaves no core with the PIN.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "keywardd: cannot make itself non-dumpable: %v\n", err)
		return daemon.ExitFailure
	}
	// Wrong flags are a permanent failure, like a wrong configuration:
	// ExitUsage, which the unit does not restart (flag's own is 2).
	flag.CommandLine.Init(os.Args[0], flag.ContinueOnError)
	configPath := flag.String("config", "/etc/keyward/keywardd.yaml", "configuration file")
	dev := flag.Bool("dev", false, "try keyward: a throw-away SoftHSM2 token, data directory, permissive policy and configuration in a temporary directory; with -config, that file's configuration on the dev token")
	devDir := flag.String("dev-dir", "", "with -dev: use this directory instead of a temporary one, and keep it; a directory set up before is used as it is (token, PIN, policy, configuration)")
	acceptRollback := flag.Bool("accept-store-rollback", false, "serve a store older than the last write the audit log records (a backup restored on purpose; audited): see docs/operations.md, \"Restoring the store\"")
	acceptUnsealed := flag.Bool("accept-unsealed-store", false, "seal a store of an old schema although this HSM token's keyward-store key shows a sealed store was there before (an old backup put back on purpose; audited): see docs/operations.md, \"Restoring the store\"")
	showVersion := flag.Bool("version", false, "print the version and exit")
	if err := flag.CommandLine.Parse(os.Args[1:]); errors.Is(err, flag.ErrHelp) {
		return daemon.ExitOK
	} else if err != nil {
		return daemon.ExitUsage // flag printed what is wrong, and the usage
	}
	if flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "keywardd: unexpected arguments; the PIN and everything else come from the configuration file")
		return daemon.ExitUsage
	}
	if *showVersion {
		fmt.Println("keywardd", version)
		return 0
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reload := make(chan struct{})
	go func() {
		for range hup {
			reload <- struct{}{}
		}
	}()

	var (
		cfg  *daemon.Config
		err  error
		opts = daemon.Options{Log: log, Reload: reload, Version: version, AcceptStoreRollback: *acceptRollback, AcceptUnsealedStore: *acceptUnsealed}
	)
	configSet := false
	flag.Visit(func(f *flag.Flag) { configSet = configSet || f.Name == "config" })
	if *dev {
		dir, kept := *devDir, *devDir != ""
		if !kept {
			if dir, err = os.MkdirTemp("", "keyward-dev-"); err != nil {
				log.Error("keywardd --dev", "error", err.Error())
				return daemon.ExitFailure
			}
			defer os.RemoveAll(dir)
		}
		config := ""
		if configSet {
			config = *configPath
		}
		if cfg, err = devmode.Setup(dir, config); err != nil {
			code := daemon.ExitCode(err)
			log.Error("keywardd --dev: setting up", "error", err.Error(), "exit_code", code)
			return code
		}
		if config == "" {
			config = devmode.FilesIn(dir).Config
		}
		opts.Keys = devmode.DefaultKeys
		ready := make(chan struct{})
		opts.Ready = ready
		go func() {
			<-ready
			fmt.Fprint(os.Stdout, devmode.HowTo(cfg, config, dir, kept))
		}()
	} else if *devDir != "" {
		fmt.Fprintln(os.Stderr, "keywardd: -dev-dir goes with -dev")
		return daemon.ExitUsage
	} else if cfg, err = daemon.LoadConfig(*configPath); err != nil {
		code := daemon.ExitCode(err)
		log.Error("keywardd: configuration", "error", err.Error(), "exit_code", code)
		return code
	}
	if err := daemon.Run(ctx, cfg, opts); err != nil {
		code := daemon.ExitCode(err)
		log.Error("keywardd stopped", "error", err.Error(), "exit_code", code)
		return code
	}
	log.Info("keywardd stopped")
	return daemon.ExitOK
}
