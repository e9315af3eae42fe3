"""The audit log (`--audit-log PATH`, `-` for stderr): one JSON line per inference request, answered or refused, and
per request the door refused (401) on any route — who (tenant) asked what (model, version, route, rows), when, and
what came of it (status, latency), under the request's id. Never a key, never a body.

Every response carries `X-Request-Id`: the client's when it sent a sane one (1 to 128 of `A-Za-z0-9._:@/+=-`),
else one made here; the audit line holds the same id.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter

from warmpod.errors import UsageError
from warmpod.server.tenancy import TENANT

log = logging.getLogger("warmpod.server.audit")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
MAX_PATH_CHARS = 256
FACTS = "warmpod.audit"  # request key: the AuditFacts the handlers note
ERROR_LOG_INTERVAL_S = 60.0  # a failing log is reported at most this often (each failure is counted)


class AuditError(UsageError):
    """An audit log that cannot be opened: the server exits 2 with this message."""


@dataclass
class AuditFacts:
    """What only the handler knows: the model asked for, the version that answered, the rows."""

    model: str | None = None
    version: str | None = None
    rows: int | None = None


def note(request: web.Request, *, model: str | None = None, version: str | None = None,
         rows: int | None = None) -> None:  # fmt: skip
    """Record facts about this request for its audit line (whatever is None is left as it was)."""
    facts: AuditFacts | None = request.get(FACTS)
    if facts is None:
        facts = request[FACTS] = AuditFacts()
    if model is not None:
        facts.model = model
    if version is not None:
        facts.version = version
    if rows is not None:
        facts.rows = rows


# ------------------------------------------------------------------------------------------ the core


def request_id(header: str | None, make: Callable[[], str] = lambda: uuid.uuid4().hex) -> str:
    """The client's X-Request-Id when it is sane (it goes into logs and back in a header), else a new one."""
    if header is not None and REQUEST_ID.fullmatch(header):
        return header
    return make()


def rfc3339(unix_s: float) -> str:
    """`2026-01-31T12:00:00.123Z`."""
    when = datetime.datetime.fromtimestamp(unix_s, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_record(
    *,
    at: float,
    request_id: str,
    tenant: str | None,
    method: str,
    path: str,
    facts: AuditFacts,
    status: int,
    latency_s: float,
    reason: str | None,
    client: str | None,
) -> dict[str, Any]:
    """One line's fields. `tenant` None: the door did not admit it; `reason`: why it was refused (the
    warmpod_requests_rejected_total label), None when answered; status 499: the client went away first."""
    return {
        "time": rfc3339(at),
        "request_id": request_id,
        "tenant": tenant,
        "model": facts.model,
        "version": facts.version,
        "method": method,
        "route": path[:MAX_PATH_CHARS],
        "rows": facts.rows,
        "status": status,
        "reason": reason,
        "latency_ms": round(latency_s * 1000, 3),
        "client": client,
    }


def audited(route: str | None, status: int, inference_routes: tuple[str, ...]) -> bool:
    return status == 401 or (route is not None and route.startswith(inference_routes))


# ------------------------------------------------------------------------------------------ the shell


class AuditLog:
    """Appends lines to a line-buffered stream (a small write per request; a failing write is counted and logged,
    never the request's failure)."""

    def __init__(self, stream: TextIO, name: str, *, owned: bool) -> None:
        self.stream, self.name, self.owned = stream, name, owned
        self.write_errors: Counter | None = None
        self._reported = -ERROR_LOG_INTERVAL_S

    @classmethod
    def open(cls, path: str) -> AuditLog:
        if path == "-":
            return cls(sys.stderr, "stderr", owned=False)
        try:
            stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise AuditError(f"--audit-log {path}: cannot open it for appending: {e.strerror or e}") from None
        return cls(stream, path, owned=True)

    def attach(self, registry: CollectorRegistry) -> None:
        self.write_errors = Counter(
            "warmpod_audit_write_errors", "Audit log lines that could not be written (the requests were answered)",
            registry=registry,
        )  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            if self.write_errors is not None:
                self.write_errors.inc()
            now = time.monotonic()
            if now - self._reported >= ERROR_LOG_INTERVAL_S:
                self._reported = now
                log.error("cannot write the audit log %s (lines are being lost): %s", self.name, e)

    def close(self) -> None:
        if self.owned:
            self.stream.close()


AUDIT: web.AppKey[AuditLog | None] = web.AppKey("audit")


def audit_middleware(inference_routes: tuple[str, ...], rejected_key: str) -> Middleware:
    """The outermost middleware: the request id (X-Request-Id both ways) and the audit line of each request that
    `audited` names. `rejected_key`: where an error response carries its reason."""

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        at, started = time.time(), time.monotonic()
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        route = request.match_info.route.name
        if route is not None and "model" in request.match_info:
            note(request, model=request.match_info["model"], version=request.match_info.get("version"))
        status: int = 499
        reason: str | None = "client_closed"
        try:
            response = await handler(request)
            status, reason = response.status, response.get(rejected_key)  # reason: None when answered
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = rid
            return response
        finally:
            audit_log = request.app[AUDIT]
            if audit_log is not None and audited(route, status, inference_routes):
                audit_log.write(audit_record(
                    at=at, request_id=rid, tenant=request.get(TENANT), method=request.method, path=request.path,
                    facts=request.get(FACTS) or AuditFacts(), status=status, latency_s=time.monotonic() - started,
                    reason=reason, client=request.remote,
                ))  # fmt: skip

    return audit
