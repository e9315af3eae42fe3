"""warmpod edge: MLPs and BERT-style encoders in a sandboxed WebAssembly engine (C → wasm32, run by wasmtime),
served with the server's protocol and metrics. Contract: `ABI.md`; pure core: `bundle.py`; host: `host.py`;
models: `models.py`; shells: `app.py`, `cli.py`; the engine: `engine/`; the Node.js host: `node/edge.mjs`."""
