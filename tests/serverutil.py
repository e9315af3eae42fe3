"""The warmpod server in a subprocess (for signals, restarts and real clients), and staging models for it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loader.load import LoadRequest, load
from tests.cliutil import cli_env
from tests.servers import ServerStartError, wait_until

LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


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


class WarmpodServer:
    """`warmpod serve` as a child process on a free port (port 0, read back from its 'listening on' line)."""

    def __init__(self, store: Path, model: str, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.store, self.model, self.args = store, model, args
        self.command = ["serve", "--model", model, "--store", str(store)]
        self.log_path = log_dir / f"serve-{model}-{time.monotonic_ns()}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @classmethod
    def edge(cls, bundle: Path, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> WarmpodServer:
        """`warmpod edge serve BUNDLE_OR_MODEL` instead (same protocol, same handling here)."""
        server = cls(bundle, bundle.name, *args, log_dir=log_dir, env=env)
        server.command = ["edge", "serve", str(bundle)]
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout: float = 60) -> WarmpodServer:
        cmd = [sys.executable, "-m", "warmpod", *self.command, "--port", "0", *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=cli_env(self.env), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        started = time.monotonic()
        wait_until(
            self._listening, timeout=timeout, what="warmpod serve (listening)", interval=0.02, diagnostics=self.log
        )
        if wait_ready:
            self.wait_ready(timeout=max(1.0, timeout - (time.monotonic() - started)))
        return self

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerStartError(f"warmpod serve exited {self.proc.returncode}:\n{self.log()}")

    def _listening(self) -> bool:
        self._alive()
        match = LISTENING.search(self.log())
        if match:
            self.port = int(match.group(2))
        return match is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        try:
            return http("GET", self.url + "/v2/health/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        def ready_or_dead() -> bool:
            self._alive()
            return self.ready()

        wait_until(ready_or_dead, timeout=timeout, what="warmpod serve (ready)", diagnostics=self.log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> WarmpodServer:
        return self.start() if self.proc is None else self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class LoadThread:
    """A bounded closed-loop load on one URL from a background thread: `workers` clients, each sending the same
    JSON body until `stop()`, `max_requests` in total, or `max_seconds`. Every outcome is kept in `results` as
    (monotonic time sent, monotonic time answered, status or exception name, parsed JSON body or None,
    response headers).
    """

    def __init__(self, url: str, payload: Any, *, workers: int = 4, max_requests: int = 2000,
                 max_seconds: float = 60, stop_on_status: int | None = None, method: str = "POST") -> None:  # fmt: skip
        import threading

        self.url, self.body = url, json.dumps(payload).encode()
        self.workers, self.max_requests, self.max_seconds = workers, max_requests, max_seconds
        self.stop_on_status, self.method = stop_on_status, method
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
