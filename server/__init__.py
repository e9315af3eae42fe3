"""The HTTP inference server: maps staged weights read-only, builds the torch model on them, serves Open Inference
Protocol v2 (+ OpenAI embeddings) with dynamic batching, backpressure, graceful drain and hot model swap."""
