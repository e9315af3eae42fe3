"""No request monopolises a worker: a large request runs as chunks interleaved with other requests' rows, stops within
one chunk when its deadline passes or its client leaves, and one over a request limit is refused (413) before any
forward pass. The real all-MiniLM-L6-v2, `warmpod serve` in a subprocess, one worker."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.kit.clients import post_json
from tests.kit.metrics import Scrape
from tests.kit.models import minilm_dir
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer, stage

pytestmark = pytest.mark.process

MODEL = "all-MiniLM-L6-v2"
MINILM = minilm_dir()
BATCH = 32
SENTENCE = "warm pods start fast because the weights are already staged in shared memory on node {0} "
# 2,048 texts, every one different (short, so that the whole request takes seconds, not minutes, on 2 cores)
LARGE = [f"warm pods start fast on node {i}" for i in range(2048)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    store = tmp_path_factory.mktemp("store")
    stage(MINILM, store, MODEL)
    args = (
        "--max-batch-size",
        str(BATCH),
        "--workers",
        "1",
        "--max-request-tokens",
        "100000",
        "--request-timeout",
        "120",
    )
    with WarmpodServer(store, MODEL, *args, log_dir=tmp_path_factory.mktemp("logs")) as running:
        yield running


def batches(server: WarmpodServer) -> float:
    """Forward passes the server has run so far."""
    return Scrape(server.url).total("warmpod_batch_size_count")


def embed(server: WarmpodServer, texts: list[str], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    return post_json(server.url + "/v1/embeddings", {"model": MODEL, "input": texts}, timeout=timeout)


def v2_texts(texts: list[str], **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    if parameters:
        body["parameters"] = parameters
    return body


def wait_for_forward_passes(server: WarmpodServer, more_than: float) -> None:
    wait_until(lambda: batches(server) > more_than, timeout=60, interval=0.02, what="the large request's chunks")


def test_a_small_request_is_answered_while_a_large_one_runs_and_both_are_right(server: WarmpodServer) -> None:
    done: dict[str, float] = {}
    large: dict[str, Any] = {}

    def send_large() -> None:
        large["status"], large["body"] = embed(server, LARGE)
        done["large"] = time.monotonic()

    before = batches(server)
    thread = threading.Thread(target=send_large)
    thread.start()
    try:
        wait_for_forward_passes(server, before + 2)  # the large request is running its chunks
        status, small = embed(server, [LARGE[1000]])
        done["small"] = time.monotonic()
        during = batches(server) - before
    finally:
        thread.join(timeout=180)
    assert status == 200 and large["status"] == 200
    assert done["small"] < done["large"], "the 1-row request waited for the whole 2,048-row one"
    assert during < len(LARGE) // BATCH, "the small request was answered only after every chunk of the large one"
    vectors = np.array([d["embedding"] for d in large["body"]["data"]], dtype=np.float32)
    assert vectors.shape == (2048, 384) and [d["index"] for d in large["body"]["data"]] == list(range(2048))
    # the chunks come back in order: row 1000 of the large request is the small request's one text
    np.testing.assert_allclose(vectors[1000], np.array(small["data"][0]["embedding"], dtype=np.float32), atol=1e-5)
    assert large["body"]["usage"]["prompt_tokens"] > 2048 * 8  # counted over the whole request, not a chunk


def test_a_request_past_its_deadline_stops_within_one_chunk_and_frees_the_worker(server: WarmpodServer) -> None:
    before = batches(server)
    status, body = post_json(server.url + f"/v2/models/{MODEL}/infer", v2_texts(LARGE, timeout=400_000), timeout=60)
    assert status == 504, body
    assert "no result within the request deadline" in body["error"] and "of its 64 chunks done" in body["error"]
    ran = batches(server) - before
    assert ran < len(LARGE) // BATCH  # it did not run to the end
    started = time.monotonic()
    status, _ = embed(server, ["is the worker free?"], timeout=10)
    assert status == 200
    assert time.monotonic() - started < 1.0  # no chunk of the expired request left in front of it
    # ... and none of its chunks ran later: at most the one that was running at the deadline, plus the small one
    assert batches(server) - before <= ran + 2


def test_a_client_that_disconnects_cancels_its_remaining_chunks(server: WarmpodServer) -> None:
    before = batches(server)
    body = json.dumps({"model": MODEL, "input": LARGE}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for_forward_passes(server, before + 2)
    # the client is gone: what had not started never runs, so the count settles within a chunk or two
    wait_until(lambda: Scrape(server.url).value("warmpod_inflight_requests", model=MODEL) == 0, timeout=10,
               what="the cancelled request to leave")  # fmt: skip
    settled = batches(server)
    assert settled - before < len(LARGE) // BATCH
    started = time.monotonic()
    status, _ = embed(server, ["still serving"], timeout=10)
    assert status == 200 and time.monotonic() - started < 1.0
    assert batches(server) == settled + 1


def test_over_the_row_limit_is_413_before_any_forward_pass(server: WarmpodServer) -> None:
    before = batches(server)
    status, body = embed(server, ["a"] * 2049)
    assert status == 413
    assert body["error"]["message"] == (
        "the request has 2049 rows; this server takes at most 2048 per request (--max-request-rows): send fewer per "
        "request, or raise --max-request-rows"
    )
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "too_large"
    status, body = post_json(server.url + f"/v2/models/{MODEL}/infer", v2_texts(["a"] * 2049))
    assert status == 413 and "the request has 2049 rows" in body["error"] and "--max-request-rows" in body["error"]
    assert batches(server) == before


def test_over_the_token_limit_is_413_before_any_forward_pass(server: WarmpodServer) -> None:
    before = batches(server)
    texts = [SENTENCE.format(i) * 6 for i in range(1200)]  # ~105 tokens each: > 100,000 in all
    status, body = embed(server, texts)
    assert status == 413, body
    message = body["error"]["message"]
    assert "tokens in total; this server takes at most 100000 per request (--max-request-tokens)" in message
    status, body = post_json(server.url + f"/v2/models/{MODEL}/infer", v2_texts(texts))
    assert status == 413 and "--max-request-tokens" in body["error"]
    assert batches(server) == before
