"""`warmpod up`: invalid settings and a missing source refused before anything starts; the supervisor scaling real
workers 1 → 2 → 1 on the latency SLO under a real load with zero failed requests; unreadable metrics → unknown
(logged once), never a scale-down; what it reports (the fleet's /metrics, a latency beyond the top bucket, a need
clipped at --max-replicas); and the serving flag it relies on (`--metrics-port` with `--reuse-port`: join when
ready, leave first)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.clients import LoadThread, http
from tests.kit.http_range import RangeHTTPServer
from tests.kit.metrics import MetricsPage, Scrape
from tests.kit.models import write_slow_dir
from tests.kit.procs import ChildProcess, free_port, wait_until
from tests.kit.warmpod import child_env, run_warmpod, stage, warmpod_cmd
from warmpod.pods.lines import METRICS_LINE
from warmpod.pods.policy import PolicyConfig
from warmpod.pods.supervisor import Supervisor, UpConfig, Worker, create_status_app
from warmpod.pods.up import FLAGS

SLOW = "tests.server.factories:slow"
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]}


# ------------------------------------------------------------------------------------------ bad settings


@pytest.mark.process
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is more than --max-replicas 2"),
        (["--panic-window", "90"], "--panic-window 90.0 is longer than --stable-window 60.0"),
        (["--stable-window", "-1"], "argument --stable-window: must be at least 0, got -1"),
        (["--panic-window", "-1"], "argument --panic-window: must be at least 0, got -1"),
        (["--scale-down-window", "-5"], "argument --scale-down-window: must be at least 0, got -5"),
        (["--slo-quantile", "1.5"], r"argument --slo-quantile: must be in (0, 1), got 1.5"),
        (["--slo-target-ms", "0"], "argument --slo-target-ms: must be at least 0.001, got 0"),
        (["--min-replicas", "0"], "argument --min-replicas: must be at least 1, got 0"),
        (["--max-replicas", "0"], "argument --max-replicas: must be at least 1, got 0"),
        (["--interval", "0"], "argument --interval: must be at least 0.001, got 0"),
        (["--interval", "nan"], "argument --interval: must be at least 0.001, got nan"),
        (["--watch", "0"], "argument --watch: must be at least 0.001, got 0"),
        (["--port", "70000"], "--port must be a port number (0 to 65535), got 70000"),
        (["--", "--port", "9000"], "--port is set by warmpod up: give it before --, to warmpod up itself"),
        (["--", "--slo-quantile=0.5"], "--slo-quantile is set by warmpod up: give it before --, to warmpod up itself"),
        (["--", "--po", "9000"], "unrecognized arguments: --po 9000"),  # no abbreviation slips past the check
        (["--", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
    ],
)
def test_invalid_settings_exit_2_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    store = tmp_path / "store"
    proc = run_warmpod("up", tmp_path / "missing-source", "--model", "m", "--store", store, "--port", "0", *args,
                       timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"warmpod up: error: {message}" in proc.stderr
    assert not store.exists()  # nothing was started: no loader ran


@pytest.mark.process
def test_a_taken_port_exits_2_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_warmpod("up", tmp_path / "src", "--model", "m", "--store", tmp_path / "store", "--port", port,
                           timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"warmpod up: error: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.process
def test_a_failing_loader_stops_everything_with_its_exit_code(tmp_path: Path) -> None:
    """The source is there (the check before starting passes), but its weights are not safetensors: the loader
    fails while the first worker is starting."""
    src = tmp_path / "broken-model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"not a safetensors file at all")
    proc = run_warmpod("up", src, "--model", "m", "--store", tmp_path / "store", "--port", "0", timeout=60)
    assert proc.returncode == 5, proc.stderr  # the loader's "invalid model"
    assert "warmpod load exited 5" in proc.stderr
    assert "w1 stopped" in proc.stderr  # the worker started alongside the load was drained, not left behind


@pytest.mark.process
@pytest.mark.parametrize("where", ["local", "http"])
def test_a_missing_source_exits_3_with_the_loaders_message_before_anything_starts(
    tmp_path: Path, http_server: Callable[..., RangeHTTPServer], where: str
) -> None:
    """Checked the way `warmpod load` resolves a source (a path or a URL alike): exit 3 with the loader's message,
    no "serving" line, no worker, no loader."""
    source = str(tmp_path / "no-such-model") if where == "local" else http_server(tmp_path).url_for("no-such-model")
    store = tmp_path / "store"
    proc = run_warmpod("up", source, "--model", "m", "--store", store, "--port", "0", timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"warmpod up: error: {source}: not found"]  # nothing else happened
    assert not store.exists()


@pytest.mark.unit
def test_a_missing_source_starts_no_child_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The supervisor itself: its children's interpreter is a tripwire that records any start (loader or worker)."""
    tripwire, started = tmp_path / "python", tmp_path / "started"
    tripwire.write_text(f'#!/bin/sh\necho "$@" >> {started}\nexit 1\n')
    tripwire.chmod(0o755)
    missing = tmp_path / "no-such-model"
    config = UpConfig(source=str(missing), model="m", store=tmp_path / "store", policy=PolicyConfig(max_replicas=2),
                      port=0, python=str(tripwire))  # fmt: skip
    assert asyncio.run(Supervisor(config).run()) == 3
    assert capsys.readouterr().err == f"warmpod up: error: {missing}: not found\n"
    assert not started.exists()


@pytest.mark.process
def test_a_worker_that_cannot_start_stops_everything_with_its_exit_code(tmp_path: Path) -> None:
    src = write_slow_dir(tmp_path / "src", sleep_s=0.01)
    proc = run_warmpod("up", src, "--model", "slow", "--store", tmp_path / "store", "--port", "0",
                       "--", "--factory", "tests.server.factories:broken")  # fmt: skip
    assert proc.returncode == 5, proc.stderr  # the server's "invalid model": restarting it would not help
    assert "w1 exited 5 before it was ready" in proc.stderr
    assert "[w1] warmpod serve: error:" in proc.stderr and "this factory always fails" in proc.stderr


# ------------------------------------------------------------------------------------------ unknown replicas


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)

    async def wait(self) -> int:
        raise AssertionError("not used")


class FakeWorkerMetrics:
    """Two workers' /metrics as the real server writes them, each tick serving 10 requests of 12 ms (10 forward
    passes of 10 ms) unless told otherwise; or, for the broken one, an error or garbage. `gets` counts the scrapes."""

    def __init__(self) -> None:
        self.pages = {port: MetricsPage("slow", workers=1) for port in (9001, 9002)}
        self.broken: Exception | str | None = None
        self.gets = 0

    def serve_a_tick(self, requests: int = 10, latency_s: float = 0.012, batch_s: float = 0.01) -> None:
        for page in self.pages.values():
            page.serve(requests, latency_s, batches=requests, batch_s=batch_s)

    async def get(self, url: str) -> tuple[int, str]:
        self.gets += 1
        port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
        if port == 9002 and isinstance(self.broken, Exception):
            raise self.broken
        if port == 9002 and isinstance(self.broken, str):
            return 200, self.broken
        return 200, self.pages[port].text()


@pytest.mark.unit
def test_unreadable_metrics_make_a_replica_unknown_never_a_scale_down(caplog: pytest.LogCaptureFixture) -> None:
    """Light load on two workers: the policy would go down to one, but not while w2's metrics are unreadable
    (refused, garbage, another program's metrics, HTTP 500): w2 is unknown, logged once; no crash. Once w2 is
    readable again, the scale-down happens."""
    policy = PolicyConfig(max_replicas=2, stable_window_s=2, panic_window_s=1, scale_down_window_s=1)
    config = UpConfig(source="unused", model="slow", store=Path("/nonexistent"), policy=policy)
    fake, now = FakeWorkerMetrics(), [0.0]
    supervisor = Supervisor(config, clock=lambda: now[0], http_get=fake.get)
    w1, w2 = FakeProcess(101), FakeProcess(102)
    supervisor.workers = [Worker("w1", w1, 0.0, "ready", 9001), Worker("w2", w2, 1.0, "ready", 9002)]
    supervisor.target = 2

    async def ticks(n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            now[0] += 1.0
            fake.serve_a_tick()
            await supervisor.tick()
            out.append(supervisor.status())
        return out

    async def scenario() -> None:
        caplog.set_level(logging.INFO, "warmpod.up")
        fake.broken = aiohttp.ClientConnectionError("Connection refused")
        statuses = await ticks(3)
        for broken in ("garbage\x00{", "# TYPE other counter\nother_total 1\n", OSError("unreachable")):
            fake.broken = broken
            statuses += await ticks(2)
        assert all(s["replicas"] == 2 and s["unknown"] == ["w2"] for s in statuses), statuses
        assert "no scale-down while w2 is unknown" in statuses[-1]["decision"]
        assert w2.signals == [] and w1.signals == []
        warnings = [r.getMessage() for r in caplog.records if "metrics unreadable" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once per change of state, not every tick
        assert warnings[0].startswith("w2: metrics unreadable (http://127.0.0.1:9002/metrics unreachable")
        fake.broken = None
        statuses = await ticks(3)
        assert statuses[-1]["unknown"] == [] and statuses[-1]["replicas"] == 1, statuses
        assert w2.signals == [signal.SIGTERM] and w1.signals == []  # the newest one drains
        assert any(r.getMessage() == "w2: metrics readable again" for r in caplog.records)

    asyncio.run(scenario())


@pytest.mark.unit
def test_a_non_warmpod_metrics_page_says_why(caplog: pytest.LogCaptureFixture) -> None:
    config = UpConfig(source="unused", model="slow", store=Path("/nonexistent"), policy=PolicyConfig(max_replicas=2))
    fake = FakeWorkerMetrics()
    fake.broken = "# TYPE other counter\nother_total 1\n"
    supervisor = Supervisor(config, http_get=fake.get)
    worker = Worker("w2", FakeProcess(1), 0.0, "ready", 9002)
    result = asyncio.run(supervisor.scrape(worker))
    assert isinstance(result, str) and result.startswith("not a warmpod server's metrics at http://127.0.0.1:9002")


# ------------------------------------------------------------------------------------------ what it reports


def two_ready_workers(policy: PolicyConfig, fake: FakeWorkerMetrics, now: list[float]) -> Supervisor:
    """A supervisor (with `warmpod up`'s flags) of two ready workers whose metrics are `fake`'s, on the clock `now`."""
    config = UpConfig(source="unused", model="slow", store=Path("/nonexistent"), policy=policy, flags=FLAGS)
    supervisor = Supervisor(config, clock=lambda: now[0], http_get=fake.get)
    supervisor.workers = [Worker("w1", FakeProcess(101), 0.0, "ready", 9001),
                          Worker("w2", FakeProcess(102), 1.0, "ready", 9002)]  # fmt: skip
    supervisor.target = 2
    return supervisor


async def get_status_port(supervisor: Supervisor, path: str) -> tuple[int, str, str]:
    """GET `path` from the supervisor's status app, served on 127.0.0.1 for the call: status, content type, body."""
    runner = web.AppRunner(create_status_app(supervisor), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, response.headers["Content-Type"], await response.text()
    finally:
        await runner.cleanup()


def samples(text: str, name: str) -> dict[str, float]:
    """`worker` label → value of the samples called `name` (requests to /v2/models/slow/infer answered 200)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and {k: v for k, v in s.labels.items() if k != "worker"} in ({}, INFER_200):
                assert s.labels.get("worker", "-") not in found, s
                found[s.labels.get("worker", "-")] = s.value
    return found


INFER_200 = {"model": "slow", "endpoint": "infer", "code": "200"}


@pytest.mark.unit
def test_the_status_port_metrics_are_every_workers_last_scrape_with_a_worker_label() -> None:
    """GET /metrics on the status port: each ready worker's metrics as the last tick read them (no second scrape),
    each sample labelled with its worker; the supervisor's replica counts; a worker whose metrics are unreadable is
    left out until they are readable."""
    fake, now = FakeWorkerMetrics(), [0.0]
    supervisor = two_ready_workers(PolicyConfig(min_replicas=2, max_replicas=2), fake, now)  # both stay

    async def scenario() -> None:
        for extra in (0, 5):  # w2 serves 5 more requests in the second tick
            now[0] += 1.0
            fake.serve_a_tick()
            fake.pages[9002].serve(extra, 0.012)
            await supervisor.tick()
        assert fake.gets == 4
        status, content_type, text = await get_status_port(supervisor, "/metrics")
        assert status == 200 and content_type.startswith("text/plain"), content_type
        assert fake.gets == 4  # the ticks' scrapes, reused
        assert samples(text, "warmpod_request_duration_seconds_count") == {"w1": 20, "w2": 25}
        assert samples(text, "warmpod_workers") == {"w1": 1, "w2": 1}
        assert samples(text, "warmpod_up_replicas") == {"-": 2}
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["warmpod_request_duration_seconds"].type == "histogram"
        ready = [s for s in families["warmpod_up_workers"].samples if s.labels == {"phase": "ready"}]
        assert [s.value for s in ready] == [2]

        fake.broken = aiohttp.ClientConnectionError("Connection refused")
        now[0] += 1.0
        fake.serve_a_tick()
        await supervisor.tick()
        _, _, text = await get_status_port(supervisor, "/metrics")
        assert supervisor.status()["unknown"] == ["w2"]
        assert samples(text, "warmpod_request_duration_seconds_count") == {"w1": 30}  # w2 left out, not stale

    asyncio.run(scenario())


@pytest.mark.unit
def test_a_latency_beyond_the_top_bucket_is_shown_as_above_it() -> None:
    """Requests of 30 s against the server's top finite bucket of 10 s: "p95 > 10 s", and /status says the quantile
    is above 10000 ms (observed null), instead of "10000 ms"."""
    fake, now = FakeWorkerMetrics(), [0.0]
    supervisor = two_ready_workers(PolicyConfig(max_replicas=2), fake, now)

    async def scenario() -> None:
        for _ in range(2):
            now[0] += 1.0
            fake.serve_a_tick(requests=1, latency_s=30.0, batch_s=0.01)
            await supervisor.tick()
        status, _, body = await get_status_port(supervisor, "/status")
        assert status == 200
        latency = json.loads(body)["latency_ms"]
        assert latency == {"quantile": 0.95, "target": 100.0, "observed": None, "observed_above": 10000.0}
        line = supervisor.status_line()
        assert " p95 > 10 s (target 100 ms) " in line and "10000" not in line, line
        assert supervisor.status()["decision"].startswith("panic: p95 > 10 s, over the 100 ms target")

    asyncio.run(scenario())


@pytest.mark.unit
def test_a_burst_clipped_at_max_replicas_says_so() -> None:
    """Latency within the target, but forward passes of 50 ms always busy: the burst needs more replicas than
    --max-replicas 2 allows. The status says both numbers and the flag; nothing more is started."""
    fake, now = FakeWorkerMetrics(), [0.0]
    supervisor = two_ready_workers(PolicyConfig(max_replicas=2), fake, now)

    async def scenario() -> None:
        for _ in range(2):
            now[0] += 1.0
            fake.serve_a_tick(requests=20, latency_s=0.06, batch_s=0.05)
            await supervisor.tick()

    asyncio.run(scenario())
    status = supervisor.status()
    match = re.fullmatch(r"panic: burst needs (\d+), clipped to --max-replicas 2", status["decision"])
    assert match is not None and int(match.group(1)) > 2, status
    assert status["replicas"] == 2 and len(supervisor.workers) == 2
    assert supervisor.status_line().endswith(f"rps: panic: burst needs {match.group(1)}, clipped to --max-replicas 2")


# ------------------------------------------------------------------------------------------ the serving flag


def refuses_connections(url: str) -> bool:
    try:
        http("GET", url + "/v2/health/live", timeout=5)
    except OSError:
        return True
    return False


@pytest.mark.process
def test_serve_with_metrics_port_joins_the_shared_port_when_ready_and_leaves_it_first(tmp_path: Path) -> None:
    store, port = tmp_path / "store", free_port()
    shared = f"http://127.0.0.1:{port}"
    args = ("serve", "--model", "slow", "--store", store, "--port", str(port), "--reuse-port", "--metrics-port", "0",
            "--factory", SLOW)  # fmt: skip
    serve = ChildProcess(warmpod_cmd(*args), log_path=tmp_path / "serve.log", ready=METRICS_LINE,
                          name="warmpod serve --metrics-port", env=child_env())  # fmt: skip
    with serve:
        assert serve.match is not None
        private = f"http://127.0.0.1:{serve.match.group(1)}"
        assert http("GET", private + "/v2/health/live")[0] == 200
        assert http("GET", private + "/v2/health/ready")[0] == 503
        assert refuses_connections(shared)  # not ready: not on the shared port, so a sibling would get the connection
        stage(write_slow_dir(tmp_path / "src", sleep_s=0.5), store, "slow")
        wait_until(lambda: http("GET", private + "/v2/health/ready")[0] == 200, timeout=60, what="ready")
        serve.wait_for(re.compile("listening on"), timeout=10)  # joined
        body = json.dumps(INFER).encode()
        in_flight: list[int] = []
        request = threading.Thread(target=lambda: in_flight.append(http("POST", shared + "/v2/models/slow/infer",
                                                                         body)[0]))  # fmt: skip
        request.start()
        wait_until(lambda: Scrape(private).total("warmpod_inflight_requests") > 0, timeout=10,
                   what="the 0.5 s forward running")  # fmt: skip
        serve.signal(signal.SIGTERM)

        def left_while_draining() -> bool:
            serve.check_alive()  # left the shared port at once, not when it exited: new connections go to the others
            return refuses_connections(shared)

        wait_until(left_while_draining, timeout=5, what="the shared port left", interval=0.02)
        request.join(10)
        assert in_flight == [200]  # ... and the request in flight was finished
        assert serve.wait(30) == 0


# ------------------------------------------------------------------------------------------ end to end


class Up(ChildProcess):
    """`warmpod up` as a child process; its URLs read back from its first line."""

    STARTED = re.compile(r"on (http://[\d.]+:\d+) with .*; status on (http://\S+/status), fleet metrics on "
                         r"(http://\S+)/metrics$", re.M)  # fmt: skip

    def __init__(self, tmp_path: Path, *args: str | Path) -> None:
        super().__init__(warmpod_cmd("up", *args), log_path=tmp_path / "up.log", ready=self.STARTED,
                         name="warmpod up", env=child_env(), stop_timeout=60)  # fmt: skip
        self.start(timeout=30)
        assert self.match is not None
        self.url, self.status_url, self.metrics_base = self.match.groups()

    def status(self) -> dict[str, Any]:
        status, _, body = http("GET", self.status_url, timeout=5)
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def wait_status(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> float:
        """Seconds until `predicate` holds for the status page."""
        return wait_until(lambda: predicate(self.status()), timeout=timeout, what=what, interval=0.1,
                          diagnostics=lambda: f"{self.status()}\n{self.log()[-6000:]}")  # fmt: skip


@pytest.mark.process
def test_a_worker_that_dies_is_replaced_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """With a watching loader (a sidecar that keeps running): a worker killed by SIGKILL is replaced; Ctrl-C drains
    the worker and stops the loader, exit 0."""
    src = write_slow_dir(tmp_path / "src", sleep_s=0.01)
    up = Up(tmp_path, src, "--model", "slow", "--store", tmp_path / "store", "--port", "0", "--max-replicas", "1",
            "--interval", "0.5", "--watch", "0.5", "--", "--factory", SLOW)  # fmt: skip
    try:
        up.wait_status("one ready worker", lambda s: s["ready"] == 1, timeout=60)
        first = up.status()["workers"][0]
        os.kill(first["pid"], signal.SIGKILL)
        up.wait_status("a replacement", lambda s: [(w["name"], w["phase"]) for w in s["workers"]] == [("w2", "ready")],
                       timeout=60)  # fmt: skip
        assert http("POST", up.url + "/v2/models/slow/infer", json.dumps(INFER).encode())[0] == 200
        # The fleet's /metrics: the replacement's request, under its name, once a tick has scraped it; w1 is gone.
        wait_until(lambda: samples(http("GET", up.metrics_base + "/metrics")[2].decode(),
                                   "warmpod_request_duration_seconds_count") == {"w2": 1},
                   timeout=10, what="w2's request in the status port's /metrics")  # fmt: skip
        replacement = up.status()["workers"][0]
        up.signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(60) == 0
    finally:
        up.stop()
    log = up.log()
    assert "w1 exited unexpectedly (code -9); starting a replacement" in log
    assert "w2 stopped (exit 0)" in log and "stopped" in log.splitlines()[-1]
    assert '"event": "stopped", "reason": "signal"' in log  # the watching loader, stopped by warmpod up
    with pytest.raises(ProcessLookupError):
        os.kill(replacement["pid"], 0)


@pytest.mark.process
def test_scales_1_to_2_when_the_slo_breaks_under_load_and_back_to_1_with_zero_failed_requests(tmp_path: Path) -> None:
    """A 30 ms forward with one forward at a time: one worker and 9 clients is ~270 ms per request (target 200 ms).
    The supervisor starts a second worker; once the heavy clients stop, the light one (under one worker's capacity)
    keeps running while it drains the second. Every request of both transitions is a 200."""
    src = write_slow_dir(tmp_path / "src", sleep_s=0.03)
    policy = ("--max-replicas", "2", "--slo-target-ms", "200", "--interval", "0.5", "--stable-window", "4",
              "--panic-window", "1", "--scale-down-window", "3")  # fmt: skip
    serve = ("--factory", SLOW, "--max-batch-size", "1", "--drain-grace", "10")
    up = Up(tmp_path, src, "--model", "slow", "--store", tmp_path / "store", "--port", "0", *policy, "--", *serve)
    heavy = light = None
    try:
        up.wait_status("one ready worker", lambda s: s["ready"] == 1, timeout=60)
        infer = up.url + "/v2/models/slow/infer"
        # A new connection per request, so SO_REUSEPORT spreads them over the workers; stopped here, not by a count.
        light = LoadThread(infer, INFER, workers=1, pause_s=0.15, max_requests=10**6).start()
        heavy = LoadThread(infer, INFER, workers=8, max_requests=10**6).start()
        scale_up = up.wait_status("2 ready workers", lambda s: s["ready"] == 2, timeout=30)
        status = up.status()
        assert status["replicas"] == 2 and "panic" in status["decision"], status
        second = next(w for w in status["workers"] if w["name"] == "w2")
        second_metrics = f"http://127.0.0.1:{second['metrics_port']}"

        def served_by_second() -> float:
            count = Scrape(second_metrics).value("warmpod_request_duration_seconds_count", code="200",
                                                 endpoint="infer", model="slow")  # fmt: skip
            return count or 0.0

        # The second worker takes its share of the new connections (more than 10), under more than 100 heavy requests.
        wait_until(lambda: served_by_second() > 10 and len(heavy.results) > 100, timeout=15,
                   what="w2 serving more than 10 of more than 100 heavy requests",
                   diagnostics=lambda: f"w2 served {served_by_second()} of {len(heavy.results)}")  # fmt: skip
        heavy_results = heavy.stop()
        scale_down = up.wait_status("back to 1 worker", lambda s: s["replicas"] == 1 and len(s["workers"]) == 1,
                                    timeout=40)  # fmt: skip
        # The light client goes on after the scale-down, on the one worker left: a few more requests, over 20 in all.
        after_scale_down = len(light.results)
        wait_until(lambda: len(light.results) >= max(after_scale_down + 3, 21), timeout=15,
                   what="light requests answered by the one worker left")  # fmt: skip
        light_results = light.stop()
    finally:
        for traffic in (heavy, light):
            if traffic is not None:
                traffic.stop()
        up.stop()
    log = up.log()
    assert up.proc is not None and up.proc.returncode == 0, log[-4000:]
    results = heavy_results + light_results
    failed = [r for r in results if r[2] != 200]
    assert not failed, (failed[:10], len(results))
    assert len(heavy_results) > 100 and len(light_results) > 20
    assert re.search(r"draining w2 \(pid \d+\)", log) and "w2 stopped (exit 0)" in log, log[-4000:]
    assert "w1 stopped (exit 0)" in log  # ... and on SIGTERM the last one drained too
    print(f"scale-up {scale_up:.1f} s, scale-down {scale_down:.1f} s after the load, {len(results)} requests")
    for pid in (w["pid"] for w in status["workers"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
