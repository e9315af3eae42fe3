"""Where a server's model comes from: `ModelSource`, the small interface the serving app drives.

The app (protocol, batching, drain, hot swap, metrics) knows nothing of torch, stores or bundles: it asks its source
for the newest version, has it build that version into a `ServedModel` (on a thread), and polls for newer ones.
`StoreSource` is the torch server's (a model in the warmpod store, each new version swapped in); the edge has its own
(`warmpod.wasm.app.EdgeSource`), and so can a benchmark's baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from warmpod.store import current_version, open_model

if TYPE_CHECKING:
    from pathlib import Path

    from warmpod.server.model import ServedModel
    from warmpod.store import StagedModel


class ModelSource(Protocol):
    """What the app needs of a model's origin. `prepare` and `load` block: the app calls them on a thread."""

    def prepare(self) -> None:
        """Set-up that needs no model (imports, thread counts), run while the app waits for the first version."""

    def latest(self) -> str | None:
        """The newest version there is now, or None while there is none. Polled every --poll-interval: cheap."""

    def load(self, version: str) -> ServedModel:
        """The model of `version`, built and warmed up. Raises a WarmpodError (ModelError, StoreError, ...) with
        the reason when it cannot be served."""


class StoreSource:
    """A model in the warmpod store: `current` is the newest version; each is mapped read-only, never copied."""

    def __init__(self, store: Path, model: str, *, threads: int = 1, factory: str | None = None,
                 truncate: bool | None = None) -> None:  # fmt: skip
        self.store, self.model = store, model
        self.threads, self.factory, self.truncate = threads, factory, truncate

    def prepare(self) -> None:
        """Import torch and the model families (~1.5 s, overlapping the wait for the loader); set the intra-op
        thread count (process-wide)."""
        import torch

        import warmpod.server.families.bert
        import warmpod.server.families.mlp  # noqa: F401  (the families import torch and tokenizers at module level)

        torch.set_num_threads(self.threads)

    def latest(self) -> str | None:
        return current_version(self.store, self.model)

    def load(self, version: str) -> ServedModel:
        """Map the current version (`version`, or a newer one published since), fault its pages in (so the warm-up
        forward does not take a fault per page), and build the model on the mapping."""
        staged = open_model(self.store, self.model)
        staged.populate()
        return self.build(staged)

    def build(self, staged: StagedModel) -> ServedModel:
        from warmpod.server.families import build_model

        return build_model(staged, factory=self.factory, truncate=self.truncate)
