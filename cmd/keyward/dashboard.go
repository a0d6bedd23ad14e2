package main

import (
	"fmt"
	"html"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/dashboard"
	"github.com/keyward/keyward/daemon/api/review"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// dashboardCommand serves the operator's web page (docs/dashboard.md) until
// interrupted.
func dashboardCommand(f *flagSet) action {
	listen := f.String("listen", "127.0.0.1:0", "loopback address and port to serve on (port 0: any free one)")
	open := f.Bool("open", true, "open the page in this desktop's browser, if there is one")
	return func(e *env, _ []string) error {
		// Ping first, so that an absent keywardd is said now, not on the page.
		if _, err := e.api.Status.Ping(e.ctx, &keywardv1.PingRequest{}); err != nil && !review.IsDenied(err) {
			return err
		}
		log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		d, err := dashboard.New(e.api, dashboard.Options{Log: log, Version: version})
		if err != nil {
			return err
		}
		ln, err := d.Listen(*listen)
		if err != nil {
			return err
		}
		base := "http://" + ln.Addr().String()
		login := d.NewLogin(base)
		fmt.Fprintf(e.stdout, "keyward dashboard at %s/, acting as you through %s\n", base, client.SocketPath(e.socket))
		fmt.Fprintf(e.stdout, "log in once with this URL (it works once, for 10 minutes; keep it to yourself):\n  %s\n", login)
		if *open && (os.Getenv("DISPLAY") != "" || os.Getenv("WAYLAND_DISPLAY") != "") {
			cleanup, err := openBrowser(login)
			if err != nil {
				fmt.Fprintf(e.stderr, "keyward dashboard: no browser opened (%v): open the URL above\n", err)
			} else {
				defer cleanup()
				fmt.Fprintln(e.stdout, "opening it in your browser (if it says file not found, as a snap browser does for /tmp, open the URL above)")
			}
		}
		fmt.Fprintln(e.stdout, "Ctrl-C stops it.")
		return d.Serve(e.ctx, ln)
	}
}

// openBrowser hands the login URL to the desktop's browser through a file
// only this user may read, which redirects to it: never the URL itself in
// a command line, which every user of the machine may read in /proc. The
// file goes a minute after the browser was started, or at cleanup.
func openBrowser(login string) (cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "keyward-dashboard-")
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "login.html")
	page := fmt.Sprintf(`<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=%s"><title>keyward</title><a href="%s">Open the keyward dashboard</a>`,
		html.EscapeString(login), html.EscapeString(login))
	if err := os.WriteFile(path, []byte(page), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	cmd := exec.Command(browserOpener, path)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	go func() {
		cmd.Wait()
		// The browser has read it by now, or never will: the login is
		// spent or expires anyway.
		time.Sleep(time.Minute)
		os.RemoveAll(dir)
	}()
	return func() { os.RemoveAll(dir) }, nil
}

// browserOpener opens a file in the desktop's browser (a test's stand-in
// records what it was given).
var browserOpener = "xdg-open"
