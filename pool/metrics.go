package pool

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	depth          *prometheus.GaugeVec
	acquire        *prometheus.HistogramVec
	hits           *prometheus.CounterVec
	misses         *prometheus.CounterVec
	evictions      *prometheus.CounterVec
	refillFailures *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		depth: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "ember", Subsystem: "pool", Name: "depth",
			Help: "Ready entries in the bucket.",
		}, []string{"bucket"}),
		acquire: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "ember", Subsystem: "pool", Name: "acquire_seconds",
			Help: "Time from an acquire request to the tenant's VM being ready, by the path that served it.",
			// 1 ms to about 33 s: warm hand-offs take milliseconds, cold
			// boots under software emulation take seconds.
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"bucket", "path"}),
		hits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ember", Subsystem: "pool", Name: "hits_total",
			Help: "Acquires served by a ready entry.",
		}, []string{"bucket"}),
		misses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ember", Subsystem: "pool", Name: "misses_total",
			Help: "Acquires that found no ready entry.",
		}, []string{"bucket"}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ember", Subsystem: "pool", Name: "evictions_total",
			Help: "Entries destroyed without being handed out, by reason.",
		}, []string{"bucket", "reason"}),
		refillFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "ember", Subsystem: "pool", Name: "refill_failures_total",
			Help: "Restores for the bucket that failed.",
		}, []string{"bucket"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.depth, m.acquire, m.hits, m.misses, m.evictions, m.refillFailures} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
