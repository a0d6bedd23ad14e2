// Package pgrewrap is a rewrap.Source over a PostgreSQL column of keyward
// ciphertexts (bytea), so that a rewrap job moves a table's ciphertexts to
// the newest key version:
//
//	src := &pgrewrap.Column{DB: conn, Table: "orders", ID: "id", Column: "card_token",
//		ContextColumns: map[string]string{"tenant": "tenant_id"}}
//	rep, err := rewrap.Run(ctx, c, src, rewrap.Options{State: "orders.state"})
//
// Rows are listed in the order of the ID column, a page at a time, so a job
// over millions of rows holds no transaction open and needs no snapshot.
// The ID column must have a unique index of its own (the primary key, say):
// paging by it would skip rows sharing an ID, so Prepare refuses a column
// without one. Rows whose ID is NULL are not gone over. A row is updated only if
// its column still holds the ciphertext the job read (UPDATE ... WHERE id =
// $1 AND column = $2): an application's write meanwhile wins.
//
// It is its own package so that an application using package rewrap over
// files does not link a PostgreSQL driver.
package pgrewrap

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/keyward/keyward/daemon/api/client/rewrap"
)

// DB is what a Column needs of a connection: *pgx.Conn and pgxpool.Pool
// both are one.
type DB interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Column is a bytea column of keyward ciphertexts.
type Column struct {
	DB DB
	// Table, optionally schema-qualified ("billing.orders").
	Table string
	// ID is a unique, ordered column naming the row (the primary key).
	ID string
	// Column holds the ciphertexts; NULL rows are skipped.
	Column string
	// ContextColumns: encryption context entries read from the row, by
	// context key; a NULL value leaves the entry out.
	ContextColumns map[string]string
	// Context: fixed encryption context entries, for every row.
	Context map[string]string
	// Database names the database in reports and state files, so that the
	// same table in two databases is two sources. Default: the server's
	// address and port (this host's name when it is reached over a Unix
	// socket or loopback) and the database's name, as the server says.
	Database string

	once    sync.Once
	idType  string
	ctxKeys []string
	err     error
}

// Name is "postgres:", the database, the table and the column:
// "postgres:db1:5432/shop/billing.orders.card_token". Before Prepare it
// lacks the database.
func (c *Column) Name() string {
	return "postgres:" + c.Database + "/" + c.Table + "." + c.Column
}

func ident(name string) string { return pgx.Identifier(strings.Split(name, ".")).Sanitize() }

// Prepare checks the columns in the catalog and learns the ID column's
// type (cursors are its text form, cast back to it in queries, so the
// order is the column's own and its index serves) and, unless set, the
// database's name for Name.
func (c *Column) Prepare(ctx context.Context) error {
	c.once.Do(func() {
		if c.Table == "" || c.ID == "" || c.Column == "" {
			c.err = errors.New("pgrewrap: Table, ID and Column are required")
			return
		}
		var ct string
		err := c.DB.QueryRow(ctx, `SELECT format_type(i.atttypid, i.atttypmod), format_type(v.atttypid, v.atttypmod)
			FROM pg_attribute i, pg_attribute v
			WHERE i.attrelid = $1::regclass AND i.attname = $2 AND NOT i.attisdropped
			AND v.attrelid = $1::regclass AND v.attname = $3 AND NOT v.attisdropped`,
			ident(c.Table), c.ID, c.Column).Scan(&c.idType, &ct)
		if errors.Is(err, pgx.ErrNoRows) {
			c.err = fmt.Errorf("pgrewrap: table %s has no column %q or %q", c.Table, c.ID, c.Column)
			return
		}
		if err != nil {
			c.err = fmt.Errorf("pgrewrap: reading the columns of %s: %w", c.Table, err)
			return
		}
		if ct != "bytea" {
			c.err = fmt.Errorf("pgrewrap: column %s of %s is %s; keyward ciphertexts are bytea", c.Column, c.Table, ct)
			return
		}
		var unique bool
		err = c.DB.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
			WHERE x.indrelid = $1::regclass AND x.indisunique AND x.indnkeyatts = 1 AND x.indpred IS NULL AND a.attname = $2)`,
			ident(c.Table), c.ID).Scan(&unique)
		if err != nil {
			c.err = fmt.Errorf("pgrewrap: reading the indexes of %s: %w", c.Table, err)
			return
		}
		if !unique {
			c.err = fmt.Errorf("pgrewrap: column %s of %s has no unique index of its own: a job paging by it would skip rows sharing an ID; give the primary key", c.ID, c.Table)
			return
		}
		if c.Database == "" {
			var db, addr string
			var port int
			err := c.DB.QueryRow(ctx, `SELECT current_database(), coalesce(host(inet_server_addr()), ''), coalesce(inet_server_port(), 0)`).Scan(&db, &addr, &port)
			if err != nil {
				c.err = fmt.Errorf("pgrewrap: %w", err)
				return
			}
			if ip := net.ParseIP(addr); ip == nil || ip.IsLoopback() {
				addr, _ = os.Hostname()
			}
			c.Database = fmt.Sprintf("%s:%d/%s", addr, port, db)
		}
		c.ctxKeys = slices.Sorted(maps.Keys(c.ContextColumns))
	})
	return c.err
}

// Count is the table's estimated row count (the planner's, not a scan).
func (c *Column) Count(ctx context.Context) (int64, error) {
	var n float64
	err := c.DB.QueryRow(ctx, `SELECT reltuples FROM pg_class WHERE oid = $1::regclass`, ident(c.Table)).Scan(&n)
	if err != nil || n < 0 {
		return -1, err
	}
	return int64(n), nil
}

// List reads the next rows after the cursor (an ID's text form, after a
// leading '=' that keeps an empty ID apart from the start).
func (c *Column) List(ctx context.Context, after string, limit int) ([]rewrap.Item, error) {
	if err := c.Prepare(ctx); err != nil {
		return nil, err
	}
	// The output columns are renamed: ORDER BY a bare name takes an output
	// column first, and "id"::text keeps the name id, which would sort
	// the IDs as text (10 before 9).
	cols := []string{ident(c.ID) + "::text AS keyward_rewrap_id", ident(c.Column) + " AS keyward_rewrap_ct"}
	for i, k := range c.ctxKeys {
		cols = append(cols, fmt.Sprintf("%s::text AS keyward_rewrap_ctx%d", ident(c.ContextColumns[k]), i))
	}
	q := "SELECT " + strings.Join(cols, ", ") + " FROM " + ident(c.Table) + " WHERE " + ident(c.Column) + " IS NOT NULL AND " + ident(c.ID) + " IS NOT NULL"
	args := []any{limit}
	if after != "" {
		q += " AND " + ident(c.ID) + " > $2::text::" + c.idType
		args = append(args, strings.TrimPrefix(after, "="))
	}
	q += " ORDER BY " + ident(c.ID) + " LIMIT $1"
	rows, err := c.DB.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("pgrewrap: %w", err)
	}
	defer rows.Close()
	var out []rewrap.Item
	for rows.Next() {
		var id string
		var ct []byte
		vals := make([]*string, len(c.ctxKeys))
		dest := []any{&id, &ct}
		for i := range vals {
			dest = append(dest, &vals[i])
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, fmt.Errorf("pgrewrap: %w", err)
		}
		it := rewrap.Item{Cursor: "=" + id, Ciphertext: ct}
		if len(c.Context) > 0 || len(vals) > 0 {
			it.Context = maps.Clone(c.Context)
			if it.Context == nil {
				it.Context = map[string]string{}
			}
			for i, k := range c.ctxKeys {
				if vals[i] != nil {
					it.Context[k] = *vals[i]
				}
			}
		}
		out = append(out, it)
	}
	return out, rows.Err()
}

// Replace updates the row if its column still holds it.Ciphertext.
func (c *Column) Replace(ctx context.Context, it rewrap.Item, ciphertext []byte) error {
	if err := c.Prepare(ctx); err != nil {
		return err
	}
	tag, err := c.DB.Exec(ctx, "UPDATE "+ident(c.Table)+" SET "+ident(c.Column)+" = $1 WHERE "+ident(c.ID)+" = $2::text::"+c.idType+
		" AND "+ident(c.Column)+" = $3", ciphertext, strings.TrimPrefix(it.Cursor, "="), it.Ciphertext)
	if err != nil {
		return fmt.Errorf("pgrewrap: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return rewrap.ErrChanged
	}
	return nil
}
