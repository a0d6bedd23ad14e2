package client

import (
	"context"
	"iter"

	"google.golang.org/protobuf/proto"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// ListAuditRecords is a page of keywardd's audit log, newest first, as r's
// filters select it (AuditService.ListAuditRecords: an operator's grant).
// Pass the answer's NextPageToken in r.PageToken for the next page; a page
// can be short, or empty, with ScanLimited set and a token still to follow
// (a call reads at most 16 MiB of the log).
func (c *Client) ListAuditRecords(ctx context.Context, r *keywardv1.ListAuditRecordsRequest) (*keywardv1.ListAuditRecordsResponse, error) {
	resp, err := c.Audit.ListAuditRecords(ctx, r)
	return resp, Wrap(err)
}

// AuditRecords yields every record r's filters select, newest first,
// calling ListAuditRecords page after page from r.PageToken until the
// log's start or r.SinceTime, or until the loop stops. An error is yielded
// once, last. r is not changed.
func (c *Client) AuditRecords(ctx context.Context, r *keywardv1.ListAuditRecordsRequest) iter.Seq2[*keywardv1.AuditRecord, error] {
	return func(yield func(*keywardv1.AuditRecord, error) bool) {
		req := proto.Clone(r).(*keywardv1.ListAuditRecordsRequest)
		for {
			resp, err := c.ListAuditRecords(ctx, req)
			if err != nil {
				yield(nil, err)
				return
			}
			for _, rec := range resp.GetRecords() {
				if !yield(rec, nil) {
					return
				}
			}
			if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
				return
			}
		}
	}
}

// VerifyAuditLog checks keywardd's whole audit log, its chain and its
// checkpoints' MACs (AuditService.VerifyAuditLog). It reads the whole
// file, at about 30 MB/s: give ctx a deadline to match the log's size. A
// log that fails is an answer (Ok false, BadLine, Problem), not an error.
func (c *Client) VerifyAuditLog(ctx context.Context) (*keywardv1.VerifyAuditLogResponse, error) {
	resp, err := c.Audit.VerifyAuditLog(ctx, &keywardv1.VerifyAuditLogRequest{})
	return resp, Wrap(err)
}
