"""Tenants on `warmpod serve` in a subprocess: per-tenant quotas (429 with Retry-After, for the openai client,
tritonclient and plain requests), per-tenant metrics read with prometheus_client's parser, bad --tenant-* flags
(exit 2 with a message, `warmpod serve` and `warmpod edge serve` alike), and the fairness test: tenant A floods at
five times the server's capacity while tenant B sends at a tenth of it, and B keeps its latency while A gets the
503s — where the same two loads as one tenant (a FIFO) give B a queue's worth of waiting, or 503s."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tritonclient.utils import InferenceServerException

from tests.kit.clients import http, open_triton
from tests.kit.models import minilm_dir, write_slow_dir
from tests.kit.warmpod import WarmpodServer, error_line, run_warmpod, stage

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

MODEL = "all-MiniLM-L6-v2"
# One tenant per test, so that each starts with full buckets; rates low enough that a refill between two requests
# of a test (seconds apart at most, even on a loaded machine) cannot let the second through.
KEYS = {f"team-{t}": f"sk-tenant-{t}-5c1d9e7f3b2a4c6d" for t in "abcde"}
QUOTAS = ("--tenant-quota", "team-a:requests=0.2", "--tenant-quota", "*:rows=0.5")


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def write_keys(path: Path) -> Path:
    path.write_text("".join(f"{tenant}:{key}\n" for tenant, key in KEYS.items()))
    return path


def scrape(server: WarmpodServer, tenant: str = "team-a") -> list[Sample]:
    """/metrics on the public port (behind the door: with a key), parsed by prometheus_client."""
    status, _, body = http("GET", server.url + "/metrics", headers=bearer(tenant))
    assert status == 200
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def grew(before: list[Sample], after: list[Sample], name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


# ------------------------------------------------------------------------------------------ quotas and metrics


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def limited(workdir: Path) -> Iterator[WarmpodServer]:
    """MiniLM behind five tenants' keys: team-a may send a request every 5 s, every other tenant a row every 2 s."""
    stage(minilm_dir(), workdir / "store", MODEL)
    args = ("--api-key-file", str(write_keys(workdir / "keys")), *QUOTAS)
    with WarmpodServer(workdir / "store", MODEL, *args, log_dir=workdir) as server:
        yield server


def embed(server: WarmpodServer, tenant: str, texts: list[str]) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = json.dumps({"model": MODEL, "input": texts}).encode()
    status, headers, raw = http("POST", server.url + "/v1/embeddings", body, {"Content-Type": "application/json"}
                                | bearer(tenant))  # fmt: skip
    return status, headers, json.loads(raw)


def test_over_its_quota_a_tenant_gets_429_with_retry_after_and_others_do_not(limited: WarmpodServer) -> None:
    before = scrape(limited)
    answers = [embed(limited, "team-a", ["one request"]) for _ in range(2)]
    assert answers[0][0] == 200
    status, headers, body = answers[1]
    assert status == 429
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 5  # one request per 5 s: whole seconds until the next may go
    assert body["error"] == {
        "message": f"tenant 'team-a' is over its quota of 0.2 requests/s (--tenant-quota team-a:requests=0.2); "
        f"retry in {wait} s",
        "type": "invalid_request_error",
        "param": None,
        "code": "rate_limited",
    }
    assert embed(limited, "team-d", ["team-d has its own buckets"])[0] == 200  # team-a's limit is not team-d's
    # The openai client sees RateLimitError (no retries: it would honour Retry-After and wait).
    with openai.OpenAI(base_url=limited.url + "/v1", api_key=KEYS["team-b"], max_retries=0, timeout=60) as client:
        assert len(client.embeddings.create(model=MODEL, input=["four", "rows", "from a", "full bucket"]).data) == 4
        with pytest.raises(openai.RateLimitError) as raised:  # ... left 3 rows of debt: 8 s at 0.5 rows/s
            client.embeddings.create(model=MODEL, input=["one more"])
        assert raised.value.status_code == 429
        wait = int(raised.value.response.headers["Retry-After"])
        assert 1 <= wait <= 8
        assert isinstance(raised.value.body, dict) and raised.value.body["message"] == (
            f"tenant 'team-b' is over its quota of 0.5 rows/s (--tenant-quota *:rows=0.5); retry in {wait} s"
        )
    after = scrape(limited)
    for tenant in ("team-a", "team-b"):
        assert grew(before, after, "warmpod_tenant_requests_rejected_total", tenant=tenant, reason="rate_limited") == 1
        assert grew(before, after, "warmpod_tenant_requests_total", tenant=tenant, code="429") == 1
        assert grew(before, after, "warmpod_tenant_requests_total", tenant=tenant, code="200") == 1


def test_tritonclient_sees_the_429_and_its_message(limited: WarmpodServer) -> None:
    text = httpclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"triton counts rows too"], dtype=object))
    with open_triton(limited.host_port) as triton:
        assert triton.infer(MODEL, [text], headers=bearer("team-c")).as_numpy("embedding").shape == (1, 384)
        with pytest.raises(InferenceServerException) as raised:
            triton.infer(MODEL, [text], headers=bearer("team-c"))
    assert raised.value.status() == "429"
    assert raised.value.message().startswith(
        "tenant 'team-c' is over its quota of 0.5 rows/s (--tenant-quota *:rows=0.5); retry in "
    )


def test_per_tenant_metrics_name_tenants_never_keys(limited: WarmpodServer) -> None:
    before = scrape(limited, "team-e")
    assert embed(limited, "team-e", ["counted for team-e"])[0] == 200
    no_key = http("POST", limited.url + "/v1/embeddings", b"{}", {"Content-Type": "application/json"})
    assert no_key[0] == 401
    after = scrape(limited, "team-e")
    assert grew(before, after, "warmpod_tenant_requests_total", tenant="team-e", model=MODEL, code="200") == 1
    assert grew(before, after, "warmpod_tenant_request_duration_seconds_count", tenant="team-e", model=MODEL) == 1
    # refused at the door: the tenant is not known, so "anonymous", with the reason
    assert grew(before, after, "warmpod_tenant_requests_rejected_total", tenant="anonymous", reason="unauthorized") == 1
    labels = {value for s in after for value in s.labels.values()}
    assert not labels & set(KEYS.values())
    assert {s.labels["tenant"] for s in after if "tenant" in s.labels} <= {*KEYS, "anonymous"}


# ------------------------------------------------------------------------------------------ bad flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tenant-quota", "team-a"), "argument --tenant-quota: 'team-a' is not TENANT:requests=R,rows=N (e.g. "
         "team-a:requests=20,rows=500, or *:rows=100)"),
        (("--tenant-quota", "team-a:tokens=5"), "argument --tenant-quota: 'team-a:tokens=5': 'tokens=5' is not "
         "requests=R or rows=N (per second)"),
        (("--tenant-quota", "team-a:requests=0"), "argument --tenant-quota: 'team-a:requests=0': requests must be a "
         "positive number per second, got 0"),
        (("--tenant-quota", "a:rows=1", "--tenant-quota", "a:requests=1"), "argument --tenant-quota: tenant 'a' is "
         "given twice; give each tenant one --tenant-quota"),
        (("--tenant-weight", "team-a"), "argument --tenant-weight: 'team-a' is not TENANT=WEIGHT (e.g. team-a=2; "
         "tenants without one have weight 1)"),
        (("--tenant-weight", "team-a=-2"), "argument --tenant-weight: 'team-a=-2': the weight must be a positive "
         "number, got -2"),
        (("--tenant-weight", "a=1", "--tenant-weight", "a=3"), "argument --tenant-weight: tenant 'a' is given twice; "
         "give each tenant one --tenant-weight"),
    ],
)  # fmt: skip
def test_bad_tenant_flags_exit_2_with_a_message(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    served = run_warmpod("serve", "--model", "m", "--store", tmp_path, *flags, timeout=60)
    assert served.returncode == 2
    assert error_line(served, "warmpod serve") == f"warmpod serve: error: {message}"
    edge = run_warmpod("edge", "serve", tmp_path / "bundle", *flags, timeout=60)
    assert edge.returncode == 2
    assert error_line(edge, "warmpod edge serve") == f"warmpod edge serve: error: {message}"


# ------------------------------------------------------------------------------------------ fairness

FORWARD_S = 0.02  # one forward pass of the slow model (it sleeps; one row per batch): capacity 50 requests/s
MAX_QUEUE = 32
FLOOD_RATE = 250.0  # A: five times the capacity
MODEST_RATE = 5.0  # B: a tenth of it
SLO_S = 0.25  # B's p99 bound; fair queuing gives about two forward passes (~0.05 s), a FIFO at least 0.64 s
FLOOD_S = 6.0
INFER = "/v2/models/slow/infer"
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]})


class Loads:
    """Two open loops at fixed rates (a flooder does not wait for its answers), bounded in count and time, on one
    event loop in a thread; each request's (sent, answered, status) kept per loop."""

    def __init__(self, url: str, loops: dict[str, tuple[dict[str, str], float, float, float]]) -> None:
        """`loops`: name → (headers, requests per second, start after s, stop after s)."""
        self.url, self.loops = url, loops
        self.results: dict[str, list[tuple[float, float, int | str]]] = {name: [] for name in loops}

    def run(self) -> Loads:
        thread = threading.Thread(target=lambda: asyncio.run(self._main()))
        thread.start()
        thread.join(max(stop for *_, stop in self.loops.values()) + 40)
        assert not thread.is_alive(), "the loads did not end"
        return self

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = time.monotonic() + 0.2
            await asyncio.gather(*(self._loop(session, name, t0) for name in self.loops))

    async def _loop(self, session: aiohttp.ClientSession, name: str, t0: float) -> None:
        headers, rate, start, stop = self.loops[name]
        headers = {"Content-Type": "application/json"} | headers
        tasks = []
        for i in range(math.ceil((stop - start) * rate)):  # bounded count, and the sends end at t0 + stop
            await asyncio.sleep(max(0.0, t0 + start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(self._send(session, name, headers)))
        await asyncio.gather(*tasks)

    async def _send(self, session: aiohttp.ClientSession, name: str, headers: dict[str, str]) -> None:
        sent = time.monotonic()
        status: int | str
        try:
            async with session.post(self.url + INFER, data=BODY, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            status = type(e).__name__
        self.results[name].append((sent, time.monotonic(), status))

    def statuses(self, name: str) -> dict[int | str, int]:
        counts: dict[int | str, int] = {}
        for _, _, status in self.results[name]:
            counts[status] = counts.get(status, 0) + 1
        return counts

    def p99(self, name: str) -> float:
        latencies = sorted(done - sent for sent, done, status in self.results[name] if status == 200)
        return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)] if latencies else math.inf


@pytest.fixture(scope="module")
def slow(workdir: Path) -> Iterator[WarmpodServer]:
    write_slow_dir(workdir / "slow-src", FORWARD_S)
    stage(workdir / "slow-src", workdir / "slow-store", "slow")
    args = ("--factory", "tests.server.factories:slow", "--api-key-file", str(write_keys(workdir / "slow-keys")),
            "--max-batch-size", "1", "--max-queue", str(MAX_QUEUE), "--workers", "1")  # fmt: skip
    with WarmpodServer(workdir / "slow-store", "slow", *args, log_dir=workdir) as server:
        yield server


def test_a_flooding_tenant_gets_the_503s_and_the_other_keeps_its_latency(slow: WarmpodServer) -> None:
    before = scrape(slow)
    fair = Loads(slow.url, {"A": (bearer("team-a"), FLOOD_RATE, 0.0, FLOOD_S),
                            "B": (bearer("team-b"), MODEST_RATE, 1.0, FLOOD_S)}).run()  # fmt: skip
    after = scrape(slow)
    a, b = fair.statuses("A"), fair.statuses("B")
    assert b == {200: len(fair.results["B"])}, b  # every one of B's requests answered
    assert a.get(503, 0) >= 0.5 * sum(a.values()), a  # A, at 5x the capacity, gets the 503s
    assert fair.p99("B") < SLO_S, fair.p99("B")
    rejected = {t: grew(before, after, "warmpod_tenant_requests_rejected_total", tenant=t, reason="queue_full")
                for t in ("team-a", "team-b")}  # fmt: skip
    assert rejected == {"team-a": a[503], "team-b": 0}
    # The same two loads as one tenant (B sends with A's key): the queue is a FIFO, B waits behind A's backlog
    # (MAX_QUEUE x FORWARD_S = 0.64 s) or finds it full (503).
    fifo = Loads(slow.url, {"A": (bearer("team-a"), FLOOD_RATE, 0.0, FLOOD_S),
                            "B": (bearer("team-a"), MODEST_RATE, 1.0, FLOOD_S)}).run()  # fmt: skip
    fifo_b = fifo.statuses("B")
    assert fifo_b.get(503, 0) > 0 or fifo.p99("B") > 2 * SLO_S, (fifo_b, fifo.p99("B"))
