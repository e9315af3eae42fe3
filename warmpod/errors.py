"""The error root. Every error warmpod raises on purpose is a `WarmpodError`; each component has its base below it:

    WarmpodError
    ├── UsageError                     bad arguments or settings (exit 2), from any command
    │   └── pods.policy.PolicyError    autoscaling settings that break a rule of the policy
    ├── store.StoreError               the store: nothing published, a file that breaks the format
    ├── loader.errors.LoaderError      a load failed (each kind its own exit code)
    ├── server.errors.ServerError      a request or a model failed (each kind its own HTTP status)
    ├── wasm.host.EngineError          the WebAssembly engine failed or was interrupted
    └── wasm.bundle.BundleError        an edge bundle cannot be compiled or read

Each class carries what its caller maps it to: `exit_code` for a command (read by the command's one handler),
`status` for an HTTP response (read by the server's one middleware). Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class WarmpodError(Exception):
    """A failure the user can act on; the message says which."""

    exit_code = 1  # what a command exits with when this error ends it
    kind = "error"  # a short label for metrics and logs


class UsageError(WarmpodError):
    """Bad arguments or settings: a flag, a model name, a source with nothing loadable in it."""

    exit_code = 2
    kind = "usage"
