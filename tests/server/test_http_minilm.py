"""End to end over HTTP: the real all-MiniLM-L6-v2 staged by the loader, `warmpod serve` in a subprocess, and the
clients users would point at it (openai, tritonclient.http and its asyncio twin, prometheus_client's parser).

Every vector is compared with data/minilm_reference.json (computed by sentence-transformers, see test_bert.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.kit.clients import http, post_json
from tests.kit.models import minilm_dir
from tests.kit.warmpod import WarmpodServer, stage

MODEL = "all-MiniLM-L6-v2"
MINILM = minilm_dir()
REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"
TOLERANCE = 1e-5
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json: the model truncates to this many tokens
MAX_POSITIONS = 512  # config.json max_position_embeddings: the limit without truncation
DIM = 384
BATCH_DELAY_MS = 20  # long enough for concurrent requests to share forward passes


def max_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"shape {got.shape}, want {want.shape}"
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> float:
    diff = max_diff(got, want)
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff:.3g} > {TOLERANCE}"
    return diff


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    doc["vectors"] = np.array(doc["embeddings"], dtype=np.float32)
    assert doc["sentences"][0] == "" and doc["untruncated_tokens"][-1] > MAX_POSITIONS
    return doc


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stage(MINILM, root, MODEL)
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    logs = tmp_path_factory.mktemp("logs")
    with WarmpodServer(store, MODEL, "--max-batch-delay-ms", str(BATCH_DELAY_MS), log_dir=logs) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: WarmpodServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def openai_texts(reference: dict[str, Any]) -> tuple[list[str], np.ndarray, int]:
    """The reference sentences the OpenAI API accepts (not the empty one), their vectors, and their token count
    after truncation."""
    rows = [i for i, text in enumerate(reference["sentences"]) if text]
    tokens = sum(min(reference["untruncated_tokens"][i], MAX_SEQ_LENGTH) for i in rows)
    return [reference["sentences"][i] for i in rows], reference["vectors"][rows], tokens


def vectors_of(response: Any) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float32)


# ---------------------------------------------------------------- the openai client on /v1


@pytest.mark.parametrize("encoding_format", [None, "float"], ids=["default-base64", "float"])
def test_openai_client_embeddings_match_sentence_transformers(
    client: openai.OpenAI, reference: dict[str, Any], encoding_format: str | None
) -> None:
    texts, want, tokens = openai_texts(reference)
    if encoding_format is None:  # the client then asks for base64 and decodes it into floats itself
        response = client.embeddings.create(model=MODEL, input=texts)
    else:
        response = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")

    assert response.model == MODEL and len(response.data) == len(texts)
    diff = assert_close(vectors_of(response), want, f"{len(texts)} sentences ({encoding_format or 'base64'})")
    print(f"openai {encoding_format or 'base64'}: max abs diff {diff:.3g}")
    # Every text's tokens, [CLS] and [SEP] included; the long one counts as the 256 tokens it was cut to.
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens > 0


def test_openai_client_single_string_and_order(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    sentences, vectors = reference["sentences"], reference["vectors"]
    one = client.embeddings.create(model=MODEL, input=sentences[1], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].index == 0
    assert_close(vectors_of(one), vectors[1:2], "single string")
    assert one.usage.prompt_tokens == reference["untruncated_tokens"][1]

    # Reversed, so a row served in arrival order instead of its own place would show.
    order = [9, 4, 1, 7, 3]
    response = client.embeddings.create(model=MODEL, input=[sentences[i] for i in order])
    assert_close(vectors_of(response), vectors[order], "reordered sentences")


def test_openai_client_lists_the_model(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "warmpod"


def test_openai_client_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert info.value.status_code == 404
    assert f"unknown model 'text-embedding-3-small'; this server serves {MODEL!r}" in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"input": []}, "'input' is an empty list: send at least one string", id="empty-list"),
        pytest.param({"input": [[101, 7592, 102]]}, "'input' holds token ids", id="token-ids"),
        pytest.param({"input": [7592, 2088]}, "'input' holds token ids", id="flat-token-ids"),
        pytest.param({"input": ["fine", ""]}, "'input'[1] is an empty string", id="empty-string"),
        pytest.param(
            {"input": "hello", "dimensions": 100},
            f"'dimensions' is 100 but this model returns {DIM}-dimensional embeddings",
            id="dimensions",
        ),
    ],
)
def test_openai_client_bad_requests_name_the_problem(
    client: openai.OpenAI, kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, **kwargs)
    assert info.value.status_code == 400
    assert expected in info.value.message, info.value.message
    assert info.value.type == "invalid_request_error"


def test_openai_client_matching_dimensions_are_served(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    response = client.embeddings.create(model=MODEL, input=reference["sentences"][2], dimensions=DIM)
    assert_close(vectors_of(response), reference["vectors"][2:3], "dimensions=384")


# ---------------------------------------------------------------- tritonclient.http on /v2


@pytest.mark.parametrize("binary_output", [True, False], ids=["out-binary", "out-json"])
@pytest.mark.parametrize("binary_input", [True, False], ids=["in-binary", "in-json"])
def test_tritonclient_bytes_input_matches_sentence_transformers(
    server: WarmpodServer, reference: dict[str, Any], binary_input: bool, binary_output: bool
) -> None:
    sentences = reference["sentences"]  # the empty one and the over-long one included
    text = triton.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object), binary_data=binary_input)
    wanted = triton.InferRequestedOutput("embedding", binary_data=binary_output)
    with triton.InferenceServerClient(server.host_port, connection_timeout=60, network_timeout=60) as c:
        assert c.is_model_ready(MODEL)
        result = c.infer(MODEL, [text], outputs=[wanted], request_id="minilm-1")
    got = result.as_numpy("embedding")
    assert got is not None and got.dtype == np.float32 and got.shape == (len(sentences), DIM)
    diff = assert_close(got, reference["vectors"], f"binary input {binary_input}, binary output {binary_output}")
    print(f"tritonclient in-binary={binary_input} out-binary={binary_output}: max abs diff {diff:.3g}")
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "minilm-1"


def test_tritonclient_reads_the_model_metadata(server: WarmpodServer) -> None:
    with triton.InferenceServerClient(server.host_port) as c:
        metadata = c.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("text", "BYTES", [-1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [("embedding", "FP32", [-1, DIM])]


# ---------------------------------------------------------------- concurrent clients, one batcher


def batch_counters(server: WarmpodServer) -> tuple[float, float, float]:
    """(inference requests answered 200, forward passes, rows run) from /metrics, read by prometheus_client."""
    status, _, body = http("GET", server.url + "/metrics")
    assert status == 200
    requests = batches = rows = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.labels.get("model") != MODEL:
                continue
            if sample.name == "warmpod_request_duration_seconds_count" and sample.labels["code"] == "200":
                requests += sample.value
            elif sample.name == "warmpod_batch_size_count":
                batches += sample.value
            elif sample.name == "warmpod_batch_size_sum":
                rows += sample.value
    return requests, batches, rows


CLIENTS = 12
OPENAI_CLIENTS = 4  # the others speak V2: embeddings and infer requests share the same batches
ROUNDS = 5


def test_concurrent_clients_each_get_their_own_sentence(server: WarmpodServer, reference: dict[str, Any]) -> None:
    # The short sentences (2 to 47 tokens), so batches mix lengths and pad; the 882-token one would only slow it.
    pool = [i for i, n in enumerate(reference["untruncated_tokens"]) if n <= 64]
    assert len(pool) >= 8
    sentences, vectors = reference["sentences"], reference["vectors"]
    before = batch_counters(server)

    async def v2_client(k: int) -> list[tuple[int, np.ndarray]]:
        got = []
        async with triton_aio.InferenceServerClient(server.host_port, conn_timeout=60) as c:
            for r in range(ROUNDS):
                i = pool[(k + r) % len(pool)]
                text = triton_aio.InferInput("text", [1], "BYTES")
                text.set_data_from_numpy(np.array([sentences[i].encode()], dtype=object), binary_data=k % 2 == 0)
                result = await c.infer(MODEL, [text])
                got.append((i, result.as_numpy("embedding")))
        return got

    async def openai_client(k: int) -> list[tuple[int, np.ndarray]]:
        got = []
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            for r in range(ROUNDS):
                i = pool[(k + 3 * r) % len(pool)]
                if not sentences[i]:  # the OpenAI API refuses empty strings
                    i = pool[(k + 3 * r + 1) % len(pool)]
                response = await c.embeddings.create(model=MODEL, input=sentences[i])
                got.append((i, vectors_of(response)))
        return got

    async def all_clients() -> list[list[tuple[int, np.ndarray]]]:
        clients = [openai_client(k) if k < OPENAI_CLIENTS else v2_client(k) for k in range(CLIENTS)]
        return await asyncio.wait_for(asyncio.gather(*clients), timeout=120)

    started = time.monotonic()
    results = asyncio.run(all_clients())
    elapsed = time.monotonic() - started

    worst = 0.0
    for k, answers in enumerate(results):
        assert len(answers) == ROUNDS
        for r, (i, got) in enumerate(answers):
            worst = max(worst, assert_close(got, vectors[i : i + 1], f"client {k} round {r} (sentence {i})"))
    requests, batches, rows = (b - a for a, b in zip(before, batch_counters(server), strict=True))
    print(f"{CLIENTS * ROUNDS} requests in {batches:.0f} batches, {elapsed:.2f} s; max abs diff {worst:.3g}")
    assert requests == rows == CLIENTS * ROUNDS
    assert batches < requests, f"{requests:.0f} requests ran in {batches:.0f} batches: none were merged"


# ---------------------------------------------------------------- texts longer than the model's limit


def v2_texts(*texts: str) -> dict[str, Any]:
    """A V2 infer request with the texts as JSON strings (BYTES in the JSON encoding)."""
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}]}


def test_long_text_is_truncated_like_sentence_transformers(
    server: WarmpodServer, client: openai.OpenAI, reference: dict[str, Any]
) -> None:
    long_text = reference["sentences"][-1]
    status, body = post_json(server.url + f"/v2/models/{MODEL}/infer", v2_texts("Hello!", long_text))
    assert status == 200, body
    (output,) = body["outputs"]
    assert output["shape"] == [2, DIM]
    got = np.array(output["data"], dtype=np.float32).reshape(2, DIM)
    assert_close(got, reference["vectors"][[1, -1]], "truncated text via /v2")

    response = client.embeddings.create(model=MODEL, input=long_text)
    assert_close(vectors_of(response), reference["vectors"][-1:], "truncated text via /v1")
    assert response.usage.prompt_tokens == MAX_SEQ_LENGTH  # cut to 256 tokens, [SEP] included


@pytest.fixture(scope="module")
def strict_server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    logs = tmp_path_factory.mktemp("strict-logs")
    with WarmpodServer(store, MODEL, "--no-truncate", log_dir=logs) as running:
        yield running


def test_without_truncation_an_over_long_text_is_refused(strict_server: WarmpodServer) -> None:
    too_long = "word " * 598  # "word" is one token: 598 + [CLS] + [SEP] = 600
    medium = "word " * 298  # 300 tokens: over the 256 the model would cut to, under the 512 positions

    status, body = post_json(strict_server.url + f"/v2/models/{MODEL}/infer", v2_texts("short", too_long))
    assert status == 400, body
    assert f"text 1 is 600 tokens long, more than the {MAX_POSITIONS} tokens model {MODEL!r} accepts" in body["error"]

    with openai.OpenAI(base_url=strict_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.embeddings.create(model=MODEL, input=[too_long])
        assert info.value.status_code == 400
        assert "text 0 is 600 tokens long" in info.value.message and str(MAX_POSITIONS) in info.value.message

        response = c.embeddings.create(model=MODEL, input=medium)
    assert response.usage.prompt_tokens == 300  # served whole, not cut to 256
    vector = vectors_of(response)
    assert vector.shape == (1, DIM) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5


# ---------------------------------------------------------------- the client's own deadline


def test_tritonclient_timeout_is_the_request_deadline(server: WarmpodServer, reference: dict[str, Any]) -> None:
    """tritonclient's `timeout` is V2 `parameters.timeout` in microseconds: the server's deadline for the request."""
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([reference["sentences"][2].encode()], dtype=object))
    with triton.InferenceServerClient(server.host_port) as c:
        result = c.infer(MODEL, [text], timeout=30_000_000)  # 30 s: plenty
        assert_close(result.as_numpy("embedding"), reference["vectors"][2:3], "with a 30 s timeout")
        with pytest.raises(InferenceServerException) as info:
            c.infer(MODEL, [text], timeout=1)  # 1 µs: over before the request can be queued
    assert info.value.status() == "504"
    message = info.value.message()
    assert "deadline" in message, message
    # The message should say what the deadline was, not the (negative) time left when the request was queued.
    assert not re.search(r"\(-\d", message), f"the 504 message reports a negative duration: {message}"


# ---------------------------------------------------------------- bytes that are not text


def test_invalid_utf8_in_binary_bytes_is_refused(server: WarmpodServer) -> None:
    text = triton.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array([b"fine", b"also fine", b"caf\xe9 au lait"], dtype=object), binary_data=True)
    expected = "input 'text' element 2 is not valid UTF-8"

    # The exact body tritonclient sends, posted as-is to see the status code and the V2 error body.
    body, json_size = triton.InferenceServerClient.generate_request_body([text])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    status, _, raw = http("POST", server.url + f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400, raw
    assert expected in json.loads(raw)["error"]

    with triton.InferenceServerClient(server.host_port) as c, pytest.raises(InferenceServerException) as info:
        c.infer(MODEL, [text])
    assert expected in info.value.message()


# JSON can spell text that is not Unicode: a lone UTF-16 surrogate escape. Neither UTF-8 nor the tokenizer can take it.
LONE_SURROGATE = b"\\ud800 lone half of a pair"


def test_lone_surrogate_in_v1_input_is_a_bad_request(server: WarmpodServer) -> None:
    body = b'{"model": "%s", "input": ["fine", "%s"]}' % (MODEL.encode(), LONE_SURROGATE)
    status, _, raw = http("POST", server.url + "/v1/embeddings", body, {"Content-Type": "application/json"})
    error = json.loads(raw)["error"]
    assert (status, error["type"]) == (400, "invalid_request_error"), raw
    assert "'input'[1]" in error["message"], error["message"]


def test_lone_surrogate_in_v2_json_bytes_is_a_bad_request(server: WarmpodServer) -> None:
    body = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["fine", "%s"]}]}' % LONE_SURROGATE
    status, _, raw = http("POST", server.url + f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    message = json.loads(raw)["error"]
    assert status == 400, raw
    assert "'text'" in message and "element 1" in message, message
