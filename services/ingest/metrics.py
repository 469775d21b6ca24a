"""The ingest service's Prometheus metrics: made once per registry by the app's lifespan and handed to every
source runner (the metric names are the ones deploy/grafana and deploy/prometheus query)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.ticks = Counter(
            "ingest_ticks_total", "Ticks published to the ticks stream, by source", ["source"], registry=registry
        )
        self.source_up = Gauge(
            "ingest_source_up",
            "1 while the source delivers (its websocket is open, or its last REST poll succeeded), else 0",
            ["source"],
            registry=registry,
        )
