package gateway

import (
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestQuotaHoldingMoreThanItsRefill: a quota may hold more than
// its refill (created with remaining 50, topped up to 10 an hour:
// refill keeps max(remaining, refill)). A verification costing more than
// is left (cost 60) is USAGE_EXCEEDED with 50 remaining. The 429's body
// must not say a usage of 2^32-40 (uint32 refill - remaining wraps), and
// RateLimit-Remaining must not exceed RateLimit-Limit.
func TestQuotaHoldingMoreThanItsRefill(t *testing.T) {
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	r := &keywardv1.VerifyAPIKeyResponse{Code: keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED,
		Quota:      &keywardv1.Quota{Remaining: 50, Refill: 10, RefillEvery: durationpb.New(time.Hour)},
		RetryAfter: durationpb.New(30 * time.Minute), QuotaRefillTime: timestamppb.New(now.Add(30 * time.Minute))}
	a := AnswerOf(r, now)
	var body struct {
		CurrentUsage int64 `json:"current_usage"`
		Limit        int64 `json:"limit"`
	}
	if err := json.Unmarshal(a.Body, &body); err != nil {
		t.Fatal(err)
	}
	if body.CurrentUsage < 0 || body.CurrentUsage > body.Limit {
		t.Errorf("429 body: current_usage %d, limit %d (%s)", body.CurrentUsage, body.Limit, a.Body)
	}
	lim, _ := strconv.Atoi(a.Header.Get("RateLimit-Limit"))
	rem, _ := strconv.Atoi(a.Header.Get("RateLimit-Remaining"))
	if rem > lim {
		t.Errorf("RateLimit-Remaining %d > RateLimit-Limit %d", rem, lim)
	}
}
