"""An aiohttp application served by a background thread on 127.0.0.1 (the Range server and the fault proxy are
built on it), and the record of every request a server saw (moto's access log is read into the same records).

Requests are recorded when they arrive, before they are answered, so a count read after the client got its answer is
exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from aiohttp import web

from tests.kit.procs import LOOPBACK, ServerStartError


@dataclass
class RequestRecord:
    """One request as a server saw it.  ``path`` is URL-decoded; ``status`` is set once answered; ``body_bytes``
    counts the response body as it is sent (the fault proxy's count of what crossed it)."""

    method: str
    path: str
    query: str = ""
    range: str | None = None
    status: int | None = None
    fault: Literal["status", "reset", "forced"] | None = None
    body_bytes: int = 0

    @property
    def ranged(self) -> bool:
        return self.range is not None


class RequestLog:
    """Thread-safe list of :class:`RequestRecord` with counting helpers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def count(
        self,
        method: str | None = None,
        *,
        path_prefix: str | None = None,
        ranged: bool | None = None,
    ) -> int:
        """Requests matching all given filters (``method`` is case-insensitive)."""
        return len(list(filter_records(self.records(), method, path_prefix, ranged)))

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def filter_records(
    records: Iterable[RequestRecord], method: str | None, path_prefix: str | None, ranged: bool | None
) -> Iterator[RequestRecord]:
    for rec in records:
        if method is not None and rec.method != method.upper():
            continue
        if path_prefix is not None and not rec.path.startswith(path_prefix):
            continue
        if ranged is not None and rec.ranged != ranged:
            continue
        yield rec


class ThreadedAiohttpServer:
    """An aiohttp application served on 127.0.0.1:<free port> by a thread with its own event loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = RequestLog()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{LOOPBACK}:{self.port}"

    endpoint = url

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    async def _on_start(self) -> None:
        """Hook run in the server's loop before it listens."""

    async def _on_stop(self) -> None:
        """Hook run in the server's loop after it stopped listening."""

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ServerStartError(f"{self.name} did not start listening within {timeout:.0f}s")
        if self._start_error is not None:
            self.stop()
            raise ServerStartError(f"{self.name} failed to start: {self._start_error!r}") from self._start_error
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as err:
            self._start_error = err
        finally:
            self._ready.set()
        try:
            if self._start_error is None:
                loop.run_forever()
        finally:
            loop.run_until_complete(self._astop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _astart(self) -> None:
        await self._on_start()
        self._runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._on_stop()

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {timeout:.0f}s")
        self._thread = None
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _record(self, request: web.Request) -> RequestRecord:
        record = RequestRecord(request.method, request.path, request.query_string, request.headers.get("Range"))
        self.requests.append(record)
        return record
