"""Models in other precisions for tests and benchmarks: a copy of a model directory whose floating tensors are bf16
(as `warmpod load --dtype bf16` stages them: same names, F64/F32/F16 → BF16, integer tensors unchanged)."""

from __future__ import annotations

import shutil
from pathlib import Path


def bf16_copy(source: Path, out: Path) -> Path:
    """`out`: `source`'s files, every *.safetensors rewritten with its floating tensors in bf16 (torch's
    round-to-nearest-even, as the loader converts), its metadata kept."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", ".*"))
    for weights in sorted(source.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        converted = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
        save_file(converted, str(out / weights.name), metadata=metadata)
    return out
