"""The MLP / classifier family on torch: the staged weights assigned to `MLP`. The config (`config.json` with
`model_type: "mlp"`), the tensors it names, the inputs and the outputs are described in `mlp_spec.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from warmpod.server.families.common import stack_inputs
from warmpod.server.families.mlp_spec import MLPConfig, MLPInterface
from warmpod.server.model import Prepared, assign_weights, build_on_meta
from warmpod.store import StagedModel


class MLP(nn.Module):
    """Linear layers with one activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], activation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = _activate(x, self.activation)
        return x


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "gelu":
        return nn.functional.gelu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return x


class MLPModel(MLPInterface):
    def __init__(self, name: str, version: str, staged: StagedModel | None, spec: MLPConfig) -> None:
        super().__init__(name, version, staged, spec)
        self.module: MLP | None = None
        self.dtype = torch.float32

    @classmethod
    def from_staged(
        cls,
        name: str,
        staged: StagedModel,
        config: Mapping[str, Any],
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> MLPModel:
        """The MLP on the staged weights (or `tensors`, as warmpod.server.precision serves them), computing in the
        first layer's weight dtype (bf16 weights: bf16 layers, the input cast to bf16, the outputs FP32)."""
        spec = MLPConfig.from_json(config)
        model = cls(name, staged.version, staged, spec)
        tensors = staged.tensors() if tensors is None else tensors
        first = tensors.get("layers.0.weight")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        module = build_on_meta(lambda: MLP(spec.sizes, spec.activation).to(dtype))
        assign_weights(module, tensors, what=f"mlp model {name!r} version {staged.version}")
        model.module = module
        model.dtype = next(module.parameters()).dtype
        return model

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        assert self.module is not None, "model closed"
        (x,) = stack_inputs(batch, ["input"])
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self.dtype)).float()
            probabilities = None
            if self.spec.output_activation == "softmax":
                probabilities = torch.softmax(logits, dim=-1).numpy()
            elif self.spec.output_activation == "sigmoid":
                probabilities = torch.sigmoid(logits).numpy()
        return self.finish(batch, logits.numpy(), probabilities)

    def close(self) -> None:
        self.module = None
        super().close()
