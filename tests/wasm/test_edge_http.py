"""`warmpod edge serve` over HTTP, side by side with the torch server (`warmpod serve`) on the same staged
all-MiniLM-L6-v2: the same vectors (≤ 1e-4, batches with padding included), the same errors for the same bad
requests, the same metric names — clients and the autoscaler cannot tell them apart. Real clients throughout."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.http as triton

from tests.kit.clients import post_json
from tests.kit.metrics import Scrape
from tests.kit.warmpod import WarmpodServer, stage
from tests.wasm.edgeutil import MINILM, run_edge

MODEL = "all-MiniLM-L6-v2"
REFERENCE = Path(__file__).parent.parent / "server" / "data" / "minilm_reference.json"
TOLERANCE = 1e-4  # edge (FP32, 4-wide SIMD, its own summation order) vs torch

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    texts: list[str] = json.loads(REFERENCE.read_text(encoding="utf-8"))["sentences"]
    return texts  # 11 texts: empty, short, CJK, emoji, one over the 256-token limit (truncated)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stage(MINILM, root, MODEL)
    return root


@pytest.fixture(scope="module")
def bundle(store: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / MODEL
    proc = run_edge("compile", "--store", store, "--model", MODEL, "-o", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def servers(
    store: Path, bundle: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WarmpodServer, WarmpodServer]]:
    logs = tmp_path_factory.mktemp("logs")
    env = {"WARMPOD_WASM_CACHE": str(cache)}
    delay = ("--max-batch-delay-ms", "20")
    with (
        WarmpodServer(store, MODEL, *delay, log_dir=logs) as torch_server,
        WarmpodServer.edge(bundle, *delay, "--workers", "2", log_dir=logs, env=env) as edge,
    ):
        yield torch_server, edge


@pytest.fixture(scope="module")
def edge(servers: tuple[WarmpodServer, WarmpodServer]) -> WarmpodServer:
    return servers[1]


def infer(server: WarmpodServer, texts: list[str]) -> np.ndarray:
    payload = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    status, body = post_json(f"{server.url}/v2/models/{MODEL}/infer", payload)
    assert status == 200, body
    (out,) = body["outputs"]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_one_batch_with_padding_matches_the_torch_server(
    servers: tuple[WarmpodServer, WarmpodServer], sentences: list[str]
) -> None:
    torch_server, edge = servers
    want, got = infer(torch_server, sentences), infer(edge, sentences)
    assert got.shape == (11, 384)
    diff = float(np.abs(got - want).max())
    print(f"edge vs torch server, 11 texts in one request: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


def test_concurrent_requests_batched_together_match(
    servers: tuple[WarmpodServer, WarmpodServer], sentences: list[str]
) -> None:
    torch_server, edge = servers
    want = infer(torch_server, sentences)
    with concurrent.futures.ThreadPoolExecutor(len(sentences)) as pool:
        got = list(pool.map(lambda text: infer(edge, [text]), sentences))
    assert float(np.abs(np.concatenate(got) - want).max()) <= TOLERANCE
    metrics = Scrape(edge.url)  # fewer batches than inference requests answered: requests were batched together
    assert metrics.total("warmpod_batch_size_count") < metrics.total(
        "warmpod_request_duration_seconds_count", code="200"
    )


def test_openai_and_tritonclient_get_the_same_vectors(edge: WarmpodServer, sentences: list[str]) -> None:
    texts = [t for t in sentences if t]
    with openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        response = client.embeddings.create(model=MODEL, input=texts)
    from_openai = np.array([d.embedding for d in response.data], dtype=np.float32)
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=True)
    with triton.InferenceServerClient(edge.host_port, network_timeout=60) as c:
        result = c.infer(MODEL, [text], outputs=[triton.InferRequestedOutput("embedding", binary_data=True)])
        metadata = c.get_model_metadata(MODEL)
    assert float(np.abs(result.as_numpy("embedding") - from_openai).max()) <= 1e-6
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


INFER = f"/v2/models/{MODEL}/infer"


def _text(name: str = "text", datatype: str = "BYTES", shape: list[int] | None = None, data: Any = None) -> Any:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [1], "data": data or ["a"]}]}


BAD_REQUESTS = [
    (INFER, _text(name="txt")),
    (INFER, _text(datatype="FP32", data=[1.0])),
    (INFER, _text(shape=[1, 1])),
    (INFER, _text(shape=[2])),
    (INFER, {"inputs": []}),
    ("/v2/models/other/infer", _text()),
    ("/v1/embeddings", {"model": MODEL, "input": [""]}),
    ("/v1/embeddings", {"model": MODEL}),
]


@pytest.mark.parametrize(("path", "payload"), BAD_REQUESTS)
def test_bad_requests_get_the_servers_answers(
    servers: tuple[WarmpodServer, WarmpodServer], path: str, payload: dict[str, Any]
) -> None:
    torch_server, edge = servers
    want, got = post_json(torch_server.url + path, payload), post_json(edge.url + path, payload)
    assert got == want
    assert got[0] in (400, 404) and got[1]["error"]


def test_same_metric_names_as_the_server(servers: tuple[WarmpodServer, WarmpodServer]) -> None:
    torch_server, edge = servers
    infer(edge, ["make sure every inference metric has a sample"])
    want = {n for n in Scrape(torch_server.url).families if n.startswith("warmpod_")}
    got = Scrape(edge.url)
    assert {n for n in got.families if n.startswith("warmpod_")} == want
    assert got.total("warmpod_ready") == 1
    assert 0 < got.total("warmpod_cold_start_seconds") < 30
    (version,) = [s for s in got.families["warmpod_model_version_info"].samples if s.value == 1]
    assert version.labels["model"] == MODEL and version.labels["family"] == "bert"


def test_the_edge_process_never_imports_torch(edge: WarmpodServer) -> None:
    assert edge.proc is not None
    maps = Path(f"/proc/{edge.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "wasmtime" in maps


def test_no_truncate_reaches_the_edge_model(bundle: Path, cache: Path, tmp_path: Path) -> None:
    """`--no-truncate` (the serving flag, in the server's config) overrides the bundle's truncation, as it does on the
    torch server: an over-long text is refused, a 300-token one served whole instead of cut to 256."""
    env = {"WARMPOD_WASM_CACHE": str(cache)}
    with WarmpodServer.edge(bundle, "--no-truncate", log_dir=tmp_path, env=env) as strict:
        too_long, medium = "word " * 598, "word " * 298  # 600 and 300 tokens with [CLS] and [SEP]
        status, body = post_json(f"{strict.url}{INFER}", _text(shape=[2], data=["short", too_long]))
        assert status == 400, body
        assert f"text 1 is 600 tokens long, more than the 512 tokens model {MODEL!r} accepts" in body["error"]
        status, body = post_json(f"{strict.url}/v1/embeddings", {"model": MODEL, "input": medium})
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 300


def test_oversized_requests_on_the_edge_are_413_never_500(
    bundle: Path, cache: Path, tmp_path: Path, servers: tuple[WarmpodServer, WarmpodServer]
) -> None:
    """Over the row limit: 413 before any forward pass, as on the torch server. A batch that cannot fit the guest
    memory limit: 413 naming it and the flags (before, 10,000 rows gave a 500 "out of memory")."""
    _, edge = servers
    status, body = post_json(edge.url + "/v1/embeddings", {"model": MODEL, "input": ["a"] * 10_000})
    assert status == 413 and "the request has 10000 rows; this server takes at most 2048" in body["error"]["message"]
    env = {"WARMPOD_WASM_CACHE": str(cache)}
    # 200 MiB holds the weights (~90 MB) and a short request, not 32 texts of 256 tokens (attention and activations)
    with WarmpodServer.edge(bundle, "--max-memory", "200MiB", log_dir=tmp_path, env=env) as small:
        long_texts = [f"text {i} " + "warm pods start fast " * 80 for i in range(32)]
        status, body = post_json(small.url + "/v1/embeddings", {"model": MODEL, "input": long_texts})
        assert status == 413, body
        message = body["error"]["message"]
        assert "does not fit the edge engine's guest memory" in message and "the memory limit is 200 MiB" in message
        assert "--max-batch-size" in message and "--max-memory" in message
        status, body = post_json(small.url + "/v1/embeddings", {"model": MODEL, "input": ["a short one"]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384
