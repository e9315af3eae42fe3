"""warmpod loader: streams safetensors models into a shared-memory store and reads them back zero-copy.

`loader.store` is the store format and its reader (imported by the server and the edge); `loader.load` the
orchestration of one load; `loader.cli` the `warmpod load` sidecar command.
"""

__version__ = "0.1.0"
