package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/plugins/host"
)

// gauges are the metrics read from keywardd's parts when they are scraped,
// beside those its calls count (daemon/metrics).
func (d *daemonParts) gauges() []prometheus.Collector {
	return []prometheus.Collector{
		metrics.NewCounterFunc("keyward_apikey_anomaly_alerts_dropped_total", "Anomaly alerts lost because more than 1024 were waiting to be handled.", func() float64 {
			if d.det == nil {
				return 0
			}
			return float64(d.det.Dropped())
		}),
		metrics.NewCounterFunc("keyward_apikey_anomaly_read_errors_total", "API key uses not watched because the key's stored baseline could not be read.", func() float64 {
			if d.det == nil {
				return 0
			}
			return float64(d.det.ReadErrors())
		}),
		metrics.NewValueFunc("keyward_rate_limit_factor", "How API keys' rate limits are scaled now: 1, or dynamic_limits.tighten while keywardd is overloaded.", func() float64 {
			if d.gov == nil {
				return 1
			}
			return d.gov.Gauge()
		}),
		metrics.NewValueFunc("keyward_geoip_build_timestamp_seconds", "When the GeoIP database in use was built (Unix time; 0: none): a stale one, or nodes of a fleet with different ones.", func() float64 {
			if d.geo == nil {
				return 0
			}
			return float64(d.geo.Built().Unix())
		}),
		metrics.NewGaugeFunc("keyward_limit_windows", "API keys' limit windows, pending and active.", "state", func() map[string]float64 {
			out := map[string]float64{"pending": 0, "active": 0}
			if d.lw != nil {
				for state, n := range d.lw.Count() {
					out[state] = float64(n)
				}
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_rotations_overdue", "Keys, API keys and credentials past their rotation date by more than two checks.", "kind", func() map[string]float64 {
			out := map[string]float64{}
			for k, n := range d.sched.Overdue() {
				out[string(k)] = float64(n)
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_key_version_age_seconds", "Age of each key's newest version: compare with its rotation period.", "key", func() map[string]float64 {
			out := map[string]float64{}
			all, _ := d.km.List()
			for _, k := range all {
				if n := len(k.Versions); n > 0 {
					out[k.Name] = d.o.Now().Sub(k.Versions[n-1].Created).Seconds()
				}
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_plugin_up", "1 while a plugin runs, 0 while it starts, restarts or is refused.", "plugin", func() map[string]float64 {
			out := map[string]float64{}
			for _, p := range d.plugins {
				st := p.Status()
				out[st.Name] = map[bool]float64{true: 1, false: 0}[st.State == host.Running]
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_plugin_events_pending", "Revocation events waiting to be delivered to a plugin.", "plugin", func() map[string]float64 {
			out := map[string]float64{}
			for name, st := range d.ob.Status() {
				out[name] = float64(st.Pending)
			}
			return out
		}),
	}
}
