"""The server as a process: waiting for the loader, fatal model errors, overload, deadlines, SIGTERM drain under
load, and hot swap under load (zero failures, the old mapping released)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.kit.clients import LoadThread, http, post_json
from tests.kit.metrics import Scrape
from tests.kit.models import mlp_reference, write_mlp, write_slow_dir
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer, error_line, run_warmpod, stage

SLOW = "tests.server.factories:slow"


def infer_body(x: list[list[float]]) -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(x), len(x[0])], "data": x}]}


def test_waits_for_the_loader_then_serves(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with WarmpodServer(store, "mlp", log_dir=tmp_path).start(wait_ready=False) as server:
        assert http("GET", server.url + "/v2/health/live")[0] == 200
        assert http("GET", server.url + "/v2/health/ready")[0] == 503
        status, body = post_json(server.url + "/v2/models/mlp/infer", infer_body([[0, 0, 0, 0]]))
        assert status == 503 and "not ready yet (waiting for the loader)" in body["error"]
        src = write_mlp(tmp_path / "src")
        stage(src, store, "mlp")
        server.wait_ready(timeout=60)
        status, body = post_json(server.url + "/v2/models/mlp/infer", infer_body([[1, 2, 3, 4]]))
        assert status == 200, body
        np.testing.assert_allclose(
            body["outputs"][0]["data"], mlp_reference(src, np.array([[1, 2, 3, 4]]))[0], atol=1e-5
        )
        assert "ready: model mlp version 1 (mlp), cold start" in server.log()


def test_a_model_that_cannot_be_served_exits_5_naming_the_tensors(tmp_path: Path) -> None:
    src = write_mlp(tmp_path / "src", sizes=(4, 8, 3))
    config = (src / "config.json").read_text().replace('"hidden_sizes": [8]', '"hidden_sizes": [9]')
    (src / "config.json").write_text(config)
    stage(src, tmp_path / "store", "mlp")
    proc = run_warmpod("serve", "--model", "mlp", "--store", tmp_path / "store", "--port", "0")
    assert proc.returncode == 5, proc.stderr
    error = error_line(proc, "warmpod serve")
    assert "mis-shaped tensors: layers.0.weight is (8, 4) torch.float32, the model wants (9, 4)" in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size: must be at least 1"),
        (["--threads", "x"], "--threads: 'x' is not a number"),
        (["--max-body-bytes", "lots"], "--max-body-bytes"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_warmpod("serve", "--model", "m", "--store", tmp_path, *args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_overload_gets_503_with_retry_after_at_once(tmp_path: Path) -> None:
    stage(write_slow_dir(tmp_path / "src", sleep_s=0.5), tmp_path / "store", "slow")
    args = ("--factory", SLOW, "--max-queue", "2", "--max-batch-size", "1", "--max-batch-delay-ms", "0")
    with WarmpodServer(tmp_path / "store", "slow", *args, log_dir=tmp_path) as server:
        load = LoadThread(server.url + "/v2/models/slow/infer", infer_body([[1, 2, 3, 4]]), workers=10,
                          max_requests=40, max_seconds=10)  # fmt: skip
        results = load.start().wait()
        rejected = [r for r in results if r[2] == 503]
        assert len(rejected) >= len(results) // 2, [r[2] for r in results]
        assert all("batch queue is full" in r[3]["error"] for r in rejected)
        assert max(r[1] - r[0] for r in rejected) < 0.4  # refused at once, not after waiting for the 0.5 s forward
        assert {r[2] for r in results} <= {200, 503}
        assert all(r[4].get("Retry-After") == "1" for r in rejected)


def test_request_deadline_gives_504(tmp_path: Path) -> None:
    stage(write_slow_dir(tmp_path / "src", sleep_s=0.6), tmp_path / "store", "slow")
    args = ("--factory", SLOW, "--request-timeout", "0.2")
    with WarmpodServer(tmp_path / "store", "slow", *args, log_dir=tmp_path) as server:
        started = time.monotonic()
        status, body = post_json(server.url + "/v2/models/slow/infer", infer_body([[1, 2, 3, 4]]))
        assert status == 504 and "request deadline" in body["error"]
        assert time.monotonic() - started < 0.55
        # A request can ask for less than the server's limit (V2 parameters.timeout, microseconds) ...
        payload = {**infer_body([[1, 2, 3, 4]]), "parameters": {"timeout": 50_000}}
        status, body = post_json(server.url + "/v2/models/slow/infer", payload)
        assert status == 504
        # ... and a bad one is a 400.
        payload = {**infer_body([[1, 2, 3, 4]]), "parameters": {"timeout": -1}}
        status, body = post_json(server.url + "/v2/models/slow/infer", payload)
        assert status == 400 and "parameters.timeout must be a positive integer" in body["error"]
        assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    stage(write_slow_dir(tmp_path / "src", sleep_s=0.15), tmp_path / "store", "slow")
    args = ("--factory", SLOW, "--max-batch-size", "2", "--drain-grace", "20")
    server = WarmpodServer(tmp_path / "store", "slow", *args, log_dir=tmp_path).start()
    try:
        load = LoadThread(server.url + "/v2/models/slow/infer", infer_body([[1, 2, 3, 4]]), workers=8,
                          max_seconds=30, stop_on_status=503).start()  # fmt: skip
        wait_until(lambda: load.count(200) >= 8, timeout=20, what="8 requests served", interval=0.02)
        sigterm_at = time.monotonic()
        server.signal(signal.SIGTERM)
        ready_during_drain = http("GET", server.url + "/v2/health/ready", timeout=5)[0]
        assert server.wait(timeout=30) == 0, server.log()
        results = load.stop()
    finally:
        server.stop()
    outcomes = [r[2] for r in results]
    assert ready_during_drain == 503  # readiness turned false first
    failed = [r for r in results if r[2] not in (200, 503, "ClientConnectorError")]
    assert not failed, failed
    finished_during_drain = [r for r in results if r[2] == 200 and r[0] < sigterm_at < r[1]]
    assert finished_during_drain, "the requests in flight at SIGTERM were not finished"
    draining = [r for r in results if r[2] == 503]
    assert all("draining" in r[3]["error"] for r in draining), draining
    assert all(r[0] >= sigterm_at - 0.05 for r in draining), "a request before SIGTERM was refused"
    assert "draining:" in server.log(), outcomes


def test_hot_swap_under_load_has_no_failures_and_releases_the_old_mapping(tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1 = write_mlp(tmp_path / "v1", seed=1)
    v2 = write_mlp(tmp_path / "v2", seed=2)
    stage(v1, store, "mlp")
    x = [[0.5, -1.0, 2.0, 0.25]]
    want = {"1": mlp_reference(v1, np.array(x))[0], "2": mlp_reference(v2, np.array(x))[0]}
    with WarmpodServer(store, "mlp", log_dir=tmp_path) as server:
        assert server.proc is not None
        pid = server.proc.pid
        assert "/versions/1/model.safetensors" in Path(f"/proc/{pid}/maps").read_text()
        load = LoadThread(server.url + "/v2/models/mlp/infer", infer_body(x), workers=4, max_seconds=60).start()
        readiness = LoadThread(server.url + "/v2/health/ready", None, workers=1, max_seconds=60, method="GET").start()
        wait_until(lambda: load.count(200) >= 20, timeout=20, what="20 requests served by version 1", interval=0.02)
        stage(v2, store, "mlp")
        wait_until(lambda: any(r[3] and r[3].get("model_version") == "2" for r in list(load.results)), timeout=20,
                   what="a request served by version 2", interval=0.02)  # fmt: skip
        n = len(load.results)
        wait_until(lambda: len(load.results) >= n + 40, timeout=20, what="40 more requests", interval=0.02)
        results = load.stop()
        assert {r[2] for r in results} == {200}, {r[2] for r in results}
        ready = readiness.stop()
        assert len(ready) > 10 and {r[2] for r in ready} == {200}  # readiness stayed true through the swap
        for r in results:
            version = r[3]["model_version"]
            np.testing.assert_allclose(r[3]["outputs"][0]["data"], want[version], atol=1e-5)
        versions = [r[3]["model_version"] for r in sorted(results, key=lambda r: r[1])]
        assert versions[0] == "1" and versions[-30:] == ["2"] * 30
        maps = Path(f"/proc/{pid}/maps")  # the old version's pages are unmapped once its last request is done
        wait_until(lambda: "/versions/1/" not in maps.read_text(), timeout=5, what="version 1 unmapped",
                   diagnostics=maps.read_text)  # fmt: skip
        assert "/versions/2/model.safetensors" in maps.read_text()
        assert "swapped mlp: version 1 -> 2" in server.log()


def test_reuse_port_lets_two_servers_share_one_port(tmp_path: Path) -> None:
    from tests.kit.procs import free_port

    stage(write_mlp(tmp_path / "src"), tmp_path / "store", "mlp")
    port = str(free_port())
    args = ("--port", port, "--reuse-port")  # the last --port wins over the helper's --port 0
    with (
        WarmpodServer(tmp_path / "store", "mlp", *args, log_dir=tmp_path) as first,
        WarmpodServer(tmp_path / "store", "mlp", *args, log_dir=tmp_path) as second,
    ):
        assert first.port == second.port == int(port)
        # The kernel spreads connections over both, so readiness on the port says little: wait for both logs.
        wait_until(
            lambda: all("ready: model mlp" in s.log() for s in (first, second)),
            timeout=60,
            what="both servers' ready lines",
            diagnostics=lambda: first.log()[-2000:] + second.log()[-2000:],
        )
        assert all(http("GET", first.url + "/v2/health/ready")[0] == 200 for _ in range(20))
        # Without the flag the taken port is a clear error (exit 2), not a traceback.
        proc = run_warmpod("serve", "--model", "mlp", "--store", tmp_path, "--port", port, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_an_unreadable_store_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    """A broken manifest is no reason to stay 'not ready' forever: the server says what failed and exits 1."""
    store = tmp_path / "store"
    stage(write_mlp(tmp_path / "src"), store, "mlp")
    manifest = store / "mlp" / "versions" / "1" / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("{not json")
    proc = run_warmpod("serve", "--model", "mlp", "--store", store, "--port", "0")
    assert proc.returncode == 1, proc.stderr
    # the store's own error (CorruptVersion), naming the file and the fix, where a bare JSONDecodeError leaked before
    assert "warmpod serve: error: " in proc.stderr and "manifest.json: the manifest is not JSON" in proc.stderr
    assert "restage the model with `warmpod load`" in proc.stderr


def test_cold_start_metric_is_process_age_at_ready(tmp_path: Path) -> None:
    stage(write_mlp(tmp_path / "src"), tmp_path / "store", "mlp")
    spawned = time.monotonic()
    with WarmpodServer(tmp_path / "store", "mlp", log_dir=tmp_path) as server:
        ready_seen = time.monotonic() - spawned
        (cold,) = [s.value for s in Scrape(server.url).samples if s.name == "warmpod_cold_start_seconds"]
        assert 0 < cold <= ready_seen + 0.05  # never more than what the test itself saw from spawn to ready
