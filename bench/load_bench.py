"""How fast does `warmpod load` put a model into the shared-memory store, next to the usual ways of doing it?

One run measures three source paths, each against its own baselines, on the same generated model:

  local  a safetensors file on the root disk -> /dev/shm
         warmpod (`python -m warmpod load FILE`)  vs  `cp FILE /dev/shm/...`  vs  st-load
         (safetensors.torch.load_file into RAM, then each tensor's bytes written to a file on /dev/shm).
         Goal: warmpod >= 0.8x cp.
  s3     the same file as an object on a local SeaweedFS S3 gateway -> /dev/shm
         warmpod (`load s3://...`)  vs  s3fs `S3FileSystem.get`  vs  runai-model-streamer
         (SafetensorsStreamer; "runai-write" writes each tensor to /dev/shm as it arrives, "runai-ram" only
         keeps the tensors in RAM and is shown for reference). Goals: warmpod >= 1.0x runai-write, >= 2x s3fs.
  http   the same file served by nginx (sendfile) -> /dev/shm
         warmpod (`load http://...`)  vs  `curl -o /dev/shm/...`. No goal; the ratio is reported.

Why this way:
  * Every tool runs as its own process and is timed wall-clock from spawn to exit: that is what a pod's init
    step pays (interpreter start and imports included). The Python tools and warmpod also report their
    in-process time, shown in its own column.
  * Same conditions for every tool: the model file is read fully once before timing, so the local source is
    in the page cache for everyone (and so are SeaweedFS's volume files after the warm-up round). One warm-up
    round of every tool runs first and is not counted: freshly touched memory is slow on this VM (the host
    reclaims idle pages), and the first reads from the servers fill their caches.
  * Rounds are interleaved (every tool once per round, the order rotated each round) so drift hits all tools.
    Each run writes to a fresh directory under /dev/shm, which is deleted right after (tmpfs is RAM).
  * Throughput is the model file's size over the median wall time; ratios compare those throughputs.
  * The machine is shared (2 cores): before each run the harness waits, bounded, for CPU use to drop to
    --max-busy, and reports what it saw, so a noisy neighbour shows up in the notes instead of silently.
  * Threads: OMP_NUM_THREADS=MKL_NUM_THREADS=1 for every child (the torch-based tools also call
    torch.set_num_threads(1)); warmpod and runai keep their own I/O concurrency defaults unless
    --warmpod-arg / RUNAI_STREAMER_* variables say otherwise.

Usage:
  python -m bench.load_bench [--size-gib 2] [--reps 3] [--out BENCHMARKS.md] [--only cp,s3fs,runai,curl]

Servers (SeaweedFS from tests.kit.s3, nginx from bench.nginx) listen on 127.0.0.1 only and are stopped at the end;
everything written to /dev/shm and the work directory is removed (pass --model-dir to keep and reuse the generated
model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.nginx import NginxStatic
from bench.serverproc import (
    MODEL_FILE,
    REPO,
    GiB,
    MiB,
    bench_env,
    bench_parser,
    command_line,
    log,
    machine_line,
    read_fully,
    temp_dir,
    update_section,
    wait_cpu_quiet,
)
from tests.kit.s3 import SeaweedServer
from tests.kit.warmpod import warmpod_cmd

BUCKET = "warmpod-bench"
S3_KEY = f"model/{MODEL_FILE}"
MARK_START = "<!-- load_bench:start -->"
MARK_END = "<!-- load_bench:end -->"
PATHS = ("local", "s3", "http")
PATH_TITLES = {
    "local": "local file → /dev/shm",
    "s3": "S3 (SeaweedFS) → /dev/shm",
    "http": "HTTP (nginx) → /dev/shm",
}
# The baseline each path's "vs ref" column divides by.
REFERENCE = {"local": "cp", "s3": "runai-write", "http": "curl"}


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, I64
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}[self.dtype]


def plan_model(total_bytes: int) -> list[TensorSpec]:
    """A transformer-like tensor set of about `total_bytes`: F32 embedding and norms, BF16 attention, F16 MLP,
    an I64 buffer, plus a scalar and odd-sized tensors so offsets are not all nicely aligned."""
    hidden = 2048 if total_bytes >= 1 * GiB else 1024 if total_bytes >= 128 * MiB else 256
    mlp = hidden * 11 // 4
    vocab = max(16, int(0.12 * total_bytes) // (hidden * 4))
    n_index = max(1, int(0.03 * total_bytes) // 8)
    per_layer = 4 * hidden * hidden * 2 + 2 * hidden * mlp * 2 + 2 * hidden * 4
    layers = max(1, round((total_bytes - vocab * hidden * 4 - n_index * 8) / per_layer))
    specs = [
        TensorSpec("model.embed_tokens.weight", "F32", (vocab, hidden)),
        TensorSpec("model.rope.position_index", "I64", (n_index,)),
        TensorSpec("model.norm.weight", "F32", (hidden,)),
        TensorSpec("model.logit_scale", "F32", ()),
        TensorSpec("model.odd.bias", "BF16", (1001,)),
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [TensorSpec(f"{p}.self_attn.{w}_proj.weight", "BF16", (hidden, hidden)) for w in "qkvo"]
        specs += [
            TensorSpec(f"{p}.mlp.up_proj.weight", "F16", (mlp, hidden)),
            TensorSpec(f"{p}.mlp.down_proj.weight", "F16", (hidden, mlp)),
            TensorSpec(f"{p}.input_layernorm.weight", "F32", (hidden,)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", "F32", (hidden,)),
        ]
    return specs


def dtype_mix(specs: Sequence[TensorSpec]) -> dict[str, tuple[int, int]]:
    """dtype -> (tensor count, bytes)."""
    mix: dict[str, tuple[int, int]] = {}
    for s in specs:
        n, b = mix.get(s.dtype, (0, 0))
        mix[s.dtype] = (n + 1, b + s.nbytes)
    return mix


def write_model(path: Path, specs: Sequence[TensorSpec], seed: int = 0) -> None:
    """Random tensors (normal for floats, uniform for I64) saved with safetensors.torch.save_file."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    tensors: dict[str, Any] = {}
    for s in specs:
        if s.dtype == "I64":
            tensors[s.name] = torch.randint(0, 1 << 40, s.shape, dtype=torch.int64)
        else:
            tensors[s.name] = torch.randn(s.shape, dtype=torch.float32).to(dtypes[s.dtype])
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "generator": "bench/load_bench.py"})
    tmp.rename(path)


def ensure_model(model_dir: Path, specs: Sequence[TensorSpec]) -> Path:
    """Generate the model unless `model_dir` already holds one with exactly this tensor plan."""
    path = model_dir / MODEL_FILE
    plan_file = model_dir / "plan.json"
    plan = json.dumps([asdict(s) for s in specs])
    if path.exists() and plan_file.exists() and plan_file.read_text() == plan:
        log(f"reusing model {path} ({path.stat().st_size / GiB:.2f} GiB)")
        return path
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_model(path, specs)
    # plan.json sits outside the served directory's file list only by name; warmpod is given the file itself.
    plan_file.write_text(plan)
    log(f"wrote model {path} ({path.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t0:.1f}s")
    return path


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and the header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


# ----------------------------------------------------------------------------------------------- tools


@dataclass
class Ctx:
    """What a tool needs to build its command line."""

    model: Path
    model_bytes: int
    tensor_bytes: int
    s3_uri: str = ""
    http_url: str = ""
    s3_env: dict[str, str] = field(default_factory=dict)
    warmpod_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Tool:
    key: str
    path: str  # local | s3 | http
    label: str
    argv: Callable[[Ctx, Path, str], list[str]]  # (ctx, output dir, run id) -> argv
    needs_s3_env: bool = False
    json_out: bool = False  # prints a JSON object with "seconds" (and "bytes") as its last stdout line
    expect: str = "file"  # file: output equals the model file; tensors: >= tensor bytes; none: writes nothing

    @property
    def is_warmpod(self) -> bool:
        return self.key.startswith("warmpod")


def _warmpod(source: Callable[[Ctx], str]) -> Callable[[Ctx, Path, str], list[str]]:
    def argv(ctx: Ctx, out: Path, run_id: str) -> list[str]:
        cmd = warmpod_cmd("load", source(ctx), "--model", f"bench-{run_id}")
        return [*cmd, "--store", str(out / "store"), *ctx.warmpod_args]

    return argv


def _worker(tool: str, source: Callable[[Ctx], str]) -> Callable[[Ctx, Path, str], list[str]]:
    def argv(ctx: Ctx, out: Path, run_id: str) -> list[str]:
        return [sys.executable, "-m", "bench.baseline_workers", tool, source(ctx), str(out / "model.bin")]

    return argv


def _local(ctx: Ctx) -> str:
    return str(ctx.model)


def _s3(ctx: Ctx) -> str:
    return ctx.s3_uri


def _http(ctx: Ctx) -> str:
    return ctx.http_url


TOOLS: tuple[Tool, ...] = (
    Tool("warmpod-local", "local", "warmpod", _warmpod(_local), json_out=True, expect="tensors"),
    Tool("cp", "local", "cp", lambda c, o, r: ["cp", str(c.model), str(o / MODEL_FILE)]),
    Tool(
        "st-load",
        "local",
        "safetensors load_file + write",
        _worker("st-load", _local),
        json_out=True,
        expect="tensors",
    ),
    Tool("warmpod-s3", "s3", "warmpod", _warmpod(_s3), needs_s3_env=True, json_out=True, expect="tensors"),
    Tool("s3fs", "s3", "s3fs get", _worker("s3fs", _s3), needs_s3_env=True, json_out=True),
    Tool(
        "runai-write",
        "s3",
        "runai streamer + write",
        _worker("runai-write", _s3),
        needs_s3_env=True,
        json_out=True,
        expect="tensors",
    ),
    Tool(
        "runai-ram",
        "s3",
        "runai streamer, RAM only",
        _worker("runai-ram", _s3),
        needs_s3_env=True,
        json_out=True,
        expect="none",
    ),
    Tool("warmpod-http", "http", "warmpod", _warmpod(_http), json_out=True, expect="tensors"),
    Tool("curl", "http", "curl -o", lambda c, o, r: ["curl", "-sSf", "-o", str(o / MODEL_FILE), c.http_url]),
)
TOOL_BY_KEY = {t.key: t for t in TOOLS}
ALIASES = {
    "warmpod": [t.key for t in TOOLS if t.is_warmpod],
    "baselines": [t.key for t in TOOLS if not t.is_warmpod],
    "runai": ["runai-write", "runai-ram"],
    **{p: [t.key for t in TOOLS if t.path == p] for p in PATHS},
}


def select_tools(only: str | None) -> list[Tool]:
    """Tools named by --only (keys, or aliases: warmpod, baselines, runai, local, s3, http); all if None."""
    if not only:
        return list(TOOLS)
    keys: set[str] = set()
    for word in (w.strip() for w in only.split(",") if w.strip()):
        if word in ALIASES:
            keys.update(ALIASES[word])
        elif word in TOOL_BY_KEY:
            keys.add(word)
        else:
            raise SystemExit(f"--only: unknown tool {word!r}; known: {', '.join([*TOOL_BY_KEY, *ALIASES])}")
    return [t for t in TOOLS if t.key in keys]


def warmpod_available(timeout_s: float = 60.0) -> tuple[bool, str]:
    """Whether `python -m warmpod load --help` works from the repository root."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "warmpod", "load", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "`python -m warmpod load --help` timed out"
    if p.returncode != 0:
        return False, (p.stderr or p.stdout).strip().splitlines()[-1:][0] if (p.stderr or p.stdout) else "failed"
    return True, ""


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Sample:
    wall_s: float
    inproc_s: float | None
    written: int
    busy_before: float | None = None  # share of all CPUs busy just before the run started


@dataclass
class ToolResult:
    tool: Tool
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    @property
    def walls(self) -> list[float]:
        return [s.wall_s for s in self.samples]

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.walls) if self.samples else None

    @property
    def median_inproc_s(self) -> float | None:
        vals = [s.inproc_s for s in self.samples if s.inproc_s is not None]
        return statistics.median(vals) if vals else None

    def mibps(self, nbytes: int, seconds: float | None = None) -> float | None:
        s = self.median_s if seconds is None else seconds
        return nbytes / s / MiB if s else None


class RunFailed(RuntimeError):
    pass


def tool_env(tool: Tool, ctx: Ctx) -> dict[str, str]:
    """Every tool's environment is the benchmarks' (bench_env); the S3 tools' also points at SeaweedFS."""
    if not tool.needs_s3_env:
        return bench_env()
    path_style = os.environ.get("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")  # SeaweedFS: path-style
    return bench_env({"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": path_style, **ctx.s3_env})


def resident_bytes(root: Path) -> int:
    """Bytes allocated under `root` (st_blocks: a sparse or preallocated-only file does not count)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
    raise RunFailed(f"no JSON object on stdout: {stdout[-500:]!r}")


def spot_check(copy: Path, original: Path, samples: int = 8, block: int = MiB) -> None:
    """Compare some random 1 MiB blocks (and the first and last) of a byte-for-byte copy with the original."""
    size = original.stat().st_size
    if copy.stat().st_size != size:
        raise RunFailed(f"{copy} is {copy.stat().st_size} bytes, expected {size}")
    rng = random.Random(size)
    offsets = {0, max(0, size - block), *(rng.randrange(0, max(1, size - block)) for _ in range(samples))}
    with open(copy, "rb") as a, open(original, "rb") as b:
        for off in sorted(offsets):
            a.seek(off)
            b.seek(off)
            if a.read(block) != b.read(block):
                raise RunFailed(f"{copy} differs from {original} at offset {off}")


def run_once(tool: Tool, ctx: Ctx, shm_root: Path, run_id: str, timeout_s: float, check: bool) -> Sample:
    """One timed run of `tool` into a fresh directory under `shm_root`, which is removed afterwards."""
    out = shm_root / run_id
    out.mkdir()
    try:
        argv = tool.argv(ctx, out, run_id)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                argv,
                cwd=REPO,
                env=tool_env(tool, ctx),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RunFailed(f"timed out after {timeout_s:.0f}s: {' '.join(argv)}") from exc
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RunFailed(f"exit {p.returncode}: {' '.join(argv)}\n{(p.stderr or p.stdout)[-2000:]}")
        inproc = None
        if tool.json_out:
            obj = last_json(p.stdout)
            inproc = float(obj["seconds"]) if obj.get("seconds") is not None else None
        written = resident_bytes(out)
        verify_output(tool, ctx, out, written, check)
        return Sample(wall, inproc, written)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def verify_output(tool: Tool, ctx: Ctx, out: Path, written: int, check: bool) -> None:
    if tool.expect == "file":
        copy = out / MODEL_FILE if (out / MODEL_FILE).exists() else out / "model.bin"
        if check:
            spot_check(copy, ctx.model)
        elif copy.stat().st_size != ctx.model_bytes:
            raise RunFailed(f"{tool.key}: wrote {copy.stat().st_size} bytes, expected {ctx.model_bytes}")
    elif tool.expect == "tensors" and written < ctx.tensor_bytes:
        raise RunFailed(f"{tool.key}: {written} bytes on /dev/shm, expected at least {ctx.tensor_bytes}")


def quiet_note(results: dict[str, ToolResult], q: Quiet) -> str:
    busy = [s.busy_before for r in results.values() for s in r.samples if s.busy_before is not None]
    if not busy:
        return "Runs did not wait for an idle machine (--max-busy 0)."
    loud = sum(b > q.max_busy for b in busy)
    return (
        f"Before each run the harness waited (up to {q.timeout_s:.0f}s) for CPU use to fall to "
        f"≤{q.max_busy:.0%} of both cores; measured just before the counted runs: median "
        f"{statistics.median(busy):.0%}, max {max(busy):.0%}"
        + (f" ({loud} run(s) started above the threshold after the wait timed out)." if loud else ".")
    )


def rotated(items: Sequence[Tool], k: int) -> list[Tool]:
    k %= max(1, len(items))
    return [*items[k:], *items[:k]]


@dataclass(frozen=True)
class Quiet:
    """Before each run, wait up to `timeout_s` for the CPUs to be at most `max_busy` busy (0: don't wait)."""

    max_busy: float
    timeout_s: float


def wait_for_quiet(q: Quiet) -> float | None:
    """Block (bounded by q.timeout_s) until the machine is quiet; return the last busy share measured."""
    return wait_cpu_quiet(q.max_busy, q.timeout_s) if q.max_busy > 0 else None


def run_all(
    tools: Sequence[Tool], ctx: Ctx, shm_root: Path, reps: int, timeout_s: float, quiet: Quiet
) -> dict[str, ToolResult]:
    """One uncounted warm-up round (with content checks), then `reps` interleaved, rotated rounds."""
    results = {t.key: ToolResult(t) for t in tools}
    live = list(tools)
    for rnd in range(reps + 1):
        warm = rnd == 0
        for tool in rotated(live, rnd):
            res = results[tool.key]
            if res.error:
                continue
            run_id = f"{tool.key}-{'warmup' if warm else rnd}"
            busy = wait_for_quiet(quiet)
            try:
                sample = run_once(tool, ctx, shm_root, run_id, timeout_s, check=warm)
                sample.busy_before = busy
            except RunFailed as exc:
                res.error = str(exc).splitlines()[0][:300]
                log(f"  {run_id:<22} FAILED: {exc}")
                continue
            if not warm:
                res.samples.append(sample)
            inproc = f"  in-proc {sample.inproc_s:6.2f}s" if sample.inproc_s is not None else ""
            cpu = f"  cpu busy before {busy:4.0%}" if busy is not None else ""
            log(
                f"  {run_id:<22} {sample.wall_s:7.2f}s  {ctx.model_bytes / sample.wall_s / MiB:8.0f} MiB/s"
                + inproc
                + cpu
                + ("  (warm-up, not counted)" if warm else "")
            )
    return results


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Goal:
    path: str
    baseline: str
    target: float

    def text(self) -> str:
        return f"{self.path}: warmpod ≥ {self.target:g}x {self.baseline}"


GOALS = (Goal("local", "cp", 0.8), Goal("s3", "runai-write", 1.0), Goal("s3", "s3fs", 2.0))


def speed_ratio(a: ToolResult | None, b: ToolResult | None, inproc: bool = False) -> float | None:
    """How many times faster `a` is than `b` (ratio of median throughputs), or None if either is missing."""
    if a is None or b is None:
        return None
    sa, sb = (a.median_inproc_s, b.median_inproc_s) if inproc else (a.median_s, b.median_s)
    return sb / sa if sa and sb else None


def warmpod_of(results: dict[str, ToolResult], path: str) -> ToolResult | None:
    r = results.get(f"warmpod-{path}")
    return r if r and r.samples else None


def goal_lines(results: dict[str, ToolResult]) -> list[str]:
    lines = []
    for g in GOALS:
        w, b = warmpod_of(results, g.path), results.get(g.baseline)
        ratio = speed_ratio(w, b if b and b.samples else None)
        if ratio is None:
            missing = [k for k in (f"warmpod-{g.path}", g.baseline) if k not in results]
            why = f"{', '.join(missing)} not run" if missing else "no successful runs"
            lines.append(f"- {g.text()}: **not measured** ({why})")
            continue
        verdict = "met" if ratio >= g.target else "missed"
        ip = speed_ratio(w, b, inproc=True)
        extra = f"; in-process {ip:.2f}x" if ip is not None else ""
        lines.append(f"- {g.text()}: **{verdict}** — {ratio:.2f}x (wall-clock medians{extra})")
    w, c = warmpod_of(results, "http"), results.get("curl")
    ratio = speed_ratio(w, c if c and c.samples else None)
    if ratio is not None:
        lines.append(f"- http: no goal set — warmpod is {ratio:.2f}x curl")
    return lines


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def results_table(results: dict[str, ToolResult], model_bytes: int) -> str:
    head = (
        "| path | tool | median s | MiB/s | in-proc s | vs ref | warmpod ÷ this | min-max s | runs |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---:|"
    )
    rows = [head]
    for path in PATHS:
        ref = results.get(REFERENCE[path])
        ref = ref if ref and ref.samples else None
        w = warmpod_of(results, path)
        for r in (r for r in results.values() if r.tool.path == path):
            name = f"**{r.tool.label}**" if r.tool.is_warmpod else r.tool.label
            if not r.samples:
                rows.append(f"| {path} | {name} | failed: {r.error.replace('|', '/')[:80]} | | | | | | 0 |")
                continue
            vs_ref = speed_ratio(r, ref)
            mine = None if r.tool.is_warmpod else speed_ratio(w, r)
            rows.append(
                f"| {path} | {name} | {fmt(r.median_s, '.2f')} | {fmt(r.mibps(model_bytes), '.0f')} | "
                f"{fmt(r.median_inproc_s, '.2f')} | {fmt(vs_ref, '.2f')}x | "
                f"{fmt(mine, '.2f') + 'x' if mine else '—'} | "
                f"{min(r.walls):.2f}-{max(r.walls):.2f} | {len(r.samples)} |"
            )
    return "\n".join(rows)


@dataclass
class Meta:
    command: str
    date: str
    machine: str
    model: str
    servers: str
    notes: list[str] = field(default_factory=list)


def machine_notes() -> str:
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False).stdout.split()
    packages = ("torch", "safetensors", "s3fs", "runai-model-streamer")
    return f"{machine_line(packages)}, curl {curl[1] if len(curl) > 1 else '?'}"


def fs_of(path: Path) -> str:
    """Filesystem type of the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def model_notes(model: Path, specs: Sequence[TensorSpec], where: Path) -> str:
    mix = ", ".join(f"{d} {n} tensors / {b / MiB:.0f} MiB" for d, (n, b) in sorted(dtype_mix(specs).items()))
    size = model.stat().st_size
    return (
        f"{size / GiB:.2f} GiB safetensors file ({size} bytes), {len(specs)} tensors: {mix}; "
        f"written once to a temporary dir under {where} ({fs_of(model)}, not tmpfs), uploaded once to each server"
    )


def markdown_section(meta: Meta, table: str, goals: list[str], png: Path | None, doc_dir: Path) -> str:
    parts = [
        MARK_START,
        "## Loader throughput: `warmpod load` vs cp / safetensors / s3fs / runai / curl",
        "",
        f"- Command: `{meta.command}`",
        f"- Date: {meta.date}",
        f"- Machine: {meta.machine}",
        f"- Model: {meta.model}",
        f"- Servers: {meta.servers}",
        *(f"- {n}" for n in meta.notes),
        "",
        table,
        "",
        "Goals (judged on wall-clock median throughput):",
        "",
        *goals,
        "",
    ]
    if png is not None:
        parts += [f"![load throughput]({Path(os.path.relpath(png, doc_dir)).as_posix()})", ""]
    parts.append(MARK_END)
    return "\n".join(parts)


def plot(results: dict[str, ToolResult], model_bytes: int, png: Path, title: str) -> Path | None:
    """Horizontal bars of median MiB/s per tool, grouped by path, with min/max whiskers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no chart: matplotlib missing (pip install -r bench/requirements.txt -c constraints.txt)")
        return None
    rows = [r for p in PATHS for r in results.values() if r.tool.path == p and r.samples]
    if not rows:
        return None
    labels = [f"{r.tool.path}: {r.tool.label}" for r in rows]
    med = [r.mibps(model_bytes) or 0.0 for r in rows]
    lo = [m - model_bytes / max(r.walls) / MiB for m, r in zip(med, rows, strict=True)]
    hi = [model_bytes / min(r.walls) / MiB - m for m, r in zip(med, rows, strict=True)]
    colors = [
        "#d62728" if r.tool.is_warmpod else {"local": "#1f77b4", "s3": "#2ca02c", "http": "#9467bd"}[r.tool.path]
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(y, labels)
    for yi, m, h in zip(y, med, hi, strict=True):
        ax.text(m + h, yi, f"  {m:.0f}", va="center", fontsize=8)
    ax.set_xlabel("MiB/s into /dev/shm (median wall-clock; whiskers: min/max)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__)
    ap.add_argument("--size-gib", type=float, default=2.0, help="model size in GiB (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="counted repetitions per tool (default 3, min 1)")
    ap.add_argument("--only", help="comma-separated tools or groups: " + ", ".join([*TOOL_BY_KEY, *ALIASES]))
    ap.add_argument("--workdir", default="/var/tmp", help="root-disk directory for the model and server data")
    ap.add_argument("--shm", default="/dev/shm", help="where the stores and copies go (tmpfs)")
    ap.add_argument("--model-dir", help="keep the generated model here and reuse it on later runs")
    ap.add_argument(
        "--warmpod-arg",
        action="append",
        default=[],
        help="extra argument for every `warmpod load` (repeatable), e.g. --warmpod-arg=--concurrency=8",
    )
    ap.add_argument("--timeout", type=float, default=0, help="per-run timeout in s (default 120 + 120 per GiB)")
    ap.add_argument(
        "--max-busy",
        type=float,
        default=0.25,
        help="before each run, wait for CPU use <= this share of all cores (default 0.25; 0: don't wait)",
    )
    ap.add_argument("--quiet-timeout", type=float, default=60, help="longest wait for --max-busy, s (60)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.size_gib <= 0:
        ap.error("--reps must be >= 1 and --size-gib > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (servers, /dev/shm)
    tools = select_tools(args.only)
    notes: list[str] = []
    if any(t.is_warmpod for t in tools):
        ok, why = warmpod_available()
        if not ok:
            log(f"warmpod CLI not available ({why}); measuring the baselines only")
            notes.append(f"warmpod not measured: `python -m warmpod load --help` failed ({why})")
            tools = [t for t in tools if not t.is_warmpod]
    if not tools:
        raise SystemExit("nothing to run")
    workdir = Path(args.workdir)
    if fs_of(workdir.resolve()) == "tmpfs":
        log(f"warning: {workdir} is tmpfs; the source should be on a real disk")
    specs = plan_model(int(args.size_gib * GiB))
    model_size = sum(s.nbytes for s in specs)
    if shutil.disk_usage(args.shm).free < 2.5 * model_size:
        raise SystemExit(
            f"{args.shm} has {shutil.disk_usage(args.shm).free / GiB:.1f} GiB free; need {2.5 * model_size / GiB:.1f}"
        )
    timeout_s = args.timeout or 120 + 120 * args.size_gib
    started = dt.datetime.now(dt.UTC)

    with contextlib.ExitStack() as stack:
        root = stack.enter_context(temp_dir(workdir, "warmpod-bench-"))
        root.chmod(0o755)  # nginx workers run as nobody
        shm_root = stack.enter_context(temp_dir(Path(args.shm), "warmpod-bench-"))
        model_dir = Path(args.model_dir).resolve() if args.model_dir else root / "src" / "model"
        model = ensure_model(model_dir, specs)
        model_dir.chmod(0o755)  # readable by nginx's workers (the parents are ours and 0755, or the user's)
        model.chmod(0o644)
        model_desc = model_notes(model, specs, Path(args.model_dir) if args.model_dir else workdir)
        ctx = Ctx(
            model=model,
            model_bytes=model.stat().st_size,
            tensor_bytes=data_bytes(model),
            warmpod_args=list(args.warmpod_arg),
        )
        servers: list[str] = []
        if any(t.path == "s3" for t in tools):
            s3 = stack.enter_context(SeaweedServer(mode="server", workdir=root / "seaweed"))
            s3.create_bucket(BUCKET)
            t0 = time.perf_counter()
            s3.upload_file(BUCKET, S3_KEY, model, part_size=64 * MiB)
            log(f"SeaweedFS {s3.version} at {s3.endpoint}; uploaded in {time.perf_counter() - t0:.1f}s")
            ctx.s3_uri, ctx.s3_env = f"s3://{BUCKET}/{S3_KEY}", s3.env()
            servers.append(
                f"SeaweedFS {s3.version}: `weed server -filer -s3`, one process, data on the "
                f"{fs_of(root)} root disk, path-style S3, one access key, 127.0.0.1 only"
            )
        if any(t.path == "http" for t in tools):
            web = stack.enter_context(NginxStatic(root, model_dir))
            ctx.http_url = f"{web.url}/{MODEL_FILE}"
            servers.append(f"{web.version}: 2 workers, sendfile on, access_log off, 127.0.0.1 only")
        t = read_fully(model)
        log(f"source warmed: read {ctx.model_bytes / GiB:.2f} GiB in {t:.2f}s")
        log(f"running {len(tools)} tools x ({args.reps} reps + 1 warm-up): {', '.join(x.key for x in tools)}")
        load_before = os.getloadavg()[0]
        t_runs = time.perf_counter()
        quiet = Quiet(args.max_busy, args.quiet_timeout)
        results = run_all(tools, ctx, shm_root, args.reps, timeout_s, quiet)
        notes.append(quiet_note(results, quiet))
        notes.append(
            f"Timed rounds took {time.perf_counter() - t_runs:.0f}s; 1-min load average "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (includes the benchmark itself; "
            "other processes on the machine were not stopped)."
        )

    meta = Meta(
        command=command_line(__file__, argv),
        date=started.strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_notes(),
        model=model_desc,
        servers="; ".join(servers) or "none (local only)",
        notes=[
            "Source page cache warm for every tool (model file read fully once before timing); one uncounted "
            "warm-up round (also spot-checks copies against the source), then interleaved rounds with the "
            "order rotated each round; each run writes a fresh dir on /dev/shm that is deleted right after.",
            "Times are wall-clock per process (spawn to exit, interpreter and imports included); "
            "\"in-proc s\" is the tool's own timer (warmpod's JSON `seconds`, the Python baselines' work "
            'after imports). MiB/s = model file size / median wall time. "vs ref" = this tool\'s speed ÷ '
            'the path\'s reference (local: cp, s3: runai + write, http: curl); "warmpod ÷ this" = how many '
            "times faster warmpod is than this tool.",
            "Threads: OMP_NUM_THREADS=MKL_NUM_THREADS=1 for every child and torch.set_num_threads(1) in the "
            "torch-based tools; I/O concurrency at each tool's default"
            + (f"; warmpod extra args: `{' '.join(ctx.warmpod_args)}`" if ctx.warmpod_args else "")
            + ". runai env: AWS_ENDPOINT_URL, AWS_EC2_METADATA_DISABLED=true, "
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0.",
            *notes,
        ],
    )
    table = results_table(results, ctx.model_bytes)
    goals = goal_lines(results)
    png = (
        plot(
            results,
            ctx.model_bytes,
            Path(args.png),
            f"{ctx.model_bytes / GiB:.2f} GiB model → /dev/shm, {os.cpu_count()} cores, median of {args.reps}",
        )
        if args.png
        else None
    )
    print(table)
    print()
    print("\n".join(goals))
    if args.out:
        update_section(
            Path(args.out),
            MARK_START,
            MARK_END,
            markdown_section(meta, table, goals, png, Path(args.out).resolve().parent),
        )
        log(f"updated {args.out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "meta": asdict(meta),
                    "model_bytes": ctx.model_bytes,
                    "results": {
                        k: {"samples": [asdict(s) for s in r.samples], "error": r.error} for k, r in results.items()
                    },
                },
                indent=2,
            )
        )
    return 0 if all(r.samples for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
