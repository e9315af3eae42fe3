"""Where does warmpod's cold start go? The server's startup steps, one after the other in one fresh process, timed.

Run by bench.coldstart_bench once per repetition (a fresh interpreter each time, so imports are paid as the server
pays them). It calls the server's own functions in the server's order, but without the event loop and the overlap:

  imports     what `warmpod serve` imports before it listens (warmpod.server.cli, warmpod.server.app: aiohttp,
              prometheus, numpy)
  torch       what the server imports off the loop before building (torch + the model families)
  map         warmpod.store.open_model: read the manifest, mmap the weights (no byte read)
  populate    StagedModel.populate(): fill the page tables of the mapping (MADV_POPULATE_READ); the server runs it
              on a thread beside the torch import (0 where this version of the store has no populate)
  build       the MLP family on the meta device + assign_weights: the staged tensors become the parameters
  warm-up     the first forward
  forward     a second forward on the same model (the steady state)
  warm-up without populate
              for comparison: a fresh mapping of the same version, built on and run once without populating first,
              so every 4 KiB page faults during that forward

    python -m bench.coldstart_probe STORE MODEL

Prints one JSON object: {"t_main": ..., "steps": {name: seconds}} where t_main is time.monotonic() at the first line
of this script (CLOCK_MONOTONIC is system-wide, so the caller subtracts its own spawn time to get interpreter start).
"""

from __future__ import annotations

import time

T_MAIN = time.monotonic()

import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

T = TypeVar("T")


def timed(steps: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.monotonic()
    result = fn()
    steps[name] = time.monotonic() - t0
    return result


def main(store: Path, model_name: str) -> dict[str, object]:
    steps: dict[str, float] = {}

    def server_imports() -> None:
        import warmpod.server.app
        import warmpod.server.cli  # noqa: F401

    timed(steps, "imports", server_imports)
    from warmpod.store import open_model

    def torch_imports() -> None:
        import torch

        import warmpod.server.families.bert
        import warmpod.server.families.mlp  # noqa: F401  (what warmpod.server.app.import_torch imports)

        torch.set_num_threads(1)

    timed(steps, "torch", torch_imports)
    from warmpod.server.families.common import read_config
    from warmpod.server.families.mlp import MLPModel

    staged = timed(steps, "map", lambda: open_model(store, model_name))
    populate = getattr(staged, "populate", None)
    steps["populate"] = 0.0
    if populate is not None:
        timed(steps, "populate", populate)
    config = read_config(staged.file_path("config.json"))
    model = timed(steps, "build", lambda: MLPModel.from_staged(model_name, staged, config))
    timed(steps, "warm-up", model.warm_up)
    timed(steps, "forward", model.warm_up)

    fresh = open_model(store, model_name)
    unpopulated = MLPModel.from_staged(model_name, fresh, config)
    timed(steps, "warm-up without populate", unpopulated.warm_up)
    return {"t_main": T_MAIN, "steps": steps}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
