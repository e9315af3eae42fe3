"""Triton's model configuration, statistics and repository index extensions and OpenAI's GET /v1/models/{id}, each
through the client that calls it (tritonclient.http, openai), on `warmpod serve` and `warmpod edge serve` in
subprocesses; statistics checked against /metrics (the same counters); every bad input answered with its status and
message."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.kit.clients import http, open_triton, post_json
from tests.kit.metrics import Scrape
from tests.kit.models import write_mlp
from tests.kit.warmpod import WarmpodServer, stage

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

MODEL = "mlp"
LABELS = ["cat", "dog", "eel"]
# Not the defaults, so that the configuration shows these flags and not constants.
FLAGS = ("--max-batch-size", "16", "--max-batch-delay-ms", "3.5", "--max-queue", "50", "--workers", "2",
         "--request-timeout", "20")  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extensions")


@pytest.fixture(scope="module")
def mlp_src(workdir: Path) -> Path:
    src = write_mlp(workdir / MODEL, sizes=(4, 16, 3), seed=3, labels=LABELS, output_activation="softmax")
    stage(src, workdir / "store", MODEL)
    return src


@pytest.fixture(scope="module")
def server(workdir: Path, mlp_src: Path) -> Iterator[WarmpodServer]:
    with WarmpodServer(workdir / "store", MODEL, *FLAGS, log_dir=workdir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: WarmpodServer) -> Iterator[httpclient.InferenceServerClient]:
    with open_triton(server.host_port) as triton:
        yield triton


@pytest.fixture(scope="module")
def openai_client(server: WarmpodServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def infer(client: httpclient.InferenceServerClient, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    infer_input = httpclient.InferInput("input", [rows, 4], "FP32")
    infer_input.set_data_from_numpy(x, binary_data=True)
    client.infer(MODEL, [infer_input])


def get_json(url: str) -> tuple[int, Any]:
    status, _, body = http("GET", url)
    return status, json.loads(body)


# ------------------------------------------------------------------------------------------ model configuration


def expected_config() -> dict[str, Any]:
    """The MLP's configuration under FLAGS, as Triton would print it."""

    def tensor(name: str, data_type: str, dims: list[int], output: bool = False) -> dict[str, Any]:
        common = {"name": name, "data_type": data_type, "dims": dims, "is_shape_tensor": False}
        if output:
            return common | {"label_filename": ""}
        return common | {"format": "FORMAT_NONE", "allow_ragged_batch": False, "optional": False}

    return {
        "name": MODEL,
        "platform": "warmpod_mlp",
        "backend": "warmpod",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 16,
        "input": [tensor("input", "TYPE_FP32", [4])],
        "output": [
            tensor("logits", "TYPE_FP32", [3], output=True),
            tensor("probabilities", "TYPE_FP32", [3], output=True),
            tensor("label", "TYPE_STRING", [], output=True),
        ],
        "batch_input": [],
        "batch_output": [],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": 3500,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 20_000_000,
                "allow_timeout_override": True,
                "max_queue_size": 50,
            },
            "priority_queue_policy": {},
        },
        "instance_group": [
            {
                "name": MODEL,
                "kind": "KIND_CPU",
                "count": 2,
                "gpus": [],
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            },
        ],
        "default_model_filename": "",
        "parameters": {},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
    }


def test_tritonclient_reads_the_model_configuration(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL)
    assert config == expected_config()
    assert client.get_model_config(MODEL, "1") == config
    # Triton's invariant, which perf_analyzer relies on: the metadata's shape is the batch dimension + dims.
    metadata = client.get_model_metadata(MODEL)
    for kind, key in (("inputs", "input"), ("outputs", "output")):
        assert [t["shape"] for t in metadata[kind]] == [[-1, *t["dims"]] for t in config[key]]


def test_the_edge_reports_the_same_configuration(mlp_src: Path, workdir: Path, tmp_path: Path) -> None:
    """`warmpod edge serve` is the same app: the same configuration for the same model and flags."""
    env = {"WARMPOD_WASM_CACHE": str(tmp_path / "cache")}
    with WarmpodServer.edge(mlp_src, *FLAGS, log_dir=workdir, env=env) as edge:
        triton = httpclient.InferenceServerClient(url=edge.host_port, network_timeout=30)
        try:
            assert triton.get_model_config(MODEL) == expected_config()
            infer(triton, 3)
            (stats,) = triton.get_inference_statistics(MODEL)["model_stats"]
            assert stats["inference_count"] == 3 and stats["inference_stats"]["success"]["count"] == 1
        finally:
            triton.close()


# ------------------------------------------------------------------------------------------ statistics


def test_statistics_are_the_metrics_counters(server: WarmpodServer, client: httpclient.InferenceServerClient) -> None:
    before_ms = time.time() * 1000
    for rows in (1, 2, 3, 3, 20):  # 20 rows: two chunks of at most --max-batch-size 16
        infer(client, rows)
    status, _ = post_json(f"{server.url}/v2/models/{MODEL}/infer", {"inputs": []})  # a failure: 400
    assert status == 400
    status, _ = post_json(f"{server.url}/v2/models/nope/infer", {"inputs": []})  # no model of ours: not counted
    assert status == 404

    stats = client.get_inference_statistics(MODEL)
    assert client.get_inference_statistics(MODEL, "1") == stats
    metrics = Scrape(server.url)
    (model,) = stats["model_stats"]
    assert model["name"] == MODEL and model["version"] == "1"
    assert before_ms <= model["last_inference"] <= time.time() * 1000

    infer_stats = model["inference_stats"]
    requests = "warmpod_request_duration_seconds"
    assert infer_stats["success"]["count"] == metrics.total(requests + "_count", code="200") >= 5
    assert infer_stats["success"]["ns"] == pytest.approx(metrics.total(requests + "_sum", code="200") * 1e9, rel=1e-6)
    assert infer_stats["fail"]["count"] == metrics.total(requests + "_count", code="400") >= 1
    assert infer_stats["queue"]["count"] == metrics.total("warmpod_queue_wait_seconds_count")
    assert model["execution_count"] == infer_stats["compute_infer"]["count"]
    assert model["execution_count"] == metrics.total("warmpod_batch_duration_seconds_count") >= 5
    assert model["inference_count"] == metrics.total("warmpod_batch_size_sum") >= 29
    assert infer_stats["compute_infer"]["ns"] == pytest.approx(
        metrics.total("warmpod_batch_duration_seconds_sum") * 1e9, rel=1e-6
    )

    batches = {b["batch_size"]: b["compute_infer"] for b in model["batch_stats"]}
    for size, compute in batches.items():
        count = metrics.total("warmpod_batch_compute_duration_seconds_count", batch_size=str(size))
        assert compute["count"] == count > 0
    assert sum(c["count"] for c in batches.values()) == model["execution_count"]
    assert max(batches) <= 16  # the 20-row request ran as chunks
    assert sum(size * c["count"] for size, c in batches.items()) == model["inference_count"]


def test_statistics_of_every_model(server: WarmpodServer, client: httpclient.InferenceServerClient) -> None:
    """GET /v2/models/stats is the all-models form, not a model named "stats"."""
    infer(client, 1)
    every = client.get_inference_statistics()
    assert [m["name"] for m in every["model_stats"]] == [MODEL]
    status, body = get_json(server.url + "/v2/models/stats")
    assert status == 200 and [m["name"] for m in body["model_stats"]] == [MODEL]
    assert body["model_stats"][0]["inference_count"] >= 1


# ------------------------------------------------------------------------------------------ repository, server


def test_repository_index(server: WarmpodServer, client: httpclient.InferenceServerClient) -> None:
    want = [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    assert client.get_model_repository_index() == want  # tritonclient posts an empty body
    for ready_only in (True, False):
        assert post_json(server.url + "/v2/repository/index", {"ready": ready_only}) == (200, want)


def test_server_metadata_lists_what_is_implemented(
    server: WarmpodServer, client: httpclient.InferenceServerClient
) -> None:
    meta = client.get_server_metadata()
    assert meta["extensions"] == ["binary_tensor_data", "model_configuration", "statistics", "openai_embeddings"]
    assert get_json(server.url + "/v2/") == (200, meta)


# ------------------------------------------------------------------------------------------ OpenAI models


def test_openai_client_retrieves_the_model(openai_client: openai.OpenAI) -> None:
    model = openai_client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "warmpod")
    assert [m.id for m in openai_client.models.list()] == [MODEL]
    assert abs(model.created - time.time()) < 600


def test_openai_client_unknown_model(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        openai_client.models.retrieve("unknown")
    assert excinfo.value.status_code == 404
    assert excinfo.value.code == "model_not_found"
    assert "unknown model 'unknown'; this server serves 'mlp'" in excinfo.value.message


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("what", ["config", "stats"])
def test_unknown_model_or_version(server: WarmpodServer, client: httpclient.InferenceServerClient, what: str) -> None:
    status, body = get_json(f"{server.url}/v2/models/nope/{what}")
    assert (status, body) == (404, {"error": "unknown model 'nope'; this server serves 'mlp'"})
    status, body = get_json(f"{server.url}/v2/models/{MODEL}/versions/7/{what}")
    assert (status, body) == (404, {"error": "model 'mlp' has no version '7' being served; the served version is 1"})

    call = client.get_model_config if what == "config" else client.get_inference_statistics
    with pytest.raises(InferenceServerException) as excinfo:
        call("nope")
    assert excinfo.value.status() == "404" and "unknown model 'nope'" in excinfo.value.message()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON in the request: Expecting property name enclosed in double quotes"),
        (b"[1]", 'the request body must be empty or a JSON object like {"ready": true}, got a list'),
        (b'{"ready": "yes"}', "'ready' must be true or false, got \"yes\""),
    ],
    ids=["malformed", "not-an-object", "ready-not-bool"],
)
def test_repository_index_bad_body(server: WarmpodServer, body: bytes, message: str) -> None:
    status, headers, raw = http("POST", server.url + "/v2/repository/index", body, {"Content-Type": "application/json"})
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)
    assert list(error) == ["error"] and error["error"].startswith(message)


def test_openai_unknown_model_shape(server: WarmpodServer) -> None:
    status, body = get_json(server.url + "/v1/models/unknown")
    assert status == 404
    assert body == {
        "error": {
            "message": "unknown model 'unknown'; this server serves 'mlp'",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
