"""`warmpod load --dtype bf16`, run as the real CLI: the store holds real safetensors files of the converted weights
(bit for bit torch's conversion), a version apart from the as-is one, and every bad input of the issue."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.kit.http_range import RangeHTTPServer
from tests.kit.models import minilm_dir, sha256_file, write_model, write_model_dir
from tests.kit.warmpod import error_line, events, published_nothing, result_json, run_load, run_warmpod
from warmpod.loader.convert import ConvertedLayout, plan_conversion
from warmpod.loader.load import JOURNAL, LoadEvents, LoadRequest, Mirror, load
from warmpod.loader.publish import staging_dir
from warmpod.loader.sources import SourceFile, identity_digest, open_source
from warmpod.pods.up import build_parser as build_up_parser
from warmpod.pods.up import config_from_args
from warmpod.safetensors_header import PREFIX_BYTES, header_length, parse_header
from warmpod.store import open_model

FLOATS = (torch.float64, torch.float32, torch.float16)


def manifest_of(store: Path, model: str, version: str = "current") -> dict[str, Any]:
    where = store / model / ("current" if version == "current" else f"versions/{version}")
    out: dict[str, Any] = json.loads((where / "manifest.json").read_text())
    return out


def assert_converted(source: Path, staged: Path) -> None:
    """`staged` is a valid safetensors file holding `source`'s tensors: every F64/F32/F16 one as torch converts it to
    bf16 (bit for bit), every other one unchanged; same metadata."""
    reference = load_file(source)
    with safe_open(staged, "pt") as got, safe_open(source, "pt") as src:
        assert set(got.keys()) == set(reference)
        assert got.metadata() == src.metadata()
        for name, want in reference.items():
            tensor = got.get_tensor(name)
            if want.dtype in FLOATS:
                want = want.to(torch.bfloat16)
            assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
            assert torch.equal(tensor.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def test_tiny_model_staged_bf16_bit_for_bit(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "weights.safetensors", scale=40)
    store = tmp_path / "store"
    proc = run_load(src, "--model", "tiny", "--store", store, "--dtype", "bf16", "--chunk-size", "64KiB")
    out = result_json(proc)
    assert out["dtype"] == "BF16" and out["converted_tensors"] == 4 and out["version"] == "1"
    staged = store / "tiny" / "current" / "weights.safetensors"
    assert_converted(src, staged)
    assert staged.stat().st_size < 0.55 * src.stat().st_size  # F32 dominates: about half
    assert not list((store / "tiny" / "staging").rglob("*.*"))  # no source copy, no partial conversion left
    manifest = manifest_of(store, "tiny")
    assert manifest["files"] == [
        {"path": "weights.safetensors", "size": staged.stat().st_size, "sha256": None, "kind": "safetensors"}
    ]
    conversion = manifest["conversion"]
    assert conversion["dtype"] == "BF16"
    assert conversion["files"]["weights.safetensors"] == {
        "source_size": src.stat().st_size,
        "source_sha256": None,
        "converted": {"F16": 1, "F32": 2, "F64": 1},
        "kept": {"BOOL": 1, "I64": 1},
    }
    assert manifest["tensors"]["positions"]["dtype"] == "I64" and manifest["tensors"]["embed.weight"]["dtype"] == "BF16"
    logged = [e for e in events(proc.stderr) if e["event"] == "file_converted"]
    assert logged and logged[0]["converted"] == {"F64": 1, "F32": 2, "F16": 1}
    model = open_model(store, "tiny")  # the store's reader maps it, zero copy
    assert model.conversion == conversion and model.tensor("embed.weight").dtype == torch.bfloat16
    assert conversion["source_digest"] != manifest["source"]["digest"]


def test_bf16_and_fp32_are_different_versions_each_reused_by_its_own_dtype(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src")
    store = tmp_path / "store"
    load = ("--model", "m", "--store", store)
    fp32 = result_json(run_load(src, *load))
    bf16 = result_json(run_load(src, *load, "--dtype", "bf16"))
    assert (fp32["version"], bf16["version"]) == ("1", "2") and not bf16["reused"] and fp32["digest"] != bf16["digest"]
    again32 = result_json(run_load(src, *load))
    assert again32["reused"] and again32["version"] == "1" and "dtype" not in again32
    assert manifest_of(store, "m")["version"] == "1" and "conversion" not in manifest_of(store, "m")
    again16 = result_json(run_load(src, *load, "--dtype", "bf16"))
    assert again16["reused"] and again16["version"] == "2" and again16["dtype"] == "BF16"
    assert manifest_of(store, "m")["conversion"]["source_digest"] == fp32["digest"]
    with safe_open(store / "m" / "versions" / "1" / "model.safetensors", "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.float32
    with safe_open(store / "m" / "current" / "model.safetensors", "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16


def test_real_minilm_staged_bf16(tmp_path: Path) -> None:
    src = minilm_dir()
    store = tmp_path / "store"
    out = result_json(run_load(src, "--model", "minilm", "--store", store, "--dtype", "bf16"))
    staged = store / "minilm" / "current"
    assert_converted(src / "model.safetensors", staged / "model.safetensors")
    ratio = (staged / "model.safetensors").stat().st_size / (src / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.51
    conversion = manifest_of(store, "minilm")["conversion"]["files"]["model.safetensors"]
    assert conversion["converted"] == {"F32": out["converted_tensors"]} and out["converted_tensors"] > 100
    assert set(conversion["kept"]) <= {"I64"}  # position_ids, where the checkpoint has it
    for aux in ("config.json", "tokenizer.json", "modules.json"):
        assert sha256_file(staged / aux) == sha256_file(src / aux)


def test_http_sharded_source_with_a_pin_records_source_and_staged_digests(
    tmp_path: Path, http_server: Callable[[Path], RangeHTTPServer]
) -> None:
    src = write_model_dir(tmp_path / "www" / "model", shards=2)
    shard = "model-00001-of-00002.safetensors"
    pin = sha256_file(src / shard)
    server = http_server(tmp_path / "www")
    store = tmp_path / "store"
    args = ("--model", "m", "--store", store, "--dtype", "bf16", "--sha256", f"{shard}={pin}")
    result_json(run_load(server.url_for("model"), *args))
    manifest = manifest_of(store, "m")
    files = {f["path"]: f for f in manifest["files"]}
    staged = store / "m" / "current"
    assert manifest["conversion"]["files"][shard]["source_sha256"] == pin
    assert files[shard]["sha256"] == sha256_file(staged / shard) != pin  # the published bytes' own digest
    assert files[shard]["size"] == (staged / shard).stat().st_size
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        assert_converted(src / name, staged / name)


def test_fp16_is_refused_with_the_reason(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "w.safetensors")
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store", "--dtype", "fp16")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "fp16 slower than fp32" in line and "use --dtype bf16" in line and "ms" in line
    assert published_nothing(tmp_path / "store", "m")


def test_unknown_dtype_is_a_usage_error(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src" / "w.safetensors")
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store", "--dtype", "int8")
    assert proc.returncode == 2
    assert "argument --dtype: invalid choice: 'int8'" in proc.stderr and "'bf16'" in proc.stderr


def test_a_source_without_floats_converts_nothing_and_says_so(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "src" / "ids.safetensors"
    src.parent.mkdir()
    save_file({"ids": np.arange(10, dtype=np.int64), "mask": np.ones(3, dtype=np.bool_)}, str(src))
    proc = run_load(src, "--model", "m", "--store", tmp_path / "store", "--dtype", "bf16")
    out = result_json(proc)
    assert out["converted_tensors"] == 0 and out["dtype"] == "BF16"
    (logged,) = [e for e in events(proc.stderr) if e["event"] == "file_converted"]
    assert logged["converted"] == {} and "no tensor to convert to BF16" in logged["note"]
    assert sha256_file(tmp_path / "store" / "m" / "current" / "ids.safetensors") == sha256_file(src)
    assert manifest_of(tmp_path / "store", "m")["conversion"]["files"]["ids.safetensors"]["converted"] == {}


class MirrorEvents(LoadEvents):
    def __init__(self) -> None:
        self.abandoned: list[tuple[str, str]] = []

    def mirror_abandoned(self, mirror: str, reason: str) -> None:
        self.abandoned.append((mirror, reason))


def test_a_mirror_is_ignored_by_a_converting_load(tmp_path: Path) -> None:
    """The node agent's peer fetch stays as-is: a dtype load reads the origin, says why, and never asks the mirror
    (its URL here answers nothing)."""
    src = write_model_dir(tmp_path / "src")
    files = [SourceFile("model.safetensors", str(src / "model.safetensors"), 0)]
    mirror = Mirror(url="http://127.0.0.1:9/nothing", digest=identity_digest(files), sha256={})
    heard = MirrorEvents()
    req = LoadRequest(uri=str(src), model="m", root=tmp_path / "store", mirror=mirror, dtype="BF16")
    result = asyncio.run(load(req, heard))
    assert result.dtype == "BF16" and result.converted_tensors == 4 and result.mirror_bytes == 0
    assert result.mirror_error is not None and "reads the origin only" in result.mirror_error
    assert heard.abandoned == [("http://127.0.0.1:9/nothing", result.mirror_error)]
    assert_converted(src / "model.safetensors", tmp_path / "store" / "m" / "current" / "model.safetensors")


# ------------------------------------------------------------------------------------------ warmpod up --dtype


def test_warmpod_up_passes_dtype_to_its_loader(tmp_path: Path) -> None:
    args = build_up_parser().parse_args([str(tmp_path / "src"), "--model", "m", "--store", str(tmp_path / "s")])
    assert "--dtype" not in config_from_args(args, []).loader_command()
    args.dtype = "bf16"
    command = config_from_args(args, []).loader_command()
    assert command[command.index("--dtype") :][:2] == ["--dtype", "bf16"]


def test_warmpod_up_refuses_fp16_before_anything_starts(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = run_warmpod("up", tmp_path / "src", "--model", "m", "--store", store, "--port", "0", "--dtype", "fp16")
    assert proc.returncode == 2, proc.stderr
    assert "warmpod up: error: --dtype fp16: this CPU path runs fp16 slower than fp32" in proc.stderr
    assert not store.exists()


def test_the_capacity_check_counts_the_source_and_its_conversion(tmp_path: Path) -> None:
    """Room for the source alone is not enough: the converted file is written beside the staged source."""
    src = write_model(tmp_path / "src" / "w.safetensors", scale=40)
    size = src.stat().st_size
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{size + size // 4}\n")
    (cgroup / "memory.current").write_text("0\n")
    env = {"WARMPOD_CGROUP_ROOT": str(cgroup)}
    store = tmp_path / "store"
    proc = run_load(src, "--model", "m", "--store", store, "--dtype", "bf16", env=env)
    assert proc.returncode == 7, proc.stderr
    blob = src.read_bytes()
    header = parse_header(blob[PREFIX_BYTES : PREFIX_BYTES + header_length(blob, "w")], "w", size)
    converted = plan_conversion(header, "BF16", "w").file_size
    line = error_line(proc)
    assert "store too small: need" in line and f"({size + converted} bytes), available" in line
    assert published_nothing(store, "m")
    result_json(run_load(src, "--model", "m", "--store", store, env=env))  # as is, it fits


class StagedEvents(LoadEvents):
    def __init__(self) -> None:
        self.reused: list[str] = []
        self.converted: list[str] = []

    def file_done(self, rel: str, size: int, reused: bool) -> None:
        if reused:
            self.reused.append(rel)

    def file_converted(self, rel: str, layout: ConvertedLayout, seconds: float) -> None:
        self.converted.append(rel)


def test_a_resumed_converting_load_reuses_converted_files_only(tmp_path: Path) -> None:
    """After a killed load, staging holds a converted shard (journaled) and a source copy of the other, which a
    journal entry claims: only the file whose size is the converted one is reused; the other is staged again."""
    src = write_model_dir(tmp_path / "src", shards=2)
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    fresh = tmp_path / "fresh"
    asyncio.run(load(LoadRequest(uri=str(src), model="m", root=fresh, dtype="BF16")))
    converted = {rel: fresh / "m" / "current" / rel for rel in (one, two)}

    async def digest() -> str:
        source = await open_source(str(src))
        try:
            return identity_digest(source.files, "BF16")
        finally:
            await source.aclose()

    store = tmp_path / "store"
    version_digest = asyncio.run(digest())
    sdir = staging_dir(store, "m", version_digest)
    sdir.mkdir(parents=True)
    shutil.copyfile(converted[one], sdir / one)
    shutil.copyfile(src / two, sdir / two)  # the source copy, not yet converted when the load was killed
    done = {
        rel: {"size": (src / rel).stat().st_size, "sha256": None, "staged_size": converted[rel].stat().st_size}
        for rel in (one, two)
    }
    (sdir / JOURNAL).write_text(json.dumps({"digest": version_digest, "done": done}))
    heard = StagedEvents()
    result = asyncio.run(load(LoadRequest(uri=str(src), model="m", root=store, dtype="BF16"), heard))
    assert result.version == "1" and heard.reused == [one] and heard.converted == [two]
    published = store / "m" / "current"
    assert {rel: sha256_file(published / rel) for rel in (one, two)} == {
        rel: sha256_file(path) for rel, path in converted.items()
    }
    for rel in (one, two):
        assert_converted(src / rel, published / rel)
    assert manifest_of(store, "m")["conversion"]["files"] == manifest_of(fresh, "m")["conversion"]["files"]
