package pgrewrap_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

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
	db := pgtest.Start(t).Connect(t)
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
	if n := src().Name(); n != "postgres:billing.Orders.token" {
		t.Errorf("Name %q", n)
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

	// A column that is not bytea, and one that is not there.
	for col, want := range map[string]string{"tenant": "is text; keyward ciphertexts are bytea", "nope": `has no column "id" or "nope"`} {
		s := &pgrewrap.Column{DB: db, Table: "billing.Orders", ID: "id", Column: col}
		if _, err := rewrap.Run(ctx, c, s, rewrap.Options{}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("column %s: %v", col, err)
		}
	}
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
