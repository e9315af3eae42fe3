"""Shared by the tensor-in, tensor-out families (MLP, user factory): batch by concatenation, split rows back."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from warmpod.server.errors import ModelError
from warmpod.server.model import Prepared
from warmpod.server.tensors import Tensor


def read_config(path: Path, *, required: bool = True) -> dict[str, Any]:
    """The staged `config.json` as a dict; ModelError when it is missing (and required) or not a JSON object."""
    config = read_json_object(path, path.name)
    if config is not None:
        return config
    if required:
        raise ModelError(
            f"no config.json in the staged model ({path.parent}): warmpod picks the model family from it "
            "(model_type 'bert' or 'mlp'), or serve any nn.Module with --factory package.module:function"
        )
    return {}


def read_json(path: Path, name: str) -> Any:
    """A staged JSON file's content, or None when it is not there; ModelError (naming `name`) when it is not JSON."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{name} is not valid JSON: {e}") from None


def read_json_object(path: Path, name: str) -> dict[str, Any] | None:
    """`read_json` for files that must hold a JSON object."""
    value = read_json(path, name)
    if value is None or isinstance(value, dict):
        return value
    raise ModelError(f"{name} must hold a JSON object, not {type(value).__name__}")


def stack_inputs(batch: Sequence[Prepared], names: Sequence[str]) -> list[np.ndarray]:
    """Concatenate each input over the requests of a batch (their rows are the first dimension)."""
    return [np.concatenate([p.data[n] for p in batch]) if len(batch) > 1 else batch[0].data[n] for n in names]


def split_rows(batch: Sequence[Prepared], outputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Give each request exactly its own rows of every output, in batch order."""
    results: list[dict[str, np.ndarray]] = []
    start = 0
    for p in batch:
        results.append({name: array[start : start + p.rows] for name, array in outputs.items()})
        start += p.rows
    return results


def same_trailing_shapes(batch: Sequence[Prepared], names: Sequence[str]) -> bool:
    """True when the requests can be concatenated (only the batch dimension differs)."""
    return all(len({p.data[n].shape[1:] for p in batch}) == 1 for n in names)


def as_arrays(inputs: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: inputs[n].data for n in names}
