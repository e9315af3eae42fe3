"""KServe custom model for bench.serve_bench: warmpod's own model code (warmpod.server.families) behind
`kserve.Model`.

    python -m bench.runtimes.kserve_model --model_name all-MiniLM-L6-v2 --store DIR --http_port P --workers 1

Served by `kserve.ModelServer` (REST only, gRPC off) on 127.0.0.1. The V2 REST endpoint
`/v2/models/NAME/infer` decodes the JSON body into an `InferRequest`; `predict` is a plain function, which KServe
calls on the server's event loop, one request at a time: the KServe Python server has no request batcher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kserve
import kserve.model_server
import kserve.protocol.rest.multiprocess.server
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.protocol.rest.server import RESTServer
from kserve.utils.utils import generate_uuid

from warmpod.server.families import build_model
from warmpod.store import open_model

HOST = "127.0.0.1"


class MiniLMModel(kserve.Model):  # type: ignore[misc]  # kserve is untyped
    def __init__(self, name: str, store: Path) -> None:
        super().__init__(name)
        self.store = store
        self.load()

    def load(self) -> bool:
        torch.set_num_threads(1)  # one intra-op thread, as warmpod runs with --threads 1
        self.model = build_model(open_model(self.store, self.name))  # warms up too
        self.ready = True
        return self.ready

    def __getstate__(self) -> dict[str, Any]:
        # With --workers N > 1, KServe pickles the model into each spawned uvicorn process. Send the store path, not
        # the mappings: each process maps the store itself (read-only and shared, so no copy of the weights).
        state = self.__dict__.copy()
        state.pop("model", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        inputs = [i for i in payload.inputs if i.name == "text"]
        if len(inputs) != 1 or inputs[0].datatype != "BYTES":
            raise InvalidInput("expected one BYTES input named 'text'")
        # JSON requests give str elements, binary-extension requests bytes.
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in inputs[0].as_numpy().reshape(-1)]
        embedding: np.ndarray = self.model.run([self.model.prepare_texts(texts)])[0]["embedding"]
        output = InferOutput(name="embedding", shape=list(embedding.shape), datatype="FP32")
        output.set_data_from_numpy(embedding, binary_data=False)
        return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=[output])


class LoopbackRESTServer(RESTServer):  # type: ignore[misc]  # kserve is untyped
    """KServe 0.21 hard-codes host 0.0.0.0 for uvicorn; the benchmark keeps every server on 127.0.0.1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = HOST


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--store", required=True, help="warmpod store root holding the staged model")
    args, _ = parser.parse_known_args(argv)
    kserve.model_server.RESTServer = LoopbackRESTServer
    kserve.protocol.rest.multiprocess.server.RESTServer = LoopbackRESTServer  # --workers > 1
    model = MiniLMModel(args.model_name, Path(args.store))
    kserve.ModelServer(enable_grpc=False).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
