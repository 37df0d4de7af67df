"""The built-in ``prometheus`` exporter: the metrics in Prometheus text at ``GET /metrics``.

Each scrape renders a fresh snapshot through prometheus-client's own exposition code, in
a registry of its own (so nothing else in the process leaks into rex's page). Counters
are ``rex_*_total``; everything else is a gauge.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from rexcore.monitoring.metrics import MetricsSnapshot
from rexcore.plugins.descriptors import ComponentContext, NoOptions

__all__ = ["METRICS", "PrometheusExporter", "create_prometheus_exporter"]

#: Snapshot field -> (metric name, kind, help). Counter names gain ``_total`` when exposed.
METRICS: dict[str, tuple[str, str, str]] = {
    "total_executions": ("rex_executions", "counter",
                         "Executions that ran on a worker and ended"),
    "successful_executions": ("rex_successful_executions", "counter",
                              "Executions that ended with exit code 0"),
    "failed_executions": ("rex_failed_executions", "counter",
                          "Executions that did not end with exit code 0"),
    "cache_hits": ("rex_cache_hits", "counter", "Submissions answered from the action cache"),
    "cache_lookups": ("rex_cache_lookups", "counter", "Action cache lookups of submissions"),
    "cache_hit_rate": ("rex_cache_hit_rate", "gauge", "cache_hits / cache_lookups"),
    "queue_depth": ("rex_queue_depth", "gauge", "Operations waiting for a worker"),
    "executing": ("rex_executing_operations", "gauge", "Operations running on a worker"),
    "active_workers": ("rex_active_workers", "gauge", "Workers joined to the coordinator"),
    "idle_workers": ("rex_idle_workers", "gauge", "Joined workers running no action"),
    "busy_workers": ("rex_busy_workers", "gauge", "Joined workers running an action"),
    "worker_utilisation": ("rex_worker_utilisation", "gauge",
                           "busy_workers / active_workers"),
    "starting_workers": ("rex_starting_workers", "gauge",
                         "Pool workers asked for and not joined yet"),
    "draining_workers": ("rex_draining_workers", "gauge",
                         "Pool workers finishing their actions before they stop"),
    "failed_workers": ("rex_failed_workers", "gauge",
                       "Pool workers that failed since the pool started"),
    "desired_workers": ("rex_desired_workers", "gauge", "Workers the pool is sizing towards"),
    "uptime_s": ("rex_uptime_seconds", "gauge", "Seconds since rexd started"),
}


class _SnapshotCollector:
    """A prometheus-client collector over the snapshot last exported."""

    def __init__(self) -> None:
        self.snapshot = MetricsSnapshot()

    def collect(self) -> Iterator[Metric]:
        values = self.snapshot.as_dict()
        for field, (name, kind, text) in METRICS.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, text, value=values[field])


class PrometheusExporter:
    """Serves the snapshot last exported at ``GET /metrics`` of the native HTTP API."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self._collector = _SnapshotCollector()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)  # type: ignore[arg-type]

    def export(self, snapshot: MetricsSnapshot) -> None:
        self._collector.snapshot = snapshot

    def render(self) -> bytes:
        return generate_latest(self._registry)

    async def close(self) -> None:
        return None


def create_prometheus_exporter(
    options: NoOptions, context: ComponentContext
) -> PrometheusExporter:
    """The ``prometheus`` descriptor's factory."""
    del options, context
    return PrometheusExporter()

