package pgrewrap_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/rewrap"
	"github.com/keyward/keyward/daemon/api/client/rewrap/pgrewrap"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/plugins/postgres/pgtest"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestColumn: a job over a real PostgreSQL column moves every row's
// ciphertext to the newest version, bound to the context its row gives,
// pages through the ID's own order (numeric, not text: 10 after 9),
// skips NULLs, leaves a row the application rewrote (it is no ciphertext now), and resumes.
func TestColumn(t *testing.T) {
	ctx := context.Background()
	in := daemontest.Start(t, daemontest.Policy(strings.Replace(daemontest.AllowAll(), "  all:\n", "  all:\n    max_batch: 10\n", 1)))
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "cards", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	pg := pgtest.Start(t)
	db := pg.Connect(t)
	if _, err := db.Exec(ctx, `CREATE SCHEMA billing; CREATE TABLE billing."Orders" (id bigint PRIMARY KEY, tenant text, token bytea)`); err != nil {
		t.Fatal(err)
	}
	const rows = 25
	for i := 1; i <= rows; i++ {
		tenant := fmt.Sprint(i % 3)
		ct, err := c.Encrypt(ctx, "cards", []byte(fmt.Sprint("card ", i)), map[string]string{"tenant": tenant, "table": "orders"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(ctx, `INSERT INTO billing."Orders" VALUES ($1, $2, $3)`, i, tenant, ct); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Exec(ctx, `INSERT INTO billing."Orders" VALUES (100, '1', NULL)`); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "cards"}); err != nil {
		t.Fatal(err)
	}
	src := func() *pgrewrap.Column {
		return &pgrewrap.Column{DB: db, Table: `billing.Orders`, ID: "id", Column: "token",
			ContextColumns: map[string]string{"tenant": "tenant"}, Context: map[string]string{"table": "orders"}}
	}
	host, _ := os.Hostname()
	if s := src(); s.Prepare(ctx) != nil || s.Name() != "postgres:"+host+":"+fmt.Sprint(pg.Port)+"/postgres/billing.Orders.token" {
		t.Errorf("Name %q", s.Name())
	}

	// Stop in the third batch of 10, after rows 1-20, as a crash would.
	state := t.TempDir() + "/state"
	stopCtx, cancel := context.WithCancel(ctx)
	stopping := &stopAt{Column: src(), cursor: "=21", cancel: cancel}
	rep, err := rewrap.Run(stopCtx, c, stopping, rewrap.Options{Rate: 1000, Batch: 10, State: state, Checkpoint: 1})
	if err == nil || rep.Items != 20 || rep.Moved != 20 {
		t.Fatalf("stopped run %+v, %v", rep, err)
	}
	// The application writes row 23 meanwhile.
	if _, err := db.Exec(ctx, `UPDATE billing."Orders" SET token = 'app' WHERE id = 23`); err != nil {
		t.Fatal(err)
	}
	rep, err = rewrap.Run(ctx, c, src(), rewrap.Options{Rate: 1000, Batch: 10, State: state})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Resumed || !rep.Complete || rep.Items != 25 || rep.Moved != 24 || rep.NotCiphertext != 1 ||
		fmt.Sprint(rep.Now["cards"]) != fmt.Sprint(rewrap.Counts{2: 24}) {
		t.Fatalf("report %+v", rep)
	}
	r, err := db.Query(ctx, `SELECT id, tenant, token FROM billing."Orders" WHERE token IS NOT NULL AND id <> 23 ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for r.Next() {
		var id int
		var tenant string
		var ct []byte
		if err := r.Scan(&id, &tenant, &ct); err != nil {
			t.Fatal(err)
		}
		n++
		if _, v, _ := rewrap.Header(ct); v != 2 {
			t.Errorf("row %d under v%d", id, v)
		}
		pt, err := c.Decrypt(ctx, ct, map[string]string{"tenant": tenant, "table": "orders"})
		if err != nil || string(pt) != fmt.Sprint("card ", id) {
			t.Errorf("row %d opens to %q, %v", id, pt, err)
		}
	}
	r.Close()
	if n != 24 {
		t.Errorf("%d rows moved and checked; want 24", n)
	}
	var app []byte
	if err := db.QueryRow(ctx, `SELECT token FROM billing."Orders" WHERE id = 23`).Scan(&app); err != nil || string(app) != "app" {
		t.Errorf("the application's write of row 23 became %q", app)
	}

	// The application writes a row between the job's read and its update:
	// the update does not happen, the application's write stands.
	if _, err := c.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "cards"}); err != nil {
		t.Fatal(err)
	}
	rep, err = rewrap.Run(ctx, c, &appWrites{Column: src(), db: db}, rewrap.Options{Rate: 1000, Batch: 10, NoReport: true})
	if err != nil || rep.Changed != 24 || rep.Moved != 0 {
		t.Fatalf("with the application writing: %+v, %v", rep, err)
	}
	var n2 int
	if err := db.QueryRow(ctx, `SELECT count(*) FROM billing."Orders" WHERE token = 'written by the application'`).Scan(&n2); err != nil || n2 != 24 {
		t.Errorf("%d rows keep the application's write; want 24 (%v)", n2, err)
	}

	// A column that is not bytea, one that is not there, an ID without a
	// unique index.
	if _, err := db.Exec(ctx, `CREATE TABLE dup (grp int, token bytea); CREATE INDEX ON dup (grp)`); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ table, id, col, want string }{
		{"billing.Orders", "id", "tenant", "is text; keyward ciphertexts are bytea"},
		{"billing.Orders", "id", "nope", `has no column "id" or "nope"`},
		{"dup", "grp", "token", "column grp of dup has no unique index of its own"},
	} {
		s := &pgrewrap.Column{DB: db, Table: tc.table, ID: tc.id, Column: tc.col}
		if _, err := rewrap.Run(ctx, c, s, rewrap.Options{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s.%s by %s: %v", tc.table, tc.col, tc.id, err)
		}
	}
}

// appWrites is a Column whose rows the application writes just before the
// job updates them.
type appWrites struct {
	*pgrewrap.Column
	db interface {
		Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
	}
}

func (a *appWrites) Replace(ctx context.Context, it rewrap.Item, ct []byte) error {
	if _, err := a.db.Exec(ctx, `UPDATE billing."Orders" SET token = 'written by the application' WHERE id = $1::text::bigint`, it.Cursor[1:]); err != nil {
		return err
	}
	return a.Column.Replace(ctx, it, ct)
}

// stopAt is a Column that cancels the job when it would replace the row
// at cursor.
type stopAt struct {
	*pgrewrap.Column
	cursor string
	cancel context.CancelFunc
}

func (s *stopAt) Replace(ctx context.Context, it rewrap.Item, ct []byte) error {
	if it.Cursor == s.cursor {
		s.cancel()
		return ctx.Err()
	}
	return s.Column.Replace(ctx, it, ct)
}
