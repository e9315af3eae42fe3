"""Shared by the benchmarks, on top of the support kit they share with the tests (tests.kit): model sizes planned
for a target size and generated once, the real MiniLM, servers timed to their first inference, and the machine they
ran on (is it quiet, what CPU did others use, the lines a report starts with).

    sizes = plan_mlp(1 << 30)                       # (4096, 4096, ..., 16): ~1 GiB of fp32 weights
    ensure_mlp(model_dir, sizes)                    # config.json + model.safetensors (tests.kit.models.write_mlp)
    stage(minilm_dir(), store, "minilm")            # tests.kit: models.minilm_dir, warmpod.stage
    with bench_server(warmpod_serve_argv(...)) as srv:
        timing = first_inference(srv, "m", input_size=4096, timeout_s=120)

Server processes are started in their own session and stopped with SIGTERM to the group (SIGKILL after 10 s).
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.kit.metrics import Scrape
from tests.kit.models import mlp_bytes, write_mlp
from tests.kit.warmpod import REPO, ServerProcess, child_env, warmpod_cmd

BENCH_DIR = REPO / "bench"
MiB = 1 << 20
GiB = 1 << 30
HOST = "127.0.0.1"
MODEL_FILE = "model.safetensors"
OUTPUT_SIZE = 16
CLS, SEP = 101, 102  # BERT's [CLS] and [SEP] ids (all-MiniLM-L6-v2's uncased vocabulary)
POLL_INTERVAL_S = 0.01  # between inference attempts while the server answers 503 (not ready)
QUIET_POLL_S = 10.0  # between looks at the machine while waiting for it to be quiet
# What the command line of another benchmark or test process holds (a benchmark, pytest, one of their servers).
BUSY_WORDS = ("pytest", "-m bench.", "bench/", "mlserver", "warmpod serve", "warmpod load", "weed ")
# Logged by the server once the model is ready (warmpod/server/app.py; not a line another program reads, so not in
# warmpod.pods.lines, where the "listening on" line the benchmarks also read is defined).
READY_LINE = re.compile(r"ready: model \S+ version \S+ \((\w+)\), cold start ([0-9.]+) s")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- models


def plan_mlp(target_bytes: int, width: int = 4096) -> tuple[int, ...]:
    """Layer sizes of an fp32 MLP with about `target_bytes` of weights: input -> width x k -> OUTPUT_SIZE.

    The square width x width layers make up the bulk; the input size is chosen to absorb the remainder, so
    0.1 GiB, 1 GiB and 4 GiB all come out within a few KiB of the target with one width.
    """
    square = width * width * 4
    tail = width * OUTPUT_SIZE * 4
    k = max(0, (target_bytes - tail) // square - 1)
    rest = target_bytes - tail - k * square
    input_size = max(1, round(rest / (width * 4)))
    return (input_size, *([width] * (k + 1)), OUTPUT_SIZE)


def ensure_mlp(model_dir: Path, sizes: Sequence[int]) -> Path:
    """Generate the model unless `model_dir` already holds one with exactly these layer sizes."""
    plan_file = model_dir / "plan.json"
    plan = json.dumps(list(sizes))
    if (model_dir / MODEL_FILE).exists() and plan_file.exists() and plan_file.read_text() == plan:
        log(f"reusing {model_dir} ({mlp_bytes(sizes) / GiB:.3f} GiB)")
        return model_dir
    t0 = time.perf_counter()
    write_mlp(model_dir, sizes)
    plan_file.write_text(plan)
    took = time.perf_counter() - t0
    log(f"wrote {model_dir} ({mlp_bytes(sizes) / GiB:.3f} GiB, {len(sizes) - 1} layers) in {took:.1f}s")
    return model_dir


def token_rows(rng: np.random.Generator, lengths: Iterable[int]) -> list[list[int]]:
    """One row of ids per length: [CLS], random ordinary word-piece ids, [SEP] (a MiniLM request without the
    tokenizer). The ids are drawn from `rng` row after row."""
    return [[CLS, *rng.integers(2000, 29000, n - 2).tolist(), SEP] for n in lengths]


def model_files(model_dir: Path) -> list[Path]:
    """What is served and uploaded: the weights and config.json (not the generator's plan.json)."""
    return [model_dir / "config.json", model_dir / MODEL_FILE]


def read_fully(path: Path, block: int = 16 * MiB) -> float:
    """Read a file once so that it sits in the page cache; the seconds that took."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def drop_from_page_cache(path: Path) -> None:
    """Evict one file's clean pages from the page cache (posix_fadvise DONTNEED: this file only, no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache (util-linux `fincore`), None where fincore is missing."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        return int(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- commands


# Every benchmark child gets the same environment: one OpenMP/MKL thread, unbuffered output, and tests.kit's
# child_env (the checkout importable, no AWS_* or WARMPOD_* leftovers).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return child_env({**ONE_THREAD, **(extra or {})})


def warmpod_serve_argv(model: str, store: Path, threads: int = 1) -> list[str]:
    return warmpod_cmd("serve", "--model", model, "--store", store, "--port", "0", "--threads", str(threads))


def disk_serve_argv(model: str, model_dir: Path, no_store: Path, weights: str = "copy", threads: int = 1) -> list[str]:
    """bench.baselines.disk_server: warmpod's server, weights read from `model_dir` (private copy, or mmap)."""
    return [sys.executable, "-m", "bench.baselines.disk_server", "--model-dir", str(model_dir), "--weights", weights,
            "--model", model, "--store", str(no_store), "--port", "0", "--threads", str(threads)]  # fmt: skip


def bench_parser(script: str, doc: str | None, *, results: bool = True) -> argparse.ArgumentParser:
    """The command line a benchmark starts from: its usage as it is run (`python -m bench.NAME`), its docstring, and
    where it writes: --out (BENCHMARKS.md, its section replaced) and, with `results`, --png and --json
    (bench/results/NAME.*); '' skips each."""
    name = Path(script).stem
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('' to skip)")
    if results:
        ap.add_argument("--png", default=str(BENCH_DIR / "results" / f"{name}.png"), help="chart ('' to skip)")
        ap.add_argument("--json", default=str(BENCH_DIR / "results" / f"{name}.json"), help="raw results ('' to skip)")
    return ap


def command_line(script: str | os.PathLike[str], argv: Sequence[str] | None) -> str:
    """How a benchmark was run, for its report: `python -m bench.NAME ARGS` (ARGS: `argv`, else this process's)."""
    module = ".".join(Path(script).resolve().relative_to(REPO).with_suffix("").parts)
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


# ----------------------------------------------------------------------------------------------- servers


class StartFailed(RuntimeError):
    pass


@dataclass
class StartTiming:
    """Seconds from just before spawning the server process."""

    listening_s: float  # the "listening on" line arrived on stderr
    first_ok_s: float  # the first inference answered 200
    ready_log_s: float | None = None  # the server's own "cold start X s" (process start -> model ready)
    model_load_s: float | None = None  # warmpod_model_load_seconds: torch import + map/load + build + warm-up
    attempts: int = 0  # inference requests sent until the first 200


def bench_server(argv: Sequence[str]) -> ServerProcess:
    """A server child of a benchmark (tests.kit's ServerProcess on port 0): the bench environment, its output kept in
    memory with each line's arrival time, its own process group, stopped with SIGTERM, SIGKILL after 10 s."""
    name = " ".join(argv[2:4]) if argv[1] == "-m" else argv[0]  # warmpod serve, bench.baselines.disk_server ...
    return ServerProcess(argv, name=name, env=bench_env(), cwd=REPO, own_group=True, stop_timeout=10)


def first_inference(server: ServerProcess, model: str, input_size: int, timeout_s: float) -> StartTiming:
    """Wait for the server's "listening" line, then POST /v2/models/{model}/infer until it answers 200 (503 = not
    ready); `server` may have been spawned only. The 200 response is checked: logits FP32 [1, OUTPUT_SIZE], finite.
    """
    if server.proc is None:
        server.spawn()
    deadline = server.started + timeout_s
    listening = server.wait_listening(timeout=max(0.0, deadline - time.monotonic()))
    body = json.dumps(infer_request(input_size)).encode()
    path = f"/v2/models/{model}/infer"
    conn = http.client.HTTPConnection(HOST, server.port, timeout=max(1.0, timeout_s))
    attempts = 0
    try:
        while True:
            attempts += 1
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status == 200:
                first_ok = time.monotonic()
                check_infer_response(payload)
                break
            if resp.status != 503:
                raise StartFailed(f"inference answered {resp.status}: {payload[:500]!r}")
            server.check_alive()
            if time.monotonic() > deadline:
                raise StartFailed(f"not ready after {timeout_s:.0f}s:\n{server.log_tail(3000)}")
            time.sleep(POLL_INTERVAL_S)
    finally:
        conn.close()
    return StartTiming(
        listening_s=listening - server.started,
        first_ok_s=first_ok - server.started,
        ready_log_s=_ready_log_seconds(server),
        model_load_s=model_load_seconds(server.url),
        attempts=attempts,
    )


def _ready_log_seconds(server: ServerProcess) -> float | None:
    """The server's own "cold start X s"; it logs it just before the model becomes visible to handlers, so it may come
    a moment after the first 200."""
    for _ in range(50):
        if (seen := server.first(READY_LINE)) is not None:
            return float(seen[1].group(2))
        time.sleep(0.01)
    return None


def model_load_seconds(url: str) -> float | None:
    """The sum of the warmpod_model_load_seconds histogram (one build so far: that build's seconds)."""
    name = "warmpod_model_load_seconds_sum"
    with contextlib.suppress(OSError):
        scrape = Scrape(url)
        if any(s.name == name for s in scrape.samples):
            return scrape.total(name)
    return None


def infer_request(input_size: int, seed: int = 0) -> dict[str, object]:
    x = np.random.default_rng(seed).standard_normal(input_size).astype(np.float32)
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, input_size], "data": x.tolist()}]}


def check_infer_response(payload: bytes) -> None:
    outputs = {o["name"]: o for o in json.loads(payload)["outputs"]}
    logits = outputs.get("logits")
    if logits is None or logits["shape"] != [1, OUTPUT_SIZE]:
        raise StartFailed(f"unexpected inference response: {payload[:300]!r}")
    if not np.all(np.isfinite(np.asarray(logits["data"], dtype=np.float64))):
        raise StartFailed("inference returned non-finite logits")


# ----------------------------------------------------------------------------------------------- machine


def pss_bytes(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as bytes: Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem, Private_*, Shared_*..."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _is_ours(pid: int) -> bool:
    """Whether `pid` is this process, one of its ancestors, or one of its descendants (our own servers)."""
    me = os.getpid()
    ancestors = set()
    p = me
    for _ in range(64):
        ancestors.add(p)
        p = _ppid(p)
        if p <= 1:
            break
    if pid in ancestors:
        return True
    p = pid
    for _ in range(64):
        p = _ppid(p)
        if p == me:
            return True
        if p <= 1:
            return False
    return False


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def busy_processes() -> list[str]:
    """Other benchmark or test processes running now (pytest, python -m bench.*, servers), not counting our own."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _is_ours(int(entry.name)):
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if any(word in cmd for word in BUSY_WORDS):
                found.append(f"{entry.name}: {cmd[:100]}")
    return found


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every live process: fields[0] is the state,
    [1] the parent, [2] the process group, [11:15] utime stime cutime cstime in ticks."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if len(fields) >= 15:  # every field the callers index
                    yield int(entry.name), fields


def _tree_jiffies(root: int) -> int:
    """CPU ticks of `root` and its live descendants, including the children they have already reaped."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for pid, fields in _proc_stats():
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in the process group `pgid` (a server and its workers;
    not the children they have reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(fields[11]) + int(fields[12])) / tick for _, fields in _proc_stats() if int(fields[2]) == pgid)


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu[:3]) + sum(cpu[5:7])  # user nice system + irq softirq (not idle, iowait, steal)


def busy_cpu_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq: not idle, iowait or
    steal), from /proc/stat."""
    return _busy_jiffies() / os.sysconf("SC_CLK_TCK")


def wait_cpu_quiet(max_busy: float, timeout_s: float) -> float:
    """Block (bounded by timeout_s) until at most `max_busy` of all cores are busy over a second; return the last
    share seen. The machine is shared: a test suite or another benchmark beside this one would be measured too."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + timeout_s
    while True:
        t0, busy0 = time.monotonic(), busy_cpu_seconds()
        time.sleep(1.0)
        busy = (busy_cpu_seconds() - busy0) / (time.monotonic() - t0) / cores
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy


class OthersCpu:
    """How much CPU the rest of the machine used while we measured (everything but this process tree)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.mine0 = _busy_jiffies(), _tree_jiffies(os.getpid())

    def cores(self) -> float:
        """Average number of cores busy with other processes since construction."""
        hz = os.sysconf("SC_CLK_TCK")
        others = (_busy_jiffies() - self.busy0) - (_tree_jiffies(os.getpid()) - self.mine0)
        return max(0.0, others / hz / max(1e-9, time.monotonic() - self.t0))


def wait_quiet(max_load: float | None, timeout_s: float) -> tuple[bool, str]:
    """Wait (bounded) until no other bench/test process runs and the 1-min load average is below `max_load`
    (None: whatever the load, e.g. in the middle of a benchmark, whose own servers make it); say what was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = os.getloadavg()[0]
        others = busy_processes()
        if (max_load is None or load < max_load) and not others:
            if max_load is None:
                return True, "no other bench/test process running"
            return True, f"machine quiet: 1-min load average {load:.2f}, no other bench/test process running"
        if time.monotonic() > deadline:
            if max_load is None:
                return False, f"other bench/test processes were running: {'; '.join(others[:4])}"
            return False, (
                f"machine NOT quiet after waiting {timeout_s:.0f}s: 1-min load average {load:.2f}"
                + (f", other processes: {'; '.join(others[:4])}" if others else "")
            )
        log(f"waiting for a quiet machine: load {load:.2f}, {len(others)} other bench/test process(es)")
        time.sleep(QUIET_POLL_S)


def machine_line(packages: Sequence[str] = ("torch", "safetensors", "aiohttp", "boto3")) -> str:
    """CPU, RAM, /dev/shm, kernel and the versions of `packages` (what a benchmark's numbers depend on), in one line."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")), 0)
    versions = []
    for pkg in packages:
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem / GiB:.1f} GiB RAM, /dev/shm tmpfs "
        f"{shutil.disk_usage('/dev/shm').total / GiB:.1f} GiB; Linux {platform.release()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}"
    )


def git_revision() -> str:
    """HEAD's short hash, plus a note when the code measured (server/, loader/, wasm/, warmpod/) has uncommitted
    changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "server", "loader", "wasm", "warmpod")
    return f"{head} (with uncommitted changes in server/, loader/, wasm/ or warmpod/)" if dirty else head


def update_section(doc: Path, start: str, end: str, section: str) -> None:
    """Replace the text between the `start` and `end` markers in `doc` (append the section if they are absent)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


@contextlib.contextmanager
def temp_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under `parent`, removed with everything in it when the block ends."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def median(values: Sequence[float]) -> float:
    import statistics

    return statistics.median(values)
