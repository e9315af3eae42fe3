"""The wasmtime host: compile the engine once per process (or deserialize it from a cache this host wrote), give
each worker its own sandboxed instance with the bundle's weights in it, and run one guest call per batch.

The sandbox: the guest imports nothing (no WASI: no files, network, environment or clock), every call runs under a
deadline (epoch interruption, driven by a timer thread) and a memory limit (`Store.set_limits`). A guest that traps
or is interrupted is thrown away; the next call gets a fresh instance.

The artifact cache holds wasmtime's native code. Deserializing runs that code unchecked, so an artifact is only
deserialized when its HMAC (keyed by a secret this host created, mode 0600) matches: a tampered, truncated or foreign
artifact is recompiled from the `.wasm`, never loaded. Keep the cache directory writable by the serving user only.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import logging
import math
import os
import platform
import queue
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wasmtime

from warmpod.errors import WarmpodError
from warmpod.wasm.bundle import KIND_CODES, Bundle

log = logging.getLogger("warmpod.edge")

WASMTIME_VERSION = "50.0.1"  # pinned in pyproject.toml: the Python API changes between majors
ENGINE_WASM = Path(__file__).parent / "engine" / "warmpod_engine.wasm"
ABI_VERSION = 1
ABI_EXPORTS = (
    "memory",
    "_initialize",
    "wp_abi_version",
    "wp_alloc",
    "wp_free",
    "wp_error",
    "wp_init",
    "wp_set_tensor",
    "wp_ready",
    "wp_run",
)
EPOCH_TICK_S = 0.005  # deadline resolution
LOAD_DEADLINE_S = 120.0  # instantiating and copying the weights in
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "warmpod" / "wasm"
# The engine settings that change the compiled code: part of the cache key.
ENGINE_SETTINGS = {"epoch_interruption": True, "cranelift_opt_level": "speed", "wasm_simd": True}
_STATUS = {-1: "bad argument", -2: "out of memory", -3: "weights do not fit the graph", -4: "bad input",
           -5: "not ready"}  # fmt: skip


class EngineError(WarmpodError):
    """The engine refused, failed or trapped; the message says what and why."""

    exit_code = 5  # an engine that cannot start: the model cannot be served (or compiled)
    kind = "engine"


class EngineOutOfMemory(EngineError):
    """The guest memory limit (--max-memory) cannot hold what a call needs: a batch too large for it."""


class EngineInterrupted(EngineError):
    """A guest call ran past its deadline and was stopped."""


# ------------------------------------------------------------------------------- compiling, caching


def make_engine(*, epoch_interruption: bool = True) -> wasmtime.Engine:
    """A wasmtime engine with ENGINE_SETTINGS (the benchmark turns epoch interruption off to measure its cost)."""
    config = wasmtime.Config()
    config.epoch_interruption = epoch_interruption
    config.cranelift_opt_level = ENGINE_SETTINGS["cranelift_opt_level"]
    config.wasm_simd = ENGINE_SETTINGS["wasm_simd"]
    return wasmtime.Engine(config)


def cache_key(wasm_digest: str) -> str:
    """Artifact name: the module's digest, the wasmtime version, the engine settings and the CPU architecture."""
    settings = ";".join(f"{k}={v}" for k, v in sorted(ENGINE_SETTINGS.items())) + f";arch={platform.machine()}"
    config = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return f"{wasm_digest[:32]}-wasmtime{WASMTIME_VERSION}-{config}"


class ArtifactCache:
    """Precompiled engine code on disk, each artifact with an HMAC this host computed when it wrote it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = self._secret()

    def _secret(self) -> bytes:
        path = self.root / "hmac.key"
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise EngineError(f"artifact cache key {path} is damaged ({len(key)} bytes); delete the cache directory")
        return key

    def _mac(self, data: bytes | bytearray) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def get(self, engine: wasmtime.Engine, key: str) -> tuple[wasmtime.Module | None, str]:
        """The cached module, or None and why not ("absent", "tampered ...", "incompatible ...")."""
        artifact, mac = self.root / f"{key}.cwasm", self.root / f"{key}.hmac"
        try:
            data, recorded = artifact.read_bytes(), mac.read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None, "absent"
        if not hmac.compare_digest(self._mac(data), recorded):
            for path in (artifact, mac):
                path.unlink(missing_ok=True)
            return None, f"artifact {artifact.name} failed its HMAC check (tampered or truncated): recompiled"
        try:
            return wasmtime.Module.deserialize(engine, data), "cache"
        except wasmtime.WasmtimeError as e:  # written by this host, but by another wasmtime build
            return None, f"artifact {artifact.name} is incompatible ({_first_line(e)}): recompiled"

    def put(self, key: str, module: wasmtime.Module) -> None:
        data = module.serialize()
        for suffix, content in ((".hmac", self._mac(data).encode()), (".cwasm", data)):  # artifact last
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.root)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, self.root / f"{key}{suffix}")


@dataclass
class CompiledEngine:
    """The engine module compiled for this process; instances are cheap to make from it."""

    engine: wasmtime.Engine
    module: wasmtime.Module
    digest: str  # sha256 of the .wasm
    origin: str  # "cache", "compiled", or why the cache was not used
    ticker: EpochTicker

    def close(self) -> None:
        self.ticker.stop()


def compile_engine(wasm_path: Path = ENGINE_WASM, cache_dir: Path | None = DEFAULT_CACHE) -> CompiledEngine:
    """Compile (or load from the cache) the engine module, checking it is an engine: valid, no imports, the ABI."""
    try:
        wasm = wasm_path.read_bytes()
    except OSError as e:
        raise EngineError(f"engine module {wasm_path}: cannot read: {e.strerror}") from None
    digest = hashlib.sha256(wasm).hexdigest()
    engine = make_engine()
    started = time.perf_counter()
    cache = ArtifactCache(cache_dir) if cache_dir is not None else None
    key = cache_key(digest)
    module, origin = cache.get(engine, key) if cache is not None else (None, "no cache")
    fresh = module is None
    if module is None:
        if cache is not None and origin != "absent":
            log.warning("engine cache: %s", origin)
        try:
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise EngineError(f"engine module {wasm_path} is not valid WebAssembly: {_first_line(e)}") from None
        origin = "compiled" if origin in ("absent", "no cache") else origin
    _check_abi(module, wasm_path)
    if cache is not None and fresh:
        cache.put(key, module)
    seconds = time.perf_counter() - started
    log.info("engine %s (%s…): %s in %.1f ms", wasm_path.name, digest[:12], origin, seconds * 1000)
    return CompiledEngine(engine, module, digest, origin, EpochTicker(engine))


def _check_abi(module: wasmtime.Module, path: Path) -> None:
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    if imports:
        raise EngineError(
            f"engine module {path} imports {', '.join(imports)}; the edge sandbox gives the guest no capabilities, "
            "so an engine must import nothing"
        )
    exports = {e.name for e in module.exports}
    missing = [name for name in ABI_EXPORTS if name not in exports]
    if missing:
        raise EngineError(f"engine module {path} lacks {', '.join(missing)} of the engine ABI (wasm/ABI.md)")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class EpochTicker:
    """Advances the engine's epoch every EPOCH_TICK_S, so that a call's deadline (in ticks) interrupts it."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self._engine.increment_epoch()

    def stop(self) -> None:
        """Stop ticking and wait for the thread to end (it wakes at once: no tick is waited for)."""
        self._stop.set()
        self._thread.join()


def ticks(seconds: float) -> int:
    return max(1, math.ceil(seconds / EPOCH_TICK_S))


# ------------------------------------------------------------------------------- one sandboxed instance


@dataclass
class GuestBuffer:
    """A buffer in guest memory that an instance reuses across calls (0, 0: none yet)."""

    ptr: int = 0
    size: int = 0


class EngineInstance:
    """One Store + instance with the bundle's weights copied in; used by one thread at a time."""

    def __init__(self, compiled: CompiledEngine, bundle: Bundle, *, max_memory: int, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.max_memory = max_memory
        self.broken = False
        self.store = store = wasmtime.Store(compiled.engine)
        store.set_limits(memory_size=max_memory)
        store.set_epoch_deadline(ticks(LOAD_DEADLINE_S))
        try:
            instance = wasmtime.Instance(store, compiled.module, [])
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise EngineError(
                f"the engine cannot be instantiated within the {max_memory >> 20} MiB memory limit: {_first_line(e)}"
            ) from None
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self._fn: dict[str, Any] = {name: exports[name] for name in ABI_EXPORTS if name != "memory"}
        self._in, self._out = GuestBuffer(), GuestBuffer()
        self._call("_initialize")
        version = self._call("wp_abi_version")
        if version != ABI_VERSION:
            raise EngineError(f"the engine speaks ABI {version}; this host speaks ABI {ABI_VERSION}")
        self._load(bundle)

    def _load(self, bundle: Bundle) -> None:
        words = np.array(bundle.graph.words(), dtype=np.int32)
        cfg = self._put(words)
        self._check(self._call("wp_init", KIND_CODES[bundle.graph.kind], cfg, len(words)), "wp_init")
        self._call("wp_free", cfg)
        for index, (dtype, data, scale) in enumerate(bundle.engine_tensors()):
            name = bundle.graph.names[index]
            data_ptr = self._put(data)
            scale_ptr = self._put(scale) if scale is not None else 0
            status = self._call("wp_set_tensor", index, dtype, data.size, data_ptr, scale_ptr)
            self._check(status, f"tensor {index} ({name})")
        self._check(self._call("wp_ready"), "wp_ready")

    def _put(self, array: np.ndarray) -> int:
        """Copy an array into a fresh guest buffer (one memmove, no intermediate bytes)."""
        array = np.ascontiguousarray(array)
        ptr = self.alloc(max(array.nbytes, 1))
        ctypes.memmove(self._base() + ptr, array.ctypes.data, array.nbytes)
        return ptr

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._call("wp_alloc", nbytes))
        if ptr == 0:
            raise EngineOutOfMemory(
                f"the engine ran out of memory allocating {nbytes} bytes (limit {self.max_memory >> 20} MiB): "
                f"{self._message()}"
            )
        return ptr

    def _base(self) -> int:
        return ctypes.cast(self.memory.data_ptr(self.store), ctypes.c_void_p).value or 0

    def view(self, ptr: int, dtype: type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of guest memory (valid until the next guest call: memory may move when it grows)."""
        count = int(np.prod(shape))
        nbytes = count * np.dtype(dtype).itemsize
        if ptr + nbytes > self.memory.data_len(self.store):
            raise EngineError(f"guest buffer at {ptr} (+{nbytes} bytes) is outside guest memory")
        raw = memoryview((ctypes.c_ubyte * nbytes).from_address(self._base() + ptr)).cast("B")
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def buffers(self, in_bytes: int, out_bytes: int) -> tuple[int, int]:
        """Input and output buffers of at least these sizes, reused across calls (grown when a batch is bigger)."""
        return self._fit(self._in, in_bytes), self._fit(self._out, out_bytes)

    def _fit(self, buffer: GuestBuffer, nbytes: int) -> int:
        """The buffer's address, after replacing it with a bigger one when `nbytes` do not fit."""
        if nbytes > buffer.size:
            self._call("wp_free", buffer.ptr)
            buffer.ptr = buffer.size = 0  # freed: should the allocation fail, nothing points at it any more
            buffer.ptr, buffer.size = self.alloc(nbytes), nbytes
        return buffer.ptr

    def run(self, batch: int, seq: int) -> None:
        """One forward pass over the batch already written at the input buffer, under the deadline."""
        self.store.set_epoch_deadline(ticks(self.deadline_s))
        self._check(self._call("wp_run", batch, seq, self._in.ptr, self._out.ptr), f"a batch of {batch}x{seq}")

    def _call(self, name: str, *args: int) -> Any:
        try:
            return self._fn[name](self.store, *args)
        except wasmtime.Trap as e:
            self.broken = True
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise EngineInterrupted(
                    f"the edge engine ran past its deadline of {self.deadline_s:g} s in {name} and was interrupted"
                ) from None
            raise EngineError(f"the edge engine trapped in {name}: {_first_line(e)}") from None
        except wasmtime.WasmtimeError as e:
            self.broken = True
            raise EngineError(f"the edge engine failed in {name}: {_first_line(e)}") from None

    def _message(self) -> str:
        ptr = int(self._call("wp_error"))
        size = self.memory.data_len(self.store)
        if not 0 < ptr < size:
            return "(no message)"
        raw = bytes(self.view(ptr, np.uint8, (min(1024, size - ptr),)))
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or "(no message)"

    def _check(self, status: int, what: str) -> None:
        if status >= 0:
            return
        message = f"{what}: {self._message()} ({_STATUS.get(status, f'status {status}')})"
        if status == -2:
            raise EngineOutOfMemory(message + f"; the memory limit is {self.max_memory >> 20} MiB")
        raise EngineError(message)


# ------------------------------------------------------------------------------- the pool of workers' instances


class EnginePool:
    """One instance per worker, made up front; a broken instance (trapped, interrupted) is replaced on next use.

    A pool started with `owns_engine` closes the compiled engine (its epoch ticker thread) when it closes, or when
    making its instances fails; pools sharing one compiled engine leave that to whoever compiled it.
    """

    def __init__(
        self,
        compiled: CompiledEngine,
        bundle: Bundle,
        *,
        size: int,
        max_memory: int,
        deadline_s: float,
        owns_engine: bool = False,
    ) -> None:
        self.compiled = compiled
        self.bundle = bundle
        self.max_memory = max_memory
        self.deadline_s = deadline_s
        self.owns_engine = owns_engine
        self._free: queue.SimpleQueue[EngineInstance] = queue.SimpleQueue()
        self.replaced = 0
        self.first_instantiate_seconds = 0.0
        try:
            for i in range(size):
                started = time.perf_counter()
                self._free.put(self._new())
                if i == 0:
                    self.first_instantiate_seconds = time.perf_counter() - started
        except BaseException:
            self.close()
            raise

    def _new(self) -> EngineInstance:
        return EngineInstance(self.compiled, self.bundle, max_memory=self.max_memory, deadline_s=self.deadline_s)

    @contextlib.contextmanager
    def instance(self) -> Iterator[EngineInstance]:
        inst = self._free.get()
        if inst.broken:
            log.warning("replacing an engine instance that trapped or was interrupted")
            self.replaced += 1
            try:
                inst = self._new()
            except BaseException:
                self._free.put(inst)  # still broken: the next user retries
                raise
        try:
            yield inst
        finally:
            self._free.put(inst)

    def close(self) -> None:
        while True:
            try:
                self._free.get_nowait()
            except queue.Empty:
                break
        if self.owns_engine:
            self.compiled.close()
