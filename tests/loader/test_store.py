"""The store: names, publishing, current, GC, staging, the writer lock, and the zero-copy reader."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import warmpod.store as store
from tests.kit.procmaps import mapping_of, resident_kib
from warmpod.loader.errors import StoreBusy, UsageError
from warmpod.loader.publish import (
    clean_staging,
    find_version,
    gc_versions,
    point_current,
    publish_version,
    staging_dir,
    writer_lock,
)
from warmpod.safetensors_header import header_length, parse_header
from warmpod.store import (
    FORMAT,
    NotPublished,
    StagedModel,
    VersionWatcher,
    check_model_name,
    current_version,
    open_model,
    read_manifest,
    version_numbers,
    wait_ready,
)

NAME = "tiny-model"
REPO = Path(__file__).resolve().parents[2]


def publish(
    root: Path,
    files: dict[str, dict[str, torch.Tensor]],
    *,
    name: str = NAME,
    digest: str = "d" * 64,
    aux: dict[str, bytes] | None = None,
) -> str:
    """Stage safetensors (and aux) files the way the loader does and publish them as the next version."""
    staged = staging_dir(root, name, digest)
    staged.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, Any]] = {}
    for rel, content in files.items():
        data = safetensors.torch.save(content)
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
        header = parse_header(data[8 : 8 + header_length(data[:8], rel)], rel, len(data))
        for t in header.tensors:
            tensors[t.name] = {
                "file": rel,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offsets": [header.data_start + t.begin, header.data_start + t.end],
            }
        entries.append(
            {
                "path": rel,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "kind": "safetensors",
            }
        )
    for rel, data in (aux or {}).items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": None, "kind": "aux"})
    manifest = {
        "source": {"uri": "/models/tiny", "identity": {}, "digest": digest},
        "files": entries,
        "tensors": tensors,
        "loader_version": "test",
        "created_at": "2025-01-01T00:00:00Z",
        "load_seconds": 0.0,
    }
    return publish_version(root, name, staged, manifest)


def one(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model.safetensors": {"w": torch.full((4, 4), value), "b": torch.arange(3, dtype=torch.int64)}}


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "f32": torch.randn(8, 16, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(3, 7, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.tensor([-(2**40), 0, 2**40]),
        "u8": torch.arange(13, dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(-1.25),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "m.v1_2", "a", "7", "A" * 128])
def test_valid_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "..", "../x", "x/..", ".hidden", "-x", "_x", "a..b", "a b", "A" * 129, "é", "a\\b", "a\0"],
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid model name") as info:
        check_model_name(name)
    assert repr(name) in str(info.value)
    assert "no '/'" in str(info.value)


def test_model_name_with_trailing_newline_is_invalid() -> None:
    with pytest.raises(UsageError, match="invalid model name"):
        check_model_name("model\n")


# ---------------------------------------------------------------- publishing


def test_publish_version_makes_an_immutable_complete_version(root: Path) -> None:
    digest = "ab" * 32
    staged = staging_dir(root, NAME, digest)
    assert staged == root / NAME / "staging" / digest[:32]
    version = publish(root, one(1.0), digest=digest, aux={"config.json": b"{}", "sub/vocab.txt": b"a\nb\n"})

    vdir = root / NAME / "versions" / "1"
    assert version == "1"
    assert not staged.exists()
    for rel in ("model.safetensors", "config.json", "sub/vocab.txt", "manifest.json"):
        assert stat.S_IMODE((vdir / rel).stat().st_mode) == 0o444, rel
    assert not (vdir / "manifest.json.tmp").exists()

    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest == read_manifest(root, NAME, "1")
    assert (manifest["format"], manifest["model"], manifest["version"]) == (FORMAT, NAME, "1")
    assert manifest["source"]["digest"] == digest
    assert {f["path"] for f in manifest["files"]} == {"model.safetensors", "config.json", "sub/vocab.txt"}

    current = root / NAME / "current"
    assert current.is_symlink() and os.readlink(current) == "versions/1"
    assert current.resolve() == vdir.resolve()


def test_publish_numbers_versions_in_order(root: Path) -> None:
    assert version_numbers(root, NAME) == []
    assert current_version(root, NAME) is None
    assert [publish(root, one(float(i))) for i in range(3)] == ["1", "2", "3"]
    assert version_numbers(root, NAME) == [1, 2, 3]
    assert current_version(root, NAME) == "3"
    assert os.readlink(root / NAME / "current") == "versions/3"


def test_version_numbers_sort_numerically_and_ignore_other_names(root: Path) -> None:
    for d in ("9", "10", "2", "tmp", ".x"):
        (root / NAME / "versions" / d).mkdir(parents=True)
    assert version_numbers(root, NAME) == [2, 9, 10]
    assert publish(root, one(0.0)) == "11"


def test_point_current_replaces_the_link_by_rename(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(root, one(1.0))
    publish(root, one(2.0))
    mdir = root / NAME
    current = mdir / "current"
    (mdir / f".current.{os.getpid()}").write_text("left by a crashed loader")

    renames: list[tuple[str, str, str]] = []
    unlinked: list[str] = []
    real_rename, real_unlink = os.rename, os.unlink

    def spy_rename(src: Any, dst: Any, **kw: Any) -> None:
        renames.append((str(src), str(dst), os.readlink(src)))
        assert current.is_symlink()  # readers always find a `current` while it is being replaced
        real_rename(src, dst, **kw)

    def spy_unlink(path: Any, **kw: Any) -> None:
        unlinked.append(str(path))
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "rename", spy_rename)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    point_current(root, NAME, "1")

    assert os.readlink(current) == "versions/1"
    assert current_version(root, NAME) == "1"
    assert [(dst, target) for _, dst, target in renames] == [(str(current), "versions/1")]
    assert str(current) not in unlinked  # never removed, only renamed over
    assert sorted(p.name for p in mdir.iterdir() if p.name.startswith(".current")) == []


def test_gc_keeps_the_newest_versions(root: Path) -> None:
    for i in range(4):
        publish(root, one(float(i)))
    assert gc_versions(root, NAME, keep=2) == ["1", "2"]
    assert version_numbers(root, NAME) == [3, 4]
    assert gc_versions(root, NAME, keep=2) == []


def test_gc_never_removes_current(root: Path) -> None:
    for i in range(4):
        publish(root, one(float(i)))
    point_current(root, NAME, "1")  # rolled back to an old version
    assert gc_versions(root, NAME, keep=1) == ["2", "3"]
    assert version_numbers(root, NAME) == [1, 4]
    assert gc_versions(root, NAME, keep=0) == ["4"]
    assert version_numbers(root, NAME) == [1]
    assert open_model(root, NAME).version == "1"


def test_clean_staging_keeps_only_the_kept_dir(root: Path) -> None:
    sdir = root / NAME / "staging"
    keep = staging_dir(root, NAME, "k" * 64)
    other = staging_dir(root, NAME, "o" * 64)
    for d in (keep, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "part.safetensors").write_bytes(b"x")
    (sdir / "stray-file").write_bytes(b"y")

    removed = clean_staging(root, NAME, keep=keep)
    assert sorted(removed) == sorted([other, sdir / "stray-file"])
    assert [p.name for p in sdir.iterdir()] == [keep.name]
    assert (keep / "sub" / "part.safetensors").read_bytes() == b"x"

    assert clean_staging(root, NAME) == [keep]
    assert list(sdir.iterdir()) == []


def test_clean_staging_without_a_staging_dir(root: Path) -> None:
    assert clean_staging(root, NAME) == []


def test_find_version_by_source_digest(root: Path) -> None:
    assert find_version(root, NAME, "a" * 64) is None
    publish(root, one(1.0), digest="a" * 64)
    publish(root, one(2.0), digest="b" * 64)
    assert find_version(root, NAME, "a" * 64) == "1"
    assert find_version(root, NAME, "b" * 64) == "2"
    assert find_version(root, NAME, "c" * 64) is None
    publish(root, one(3.0), digest="a" * 64)
    assert find_version(root, NAME, "a" * 64) == "3"  # the newest one


def test_find_version_skips_broken_versions(root: Path) -> None:
    publish(root, one(1.0), digest="a" * 64)
    broken = root / NAME / "versions" / "2"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (root / NAME / "versions" / "3").mkdir()  # no manifest at all
    assert find_version(root, NAME, "a" * 64) == "1"


# ---------------------------------------------------------------- the writer lock


def test_writer_lock_excludes_a_second_holder_in_the_same_process(root: Path) -> None:
    with writer_lock(root, NAME):
        # flock belongs to the open file description: a second open of .lock conflicts even here.
        with (
            pytest.raises(StoreBusy, match="another loader is writing model 'tiny-model'") as info,
            writer_lock(root, NAME),
        ):
            pass
        assert str(root / NAME / ".lock") in str(info.value)
        with writer_lock(root, "other-model"):  # other models are independent
            pass
    with writer_lock(root, NAME):  # released on exit
        pass


def test_writer_lock_is_released_when_the_body_raises(root: Path) -> None:
    with pytest.raises(RuntimeError), writer_lock(root, NAME):
        raise RuntimeError("load failed")
    with writer_lock(root, NAME):
        pass


def test_writer_lock_excludes_another_process_and_dies_with_it(root: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from warmpod.loader.publish import writer_lock\n"
        f"with writer_lock(Path({str(root)!r}), {NAME!r}):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy), writer_lock(root, NAME):
            pass
    finally:
        proc.kill()  # a killed loader must not leave the model locked
        proc.communicate(timeout=30)
    with writer_lock(root, NAME):
        pass


# ---------------------------------------------------------------- the reader


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_open_model_reads_tensors_equal_to_safetensors(root: Path) -> None:
    publish(root, {"model.safetensors": mixed_tensors()}, aux={"config.json": b'{"hidden": 16}'})
    model = open_model(root, NAME)
    assert isinstance(model, StagedModel)
    assert (model.name, model.version) == (NAME, "1")
    assert model.path == root / NAME / "versions" / "1"
    expected = safetensors.torch.load_file(model.path / "model.safetensors")
    assert_same(model.tensors(), expected)
    assert_same(model.tensors(), mixed_tensors())
    assert model.file_path("config.json").read_bytes() == b'{"hidden": 16}'
    entry = model.tensor_index["bf16"]
    assert (entry.file, entry.dtype, entry.shape) == ("model.safetensors", "BF16", (3, 7))


def test_open_model_reads_several_shards(root: Path) -> None:
    shards = {
        "model-00001-of-00002.safetensors": {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)},
        "model-00002-of-00002.safetensors": {"c": torch.arange(6, dtype=torch.float16).reshape(2, 3)},
    }
    publish(root, shards)
    model = open_model(root, NAME)
    assert_same(model.tensors(), {k: v for s in shards.values() for k, v in s.items()})
    assert model.tensor_index["c"].file == "model-00002-of-00002.safetensors"


def test_tensors_are_zero_copy_views_of_a_read_only_shared_mapping(root: Path) -> None:
    publish(root, {"model.safetensors": mixed_tensors()})
    model = open_model(root, NAME)
    published = os.path.realpath(model.path / "model.safetensors")
    index = model.tensor_index
    checked = 0
    for name, t in model.tensors().items():
        if t.numel() == 0:
            continue  # nothing to map
        for address in (t.untyped_storage().data_ptr(), t.data_ptr()):
            m = mapping_of(address)
            assert m.path == published, (name, m)
            assert m.perms == "r--s", (name, m)  # read-only, shared with every other reader of the file
        # The tensor starts at exactly its manifest offset in the file: the bytes were never copied.
        m = mapping_of(t.data_ptr())
        assert t.data_ptr() - m.start + m.offset == index[name].begin, name
        checked += 1
    assert checked == 8


def test_populate_maps_every_page_before_the_first_touch(root: Path) -> None:
    big = {"w": torch.arange(4 << 20, dtype=torch.float32)}  # 16 MiB
    publish(root, {"model.safetensors": big})
    model = open_model(root, NAME)
    address = model.tensor("w").data_ptr()
    assert resident_kib(address) < 8 << 10  # nothing read yet (fault-around maps a little)
    assert model.populate() == len(model.maps["model.safetensors"])
    assert resident_kib(address) >= 16 << 10  # every page of the 16 MiB is mapped now
    assert torch.equal(model.tensor("w"), big["w"])


def test_buffer_returns_the_raw_bytes(root: Path) -> None:
    publish(root, {"model.safetensors": mixed_tensors()})
    model = open_model(root, NAME)
    data = (model.path / "model.safetensors").read_bytes()
    for name, entry in model.tensor_index.items():
        buf = model.buffer(name)
        assert buf.readonly
        assert bytes(buf) == data[entry.begin : entry.end], name
    assert bytes(model.buffer("f32")) == mixed_tensors()["f32"].numpy().tobytes()
    assert bytes(model.buffer("empty")) == b""


def test_tensors_outlive_the_model_object(root: Path) -> None:
    publish(root, one(5.0))
    model = open_model(root, NAME)
    w = model.tensor("w")
    del model
    gc.collect()
    assert torch.equal(w, torch.full((4, 4), 5.0))


def test_open_model_without_a_published_version(root: Path) -> None:
    with pytest.raises(NotPublished, match="has no published version"):
        open_model(root, NAME)


def test_a_reader_keeps_its_version_after_gc(root: Path) -> None:
    publish(root, {"model.safetensors": mixed_tensors()})
    old = open_model(root, NAME)
    early = old.tensors()
    saved = {k: v.clone() for k, v in early.items()}

    publish(root, one(2.0))
    publish(root, one(3.0))
    assert gc_versions(root, NAME, keep=1) == ["1", "2"]
    assert not (root / NAME / "versions" / "1").exists()
    assert open_model(root, NAME).version == "3"

    assert_same(old.tensors(), saved)  # new views of the removed version
    assert_same(early, saved)  # views taken before the removal
    m = mapping_of(early["f32"].data_ptr())
    assert m.path.endswith("/versions/1/model.safetensors (deleted)")


def test_open_model_retries_when_the_version_vanishes(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(root, one(1.0))
    real = store._map_version
    calls: list[str] = []

    def vanishing_once(name: str, version: str, vdir: Path) -> StagedModel:
        calls.append(version)
        if len(calls) == 1:
            raise FileNotFoundError(vdir / "manifest.json")
        return real(name, version, vdir)

    monkeypatch.setattr(store, "_map_version", vanishing_once)
    model = open_model(root, NAME)
    assert calls == ["1", "1"]
    assert model.version == "1"
    assert torch.equal(model.tensor("w"), torch.full((4, 4), 1.0))


def test_open_model_follows_current_after_gc_between_readlink_and_open(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(root, one(1.0))
    real = store._map_version
    calls: list[str] = []

    def publish_and_gc_first(name: str, version: str, vdir: Path) -> StagedModel:
        calls.append(version)
        if len(calls) == 1:  # a loader publishes and collects version 1 right after our readlink
            publish(root, one(2.0))
            gc_versions(root, NAME, keep=1)
        return real(name, version, vdir)

    monkeypatch.setattr(store, "_map_version", publish_and_gc_first)
    model = open_model(root, NAME)
    assert calls == ["1", "2"]
    assert model.version == "2"
    assert torch.equal(model.tensor("w"), torch.full((4, 4), 2.0))


def test_open_model_gives_up_after_its_attempts(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(root, one(1.0))
    calls: list[str] = []

    def always_vanishing(name: str, version: str, vdir: Path) -> StagedModel:
        calls.append(version)
        raise FileNotFoundError(vdir)

    monkeypatch.setattr(store, "_map_version", always_vanishing)
    with pytest.raises(NotPublished, match="kept vanishing"):
        open_model(root, NAME, attempts=3)
    assert len(calls) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_ready_times_out_on_a_fake_clock(root: Path) -> None:
    clock = FakeClock()
    with pytest.raises(TimeoutError, match=r"'tiny-model' was not published in .* within 1 s"):
        wait_ready(root, NAME, 1.0, clock=clock, sleep=clock.sleep, interval=0.25)
    assert clock.sleeps == [0.25] * 4
    assert clock.now == 1.0


def test_wait_ready_returns_the_model_published_mid_wait(root: Path) -> None:
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == 3:
            publish(root, one(7.0))

    model = wait_ready(root, NAME, 10.0, clock=clock, sleep=sleep, interval=0.5)
    assert model.version == "1"
    assert len(clock.sleeps) == 3
    assert torch.equal(model.tensor("w"), torch.full((4, 4), 7.0))


def test_wait_ready_returns_at_once_when_published(root: Path) -> None:
    publish(root, one(1.0))
    clock = FakeClock()
    assert wait_ready(root, NAME, 0.0, clock=clock, sleep=clock.sleep).version == "1"
    assert clock.sleeps == []


def test_version_watcher_reports_each_new_version_once(root: Path) -> None:
    watcher = VersionWatcher(root, NAME)
    assert watcher.poll() is None
    publish(root, one(1.0))
    assert watcher.poll() == "1"
    assert watcher.poll() is None
    publish(root, one(2.0))
    publish(root, one(3.0))
    assert watcher.poll() == "3"
    assert watcher.poll() is None
    point_current(root, NAME, "2")  # a rollback is a change too
    assert watcher.poll() == "2"


def test_version_watcher_starting_from_the_seen_version(root: Path) -> None:
    publish(root, one(1.0))
    watcher = VersionWatcher(root, NAME, seen="1")
    assert watcher.poll() is None
    publish(root, one(2.0))
    assert watcher.poll() == "2"
