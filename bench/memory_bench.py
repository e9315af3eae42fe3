"""Memory: four server processes on one staged model (total PSS) vs four processes that each load their own copy.

One generated fp32 MLP of ~1 GiB (width 4096, config.json model_type "mlp" + model.safetensors) and a ~1 MiB one,
both staged with `warmpod load` into a store on /dev/shm. Scenarios, each run --reps times (medians reported):

  warmpod x4        four `warmpod serve` processes on the 1 GiB model (different ports, same store)
  disk x4           four bench.baselines.disk_server processes on the 1 GiB model directory on disk: the same
                    server, each process reading the file with safetensors.torch.load_file and copying it into its
                    own private memory
  disk-mmap x4      the same four, keeping load_file's tensors as they are: safetensors (with torch) backs them with
                    a lazy copy-on-write mmap of the file, so the page cache's pages are shared (shown for reference)
  warmpod x1        one `warmpod serve` on the 1 GiB model (what one replica costs alone)
  overhead x1       one `warmpod serve` on the 1 MiB model: the per-process overhead (interpreter, torch, aiohttp)
  overhead x4       four of those: the overhead per process when four share the same libraries

Each process is started, waited for until it answers an inference (after its warm-up forward, so every weight page
has been touched), then its /proc/PID/smaps_rollup is read: PSS (proportional set size) counts each page a process
maps divided by the number of processes mapping it, so summing PSS over processes counts shared pages once. The
store's pages are tmpfs (shmem) pages: four servers mapping the same 1 GiB version each get a quarter of it in their
Pss_Shmem, and the sum is the store's size, once.

Goal (from the issue): total PSS of warmpod x4 <= 1.1 x model size + 4 x per-process overhead.

Usage:
  python -m bench.memory_bench [--size-gib 1] [--reps 3] [--model-dir DIR (keep and reuse the generated models)]

Every server is stopped (SIGTERM to its process group, SIGKILL after 10 s); everything on /dev/shm and in the work
directory is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.serverproc import (
    MODEL_FILE,
    GiB,
    MiB,
    OthersCpu,
    bench_parser,
    bench_server,
    command_line,
    disk_serve_argv,
    ensure_mlp,
    first_inference,
    git_revision,
    log,
    machine_line,
    median,
    plan_mlp,
    pss_bytes,
    read_fully,
    temp_dir,
    update_section,
    wait_quiet,
    warmpod_serve_argv,
)
from tests.kit.models import mlp_bytes
from tests.kit.warmpod import ServerProcess, stage

MARK_START = "<!-- memory_bench:start -->"
MARK_END = "<!-- memory_bench:end -->"
GOAL_MODEL_FACTOR = 1.1
FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    kind: str  # warmpod | disk | disk-mmap
    model: str  # big | tiny
    count: int


SCENARIOS = (
    Scenario("warmpod-x4", "4 x `warmpod serve`, one staged model", "warmpod", "big", 4),
    Scenario("disk-x4", "4 x same server, each loads its own copy", "disk", "big", 4),
    Scenario("disk-mmap-x4", "4 x same server, safetensors mmap of the file", "disk-mmap", "big", 4),
    Scenario("warmpod-x1", "1 x `warmpod serve`, staged model", "warmpod", "big", 1),
    Scenario("overhead-x1", "1 x `warmpod serve`, 1 MiB model (overhead)", "warmpod", "tiny", 1),
    Scenario("overhead-x4", "4 x `warmpod serve`, 1 MiB model (overhead)", "warmpod", "tiny", 4),
)


@dataclass
class Sample:
    per_process: list[dict[str, int]]  # smaps_rollup fields, one dict per server process

    def total(self, key: str = "Pss") -> int:
        return sum(p.get(key, 0) for p in self.per_process)


@dataclass
class ScenarioResult:
    scenario: Scenario
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    def median_total(self, key: str = "Pss") -> int | None:
        return int(median([s.total(key) for s in self.samples])) if self.samples else None

    def median_per_process(self, key: str = "Pss") -> int | None:
        vals = [p.get(key, 0) for s in self.samples for p in s.per_process]
        return int(median(vals)) if vals else None


@dataclass
class Models:
    """The two staged models and their source directories on disk."""

    store: Path
    no_store: Path
    dirs: dict[str, Path]  # big | tiny -> model directory
    names: dict[str, str]
    input_sizes: dict[str, int]
    timeout_s: float


@contextlib.contextmanager
def servers(argvs: Sequence[list[str]]) -> Iterator[list[ServerProcess]]:
    """Start every server at once; stop them all however the block ends."""
    procs: list[ServerProcess] = []
    try:
        for argv in argvs:
            procs.append(bench_server(argv).spawn())
        yield procs
    finally:
        for p in procs:
            p.stop()


def run_scenario(sc: Scenario, models: Models) -> Sample:
    name, model_dir = models.names[sc.model], models.dirs[sc.model]
    if sc.kind == "warmpod":
        argv = warmpod_serve_argv(name, models.store)
    else:
        read_fully(model_dir / MODEL_FILE)  # the same for every disk server: its file in the page cache
        weights = "mmap" if sc.kind == "disk-mmap" else "copy"
        argv = disk_serve_argv(name, model_dir, models.no_store, weights)
    with servers([argv] * sc.count) as procs:
        for p in procs:
            first_inference(p, name, models.input_sizes[sc.model], models.timeout_s)
        time.sleep(1.0)  # let allocator and interpreter settle after the first requests
        return Sample([pss_bytes(p.pid) for p in procs])


def store_bytes(path: Path) -> int:
    """Bytes the store's files occupy in tmpfs (allocated blocks, i.e. RAM)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


# ----------------------------------------------------------------------------------------------- report


def mib(v: int | float | None) -> str:
    return "—" if v is None else f"{v / MiB:,.0f}"


def results_table(results: dict[str, ScenarioResult], model_bytes: int) -> str:
    rows = [
        "| scenario | processes | total PSS MiB | PSS per process MiB | total Pss_Anon | total Pss_Shmem "
        "| total Pss_File | total RSS | total PSS ÷ model | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        sc = r.scenario
        if not r.samples:
            rows.append(f"| {sc.label} | {sc.count} | failed: {r.error[:80]} | | | | | | | 0 |")
            continue
        total = r.median_total() or 0
        rows.append(
            f"| {sc.label} | {sc.count} | **{mib(total)}** | {mib(r.median_per_process())} | "
            f"{mib(r.median_total('Pss_Anon'))} | {mib(r.median_total('Pss_Shmem'))} | "
            f"{mib(r.median_total('Pss_File'))} | {mib(r.median_total('Rss'))} | {total / model_bytes:.2f} | "
            f"{len(r.samples)} |"
        )
    return "\n".join(rows)


def goal_lines(results: dict[str, ScenarioResult], model_bytes: int) -> list[str]:
    w4, d4 = results.get("warmpod-x4"), results.get("disk-x4")
    o1, o4 = results.get("overhead-x1"), results.get("overhead-x4")
    lines = []
    if w4 and w4.samples and o1 and o1.samples:
        total, overhead = w4.median_total() or 0, o1.median_total() or 0
        bound = GOAL_MODEL_FACTOR * model_bytes + 4 * overhead
        lines.append(
            f"- total PSS of 4 servers ≤ {GOAL_MODEL_FACTOR} x model + 4 x per-process overhead: "
            f"**{'met' if total <= bound else 'missed'}** — {mib(total)} MiB ≤ {GOAL_MODEL_FACTOR} x "
            f"{mib(model_bytes)} + 4 x {mib(overhead)} = {mib(bound)} MiB "
            f"({total / bound:.2f} of the bound; overhead = PSS of one server alone on the 1 MiB model)"
        )
    if w4 and w4.samples and o4 and o4.samples:
        model_share = (w4.median_total() or 0) - (o4.median_total() or 0)
        lines.append(
            f"- stricter, overhead measured with 4 processes sharing the libraries too: 4 servers on the 1 GiB model "
            f"use {mib(model_share)} MiB more than 4 on the 1 MiB model = {model_share / model_bytes:.2f} x the "
            f"model (≤ {GOAL_MODEL_FACTOR}: **{'met' if model_share <= GOAL_MODEL_FACTOR * model_bytes else 'missed'}"
            "**)"
        )
    if w4 and w4.samples and d4 and d4.samples:
        w, d = w4.median_total() or 0, d4.median_total() or 1
        lines.append(
            f"- vs four processes each with its own copy: {mib(w)} MiB vs {mib(d)} MiB: warmpod uses "
            f"{1 - w / d:.0%} less ({mib(d - w)} MiB saved)"
        )
    return lines


def plot(results: dict[str, ScenarioResult], model_bytes: int, png: Path) -> Path | None:
    """Stacked bars of total PSS (anon / file / shmem) per scenario, with the model size and the goal's bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing (pip install -r bench/requirements.txt -c constraints.txt)")
        return None
    rows = [r for r in results.values() if r.samples]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.6))
    labels = [r.scenario.label.replace(", ", ",\n") for r in rows]
    bottom = [0.0] * len(rows)
    for key, color, name in (("Pss_Anon", "#1f77b4", "anonymous (private heap, copies)"),
                             ("Pss_File", "#7f7f7f", "file-backed (libraries)"),
                             ("Pss_Shmem", "#d62728", "shmem (the store's pages)")):  # fmt: skip
        vals = [(r.median_total(key) or 0) / MiB for r in rows]
        ax.bar(labels, vals, 0.6, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{(r.median_total() or 0) / MiB:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(model_bytes / MiB, color="black", linestyle=":", linewidth=1)
    ax.text(len(rows) - 0.5, model_bytes / MiB, "model size", fontsize=7, va="bottom", ha="right")
    o1 = results.get("overhead-x1")
    if o1 and o1.samples:
        bound = (GOAL_MODEL_FACTOR * model_bytes + 4 * (o1.median_total() or 0)) / MiB
        ax.axhline(bound, color="#d62728", linestyle="--", linewidth=1)
        ax.text(len(rows) - 0.5, bound, "goal bound for 4 servers", fontsize=7, va="bottom", ha="right",
                color="#d62728")  # fmt: skip
    ax.set_ylabel("total PSS, MiB (median of runs)")
    ax.set_title(f"Memory of server processes, {model_bytes / GiB:.2f} GiB model", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def markdown(command: str, meta: list[str], results: dict[str, ScenarioResult], model_bytes: int,
             png: Path | None, doc_dir: Path) -> str:  # fmt: skip
    parts = [
        MARK_START,
        "## Memory: four servers on one staged model vs four private copies (PSS)",
        "",
        f"- Command: `{command}`",
        *(f"- {m}" for m in meta),
        "",
        results_table(results, model_bytes),
        "",
        "Goal:",
        "",
        *goal_lines(results, model_bytes),
        "",
    ]
    if png is not None:
        parts += [f"![memory]({Path(os.path.relpath(png, doc_dir)).as_posix()})", ""]
    parts.append(MARK_END)
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of the big model in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--workdir", default="/var/tmp", help="root-disk directory for the generated models")
    ap.add_argument("--shm", default="/dev/shm", help="where the store goes (tmpfs)")
    ap.add_argument("--model-dir", help="keep the generated models here and reuse them on later runs")
    ap.add_argument("--quiet-load", type=float, default=0.7, help="wait for a 1-min load average below this (0.7)")
    ap.add_argument("--quiet-timeout", type=float, default=600, help="longest wait for a quiet machine, s (600)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.size_gib <= 0:
        ap.error("--reps must be >= 1 and --size-gib > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (servers, /dev/shm)
    started = dt.datetime.now(dt.UTC)
    plans = {"big": plan_mlp(int(args.size_gib * GiB)), "tiny": plan_mlp(MiB, width=512)}
    model_bytes = mlp_bytes(plans["big"])
    results = {sc.key: ScenarioResult(sc) for sc in SCENARIOS}
    _quiet, quiet_note = wait_quiet(args.quiet_load, args.quiet_timeout)
    notes = [f"At the start: {quiet_note}."]
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(temp_dir(Path(args.workdir), "warmpod-memory-"))
        shm_root = stack.enter_context(temp_dir(Path(args.shm), "warmpod-memory-"))
        models_root = Path(args.model_dir).resolve() if args.model_dir else root / "models"
        dirs = {k: ensure_mlp(models_root / f"mlp-{k}", sizes) for k, sizes in plans.items()}
        models = Models(
            store=shm_root / "store",
            no_store=shm_root / "no-store",
            dirs=dirs,
            names={k: f"mlp-{k}" for k in plans},
            input_sizes={k: sizes[0] for k, sizes in plans.items()},
            timeout_s=300 + 120 * args.size_gib,
        )
        os.sync()  # write the generated models back now, not during the measured runs
        shmem_before = shmem_bytes()
        for k in plans:
            stage(dirs[k], models.store, models.names[k])
        staged_bytes = store_bytes(models.store / models.names["big"])
        shmem_staged = shmem_bytes() - shmem_before
        # One uncounted round first: freshly touched memory is slow on this VM, and the first start pays for it.
        with contextlib.suppress(Exception):
            run_scenario(SCENARIOS[0], models)
        notes.append(f"Before the counted runs: {wait_quiet(None, args.quiet_timeout)[1]}.")
        others = OthersCpu()
        for rep in range(args.reps):
            for i in range(len(SCENARIOS)):
                sc = SCENARIOS[(i + rep) % len(SCENARIOS)]
                r = results[sc.key]
                if r.error:
                    continue
                try:
                    sample = run_scenario(sc, models)
                except Exception as e:  # one scenario failing must not lose the others
                    r.error = f"{type(e).__name__}: {e}"
                    log(f"{sc.key}: FAILED {r.error[:400]}")
                    continue
                r.samples.append(sample)
                each = ", ".join(f"{p['Pss'] / MiB:,.0f}" for p in sample.per_process)
                log(f"{sc.key:<12} run {rep + 1}: total PSS {sample.total() / MiB:,.0f} MiB ({each})")
        notes.append(f"Other processes used {others.cores():.2f} cores on average during the counted runs.")

    meta = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; warmpod at commit {git_revision()}",
        f"Machine: {machine_line()}",
        f"Model: generated fp32 MLP, {model_bytes} bytes of weights ({model_bytes / MiB:,.0f} MiB, "
        f"{len(plans['big']) - 1} linear layers of width 4096); overhead model: {mlp_bytes(plans['tiny'])} bytes "
        f"({len(plans['tiny']) - 1} layers of width 512). Both staged with `warmpod load` into a store on /dev/shm.",
        f"The store's copy of the model occupies {mib(staged_bytes)} MiB of tmpfs (its files' allocated blocks; "
        f"/proc/meminfo Shmem grew by {mib(shmem_staged)} MiB when both models were staged). It is RAM, counted "
        "once: each server maps it read-only, and PSS divides each shared page by the number of processes mapping "
        "it, so the 4 servers' Pss_Shmem adds up to the pages they touched (all of them, after the warm-up forward), "
        "not 4 times that. Pages of the store that no process maps (manifest, config.json) are in no process's PSS.",
        "Servers: `python -m warmpod serve --model M --store S --port 0 --threads 1`, and for the copies "
        "`python -m bench.baselines.disk_server` (the same server; weights read with `safetensors.torch.load_file` "
        "from the model directory on the root disk into private memory, the file in the page cache; the page cache is "
        "not in any process's PSS once load_file has unmapped the file). The servers of a scenario start together; "
        "PSS is read from /proc/PID/smaps_rollup 1 s after each has answered one inference.",
        f"One uncounted round of the first scenario, then {args.reps} runs of every scenario in rotated order; "
        "medians of the totals (and of the per-process values).",
        *notes,
    ]
    command = command_line(__file__, argv)
    png = plot(results, model_bytes, Path(args.png)) if args.png else None
    print(results_table(results, model_bytes))
    print("\n".join(goal_lines(results, model_bytes)))
    if args.out:
        doc = Path(args.out)
        section = markdown(command, meta, results, model_bytes, png, doc.resolve().parent)
        update_section(doc, MARK_START, MARK_END, section)
        log(f"updated {doc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = {"meta": meta, "model_bytes": model_bytes, "store_bytes": staged_bytes,
               "results": {k: {"samples": [asdict(s) for s in r.samples], "error": r.error}
                           for k, r in results.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0 if all(r.samples for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
