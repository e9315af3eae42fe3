"""`warmpod load`: the sidecar command. One-shot by default; `--watch` keeps it running as a native sidecar.

Output: the published version as one JSON object on stdout; events as JSON lines on stderr (a progress bar
instead when stderr is a terminal). Exit codes: 0 published (or stopped by SIGTERM), 2 usage, 3 not found,
4 access denied, 5 invalid model, 6 integrity (digest/size/source changed), 7 store too small, 8 transient
failures outlasted the retries, 9 another loader holds the model's lock, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tqdm import tqdm

from warmpod.cliargs import size_arg
from warmpod.errors import UsageError, WarmpodError
from warmpod.loader.convert import CHOICES, ConvertedLayout, check_converter, target_dtype
from warmpod.loader.load import LoadEvents, LoadRequest, LoadResult, load
from warmpod.loader.metrics import LoaderMetrics
from warmpod.loader.plan import DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY, DEFAULT_MAX_BUFFER_BYTES
from warmpod.loader.sources import SourceFile, redact
from warmpod.loader.stream import StreamSettings
from warmpod.store import DEFAULT_ROOT, check_model_name, current_version, read_manifest

if TYPE_CHECKING:
    from aiohttp import web


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmpod load",
        description="Stream a safetensors model into the shared-memory store and publish it atomically.",
    )
    p.add_argument("source", help="local path, s3://, gs://, az:// or http(s):// URL of a .safetensors file or dir")
    p.add_argument("--model", required=True, help="model name in the store")
    p.add_argument(
        "--store",
        type=Path,
        default=Path(os.environ.get("WARMPOD_STORE", DEFAULT_ROOT)),
        help=f"store root (default $WARMPOD_STORE or {DEFAULT_ROOT})",
    )
    p.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="FILE=HEX",
        help="pin a file's sha256 (computed while streaming); repeatable",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"range requests in flight (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--chunk-size",
        type=size_arg,
        default=DEFAULT_CHUNK_SIZE,
        help="bytes per range request, e.g. 16MiB (default 16MiB)",
    )
    p.add_argument(
        "--max-buffer",
        type=size_arg,
        default=DEFAULT_MAX_BUFFER_BYTES,
        help="most bytes of range data held in memory at once (default 256MiB)",
    )
    p.add_argument(
        "--dtype",
        choices=CHOICES,
        help="convert floating-point tensors (F64/F32/F16) to this dtype while staging: bf16 halves the store and runs "
        "about 2x faster on CPUs with AVX512-BF16; integer tensors stay as they are. A separate version from the "
        "as-is staging of the same source. Converts with numpy (the loader image has it). fp16 is refused: slower "
        "than fp32 on CPU. Default: tensors as the source has them",
    )
    p.add_argument("--keep", type=int, default=2, help="published versions to keep (default 2)")
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="keep running: poll the source every SECONDS and publish new versions",
    )
    p.add_argument("--port", type=int, help="serve /healthz, /ready and /metrics on this port")
    p.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1)")
    return p


def parse_request(args: argparse.Namespace) -> LoadRequest:
    pins: dict[str, str] = {}
    for item in args.sha256:
        rel, sep, hexdigest = item.partition("=")
        if not sep or not rel:
            raise UsageError(f"--sha256 {item!r}: expected FILE=HEX, e.g. model.safetensors=3b1f…")
        pins[rel] = hexdigest
    if args.watch is not None and args.watch <= 0:
        raise UsageError(f"--watch must be a positive number of seconds, got {args.watch}")
    try:
        settings = StreamSettings(
            concurrency=args.concurrency, chunk_size=args.chunk_size, max_buffer_bytes=args.max_buffer
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    dtype = None
    if args.dtype is not None:
        dtype = target_dtype(args.dtype)
        check_converter()
    return LoadRequest(
        dtype=dtype,
        uri=args.source,
        model=check_model_name(args.model),
        root=args.store,
        sha256=pins,
        settings=settings,
        keep=args.keep,
        cgroup_root=Path(os.environ.get("WARMPOD_CGROUP_ROOT", "/sys/fs/cgroup")),
    )


class CliEvents(LoadEvents):
    """Load events → metrics, and a progress bar (terminal) or one JSON line per event (logs)."""

    def __init__(self, metrics: LoaderMetrics, stream: TextIO) -> None:
        self.metrics, self.stream = metrics, stream
        self.tty = stream.isatty()  # a person is watching: a progress bar, no JSON lines
        self.bar: tqdm[Any] | None = None
        self.last_version: str | None = None  # a watching sidecar logs a version once, not every poll

    def log(self, event: str, **fields: Any) -> None:
        if not self.tty:
            record = {"ts": round(time.time(), 3), "event": event, **fields}
            print(json.dumps(record), file=self.stream, flush=True)

    def started(self, uri: str, model: str, files: list[SourceFile], to_copy: int) -> None:
        if self.tty and to_copy:
            # A bare pty reports 0x0, which tqdm takes as "no room" and prints nothing; this falls back to 80x24.
            columns, lines = shutil.get_terminal_size()
            self.bar = tqdm(
                total=to_copy,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=model,
                file=self.stream,
                ncols=columns,
                nrows=lines,
            )
        self.log("load_started", source=redact(uri), model=model, files=len(files), bytes_to_copy=to_copy)

    def bytes_done(self, n: int) -> None:
        self.metrics.bytes.inc(n)
        if self.bar is not None:
            self.bar.update(n)

    def retry(self, where: str, attempt: int, delay: float, error: str) -> None:
        self.metrics.retries.inc()
        self.log("retry", where=where, attempt=attempt, delay_seconds=round(delay, 3), error=error)

    def file_done(self, rel: str, size: int, reused: bool) -> None:
        self.log("file_staged", file=rel, bytes=size, reused_from_staging=reused)

    def file_converted(self, rel: str, layout: ConvertedLayout, seconds: float) -> None:
        fields: dict[str, Any] = {"file": rel, "dtype": layout.target, "converted": layout.converted}
        fields |= {"kept": layout.kept, "bytes": layout.file_size, "seconds": round(seconds, 4)}
        if layout.identity:
            fields["note"] = f"no tensor to convert to {layout.target}: staged as the source has it"
        self.log("file_converted", **fields)

    def finished(self, result: LoadResult) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not result.reused:
            self.metrics.published.inc()
            self.metrics.load_seconds.observe(result.seconds)
            if result.bytes and result.seconds > 0:
                self.metrics.throughput.set(result.bytes / result.seconds)
        self.metrics.current.info({"model": result.model, "version": result.version, "digest": result.digest})
        if result.version != self.last_version:
            self.log("published" if not result.reused else "unchanged", **result.to_json())
        self.last_version = result.version

    def failed(self, error: WarmpodError) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.metrics.errors.labels(error.kind).inc()
        self.log("error", kind=error.kind, message=str(error))


def create_app(req: LoadRequest, registry: CollectorRegistry) -> web.Application:
    """/healthz: the process is alive. /ready: a version of the model is published. /metrics: Prometheus."""
    from aiohttp import web  # only with --port: a one-shot local load skips its ~80 ms import

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(_: web.Request) -> web.Response:
        version = current_version(req.root, req.model)
        if version is None:
            return web.json_response({"ready": False, "model": req.model}, status=503)
        return web.json_response({"ready": True, "model": req.model, "version": version})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


async def run(req: LoadRequest, watch: float | None, port: int | None, host: str, events: CliEvents) -> int:
    runner: web.AppRunner | None = None
    if port is not None:
        from aiohttp import web

        runner = web.AppRunner(create_app(req, events.metrics.registry), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        events.log("http_listening", host=host, port=port)
    try:
        existing = current_version(req.root, req.model)
        if existing is not None:
            digest = read_manifest(req.root, req.model, existing)["source"]["digest"]
            events.metrics.current.info({"model": req.model, "version": existing, "digest": digest})
        while True:
            try:
                result = await load(req, events)
            except WarmpodError as e:
                if watch is None or isinstance(e, UsageError):
                    raise
                events.failed(e)  # a watching sidecar keeps serving what is published and tries again
                if events.tty:
                    print(f"warmpod load: error: {e} (trying again in {watch:g} s)", file=sys.stderr)
            else:
                events.finished(result)
                if watch is None:
                    print(json.dumps(result.to_json()), flush=True)
                    return 0
            await asyncio.sleep(watch)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _main_async(req: LoadRequest, args: argparse.Namespace, events: CliEvents) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(req, args.watch, args.port, args.host, events)
    except asyncio.CancelledError:
        events.log("stopped", reason="signal")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    registry = CollectorRegistry()
    metrics = LoaderMetrics(registry)
    events = CliEvents(metrics, sys.stderr)
    try:
        req = parse_request(args)
        return asyncio.run(_main_async(req, args, events))
    except WarmpodError as e:  # the one place a load's error becomes its exit code
        events.failed(e)
        print(f"warmpod load: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
