package dashboard

import (
	"fmt"
	"html"
	"html/template"
	"slices"
	"strings"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
)

// The charts are SVG written here (the package doc says why). Every bar
// carries its number in a <title> (shown on hover) and in data-count, so a
// reader and a test see the same figure.

// resultColors are the verification results' colours, VALID first; a
// result not named here is drawn grey.
var resultColors = []struct{ Code, Color string }{
	{"VALID", "#2e7d32"}, {"RATE_LIMITED", "#ef6c00"}, {"USAGE_EXCEEDED", "#f9a825"}, {"FORBIDDEN", "#c62828"},
	{"IP_NOT_ALLOWED", "#6a1b9a"}, {"WRONG_ENVIRONMENT", "#1565c0"}, {"EXPIRED", "#795548"}, {"DISABLED", "#9e9e9e"},
	{"REVOKED", "#424242"},
}

func resultColor(code string) string {
	for _, c := range resultColors {
		if c.Code == code {
			return c.Color
		}
	}
	return "#bdbdbd"
}

// resultOrder sorts results as resultColors lists them.
func resultOrder(a, b string) int {
	ia := slices.IndexFunc(resultColors, func(c struct{ Code, Color string }) bool { return c.Code == a })
	ib := slices.IndexFunc(resultColors, func(c struct{ Code, Color string }) bool { return c.Code == b })
	if ia < 0 {
		ia = len(resultColors)
	}
	if ib < 0 {
		ib = len(resultColors)
	}
	if ia != ib {
		return ia - ib
	}
	return strings.Compare(a, b)
}

const (
	chartW, chartH = 760, 220
	padL, padB     = 48, 28
)

// usageChart draws verifications per hour, stacked by result, for the
// hours from first to last (both included).
func usageChart(hours []*keywardv1.APIKeyHourUsage, first, last time.Time) template.HTML {
	return stackedChart("usage-chart", "verifications per hour by result", "data-result", hours, first, last,
		(*keywardv1.APIKeyUsage).GetCounts, resultColor, resultOrder)
}

// networkColors tell a chart's networks apart, the busiest first.
var networkColors = []string{"#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#c62828", "#795548", "#9e9e9e"}

// networksChart draws verifications per hour, stacked by source network,
// coloured by the networks' order in ranked (the busiest first); the
// networks past the palette share its last colour.
func networksChart(hours []*keywardv1.APIKeyHourUsage, ranked []countOf, first, last time.Time) template.HTML {
	rank := map[string]int{}
	for i, c := range ranked {
		rank[c.Name] = i
	}
	color := func(net string) string { return networkColors[min(rank[net], len(networkColors)-1)] }
	order := func(a, b string) int {
		if rank[a] != rank[b] {
			return rank[a] - rank[b]
		}
		return strings.Compare(a, b)
	}
	return stackedChart("networks-by-hour", "verifications per hour by source network", "data-network", hours, first, last,
		(*keywardv1.APIKeyUsage).GetNetworks, color, order)
}

// stackedChart draws per hour, from first to last (both included), the
// counts pick takes of each hour's usage, stacked in order, each bar
// marked with attr (data-result, data-network) and its count.
func stackedChart(id, label, attr string, hours []*keywardv1.APIKeyHourUsage, first, last time.Time,
	pick func(*keywardv1.APIKeyUsage) map[string]int64, color func(string) string, order func(a, b string) int) template.HTML {
	byHour := map[int64]map[string]int64{}
	var peak int64
	for _, h := range hours {
		t := h.GetHour().AsTime().UTC().Truncate(time.Hour)
		if t.Before(first) || t.After(last) {
			continue
		}
		counts := pick(h.GetUsage())
		byHour[t.Unix()] = counts
		var sum int64
		for _, n := range counts {
			sum += n
		}
		peak = max(peak, sum)
	}
	n := int(last.Sub(first)/time.Hour) + 1
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" id="%s" viewBox="0 0 %d %d" role="img" aria-label="%s">`, id, chartW, chartH, label)
	plotW, plotH := float64(chartW-padL-8), float64(chartH-padB-10)
	axes(&b, peak, plotH)
	if peak == 0 {
		fmt.Fprintf(&b, `<text x="%d" y="%d" class="empty">no verifications in this window</text>`, padL+20, chartH/2)
	}
	bw := plotW / float64(n)
	for i := range n {
		t := first.Add(time.Duration(i) * time.Hour)
		counts := byHour[t.Unix()]
		codes := make([]string, 0, len(counts))
		for c := range counts {
			codes = append(codes, c)
		}
		slices.SortFunc(codes, order)
		y := float64(chartH - padB)
		for _, c := range codes {
			hgt := plotH * float64(counts[c]) / float64(peak)
			y -= hgt
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" data-hour="%s" %s="%s" data-count="%d"><title>%s %s: %d</title></rect>`,
				float64(padL)+float64(i)*bw+bw*0.1, y, bw*0.8, hgt, color(c), t.Format(time.RFC3339), attr, html.EscapeString(c), counts[c],
				t.Format("Jan 2 15:04"), html.EscapeString(c), counts[c])
		}
		if n <= 48 && i%6 == 0 || n > 48 && t.Hour() == 0 {
			label := t.Format("15:04")
			if n > 48 {
				label = t.Format("Jan 2")
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" class="tick">%s</text>`, float64(padL)+float64(i)*bw, chartH-8, label)
		}
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// latencyChart draws each hour's p50 and p99 latency, on a scale of the
// histogram's buckets (the estimate is a bucket's bound).
func latencyChart(hours []*keywardv1.APIKeyHourUsage, bounds []time.Duration, first, last time.Time) template.HTML {
	n := int(last.Sub(first)/time.Hour) + 1
	rows := len(bounds) + 1
	plotW, plotH := float64(chartW-padL-8), float64(chartH-padB-10)
	y := func(bucket int) float64 { return float64(chartH-padB) - plotH*(float64(bucket)+0.5)/float64(rows) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" id="latency-chart" viewBox="0 0 %d %d" role="img" aria-label="p50 and p99 verification latency per hour">`, chartW, chartH)
	axes(&b, 0, plotH)
	for i, bd := range bounds {
		if i%3 == 0 {
			fmt.Fprintf(&b, `<text x="%d" y="%.1f" class="tick" text-anchor="end">%s</text>`, padL-4, y(i)+4, bd)
		}
	}
	bw := plotW / float64(n)
	drawn := false
	for _, h := range hours {
		t := h.GetHour().AsTime().UTC().Truncate(time.Hour)
		if t.Before(first) || t.After(last) {
			continue
		}
		x := float64(padL) + float64(int(t.Sub(first)/time.Hour))*bw + bw/2
		for _, q := range []struct {
			name  string
			q     float64
			color string
		}{{"p50", 0.5, "#1565c0"}, {"p99", 0.99, "#ef6c00"}} {
			e, ok := apikeys.LatencyQuantile(bounds, h.GetUsage().GetLatencyCounts(), q.q)
			if !ok {
				continue
			}
			drawn = true
			bucket := slices.Index(bounds, e.Bound)
			if e.Over {
				bucket = len(bounds)
			}
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s" data-hour="%s" data-quantile="%s" data-bound="%s"><title>%s %s: %s</title></circle>`,
				x, y(bucket), q.color, t.Format(time.RFC3339), q.name, html.EscapeString(e.String()), t.Format("Jan 2 15:04"), q.name, html.EscapeString(e.String()))
		}
	}
	if !drawn {
		fmt.Fprintf(&b, `<text x="%d" y="%d" class="empty">no latency measured in this window</text>`, padL+20, chartH/2)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// axes draws the y axis up to peak and the x axis.
func axes(b *strings.Builder, peak int64, plotH float64) {
	fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" class="axis"/>`, padL, chartH-padB, chartW-8, chartH-padB)
	fmt.Fprintf(b, `<line x1="%d" y1="10" x2="%d" y2="%d" class="axis"/>`, padL, padL, chartH-padB)
	if peak > 0 {
		fmt.Fprintf(b, `<text x="%d" y="%.1f" class="tick" text-anchor="end">%d</text>`, padL-4, float64(chartH-padB)-plotH+4, peak)
		fmt.Fprintf(b, `<text x="%d" y="%d" class="tick" text-anchor="end">0</text>`, padL-4, chartH-padB+4)
	}
}

// barsChart draws one horizontal bar per item, largest first.
func barsChart(id, title string, items []countOf) template.HTML {
	if len(items) == 0 {
		return template.HTML(`<p class="muted">none in this window</p>`)
	}
	const rowH, labelW = 22, 200
	var peak int64
	for _, it := range items {
		peak = max(peak, it.N)
	}
	h := rowH*len(items) + 4
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart bars" id="%s" viewBox="0 0 %d %d" role="img" aria-label="%s">`, id, chartW, h, html.EscapeString(title))
	for i, it := range items {
		w := float64(chartW-labelW-80) * float64(it.N) / float64(max(peak, 1))
		y := i*rowH + 2
		fmt.Fprintf(&b, `<text x="%d" y="%d" class="label" text-anchor="end">%s</text>`, labelW-6, y+15, html.EscapeString(it.Name))
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="#1565c0" data-name="%s" data-count="%d"><title>%s: %d</title></rect>`,
			labelW, y+3, w, rowH-6, html.EscapeString(it.Name), it.N, html.EscapeString(it.Name), it.N)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" class="label">%d</text>`, float64(labelW)+w+6, y+15, it.N)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// timelineChart puts each scheduled rotation on a line from now to now +
// within: overdue ones at the start, in red.
func timelineChart(rs []*keywardv1.ScheduledRotation, now time.Time, within time.Duration) template.HTML {
	if len(rs) == 0 {
		return template.HTML(`<p class="muted">nothing scheduled in this window</p>`)
	}
	const rowH, labelW = 20, 230
	h := rowH*len(rs) + 34
	plotW := float64(chartW - labelW - 36)
	x := func(t time.Time) float64 {
		f := float64(t.Sub(now)) / float64(within)
		return float64(labelW) + plotW*min(max(f, 0), 1)
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart timeline" viewBox="0 0 %d %d" role="img" aria-label="rotations due in the next %v">`, chartW, h, within)
	for d := time.Duration(0); d <= within; d += within / 6 {
		xx := x(now.Add(d))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="4" x2="%.1f" y2="%d" class="grid"/><text x="%.1f" y="%d" class="tick" text-anchor="middle">%s</text>`,
			xx, xx, h-22, xx, h-6, now.Add(d).UTC().Format("Jan 2"))
	}
	for i, r := range rs {
		y := i*rowH + 14
		due := r.GetDueTime().AsTime()
		color := "#1565c0"
		if r.GetOverdue() {
			color = "#c62828"
		}
		label := fmt.Sprintf("%s %s", strings.ReplaceAll(r.GetKind(), "_", " "), r.GetId())
		fmt.Fprintf(&b, `<text x="%d" y="%d" class="label" text-anchor="end">%s</text>`, labelW-8, y+4, html.EscapeString(label))
		fmt.Fprintf(&b, `<circle cx="%.1f" cy="%d" r="5" fill="%s" data-id="%s" data-due="%s"><title>%s: %s due %s (%s)</title></circle>`,
			x(due), y, color, html.EscapeString(r.GetId()), due.UTC().Format(time.RFC3339), html.EscapeString(label), html.EscapeString(r.GetAction()),
			due.UTC().Format("2006-01-02 15:04 UTC"), html.EscapeString(r.GetPolicy()))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// meter is a small bar of used against limit.
func meter(used, limit uint64) template.HTML {
	if limit == 0 {
		return ""
	}
	f := min(float64(used)/float64(limit), 1)
	color := "#2e7d32"
	switch {
	case f > 0.8:
		color = "#c62828"
	case f > 0.5:
		color = "#ef6c00"
	}
	return template.HTML(fmt.Sprintf(`<svg class="meter" viewBox="0 0 100 8" data-used="%d" data-limit="%d"><rect x="0" y="0" width="100" height="8" fill="#e0e0e0"/><rect x="0" y="0" width="%.2f" height="8" fill="%s"/><title>%d of %d</title></svg>`,
		used, limit, 100*f, color, used, limit))
}
