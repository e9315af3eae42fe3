"""A fixed set of test sentences of varied length (1 to ~200 tokens) for accuracy checks (fp32 vs bf16), made
deterministically from a seeded generator over the English words of all-MiniLM-L6-v2's own vocab.txt (an installed
package's file: nothing fetched), and a retrieval task over them (queries: perturbed sentences, corpus: all)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from tests.kit.models import minilm_dir

# Words per sentence: a third short (1-8), a third medium (9-40), a third long (41-150 words, ~50-200 tokens).
LENGTH_BANDS = ((1, 8), (9, 40), (41, 150))


@cache
def words(vocab: Path | None = None) -> tuple[str, ...]:
    """The whole lowercase words of a BERT vocab.txt (no '##' pieces, no [special] or [unusedN] tokens), in vocab
    order (roughly most frequent first)."""
    path = vocab or minilm_dir() / "vocab.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(w for w in lines if w.isascii() and w.isalpha() and w.islower() and len(w) > 1)


def sentences(count: int = 500, seed: int = 0, vocab: Path | None = None) -> list[str]:
    """`count` sentences, the same for the same arguments on every machine: lengths cycle through LENGTH_BANDS
    (drawn within a band), words drawn with Zipf-like weights (1 / (rank + 20)) so common words recur, a comma
    every few words, a capital first letter, a full stop or a question mark."""
    vocabulary = words(vocab)
    weights = 1.0 / (np.arange(len(vocabulary)) + 20.0)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        low, high = LENGTH_BANDS[i % len(LENGTH_BANDS)]
        n = int(rng.integers(low, high + 1))
        picked = [vocabulary[j] for j in rng.choice(len(vocabulary), size=n, p=weights)]
        for k in range(7, n - 1, int(rng.integers(6, 12))):
            picked[k] += ","
        text = " ".join(picked)
        out.append(text[0].upper() + text[1:] + ("?" if rng.random() < 0.2 else "."))
    return out


def perturbed(text: str, seed: int) -> str:
    """A query made from a sentence: about a fifth of its words dropped and two neighbours swapped (the text
    itself when it has fewer than 3 words)."""
    rng = np.random.default_rng(seed)
    parts = text.split()
    if len(parts) < 3:
        return text
    kept = [w for w in parts if rng.random() >= 0.2] or parts[:1]
    if len(kept) >= 2:
        k = int(rng.integers(0, len(kept) - 1))
        kept[k], kept[k + 1] = kept[k + 1], kept[k]
    return " ".join(kept)


def retrieval_queries(corpus: list[str], count: int, seed: int = 1) -> list[str]:
    """Queries for a retrieval task over `corpus`: perturbed copies of its first `count` sentences of 3 words or
    more (query i should find its own sentence)."""
    chosen = [t for t in corpus if len(t.split()) >= 3][:count]
    return [perturbed(t, seed + i) for i, t in enumerate(chosen)]
