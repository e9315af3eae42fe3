"""What every model family gives the server: input/output specs, per-request preparation, a batched forward.

The batcher and the protocol layer only see this interface; families (BERT encoders, MLPs, user factories) live in
`warmpod.server.families`. Weights are never copied: families build their module on the meta device and assign the
staged read-only tensors with `assign_weights`, which also names every missing, extra or mis-shaped tensor.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from warmpod.server.errors import BadRequest, ModelError
from warmpod.server.tensors import Tensor, TensorSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from warmpod.server.precision import WeightsPrecision
    from warmpod.store import StagedModel


M = TypeVar("M", bound="nn.Module")


@dataclass
class Prepared:
    """One request's inputs, validated and preprocessed (tokenized), waiting to join a batch.

    `rows` is its share of the batch dimension; `tokens` counts input tokens for text models (OpenAI `usage`).
    """

    rows: int
    data: Any
    tokens: int = 0
    model: ServedModel | None = field(default=None, repr=False)  # the model that prepared it runs it

    def split(self, max_rows: int) -> list[Prepared]:
        """This request as chunks of at most `max_rows` rows, in order (itself when it fits). The batcher schedules
        chunks like any other work, so a large request never holds the model while others wait."""
        if self.rows <= max_rows:
            return [self]
        chunks = []
        for start in range(0, self.rows, max_rows):
            stop = min(start + max_rows, self.rows)
            data = slice_rows(self.data, start, stop)
            tokens = sum(map(len, data)) if self.tokens and isinstance(data, list) else 0
            chunks.append(Prepared(rows=stop - start, data=data, tokens=tokens, model=self.model))
        return chunks


def slice_rows(data: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of a prepared request's data: every array of a mapping (inputs by name), or the sequence
    itself (token ids per text, an array of rows)."""
    if isinstance(data, Mapping):
        return {name: rows[start:stop] for name, rows in data.items()}
    return data[start:stop]


def merge_outputs(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A chunked request's outputs, its chunks' rows back together in order (the inverse of `Prepared.split`)."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class ServedModel(abc.ABC):
    """A model ready to serve. `run` is called from one worker thread at a time; everything else from the loop."""

    family: str = "?"
    precision: WeightsPrecision | None = None  # how its weights are stored and computed (set by build_model)

    def __init__(self, name: str, version: str, staged: StagedModel | None) -> None:
        self.name = name
        self.version = version
        self.staged = staged  # keeps the read-only mappings alive while this model serves

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def is_text_embedding(self) -> bool:
        """True when the model turns text into one vector per text (served on /v1/embeddings too)."""
        return False

    @abc.abstractmethod
    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        """Validate one request's inputs (names, datatypes, shapes) and preprocess them; raise BadRequest."""

    def prepare_texts(self, texts: Sequence[str]) -> Prepared:
        """Prepare raw texts (the /v1/embeddings path)."""
        raise BadRequest(f"model {self.name!r} ({self.family}) does not take text; it has no embeddings endpoint")

    @abc.abstractmethod
    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        """One forward pass over the merged batch; returns each request's own output arrays, in order."""

    def warm_up(self) -> None:
        """One forward pass so that the first real request does not pay for lazy initialisation."""
        self.run([self.prepare(self.example_inputs())])

    @abc.abstractmethod
    def example_inputs(self) -> dict[str, Tensor]:
        """A small valid request (used for the warm-up forward)."""

    def close(self) -> None:
        """Drop the module and the mappings; the pages are unmapped once the last tensor view is gone."""
        self.staged = None

    def metadata(self) -> dict[str, Any]:
        """The V2 model metadata response."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"warmpod_{self.family}",
            "inputs": [s.as_json() for s in self.inputs],
            "outputs": [s.as_json() for s in self.outputs],
        }


def check_inputs(model: str, specs: Sequence[TensorSpec], inputs: Mapping[str, Tensor]) -> None:
    """Every declared input present with its datatype and a matching shape, nothing else; else BadRequest."""
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise BadRequest(
            f"model {model!r} has no input named {', '.join(map(repr, unknown))}; it takes {sorted(known)}"
        )
    for spec in specs:
        got = inputs.get(spec.name)
        if got is None:
            raise BadRequest(f"model {model!r}: missing input {spec.name!r} ({spec.datatype} {list(spec.shape)})")
        if got.datatype != spec.datatype:
            raise BadRequest(f"input {spec.name!r}: datatype {got.datatype} is not the model's {spec.datatype}")
        if not spec.matches(got.shape):
            raise BadRequest(
                f"input {spec.name!r}: shape {list(got.shape)} does not match the model's {list(spec.shape)}"
            )


# The initialisers modules call in reset_parameters. On the meta device they are pointless (the weights are
# assigned from the store) and costly: the first random init on meta imports torch's Python decompositions (~2 s).
_INITIALISERS = (
    *("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "orthogonal_"),
    *("xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "sparse_"),
)


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module without allocating or initialising its parameters (they are assigned from the store)."""
    import torch

    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INITIALISERS if hasattr(init, name)}
    for name in saved:
        setattr(init, name, _no_init)
    try:
        with torch.device("meta"):
            return factory()
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _no_init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


def assign_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Make the staged tensors the module's parameters and buffers, without copying a byte.

    Raises ModelError naming every missing, extra, mis-shaped or mis-typed tensor, and any parameter or buffer that
    would be left unmaterialised on the meta device.
    """
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} is {tuple(tensors[k].shape)} {tensors[k].dtype}, the model wants {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in tensors and (tuple(tensors[k].shape) != tuple(v.shape) or tensors[k].dtype != v.dtype)
    ]
    problems = weight_problems(missing, extra, wrong)
    if any(k in tensors and tensors[k].dtype != v.dtype for k, v in expected.items()):
        problems += (
            ". The module's dtypes must be the staged weights': build it in their dtype (a store staged with "
            "--dtype bf16: .to(torch.bfloat16)), or stage the dtype the module is built in"
        )
    if problems:
        raise ModelError(f"{what}: the staged weights do not fit the model — {problems}")
    module.load_state_dict(dict(tensors), strict=True, assign=True)
    module.requires_grad_(False)
    module.eval()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelError(f"{what}: these are not in the staged weights and were never materialised: {_list(left)}")


def weight_problems(missing: Sequence[str], extra: Sequence[str], wrong: Sequence[str]) -> str:
    """'missing tensors: …; unexpected tensors: …; mis-shaped tensors: …' for the non-empty lists ('' if none)."""
    named = (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong))
    return "; ".join(f"{what} tensors: {_list(items)}" for what, items in named if items)


def _list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
