"""MLServer custom runtime for bench.serve_bench: warmpod's own model code (warmpod.server.families) behind
MLServer's API.

model-settings.json (written by the bench) names this class as `implementation`
(`bench.runtimes.mlserver_runtime.MiniLMRuntime`, importable as the checkout is on PYTHONPATH), the model as `name`
(also its name in the store) and the store root as `parameters.uri`. With adaptive batching on, MLServer merges
queued requests into one InferenceRequest (the "text" inputs concatenated) and splits the flat "embedding" output
back by rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse

from warmpod.server.families import build_model
from warmpod.store import open_model

if TYPE_CHECKING:
    from warmpod.server.model import ServedModel


class MiniLMRuntime(MLModel):  # type: ignore[misc]  # mlserver is untyped
    async def load(self) -> bool:
        torch.set_num_threads(1)  # one intra-op thread, as warmpod runs with --threads 1
        params = self.settings.parameters
        if params is None or not params.uri:
            raise InferenceError("model-settings.json: parameters.uri must be the warmpod store root")
        self._model: ServedModel = build_model(open_model(Path(params.uri), self.name))  # warms up too
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = [i for i in payload.inputs if i.name == "text"]
        if len(inputs) != 1 or inputs[0].datatype != "BYTES":
            raise InferenceError("expected one BYTES input named 'text'")
        texts = StringCodec.decode_input(inputs[0])
        # Like MLServer's own runtimes, the forward runs right here: with parallel_workers >= 1 this is a worker
        # process, with parallel_workers 0 it is the server's event loop.
        embedding = self._model.run([self._model.prepare_texts(texts)])[0]["embedding"]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("embedding", embedding)],
        )
