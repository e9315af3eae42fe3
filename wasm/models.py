"""Edge models: the server's model interfaces (same inputs, outputs, validation, tokenization) with the forward pass
in the WebAssembly engine — one guest call per batch, inputs written straight into guest memory and outputs read
from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from warmpod.server.errors import DeadlineExceeded, ModelError, PayloadTooLarge, ServerError
from warmpod.server.families.common import split_rows, stack_inputs
from warmpod.server.families.mlp_spec import MLPConfig, MLPInterface
from warmpod.server.families.sentence import BertConfig, SentenceSettings, TextEncoder, load_tokenizer
from warmpod.server.model import Prepared, ServedModel
from warmpod.wasm.bundle import Bundle
from warmpod.wasm.host import EngineError, EngineInstance, EngineInterrupted, EngineOutOfMemory, EnginePool


def engine_failure(e: EngineError) -> ServerError:
    """How a failed guest call reaches the client: 504 when it was interrupted at its deadline; 413 when the batch
    does not fit the guest memory limit (nothing was computed: the allocation failed); else 500."""
    if isinstance(e, EngineInterrupted):
        return DeadlineExceeded(str(e))
    if isinstance(e, EngineOutOfMemory):
        return PayloadTooLarge(
            f"the request does not fit the edge engine's guest memory ({e}): send fewer or shorter rows per "
            "request, or start the server with a smaller --max-batch-size or a larger --max-memory"
        )
    return ServerError(str(e))


class OnEngine(ServedModel):
    """What both edge families share: the pool of engine instances, a guest call turned into the server's errors,
    and closing."""

    pool: EnginePool | None = None

    @contextlib.contextmanager
    def engine(self) -> Iterator[EngineInstance]:
        """One worker's instance for the duration of a batch."""
        if self.pool is None:
            raise ModelError(f"model {self.name!r} is closed")
        with self.pool.instance() as instance:
            try:
                yield instance
            except EngineError as e:  # buffers that cannot be allocated, as well as a failed guest call
                raise engine_failure(e) from None

    @staticmethod
    def forward(engine: EngineInstance, rows: int, seq: int) -> None:
        """`wp_run` on the inputs already in guest memory; a failure becomes a 504 (deadline) or a 500."""
        try:
            engine.run(rows, seq)
        except EngineError as e:
            raise engine_failure(e) from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = None
        super().close()


class EdgeEncoder(OnEngine, TextEncoder):
    """Texts → embeddings on the engine: tokenized on the host exactly as the torch server does."""

    def __init__(self, bundle: Bundle, pool: EnginePool, version: str, *, truncate: bool | None = None) -> None:
        assert bundle.tokenizer is not None and bundle.text is not None, "a bert bundle has text settings"
        config = BertConfig.from_json(bundle.graph.config)
        text = bundle.text
        settings = SentenceSettings(
            bundle.graph.config["pooling"], bundle.graph.config["normalize"], text["max_seq_length"], text["truncate"]
        )
        tokenizer = load_tokenizer(bundle.tokenizer)
        super().__init__(bundle.name, version, None, config, settings, tokenizer, truncate=truncate)
        self.pool = pool

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        sequences: list[list[int]] = [seq for p in batch for seq in p.data]
        hidden = self.config.hidden_size
        rows, seq = len(sequences), max(map(len, sequences))
        with self.engine() as engine:
            # One guest call for the whole batch: the engine computes real tokens only, so padding costs nothing
            # there and the server's grouping by length is not needed.
            in_ptr, out_ptr = engine.buffers(2 * rows * seq * 4, rows * hidden * 4)
            inputs = engine.view(in_ptr, np.int32, (2, rows, seq))
            inputs[0].fill(self.config.pad_token_id)
            inputs[1].fill(0)
            for row, tokens in enumerate(sequences):
                inputs[0, row, : len(tokens)] = tokens
                inputs[1, row, : len(tokens)] = 1
            del inputs  # guest memory may move during the call
            self.forward(engine, rows, seq)
            embeddings = engine.view(out_ptr, np.float32, (rows, hidden)).copy()
        return split_rows(batch, {"embedding": embeddings})


class EdgeMLP(OnEngine, MLPInterface):
    """An MLP / classifier on the engine (softmax / sigmoid computed in the guest too)."""

    def __init__(self, bundle: Bundle, pool: EnginePool, version: str) -> None:
        # The graph was checked when the bundle was built or loaded, and its config holds MLPConfig's fields.
        super().__init__(bundle.name, version, None, MLPConfig(**bundle.graph.config))
        self.pool = pool

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        (x,) = stack_inputs(batch, ["input"])
        rows, out = x.shape[0], self.output_size
        outputs = 2 if self.spec.output_activation else 1
        with self.engine() as engine:
            in_ptr, out_ptr = engine.buffers(x.size * 4, outputs * rows * out * 4)
            engine.view(in_ptr, np.float32, x.shape)[...] = x
            self.forward(engine, rows, 0)
            result = engine.view(out_ptr, np.float32, (outputs, rows, out)).copy()
        return self.finish(batch, result[0], result[1] if self.spec.output_activation else None)


def edge_model(bundle: Bundle, pool: EnginePool, *, truncate: bool | None = None) -> ServedModel:
    """The served model of a bundle on its engine pool."""
    version = str(bundle.source.get("version") or "1")
    if bundle.graph.kind == "bert":
        return EdgeEncoder(bundle, pool, version, truncate=truncate)
    return EdgeMLP(bundle, pool, version)
