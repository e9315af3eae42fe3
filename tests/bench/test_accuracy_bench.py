"""The accuracy benchmark's pure parts (bench/accuracy_bench.py) on made-up vectors: cosine and difference figures,
nearest neighbours, agreement of two rankings, the report's table; and the sentence set it shares with the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.accuracy_bench import VARIANTS, agreement, observations, ranking, table, top_k
from tests.kit.sentences import LENGTH_BANDS, perturbed, retrieval_queries, sentences

VOCAB_WORDS = "\n".join(["[PAD]", "[unused0]", "the", "of", "##s", "a", "cat", "dog", "Big", "über", "sat", "on"])


def test_identical_embeddings_agree_fully() -> None:
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    a = agreement(x, x.copy())
    assert a.min_cosine == pytest.approx(1.0) and a.mean_cosine == pytest.approx(1.0)
    assert a.max_abs_diff == 0 and a.below_goal == 0


def test_agreement_finds_the_worst_row() -> None:
    ref = np.eye(4, dtype=np.float32)
    got = ref.copy()
    got[2] = [0.0, 0.0, 1.0, 0.1]  # cosine 1/sqrt(1.01) = 0.995037
    a = agreement(ref, got)
    assert a.min_cosine == pytest.approx(1 / np.sqrt(1.01)) and a.below_goal == 1
    assert a.max_abs_diff == pytest.approx(0.1) and a.mean_cosine == pytest.approx((3 + 1 / np.sqrt(1.01)) / 4)


def test_top_k_ranks_by_cosine_not_length() -> None:
    corpus = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [0.1, 1.0]])
    assert top_k(queries, corpus, 2).tolist() == [[0, 1], [2, 1]]


def test_ranking_counts_agreement_overlap_and_own_hits() -> None:
    ref = np.array([[0, 1, 2], [3, 4, 5]])
    got = np.array([[0, 2, 9], [4, 3, 5]])
    r = ranking(ref, got, own=[0, 3])
    assert r.top1_agreement == 0.5 and r.recall_at_k == pytest.approx((2 / 3 + 1) / 2)
    assert (r.own_found, r.own_found_fp32) == (0.5, 1.0)


def test_the_table_and_observations_show_every_variant() -> None:
    result = {
        "agreement": {"min_cosine": 0.9995, "mean_cosine": 0.9999, "p01_cosine": 0.9996, "max_abs_diff": 0.004,
                      "below_goal": 0},
        "ranking": {"top1_agreement": 0.99, "recall_at_k": 0.98, "own_found": 1.0, "own_found_fp32": 1.0},
        "seconds": 4.0,
        "precision": "weights bf16",
    }  # fmt: skip
    raw = {"sentences": 500, "queries": 100, "fp32_seconds": 8.0, "results": dict.fromkeys(VARIANTS, result)}
    text = table(raw)
    assert text.count("\n") == 1 + len(VARIANTS) and "**0.999500**" in text and "(2.00x)" in text
    lines = observations(raw)
    assert len(lines) == len(VARIANTS) and all("goal >= 0.999: met" in line for line in lines)


def test_the_sentence_set_is_fixed_and_spans_short_to_long(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(VOCAB_WORDS)
    first = sentences(30, vocab=vocab)
    assert first == sentences(30, vocab=vocab) and first != sentences(30, seed=1, vocab=vocab)
    words = [len(s.split()) for s in first]
    assert min(words) >= LENGTH_BANDS[0][0] and max(words) <= LENGTH_BANDS[-1][1]
    assert any(n <= LENGTH_BANDS[0][1] for n in words) and any(n > LENGTH_BANDS[1][1] for n in words)
    used = {w.strip(",.?").lower() for s in first for w in s.split()}
    assert used <= {"the", "of", "cat", "dog", "sat", "on"}  # whole lowercase ASCII words only
    assert all(s[0].isupper() and s[-1] in ".?" for s in first)


def test_queries_are_perturbed_sentences() -> None:
    text = "the cat sat on the mat of the dog today"
    query = perturbed(text, seed=4)
    assert query != text and set(query.split()) <= set(text.split()) and len(query.split()) >= 1
    assert perturbed("two words", seed=0) == "two words"
    corpus = ["a b", "one two three four", "five six seven eight nine"]
    assert len(retrieval_queries(corpus, 5)) == 2
