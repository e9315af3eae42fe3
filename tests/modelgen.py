"""Small generated models for tests: real safetensors files, sharded directories, and deliberately broken ones."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file


def tensors(seed: int = 0, scale: int = 1) -> dict[str, np.ndarray]:
    """A handful of tensors of mixed dtypes; `scale` multiplies the big one's rows (~64 KiB per unit)."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((128 * scale, 128), dtype=np.float32),
        "layer.0.weight": rng.standard_normal((64, 64)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(64).astype(np.float64),
        "positions": np.arange(512, dtype=np.int64),
        "mask": rng.integers(0, 2, 100).astype(np.bool_),
        "scalar": np.array(3.5, dtype=np.float32),
    }


def write_model(path: Path, seed: int = 0, scale: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors(seed, scale), str(path), metadata={"format": "np"})
    return path


def write_model_dir(root: Path, seed: int = 0, scale: int = 1, shards: int = 1) -> Path:
    """An HF-style directory: weights (sharded with an index when shards > 1) plus small companion files."""
    root.mkdir(parents=True, exist_ok=True)
    all_tensors = tensors(seed, scale)
    if shards == 1:
        save_file(all_tensors, str(root / "model.safetensors"))
    else:
        names = sorted(all_tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: all_tensors[n] for n in names[i::shards]}
            save_file(part, str(root / shard))
            weight_map.update(dict.fromkeys(part, shard))
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "test", "seed": seed}))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    return root


def raw_safetensors(header: dict[str, Any] | bytes, data: bytes = b"", declared_len: int | None = None) -> bytes:
    """File bytes for any header (a dict is JSON-encoded as is, so broken headers are easy to build)."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if declared_len is None else declared_len
    return struct.pack("<Q", n) + blob + data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (to compare a staged version with its source)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def mlp_tensors(sizes: Sequence[int], rng: np.random.Generator, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Random weights for an MLP of `sizes`, named as the `mlp` family wants them, in layer order (weight, bias):
    weights scaled by 1/sqrt(fan-in), small biases."""
    weights = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        weights[f"layers.{i}.weight"] = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(dtype)
        weights[f"layers.{i}.bias"] = (rng.standard_normal(b) * 0.1).astype(dtype)
    return weights


def write_mlp_dir(
    root: Path,
    sizes: tuple[int, ...] = (4, 16, 3),
    *,
    seed: int = 0,
    activation: str = "relu",
    output_activation: str | None = "softmax",
    labels: list[str] | None = None,
    dtype: Any = np.float32,
) -> Path:
    """An MLP model directory (config.json + model.safetensors) for the server's `mlp` family."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(mlp_tensors(sizes, np.random.default_rng(seed), dtype), str(root / "model.safetensors"))
    config: dict[str, Any] = {
        "model_type": "mlp",
        "input_size": sizes[0],
        "hidden_sizes": list(sizes[1:-1]),
        "output_size": sizes[-1],
        "activation": activation,
        "output_activation": output_activation,
    }
    if labels is not None:
        config["labels"] = labels
    (root / "config.json").write_text(json.dumps(config))
    return root


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.vectorize(lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)))(x))


# The activations between an MLP's layers, in float64: the reference for the server's and the engine's.
MLP_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "gelu": _gelu,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


def mlp_forward(tensors: Sequence[np.ndarray], x: np.ndarray, activation: str = "relu") -> np.ndarray:
    """An MLP's logits in float64 with numpy, from its tensors in layer order (weight, bias, weight, bias, ...)."""
    h = x.astype(np.float64)
    layers = len(tensors) // 2
    for i in range(layers):
        h = h @ tensors[2 * i].astype(np.float64).T + tensors[2 * i + 1].astype(np.float64)
        if i < layers - 1:
            h = MLP_ACTIVATIONS[activation](h)
    return h


def mlp_reference(root: Path, x: np.ndarray, activation: str = "relu") -> np.ndarray:
    """The MLP's logits computed with numpy from the files (an independent check of the served outputs)."""
    from safetensors.numpy import load_file

    weights = load_file(str(root / "model.safetensors"))
    layers = [weights[f"layers.{i}.{part}"] for i in range(len(weights) // 2) for part in ("weight", "bias")]
    return mlp_forward(layers, x, activation).astype(np.float32)


def write_slow_dir(root: Path, sleep_s: float) -> Path:
    """A model for `--factory tests.server.factories:slow`: a 4→4 linear layer whose forward sleeps."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file(
        {"proj.weight": rng.standard_normal((4, 4)).astype(np.float32), "proj.bias": np.zeros(4, np.float32)},
        str(root / "model.safetensors"),
    )
    io = {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    (root / "config.json").write_text(json.dumps({"sleep_s": sleep_s, "inputs": [io]}))
    return root
