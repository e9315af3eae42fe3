"""warmpod edge: lightweight models in a sandboxed WebAssembly engine (see issue 4)."""
