"""Baseline server for the cold-start and memory benchmarks: warmpod's own server, weights read from disk into RAM.

Everything is `warmpod serve` (same CLI, same aiohttp app, same model family, same warm-up forward) except where the
weights come from: instead of mapping a staged version from the shared-memory store, the model is read from a
directory on disk with `safetensors.torch.load_file`. Two ways (--weights):

  copy  (default) every tensor is copied into this process's private memory: each process holds its own copy, as
        with torch.load (without mmap) or any loader that allocates the parameters and fills them.
  mmap  the tensors load_file returns, as they are: with torch, safetensors (>= 0.3) backs them with a private
        (copy-on-write) mmap of the file, so pages come lazily from the page cache and are shared with other
        processes mapping the same file while nobody writes them. Zero-copy, but only as long as the file stays in
        the page cache of this node.

    python -m bench.baselines.disk_server --model-dir DIR [--weights copy|mmap] --model NAME [`warmpod serve` flags]

The weights come through a model source of its own (`DiskSource`, warmpod.server.source.ModelSource): nothing of
the server is patched. `--store` is still accepted and unused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from warmpod.server.source import StoreSource
from warmpod.store import StagedModel

if TYPE_CHECKING:
    import torch

    from warmpod.server.app import ServerConfig
    from warmpod.server.model import ServedModel

DISK_VERSION = "disk"


@dataclass
class DiskModel(StagedModel):
    """A StagedModel whose weights come from a directory on disk instead of the store: nothing is mapped up front
    (no `maps`, so `populate()` has nothing to do), and `tensors()` reads the files.

    The tensors are read on the first `tensors()` call, which the model family makes while building the model, so the
    read is part of the server's model build (and of its warmpod_model_load_seconds). It cannot overlap torch's import
    the way warmpod's page population does: safetensors.torch needs torch.
    """

    copy: bool = True
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def at(cls, name: str, path: Path, copy: bool) -> DiskModel:
        return cls(name=name, version=DISK_VERSION, path=path, manifest={"files": [], "tensors": {}}, maps={},
                   copy=copy)  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from safetensors.torch import load_file

            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.path}")
            loaded: dict[str, torch.Tensor] = {}
            for f in files:
                mapped = load_file(str(f))
                # clone(): private memory; the mapping goes with `mapped`, leaving only the copy.
                loaded.update({k: v.clone() for k, v in mapped.items()} if self.copy else mapped)
                del mapped
            self._tensors = loaded
        return self._tensors


class DiskSource(StoreSource):
    """The server's own source, but the weights come from `model_dir` on disk (one version, never swapped)."""

    def __init__(self, config: ServerConfig, model_dir: Path, *, copy: bool) -> None:
        super().__init__(config.store, config.model, threads=config.threads, factory=config.factory,
                         truncate=config.truncate)  # fmt: skip
        self.model_dir, self.copy = model_dir, copy

    def latest(self) -> str:
        return DISK_VERSION

    def load(self, version: str) -> ServedModel:
        return self.build(DiskModel.at(self.model, self.model_dir, copy=self.copy))


def main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model-dir", type=Path, required=True, help="model directory on disk (config.json + weights)")
    pre.add_argument("--weights", choices=("copy", "mmap"), default="copy", help="private copy (default) or mmap")
    ours, rest = pre.parse_known_args(argv)
    model_dir: Path = ours.model_dir.resolve()
    if not (model_dir / "config.json").is_file():
        print(f"disk_server: error: no config.json in {model_dir}", file=sys.stderr)
        return 2

    from warmpod.server import cli

    return cli.main(rest, source=lambda config: DiskSource(config, model_dir, copy=ours.weights == "copy"))


if __name__ == "__main__":
    sys.exit(main())
