"""What a client of a warmpod server does, for tests and benchmarks: one plain HTTP request, a JSON POST, and a
bounded closed-loop load from a background thread."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp


@contextmanager
def open_triton(host_port: str) -> Iterator[Any]:
    """tritonclient.http's client for a server at HOST:PORT (30 s timeouts), closed afterwards."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=host_port, connection_timeout=30, network_timeout=30)
    try:
        yield client
    finally:
        client.close()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30,
         *, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One plain HTTP request (urllib; https with `context`): status, headers, body — error statuses included, no
    exception."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(
    url: str, payload: Any, timeout: float = 30, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """A JSON POST (with `headers` too: an API key's Authorization) and its parsed JSON answer."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    status, _, body = http("POST", url, json.dumps(payload).encode(), sent, timeout)
    return status, json.loads(body)


class LoadThread:
    """A bounded closed-loop load on one URL from a background thread: `workers` clients, each sending the same
    JSON body on a new connection (so SO_REUSEPORT spreads them over the servers sharing a port), pausing `pause_s`
    between requests, until `stop()`, `max_requests` in total, or `max_seconds`; `headers` go with every request (an
    API key's Authorization). Every outcome is kept in `results` as
    (monotonic time sent, monotonic time answered, status or exception name, parsed JSON body or None,
    response headers).
    """

    def __init__(self, url: str, payload: Any, *, workers: int = 4, max_requests: int = 2000,
                 max_seconds: float = 60, stop_on_status: int | None = None, method: str = "POST",
                 pause_s: float = 0.0, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.url, self.body = url, json.dumps(payload).encode()
        self.headers = {"Content-Type": "application/json", **(headers or {})}
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
                        async with session.request(self.method, self.url, data=body_or_none, headers=self.headers) as r:
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
