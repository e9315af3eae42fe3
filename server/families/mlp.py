"""The MLP / classifier family: a small JSON config next to the safetensors describes the layers.

`config.json`::

    {"model_type": "mlp", "input_size": 4, "hidden_sizes": [16, 16], "output_size": 3,
     "activation": "relu", "output_activation": "softmax", "labels": ["setosa", "versicolor", "virginica"]}

Tensors: `layers.{i}.weight` (out, in) and `layers.{i}.bias` for every linear layer, input to output, in the dtype the
model computes in (F32, F16, BF16, F64). Input `input` FP32 [batch, input_size]; outputs `logits` FP32, plus
`probabilities` when `output_activation` is softmax/sigmoid, plus `label` BYTES when `labels` are given.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from loader.store import StagedModel
from server.errors import ModelError
from server.families.common import as_arrays, split_rows, stack_inputs
from server.model import Prepared, ServedModel, assign_weights, build_on_meta, check_inputs
from server.tensors import Tensor, TensorSpec

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "identity")
OUTPUT_ACTIVATIONS = (None, "softmax", "sigmoid")


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"mlp config: {key!r} must be a positive integer, got {value!r}")
    return value


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


class MLPModel(ServedModel):
    family = "mlp"

    def __init__(self, name: str, version: str, staged: StagedModel | None, config: Mapping[str, Any]) -> None:
        super().__init__(name, version, staged)
        self.input_size = _positive_int(config, "input_size")
        self.output_size = _positive_int(config, "output_size")
        hidden = config.get("hidden_sizes", [])
        if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ModelError(f"mlp config: 'hidden_sizes' must be a list of positive integers, got {hidden!r}")
        self.sizes = [self.input_size, *hidden, self.output_size]
        self.activation = config.get("activation", "relu")
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"mlp config: activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.output_activation = config.get("output_activation")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ModelError(
                f"mlp config: output_activation {self.output_activation!r} is not softmax, sigmoid or null"
            )
        labels = config.get("labels")
        if labels is not None and (
            not isinstance(labels, list)
            or len(labels) != self.output_size
            or not all(isinstance(x, str) for x in labels)
        ):
            raise ModelError(f"mlp config: 'labels' must be {self.output_size} strings (one per output)")
        self.labels: list[str] | None = labels
        self.module: MLP | None = None
        self.dtype = torch.float32

    @classmethod
    def from_staged(cls, name: str, staged: StagedModel, config: Mapping[str, Any]) -> MLPModel:
        model = cls(name, staged.version, staged, config)
        module = build_on_meta(lambda: MLP(model.sizes, model.activation))
        assign_weights(module, staged.tensors(), what=f"mlp model {name!r} version {staged.version}")
        model.module = module
        model.dtype = next(module.parameters()).dtype
        return model

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input", "FP32", (-1, self.input_size)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        specs = [TensorSpec("logits", "FP32", (-1, self.output_size))]
        if self.output_activation:
            specs.append(TensorSpec("probabilities", "FP32", (-1, self.output_size)))
        if self.labels:
            specs.append(TensorSpec("label", "BYTES", (-1,)))
        return tuple(specs)

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        check_inputs(self.name, self.inputs, inputs)
        arrays = as_arrays(inputs, ["input"])
        return Prepared(rows=arrays["input"].shape[0], data=arrays, model=self)

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        assert self.module is not None, "model closed"
        (x,) = stack_inputs(batch, ["input"])
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self.dtype)).float()
            outputs = {"logits": logits.numpy()}
            if self.output_activation == "softmax":
                outputs["probabilities"] = torch.softmax(logits, dim=-1).numpy()
            elif self.output_activation == "sigmoid":
                outputs["probabilities"] = torch.sigmoid(logits).numpy()
        if self.labels:
            best = outputs["logits"].argmax(axis=-1)
            outputs["label"] = np.array([self.labels[i].encode() for i in best], dtype=object)
        return split_rows(batch, outputs)

    def example_inputs(self) -> dict[str, Tensor]:
        data = np.zeros((1, self.input_size), dtype=np.float32)
        return {"input": Tensor("input", "FP32", data.shape, data)}

    def close(self) -> None:
        self.module = None
        super().close()
