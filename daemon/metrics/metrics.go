// Package metrics is keywardd's Prometheus metrics (client_golang): calls
// and their outcomes per RPC, call latency, API key verification results,
// and what the daemon reports of its keys and plugins when scraped. Label
// values come from fixed sets (the RPC names of keyward.v1, gRPC codes,
// verification codes) or from what operators name (keys, plugins), so the
// number of series stays bounded. Served only on loopback: metrics carry
// no secret, but they say what keys exist and how they are used.
package metrics

import (
	"net/http"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are keywardd's metrics.
type Metrics struct {
	reg      *prometheus.Registry
	ops      []string
	calls    *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	verifies *prometheus.CounterVec
	anomaly  *prometheus.CounterVec
	hsmTime  *prometheus.HistogramVec
	hsmErrs  *prometheus.CounterVec
	refusals *prometheus.CounterVec
	leaks    *prometheus.CounterVec
}

// New makes the metrics for the RPCs ops ("Service.Method"); state adds
// collectors read at each scrape (keys, plugins).
func New(ops []string, state ...prometheus.Collector) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), ops: slices.Sorted(slices.Values(ops)),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_calls_total",
			Help: "Calls of keyward.v1, by operation and gRPC code (PermissionDenied: denied by the policy)."}, []string{"op", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "keyward_call_duration_seconds",
			Help:    "How long calls of keyward.v1 took, audit record included, by operation.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}}, []string{"op"}),
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_apikey_verifications_total",
			Help: "API key verifications, by result (VALID, NOT_FOUND, RATE_LIMITED, ...)."}, []string{"result"}),
		anomaly: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_apikey_anomalies_total",
			Help: "API key anomalies detected, by kind (spike, new_network, new_country) and whether the key was disabled."}, []string{"kind", "disabled"}),
		hsmTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "keyward_hsm_operation_duration_seconds",
			Help:    "How long HSM operations took, session wait included, by operation.",
			Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1}}, []string{"op"}),
		hsmErrs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_hsm_errors_total",
			Help: "HSM operations that failed, by operation."}, []string{"op"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_caller_refusals_total",
			Help: "Connections and calls refused because their caller was over its budget (connections, calls in flight, rate, binaries hashed, or it owed for earlier refusals), and whether the caller has a role."}, []string{"budget", "bound"}),
		leaks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "keyward_apikey_leak_reports_total",
			Help: "Reports of strings found where they should not be, by where they came from (scanner: the secret scanners' intake; api: APIKeyService.ReportLeak) and what they were (stopped: a key's secret, the key stopped; already_stopped: a key's secret, the key stopped before; false_positive: no key's)."}, []string{"via", "result"}),
	}
	for _, budget := range RefusalBudgets {
		m.refusals.WithLabelValues(budget, "true")
		m.refusals.WithLabelValues(budget, "false")
	}
	for _, op := range HSMOps {
		m.hsmErrs.WithLabelValues(op) // present from the start, at 0
	}
	for _, via := range []string{"scanner", "api"} {
		for _, result := range []string{"stopped", "already_stopped", "false_positive"} {
			m.leaks.WithLabelValues(via, result)
		}
	}
	for _, kind := range []string{"spike", "new_network", "new_country"} {
		m.anomaly.WithLabelValues(kind, "true")
		m.anomaly.WithLabelValues(kind, "false")
	}
	m.reg.MustRegister(m.anomaly, m.hsmTime, m.hsmErrs, m.refusals, m.leaks)
	m.reg.MustRegister(m.calls, m.latency, m.verifies, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, c := range state {
		m.reg.MustRegister(c)
	}
	return m
}

// op is the label of an operation: one of the RPCs, or "other".
func (m *Metrics) op(op string) string {
	if _, ok := slices.BinarySearch(m.ops, op); ok {
		return op
	}
	return "other"
}

// Call records a finished call.
func (m *Metrics) Call(op, code string, took time.Duration) {
	if m == nil {
		return
	}
	op = m.op(op)
	m.calls.WithLabelValues(op, code).Inc()
	m.latency.WithLabelValues(op).Observe(took.Seconds())
}

// Verified records an API key verification's result.
func (m *Metrics) Verified(result string) {
	if m == nil {
		return
	}
	m.verifies.WithLabelValues(result).Inc()
}

// Anomaly records an API key anomaly.
func (m *Metrics) Anomaly(kind string, disabled bool) {
	if m == nil {
		return
	}
	m.anomaly.WithLabelValues(kind, map[bool]string{true: "true", false: "false"}[disabled]).Inc()
}

// Leak records a report of a leaked string, via "scanner" or "api": a
// key's secret or not, and whether the report stopped the key.
func (m *Metrics) Leak(via string, truePositive, changed bool) {
	if m == nil {
		return
	}
	result := "false_positive"
	switch {
	case truePositive && changed:
		result = "stopped"
	case truePositive:
		result = "already_stopped"
	}
	m.leaks.WithLabelValues(via, result).Inc()
}

// RefusalBudgets are the parts of a caller's budget a refusal is counted
// under.
var RefusalBudgets = []string{"calls", "connections", "hashing", "rate", "refusals"}

// Refused records a connection or call refused for its caller's budget.
func (m *Metrics) Refused(budget string, bound bool) {
	if m == nil || !slices.Contains(RefusalBudgets, budget) {
		return
	}
	m.refusals.WithLabelValues(budget, map[bool]string{true: "true", false: "false"}[bound]).Inc()
}

// HSMOps are the HSM operations measured; others count as "other".
var HSMOps = []string{"decrypt", "encrypt", "hmac", "other", "random", "sign"}

// HSM records an HSM operation.
func (m *Metrics) HSM(op string, took time.Duration, err error) {
	if m == nil {
		return
	}
	if !slices.Contains(HSMOps, op) {
		op = "other"
	}
	m.hsmTime.WithLabelValues(op).Observe(took.Seconds())
	if err != nil {
		m.hsmErrs.WithLabelValues(op).Inc()
	}
}

// Handler serves the metrics in Prometheus's text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// GaugeFunc is a collector of gauges whose values are read at each scrape:
// fn returns one value per label value.
type GaugeFunc struct {
	desc *prometheus.Desc
	fn   func() map[string]float64
	typ  prometheus.ValueType
}

// NewGaugeFunc describes a gauge with one label.
func NewGaugeFunc(name, help, label string, fn func() map[string]float64) *GaugeFunc {
	return &GaugeFunc{desc: prometheus.NewDesc(name, help, []string{label}, nil), fn: fn, typ: prometheus.GaugeValue}
}

// NewCounterVecFunc describes a counter with one label whose values are
// read at each scrape (fn's counts only ever grow while keywardd runs).
func NewCounterVecFunc(name, help, label string, fn func() map[string]float64) *GaugeFunc {
	return &GaugeFunc{desc: prometheus.NewDesc(name, help, []string{label}, nil), fn: fn, typ: prometheus.CounterValue}
}

// NewValueFunc is a gauge without labels, read at each scrape.
func NewValueFunc(name, help string, fn func() float64) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, fn)
}

// NewCounterFunc is a counter without labels, read at each scrape.
func NewCounterFunc(name, help string, fn func() float64) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, fn)
}

// Describe implements prometheus.Collector.
func (g *GaugeFunc) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }

// Collect implements prometheus.Collector.
func (g *GaugeFunc) Collect(ch chan<- prometheus.Metric) {
	for k, v := range g.fn() {
		ch <- prometheus.MustNewConstMetric(g.desc, g.typ, v, k)
	}
}
