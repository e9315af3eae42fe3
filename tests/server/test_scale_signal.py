"""The scale signal over HTTP: a server under more load than its SLO allows reports `warmpod_scale_factor` > 1,
the same server idle reports 0, and `warmpod_workers` says how many forward passes it runs at once — read with
prometheus_client's parser, as the Prometheus Adapter or KEDA would."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kit.clients import LoadThread
from tests.kit.metrics import Scrape
from tests.kit.models import write_slow_dir
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer, stage

pytestmark = pytest.mark.timeout(90)


def gauge(server: WarmpodServer, name: str) -> float:
    value = Scrape(server.url).value(name)
    assert value is not None, f"{name} not in /metrics"
    return value


def test_scale_factor_rises_under_load_and_falls_when_idle(tmp_path: Path) -> None:
    stage(write_slow_dir(tmp_path / "src", sleep_s=0.02), tmp_path / "store", "slow")
    args = ("--factory", "tests.server.factories:slow", "--workers", "2", "--max-batch-size", "1",
            "--slo-target-ms", "30", "--signal-window", "2")  # fmt: skip
    with WarmpodServer(tmp_path / "store", "slow", *args, log_dir=tmp_path) as server:
        assert gauge(server, "warmpod_workers") == 2
        assert gauge(server, "warmpod_scale_factor") == 0
        # 8 clients on 2 workers of 20 ms each: queueing pushes p95 far past 30 ms.
        payload = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        load = LoadThread(f"{server.url}/v2/models/slow/infer", payload, workers=8, max_seconds=20).start()
        try:
            wait_until(lambda: gauge(server, "warmpod_scale_factor") > 1.5, timeout=15, what="scale factor > 1.5")
        finally:
            results = load.stop()
        assert results and all(r[2] == 200 for r in results)
        wait_until(lambda: gauge(server, "warmpod_scale_factor") < 0.1, timeout=15, what="scale factor back to 0")
