"""`warmpod load` from local paths, run as the real CLI: happy paths and every bad input of the issue."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from safetensors.torch import load_file

from tests.kit.models import raw_safetensors, sha256_file, tree_digests, write_model, write_model_dir
from tests.kit.warmpod import error_line, events, published_nothing, result_json, run_load
from warmpod.store import open_model


def test_single_file_is_published_byte_identical(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "weights.safetensors", scale=40)
    store = tmp_path / "store"
    out = result_json(run_load(src, "--model", "tiny", "--store", store, "--chunk-size", "64KiB"))
    assert out["version"] == "1" and out["bytes"] == src.stat().st_size and not out["reused"]
    published = store / "tiny" / "current" / "weights.safetensors"
    assert sha256_file(published) == sha256_file(src)
    assert published.stat().st_mode & 0o777 == 0o444
    manifest = json.loads((store / "tiny" / "current" / "manifest.json").read_text())
    assert manifest["format"] == "warmpod-store/1"
    assert manifest["source"]["uri"] == str(src)
    assert manifest["files"] == [
        {"path": "weights.safetensors", "size": src.stat().st_size, "sha256": None, "kind": "safetensors"}
    ]
    assert manifest["source"]["identity"]["weights.safetensors"]["size"] == str(src.stat().st_size)


def test_sharded_directory_with_companions(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src", shards=3)
    (src / "pytorch_model.bin").write_bytes(b"pickle, never loaded")
    (src / ".gitattributes").write_text("*.bin lfs")
    store = tmp_path / "store"
    result_json(run_load(src, "--model", "sharded", "--store", store))
    current = store / "sharded" / "current"
    staged = tree_digests(current)
    del staged["manifest.json"]
    expected = tree_digests(src)
    del expected["pytorch_model.bin"], expected[".gitattributes"]
    assert staged == expected
    model = open_model(store, "sharded")
    reference: dict[str, object] = {}
    for shard in src.glob("*.safetensors"):
        reference.update(load_file(shard))
    got = model.tensors()
    assert set(got) == set(reference)
    assert all(bool((got[k] == reference[k]).all()) for k in reference)  # type: ignore[union-attr]


def test_unchanged_source_publishes_nothing_new_and_changed_source_does(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src")
    store = tmp_path / "store"
    assert result_json(run_load(src, "--model", "m", "--store", store))["version"] == "1"
    again = result_json(run_load(src, "--model", "m", "--store", store))
    assert again == {**again, "version": "1", "reused": True, "bytes": 0}
    for seed in (1, 2, 3):
        write_model_dir(src, seed=seed)
        assert result_json(run_load(src, "--model", "m", "--store", store, "--keep", "2"))["version"] == str(seed + 1)
    assert sorted(p.name for p in (store / "m" / "versions").iterdir()) == ["3", "4"]
    assert os.readlink(store / "m" / "current") == "versions/4"


def test_pinned_sha256_is_checked_while_streaming(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors", scale=20)
    store = tmp_path / "store"
    good = sha256_file(src)
    result_json(
        run_load(
            src,
            "--model",
            "m",
            "--store",
            store,
            "--sha256",
            f"model.safetensors={good}",
            "--chunk-size",
            "16KiB",
            "--concurrency",
            "4",
        )
    )
    manifest = json.loads((store / "m" / "current" / "manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == good


def test_pinned_sha256_mismatch_names_expected_and_actual(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors")
    store = tmp_path / "store"
    wrong = "0" * 64
    proc = run_load(src, "--model", "m", "--store", store, "--sha256", f"model.safetensors={wrong}")
    assert proc.returncode == 6
    line = error_line(proc)
    assert "sha256 mismatch" in line and f"expected {wrong}" in line and f"actual {sha256_file(src)}" in line
    assert published_nothing(store, "m")


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("model.safetensors", "expected FILE=HEX"),
        ("model.safetensors=abc", "not a sha256"),
        ("other.safetensors=" + "0" * 64, "not in the source"),
    ],
)
def test_bad_sha256_flags(tmp_path: Path, pin: str, message: str) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors")
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store", "--sha256", pin)
    assert proc.returncode == 2 and message in error_line(proc)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    proc = run_load(missing, "--model", "m", "--store", tmp_path / "store")
    assert proc.returncode == 3
    assert f"{missing}: not found" in error_line(proc)
    assert not any(e["event"] == "retry" for e in events(proc.stderr))


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", "", ".hidden", "x" * 129])
def test_bad_model_names_are_rejected(tmp_path: Path, name: str) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors")
    proc = run_load(src, "--model", name, "--store", tmp_path / "store")
    assert proc.returncode == 2
    assert "invalid model name" in error_line(proc)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_pickle_only_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (src / "config.json").write_text("{}")
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "pickle" in line and "pytorch_model.bin" in line and "convert them to safetensors" in line.lower()
    assert published_nothing(tmp_path / "store", "m")


def test_single_pickle_file_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(b"\x80\x04")
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store")
    assert proc.returncode == 2 and "pickle" in error_line(proc)


def _valid_header(n: int = 4) -> dict[str, object]:
    return {"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}


BAD_FILES = {
    "not-json": (raw_safetensors(b"{not json at all}", b""), "header is not JSON"),
    "too-long": (raw_safetensors(b"{}", b"", declared_len=200_000_000), "exceeds the bound"),
    "unknown-dtype": (
        raw_safetensors({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "unknown dtype 'F33'",
    ),
    "overlap": (
        raw_safetensors(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        "offsets overlap",
    ),
    "gap": (
        raw_safetensors(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
        ),
        "hole of 4 bytes",
    ),
    "out-of-range": (raw_safetensors(_valid_header(4), b"\0" * 8), "shorter than its header says"),
    "truncated": (raw_safetensors(_valid_header(1000), b"\0" * 100), "shorter than its header says"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_headers_name_the_file_and_rule(tmp_path: Path, case: str) -> None:
    data, rule = BAD_FILES[case]
    src = tmp_path / "src"
    src.mkdir()
    save_file({"ok": np.zeros(4, dtype=np.float32)}, str(src / "good.safetensors"))
    (src / "bad.safetensors").write_bytes(data)
    store = tmp_path / "store"
    proc = run_load(src, "--model", "m", "--store", store)
    assert proc.returncode == 5, proc.stderr
    line = error_line(proc)
    assert "bad.safetensors" in line and rule in line
    assert published_nothing(store, "m")


def test_previous_version_stays_current_after_a_bad_update(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src")
    store = tmp_path / "store"
    result_json(run_load(src, "--model", "m", "--store", store))
    (src / "model.safetensors").write_bytes(raw_safetensors(b"[1, 2]"))
    proc = run_load(src, "--model", "m", "--store", store)
    assert (proc.returncode == 5 and "not JSON" in error_line(proc)) or "not a JSON object" in error_line(proc)
    assert os.readlink(store / "m" / "current") == "versions/1"
    assert [p.name for p in (store / "m" / "versions").iterdir()] == ["1"]


def test_cgroup_limit_too_small_is_refused_before_writing(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors", scale=10)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("1048576\n")
    (cgroup / "memory.current").write_text("1000000\n")
    store = tmp_path / "store"
    proc = run_load(src, "--model", "m", "--store", store, env={"WARMPOD_CGROUP_ROOT": str(cgroup)})
    assert proc.returncode == 7
    line = error_line(proc)
    size = src.stat().st_size
    assert "store too small" in line and "need" in line and f"({size} bytes)" in line
    assert "available 47.4 KiB (48576 bytes)" in line and "cgroup memory limit" in line
    assert published_nothing(store, "m")


def test_filesystem_too_small_is_refused_before_writing(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny-tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        src = write_model(tmp_path / "src" / "model.safetensors", scale=10)
        proc = run_load(src, "--model", "m", "--store", mnt / "store")
        assert proc.returncode == 7
        line = error_line(proc)
        assert "store too small" in line and f"({src.stat().st_size} bytes)" in line and "filesystem of" in line
        assert published_nothing(mnt / "store", "m")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_two_loaders_for_one_model_do_not_collide(tmp_path: Path) -> None:
    import fcntl

    src = write_model(tmp_path / "src" / "model.safetensors")
    store = tmp_path / "store"
    (store / "m").mkdir(parents=True)
    with open(store / "m" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_load(src, "--model", "m", "--store", store)
    assert proc.returncode == 9 and "another loader is writing model 'm'" in error_line(proc)


def test_bad_numeric_flags(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "model.safetensors")
    for flags, message in [
        (["--concurrency", "0"], "concurrency must be at least 1"),
        (["--chunk-size", "1MiB", "--max-buffer", "64KiB"], "must hold at least one chunk"),
        (["--keep", "0"], "--keep must be at least 1"),
        (["--watch", "-1"], "--watch must be a positive number"),
    ]:
        proc = run_load(src, "--model", "m", "--store", tmp_path / "store", *flags)
        assert proc.returncode == 2 and message in error_line(proc), (flags, proc.stderr)
    proc = run_load(src, "--model", "m", "--chunk-size", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr
