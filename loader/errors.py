"""The loader's errors: `LoaderError` (under warmpod's root) and one class per kind of failure, each carrying the
`warmpod load` exit code and the metrics label. Bad flags are the shared `warmpod.errors.UsageError` (exit 2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from warmpod.errors import UsageError, WarmpodError

__all__ = ["UsageError"]  # re-exported: the loader raises the shared one


class LoaderError(WarmpodError):
    """A load failed for a reason the user can act on. The message says what was wrong and how to fix it."""


class SourceNotFound(LoaderError):
    exit_code = 3
    kind = "not_found"


class AccessDenied(LoaderError):
    exit_code = 4
    kind = "access_denied"


class InvalidModel(LoaderError):
    """The source's files break the safetensors rules (or the store's)."""

    exit_code = 5
    kind = "invalid"


class IntegrityError(LoaderError):
    """Bytes differ from what was promised: a pinned digest, a size, a source that changed mid-load."""

    exit_code = 6
    kind = "integrity"


class CapacityError(LoaderError):
    exit_code = 7
    kind = "capacity"


class TransientError(LoaderError):
    """A failure worth retrying (5xx, timeout, reset, short read); raised after the retries ran out."""

    exit_code = 8
    kind = "transient"


class ShortRead(TransientError):
    """A range came back shorter than asked (or 416): retried, after checking the source did not change."""


class StoreBusy(LoaderError):
    exit_code = 9
    kind = "busy"


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Around an asyncio.TaskGroup: raise the group's first LoaderError (else its first error) on its own.

    Concurrent ranges fail together (one cause, several symptoms); the user needs the cause, once.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        raise next((e for e in leaves if isinstance(e, WarmpodError)), leaves[0]) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
