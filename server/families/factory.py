"""Any torch `nn.Module` from a user factory `package.module:function` (named by the operator with --factory).

The factory receives the staged `config.json` as a dict (empty when there is none) and returns a module whose
state dict matches the staged tensors; it is called on the meta device, so it must not load weights itself. The
code to run is chosen on the command line, never by a file in the store: a model version cannot make the server
import code.

Inputs and outputs come from the config's optional `"inputs"` / `"outputs"` lists of `{"name", "datatype",
"shape"}` (default: one `input` FP32 of any shape → one `output` FP32). `forward` receives the inputs as tensors in
that order and returns a tensor, a tuple of tensors (in output order) or a dict keyed by output name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from warmpod.server.errors import BadRequest, ModelError
from warmpod.server.families.common import as_arrays, same_trailing_shapes, split_rows, stack_inputs
from warmpod.server.model import Prepared, ServedModel, assign_weights, build_on_meta, check_inputs
from warmpod.server.tensors import DATATYPES, NUMPY_DTYPES, Tensor, TensorSpec
from warmpod.store import StagedModel

DEFAULT_INPUTS = (TensorSpec("input", "FP32", (-1, -1)),)
DEFAULT_OUTPUTS = (TensorSpec("output", "FP32", (-1, -1)),)


def resolve_factory(spec: str) -> Callable[[dict[str, Any]], nn.Module]:
    """Import `package.module:function`; ModelError saying what is wrong with the spec otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"--factory {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"--factory {spec!r}: cannot import {module_name!r}: {e}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"--factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"--factory {spec!r}: {attr!r} is not callable")
    factory: Callable[[dict[str, Any]], nn.Module] = target
    return factory


def _specs(config: Mapping[str, Any], key: str, default: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    raw = config.get(key)
    if raw is None:
        return default
    if not isinstance(raw, list) or not raw:
        raise ModelError(f"config {key!r} must be a non-empty list of {{name, datatype, shape}}")
    specs = []
    for item in raw:
        try:
            name, datatype, shape = item["name"], item["datatype"], tuple(item["shape"])
        except (KeyError, TypeError):
            raise ModelError(f"config {key!r}: each entry needs name, datatype and shape, got {item!r}") from None
        if datatype not in DATATYPES or datatype == "BYTES":
            raise ModelError(f"config {key!r}: {name!r} has datatype {datatype!r}; tensors take {DATATYPES[:-1]}")
        if not shape or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ModelError(f"config {key!r}: {name!r} needs a shape of integers (-1 for any size), got {shape}")
        specs.append(TensorSpec(str(name), datatype, shape))
    return tuple(specs)


class FactoryModel(ServedModel):
    family = "factory"

    def __init__(
        self, name: str, version: str, staged: StagedModel | None, config: Mapping[str, Any], module: nn.Module
    ) -> None:
        super().__init__(name, version, staged)
        self._inputs = _specs(config, "inputs", DEFAULT_INPUTS)
        self._outputs = _specs(config, "outputs", DEFAULT_OUTPUTS)
        self.module: nn.Module | None = module

    @classmethod
    def from_staged(
        cls,
        name: str,
        staged: StagedModel,
        config: dict[str, Any],
        factory: str,
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> FactoryModel:
        """The factory's module on the staged weights (or `tensors`, as warmpod.server.precision serves them). The
        module's own dtypes must match the weights': a bf16 store needs a module built in bf16 (`.to(torch.bfloat16)`
        in the factory) on a CPU with native bf16."""
        make = resolve_factory(factory)
        try:
            module = build_on_meta(lambda: make(config))
        except Exception as e:  # user code: whatever it raises, say where it came from
            raise ModelError(f"--factory {factory!r} failed to build the module: {type(e).__name__}: {e}") from e
        if not isinstance(module, nn.Module):
            raise ModelError(f"--factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
        weights = staged.tensors() if tensors is None else tensors
        assign_weights(module, weights, what=f"model {name!r} version {staged.version} ({factory})")
        return cls(name, staged.version, staged, config, module)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        check_inputs(self.name, self._inputs, inputs)
        arrays = as_arrays(inputs, [s.name for s in self._inputs])
        rows = {a.shape[0] for a in arrays.values()}
        if len(rows) != 1:
            raise BadRequest(f"inputs disagree on the batch dimension (first dimension): {sorted(rows)}")
        return Prepared(rows=rows.pop(), data=arrays, model=self)

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        names = [s.name for s in self._inputs]
        if len(batch) > 1 and not same_trailing_shapes(batch, names):
            return [self.run([p])[0] for p in batch]  # shapes differ beyond the batch dimension: one at a time
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a)) for a in stack_inputs(batch, names)]
            assert self.module is not None, "model closed"
            result = self.module(*args)
        return split_rows(batch, self._collect(result))

    def _collect(self, result: Any) -> dict[str, np.ndarray]:
        names = [s.name for s in self._outputs]
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            values = [result.get(n) for n in names]
        elif isinstance(result, Sequence):
            values = list(result)
        else:
            raise ModelError(f"forward returned {type(result).__name__}; expected a tensor, tuple or dict")
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if len(tensors) != len(values) or len(tensors) != len(names):
            raise ModelError(f"forward must return {len(names)} tensor(s) named {names}, got {len(values)} value(s)")
        return {
            spec.name: value.detach().numpy().astype(NUMPY_DTYPES[spec.datatype], copy=False)
            for spec, value in zip(self._outputs, tensors, strict=True)
        }

    def example_inputs(self) -> dict[str, Tensor]:
        out = {}
        for s in self._inputs:
            shape = tuple(1 if d == -1 else d for d in s.shape)
            data = np.zeros(shape, dtype=NUMPY_DTYPES[s.datatype])
            out[s.name] = Tensor(s.name, s.datatype, shape, data)
        return out

    def close(self) -> None:
        self.module = None
        super().close()
