"""The server's Prometheus metrics, declared once on a registry passed in (tests use a fresh one).

Named for the autoscaler that reads them: latency per model and endpoint (the SLO signal), how long requests wait
in the batch queue (the saturation signal), batch sizes and forward time (the capacity estimate), in-flight and
queued requests, and rejections by reason; and the same per tenant (`warmpod_tenant_*`: requests by code, latency,
rejections by reason), with tenant names, never keys, as labels — at most TENANT_LABELS_MAX of them per process, later
ones counted as "other". The Wasm edge exports the same names. `model_totals` reads them back
for the V2 statistics extension (GET /v2/models/{m}/stats), so both report the same counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.metrics_core import Metric

# Latency SLOs of embedding/MLP models sit between a few ms and a few hundred ms: fine buckets there.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
TENANT_LABELS_MAX = 64  # distinct tenant label values per process; more tenants share OTHER_TENANT
OTHER_TENANT = "other"


class TenantLabels:
    """Tenant names as label values: the first `limit` distinct names as they are, every later one as "other", so
    a server with many certificate subjects or key-file tenants cannot grow /metrics without bound."""

    def __init__(self, limit: int = TENANT_LABELS_MAX) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self.seen:
            return tenant
        if len(self.seen) >= self.limit:
            return OTHER_TENANT
        self.seen.add(tenant)
        return tenant


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "warmpod_request_duration_seconds",
            "Inference request latency from arrival to response, by model, endpoint and HTTP status code",
            ["model", "endpoint", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "warmpod_queue_wait_seconds",
            "Time a request waited in the batch queue before its forward pass started",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "warmpod_batch_size",
            "Rows per forward pass (requests merged by the dynamic batcher)",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "warmpod_batch_duration_seconds",
            "Time of one batched forward pass (the service time)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_compute_seconds = Summary(
            "warmpod_batch_compute_duration_seconds",
            "Time of the forward passes of each batch size (rows): the per-batch-size statistics of /v2/models/stats",
            ["model", "batch_size"],
            registry=registry,
        )
        self.last_inference = Gauge(
            "warmpod_last_inference_timestamp_seconds",
            "When the last successful inference request was answered (Unix time)",
            ["model"],
            registry=registry,
        )
        self.inflight = Gauge(
            "warmpod_inflight_requests",
            "Inference requests being handled (queued or running)",
            ["model"],
            registry=registry,
        )
        self.queued = Gauge("warmpod_queue_depth", "Requests waiting in the batch queue", ["model"], registry=registry)
        self.rejected = Counter(
            "warmpod_requests_rejected",
            "Inference requests refused, by reason (queue_full, draining, not_ready, deadline, too_large, "
            "bad_request, not_found, unauthorized, rate_limited)",
            ["model", "reason"],
            registry=registry,
        )
        self.model_load_seconds = Histogram(
            "warmpod_model_load_seconds",
            "Time to map a staged version, build the model on it and run the warm-up forward",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.model_load_failures = Counter(
            "warmpod_model_load_failures", "Staged versions that could not be built into a model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.cold_start_seconds = Gauge(
            "warmpod_cold_start_seconds", "Process start to first ready, in seconds", ["model"], registry=registry
        )
        self.model_version = Gauge(
            "warmpod_model_version_info",
            "1 for the version being served (labels say which), 0 for versions served before",
            ["model", "version", "family"],
            registry=registry,
        )
        self.weights_info = Gauge(
            "warmpod_model_weights_info",
            "1 for the weights being served: their dtype in the store and the dtype computed in (they differ where "
            "bf16 weights are upcast to fp32 on a CPU without native bf16), 0 for versions served before",
            ["model", "version", "stored", "computed"],
            registry=registry,
        )
        self.private_weights_bytes = Gauge(
            "warmpod_model_private_weights_bytes",
            "Bytes of weights this process holds privately instead of sharing the store's mapping (the fp32 upcast "
            "of bf16 weights on a CPU without native bf16; 0 when served zero copy)",
            ["model"],
            registry=registry,
        )
        self.ready = Gauge("warmpod_ready", "1 when the server reports ready, else 0", registry=registry)
        self.workers = Gauge(
            "warmpod_workers", "Forward passes that may run at once (the capacity the busy fraction divides)",
            registry=registry,
        )  # fmt: skip
        self.scale_factor = Gauge(
            "warmpod_scale_factor",
            "This replica's demand / its capacity at the latency SLO (at least observed quantile / target), over the "
            "last window: averaged across pods, the factor by which to scale (HPA/KEDA target 1.0)",
            registry=registry,
        )

        self.tenant_label = TenantLabels()
        self.tenant_requests = Counter(
            "warmpod_tenant_requests",
            'Inference requests by tenant (the name the door gave it; "anonymous" without one), model and HTTP code',
            ["tenant", "model", "code"],
            registry=registry,
        )
        self.tenant_request_seconds = Histogram(
            "warmpod_tenant_request_duration_seconds",
            "Inference request latency from arrival to response, by tenant",
            ["tenant", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tenant_rejected = Counter(
            "warmpod_tenant_requests_rejected",
            "Inference requests refused, by tenant and reason (queue_full, rate_limited, unauthorized, deadline, ...)",
            ["tenant", "model", "reason"],
            registry=registry,
        )

    def observe_tenant(self, tenant: str, model: str, code: int, seconds: float, reason: str | None) -> None:
        """One inference request of `tenant` answered with `code` after `seconds` (`reason`: why it was refused)."""
        label = self.tenant_label(tenant)
        self.tenant_requests.labels(label, model, str(code)).inc()
        self.tenant_request_seconds.labels(label, model).observe(seconds)
        if reason:
            self.tenant_rejected.labels(label, model, reason).inc()

    def observe_batch(self, model: str, rows: int, seconds: float) -> None:
        """A forward pass of `rows` rows took `seconds` (per batch size: the statistics extension's batch_stats)."""
        self.batch_compute_seconds.labels(model, str(rows)).observe(seconds)


@dataclass(frozen=True)
class Duration:
    """How many times something happened and its total time."""

    count: int
    seconds: float


@dataclass(frozen=True)
class ModelTotals:
    """One model's counters as /metrics shows them, summed over labels: what the statistics extension reports."""

    success: Duration  # inference requests answered 2xx, with their latency
    fail: Duration  # answered with an error, except 404 (those named no model served here)
    queue: Duration  # requests (chunks) that left the batch queue for a forward pass, with their wait
    compute: Duration  # forward passes, with their time
    rows: int  # rows run through forward passes (Triton's inference_count)
    batches: dict[int, Duration]  # forward passes by batch size (rows)
    last_inference_s: float  # Unix time of the last success; 0 when none


def model_totals(families: Iterable[Metric], model: str) -> ModelTotals:
    """Sum the samples of `model` in `families` (a registry's collect()) into ModelTotals."""
    counts: dict[tuple[str, str], float] = {}  # (family, key) → its _count samples summed
    totals: dict[tuple[str, str], float] = {}  # (family, key) → its _sum samples (or a gauge's value) summed
    for family in families:
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            series = (family.name, _key(family.name, sample.labels))
            if sample.name == family.name + "_count":
                counts[series] = counts.get(series, 0.0) + sample.value
            elif sample.name in (family.name + "_sum", family.name):
                totals[series] = totals.get(series, 0.0) + sample.value

    def duration(family: str, key: str = "") -> Duration:
        return Duration(int(counts.get((family, key), 0)), totals.get((family, key), 0.0))

    batch = "warmpod_batch_compute_duration_seconds"
    return ModelTotals(
        success=duration("warmpod_request_duration_seconds", "success"),
        fail=duration("warmpod_request_duration_seconds", "fail"),
        queue=duration("warmpod_queue_wait_seconds"),
        compute=duration("warmpod_batch_duration_seconds"),
        rows=int(totals.get(("warmpod_batch_size", ""), 0)),
        batches={int(key): duration(batch, key) for key in sorted((k for f, k in counts if f == batch), key=int)},
        last_inference_s=totals.get(("warmpod_last_inference_timestamp_seconds", ""), 0.0),
    )


def _key(family: str, labels: dict[str, str]) -> str:
    """What model_totals tells apart within a family: request outcome, batch size."""
    if family == "warmpod_request_duration_seconds":
        code = labels["code"]
        return "success" if code.startswith("2") else "not_found" if code == "404" else "fail"
    if family == "warmpod_batch_compute_duration_seconds":
        return labels["batch_size"]
    return ""
