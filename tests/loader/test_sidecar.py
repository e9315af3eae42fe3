"""`warmpod load --watch --port`: the native-sidecar mode, its HTTP endpoints, signals and the terminal UI."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.clients import http
from tests.kit.metrics import Scrape
from tests.kit.models import write_model_dir
from tests.kit.procs import free_port, wait_until
from tests.kit.warmpod import child_env, load_cmd


def get(url: str) -> tuple[int, str]:
    try:
        status, _, body = http("GET", url, timeout=5)
    except OSError:
        return 0, ""  # not listening yet
    return status, body.decode()


@contextlib.contextmanager
def watching_sidecar(source: Path, store: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`warmpod load SOURCE --watch 0.2 --port P` as a process; yields it and its base URL, always stops it."""
    port = free_port()
    proc = subprocess.Popen(
        load_cmd(source, "--model", "m", "--store", store, "--watch", "0.2", "--port", str(port)),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path, Path]]:
    src = write_model_dir(tmp_path / "src")
    store = tmp_path / "store"
    with watching_sidecar(src, store) as (proc, base):
        yield proc, base, src, store


def test_watching_sidecar_serves_health_ready_metrics_and_publishes_new_versions(
    sidecar: tuple[subprocess.Popen[str], str, Path, Path],
) -> None:
    proc, base, src, store = sidecar
    wait_until(lambda: get(f"{base}/ready")[0] == 200, timeout=30, what="/ready")
    assert get(f"{base}/healthz") == (200, json.dumps({"status": "alive"}))
    _, body = get(f"{base}/ready")
    assert json.loads(body) == {"ready": True, "model": "m", "version": "1"}

    metrics = Scrape(base)
    assert metrics.value("warmpod_loader_published_versions_total") == 1
    total = sum((src / p).stat().st_size for p in ("model.safetensors", "config.json", "tokenizer/vocab.txt"))
    assert metrics.value("warmpod_loader_bytes_total") == total
    assert metrics.value("warmpod_loader_load_duration_seconds_count") == 1
    assert metrics.total("warmpod_loader_throughput_bytes_per_second") > 0
    digest = json.loads((store / "m" / "current" / "manifest.json").read_text())["source"]["digest"]
    assert metrics.value("warmpod_loader_current_version_info", digest=digest, model="m", version="1") == 1

    write_model_dir(src, seed=7)  # a new upload: the watcher must publish version 2
    wait_until(lambda: json.loads(get(f"{base}/ready")[1]).get("version") == "2", timeout=30, what="version 2")
    metrics = Scrape(base)
    assert metrics.value("warmpod_loader_published_versions_total") == 2
    assert os.readlink(store / "m" / "current") == "versions/2"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]  # type: ignore[union-attr]
    kinds = [e["event"] for e in events]
    assert kinds.count("published") == 2 and kinds[-1] == "stopped"
    assert "unchanged" not in kinds  # polls that find nothing new stay quiet


def test_ready_is_503_until_a_version_exists_and_errors_are_counted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    missing = tmp_path / "not-yet"
    with watching_sidecar(missing, store) as (proc, base):
        wait_until(lambda: _errors(base) >= 2, timeout=30, what="two failed polls")
        assert get(f"{base}/ready")[0] == 503
        assert get(f"{base}/healthz")[0] == 200  # alive: a missing source is not a reason to restart
        write_model_dir(missing)
        wait_until(lambda: get(f"{base}/ready")[0] == 200, timeout=30, what="/ready after the source appears")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def _errors(base: str) -> float:
    if get(f"{base}/healthz")[0] != 200:
        return 0  # not listening yet
    return Scrape(base).value("warmpod_loader_errors_total", kind="not_found") or 0


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src", scale=16)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        load_cmd(src, "--model", "m", "--store", tmp_path / "store"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=secondary,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(primary)
    assert proc.wait(10) == 0
    text = screen.decode(errors="replace")
    assert "100%" in text and "m:" in text  # tqdm's bar, labelled with the model
    assert '"event"' not in text  # no JSON lines on a terminal
    assert json.loads(proc.stdout.read())["version"] == "1"  # type: ignore[union-attr]
