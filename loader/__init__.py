"""warmpod.loader, the sidecar's writer: streams safetensors models from a source into the store.

`sources` reaches the files (fsspec), `plan` and `stream` read them in parallel ranges, `load` orchestrates one load
(validate, stream, verify), `publish` is the writer's side of the store (lock, staging, atomic publish, GC), `cli`
is `warmpod load`. The store's format and reader live one floor down, in `warmpod.store`.
"""
