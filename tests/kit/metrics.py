"""A server's /metrics, read (Scrape: one GET parsed by prometheus_client) and written by hand (MetricsPage: what a
real server writes, for the autoscaler's and the supervisor's fakes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.clients import http
from warmpod.server.metrics import ServerMetrics


class Scrape:
    """One GET /metrics, parsed by prometheus_client: families by name, sample values by name and labels."""

    def __init__(self, url: str) -> None:
        status, headers, body = http("GET", url + "/metrics", timeout=5)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels` (0 when there is none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def buckets(self, family: str, **labels: str) -> dict[float, float]:
        """le → cumulative count of one histogram series."""
        return {
            float(s.labels["le"]): s.value
            for s in self.samples
            if s.name == family + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
        }


class MetricsPage:
    """A server's /metrics as the real server writes it (ServerMetrics on a fresh registry, rendered by
    generate_latest), with the requests and forward passes it served recorded by hand."""

    def __init__(self, model: str, workers: int) -> None:
        self.model = model
        self.metrics = ServerMetrics(CollectorRegistry())
        self.metrics.workers.set(workers)

    def serve(self, requests: int, latency_s: float, *, batches: int = 0, batch_s: float = 0.0,
              code: str = "200") -> MetricsPage:  # fmt: skip
        """`requests` inference requests answered `code` in `latency_s` each, and `batches` forward passes of
        `batch_s` each."""
        for _ in range(requests):
            self.metrics.request_seconds.labels(self.model, "infer", code).observe(latency_s)
        for _ in range(batches):
            self.metrics.batch_seconds.labels(self.model).observe(batch_s)
        return self

    def text(self) -> str:
        return generate_latest(self.metrics.registry).decode()
