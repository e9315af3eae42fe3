"""warmpod: inference pods that start warm.

One import package; the repository's folders map onto it (pyproject.toml, README "Layout"):

    warmpod/               this package's root: the `warmpod` command, the error root, the store (format + reader)
    warmpod/pods/          autoscaling and pods: the SLO policy, `warmpod up` and its supervisor, process helpers
    loader/   → warmpod.loader   the sidecar's writer: source → store
    server/   → warmpod.server   the HTTP inference endpoint (torch)
    wasm/     → warmpod.wasm     the edge: the WebAssembly engine, its bundles and the wasmtime host

The version is the installed distribution's (pyproject.toml is the one place it is written).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("warmpod")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
