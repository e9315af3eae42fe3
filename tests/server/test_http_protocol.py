"""The V2 protocol end to end over real HTTP: tritonclient.http and plain requests against `warmpod serve` in a
subprocess, every bad input answered with a JSON error, /metrics read with prometheus_client's parser, and many
concurrent clients each getting exactly their own rows back from merged batches."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aio_httpclient
from tritonclient.utils import InferenceServerException

from tests.kit.clients import http, open_triton, post_json
from tests.kit.metrics import Scrape
from tests.kit.models import mlp_reference, write_mlp
from tests.kit.warmpod import WarmpodServer, stage

LABELS = ["cat", "dog", "eel"]
INFER = "/v2/models/mlp/infer"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http_protocol")


@pytest.fixture(scope="module")
def mlp_src(workdir: Path) -> Path:
    """A 4 → 16 → 3 classifier with softmax and labels, staged once into the store all three servers read."""
    src = write_mlp(workdir / "src", sizes=(4, 16, 3), seed=3, labels=LABELS, output_activation="softmax")
    stage(src, workdir / "store", "mlp")
    return src


@pytest.fixture(scope="module")
def server(workdir: Path, mlp_src: Path) -> Iterator[WarmpodServer]:
    with WarmpodServer(workdir / "store", "mlp", log_dir=workdir) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_body_server(workdir: Path, mlp_src: Path) -> Iterator[WarmpodServer]:
    with WarmpodServer(workdir / "store", "mlp", "--max-body-bytes", "4KiB", log_dir=workdir) as srv:
        yield srv


@pytest.fixture(scope="module")
def batching_server(workdir: Path, mlp_src: Path) -> Iterator[WarmpodServer]:
    """A long batch window, so that concurrent requests certainly share forward passes."""
    args = ("--max-batch-delay-ms", "20", "--max-batch-size", "64")
    with WarmpodServer(workdir / "store", "mlp", *args, log_dir=workdir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: WarmpodServer) -> Iterator[httpclient.InferenceServerClient]:
    with open_triton(server.host_port) as triton:
        yield triton


def infer_body(x: np.ndarray | list[Any], **extra: Any) -> dict[str, Any]:
    rows = np.asarray(x, dtype=np.float32)
    inputs = [{"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.tolist()}]
    return {"inputs": inputs, **extra}


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def assert_outputs_match(src: Path, x: np.ndarray, logits: Any, probabilities: Any, labels: list[str]) -> None:
    """The numpy reference's logits, their softmax and the argmax labels, row for row."""
    want = mlp_reference(src, x)
    np.testing.assert_allclose(logits, want, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(want), atol=1e-5)
    assert labels == [LABELS[i] for i in want.argmax(axis=-1)]


def assert_matches_reference(src: Path, x: np.ndarray, body: dict[str, Any]) -> None:
    """A JSON V2 response holds the reference outputs of `x`, with the shapes and datatypes the model declares."""
    out = outputs_by_name(body)
    assert [(o["datatype"], o["shape"]) for o in out.values()] == [("FP32", [len(x), 3])] * 2 + [("BYTES", [len(x)])]
    shape = (len(x), 3)
    logits, probabilities = (np.reshape(out[name]["data"], shape) for name in ("logits", "probabilities"))
    assert_outputs_match(src, x, logits, probabilities, out["label"]["data"])


# ------------------------------------------------------------------------------------------ tritonclient.http


def test_tritonclient_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("nope")

    meta = client.get_server_metadata()
    assert meta["name"] == "warmpod"
    assert "binary_tensor_data" in meta["extensions"]

    model = client.get_model_metadata("mlp")
    assert model["name"] == "mlp" and model["versions"] == ["1"] and model["platform"] == "warmpod_mlp"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert model["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert client.get_model_metadata("mlp", "1") == model


@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
def test_tritonclient_infer(
    client: httpclient.InferenceServerClient, mlp_src: Path, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(11).standard_normal((3, 4)).astype(np.float32)
    infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x, binary_data=binary_in)
    names = ("logits", "probabilities", "label")
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in names]
    request_id = f"req-{binary_in}-{binary_out}"

    result = client.infer("mlp", [infer_input], outputs=requested, request_id=request_id)

    response = result.get_response()
    assert response["id"] == request_id
    assert response["model_name"] == "mlp" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == list(names)
    for output in response["outputs"]:  # each output travels the way it was asked for
        assert ("data" in output) is not binary_out
        assert ("binary_data_size" in output.get("parameters", {})) is binary_out
    want = mlp_reference(mlp_src, x)
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (3, 3)
    np.testing.assert_allclose(logits, want, atol=1e-5)
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, softmax(want), atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    labels = result.as_numpy("label")
    assert labels.shape == (3,)
    expected = [LABELS[i] for i in want.argmax(axis=-1)]
    if binary_out:  # the binary extension carries BYTES as raw bytes; JSON carries them as strings
        assert labels.tolist() == [label.encode() for label in expected]
    else:
        assert labels.tolist() == expected


def test_tritonclient_output_selection_and_versions(client: httpclient.InferenceServerClient, mlp_src: Path) -> None:
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    infer_input = httpclient.InferInput("input", [1, 4], "FP32")
    infer_input.set_data_from_numpy(x, binary_data=True)
    want_label = LABELS[int(mlp_reference(mlp_src, x).argmax())]

    only_label = [httpclient.InferRequestedOutput("label", binary_data=False)]
    result = client.infer("mlp", [infer_input], outputs=only_label, model_version="1")
    response = result.get_response()
    assert response["model_version"] == "1"
    assert response["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [1], "data": [want_label]}]
    assert result.as_numpy("logits") is None

    # No outputs asked for: tritonclient sets binary_data_output, and every output comes back, binary.
    response = client.infer("mlp", [infer_input]).get_response()
    assert [o["name"] for o in response["outputs"]] == ["logits", "probabilities", "label"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])

    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("mlp", [infer_input], model_version="7")
    assert excinfo.value.status() == "404"
    assert "no version '7'" in excinfo.value.message() and "served version is 1" in excinfo.value.message()

    with pytest.raises(InferenceServerException) as excinfo:
        client.get_model_metadata("nope")
    assert excinfo.value.status() == "404" and "unknown model 'nope'" in excinfo.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(
    client: httpclient.InferenceServerClient, mlp_src: Path, algorithm: str
) -> None:
    x = np.random.default_rng(13).standard_normal((2, 4)).astype(np.float32)
    infer_input = httpclient.InferInput("input", [2, 4], "FP32")
    infer_input.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "mlp", [infer_input], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
    )
    labels = [label.decode() for label in result.as_numpy("label").tolist()]
    assert_outputs_match(mlp_src, x, result.as_numpy("logits"), result.as_numpy("probabilities"), labels)


# ------------------------------------------------------------------------------------------ plain HTTP


def get_json(url: str) -> tuple[int, Any]:
    status, headers, body = http("GET", url)
    assert headers["Content-Type"].startswith("application/json"), (status, body)
    return status, json.loads(body)


def test_plain_http_metadata_and_readiness_routes(server: WarmpodServer) -> None:
    assert get_json(server.url + "/v2/health/live") == (200, {"live": True})
    assert get_json(server.url + "/v2/health/ready") == (200, {"ready": True})
    status, meta = get_json(server.url + "/v2")
    assert status == 200 and meta["name"] == "warmpod" and "binary_tensor_data" in meta["extensions"]
    status, model = get_json(server.url + "/v2/models/mlp")
    assert status == 200 and model["name"] == "mlp" and model["versions"] == ["1"]
    assert [i["name"] for i in model["inputs"]] == ["input"]
    assert [o["name"] for o in model["outputs"]] == ["logits", "probabilities", "label"]
    assert get_json(server.url + "/v2/models/mlp/versions/1") == (200, model)
    assert get_json(server.url + "/v2/models/mlp/ready") == (200, {"name": "mlp", "ready": True})
    assert get_json(server.url + "/v2/models/mlp/versions/1/ready") == (200, {"name": "mlp", "ready": True})


def test_nested_and_flat_data_are_both_accepted(server: WarmpodServer, mlp_src: Path) -> None:
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    nested = infer_body(x, id="nested")
    flat = infer_body(x, id="flat")
    flat["inputs"][0]["data"] = x.reshape(-1).tolist()
    status, body_nested = post_json(server.url + INFER, nested)
    assert status == 200, body_nested
    status, body_flat = post_json(server.url + "/v2/models/mlp/versions/1/infer", flat)
    assert status == 200, body_flat
    assert body_nested["id"] == "nested" and body_flat["id"] == "flat"
    assert body_nested["model_version"] == body_flat["model_version"] == "1"
    assert body_nested["outputs"] == body_flat["outputs"]
    assert_matches_reference(mlp_src, x, body_flat)
    # JSON integers are fine for FP32.
    status, body = post_json(server.url + INFER, {"inputs": [{**nested["inputs"][0], "data": [[1, 2, 3, 4]] * 2}]})
    assert status == 200, body
    assert_matches_reference(mlp_src, np.array([[1, 2, 3, 4]] * 2, dtype=np.float32), body)


# ------------------------------------------------------------------------------------------ bad inputs


def tensor(name: str = "input", datatype: str = "FP32", shape: list[int] | None = None, data: Any = None) -> Any:
    """One JSON input tensor, by default a valid [1, 4] FP32 row."""
    data = [[1, 2, 3, 4]] if data is None else data
    return {"name": name, "datatype": datatype, "shape": shape or [1, 4], "data": data}


def binary_request(size_declared: int, tail: bytes, header_length: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A body as the binary extension sends it: JSON header, then raw tensor bytes."""
    header = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                     "parameters": {"binary_data_size": size_declared}}]}
    ).encode()  # fmt: skip
    length = str(len(header)) if header_length is None else header_length
    return header + tail, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length}


FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()

# (method, path, body, headers, status, fragments every error message must contain)
BAD_REQUESTS: dict[str, tuple[str, str, bytes | None, dict[str, str], int, list[str]]] = {
    "malformed-json": ("POST", INFER, b'{"inputs": [', JSON, 400, ["malformed JSON", "line 1 column 13"]),
    "empty-body": ("POST", INFER, b"", JSON, 400, ["malformed JSON"]),
    "body-not-an-object": ("POST", INFER, b"[1, 2]", JSON, 400, ["must be a JSON object", "got a list"]),
    "missing-inputs": ("POST", INFER, b'{"id": "x"}', JSON, 400, ["no 'inputs'"]),
    "unknown-input": (
        "POST", INFER, json.dumps({"inputs": [tensor("pixels")]}).encode(), JSON, 400,
        ["no input named 'pixels'", "['input']"],
    ),
    "wrong-datatype": (
        "POST", INFER, json.dumps({"inputs": [tensor(datatype="INT32")]}).encode(), JSON, 400,
        ["datatype INT32 is not the model's FP32"],
    ),
    "strings-for-fp32": (
        "POST", INFER, json.dumps({"inputs": [tensor(data=[["a", "b", "c", "d"]])]}).encode(), JSON, 400,
        ["FP32 data must be numbers", '"a"'],
    ),
    "shape-vs-data-length": (
        "POST", INFER, json.dumps({"inputs": [tensor(shape=[2, 4], data=[1, 2, 3, 4])]}).encode(), JSON, 400,
        ["'data' has 4 elements but shape [2, 4] needs 8"],
    ),
    "shape-vs-model": (
        "POST", INFER, json.dumps({"inputs": [tensor(shape=[1, 5], data=[[1, 2, 3, 4, 5]])]}).encode(), JSON, 400,
        ["shape [1, 5] does not match the model's [-1, 4]"],
    ),
    "unknown-output": (
        "POST", INFER, json.dumps({"inputs": [tensor()], "outputs": [{"name": "scores"}]}).encode(), JSON, 400,
        ["unknown output 'scores'", "logits, probabilities, label"],
    ),
    "unknown-model-infer": (
        "POST", "/v2/models/nope/infer", json.dumps({"inputs": [tensor()]}).encode(), JSON, 404,
        ["unknown model 'nope'", "serves 'mlp'"],
    ),
    "unknown-model-metadata": ("GET", "/v2/models/nope", None, {}, 404, ["unknown model 'nope'"]),
    "unknown-model-ready": ("GET", "/v2/models/nope/ready", None, {}, 404, ["unknown model 'nope'"]),
    "unknown-version-infer": (
        "POST", "/v2/models/mlp/versions/7/infer", json.dumps({"inputs": [tensor()]}).encode(), JSON, 404,
        ["no version '7'", "served version is 1"],
    ),
    "unknown-version-metadata": ("GET", "/v2/models/mlp/versions/7", None, {}, 404, ["no version '7'"]),
    "unknown-version-ready": ("GET", "/v2/models/mlp/versions/7/ready", None, {}, 404, ["no version '7'"]),
    "header-length-beyond-body": (
        "POST", INFER, *binary_request(16, FOUR_FLOATS, header_length="99999"), 400,
        ["Inference-Header-Content-Length is 99999 but the body has only"],
    ),
    "header-length-not-a-number": (
        "POST", INFER, *binary_request(16, FOUR_FLOATS, header_length="12abc"), 400,
        ["Inference-Header-Content-Length must be a non-negative integer", "'12abc'"],
    ),
    "binary-sizes-vs-tail": (
        "POST", INFER, *binary_request(16, FOUR_FLOATS[:12]), 400,
        ["expected 16 bytes after the JSON header", "got 12 bytes"],
    ),
    "binary-size-vs-shape": (
        "POST", INFER, *binary_request(12, FOUR_FLOATS[:12]), 400,
        ["binary_data_size is 12 bytes but shape [1, 4] of FP32 takes 4 * 4 = 16 bytes"],
    ),
    "unknown-route": ("GET", "/v2/nothing/here", None, {}, 404, ["no route GET /v2/nothing/here"]),
    "get-on-infer": ("GET", INFER, None, {}, 405, ["method GET is not allowed", "use POST"]),
}  # fmt: skip


def send(server: WarmpodServer, case: str) -> tuple[int, dict[str, str], bytes]:
    method, path, body, headers, _, _ = BAD_REQUESTS[case]
    return http(method, server.url + path, body, headers)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_naming_the_problem(server: WarmpodServer, case: str) -> None:
    status, headers, body = send(server, case)
    want_status, fragments = BAD_REQUESTS[case][4:]
    assert status == want_status, body
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(body)
    assert list(payload) == ["error"] and isinstance(payload["error"], str)
    for fragment in fragments:
        assert fragment in payload["error"]
    assert server.proc is not None and server.proc.poll() is None


def test_405_says_which_method_the_route_takes(server: WarmpodServer) -> None:
    status, headers, body = send(server, "get-on-infer")
    assert status == 405
    assert headers.get("Allow") == "POST"
    assert "POST" in json.loads(body)["error"]


def test_binary_data_without_the_header_length_names_the_header(server: WarmpodServer) -> None:
    body, headers = binary_request(16, FOUR_FLOATS)
    del headers["Inference-Header-Content-Length"]
    status, _, answer = http("POST", server.url + INFER, body, headers)
    assert status == 400
    assert "needs the Inference-Header-Content-Length header" in json.loads(answer)["error"]


def test_embeddings_on_a_model_that_takes_no_text_is_a_400(server: WarmpodServer) -> None:
    status, _, body = http(
        "POST", server.url + "/v1/embeddings", json.dumps({"model": "mlp", "input": "hi"}).encode(), JSON
    )
    assert status == 400
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert "model 'mlp' (mlp) does not take text" in error["message"]


def test_body_over_the_limit_gets_413_and_one_under_it_is_served(small_body_server: WarmpodServer) -> None:
    url = small_body_server.url + INFER
    under = json.dumps(infer_body([[1, 2, 3, 4]])).encode()
    under += b" " * (4096 - len(under))  # exactly at the limit: trailing JSON whitespace
    status, _, body = http("POST", url, under, JSON)
    assert status == 200, body
    over = under + b" "
    status, headers, body = http("POST", url, over, JSON)
    assert status == 413
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(body)
    assert list(payload) == ["error"]
    assert "larger than the server's limit of 4096 bytes" in payload["error"]
    assert "--max-body-bytes" in payload["error"]
    # tritonclient sees the 413 with the message, and its kept-alive client goes on working.
    triton = httpclient.InferenceServerClient(url=small_body_server.host_port, network_timeout=30)
    try:
        big = httpclient.InferInput("input", [300, 4], "FP32")
        big.set_data_from_numpy(np.ones((300, 4), np.float32), binary_data=True)
        with pytest.raises(InferenceServerException) as excinfo:
            triton.infer("mlp", [big])
        assert excinfo.value.status() == "413" and "larger than the server's limit" in excinfo.value.message()
        small = httpclient.InferInput("input", [1, 4], "FP32")
        small.set_data_from_numpy(np.ones((1, 4), np.float32), binary_data=True)
        assert triton.infer("mlp", [small]).as_numpy("logits").shape == (1, 3)
    finally:
        triton.close()
    metrics = Scrape(small_body_server.url)
    assert metrics.value("warmpod_requests_rejected_total", model="mlp", reason="too_large") == 2
    assert metrics.value("warmpod_request_duration_seconds_count", model="mlp", endpoint="infer", code="413") == 2


def test_still_serves_after_every_bad_request(server: WarmpodServer, mlp_src: Path) -> None:
    x = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    for case in BAD_REQUESTS:
        assert send(server, case)[0] == BAD_REQUESTS[case][4]
        status, body = post_json(server.url + INFER, infer_body(x))
        assert status == 200, (case, body)
        assert_matches_reference(mlp_src, x, body)
    assert server.ready()


# ------------------------------------------------------------------------------------------ /metrics


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return (after.value(name, **labels) or 0.0) - (before.value(name, **labels) or 0.0)


def test_metrics_count_requests_batches_and_rejections(server: WarmpodServer) -> None:
    rng = np.random.default_rng(21)
    n_ok, n_bad, n_missing = 6, 3, 2
    before = Scrape(server.url)
    rows = 0
    for i in range(n_ok):
        x = rng.standard_normal((1 + i % 3, 4))
        rows += len(x)
        assert post_json(server.url + INFER, infer_body(x))[0] == 200
    for _ in range(n_bad):
        assert post_json(server.url + INFER, {"id": "no inputs"})[0] == 400
    for _ in range(n_missing):
        assert post_json(server.url + "/v2/models/nope/infer", infer_body([[1, 2, 3, 4]]))[0] == 404
    after = Scrape(server.url)

    types = {name: f.type for name, f in after.families.items()}
    assert types["warmpod_request_duration_seconds"] == "histogram"
    assert types["warmpod_batch_size"] == "histogram"
    assert types["warmpod_queue_wait_seconds"] == "histogram"
    assert types["warmpod_batch_duration_seconds"] == "histogram"
    assert types["warmpod_model_load_seconds"] == "histogram"
    assert types["warmpod_requests_rejected"] == "counter"
    assert types["warmpod_inflight_requests"] == "gauge"
    assert types["warmpod_queue_depth"] == "gauge"
    assert types["warmpod_cold_start_seconds"] == "gauge"
    assert types["warmpod_model_version_info"] == "gauge"
    assert types["warmpod_ready"] == "gauge"

    mlp, ok = {"model": "mlp"}, {"model": "mlp", "endpoint": "infer", "code": "200"}
    assert delta(after, before, "warmpod_request_duration_seconds_count", **ok) == n_ok
    assert delta(after, before, "warmpod_request_duration_seconds_count", **{**ok, "code": "400"}) == n_bad
    assert delta(after, before, "warmpod_request_duration_seconds_count", **{**ok, "code": "404"}) == n_missing
    assert delta(after, before, "warmpod_requests_rejected_total", model="mlp", reason="bad_request") == n_bad
    assert delta(after, before, "warmpod_requests_rejected_total", model="mlp", reason="not_found") == n_missing
    # Sequential requests never share a batch, and bad ones never reach the batcher.
    assert delta(after, before, "warmpod_batch_size_count", **mlp) == n_ok
    assert delta(after, before, "warmpod_batch_size_sum", **mlp) == rows
    assert delta(after, before, "warmpod_queue_wait_seconds_count", **mlp) == n_ok
    assert delta(after, before, "warmpod_batch_duration_seconds_count", **mlp) == n_ok
    assert (after.value("warmpod_batch_duration_seconds_sum", **mlp) or 0) > 0

    # Explicit buckets, cumulative, +Inf equal to the count.
    latency = after.buckets("warmpod_request_duration_seconds", **ok)
    assert {0.001, 0.005, 0.1, 1.0, 10.0, float("inf")} <= set(latency)
    counts = [latency[le] for le in sorted(latency)]
    assert counts == sorted(counts)
    assert latency[float("inf")] == after.value("warmpod_request_duration_seconds_count", **ok)
    assert set(after.buckets("warmpod_batch_size", **mlp)) == {1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")}

    assert (after.value("warmpod_cold_start_seconds", **mlp) or 0) > 0
    assert after.value("warmpod_model_version_info", model="mlp", version="1", family="mlp") == 1
    assert after.value("warmpod_model_load_seconds_count", **mlp) == 1
    assert after.value("warmpod_model_load_failures_total", **mlp) in (None, 0)
    assert after.value("warmpod_inflight_requests", **mlp) == 0
    assert after.value("warmpod_queue_depth", **mlp) == 0
    assert after.value("warmpod_ready") == 1


# ------------------------------------------------------------------------------------------ batching demux

CLIENTS, REQUESTS_PER_CLIENT = 16, 10


def random_rows(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)


async def json_client(session: aiohttp.ClientSession, url: str, src: Path, client_id: int) -> list[str]:
    """A plain JSON client: distinct random inputs of 1 to 3 rows, each answer checked against its own input."""
    rng = np.random.default_rng(1000 + client_id)
    problems = []
    for i in range(REQUESTS_PER_CLIENT):
        x, request_id = random_rows(rng), f"json{client_id}-r{i}"
        async with session.post(url, json=infer_body(x, id=request_id)) as response:
            status, body = response.status, await response.json()
        try:
            assert status == 200 and body["id"] == request_id, (status, body)
            assert_matches_reference(src, x, body)
        except AssertionError as e:
            problems.append(f"{request_id}: {e}")
    return problems


async def triton_client(url: str, src: Path, client_id: int) -> list[str]:
    """tritonclient's asyncio client with binary tensors both ways; same checks."""
    rng = np.random.default_rng(2000 + client_id)
    problems = []
    triton = aio_httpclient.InferenceServerClient(url=url)
    try:
        for i in range(REQUESTS_PER_CLIENT):
            x, request_id = random_rows(rng), f"triton{client_id}-r{i}"
            infer_input = aio_httpclient.InferInput("input", list(x.shape), "FP32")
            infer_input.set_data_from_numpy(x, binary_data=True)
            result = await triton.infer("mlp", [infer_input], request_id=request_id)
            try:
                assert result.get_response()["id"] == request_id
                labels = [label.decode() for label in result.as_numpy("label").tolist()]
                assert_outputs_match(src, x, result.as_numpy("logits"), result.as_numpy("probabilities"), labels)
            except AssertionError as e:
                problems.append(f"{request_id}: {e}")
    finally:
        await triton.close()
    return problems


async def run_clients(server: WarmpodServer, src: Path) -> list[str]:
    """Half the clients speak JSON, half binary; bounded in requests and, as a whole, in time."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [
            json_client(session, server.url + INFER, src, c) if c % 2 else triton_client(server.host_port, src, c)
            for c in range(CLIENTS)
        ]
        results = await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
    return [problem for problems in results for problem in problems]


def test_concurrent_clients_each_get_their_own_rows(batching_server: WarmpodServer, mlp_src: Path) -> None:
    before = Scrape(batching_server.url)
    problems = asyncio.run(run_clients(batching_server, mlp_src))
    assert not problems, problems[:5]
    after = Scrape(batching_server.url)

    mlp = {"model": "mlp"}
    requests = CLIENTS * REQUESTS_PER_CLIENT
    ok = {"model": "mlp", "endpoint": "infer", "code": "200"}
    assert delta(after, before, "warmpod_request_duration_seconds_count", **ok) == requests
    assert delta(after, before, "warmpod_queue_wait_seconds_count", **mlp) == requests
    batches = delta(after, before, "warmpod_batch_size_count", **mlp)
    assert 0 < batches < requests, "no two requests were ever merged into one batch"
    # Some batch held more than 4 rows, which no single request (at most 3 rows) does alone.
    batches_of_at_most_4 = after.buckets("warmpod_batch_size", **mlp)[4.0]
    batches_of_at_most_4 -= before.buckets("warmpod_batch_size", **mlp).get(4.0, 0)
    assert batches_of_at_most_4 < batches
    assert after.value("warmpod_inflight_requests", **mlp) == 0
    assert after.value("warmpod_queue_depth", **mlp) == 0
