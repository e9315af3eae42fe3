"""The sidecar's Prometheus metrics, declared once on a registry passed in (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Loads range from a few MiB (0.05 s) to tens of GiB over a slow link (10 min).
LOAD_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class LoaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.bytes = Counter("warmpod_loader_bytes", "Bytes written into the store by loads", registry=registry)
        self.load_seconds = Histogram(
            "warmpod_loader_load_duration_seconds",
            "Wall time of loads that published a new version",
            buckets=LOAD_SECONDS_BUCKETS,
            registry=registry,
        )
        self.throughput = Gauge(
            "warmpod_loader_throughput_bytes_per_second",
            "Throughput of the last load that copied bytes",
            registry=registry,
        )
        self.retries = Counter(
            "warmpod_loader_retries", "Range requests retried after a transient failure", registry=registry
        )
        self.errors = Counter(
            "warmpod_loader_errors", "Loads that failed, by kind of failure", ["kind"], registry=registry
        )
        self.published = Counter(
            "warmpod_loader_published_versions", "Versions published by this process", registry=registry
        )
        self.current = Info("warmpod_loader_current_version", "The version `current` points to", registry=registry)
