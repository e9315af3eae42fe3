"""The server's Prometheus metrics, declared once on a registry passed in (tests use a fresh one).

Named for the autoscaler that reads them: latency per model and endpoint (the SLO signal), how long requests wait
in the batch queue (the saturation signal), batch sizes and forward time (the capacity estimate), in-flight and
queued requests, and rejections by reason. The Wasm edge exports the same names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency SLOs of embedding/MLP models sit between a few ms and a few hundred ms: fine buckets there.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


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
            "bad_request, not_found)",
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
