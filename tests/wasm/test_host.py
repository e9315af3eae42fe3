"""The wasmtime host: the artifact cache (HMAC-checked, never deserializing what it did not write), engine module
checks, and the sandbox — deadlines, memory limits, broken instances replaced — with hostile test engines."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from tests.kit.models import mlp_reference, write_mlp
from tests.wasm.edgeutil import epoch_threads
from tests.wasm.hostile import HOG, LOOP, write_engine
from warmpod.server.errors import DeadlineExceeded, ServerError
from warmpod.server.tensors import Tensor
from warmpod.wasm.bundle import from_model, model_directory
from warmpod.wasm.host import ENGINE_WASM, EngineError, EnginePool, cache_key, compile_engine
from warmpod.wasm.models import EdgeMLP

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mlp_bundle(tmp_path: Path):  # type: ignore[no-untyped-def]
    return from_model(model_directory(write_mlp(tmp_path / "mlp", (4, 16, 3))))


def _request(value: float) -> dict[str, Tensor]:
    x = np.full((1, 4), value, dtype=np.float32)
    return {"input": Tensor("input", "FP32", x.shape, x)}


# ------------------------------------------------------------------------------- the artifact cache


def test_cache_compiles_once_then_deserializes(tmp_path: Path) -> None:
    with (
        closing(compile_engine(ENGINE_WASM, tmp_path)) as first,
        closing(compile_engine(ENGINE_WASM, tmp_path)) as second,
    ):
        assert (first.origin, second.origin) == ("compiled", "cache")
    key = cache_key(first.digest)
    assert "wasmtime50.0.1" in key and (tmp_path / f"{key}.cwasm").is_file()
    assert (tmp_path / "hmac.key").stat().st_mode & 0o077 == 0  # the secret is the serving user's alone


def test_tampered_artifact_is_recompiled_never_deserialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compile_engine(ENGINE_WASM, tmp_path).close()
    (artifact,) = tmp_path.glob("*.cwasm")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))

    deserialized: list[int] = []
    real = wasmtime.Module.deserialize
    monkeypatch.setattr(wasmtime.Module, "deserialize", lambda e, d: deserialized.append(1) or real(e, d))
    with closing(compile_engine(ENGINE_WASM, tmp_path)) as again:
        assert deserialized == []
        assert "failed its HMAC check (tampered or truncated): recompiled" in again.origin
    assert artifact.read_bytes() != bytes(data)  # rewritten with fresh code and HMAC
    with closing(compile_engine(ENGINE_WASM, tmp_path)) as cached:
        assert cached.origin == "cache"


def test_truncated_artifact_and_foreign_key_are_recompiled(tmp_path: Path) -> None:
    compile_engine(ENGINE_WASM, tmp_path).close()
    (artifact,) = tmp_path.glob("*.cwasm")
    artifact.write_bytes(artifact.read_bytes()[:1000])
    with closing(compile_engine(ENGINE_WASM, tmp_path)) as recompiled:
        assert "HMAC" in recompiled.origin
    (tmp_path / "hmac.key").write_bytes(b"k" * 32)  # artifacts written under another secret are not ours
    with closing(compile_engine(ENGINE_WASM, tmp_path)) as recompiled:
        assert "HMAC" in recompiled.origin


# ------------------------------------------------------------------------------- engine modules


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00asm\x01\x00\x00\x00\x01\x05", "is not valid WebAssembly"),
        (b"this is not wasm at all", "is not valid WebAssembly"),
        (None, "is not valid WebAssembly"),  # the real engine cut in half
    ],
)
def test_malformed_or_truncated_module_is_rejected(tmp_path: Path, content: bytes | None, message: str) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(content if content is not None else ENGINE_WASM.read_bytes()[: ENGINE_WASM.stat().st_size // 2])
    with pytest.raises(EngineError, match=message):
        compile_engine(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.cwasm"))


def test_module_with_imports_is_refused(tmp_path: Path) -> None:
    imports = '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'
    engine = write_engine(tmp_path / "imports.wasm", imports=imports)
    with pytest.raises(EngineError, match=r"imports wasi_snapshot_preview1\.fd_write; .* must import nothing"):
        compile_engine(engine, None)


def test_module_without_the_abi_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.wasm"
    path.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    with pytest.raises(EngineError, match=r"lacks _initialize, wp_abi_version, .* of the engine ABI"):
        compile_engine(path, None)


def test_other_abi_version_is_refused(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    with (
        closing(compile_engine(write_engine(tmp_path / "abi2.wasm", abi=2), None)) as compiled,
        pytest.raises(EngineError, match="the engine speaks ABI 2; this host speaks ABI 1"),
    ):
        EnginePool(compiled, mlp_bundle, size=1, max_memory=64 << 20, deadline_s=1)


# ------------------------------------------------------------------------------- the sandbox


def test_guest_that_loops_forever_is_interrupted_and_replaced(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    with (
        closing(compile_engine(write_engine(tmp_path / "hostile.wasm"), None)) as compiled,
        closing(EnginePool(compiled, mlp_bundle, size=1, max_memory=64 << 20, deadline_s=0.3)) as pool,
        closing(EdgeMLP(mlp_bundle, pool, "1")) as model,
    ):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"ran past its deadline of 0\.3 s in wp_run and was interrupted"):
            model.run([model.prepare(_request(LOOP))])
        assert 0.25 < time.monotonic() - started < 2.0
        (out,) = model.run([model.prepare(_request(1.0))])  # the next request gets a fresh instance and works
        assert out["logits"].shape == (1, 3) and pool.replaced == 1


def test_guest_that_grows_memory_is_capped(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    with (
        closing(compile_engine(write_engine(tmp_path / "hostile.wasm"), None)) as compiled,
        closing(EnginePool(compiled, mlp_bundle, size=1, max_memory=32 << 20, deadline_s=5)) as pool,
        closing(EdgeMLP(mlp_bundle, pool, "1")) as model,
    ):
        with pytest.raises(ServerError, match=r"hostile test engine: out of memory .*the memory limit is 32 MiB"):
            model.run([model.prepare(_request(HOG))])
        with pool.instance() as instance:
            assert instance.memory.data_len(instance.store) <= 32 << 20
        (out,) = model.run([model.prepare(_request(1.0))])
        assert out["logits"].shape == (1, 3)


def test_guest_whose_memory_starts_over_the_limit_is_not_instantiated(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    big = write_engine(tmp_path / "big.wasm", pages=2048)  # 128 MiB initial memory
    with (
        closing(compile_engine(big, None)) as compiled,
        pytest.raises(EngineError, match="cannot be instantiated within the 64 MiB memory limit"),
    ):
        EnginePool(compiled, mlp_bundle, size=1, max_memory=64 << 20, deadline_s=1)


def test_one_instance_per_worker_each_with_its_own_memory(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    with (
        closing(compile_engine(ENGINE_WASM, tmp_path)) as compiled,
        closing(EnginePool(compiled, mlp_bundle, size=3, max_memory=64 << 20, deadline_s=5)) as pool,
    ):
        with pool.instance() as a, pool.instance() as b, pool.instance() as c:
            assert len({id(a.store), id(b.store), id(c.store)}) == 3
        with closing(EdgeMLP(mlp_bundle, pool, "1")) as model:
            x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
            (out,) = model.run([model.prepare({"input": Tensor("input", "FP32", x.shape, x)})])
    expected = mlp_reference(tmp_path / "mlp", x)
    assert np.abs(out["logits"] - expected).max() <= 1e-5


def test_a_pool_closes_the_engine_it_owns_and_only_that(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    before = epoch_threads()
    compiled = compile_engine(ENGINE_WASM, tmp_path)
    (ticker,) = epoch_threads() - before
    try:
        EnginePool(compiled, mlp_bundle, size=1, max_memory=64 << 20, deadline_s=5).close()
        assert ticker.is_alive()  # an engine shared by pools: whoever compiled it closes it
        EnginePool(compiled, mlp_bundle, size=1, max_memory=64 << 20, deadline_s=5, owns_engine=True).close()
        assert not ticker.is_alive()
    finally:
        compiled.close()


def test_a_pool_that_cannot_make_its_instances_closes_the_engine_it_owns(tmp_path: Path, mlp_bundle) -> None:  # type: ignore[no-untyped-def]
    before = epoch_threads()
    compiled = compile_engine(write_engine(tmp_path / "abi2.wasm", abi=2), None)
    with pytest.raises(EngineError, match="the engine speaks ABI 2; this host speaks ABI 1"):
        EnginePool(compiled, mlp_bundle, size=2, max_memory=64 << 20, deadline_s=1, owns_engine=True)
    assert epoch_threads() - before == set()
