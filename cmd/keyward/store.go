package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/keyward/keyward/daemon"
)

// migrateReport is store migrate's answer.
type migrateReport struct {
	From         string  `json:"from"`
	To           string  `json:"to"`
	Records      int64   `json:"records"`
	Total        int64   `json:"total"`
	Transactions int     `json:"transactions"`
	Resumed      bool    `json:"resumed"`
	Writes       uint64  `json:"writes"`
	Seconds      float64 `json:"seconds"`
}

// storeMigrate copies keywardd's bbolt store into the etcd of its
// store.etcd, saying how far it is about once a second on standard error.
func storeMigrate(f *flagSet) action {
	config := f.String("config", "/etc/keyward/keywardd.yaml", "keywardd's configuration: its hsm, data_dir and store.etcd")
	from := f.String("from", "", "the bbolt file (default: keyward.db in data_dir)")
	return func(e *env, _ []string) error {
		cfg, err := daemon.LoadConfig(*config)
		if err != nil {
			return err
		}
		var bar *progress
		res, err := daemon.Migrate(e.ctx, cfg, daemon.MigrateOptions{From: *from, Progress: func(p daemon.MigrateProgress) {
			if bar == nil {
				bar = e.progress("store migrate: records", p.Total)
			}
			bar.set(p.Copied, "bucket "+p.Bucket)
		}})
		if bar != nil {
			bar.finish()
		}
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("the migration stopped (%w): run it again to go on from where it was", err)
		}
		if err != nil {
			return err
		}
		if res.Done {
			_, err := fmt.Fprintf(e.stdout, "%s was migrated into %s already (write %d): nothing to do\n", res.From, res.To, res.Writes)
			return err
		}
		out := migrateReport{From: res.From, To: res.To, Records: res.Records, Total: res.Total, Transactions: res.Transactions,
			Resumed: res.Resumed, Writes: res.Writes, Seconds: res.Took.Seconds()}
		return e.show(out, func(w io.Writer) error {
			how := "copied"
			if out.Resumed {
				how = "copied the rest of"
			}
			_, err := fmt.Fprintf(w, "%s %d records of %d from %s into %s in %d transactions, %.1f s; the state is the fleet's now (write %d): start its nodes\n",
				how, out.Records, out.Total, out.From, out.To, out.Transactions, out.Seconds, out.Writes)
			return err
		})
	}
}
