"""The loader's one error type, carrying the CLI exit code and the metrics label for each kind of failure."""

from __future__ import annotations


class LoaderError(Exception):
    """A load failed for a reason the user can act on. The message says what was wrong and how to fix it."""

    exit_code = 1
    kind = "error"


class UsageError(LoaderError):
    """Bad arguments: model name, flags, a source with nothing loadable in it."""

    exit_code = 2
    kind = "usage"


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


class StoreBusy(LoaderError):
    exit_code = 9
    kind = "busy"
