"""`warmpod load` from real servers on 127.0.0.1: moto (S3), an HTTP server with Range support, SeaweedFS, and a
fault-injecting proxy in front of them. Every load runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.kit.fault_proxy import FaultProxy
from tests.kit.http_range import RangeHTTPServer
from tests.kit.models import minilm_dir, tree_digests, write_model, write_model_dir
from tests.kit.procs import wait_until
from tests.kit.s3 import MotoServer, S3Bucket, SeaweedServer
from tests.kit.warmpod import child_env, error_line, events, load_cmd, published_nothing, result_json, run_load
from warmpod.store import open_model

SECRET = "s3cr3t-never-logged-0xC0FFEE"


def staged_tree(store: Path, model: str) -> dict[str, str]:
    digests = tree_digests(store / model / "current")
    del digests["manifest.json"]
    return digests


def s3_env(server: MotoServer | SeaweedServer, endpoint: str | None = None) -> dict[str, str]:
    return server.env(endpoint)


def moto_env_secret(server: MotoServer, endpoint: str) -> dict[str, str]:
    """moto accepts any credentials; a distinctive secret lets the test prove it never reaches logs."""
    return {**server.env(endpoint), "AWS_SECRET_ACCESS_KEY": SECRET}


def test_real_minilm_from_a_local_directory_is_byte_identical(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = result_json(run_load(minilm_dir(), "--model", "all-MiniLM-L6-v2", "--store", store))
    expected = {k: v for k, v in tree_digests(minilm_dir()).items() if not k.startswith(".")}
    assert staged_tree(store, "all-MiniLM-L6-v2") == expected
    reference = load_file(str(minilm_dir() / "model.safetensors"))
    got = open_model(store, "all-MiniLM-L6-v2").tensors()
    assert out["version"] == "1" and set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_real_minilm_from_s3_is_byte_identical(
    tmp_path: Path, moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy
) -> None:
    moto_bucket.upload_dir(minilm_dir(), prefix="minilm/")
    store = tmp_path / "store"
    proc = run_load(
        moto_bucket.uri("minilm"),
        "--model",
        "minilm",
        "--store",
        store,
        env=moto_env_secret(moto_s3, moto_proxy.endpoint),
    )
    out = result_json(proc)
    expected = {k: v for k, v in tree_digests(minilm_dir()).items() if not k.startswith(".")}
    assert staged_tree(store, "minilm") == expected
    manifest = json.loads((store / "minilm" / "current" / "manifest.json").read_text())
    assert manifest["source"]["uri"] == moto_bucket.uri("minilm")
    assert all("ETag" in ident for ident in manifest["source"]["identity"].values())
    assert SECRET not in proc.stdout + proc.stderr + json.dumps(manifest)
    assert out["bytes"] == sum(f["size"] for f in manifest["files"])
    assert moto_proxy.stats().ranged_gets >= 2  # data came in ranges, not one GET


def test_s3_missing_object_is_not_found_without_retries(
    tmp_path: Path, moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy
) -> None:
    uri = moto_bucket.uri("nothing/here.safetensors")
    proc = run_load(uri, "--model", "m", "--store", tmp_path / "store", env=s3_env(moto_s3, moto_proxy.endpoint))
    assert proc.returncode == 3
    assert error_line(proc) == f"warmpod load: error: {uri}: not found"
    assert moto_proxy.stats().total <= 4  # a HEAD and a listing or two: no retry storm
    assert not any(e["event"] == "retry" for e in events(proc.stderr))


def test_s3_access_denied_fails_fast(
    tmp_path: Path, moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy
) -> None:
    write_model_dir(tmp_path / "src")
    moto_bucket.upload_dir(tmp_path / "src", prefix="private/")
    moto_proxy.configure(status_for_prefix={f"/{moto_bucket.name}/": 403})
    proc = run_load(
        moto_bucket.uri("private"),
        "--model",
        "m",
        "--store",
        tmp_path / "store",
        env=s3_env(moto_s3, moto_proxy.endpoint),
    )
    assert proc.returncode == 4
    assert "access denied" in error_line(proc) and moto_bucket.uri("private") in error_line(proc)
    assert moto_proxy.stats().total <= 4
    assert published_nothing(tmp_path / "store", "m")


def test_flaky_object_store_load_completes_byte_identical(
    tmp_path: Path, moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy
) -> None:
    src = write_model_dir(tmp_path / "src", scale=8, shards=2)
    moto_bucket.upload_dir(src, prefix="m/")
    moto_proxy.configure(seed=3, fail_fraction=0.25, reset_fraction=0.15)
    store = tmp_path / "store"
    proc = run_load(
        moto_bucket.uri("m"),
        "--model",
        "m",
        "--store",
        store,
        "--chunk-size",
        "64KiB",
        "--concurrency",
        "4",
        env=s3_env(moto_s3, moto_proxy.endpoint),
    )
    result_json(proc)
    assert staged_tree(store, "m") == tree_digests(src)
    stats = moto_proxy.stats()
    retries = [e for e in events(proc.stderr) if e["event"] == "retry"]
    assert stats.failed > 0 and stats.resets > 0
    assert len(retries) >= stats.failed + stats.resets - 1  # every injected fault was retried


def test_object_store_that_keeps_failing_gives_up_with_a_clear_error(
    tmp_path: Path, moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy
) -> None:
    write_model(tmp_path / "src" / "model.safetensors")
    moto_bucket.upload_dir(tmp_path / "src", prefix="m/")
    moto_proxy.configure(fail_fraction=1.0)
    started = time.monotonic()
    proc = run_load(
        moto_bucket.uri("m"),
        "--model",
        "m",
        "--store",
        tmp_path / "store",
        env=s3_env(moto_s3, moto_proxy.endpoint),
    )
    assert proc.returncode == 8
    assert "gave up after 5 attempts" in error_line(proc)
    assert moto_proxy.stats().failed == 5  # the header read, retried: bounded attempts, then stop
    assert time.monotonic() - started < 30
    assert published_nothing(tmp_path / "store", "m")


def test_http_directory_source(tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer]) -> None:
    src = write_model_dir(tmp_path / "www" / "model", shards=2)
    server = http_server(tmp_path / "www")
    store = tmp_path / "store"
    result_json(run_load(server.url_for("model"), "--model", "m", "--store", store, "--chunk-size", "16KiB"))
    assert staged_tree(store, "m") == tree_digests(src)
    assert server.requests.count("GET", ranged=True) >= 4


def test_http_directory_without_an_index_page_is_probed_by_name(
    tmp_path: Path, http_server: Callable[..., RangeHTTPServer]
) -> None:
    src = write_model_dir(tmp_path / "www" / "model", shards=2)
    (src / "tokenizer.json").write_text("{}")
    server = http_server(tmp_path / "www", list_dirs=False)
    store = tmp_path / "store"
    result_json(run_load(server.url_for("model"), "--model", "m", "--store", store))
    expected = tree_digests(src)
    del expected["tokenizer/vocab.txt"]  # not a name the loader knows to ask for, and no page lists it
    assert staged_tree(store, "m") == expected


def test_http_single_file_with_credentials_in_the_url_is_redacted(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer]
) -> None:
    write_model(tmp_path / "www" / "w.safetensors")
    server = http_server(tmp_path / "www")
    url = server.url_for("w.safetensors").replace("http://", f"http://user:{SECRET}@")
    proc = run_load(url, "--model", "m", "--store", tmp_path / "store")
    result_json(proc)
    manifest = (tmp_path / "store" / "m" / "current" / "manifest.json").read_text()
    assert SECRET not in proc.stdout + proc.stderr + manifest
    assert json.loads(manifest)["source"]["uri"] == server.url_for("w.safetensors")


def _slow_http_load(
    tmp_path: Path,
    http_server: Callable[[Path], RangeHTTPServer],
    fault_proxy: Callable[..., FaultProxy],
    delay: float = 0.1,
    scale: int = 16,
    shards: int = 1,
) -> tuple[Path, FaultProxy, list[str]]:
    """A model behind a proxy that delays each range: loads take seconds, so tests can act mid-load."""
    src = write_model_dir(tmp_path / "www" / "model", scale=scale, shards=shards)
    proxy = fault_proxy(http_server(tmp_path / "www").url, delay_s=delay)
    args = [
        f"{proxy.endpoint}/model",
        "--model",
        "m",
        "--store",
        str(tmp_path / "store"),
        "--chunk-size",
        "64KiB",
        "--concurrency",
        "1",
    ]
    return src, proxy, args


def _start_mid_load(args: list[str], proxy: FaultProxy, ranges: int) -> subprocess.Popen[str]:
    """Start the CLI and return once the proxy has seen `ranges` ranged GETs: the load is under way."""
    proc = subprocess.Popen(load_cmd(*args), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: proxy.stats().ranged_gets >= ranges, timeout=30, what=f"{ranges} ranges")
    return proc


def test_size_changed_mid_load_publishes_nothing(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer], fault_proxy: Callable[..., FaultProxy]
) -> None:
    src, proxy, args = _slow_http_load(tmp_path, http_server, fault_proxy)
    proc = _start_mid_load(args, proxy, ranges=3)
    write_model(src / "model.safetensors", scale=2)  # the upload is replaced by a smaller one mid-load
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 6, stderr
    assert "source changed during load" in stderr and "nothing was published" in stderr
    assert published_nothing(tmp_path / "store", "m")


def test_same_size_rewrite_mid_load_is_caught_by_identity(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer], fault_proxy: Callable[..., FaultProxy]
) -> None:
    src, proxy, args = _slow_http_load(tmp_path, http_server, fault_proxy)
    proc = _start_mid_load(args, proxy, ranges=3)
    before = (src / "model.safetensors").stat()
    write_model(src / "model.safetensors", seed=9, scale=16)  # same shapes, same size, new bytes
    os.utime(src / "model.safetensors", ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 6, stderr
    assert "source changed during load" in stderr
    assert published_nothing(tmp_path / "store", "m")


def test_sigterm_mid_load_stops_promptly_and_cleans_staging(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer], fault_proxy: Callable[..., FaultProxy]
) -> None:
    _, proxy, args = _slow_http_load(tmp_path, http_server, fault_proxy)
    proc = _start_mid_load(args, proxy, ranges=3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - sent < 5
    assert [e["event"] for e in events(stderr)][-1] == "stopped"
    staging = tmp_path / "store" / "m" / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert published_nothing(tmp_path / "store", "m")


class CurrentReader(threading.Thread):
    """Keeps opening `current` and checking its bytes while loaders are killed around it."""

    def __init__(self, store: Path, expected: dict[str, torch.Tensor]) -> None:
        super().__init__(daemon=True)
        self.store, self.expected = store, expected
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                model = open_model(self.store, "m")
                if model.version == "1":
                    got = model.tensors()
                    if not all(torch.equal(got[k], v) for k, v in self.expected.items()):
                        self.errors.append("version 1 bytes changed")
                self.reads += 1
            except Exception as e:
                self.errors.append(repr(e))


def test_sigkill_at_several_points_never_harms_current_and_restart_completes(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer], fault_proxy: Callable[..., FaultProxy]
) -> None:
    store = tmp_path / "store"
    v1 = write_model_dir(tmp_path / "v1")
    result_json(run_load(v1, "--model", "m", "--store", store))
    expected = load_file(str(v1 / "model.safetensors"))
    src, proxy, args = _slow_http_load(tmp_path, http_server, fault_proxy, delay=0.05, shards=2)
    reader = CurrentReader(store, expected)
    reader.start()
    big = "model-00001-of-00002.safetensors"  # ~1 MiB: 17 ranges of 64 KiB, streamed first
    try:
        # Kill during the header reads, early in the big shard, and once it is complete (2 header reads + 17).
        for kill_after in (1, 6, 22):
            proxy.reset_stats()
            proc = _start_mid_load(args, proxy, ranges=kill_after)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert os.readlink(store / "m" / "current") == "versions/1"
        proxy.reset_stats()
        proc = subprocess.Popen(
            load_cmd(*args), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    finally:
        reader.stop.set()
        reader.join(10)
    assert reader.errors == [] and reader.reads > 10
    assert json.loads(stdout)["version"] == "2"
    assert staged_tree(store, "m") == tree_digests(src)
    reused = [e["file"] for e in events(stderr) if e["event"] == "file_staged" and e["reused_from_staging"]]
    assert big in reused
    assert proxy.requests.count("GET", path_prefix=f"/model/{big}", ranged=True) == 1  # its header, re-validated
    assert not any((store / "m" / "staging").iterdir())


@pytest.mark.seaweed
def test_real_minilm_end_to_end_through_seaweedfs(
    tmp_path: Path, seaweed_s3: SeaweedServer, seaweed_bucket: S3Bucket
) -> None:
    seaweed_bucket.upload_dir(minilm_dir(), prefix="models/minilm/")
    store = tmp_path / "store"
    out = result_json(
        run_load(
            seaweed_bucket.uri("models/minilm"),
            "--model",
            "minilm",
            "--store",
            store,
            "--chunk-size",
            "4MiB",
            env=s3_env(seaweed_s3),
        )
    )
    expected = {k: v for k, v in tree_digests(minilm_dir()).items() if not k.startswith(".")}
    assert staged_tree(store, "minilm") == expected
    again = result_json(
        run_load(seaweed_bucket.uri("models/minilm"), "--model", "minilm", "--store", store, env=s3_env(seaweed_s3))
    )
    assert again["reused"] and again["version"] == out["version"]
