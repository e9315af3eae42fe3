"""Scale-out: one model from 1 to 8 pods on two simulated nodes, with a per-pod sidecar vs the node cache (origin
only, and with peer fetch). Per new pod: time to ready, bytes read from the origin, the node's memory.

Setups (pods 1-4 on node A, then 5-8 on node B, in that order; each pod created once the one before is ready):

  sidecar   what the base Deployment does: each pod runs `warmpod load s3://... --model M --store S` into a store of
            its own on /dev/shm and `warmpod serve --model M --store S`, spawned together (the loader is a native
            sidecar without a startupProbe, so the server imports torch while the weights stream and maps them once
            they are published). Node A's pods are stopped and their stores removed before node B's start: eight
            2 GiB copies (16 GiB) plus eight servers would not fit beside the other work on this machine, and a node's
            memory only counts its own pods.
  node      one `warmpod node --tmpfs` agent per node, no peers. A simulated node is a private mount namespace
            (`unshare -m`, held by a sleeping process) holding the agent's tmpfs, its views and the pods' volumes;
            a pod is the kubelet's call, NodePublishVolume over the agent's CSI socket (an ephemeral inline volume,
            as tests/node build it), then `warmpod serve --store TARGET` in that namespace (nsenter).
  peer      the same, with node B's agent started with `--peers` node A's agent and the shared `--peer-token-file`
            (node A's has the token file too, so it serves its versions).

Origin: SeaweedFS (`weed server -filer -s3`, data on the root disk) behind tests.kit's FaultProxy, which counts the
response body bytes of every request it forwards; a pod's origin bytes are the object GETs' bytes (listings and HEADs
left out) between its creation and its readiness.

Time to ready: from the pod's creation (just before the NodePublishVolume call, or the loader's spawn) to the first
200 from GET /v2/health/ready, polled every 10 ms. The reference, the staged cold start, is `warmpod serve` on a store
the loader filled beforehand, started the same way (in a mount namespace, through nsenter), twice at the start of each
round. After each setup's last pod, one more staged start straight on the last node's store, with every pod still
running ("beside the pods"): what the last pods' own surroundings cost a start.

The machine is shared: before every start the harness waits (bounded) for idle CPUs, and a start during which other
processes kept more than NOISY_CORES busy is stopped and made again (TRIES at most; a first pod on a node with a
fresh agent, so that it stages again).

Node memory, after each pod is ready: the allocated bytes of the store(s) on that node (a sidecar store per pod, or
the agent's tmpfs, each file counted once however many bind mounts show it), and the servers' PSS from
/proc/PID/smaps_rollup (their own part: PSS minus the shared store pages they map, which the store already counts).

Huge pages: an agent with `--tmpfs --huge` (huge=within_size) and one without, side by side, each with a 0.1 GiB and a
4 GiB MLP preloaded from local directories; the staged cold start of each (spawn → first 200 from POST
/v2/models/M/infer, as bench.coldstart_bench measures it) through a published volume, rounds rotated.

Simulator: the measured new-pod starts (sidecar; the node cache on a node that has the model; the first pod on a new
node fetching from a peer) as the cold start of bench/autoscale_sim.py's spike trace, every policy.

Goals (issue 14 and BENCHMARKS.md): every pod after the first on a node ready within 0.2 s of the staged cold start;
origin bytes = 1 x model for the whole cluster with peer fetch; node memory = 1 x model per node whatever the pod
count; with huge pages, the 4 GiB staged start <= 1.2 x the 0.1 GiB one.

Usage:
  python -m bench.scaleout_bench [--size-gib 2] [--pods 8] [--reps 3] [--model-dir DIR] [--no-huge] [--no-sim]
  python -m bench.scaleout_bench --quick      # a smoke run: 0.1 GiB, 4 pods, one round, nothing written
  python -m bench.scaleout_bench --report bench/results/scaleout_bench.json   # the report again, nothing measured

Needs root and mount namespaces (unshare, nsenter). Every server, agent, namespace and store is stopped or removed at
the end, whatever happens; SeaweedFS and everything else listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.serverproc import (
    GiB,
    MiB,
    OthersCpu,
    StartFailed,
    bench_env,
    bench_parser,
    command_line,
    ensure_mlp,
    first_inference,
    git_revision,
    log,
    machine_line,
    median,
    model_files,
    pss_bytes,
    temp_dir,
    update_section,
    wait_cpu_quiet,
    warmpod_serve_argv,
)
from tests.kit.clients import http
from tests.kit.models import mlp_bytes
from tests.kit.procs import ChildProcess
from tests.kit.threaded_http import RequestRecord
from tests.kit.warmpod import REPO, ServerProcess, stage, warmpod_cmd
from warmpod.node.agent import VIEWS

MARK_START = "<!-- scaleout_bench:start -->"
MARK_END = "<!-- scaleout_bench:end -->"
SETUPS = ("sidecar", "node", "peer")
LABELS = {
    "sidecar": "(a) per-pod sidecar",
    "node": "(b) node cache, origin only",
    "peer": "(c) node cache, peer fetch",
}
COLORS = {"sidecar": "#2ca02c", "node": "#1f77b4", "peer": "#d62728"}
BUCKET = "warmpod-scaleout"
NAMESPACE = "team-a"
POLL_S = 0.01  # between readiness polls
GOAL_NEXT_POD_S = 0.2  # a pod after the first on its node: ready within this of the staged cold start
GOAL_ORIGIN_X = 1.0  # origin bytes for the whole cluster with peer fetch, in models
GOAL_MEMORY_X = 1.0  # a node's store, in models, whatever its pod count
GOAL_HUGE_RATIO = 1.2  # BENCHMARKS.md, cold start: the 4 GiB staged start <= 1.2 x the 0.1 GiB one
# Allocated bytes exceed the files' sizes by page rounding and the manifest; what a store may hold above N models and
# still count as N copies.
COPY_SLACK = 0.01
BUDGET_BYTES = 20 * GiB  # the most this benchmark's stores and servers may hold at once
MEMORY_RESERVE = 3 * GiB  # MemAvailable this benchmark leaves to the rest of the machine
SERVER_ALLOWANCE = 512 * MiB  # a server's own memory, as budgeted before it starts
NOISY_CORES = 0.25  # a start during which other processes kept more cores than this busy is measured again
TRIES = 3  # starts of one pod at most
AGENT_LISTENING = re.compile(r'"event": "http_listening".*"port": (\d+)')


# ----------------------------------------------------------------------------------------------- pure core


def object_get_bytes(records: Iterable[RequestRecord], bucket: str) -> int:
    """Body bytes of the object GETs in `records` (path-style /BUCKET/KEY); bucket listings (GET /BUCKET?list-type=2)
    and HEADs are metadata, not the model's bytes."""
    prefix = f"/{bucket}/"
    return sum(r.body_bytes for r in records if r.method == "GET" and r.path.startswith(prefix) and r.path != prefix)


@dataclass
class PodSample:
    """One new pod of one setup in one round, measured once it was ready."""

    setup: str
    rep: int
    pod: int  # 1..N, in creation order
    node: str  # "A" or "B"
    first_on_node: bool
    ready_s: float  # creation → GET /v2/health/ready 200
    origin_bytes: int  # object GET bytes the origin sent between its creation and its readiness
    store_bytes: int  # allocated bytes of the store(s) on its node afterwards
    servers_pss: int  # PSS of the servers on its node afterwards
    servers_own: int  # their PSS minus the shared store pages they map (Pss_Shmem)
    pods_on_node: int
    publish_s: float | None = None  # node setups: the NodePublishVolume call
    load_s: float | None = None  # sidecar: the loader's own seconds
    others_cores: float = 0.0  # cores other processes kept busy while it started
    attempts: int = 1  # starts it took (the ones during which others were busy discarded)


@dataclass(frozen=True)
class PodRow:
    """One setup's pod N over every round: medians, and the spread of the time to ready."""

    setup: str
    pod: int
    node: str
    first_on_node: bool
    ready_s: float
    ready_min_s: float
    ready_max_s: float
    origin_bytes: float
    store_bytes: float
    servers_pss: float
    servers_own: float
    pods_on_node: int
    publish_s: float | None
    load_s: float | None
    runs: int


def pod_rows(samples: Sequence[PodSample]) -> list[PodRow]:
    """Medians per setup and pod (setups in SETUPS order, then pods in order)."""
    groups: dict[tuple[str, int], list[PodSample]] = {}
    for s in samples:
        groups.setdefault((s.setup, s.pod), []).append(s)
    rows = []
    for (setup, pod), group in sorted(groups.items(), key=lambda kv: (_setup_order(kv[0][0]), kv[0][1])):
        ready = [s.ready_s for s in group]
        publish = [s.publish_s for s in group if s.publish_s is not None]
        loads = [s.load_s for s in group if s.load_s is not None]
        rows.append(
            PodRow(
                setup=setup,
                pod=pod,
                node=group[0].node,
                first_on_node=group[0].first_on_node,
                ready_s=median(ready),
                ready_min_s=min(ready),
                ready_max_s=max(ready),
                origin_bytes=median([s.origin_bytes for s in group]),
                store_bytes=median([s.store_bytes for s in group]),
                servers_pss=median([s.servers_pss for s in group]),
                servers_own=median([s.servers_own for s in group]),
                pods_on_node=group[0].pods_on_node,
                publish_s=median(publish) if publish else None,
                load_s=median(loads) if loads else None,
                runs=len(group),
            )
        )
    return rows


def _setup_order(setup: str) -> int:
    return SETUPS.index(setup) if setup in SETUPS else len(SETUPS)


def cumulative(values: Iterable[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def origin_totals(samples: Sequence[PodSample]) -> dict[str, list[int]]:
    """Per setup, the origin bytes of the whole cluster in each round (the sum over its pods)."""
    totals: dict[tuple[str, int], int] = {}
    for s in samples:
        totals[(s.setup, s.rep)] = totals.get((s.setup, s.rep), 0) + s.origin_bytes
    out: dict[str, list[int]] = {}
    for (setup, _rep), total in sorted(totals.items()):
        out.setdefault(setup, []).append(total)
    return out


@dataclass(frozen=True)
class Goal:
    name: str
    met: bool
    detail: str

    def line(self) -> str:
        return f"- {self.name}: **{'met' if self.met else 'missed'}** — {self.detail}"


def next_pod_goal(rows: Sequence[PodRow], setup: str, staged_s: float, beside_s: float | None = None,
                  slack_s: float = GOAL_NEXT_POD_S) -> Goal:  # fmt: skip
    """Every pod after the first on its node ready within `slack_s` of the staged cold start (on the medians);
    `beside_s`, the staged start measured beside the last pods, is shown for comparison."""
    later = [r for r in rows if r.setup == setup and not r.first_on_node]
    name = f"{LABELS[setup]}: every pod after the first on a node ready ≤ staged cold start + {slack_s:g} s"
    if not later:
        return Goal(name, False, "no pod after the first on a node was measured")
    limit = staged_s + slack_s
    worst = max(later, key=lambda r: r.ready_s)
    late = [r for r in later if r.ready_s > limit]
    detail = (
        f"pods {', '.join(str(r.pod) for r in later)}: {', '.join(f'{r.ready_s:.2f}' for r in later)} s against "
        f"{staged_s:.2f} + {slack_s:g} = {limit:.2f} s; worst pod {worst.pod}, {worst.ready_s - staged_s:+.2f} s"
    )
    if late:
        detail += f" ({len(late)} of {len(later)} late)"
    if beside_s is not None:
        detail += f"; a staged start beside the last pods took {beside_s:.2f} s"
    return Goal(name, not late, detail)


def origin_goal(samples: Sequence[PodSample], setup: str, model_bytes: int, slack: float = COPY_SLACK) -> Goal:
    """The whole cluster's origin bytes = GOAL_ORIGIN_X models in every round (page rounding aside: `slack`)."""
    totals = origin_totals(samples).get(setup, [])
    name = f"{LABELS[setup]}: origin bytes for the whole cluster = {GOAL_ORIGIN_X:g} x model"
    if not totals:
        return Goal(name, False, "not measured")
    worst = max(totals)
    copies = ", ".join(f"{t / model_bytes:.3f}" for t in totals)
    met = worst <= model_bytes * (GOAL_ORIGIN_X + slack)
    return Goal(name, met, f"{worst:,} bytes at most in a round = {worst / model_bytes:.3f} x the model's "
                           f"{model_bytes:,} (per round: {copies})")  # fmt: skip


def memory_goal(rows: Sequence[PodRow], setup: str, model_bytes: int, slack: float = COPY_SLACK) -> Goal:
    """Each node's store holds GOAL_MEMORY_X models whatever its pod count: the most seen after any pod."""
    mine = [r for r in rows if r.setup == setup]
    name = f"{LABELS[setup]}: node memory (its store) = {GOAL_MEMORY_X:g} x model per node whatever the pod count"
    if not mine:
        return Goal(name, False, "not measured")
    worst = max(mine, key=lambda r: r.store_bytes)
    per_node = {}
    for r in mine:
        per_node[r.node] = r  # the last pod on each node: the most pods
    shown = "; ".join(f"node {n}, {r.pods_on_node} pods: {r.store_bytes / model_bytes:.2f} x"
                      for n, r in sorted(per_node.items()))  # fmt: skip
    met = worst.store_bytes <= model_bytes * (GOAL_MEMORY_X + slack)
    return Goal(name, met, f"{shown} (most: {worst.store_bytes / GiB:.2f} GiB with {worst.pods_on_node} pods)")


@dataclass
class HugeSample:
    mode: str  # "huge" or "plain"
    size: str  # the model's label
    rep: int
    first_ok_s: float  # spawn → first 200 inference
    ready_s: float  # spawn → the server's own "cold start" line
    pmd_mapped: int  # ShmemPmdMapped of the server once it answered: store pages mapped as 2 MiB pages


def huge_medians(samples: Sequence[HugeSample]) -> dict[tuple[str, str], float]:
    groups: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        groups.setdefault((s.mode, s.size), []).append(s.first_ok_s)
    return {k: median(v) for k, v in groups.items()}


def huge_goals(samples: Sequence[HugeSample], small: str, big: str, ratio: float = GOAL_HUGE_RATIO) -> list[Goal]:
    """The 4 GiB staged start ≤ ratio x the 0.1 GiB one, on each store (with huge pages, without)."""
    med = huge_medians(samples)
    goals = []
    for mode, what in (("huge", "--tmpfs --huge"), ("plain", "--tmpfs, no --huge")):
        s, b = med.get((mode, small)), med.get((mode, big))
        if s is None or b is None:
            continue
        r = b / s
        goals.append(Goal(f"agent store {what}: {big} staged start ≤ {ratio:g} x the {small} one", r <= ratio,
                          f"{r:.2f}x ({b:.2f} s vs {s:.2f} s)"))  # fmt: skip
    return goals


def sim_cold_starts(rows: Sequence[PodRow]) -> dict[str, float]:
    """The new-pod starts the simulator takes (medians over the pods each covers): the sidecar's (every pod
    downloads), the node cache's on a node that has the model (every later pod of both node setups), and the first
    pod on a new node when a peer has the model."""
    out = {}
    sidecar = [r.ready_s for r in rows if r.setup == "sidecar"]
    cached = [r.ready_s for r in rows if r.setup in ("node", "peer") and not r.first_on_node]
    peer_first = [r.ready_s for r in rows if r.setup == "peer" and r.first_on_node and r.node != "A"]
    if sidecar:
        out["sidecar"] = median(sidecar)
    if cached:
        out["node cache, model on the node"] = median(cached)
    if peer_first:
        out["node cache, first pod on a node (from a peer)"] = median(peer_first)
    return out


# ----------------------------------------------------------------------------------------------- report


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def pods_table(rows: Sequence[PodRow], model_bytes: int) -> str:
    out = [
        "| setup | pod | node | time to ready s (min-max) | of which publish s | loader s | origin GiB | cumulative "
        "origin GiB | node store GiB (x model) | servers on the node: PSS / own GiB | runs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for setup in SETUPS:
        mine = [r for r in rows if r.setup == setup]
        for r, total in zip(mine, cumulative(r.origin_bytes for r in mine), strict=True):
            publish = "—" if r.publish_s is None else f"{r.publish_s:.2f}"
            load = "—" if r.load_s is None else f"{r.load_s:.2f}"
            first = " (first)" if r.first_on_node else ""
            out.append(
                f"| {LABELS[setup]} | {r.pod} | {r.node}{first} | **{r.ready_s:.2f}** ({r.ready_min_s:.2f}-"
                f"{r.ready_max_s:.2f}) | {publish} | {load} | {fmt_gib(r.origin_bytes)} | {fmt_gib(total)} | "
                f"{fmt_gib(r.store_bytes)} ({r.store_bytes / model_bytes:.2f}) | {fmt_gib(r.servers_pss)} / "
                f"{fmt_gib(r.servers_own)} ({r.pods_on_node}) | {r.runs} |"
            )
    return "\n".join(out)


def summary_table(rows: Sequence[PodRow], samples: Sequence[PodSample], staged_s: float, model_bytes: int,
                  beside: Mapping[str, Sequence[float]]) -> str:  # fmt: skip
    out = [
        "| setup | first pod on a node s | later pods s, median (worst) | later pods minus staged s | staged start "
        "beside the last pods s | origin bytes, cluster, x model | node store, most pods, x model |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    totals = origin_totals(samples)
    for setup in SETUPS:
        mine = [r for r in rows if r.setup == setup]
        if not mine:
            continue
        first = ", ".join(f"{r.node} {r.ready_s:.2f}" for r in mine if r.first_on_node)
        later = [r.ready_s for r in mine if not r.first_on_node]
        later_text = f"{median(later):.2f} ({max(later):.2f})" if later else "—"
        delta = f"{median(later) - staged_s:+.2f}" if later else "—"
        origin = median(totals.get(setup, [0])) / model_bytes
        full = max(r.store_bytes for r in mine) / model_bytes
        near = f"{median(beside[setup]):.2f}" if beside.get(setup) else "—"
        out.append(f"| {LABELS[setup]} | {first} | {later_text} | {delta} | {near} | {origin:.2f} | {full:.2f} |")
    return "\n".join(out)


def huge_table(samples: Sequence[HugeSample], sizes: Sequence[str]) -> str:
    out = [
        "| agent store | model | staged start s, median (min-max) | server → ready line s | store pages mapped as "
        "2 MiB pages | runs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode, what in (("huge", "`--tmpfs --huge` (huge=within_size)"), ("plain", "`--tmpfs`")):
        for size in sizes:
            mine = [s for s in samples if s.mode == mode and s.size == size]
            if not mine:
                continue
            t = [s.first_ok_s for s in mine]
            pmd = median([s.pmd_mapped for s in mine])
            out.append(f"| {what} | {size} | **{median(t):.2f}** ({min(t):.2f}-{max(t):.2f}) | "
                       f"{median([s.ready_s for s in mine]):.2f} | {pmd / MiB:,.0f} MiB | {len(mine)} |")  # fmt: skip
    return "\n".join(out)


def sim_table(runs: Sequence[Any], labels: Mapping[float, str]) -> str:
    from bench.autoscale_sim import NAMES, ms, pct

    out = [
        "| new pods start like | cold start s | policy | attainment during the spike | attainment, whole trace | "
        "p99 over the trace ms | replica-seconds | max replicas |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        out.append(
            f"| {labels[r.cold_start_s]} | {r.cold_start_s:.2f} | {NAMES[r.policy]} | {pct(r.spike_attainment)} | "
            f"{pct(r.attainment)} | {ms(r.p99_s)} | {r.replica_seconds:.0f} | {r.max_replicas} |"
        )
    return "\n".join(out)


def plot(rows: Sequence[PodRow], staged_s: float, model_bytes: int, png: Path) -> Path | None:
    """Left: time to ready per new pod and setup (median, whiskers min/max), the staged start and its goal line.
    Right: cumulative origin bytes per setup, in models."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing (pip install -r bench/requirements.txt -c constraints.txt)")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(SETUPS)
    for j, setup in enumerate(SETUPS):
        mine = [r for r in rows if r.setup == setup]
        if not mine:
            continue
        xs = [r.pod + (j - (len(SETUPS) - 1) / 2) * width for r in mine]
        ax.bar(xs, [r.ready_s for r in mine], width, color=COLORS[setup], label=LABELS[setup],
               yerr=[[r.ready_s - r.ready_min_s for r in mine], [r.ready_max_s - r.ready_s for r in mine]],
               capsize=2, error_kw={"linewidth": 0.8})  # fmt: skip
        pods = [r.pod for r in mine]
        bx.plot(pods, [t / model_bytes for t in cumulative(r.origin_bytes for r in mine)], marker="o", ms=3,
                color=COLORS[setup])  # fmt: skip
    ax.axhline(staged_s, color="black", lw=0.8, ls="--")
    ax.axhline(staged_s + GOAL_NEXT_POD_S, color="black", lw=0.8, ls=":")
    ax.text(0.45, staged_s + GOAL_NEXT_POD_S + 0.1, f"staged start {staged_s:.2f} s; dotted: +{GOAL_NEXT_POD_S:g} s "
            "(goal)", fontsize=7, va="bottom")  # fmt: skip
    ax.set_xticks(range(1, max((r.pod for r in rows), default=1) + 1))
    ax.set_xlabel("new pod (the first half on node A, then node B)")
    ax.set_ylabel("creation → ready, s (median; min-max)")
    ax.set_title("Time to ready per new pod", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    bx.set_xticks(range(1, max((r.pod for r in rows), default=1) + 1))
    bx.set_xlabel("pods")
    bx.set_ylabel("origin bytes so far, x model")
    bx.set_ylim(bottom=0)
    bx.set_title("Bytes read from the origin, cumulative", fontsize=9)
    bx.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=len(SETUPS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------- the I/O shell


def allocated_bytes(root: Path) -> int:
    """Bytes the files under `root` occupy (st_blocks), each (device, inode) once: a node store's views are bind
    mounts of its models, seen twice by a walk."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def server_memory(servers: Iterable[ServerProcess]) -> tuple[int, int]:
    """(Σ PSS, Σ PSS minus Pss_Shmem) of the running servers."""
    pss = own = 0
    for s in servers:
        if s.running:
            with contextlib.suppress(OSError):
                m = pss_bytes(s.pid)
                pss += m.get("Pss", 0)
                own += m.get("Pss", 0) - m.get("Pss_Shmem", 0)
    return pss, own


class MemoryBudget(RuntimeError):
    """Starting one more pod would take this benchmark past BUDGET_BYTES or the machine below MEMORY_RESERVE."""


def check_budget(in_use: int, more: int) -> None:
    if in_use + more > BUDGET_BYTES:
        raise MemoryBudget(f"{(in_use + more) / GiB:.1f} GiB would exceed the benchmark's {BUDGET_BYTES / GiB:.0f} GiB")
    if mem_available() - more < MEMORY_RESERVE:
        raise MemoryBudget(f"MemAvailable {mem_available() / GiB:.1f} GiB leaves less than "
                           f"{MEMORY_RESERVE / GiB:.0f} GiB after {more / GiB:.1f} GiB more")  # fmt: skip


class Namespace:
    """A private mount namespace held by a sleeping process: a simulated node's mounts live and die with it."""

    def __init__(self) -> None:
        from warmpod.pods.process import die_with_parent

        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "infinity"],
                                       preexec_fn=die_with_parent)  # fmt: skip
        mine = Path("/proc/self/mountinfo").read_text()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.holder.pid}/mountinfo").read_text() == mine:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("unshare -m did not give the holder a mount namespace of its own")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.holder.pid

    def argv(self, argv: Sequence[str | Path]) -> list[str]:
        """`argv` run inside this namespace (nsenter execs it: the pid is the program's)."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *map(str, argv)]

    def path(self, path: Path) -> Path:
        """`path` as this namespace sees it (its mounts included)."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()


def server_in(ns: Namespace, model: str, store: Path, name: str) -> ServerProcess:
    return ServerProcess(ns.argv(warmpod_serve_argv(model, store)), name=name, env=bench_env(), cwd=REPO,
                         own_group=True, stop_timeout=10)  # fmt: skip


def wait_ready(server: ServerProcess, timeout_s: float) -> float:
    """Spawn `server` unless it was, then poll /v2/health/ready every POLL_S until 200: the monotonic time of it."""
    if server.proc is None:
        server.spawn()
    deadline = server.started + timeout_s
    server.wait_listening(timeout=max(1.0, deadline - time.monotonic()))
    url = server.url + "/v2/health/ready"
    while True:
        try:
            status = http("GET", url, timeout=5)[0]
        except OSError:
            status = None
        if status == 200:
            return time.monotonic()
        server.check_alive()
        if time.monotonic() > deadline:
            raise StartFailed(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail(3000)}")
        time.sleep(POLL_S)


def publish_request(target: Path, volume_id: str, model: str, pod: str) -> Any:
    """NodePublishVolume as the kubelet sends it for an inline csi volume with podInfoOnMount."""
    from warmpod.node import csi_pb2

    context = {"model": model, "csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": pod,
               "csi.storage.k8s.io/pod.namespace": NAMESPACE, "csi.storage.k8s.io/pod.uid": volume_id,
               "csi.storage.k8s.io/serviceAccount.name": "default"}  # fmt: skip
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    capability = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)
    return csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target), readonly=False,
                                            volume_context=context, volume_capability=capability)  # fmt: skip


class SimNode:
    """A simulated node: a mount namespace, `warmpod node` in it (its tmpfs, CSI socket, kubelet directory), and the
    kubelet's calls to it."""

    def __init__(self, name: str, base: Path, catalog: Path, env: dict[str, str], *, max_bytes: int,
                 huge: bool = False, peers: Sequence[str] = (), token: Path | None = None,
                 preload: Sequence[str] = ()) -> None:  # fmt: skip
        self.name, self.base = name, base
        self.root, self.kubelet = base / "root", base / "kubelet"
        self.socket_dir = Path(tempfile.mkdtemp(prefix="wp-scaleout-"))  # a unix socket's path: at most 107 bytes
        self.socket = self.socket_dir / "csi.sock"
        self.ns = Namespace()
        args: list[str | Path] = ["node", "--root", self.root, "--catalog", catalog, "--port", "0", "--host",
                                  "127.0.0.1", "--csi-socket", self.socket, "--kubelet-dir", self.kubelet,
                                  "--node-id", f"node-{name}", "--tmpfs", "--max-bytes", str(max_bytes)]  # fmt: skip
        if huge:
            args.append("--huge")
        if token is not None:
            args += ["--peer-token-file", token]
        if peers:
            args += ["--peers", *peers]
        if preload:
            args += ["--preload", *preload]
        argv = self.ns.argv(warmpod_cmd(*args))
        self.agent = ChildProcess(argv, name=f"warmpod node {name}", ready=AGENT_LISTENING, env=env, cwd=REPO,
                                  own_group=True, stop_timeout=10)  # fmt: skip
        self.url = ""
        self.channel: Any = None
        self.stub: Any = None

    def start(self) -> SimNode:
        import grpc

        from warmpod.node import csi_pb2_grpc

        self.agent.start(timeout=60)
        assert self.agent.match is not None
        self.url = f"http://127.0.0.1:{self.agent.match.group(1)}"
        deadline = time.monotonic() + 30
        while not self.socket.is_socket():
            self.agent.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.agent.name}: no CSI socket after 30 s\n{self.agent.log_tail(3000)}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.stub = csi_pb2_grpc.NodeStub(self.channel)  # type: ignore[no-untyped-call]
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for _, line in self.agent.lines if f'"event": "{name}"' in line]

    def wait_preloaded(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while http("GET", self.url + "/ready", timeout=10)[0] != 200:
            self.agent.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.agent.name}: preloads not staged after {timeout_s:.0f} s")
            time.sleep(0.2)

    def target(self, pod: str) -> Path:
        """The pod's volume directory, where the kubelet publishes its inline volume (its parent made here, as the
        kubelet does before calling)."""
        parent = self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / f"csi-{pod}"
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish(self, pod: str, model: str, timeout_s: float) -> Path:
        target = self.target(pod)
        self.stub.NodePublishVolume(publish_request(target, f"csi-{pod}", model, pod), timeout=timeout_s)
        return target

    def unpublish(self, pod: str) -> None:
        from warmpod.node import csi_pb2

        target = self.target(pod)
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"csi-{pod}", target_path=str(target))
        self.stub.NodeUnpublishVolume(request, timeout=30)

    def store_bytes(self) -> int:
        return allocated_bytes(self.ns.path(self.root))

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.agent.stop()
        self.ns.close()  # the last process of the namespace: its tmpfs and binds go with it
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@dataclass
class Pod:
    number: int
    node: str
    server: ServerProcess
    loader: ChildProcess | None = None  # sidecar
    store: Path | None = None  # sidecar
    unpublish: Callable[[], None] | None = None  # node cache: its volume's NodeUnpublishVolume

    def stop(self) -> None:
        self.server.stop()
        if self.loader is not None:
            self.loader.stop()
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)
        if self.unpublish is not None:
            with contextlib.suppress(Exception):  # best effort: the node's namespace goes with its agent anyway
                self.unpublish()


class Origin:
    """SeaweedFS with the model uploaded, behind a FaultProxy that counts what it sends."""

    def __init__(self, workdir: Path, model_dir: Path, model: str) -> None:
        from tests.kit.fault_proxy import FaultProxy
        from tests.kit.s3 import SeaweedServer

        self.model = model
        self.s3 = SeaweedServer(mode="server", workdir=workdir).start()
        try:
            self.s3.create_bucket(BUCKET)
            t0 = time.perf_counter()
            for f in model_files(model_dir):
                self.s3.upload_file(BUCKET, f"{model}/{f.name}", f, part_size=64 * MiB)
            log(f"SeaweedFS {self.s3.version} at {self.s3.endpoint}; uploaded in {time.perf_counter() - t0:.1f}s")
            self.proxy = FaultProxy(self.s3.endpoint).start()
        except BaseException:
            self.s3.stop()
            raise
        self.uri = f"s3://{BUCKET}/{model}/"

    def env(self) -> dict[str, str]:
        """The environment of a process reading the origin: through the proxy."""
        return bench_env(self.s3.env(self.proxy.endpoint))

    def bytes_sent(self) -> int:
        return object_get_bytes(self.proxy.requests.records(), BUCKET)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proxy.stop()
        self.s3.stop()


@dataclass
class Ctx:
    """What every run of a setup needs."""

    work: Path  # on /dev/shm: stores, node roots, kubelet dirs
    model_dir: Path
    model: str
    model_bytes: int
    origin: Origin
    pods: int
    timeout_s: float
    quiet_timeout_s: float = 30.0
    notes: list[str] = field(default_factory=list)
    discarded: int = 0  # starts measured again because other processes were busy
    beside: dict[str, list[float]] = field(default_factory=dict)  # setup → staged starts beside its last pods


def node_catalog(ctx: Ctx) -> Path:
    path = ctx.work / "catalog.json"
    path.write_text(json.dumps({"models": {ctx.model: {"source": ctx.origin.uri, "namespaces": ["*"]}}}))
    return path


def start_node(ctx: Ctx, setup: str, base: Path, name: str, nodes: Mapping[str, SimNode]) -> SimNode:
    """Node `name`'s agent. With peer fetch every agent has the shared token (to serve) and node B's asks node A's."""
    catalog, token = node_catalog(ctx), ctx.work / "peer-token"
    token.write_text("scaleout-bench-shared-token\n")
    peer = setup == "peer"
    peers = [nodes["A"].url] if peer and name == "B" and "A" in nodes else []
    shutil.rmtree(base / name, ignore_errors=True)
    node = SimNode(name, base / name, catalog, ctx.origin.env(), max_bytes=ctx.model_bytes + 512 * MiB,
                   token=token if peer else None, peers=peers)  # fmt: skip
    try:
        node.start()
    except BaseException:
        node.stop()
        raise
    if node.events("tmpfs_not_mounted"):
        ctx.notes.append(f"node {name}: the agent could not mount its tmpfs ({node.events('tmpfs_not_mounted')})")
    return node


def node_for(pod: int, pods: int) -> str:
    """Pods 1..pods/2 on node A, the rest on node B."""
    return "A" if pod <= (pods + 1) // 2 else "B"


def quiet_cpu(timeout_s: float) -> float:
    """wait_cpu_quiet, logged when it waited: the share of the CPUs busy when it went on."""
    t0 = time.monotonic()
    busy = wait_cpu_quiet(0.25, timeout_s)
    if time.monotonic() - t0 > 2:
        log(f"CPUs {100 * busy:.0f}% busy after waiting {time.monotonic() - t0:.0f}s")
    return busy


def run_setup(ctx: Ctx, setup: str, rep: int) -> list[PodSample]:
    """Pods 1..N of one setup, one after another; every pod, agent and store gone afterwards. A node's agent starts
    before its first pod (a DaemonSet's agent is there before any pod). A pod whose start overlapped other processes
    keeping more than NOISY_CORES busy is stopped and started again (at most TRIES times); a first pod on a node with
    a fresh agent, so that it stages again."""
    base = Path(tempfile.mkdtemp(prefix=f"{setup}-{rep}-", dir=ctx.work))
    pods: list[Pod] = []
    nodes: dict[str, SimNode] = {}
    samples: list[PodSample] = []
    try:
        for number in range(1, ctx.pods + 1):
            node = node_for(number, ctx.pods)
            if setup == "sidecar" and any(p.node != node for p in pods):
                for p in pods:  # a node's memory counts its own pods; the other node's copies would not fit
                    p.stop()
                pods.clear()
            first = not any(p.node == node for p in pods)
            for attempt in range(1, TRIES + 1):
                if setup != "sidecar" and node not in nodes:
                    nodes[node] = start_node(ctx, setup, base, node, nodes)
                in_use = sum(allocated_bytes(p.store) for p in pods if p.store) + len(pods) * SERVER_ALLOWANCE
                in_use += sum(n.store_bytes() for n in nodes.values())
                check_budget(in_use, SERVER_ALLOWANCE + (ctx.model_bytes if setup == "sidecar" else 0))
                quiet_cpu(ctx.quiet_timeout_s)
                others = OthersCpu()
                before = ctx.origin.bytes_sent()
                if setup == "sidecar":
                    pod, ready_s, publish_s, load_s = start_sidecar_pod(ctx, base, number, node)
                else:
                    pod, ready_s, publish_s, load_s = start_node_pod(ctx, nodes[node], number)
                origin_bytes, cores = ctx.origin.bytes_sent() - before, others.cores()
                if cores <= NOISY_CORES or attempt == TRIES:
                    break
                log(f"  {setup:<7} round {rep} pod {number}: {ready_s:.2f}s while other processes kept {cores:.2f} "
                    "cores busy: discarded, started again")  # fmt: skip
                ctx.discarded += 1
                pod.stop()
                if first and node in nodes:  # its agent has the model now: a fresh one, to stage it again
                    nodes.pop(node).stop()
            pods.append(pod)
            here = [p for p in pods if p.node == node]
            store = sum(allocated_bytes(p.store) for p in here if p.store) if setup == "sidecar" else (
                nodes[node].store_bytes())  # fmt: skip
            pss, own = server_memory(p.server for p in here)
            sample = PodSample(setup, rep, number, node, first, ready_s, origin_bytes, store, pss, own, len(here),
                               publish_s, load_s, others_cores=cores, attempts=attempt)  # fmt: skip
            samples.append(sample)
            log(f"  {setup:<7} round {rep} pod {number} (node {node}{', first' if first else ''}): ready "
                f"{ready_s:.2f}s, origin {origin_bytes / GiB:.2f} GiB, node store {store / GiB:.2f} GiB, "
                f"servers PSS {pss / GiB:.2f} GiB; others {cores:.2f} cores")  # fmt: skip
        if pods:
            ctx.beside.setdefault(setup, []).append(staged_beside(ctx, setup, pods, nodes))
    except MemoryBudget as e:
        ctx.notes.append(f"{setup}, round {rep}: stopped after {len(samples)} pods: {e}")
        log(f"  {setup}: {e}")
    finally:
        for p in pods:
            p.stop()
        for n in nodes.values():
            n.stop()
        shutil.rmtree(base, ignore_errors=True)
    return samples


def start_sidecar_pod(ctx: Ctx, base: Path, number: int, node: str) -> tuple[Pod, float, None, float | None]:
    store = base / f"pod-{number}" / "store"
    loader = ChildProcess(warmpod_cmd("load", ctx.origin.uri, "--model", ctx.model, "--store", store),
                          name=f"loader of pod {number}", env=ctx.origin.env(), cwd=REPO, own_group=True,
                          stop_timeout=10)  # fmt: skip
    server = ServerProcess(warmpod_serve_argv(ctx.model, store), name=f"pod {number}", env=bench_env(), cwd=REPO,
                           own_group=True, stop_timeout=10)  # fmt: skip
    pod = Pod(number, node, server, loader, store.parent)
    t0 = time.monotonic()
    try:
        loader.spawn()
        server.spawn()
        ready = wait_ready(server, ctx.timeout_s)
        loader.wait(timeout=ctx.timeout_s)  # published already: it exits
    except BaseException:
        pod.stop()
        raise
    if loader.returncode != 0:
        pod.stop()
        raise RuntimeError(f"the loader of pod {number} exited {loader.returncode}:\n{loader.log_tail(3000)}")
    return pod, ready - t0, None, _loader_seconds(loader)


def _loader_seconds(loader: ChildProcess) -> float | None:
    for _, line in reversed(loader.lines):
        if line.startswith("{") and '"seconds"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return float(json.loads(line)["seconds"])
    return None


def start_node_pod(ctx: Ctx, node: SimNode, number: int) -> tuple[Pod, float, float, None]:
    pod_name = f"pod-{number}"
    node.target(pod_name)  # the kubelet makes the volume's directory before it calls
    t0 = time.monotonic()
    target = node.publish(pod_name, ctx.model, ctx.timeout_s)
    published = time.monotonic()
    server = server_in(node.ns, ctx.model, target, f"pod {number}")
    pod = Pod(number, node.name, server, unpublish=lambda: node.unpublish(pod_name))
    try:
        ready = wait_ready(server, ctx.timeout_s)
    except BaseException:
        pod.stop()
        raise
    return pod, ready - t0, published - t0, None


T = TypeVar("T")


def quietly(measure: Callable[[], T], quiet_timeout_s: float, what: str) -> tuple[T, int]:
    """`measure()` once the CPUs are idle (as far as `quiet_timeout_s` allows), again if other processes kept more
    than NOISY_CORES busy meanwhile (at most TRIES times): its result and how many were discarded."""
    for attempt in range(1, TRIES + 1):
        quiet_cpu(quiet_timeout_s)
        others = OthersCpu()
        result = measure()
        cores = others.cores()
        if cores <= NOISY_CORES or attempt == TRIES:
            return result, attempt - 1
        log(f"  {what}: other processes kept {cores:.2f} cores busy meanwhile: discarded, measured again")
    raise AssertionError("unreachable")


def staged_beside(ctx: Ctx, setup: str, pods: Sequence[Pod], nodes: Mapping[str, SimNode]) -> float:
    """One staged cold start beside the pods, with all of them still running: `warmpod serve` straight on the last
    node's store (the agent's view of the model, no publish; or the last sidecar pod's store), in that node's
    namespace. Same moment, same memory, same neighbours as the last pods: what they are compared with."""
    last = pods[-1]
    own_ns = None
    if setup == "sidecar":
        assert last.store is not None
        own_ns = Namespace()
        ns, store = own_ns, last.store / "store"
    else:
        node = nodes[last.node]
        ns, store = node.ns, node.root / VIEWS / ctx.model

    def start() -> float:
        server = server_in(ns, ctx.model, store, "staged beside the pods")
        try:
            return wait_ready(server, ctx.timeout_s) - server.started
        finally:
            server.stop()

    try:
        seconds, discarded = quietly(start, ctx.quiet_timeout_s, f"{setup}: staged start beside the pods")
    finally:
        if own_ns is not None:
            own_ns.close()
    ctx.discarded += discarded
    log(f"  {setup:<7} staged cold start beside its {len(pods)} pods: {seconds:.2f}s")
    return seconds


def staged_starts(ctx: Ctx, count: int) -> list[float]:
    """`warmpod serve` on a store the loader filled beforehand (the staged cold start), `count` times, in a mount
    namespace through nsenter as the node setups' servers are; the store removed afterwards."""
    ns = Namespace()
    try:
        with temp_dir(ctx.work, "staged-") as d:
            stage(ctx.model_dir, d / "store", ctx.model)
            out = []

            def start() -> float:
                server = server_in(ns, ctx.model, d / "store", "staged")
                try:
                    return wait_ready(server, ctx.timeout_s) - server.started
                finally:
                    server.stop()

            for _ in range(count):
                seconds, discarded = quietly(start, ctx.quiet_timeout_s, "staged cold start")
                ctx.discarded += discarded
                out.append(seconds)
                log(f"  staged cold start {out[-1]:.2f}s")
            return out
    finally:
        ns.close()


# ----------------------------------------------------------------------------------------------- huge pages


def huge_experiment(work: Path, models: Mapping[str, Path], reps: int, timeout_s: float, quiet_timeout_s: float,
                    notes: list[str]) -> tuple[list[HugeSample], int]:  # fmt: skip
    """Two agents side by side, `--tmpfs --huge` and `--tmpfs`, every model preloaded from its local directory; the
    staged start of each model through a published volume, one uncounted round, then `reps` rounds, rotated. The
    samples, and how many starts were measured again because other processes were busy."""
    names = {label: d.name for label, d in models.items()}  # the model's name in the catalog: its directory's
    catalog = work / "huge-catalog.json"
    catalog.write_text(json.dumps({"models": {names[m]: {"source": str(d), "namespaces": ["*"]}
                                              for m, d in models.items()}}))  # fmt: skip
    need = sum(mlp_bytes(json.loads((d / "plan.json").read_text())) for d in models.values()) + 512 * MiB
    check_budget(0, 2 * need)
    nodes: dict[str, SimNode] = {}
    samples: list[HugeSample] = []
    discarded = 0
    try:
        for mode in ("huge", "plain"):
            node = SimNode(mode, work / f"huge-{mode}", catalog, bench_env(), max_bytes=need, huge=mode == "huge",
                           preload=list(names.values()))  # fmt: skip
            nodes[mode] = node
            node.start()
            if node.events("tmpfs_not_mounted"):
                notes.append(f"huge pages: not measured, the agent may not mount a tmpfs here: "
                             f"{node.events('tmpfs_not_mounted')[0]}")  # fmt: skip
                return [], 0
        for node in nodes.values():
            node.wait_preloaded(timeout_s)
        modes = list(nodes)
        for rnd in range(reps + 1):
            for mode in modes[rnd % 2 :] + modes[: rnd % 2]:
                for label, d in models.items():
                    node, pod = nodes[mode], f"{mode}-{d.name}-{rnd}"
                    s, again = quietly(lambda: huge_start(node, names[label], d, pod, timeout_s),  # noqa: B023
                                       quiet_timeout_s, f"huge pages: {mode} {label}")  # fmt: skip
                    discarded += again
                    log(f"  huge pages: {mode:<5} {label:<8} {'warm-up' if rnd == 0 else f'round {rnd}'}: "
                        f"{s.first_ok_s:.2f}s, {s.pmd_mapped / MiB:.0f} MiB mapped as 2 MiB pages")  # fmt: skip
                    if rnd > 0:
                        samples.append(HugeSample(mode, label, rnd, s.first_ok_s, s.ready_s, s.pmd_mapped))
    finally:
        for node in nodes.values():
            node.stop()
    return samples, discarded


def huge_start(node: SimNode, model: str, model_dir: Path, pod: str, timeout_s: float) -> HugeSample:
    target = node.publish(pod, model, timeout_s)
    server = server_in(node.ns, model, target, f"{node.name} {model}")
    try:
        input_size = json.loads((model_dir / "plan.json").read_text())[0]
        timing = first_inference(server, model, input_size, timeout_s)
        pmd = pss_bytes(server.pid).get("ShmemPmdMapped", 0)
    finally:
        server.stop()
        node.unpublish(pod)
    return HugeSample(node.name, model, 0, timing.first_ok_s, timing.ready_log_s or math.nan, pmd)


# ----------------------------------------------------------------------------------------------- the simulator


def spike_runs(cold_starts: Mapping[str, float], jobs: int) -> tuple[list[Any], dict[float, str]]:
    """bench/autoscale_sim.py's spike trace, every policy, once per measured cold start (its first seed)."""
    from bench.autoscale_sim import (
        POLICIES,
        SEED,
        TIMINGS,
        Setup,
        capacity,
        load_timings,
        make_traces,
        run_all,
    )
    from bench.simcore import ReplicaSpec

    service, _data = load_timings(TIMINGS)
    spec = ReplicaSpec()
    cap = capacity(service, spec, SEED)
    setup = Setup(service, cap, round(cap.p95_concurrency, 1), tuple(make_traces(cap.p95_rps)), spec)
    labels = {round(v, 2): k for k, v in cold_starts.items()}
    runs = run_all(setup, [("spike", k, cs, SEED) for cs in labels for k in POLICIES], jobs)
    return runs, labels


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 0.1 GiB, 4 pods, one round, huge pages on 0.1 and 0.25 GiB; writes nothing "
                    "unless --out/--png/--json are given")  # fmt: skip
    ap.add_argument("--size-gib", type=float, default=2.0, help="the scaled model's size (default 2)")
    ap.add_argument("--pods", type=int, default=8, help="pods, the first half on node A (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="rounds of every setup, order rotated (default 3)")
    ap.add_argument("--staged-reps", type=int, default=2, help="staged cold starts per round (default 2)")
    ap.add_argument("--huge-sizes", default="0.1,4", help="huge-page models in GiB: small,big (default 0.1,4)")
    ap.add_argument("--huge-reps", type=int, default=3, help="counted rounds of the huge-page starts (default 3)")
    ap.add_argument("--no-huge", action="store_true", help="skip the huge-page measurement")
    ap.add_argument("--no-sim", action="store_true", help="skip the autoscaling simulation")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at once, in processes (default 2)")
    ap.add_argument("--workdir", default="/var/tmp", help="root-disk directory for models and SeaweedFS")
    ap.add_argument("--shm", default="/dev/shm", help="tmpfs for the stores, node roots and kubelet dirs")
    ap.add_argument("--model-dir", help="keep the generated models here and reuse them on later runs")
    ap.add_argument("--quiet-timeout", type=float, default=30, help="longest wait for idle CPUs before a start, s")
    ap.add_argument("--report", metavar="JSON",
                    help="measure nothing: the report again (tables, chart, section) from a run's --json")  # fmt: skip
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.quick:
        args.size_gib, args.pods, args.reps, args.staged_reps, args.huge_reps = 0.1, 4, 1, 1, 1
        args.huge_sizes = "0.1,0.25"
        for opt in ("out", "png", "json"):
            if f"--{opt}" not in raw and not any(a.startswith(f"--{opt}=") for a in raw):
                setattr(args, opt, "")
    if args.pods < 2 or args.reps < 1 or args.staged_reps < 1:
        ap.error("--pods >= 2, --reps >= 1, --staged-reps >= 1")
    args.huge_gib = [float(x) for x in args.huge_sizes.split(",") if x.strip()]
    if len(args.huge_gib) != 2:
        ap.error("--huge-sizes takes two sizes: small,big")
    return args


def size_label(gib: float) -> str:
    return f"{gib:g} GiB"


@contextlib.contextmanager
def origin_for(workdir: Path, model_dir: Path, model: str) -> Iterator[Origin]:
    origin = Origin(workdir / "seaweed", model_dir, model)
    try:
        yield origin
    finally:
        origin.close()


@dataclass
class Results:
    """What a run measured: everything the report is made of (and the --json file holds)."""

    meta: list[str]
    model_bytes: int
    staged_s: list[float]
    beside_s: dict[str, list[float]]
    samples: list[PodSample]
    huge: list[HugeSample]
    huge_labels: list[str]

    @classmethod
    def load(cls, path: Path) -> Results:
        d = json.loads(path.read_text())
        return cls(d["meta"], int(d["model_bytes"]), d["staged_s"], d["beside_s"],
                   [PodSample(**x) for x in d["samples"]], [HugeSample(**x) for x in d["huge"]],
                   d["huge_labels"])  # fmt: skip


def report(res: Results, *, out: str, png_path: str, sim: bool, jobs: int) -> None:
    """Goals, the simulator's spike trace on the measured starts, the tables on stdout, the chart and the
    BENCHMARKS.md section ('' skips either)."""
    rows = pod_rows(res.samples)
    staged_s = median(res.staged_s)
    beside = {k: median(v) for k, v in res.beside_s.items()}
    goals = [next_pod_goal(rows, s, staged_s, beside.get(s)) for s in SETUPS]
    goals += [origin_goal(res.samples, s, res.model_bytes) for s in SETUPS]
    goals += [memory_goal(rows, s, res.model_bytes) for s in SETUPS]
    hgoals = huge_goals(res.huge, res.huge_labels[0], res.huge_labels[1])
    runs: list[Any] = []
    sim_labels: dict[float, str] = {}
    if sim:
        runs, sim_labels = spike_runs(sim_cold_starts(rows), jobs)
    print(summary_table(rows, res.samples, staged_s, res.model_bytes, res.beside_s))
    print(pods_table(rows, res.model_bytes))
    print("\n".join(g.line() for g in goals))
    if res.huge:
        print(huge_table(res.huge, res.huge_labels))
        print("\n".join(g.line() for g in hgoals))
    if runs:
        print(sim_table(runs, sim_labels))
    png = plot(rows, staged_s, res.model_bytes, Path(png_path)) if png_path else None
    if out:
        doc = Path(out)
        section = markdown(res, rows, goals, hgoals, runs, sim_labels, png, doc.resolve().parent)
        update_section(doc, MARK_START, MARK_END, section)
        log(f"updated {doc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        report(Results.load(Path(args.report)), out=args.out, png_path=args.png, sim=not args.no_sim, jobs=args.jobs)
        return 0
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise SystemExit("needs root, unshare and nsenter: the simulated nodes are mount namespaces")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (servers, agents, /dev/shm)
    started, t_start = dt.datetime.now(dt.UTC), time.monotonic()
    label = size_label(args.size_gib)
    model = f"mlp-{args.size_gib:g}g"
    samples: list[PodSample] = []
    staged: list[float] = []
    huge: list[HugeSample] = []
    notes: list[str] = []
    others_cores: list[float] = []
    discarded = 0
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(temp_dir(Path(args.workdir), "warmpod-scaleout-"))
        shm = stack.enter_context(temp_dir(Path(args.shm), "warmpod-scaleout-"))
        models_root = Path(args.model_dir).resolve() if args.model_dir else root / "models"
        model_dir = ensure_mlp(models_root / f"mlp-{args.size_gib:g}g", _plan(args.size_gib))
        model_bytes = sum(f.stat().st_size for f in model_files(model_dir))
        origin = stack.enter_context(origin_for(root, model_dir, model))
        os.sync()  # the generated model and the upload written back now, not during the timed runs
        ctx = Ctx(shm, model_dir, model, model_bytes, origin, args.pods, timeout_s=120 + 60 * args.size_gib,
                  quiet_timeout_s=args.quiet_timeout, notes=notes)  # fmt: skip
        for rep in range(1, args.reps + 1):
            others = OthersCpu()
            staged += staged_starts(ctx, args.staged_reps)
            order = [SETUPS[(i + rep - 1) % len(SETUPS)] for i in range(len(SETUPS))]
            for setup in order:
                log(f"round {rep}: {LABELS[setup]}")
                samples += run_setup(ctx, setup, rep)
            others_cores.append(others.cores())
        discarded += ctx.discarded
        origin_note = (f"SeaweedFS {origin.s3.version} (`weed server -filer -s3`, data on the {args.workdir} root "
                       "disk, 127.0.0.1 only)")  # fmt: skip
        stack.pop_all().close()  # SeaweedFS, the scaled model's stores: gone before the huge-page models are staged
        if not args.no_huge:
            with temp_dir(Path(args.workdir), "warmpod-scaleout-") as root2, temp_dir(Path(args.shm), "wp-huge-") as w:
                mroot = Path(args.model_dir).resolve() if args.model_dir else root2 / "models"
                huge_models = {size_label(g): ensure_mlp(mroot / f"mlp-{g:g}g", _plan(g)) for g in args.huge_gib}
                os.sync()
                huge, again = huge_experiment(w, huge_models, args.huge_reps, 120 + 60 * max(args.huge_gib),
                                              args.quiet_timeout, notes)  # fmt: skip
                discarded += again
    seconds = time.monotonic() - t_start
    meta = [
        f"Command: `{command_line(__file__, argv)}`",
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; warmpod at commit {git_revision()}; the run took "
        f"{seconds / 60:.1f} min",
        f"Machine: {machine_line(('torch', 'safetensors', 'aiohttp', 'grpcio'))}",
        f"Model: generated fp32 MLP of width 4096, {label}: {model_bytes:,} bytes (config.json + model.safetensors, "
        f"{len(_plan(args.size_gib)) - 1} linear layers), in s3://{BUCKET}/{model}/ on {origin_note}, read through "
        "tests.kit's FaultProxy (no faults: it counts the body bytes of every object GET).",
        f"Pods 1-{(args.pods + 1) // 2} on node A, {(args.pods + 1) // 2 + 1}-{args.pods} on node B, created in that "
        f"order, each once the one before was ready; {args.reps} rounds of every setup, the order of the setups "
        f"rotated each round; {args.staged_reps} staged cold starts at the start of each round. Tables: medians "
        "over the rounds.",
        f"The machine is shared with other engineers' benchmarks and tests: before every start (each "
        f"pod, each staged or huge-page start) the harness waited up to {args.quiet_timeout:.0f} s for the CPUs to be "
        f"≤ 25% busy over a second, and a start during which other processes kept more than {NOISY_CORES:g} cores "
        f"busy was stopped and made again (at most {TRIES} starts; a first pod on a node with a fresh agent): "
        f"{discarded} starts discarded. In the kept pod starts other processes used median "
        f"{median([x.others_cores for x in samples] or [0.0]):.2f} cores (max "
        f"{max((x.others_cores for x in samples), default=0.0):.2f}); over whole rounds "
        f"{median(others_cores or [0.0]):.2f} cores on average (max {max(others_cores, default=0.0):.2f}).",
        *notes,
    ]
    res = Results(meta, model_bytes, staged, ctx.beside, samples, huge, [size_label(g) for g in args.huge_gib])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(res), indent=1))
    report(res, out=args.out, png_path=args.png, sim=not args.no_sim, jobs=args.jobs)
    return 0


def _plan(gib: float) -> tuple[int, ...]:
    from bench.serverproc import plan_mlp

    return plan_mlp(int(gib * GiB))


def markdown(res: Results, rows: Sequence[PodRow], goals: Sequence[Goal], hgoals: Sequence[Goal],
             runs: Sequence[Any], sim_labels: Mapping[float, str], png: Path | None, doc_dir: Path) -> str:  # fmt: skip
    staged, staged_s, model_bytes, huge = res.staged_s, median(res.staged_s), res.model_bytes, res.huge
    parts = [
        MARK_START,
        "## Scale-out: 1 → 8 pods on two nodes, per-pod sidecar vs the node cache",
        "",
        *(f"- {m}" for m in res.meta),
        "- Setups: **(a) per-pod sidecar** — each pod `warmpod load s3://…` into its own store on /dev/shm and "
        "`warmpod serve --store` on it, spawned together (the Deployment's native sidecar has no startupProbe); node "
        "A's pods were stopped and their stores removed before node B's started (8 copies of the model and 8 "
        "servers would not fit beside the other work on this machine; a node's memory counts its own pods). "
        "**(b) node cache, origin only** — one `warmpod node --tmpfs --max-bytes MODEL+512MiB` per node, no peers; "
        "**(c) node cache, peer fetch** — the same, node B's agent with `--peers` node A's and a shared "
        "`--peer-token-file` (node A's has the token, to serve). A node is a private mount namespace holding the "
        "agent, its tmpfs and the pods' volumes; a node-cache pod is a NodePublishVolume call on the agent's CSI "
        "socket shaped like the kubelet's (ephemeral inline volume, podInfoOnMount), then `warmpod serve --store "
        "TARGET --threads 1` in the node's namespace.",
        "- Time to ready: the pod's creation (just before the publish call, or the loader's spawn) → the first 200 "
        "from `GET /v2/health/ready`, polled every 10 ms. Staged cold start: `warmpod serve` on a store staged "
        "beforehand with the loader, spawned the same way (nsenter into a mount namespace), in the same rounds: "
        f"median **{staged_s:.2f} s** over {len(staged)} starts ({min(staged):.2f}-{max(staged):.2f}): the "
        "reference of the next-pod goal. Staged start beside the last pods: after each setup's last pod, one more "
        "`warmpod serve` straight on the last node's store (the agent's view, no publish; or the last sidecar "
        "pod's store) with every pod still running — the same moment, memory and neighbours as the last pods.",
        "- Origin bytes: body bytes of the object GETs the proxy forwarded between a pod's creation and its "
        "readiness. Node store: allocated bytes (st_blocks) of the node's store(s) after the pod was ready — every "
        "sidecar store on the node, or the agent's tmpfs (each file once, views included). Servers: Σ PSS of the "
        "servers on the node / their own part (PSS minus Pss_Shmem, the store pages they map, which the store "
        "already counts), with the number of pods on the node in brackets.",
        "",
        "Summary (medians over the rounds):",
        "",
        summary_table(rows, res.samples, staged_s, model_bytes, res.beside_s),
        "",
        "Per new pod:",
        "",
        pods_table(rows, model_bytes),
        "",
        "Goals:",
        "",
        *(g.line() for g in goals),
        "",
    ]
    if png is not None:
        parts += [f"![scale-out]({Path(os.path.relpath(png, doc_dir)).as_posix()})", ""]
    if huge:
        parts += [
            "Huge pages: two agents side by side, `warmpod node --tmpfs --huge` (tmpfs huge=within_size) and "
            "`--tmpfs`, each preloading a 0.1 GiB and a 4 GiB MLP from local directories (the loader creates each "
            "file at its final size, so within_size can back it with 2 MiB pages); each start: a volume published, "
            "`warmpod serve` on it spawned in the node's namespace → the first 200 from `POST /v2/models/M/infer` "
            "(as bench.coldstart_bench times its staged start), then the server stopped and the volume unpublished; "
            "one uncounted round, then rounds with the agents' order rotated. \"Mapped as 2 MiB pages\": the server's "
            "ShmemPmdMapped once it answered.",
            "",
            huge_table(huge, res.huge_labels),
            "",
            *(g.line() for g in hgoals),
            "",
        ]
    if runs:
        parts += [
            "The autoscaling simulator (bench/autoscale_sim.py, its spike trace, seed 1, every policy, as in the "
            "autoscaling section) with the new-pod starts measured here as its cold start: the sidecar's (every new "
            "pod downloads the model), the node cache's on a node that already has the model (pods after the first "
            "on a node, both node setups), and the first pod on a new node fetching from a peer. The simulator's "
            "replicas serve MiniLM; only the cold start comes from this 2 GiB model:",
            "",
            sim_table(runs, sim_labels),
            "",
        ]
    parts.append(MARK_END)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
