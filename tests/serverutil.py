"""The warmpod server in a subprocess (for signals, restarts and real clients), staging models for it, load on it,
and its /metrics read (Scrape) or written by hand (MetricsPage)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.cliutil import cli_env, warmpod_cmd
from tests.servers import ServerStartError, wait_until
from warmpod.loader.load import LoadRequest, load
from warmpod.pods.lines import LISTENING_LINE
from warmpod.server.metrics import ServerMetrics


def stage(source: Path, store: Path, model: str) -> str:
    """Stage a local model directory into `store` with the loader (in process) and return the version."""
    result = asyncio.run(load(LoadRequest(uri=str(source), model=model, root=store)))
    return result.version


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One plain HTTP request (urllib): status, headers, body — error statuses included, no exception."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, payload: Any, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    status, _, body = http("POST", url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout)
    return status, json.loads(body)


class LoggedProcess:
    """A child process with its stdout and stderr in one log file, started once a line matching `started` is in that
    log (exiting first is an error that shows the log), and stopped as a pod stops a container: SIGTERM, then SIGKILL
    after a grace period."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        log_path: Path,
        started: re.Pattern[str],
        name: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 30,
    ) -> None:
        self.argv, self.log_path, self.started, self.name = [str(a) for a in argv], log_path, started, name
        self.env, self.cwd, self.stop_timeout = env, cwd, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.match: re.Match[str] | None = None  # the `started` line, once seen

    def start(self, timeout: float = 60) -> Self:
        """Spawn the process and wait for its `started` line; if that fails, the process is stopped."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            self.match = self.wait_for(self.started, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for(self, pattern: re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the log, once there; ServerStartError if the process exits first."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            self.check_alive()
            match = pattern.search(self.log())
            found[:] = [match] if match else []
            return bool(found)

        wait_until(seen, timeout=timeout, what=f"{self.name} ({pattern.pattern})", interval=0.02, diagnostics=self.log)
        return found[0]

    def check_alive(self) -> None:
        """Raise ServerStartError, with the log, if the process has exited."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is not None:
            raise ServerStartError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM (unless it has exited already), SIGKILL after `stop_timeout` s: the exit code (None if never
        started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess(LoggedProcess):
    """Any command line that runs warmpod's HTTP server, on a free port (port 0, read back from its 'listening on'
    line), started once /v2/health/ready answers 200 (or only listening, with `wait_ready=False`)."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        log_path: Path,
        name: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(argv, log_path=log_path, started=LISTENING_LINE, name=name, env=env, cwd=cwd)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, *, wait_ready: bool = True) -> Self:
        deadline = time.monotonic() + timeout
        super().start(timeout)
        assert self.match is not None
        self.port = int(self.match.group(2))
        if wait_ready:
            try:
                self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
            except BaseException:
                self.stop()
                raise
        return self

    def ready(self) -> bool:
        try:
            return http("GET", self.url + "/v2/health/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        def ready_or_dead() -> bool:
            self.check_alive()
            return self.ready()

        wait_until(ready_or_dead, timeout=timeout, what=f"{self.name} (ready)", diagnostics=self.log)


class WarmpodServer(ServerProcess):
    """`warmpod serve` from this checkout as a child process (see ServerProcess)."""

    def __init__(
        self,
        store: Path,
        model: str,
        *args: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        command: Sequence[str | Path] | None = None,
    ) -> None:
        self.store, self.model = store, model
        command = command or ("serve", "--model", model, "--store", store)
        log_path = log_dir / f"serve-{model}-{time.monotonic_ns()}.log"
        argv = warmpod_cmd(*command, "--port", "0", *args)
        super().__init__(argv, log_path=log_path, name="warmpod serve", env=cli_env(env))

    @classmethod
    def edge(cls, bundle: Path, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> WarmpodServer:
        """`warmpod edge serve BUNDLE_OR_MODEL` instead (same protocol, same handling here)."""
        server = cls(bundle, bundle.name, *args, log_dir=log_dir, env=env, command=("edge", "serve", bundle))
        server.name = "warmpod edge serve"
        return server


class LoadThread:
    """A bounded closed-loop load on one URL from a background thread: `workers` clients, each sending the same
    JSON body on a new connection (so SO_REUSEPORT spreads them over the servers sharing a port), pausing `pause_s`
    between requests, until `stop()`, `max_requests` in total, or `max_seconds`. Every outcome is kept in `results` as
    (monotonic time sent, monotonic time answered, status or exception name, parsed JSON body or None,
    response headers).
    """

    def __init__(self, url: str, payload: Any, *, workers: int = 4, max_requests: int = 2000,
                 max_seconds: float = 60, stop_on_status: int | None = None, method: str = "POST",
                 pause_s: float = 0.0) -> None:  # fmt: skip
        import threading

        self.url, self.body = url, json.dumps(payload).encode()
        self.workers, self.max_requests, self.max_seconds = workers, max_requests, max_seconds
        self.stop_on_status, self.method, self.pause_s = stop_on_status, method, pause_s
        self.results: list[tuple[float, float, int | str, Any, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> LoadThread:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float, int | str, Any, dict[str, str]]]:
        self._stop.set()
        return self.wait()

    def wait(self) -> list[tuple[float, float, int | str, Any, dict[str, str]]]:
        """Until the load ends by itself (request count or time limit)."""
        self._thread.join(self.max_seconds + 30)
        return self.results

    def count(self, status: int | str) -> int:
        return sum(1 for r in list(self.results) if r[2] == status)

    async def _main(self) -> None:
        import aiohttp

        deadline = time.monotonic() + self.max_seconds
        # A fresh connection per request: after the server closes its socket, a new request is refused cleanly
        # instead of being written onto a kept-alive connection the server is closing.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def worker() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline and len(self.results) < self.max_requests:
                    sent = time.monotonic()
                    try:
                        body_or_none = self.body if self.method == "POST" else None
                        async with session.request(
                            self.method, self.url, data=body_or_none, headers={"Content-Type": "application/json"}
                        ) as r:
                            body = await r.read()
                            status: int | str = r.status
                            parsed = json.loads(body) if body.startswith(b"{") else None
                            headers = dict(r.headers)
                    except (aiohttp.ClientError, OSError, TimeoutError) as e:
                        status, parsed, headers = type(e).__name__, None, {}
                    self.results.append((sent, time.monotonic(), status, parsed, headers))
                    if self.stop_on_status is not None and status == self.stop_on_status:
                        return
                    if self.pause_s:
                        await asyncio.sleep(self.pause_s)

            await asyncio.gather(*(worker() for _ in range(self.workers)))


class Scrape:
    """One GET /metrics, parsed by prometheus_client: families by name, sample values by name and labels."""

    def __init__(self, url: str) -> None:
        status, headers, body = http("GET", url + "/metrics", timeout=5)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels` (0 when there is none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def buckets(self, family: str, **labels: str) -> dict[float, float]:
        """le → cumulative count of one histogram series."""
        return {
            float(s.labels["le"]): s.value
            for s in self.samples
            if s.name == family + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
        }


class MetricsPage:
    """A server's /metrics as the real server writes it (ServerMetrics on a fresh registry, rendered by
    generate_latest), with the requests and forward passes it served recorded by hand."""

    def __init__(self, model: str, workers: int) -> None:
        self.model = model
        self.metrics = ServerMetrics(CollectorRegistry())
        self.metrics.workers.set(workers)

    def serve(self, requests: int, latency_s: float, *, batches: int = 0, batch_s: float = 0.0,
              code: str = "200") -> MetricsPage:  # fmt: skip
        """`requests` inference requests answered `code` in `latency_s` each, and `batches` forward passes of
        `batch_s` each."""
        for _ in range(requests):
            self.metrics.request_seconds.labels(self.model, "infer", code).observe(latency_s)
        for _ in range(batches):
            self.metrics.batch_seconds.labels(self.model).observe(batch_s)
        return self

    def text(self) -> str:
        return generate_latest(self.metrics.registry).decode()
