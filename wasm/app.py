"""The edge server and compiler shells: a bundle (or a model compiled on the fly) on a pool of sandboxed engine
instances, served by the server's own app — same V2 protocol, /v1/embeddings, batching, drain and metric names."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from warmpod.server.app import ServerConfig
from warmpod.server.errors import ModelError
from warmpod.server.model import ServedModel
from warmpod.server.tensors import Tensor
from warmpod.wasm.bundle import Bundle, BundleError, from_model, is_bundle, load_bundle, model_directory
from warmpod.wasm.host import DEFAULT_CACHE, ENGINE_WASM, CompiledEngine, EngineError, EnginePool, compile_engine
from warmpod.wasm.models import edge_model

log = logging.getLogger("warmpod.edge")

# Texts the compiler measures a lower precision on: short, long, non-ASCII, padding in one batch.
PROBE_TEXTS = (
    "warm pods start fast",
    "A man is playing a guitar on a small stage while the audience claps along.",
    "Inference servers spend most cold starts copying gigabytes of weights into every new container.",
    "Zürich, 東京, and São Paulo 🚀",
    "ok",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),
)
PROBE_ROWS = 64  # MLP probe: rows of seeded standard-normal inputs


@dataclass(frozen=True)
class EdgeConfig:
    source: Path  # a bundle directory, or a model directory compiled (FP32) at start
    engine: Path = ENGINE_WASM
    cache_dir: Path | None = DEFAULT_CACHE
    max_memory: int = 1 << 30  # per instance


def open_source(source: Path) -> Bundle:
    """A bundle directory as is, or a model directory turned into an FP32 bundle in memory."""
    if is_bundle(source):
        return load_bundle(source)
    return from_model(model_directory(source))


def start_engine(bundle: Bundle, edge: EdgeConfig, *, workers: int, deadline_s: float) -> EnginePool:
    """Compile (or load from the cache) the engine and pre-instantiate one instance per worker; the pool owns the
    engine: closing it (or failing to make the instances) stops the engine's epoch ticker too."""
    try:
        compiled = compile_engine(edge.engine, edge.cache_dir)
    except EngineError as e:
        raise ModelError(str(e)) from None
    try:
        return EnginePool(
            compiled, bundle, size=workers, max_memory=edge.max_memory, deadline_s=deadline_s, owns_engine=True
        )
    except EngineError as e:
        raise ModelError(f"edge bundle {bundle.name!r}: {e}") from None


def load_edge(edge: EdgeConfig, *, workers: int, deadline_s: float, truncate: bool | None = None) -> ServedModel:
    """The served model: bundle + engine pool, warmed up. ModelError says what does not fit.

    `truncate` overrides what the model's files say about cutting long texts (None: follow the files)."""
    bundle = open_source(edge.source)
    pool = start_engine(bundle, edge, workers=workers, deadline_s=deadline_s)
    try:
        model = edge_model(bundle, pool, truncate=truncate)
    except BaseException:
        pool.close()
        raise
    try:
        model.warm_up()
    except Exception as e:
        model.close()
        raise ModelError(f"edge bundle {bundle.name!r}: the warm-up forward failed: {e}") from None
    log.info(
        "edge engine %s (%s), %d instance(s), first instantiation %.1f ms",
        pool.compiled.origin, bundle.dtype, workers, pool.first_instantiate_seconds * 1000,
    )  # fmt: skip
    return model


class EdgeSource:
    """The edge's model source (warmpod.server.source.ModelSource): one bundle, loaded once. Bundles are immutable,
    so there is never a newer version to swap in (a new bundle is a new rollout)."""

    VERSION = "bundle"

    def __init__(self, edge: EdgeConfig, config: ServerConfig) -> None:
        self.edge, self.config = edge, config

    def prepare(self) -> None:
        pass

    def latest(self) -> str:
        return self.VERSION

    def load(self, version: str) -> ServedModel:
        config = self.config
        try:
            return load_edge(self.edge, workers=config.workers, deadline_s=config.request_timeout_s,
                             truncate=config.truncate)  # fmt: skip
        except BundleError as e:
            raise ModelError(str(e)) from None


# ------------------------------------------------------------------------------- compile with accuracy


def probe_inputs(model: ServedModel) -> dict[str, Tensor]:
    if model.is_text_embedding:
        data = np.array([t.encode() for t in PROBE_TEXTS], dtype=object)
        return {"text": Tensor("text", "BYTES", data.shape, data)}
    (spec,) = model.inputs
    x = np.random.default_rng(0).standard_normal((PROBE_ROWS, spec.shape[1])).astype(np.float32)
    return {spec.name: Tensor(spec.name, "FP32", x.shape, x)}


def outputs_on(bundle: Bundle, compiled: CompiledEngine) -> dict[str, np.ndarray]:
    """The bundle's float outputs on the probe inputs, run on the engine."""
    pool = EnginePool(compiled, bundle, size=1, max_memory=4 << 30, deadline_s=600)
    model = edge_model(bundle, pool)
    try:
        (out,) = model.run([model.prepare(probe_inputs(model))])
    finally:
        model.close()
    return {k: v for k, v in out.items() if v.dtype == np.float32}


def measure_accuracy(fp32: Bundle, stored: Bundle, engine: Path, cache_dir: Path | None) -> dict[str, Any]:
    """Max abs difference of the stored precision's outputs from the FP32 bundle's, on the probe inputs (run on the
    engine module `engine`, compiled only when there is a lower precision to measure)."""
    if stored.dtype == "fp32":
        return {"max_abs_error": 0.0, "against": "fp32", "probe": "none needed: stored as FP32"}
    compiled = compile_engine(engine, cache_dir)
    try:
        ref, got = outputs_on(fp32, compiled), outputs_on(stored, compiled)
    finally:
        compiled.close()
    error = max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref)
    probe = f"{len(PROBE_TEXTS)} texts" if fp32.graph.kind == "bert" else f"{PROBE_ROWS} standard-normal rows"
    report: dict[str, Any] = {"max_abs_error": error, "against": "fp32", "probe": probe, "outputs": sorted(ref)}
    if "embedding" in ref:  # what retrieval cares about: the direction of each vector
        a, b = ref["embedding"], got["embedding"]
        cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        report["min_cosine"] = float(cosine.min())
    return report
