"""The torch-free half of the MLP / classifier family (config, inputs, outputs, labels), shared by the torch model
(`mlp.py`) and the edge engine (`wasm/`).

A small JSON config next to the safetensors describes the layers.

`config.json`::

    {"model_type": "mlp", "input_size": 4, "hidden_sizes": [16, 16], "output_size": 3,
     "activation": "relu", "output_activation": "softmax", "labels": ["setosa", "versicolor", "virginica"]}

Tensors: `layers.{i}.weight` (out, in) and `layers.{i}.bias` for every linear layer, input to output, in the dtype the
model computes in (F32, F16, BF16, F64). Input `input` FP32 [batch, input_size]; outputs `logits` FP32, plus
`probabilities` when `output_activation` is softmax/sigmoid, plus `label` BYTES when `labels` are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from warmpod.server.errors import ModelError
from warmpod.server.families.common import as_arrays, split_rows
from warmpod.server.model import Prepared, ServedModel, check_inputs
from warmpod.server.tensors import Tensor, TensorSpec

if TYPE_CHECKING:
    from warmpod.store import StagedModel

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "identity")
OUTPUT_ACTIVATIONS = (None, "softmax", "sigmoid")


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"mlp config: {key!r} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class MLPConfig:
    """A `model_type: mlp` config.json, checked: layer sizes input → output, activations, optional labels."""

    sizes: list[int]
    activation: str
    output_activation: str | None
    labels: list[str] | None

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> MLPConfig:
        input_size = _positive_int(config, "input_size")
        output_size = _positive_int(config, "output_size")
        hidden = config.get("hidden_sizes", [])
        if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ModelError(f"mlp config: 'hidden_sizes' must be a list of positive integers, got {hidden!r}")
        activation = config.get("activation", "relu")
        if activation not in ACTIVATIONS:
            raise ModelError(f"mlp config: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        output_activation = config.get("output_activation")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ModelError(f"mlp config: output_activation {output_activation!r} is not softmax, sigmoid or null")
        labels = config.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or len(labels) != output_size or not all(isinstance(x, str) for x in labels)
        ):
            raise ModelError(f"mlp config: 'labels' must be {output_size} strings (one per output)")
        return cls([input_size, *hidden, output_size], activation, output_activation, labels)


class MLPInterface(ServedModel):
    """An MLP's config, inputs and outputs; subclasses give `run` and call `finish` with the logits."""

    family = "mlp"

    def __init__(self, name: str, version: str, staged: StagedModel | None, spec: MLPConfig) -> None:
        super().__init__(name, version, staged)
        self.spec = spec

    @property
    def input_size(self) -> int:
        return self.spec.sizes[0]

    @property
    def output_size(self) -> int:
        return self.spec.sizes[-1]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input", "FP32", (-1, self.input_size)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        specs = [TensorSpec("logits", "FP32", (-1, self.output_size))]
        if self.spec.output_activation:
            specs.append(TensorSpec("probabilities", "FP32", (-1, self.output_size)))
        if self.spec.labels:
            specs.append(TensorSpec("label", "BYTES", (-1,)))
        return tuple(specs)

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        check_inputs(self.name, self.inputs, inputs)
        arrays = as_arrays(inputs, ["input"])
        return Prepared(rows=arrays["input"].shape[0], data=arrays, model=self)

    def finish(
        self, batch: Sequence[Prepared], logits: np.ndarray, probabilities: np.ndarray | None
    ) -> list[dict[str, np.ndarray]]:
        """Each request's rows of the logits, probabilities (with an output activation) and labels (with labels)."""
        outputs = {"logits": logits}
        if probabilities is not None:
            outputs["probabilities"] = probabilities
        if self.spec.labels:
            best = logits.argmax(axis=-1)
            outputs["label"] = np.array([self.spec.labels[i].encode() for i in best], dtype=object)
        return split_rows(batch, outputs)

    def example_inputs(self) -> dict[str, Tensor]:
        data = np.zeros((1, self.input_size), dtype=np.float32)
        return {"input": Tensor("input", "FP32", data.shape, data)}
