"""`warmpod up`'s supervisor: the loader and `warmpod serve` workers as child processes sharing one port, scaled by
the autoscaling policy (`warmpod.pods.policy`) from each worker's own /metrics, with a status line, a /status page and
the fleet's /metrics (every worker's, labelled `worker`).

The decisions are the policy's; this module observes (scrapes every ready worker's private metrics port), acts
(starts workers, drains the newest on scale-down, replaces workers that die) and reports. Workers that are still
starting count as replicas, so a slow start is not answered by starting more; while one is starting, the
supervisor starts no other (it holds the policy's scale-up until the started worker is ready). Before anything
starts, the source is resolved as `warmpod load` resolves it, so a missing one fails with the loader's message and
exit code instead of after a worker was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from warmpod.errors import WarmpodError
from warmpod.pods.lines import LISTENING_LINE, METRICS_LINE
from warmpod.pods.policy import (
    Decision,
    PolicyConfig,
    PolicyState,
    ReplicaSample,
    Snapshot,
    format_latency,
    observe_replica,
    parse_families,
    snapshot_from_families,
    supervise,
)
from warmpod.pods.process import die_with_parent, reserve_port
from warmpod.store import current_version

log = logging.getLogger("warmpod.up")

SCRAPE_TIMEOUT_S = 1.0  # a worker that does not answer its metrics within this is unknown for the tick
STOP_MARGIN_S = 5.0  # on stop, how long past the workers' drain grace to wait before killing them
LOADER_STOP_S = 10.0
QUIET_STATUS_S = 30.0  # an unchanged status line is logged again after this long (a changed one at once)

Phase = Literal["starting", "ready", "draining"]
HttpGet = Callable[[str], Awaitable[tuple[int, str]]]  # url → (status, body); raises on connection errors
SCRAPE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ValueError)


@dataclass(frozen=True)
class UpConfig:
    source: str
    model: str
    store: Path
    policy: PolicyConfig
    host: str = "127.0.0.1"
    port: int = 8080
    interval_s: float = 1.0
    watch_s: float | None = None  # the loader keeps watching the source (None: one load)
    dtype: str | None = None  # the loader's --dtype (bf16): floating-point tensors converted while staging
    status_port: int = 0
    serve_args: tuple[str, ...] = ()  # passed to every `warmpod serve`
    drain_grace_s: float = 25.0  # the workers' --drain-grace: how long stopping waits for them
    python: str = sys.executable
    flags: Mapping[str, str] = field(default_factory=dict)  # policy setting → the flag that set it, for the reasons

    def warmpod(self) -> list[str]:
        """`warmpod` as this interpreter runs it; -P: the user's working directory is not put on sys.path, so a
        `warmpod.py` (or `server.py`, ...) there cannot shadow the package in the children."""
        return [self.python, "-P", "-m", "warmpod"]

    def loader_command(self) -> list[str]:
        cmd = [*self.warmpod(), "load", self.source, "--model", self.model, "--store", str(self.store)]
        cmd += ["--dtype", self.dtype] if self.dtype is not None else []
        return cmd + (["--watch", f"{self.watch_s:g}"] if self.watch_s is not None else [])

    def worker_command(self, port: int) -> list[str]:
        return [*self.warmpod(), "serve", *self.own_serve_args(port), *self.serve_args]

    def own_serve_args(self, port: int) -> list[str]:
        """The `warmpod serve` arguments `warmpod up` sets on every worker (the user's `serve_args` may not)."""
        q, target_ms = self.policy.slo_quantile, self.policy.slo_target_s * 1000
        return ["--model", self.model, "--store", str(self.store), "--host", self.host, "--port", str(port),
                "--reuse-port", "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                "--slo-target-ms", f"{target_ms:g}", "--slo-quantile", f"{q:g}"]  # fmt: skip


class ChildProcess(Protocol):
    """What the supervisor uses of a child (asyncio's Process; tests pass a fake)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...
    async def wait(self) -> int: ...


@dataclass(eq=False)
class Worker:
    name: str
    process: ChildProcess
    started_at: float
    phase: Phase = "starting"
    metrics_port: int | None = None  # its private port (from its "metrics and health on" line)
    snapshot: Snapshot | None = None  # its last readable scrape
    families: list[Metric] | None = None  # that scrape's metric families, for /metrics; None while unknown
    unknown: str | None = None  # why its last scrape failed; None while its metrics are readable
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.process.pid, "phase": self.phase, "metrics_port": self.metrics_port,
                "unknown": self.unknown}  # fmt: skip


class Supervisor:
    """One `warmpod up`: `run()` until a signal (or a fatal error), `tick()` each interval."""

    def __init__(self, config: UpConfig, *, clock: Callable[[], float] = time.monotonic,
                 http_get: HttpGet | None = None) -> None:  # fmt: skip
        self.config, self.clock = config, clock
        self.http_get = http_get or self._aiohttp_get
        self.workers: list[Worker] = []
        self.target = config.policy.min_replicas
        self.state = PolicyState()
        self.decision: Decision | None = None
        self.reason = "starting"
        self.port = config.port  # the shared port, once reserved (config.port 0 picks one)
        self.exit_code = 0
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._loader: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._count = 0
        self._spawning = 0  # workers whose process is being created (not in self.workers yet)
        self._last_line, self._last_logged = "", -float("inf")

    # ------------------------------------------------------------------------------------ observe, decide, act

    async def tick(self) -> None:
        """Scrape the ready workers, ask the policy, start or drain workers, report."""
        now = self.clock()
        samples = await self.observe()
        active = self.active()
        ready, starting = sum(w.phase == "ready" for w in active), [w.name for w in active if w.phase == "starting"]
        tick = supervise(samples, ready, starting, self.state, now, self.config.policy, self.config.flags)
        self.state, self.reason = tick.state, tick.reason
        if tick.decision is not None:
            self.decision = tick.decision
        if tick.replicas is not None:
            self.target = tick.replicas
        self.reconcile()
        line = self.status_line()
        if line != self._last_line or now - self._last_logged >= QUIET_STATUS_S:
            log.info("%s", line)
            self._last_line, self._last_logged = line, now

    async def observe(self) -> list[ReplicaSample]:
        """One sample per ready worker that has a previous scrape; an unreadable one is unknown (ok=False)."""
        ready = [w for w in self.workers if w.phase == "ready"]
        scraped = await asyncio.gather(*(self.scrape(w) for w in ready))
        samples = []
        for worker, result in zip(ready, scraped, strict=True):
            if isinstance(result, str):
                if worker.unknown is None:
                    log.warning("%s: metrics unreadable (%s); unknown until they are: no scale-down meanwhile",
                                worker.name, result)  # fmt: skip
                worker.unknown = result
            elif worker.unknown is not None:
                log.info("%s: metrics readable again", worker.name)
                worker.unknown = None
            scrape, worker.families = (None, None) if isinstance(result, str) else result
            sample, worker.snapshot = observe_replica(worker.name, worker.snapshot, scrape)
            if sample is not None:
                samples.append(sample)
        return samples

    async def scrape(self, worker: Worker) -> tuple[Snapshot, list[Metric]] | str:
        """The worker's metrics (what the policy reads, and the families /metrics shows), or why they could not be
        read."""
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        try:
            status, text = await self.http_get(url)
            if status != 200:
                return f"HTTP {status} from {url}"
            families = parse_families(text)
            return snapshot_from_families(families, self.clock()), families
        except ValueError as e:
            return f"not a warmpod server's metrics at {url}: {e}"
        except SCRAPE_ERRORS as e:
            return f"{url} unreachable: {type(e).__name__}{f': {e}' if str(e) else ''}"

    def active(self) -> list[Worker]:
        """The workers that count as replicas: starting or ready, not draining."""
        return [w for w in self.workers if w.phase != "draining"]

    def reconcile(self) -> None:
        """Start workers up to the target, or drain the surplus (those still starting first, then the newest)."""
        if self.stopping:
            return
        active = self.active()
        for _ in range(self.target - len(active)):
            self.start_worker()
        surplus = sorted(active, key=lambda w: (w.phase == "ready", -w.started_at))[: len(active) - self.target]
        for worker in surplus:
            log.info("draining %s (pid %d): %s", worker.name, worker.process.pid, self.reason)
            self.drain(worker)

    def drain(self, worker: Worker) -> None:
        worker.phase = "draining"
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)  # it leaves the shared port, finishes its requests, exits 0

    # ------------------------------------------------------------------------------------------- processes

    def start_worker(self) -> None:
        self._count += 1
        name = f"w{self._count}"
        self._spawn(self._run_worker(name), name)

    async def _run_worker(self, name: str) -> None:
        self._spawning += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *self.config.worker_command(self.port), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, process_group=0,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            worker = Worker(name, process, self.clock())
            self.workers.append(worker)
        finally:
            self._spawning -= 1
        log.info("started %s (pid %d)", name, process.pid)
        if self.stopping:  # Ctrl-C came while it was being spawned
            self.drain(worker)
        assert process.stdout is not None
        await self._pump(worker, process.stdout)
        code = await process.wait()
        for task in worker.tasks:
            task.cancel()
        self.exited(worker, code)

    async def _pump(self, worker: Worker, stream: asyncio.StreamReader) -> None:
        """Forward the worker's output, prefixed with its name; learn from it its metrics port and when it is ready."""
        pending = b""
        while chunk := await stream.read(1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                match = METRICS_LINE.search(line) if worker.metrics_port is None else None
                if match:
                    worker.metrics_port = int(match.group(1))
                elif worker.phase == "starting" and worker.metrics_port is not None and LISTENING_LINE.search(line):
                    # Ready means taking connections: the worker joins the shared port only once its model is ready.
                    worker.phase = "ready"
                    log.info("%s ready after %.1f s", worker.name, self.clock() - worker.started_at)
                sys.stderr.write(f"[{worker.name}] {line}\n")
            sys.stderr.flush()
        if pending:
            sys.stderr.write(f"[{worker.name}] {pending.decode(errors='replace')}\n")

    def exited(self, worker: Worker, code: int) -> None:
        """A worker ended: drained as asked, failed to start (fatal: restarting would not help), or died (replaced)."""
        self.workers.remove(worker)
        if worker.phase == "draining":
            (log.info if code == 0 else log.warning)("%s stopped (exit %d)", worker.name, code)
        elif worker.phase == "starting":
            self.fail(code if code > 0 else 1, f"{worker.name} exited {code} before it was ready (its log is above)")
        else:
            log.warning("%s exited unexpectedly (code %d); starting a replacement", worker.name, code)
            self.reconcile()

    async def _run_loader(self) -> None:
        self._loader = loader = await asyncio.create_subprocess_exec(
            *self.config.loader_command(), stdin=asyncio.subprocess.DEVNULL, process_group=0,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        code = await loader.wait()
        if self.stopping:
            return
        if self.config.watch_s is not None:
            self.fail(code or 1, f"the watching loader exited {code}")
        elif code != 0:
            self.fail(code, f"warmpod load exited {code} (its error is above)")
        else:
            log.info("loaded %s into %s", self.config.model, self.config.store)

    def fail(self, code: int, message: str) -> None:
        if not self.stopping:
            log.error("%s; stopping", message)
            self.exit_code = code
            self.stop_requested.set()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s failed: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)
            self.fail(1, f"{task.get_name()} failed")

    # ------------------------------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        """Until SIGINT/SIGTERM (exit 0) or a fatal error (a loader or first start that failed: its exit code). A
        source the loader cannot resolve ends it before anything starts, with the loader's exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop_requested.set)
        try:
            reservation = reserve_port(self.config.host, self.config.port)
        except OSError as e:
            print(f"warmpod up: error: cannot listen on {self.config.host}:{self.config.port}: {e.strerror}",
                  file=sys.stderr)  # fmt: skip
            return 2
        self.port = reservation[0].getsockname()[1]
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            status_runner = web.AppRunner(create_status_app(self), access_log=None)
            await status_runner.setup()
            try:
                try:
                    await web.TCPSite(status_runner, "127.0.0.1", self.config.status_port).start()
                except OSError as e:
                    print(f"warmpod up: error: cannot listen on 127.0.0.1:{self.config.status_port} (--status-port): "
                          f"{e.strerror}", file=sys.stderr)  # fmt: skip
                    return 2
                status_port = status_runner.addresses[0][1]
                refused = await self._check_source()
                if refused is not None:
                    return refused
                policy = self.config.policy
                print(f"warmpod up: serving {self.config.model} on http://{self.config.host}:{self.port} with "
                      f"{policy.min_replicas}..{policy.max_replicas} workers; status on "
                      f"http://127.0.0.1:{status_port}/status, fleet metrics on "
                      f"http://127.0.0.1:{status_port}/metrics", file=sys.stderr, flush=True)  # fmt: skip
                self._spawn(self._run_loader(), "loader")
                self.reconcile()
                await self._loop()
            finally:
                await self._stop()
                await status_runner.cleanup()
                for s in reservation:
                    s.close()
        log.info("stopped")
        return self.exit_code

    async def _check_source(self) -> int | None:
        """None when the loader can resolve the source; else the exit code, its message printed as `warmpod load`
        prints it (0 when a signal came first: a slow remote listing does not hold Ctrl-C up)."""
        checking = asyncio.ensure_future(check_source(self.config.source))
        stopping = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait((checking, stopping), return_when=asyncio.FIRST_COMPLETED)
        for task in (checking, stopping):
            task.cancel()
        await asyncio.gather(checking, stopping, return_exceptions=True)
        if checking.cancelled():
            return 0
        error = checking.exception()
        if isinstance(error, WarmpodError):
            print(f"warmpod up: error: {error}", file=sys.stderr)
            return error.exit_code
        if error is not None:
            raise error
        return None

    async def _loop(self) -> None:
        next_tick = self.clock() + self.config.interval_s
        while not self.stop_requested.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), timeout=max(0.0, next_tick - self.clock()))
            if self.stop_requested.is_set():
                return
            next_tick = max(next_tick + self.config.interval_s, self.clock())
            await self.tick()

    async def _stop(self) -> None:
        """Every worker drains (bounded, then killed), then the loader stops."""
        self.stopping = True
        for worker in self.workers:
            self.drain(worker)
        if self.workers:
            log.info("stopping: %d worker(s) draining", len(self.workers))
        deadline = self.clock() + self.config.drain_grace_s + STOP_MARGIN_S
        while (self.workers or self._spawning) and self.clock() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self.workers):
            log.warning("%s did not stop in time; killing it", worker.name)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        loader = self._loader
        if loader is not None and loader.returncode is None:
            loader.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(loader.wait(), LOADER_STOP_S)
            except TimeoutError:
                loader.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _aiohttp_get(self, url: str) -> tuple[int, str]:
        assert self._session is not None
        async with self._session.get(url) as response:
            return response.status, await response.text()

    # ------------------------------------------------------------------------------------------------ report

    def status(self) -> dict[str, Any]:
        d, policy = self.decision, self.config.policy
        observed = d.observed_quantile_s if d is not None else None
        above = d is not None and d.observed_above_top_bucket  # observed is then only the top finite bound
        return {
            "model": self.config.model,
            "url": f"http://{self.config.host}:{self.port}",
            "version": current_version(self.config.store, self.config.model),
            "replicas": self.target,
            "ready": sum(w.phase == "ready" for w in self.workers),
            "starting": sum(w.phase == "starting" for w in self.workers),
            "draining": sum(w.phase == "draining" for w in self.workers),
            "workers": [w.as_json() for w in self.workers],
            "latency_ms": {
                "quantile": policy.slo_quantile,
                "target": policy.slo_target_s * 1000,
                "observed": None if observed is None or above else round(observed * 1000, 1),
                "observed_above": round(observed * 1000, 1) if observed is not None and above else None,
            },
            "demand_rps": None if d is None else round(d.demand_rps, 2),
            "capacity_rps": None if d is None or d.capacity_rps is None else round(d.capacity_rps, 2),
            "panicking": d is not None and d.panicking,
            "unknown": [w.name for w in self.workers if w.unknown is not None],
            "decision": self.reason,
            "stopping": self.stopping,
        }

    def status_line(self) -> str:
        s = self.status()
        counts = ", ".join(f"{k} {s[k]}" for k in ("ready", "starting", "draining") if s[k] or k == "ready")
        latency = s["latency_ms"]
        if latency["observed_above"] is not None:
            observed = format_latency(latency["observed_above"] / 1000, above_top_bucket=True)
        else:
            observed = "-" if latency["observed"] is None else format_latency(latency["observed"] / 1000)
        demand = "-" if s["demand_rps"] is None else f"{s['demand_rps']:.1f}"
        return (f"replicas {s['replicas']} ({counts}) version {s['version'] or '-'} "
                f"p{latency['quantile'] * 100:g} {observed} (target {latency['target']:g} ms) "
                f"demand {demand} rps: {s['decision']}")  # fmt: skip


async def check_source(uri: str) -> None:
    """Resolve the source as `warmpod load` does (the loader's `open_source`: a local path, s3://, gs://, az://,
    http(s)://, listed and checked the same way); raises the loader's error (SourceNotFound: exit 3, AccessDenied: 4,
    ...) when it cannot."""
    from warmpod.loader.sources import open_source  # the loader's fsspec stack, only when `warmpod up` runs

    source = await open_source(uri)
    await source.aclose()


WORKER_LABEL = "worker"


class FleetMetrics(Collector):
    """The status port's /metrics: each worker's last readable scrape (the one the policy read at the last tick, not
    a second scrape), every sample labelled `worker`="w1"...: a worker's counters stay its own series, so one that
    drains or dies does not make a fleet total go down (which Prometheus would read as a counter reset). Sum with
    `sum without (worker) (...)`. A worker whose last scrape failed (unknown) is left out until it is readable; a
    draining one (no longer scraped) shows its last scrape until it exits. Plus the supervisor's own counts:
    `warmpod_up_replicas`, `warmpod_up_workers{phase}`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        workers = self.supervisor.workers
        yield GaugeMetricFamily("warmpod_up_replicas", "Workers warmpod up is scaling to (the policy's decision)",
                                value=self.supervisor.target)  # fmt: skip
        phases = GaugeMetricFamily("warmpod_up_workers", "warmpod up's workers by phase", labels=["phase"])
        for phase in ("starting", "ready", "draining"):
            phases.add_metric([phase], sum(w.phase == phase for w in workers))
        yield phases
        merged: dict[str, Metric] = {}
        for worker in workers:
            for family in worker.families or ():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples += [s._replace(labels={**s.labels, WORKER_LABEL: worker.name}) for s in family.samples]
        yield from merged.values()


SUPERVISOR = web.AppKey("supervisor", Supervisor)
FLEET_REGISTRY = web.AppKey("fleet_registry", CollectorRegistry)


def create_status_app(supervisor: Supervisor) -> web.Application:
    """GET /status: the supervisor's status as JSON (replicas, workers, version, latency, the policy's decision).
    GET /metrics: the fleet's metrics (`FleetMetrics`), rendered by prometheus_client."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response(request.app[SUPERVISOR].status())

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[FLEET_REGISTRY])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app[SUPERVISOR] = supervisor
    app[FLEET_REGISTRY] = registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetMetrics(supervisor))
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app
