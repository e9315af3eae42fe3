"""A reverse proxy that injects faults (503s, dropped connections, forced 403/404) and counts requests and the body
bytes it sends back: put it in front of an S3 server or the Range server to see what the loader does when the network
misbehaves, or how much it reads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

from tests.kit.threaded_http import RequestRecord, ThreadedAiohttpServer

# Headers that describe one hop of a connection, never forwarded by the proxy.  ``Expect`` is dropped
# too: the proxy's server side already answered the 100-continue, and SigV4 does not sign it.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
# Headers aiohttp's client adds by itself; the proxy suppresses each one the client did not send.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_S3_ERROR_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    416: "InvalidRange",
    500: "InternalError",
    503: "SlowDown",
}


@dataclass
class FaultConfig:
    """What :class:`FaultProxy` does to requests.  Change it at runtime with ``FaultProxy.configure``.

    *Eligible* requests are GETs, and only ranged ones (``Range`` header) unless ``ranged_only`` is
    False.  Each eligible request is numbered 1, 2, ... and is checked in this order:

    1. status fault (answered ``fail_status``, upstream never contacted): if ``fail_next > 0`` (it
       counts down), or its number is a multiple of ``fail_every``, or ``rng.random() < fail_fraction``;
    2. reset fault (upstream answers, the client gets the headers and ``reset_after_bytes`` of the body,
       default half of it, then the connection is dropped): same with ``reset_next`` /
       ``reset_every`` / ``reset_fraction``.  ``reset_mode="close"`` flushes and closes (a short read,
       the client always sees the partial body); ``"rst"`` aborts with SO_LINGER=0 (a TCP RST,
       ``ECONNRESET``; part of the body may never arrive).

    ``status_for_prefix`` maps a URL path prefix (e.g. ``"/bucket/private/"``) to a status (403, 404...)
    forced for *every* request under it, whatever its method.  ``delay_s`` delays each eligible request.
    Error bodies are S3-style XML (``AccessDenied``, ``NoSuchKey``, ``SlowDown``...).
    """

    fail_fraction: float = 0.0
    fail_every: int = 0
    fail_next: int = 0
    fail_status: int = 503
    reset_fraction: float = 0.0
    reset_every: int = 0
    reset_next: int = 0
    reset_after_bytes: int | None = None
    reset_mode: Literal["close", "rst"] = "close"
    ranged_only: bool = True
    status_for_prefix: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a :class:`FaultProxy` (``faults_injected == failed + resets + forced``)."""

    total: int = 0
    gets: int = 0
    ranged_gets: int = 0
    heads: int = 0
    other: int = 0
    eligible: int = 0
    failed: int = 0
    resets: int = 0
    forced: int = 0

    @property
    def faults_injected(self) -> int:
        return self.failed + self.resets + self.forced


@dataclass
class _Decision:
    kind: Literal["forward", "status", "reset", "forced"]
    status: int = 0
    reset_after: int | None = None
    reset_mode: Literal["close", "rst"] = "close"
    delay_s: float = 0.0


class FaultProxy(ThreadedAiohttpServer):
    """Reverse proxy from ``endpoint`` to ``upstream`` (e.g. a :class:`MotoServer` endpoint or a
    :class:`RangeHTTPServer` url) that injects faults per :class:`FaultConfig` and counts requests.

    Method, raw path and query, headers (Host included, so SigV4 signatures made for the proxy's
    address stay valid) and body are forwarded; the upstream answer is streamed back with its status
    and headers (Content-Length, Content-Range, ETag...).  Point clients at ``proxy.endpoint``.
    """

    def __init__(self, upstream: str, *, seed: int = 0, **faults: Any) -> None:
        super().__init__("fault-proxy")
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._faults = FaultConfig(**faults)
        self._rng = random.Random(seed)
        self._stats = ProxyStats()
        self._session: ClientSession | None = None

    # -- runtime control (thread-safe)
    def configure(self, *, seed: int | None = None, **changes: Any) -> None:
        """Change fault settings, e.g. ``configure(fail_fraction=0.2, seed=1)`` or
        ``configure(status_for_prefix={"/bucket/secret/": 403})``; ``seed`` reseeds the generator."""
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **changes)
            if seed is not None:
                self._rng = random.Random(seed)

    def clear_faults(self) -> None:
        """Back to a transparent proxy (counters are kept)."""
        with self._lock:
            self._faults = FaultConfig()

    @property
    def faults(self) -> FaultConfig:
        with self._lock:
            return dataclasses.replace(self._faults, status_for_prefix=dict(self._faults.status_for_prefix))

    def stats(self) -> ProxyStats:
        with self._lock:
            return self._stats

    def reset_stats(self) -> None:
        """Zero the counters and clear ``requests``."""
        with self._lock:
            self._stats = ProxyStats()
            self.requests.clear()

    # -- server
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _on_start(self) -> None:
        self._session = ClientSession(
            connector=TCPConnector(limit=256),
            timeout=ClientTimeout(total=None, sock_connect=10, sock_read=120),
            auto_decompress=False,
            cookie_jar=DummyCookieJar(),
            trust_env=False,
        )

    async def _on_stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _decide(self, request: web.Request) -> _Decision:
        method, ranged = request.method, "Range" in request.headers
        with self._lock:
            faults, stats = self._faults, self._stats
            counts = {
                "total": stats.total + 1,
                "gets": stats.gets + (method == "GET"),
                "ranged_gets": stats.ranged_gets + (method == "GET" and ranged),
                "heads": stats.heads + (method == "HEAD"),
                "other": stats.other + (method not in ("GET", "HEAD")),
            }
            decision = _Decision("forward")
            forced = _match_prefix(request.path, faults.status_for_prefix)
            eligible = method == "GET" and (ranged or not faults.ranged_only)
            if forced is not None:
                decision = _Decision("forced", status=forced)
                counts["forced"] = stats.forced + 1
            elif eligible:
                number = stats.eligible + 1
                counts["eligible"] = number
                if self._hit(number, "fail"):
                    decision = _Decision("status", status=faults.fail_status)
                    counts["failed"] = stats.failed + 1
                elif self._hit(number, "reset"):
                    decision = _Decision("reset", reset_after=faults.reset_after_bytes, reset_mode=faults.reset_mode)
                    counts["resets"] = stats.resets + 1
                decision.delay_s = faults.delay_s
            self._stats = dataclasses.replace(stats, **counts)
            return decision

    def _hit(self, number: int, kind: Literal["fail", "reset"]) -> bool:
        """Whether eligible request ``number`` gets fault ``kind`` (called with the lock held)."""
        faults = self._faults
        pending: int = getattr(faults, f"{kind}_next")
        if pending > 0:
            countdown: dict[str, Any] = {f"{kind}_next": pending - 1}
            self._faults = dataclasses.replace(faults, **countdown)
            return True
        every: int = getattr(faults, f"{kind}_every")
        if every > 0 and number % every == 0:
            return True
        fraction: float = getattr(faults, f"{kind}_fraction")
        return fraction > 0 and self._rng.random() < fraction

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request)
        decision = self._decide(request)
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)
        if decision.kind in ("forced", "status"):
            record.status = decision.status
            record.fault = "forced" if decision.kind == "forced" else "status"
            return _s3_error(request, decision.status)
        assert self._session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        skip = [h for h in _AUTO_HEADERS if h not in request.headers]
        body = await request.read()
        try:
            upstream = await self._session.request(
                request.method,
                URL(self.upstream + request.raw_path, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                skip_auto_headers=skip,
            )
        except (ClientError, OSError) as err:
            record.status = 502
            return web.Response(status=502, text=f"fault proxy: upstream {self.upstream} failed: {err!r}")
        async with upstream:
            record.status = upstream.status
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            if decision.kind == "reset":
                record.fault = "reset"
                await self._send_partial_and_drop(request, response, upstream, decision, record)
                return response
            try:
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                    record.body_bytes += len(chunk)
                await response.write_eof()
            except (ConnectionResetError, ClientError):  # the client went away, or upstream broke
                _drop(request, "rst")
        return response

    async def _send_partial_and_drop(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: Any,
        decision: _Decision,
        record: RequestRecord,
    ) -> None:
        length = upstream.content_length
        budget = decision.reset_after if decision.reset_after is not None else (length or 0) // 2
        sent = 0
        with contextlib.suppress(ConnectionResetError, ClientError):
            while sent < budget:
                chunk = await upstream.content.read(min(1 << 16, budget - sent))
                if not chunk:
                    break
                await response.write(chunk)
                sent += len(chunk)
                record.body_bytes += len(chunk)
        _drop(request, decision.reset_mode)


def _drop(request: web.Request, mode: Literal["close", "rst"]) -> None:
    transport = request.transport
    if transport is None:
        return
    if mode == "rst":
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()  # flushes what was written, then FIN: the client sees a short body


def _match_prefix(path: str, prefixes: dict[str, int]) -> int | None:
    """Status of the longest prefix of ``path`` in ``prefixes`` (keys may omit the leading ``/``)."""
    best: tuple[int, int] | None = None
    for prefix, status in prefixes.items():
        normalized = prefix if prefix.startswith("/") else "/" + prefix
        if path.startswith(normalized) and (best is None or len(normalized) > best[0]):
            best = (len(normalized), status)
    return None if best is None else best[1]


def _s3_error(request: web.Request, status: int) -> web.Response:
    code = _S3_ERROR_CODES.get(status, "InjectedFault")
    headers = {"x-amz-request-id": "warmpod-fault-proxy"}
    if status == 503:
        headers["Retry-After"] = "0"
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message>"
        f"<Resource>{html.escape(request.path)}</Resource><RequestId>warmpod-fault-proxy</RequestId></Error>"
    )
    return web.Response(status=status, body=body.encode(), content_type="application/xml", headers=headers)
