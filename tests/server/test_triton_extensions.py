"""The pure halves of the protocol extensions: Triton's model configuration and statistics bodies, the counters read
back from a real ServerMetrics registry, the repository index request, and the OpenAPI document against the app's
routes."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from prometheus_client import CollectorRegistry

from warmpod import __version__
from warmpod.server.app import ServerConfig, create_app
from warmpod.server.errors import BadRequest
from warmpod.server.metrics import Duration, ModelTotals, ServerMetrics, model_totals
from warmpod.server.openapi import document
from warmpod.server.tensors import DATATYPES, TensorSpec
from warmpod.server.v2 import (
    TRITON_TYPES,
    Scheduling,
    model_config,
    model_statistics,
    parse_repository_index_request,
    repository_entry,
)

pytestmark = pytest.mark.unit

SCHEDULING = Scheduling(max_batch_size=8, max_queue_delay_us=2000, max_queue_size=64, timeout_us=30_000_000,
                        instances=1)  # fmt: skip


def test_every_datatype_has_its_triton_type() -> None:
    assert set(TRITON_TYPES) == set(DATATYPES)
    assert TRITON_TYPES["BYTES"] == "TYPE_STRING"
    assert TRITON_TYPES["FP32"] == "TYPE_FP32" and TRITON_TYPES["UINT8"] == "TYPE_UINT8"
    assert TRITON_TYPES["BOOL"] == "TYPE_BOOL"


def test_config_dims_leave_out_the_batch_dimension() -> None:
    inputs = [TensorSpec("text", "BYTES", (-1,)), TensorSpec("x", "INT64", (-1, -1))]
    outputs = [TensorSpec("embedding", "FP16", (-1, 384))]
    config = model_config("m", "warmpod_bert", inputs, outputs, SCHEDULING)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("text", "TYPE_STRING", []),
        ("x", "TYPE_INT64", [-1]),
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("embedding", "TYPE_FP16", [384])]
    assert (config["name"], config["platform"], config["backend"]) == ("m", "warmpod_bert", "warmpod")
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    assert config["instance_group"][0]["count"] == 1


def test_without_batching_dims_are_the_whole_shape() -> None:
    unbatched = Scheduling(max_batch_size=0, max_queue_delay_us=0, max_queue_size=1, timeout_us=1, instances=1)
    config = model_config("m", "p", [TensorSpec("x", "FP32", (-1, 4))], [], unbatched)
    assert config["input"][0]["dims"] == [-1, 4]


def totals_of(metrics: ServerMetrics, model: str = "m") -> ModelTotals:
    return model_totals(metrics.registry.collect(), model)


def test_totals_read_back_what_the_server_observes() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    assert totals_of(metrics) == ModelTotals(Duration(0, 0), Duration(0, 0), Duration(0, 0), Duration(0, 0), 0, {}, 0.0)
    for code, seconds in (("200", 0.5), ("200", 0.25), ("400", 0.125), ("503", 1.0), ("404", 8.0)):
        metrics.request_seconds.labels("m", "infer", code).observe(seconds)
    metrics.request_seconds.labels("m", "embeddings", "200").observe(0.25)
    metrics.request_seconds.labels("other", "infer", "200").observe(100)
    for wait in (0.01, 0.02, 0.03):
        metrics.queue_wait_seconds.labels("m").observe(wait)
    for rows, seconds in ((3, 0.5), (1, 0.25), (3, 0.25)):
        metrics.batch_size.labels("m").observe(rows)
        metrics.batch_seconds.labels("m").observe(seconds)
        metrics.observe_batch("m", rows, seconds)
    metrics.last_inference.labels("m").set(1234.5)

    totals = totals_of(metrics)
    assert totals.success == Duration(3, 1.0)
    assert totals.fail == Duration(2, 1.125)  # 400 and 503; a 404 named no model served here
    assert totals.queue == Duration(3, pytest.approx(0.06))
    assert totals.compute == Duration(3, 1.0)
    assert totals.rows == 7
    assert totals.batches == {1: Duration(1, 0.25), 3: Duration(2, 0.75)}
    assert list(totals.batches) == [1, 3]
    assert totals.last_inference_s == 1234.5
    assert totals_of(metrics, "other").success == Duration(1, 100)


def test_statistics_body() -> None:
    totals = ModelTotals(
        success=Duration(3, 1.5), fail=Duration(1, 0.001), queue=Duration(3, 0.003), compute=Duration(2, 0.75),
        rows=7, batches={2: Duration(1, 0.25), 5: Duration(1, 0.5)}, last_inference_s=1700000000.1234,
    )  # fmt: skip
    stats = model_statistics("m", "4", totals)
    assert (stats["name"], stats["version"]) == ("m", "4")
    assert stats["last_inference"] == 1700000000123
    assert (stats["inference_count"], stats["execution_count"]) == (7, 2)
    infer = stats["inference_stats"]
    assert infer["success"] == {"count": 3, "ns": 1_500_000_000}
    assert infer["fail"] == {"count": 1, "ns": 1_000_000}
    assert infer["queue"] == {"count": 3, "ns": 3_000_000}
    assert infer["compute_infer"] == {"count": 2, "ns": 750_000_000}
    assert infer["compute_input"] == infer["compute_output"] == {"count": 0, "ns": 0}
    assert [(b["batch_size"], b["compute_infer"]) for b in stats["batch_stats"]] == [
        (2, {"count": 1, "ns": 250_000_000}),
        (5, {"count": 1, "ns": 500_000_000}),
    ]


@pytest.mark.parametrize(("body", "ready"), [(b"", False), (b" \n", False), (b"{}", False),
                                             (b'{"ready": true}', True), (b'{"ready": false}', False)])  # fmt: skip
def test_repository_index_request(body: bytes, ready: bool) -> None:
    assert parse_repository_index_request(body) is ready


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "malformed JSON in the request: Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"null", 'the request body must be empty or a JSON object like {"ready": true}, got null'),
        (b'{"ready": 1}', "'ready' must be true or false, got 1"),
    ],
)
def test_repository_index_request_errors(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as excinfo:
        parse_repository_index_request(body)
    assert str(excinfo.value).startswith(message)


def test_repository_entry_leaves_out_an_unknown_version() -> None:
    assert repository_entry("m", None, "LOADING", "waiting") == {"name": "m", "state": "LOADING", "reason": "waiting"}
    assert repository_entry("m", "3", "READY") == {"name": "m", "version": "3", "state": "READY", "reason": ""}


def test_the_document_describes_every_route() -> None:
    """Every route of the app is documented with its methods, and nothing else is."""
    app = create_app(ServerConfig(model="m", store=Path("/nonexistent")))
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.resource is not None}
    doc = document(__version__)
    documented = {(path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"}
    assert documented == {(path, method) for path, method in routes if method != "head"}
    assert doc["info"]["version"] == __version__


def test_the_document_loads_in_schemathesis() -> None:
    """Every operation resolves (references, parameters, bodies)."""
    schema = schemathesis.openapi.from_dict(document(__version__))
    labels = [result.ok().label for result in schema.get_all_operations()]
    assert "GET /v2/models/{model}/config" in labels and "POST /v2/repository/index" in labels
    assert len(labels) == 21
