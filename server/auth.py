"""The door: API keys (and a verified TLS client certificate) decide which tenant a request belongs to, or 401.

FORMAT. `--api-key-file` is UTF-8 text, one `TENANT:KEY` per line; blank lines and lines starting with `#` are
skipped, whitespace around the tenant and the key is not part of them. A TENANT MUST match `[A-Za-z0-9._-]{1,64}`
(it becomes a metric label and a log field). A KEY MUST be printable ASCII without whitespace (what fits in an
`Authorization: Bearer KEY` header). A tenant MAY have several keys (a rotation overlaps old and new); one key
MUST NOT belong to two tenants. The file MUST hold at least one key. Messages name the line, never a key.

RULES (`admit`). The health routes are open. `/metrics` is open on the `--metrics-port` site and behind the door on
the public one. Everything else needs a credential once there is a door (a key file, or mutual TLS):
- `Authorization: Bearer KEY` with a key of the file: the key's tenant;
- a verified client certificate (`--tls-client-ca`): its tenant (`tenancy.certificate_tenant`), a credential on
  its own; a key sent with it must belong to the same tenant;
- anything else is 401 (`WWW-Authenticate: Bearer`, RFC 6750's `invalid_request` / `invalid_token` codes).
Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key, without an early exit.

RELOAD. The file is polled (stat following symlinks: a mounted Secret rotates by swapping its `..data` symlink); a
changed file that parses replaces the keys at once (requests already admitted are not touched), one that does not
keeps the old keys, is logged (never a key) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge

from warmpod.errors import UsageError
from warmpod.server.errors import Unauthorized
from warmpod.server.tenancy import ANONYMOUS, TENANT, certificate_tenant

log = logging.getLogger("warmpod.server.auth")

TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what a Bearer header can carry as it is
MAX_KEY_FILE_BYTES = 1 << 20
POLL_INTERVAL_S = 1.0
OPEN_ROUTES = frozenset({"live", "ready"})  # route names (server.app) that probes reach without a credential
METRICS_PATH = "/metrics"
KNOWN_SCHEMES = frozenset({"basic", "digest", "negotiate", "ntlm", "token", "apikey", "api-key", "hoba", "mutual"})
BEARER_USAGE = "send 'Authorization: Bearer <key>' with a key of the server's --api-key-file"


class AuthError(UsageError):
    """A key file that cannot be used: at start the server exits 2 with this message; at a reload the old keys stay
    and the message is logged. Never holds a key."""


# ------------------------------------------------------------------------------------------ the key file


@dataclass(frozen=True)
class KeyTable:
    """The keys of one key file: (SHA-256 of the key, its tenant), in file order."""

    entries: tuple[tuple[bytes, str], ...]

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(tenant for _, tenant in self.entries)

    def lookup(self, key: str) -> str | None:
        """The tenant of `key`, or None. Every entry is compared (constant time in the key and its position)."""
        digest = _digest(key)
        found: str | None = None
        for stored, tenant in self.entries:
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_key_file(text: str, source: str) -> KeyTable:
    """The KeyTable of a key file's text (`source` names it in messages), or an AuthError naming the line."""
    entries: list[tuple[bytes, str]] = []
    first_line: dict[bytes, tuple[int, str]] = {}  # digest → (line, tenant) where the key first appeared
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        tenant, colon, key = line.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not colon:
            raise AuthError(f"{where}: expected TENANT:KEY (no ':' on the line)")
        if not TENANT_NAME.fullmatch(tenant):
            raise AuthError(f"{where}: the tenant name must be 1 to 64 of A-Z a-z 0-9 . _ - (it is used in metric "
                            "labels and logs)")  # fmt: skip
        if not key:
            raise AuthError(f"{where}: tenant {tenant!r} has an empty key")
        if not KEY_CHARS.fullmatch(key):
            raise AuthError(f"{where}: the key of tenant {tenant!r} has whitespace or characters other than "
                            "printable ASCII (a key must fit in 'Authorization: Bearer <key>')")  # fmt: skip
        digest = _digest(key)
        if digest in first_line:
            seen_line, seen_tenant = first_line[digest]
            if seen_tenant != tenant:
                raise AuthError(f"{where}: tenant {tenant!r} has the same key as tenant {seen_tenant!r} on line "
                                f"{seen_line}; a key belongs to one tenant")  # fmt: skip
            continue  # the same key twice for the same tenant: harmless
        first_line[digest] = (number, tenant)
        entries.append((digest, tenant))
    if not entries:
        raise AuthError(f"{source}: no keys in it (expected TENANT:KEY lines); an empty key file would lock every "
                        "client out")  # fmt: skip
    return KeyTable(tuple(entries))


def read_key_file(path: Path) -> KeyTable:
    source = f"--api-key-file {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise AuthError(f"{source}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise AuthError(f"{source}: larger than {MAX_KEY_FILE_BYTES >> 20} MiB; is this the key file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AuthError(f"{source}: not UTF-8 text (byte {e.start})") from None
    return parse_key_file(text, source)


# ------------------------------------------------------------------------------------------ the rules


class Site(enum.Enum):
    PUBLIC = "public"  # --host:--port
    METRICS = "metrics"  # --metrics-host:--metrics-port


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None without the header; Unauthorized (never quoting
    the header, which may hold a key) for any other shape."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if not scheme:
        raise bearer_error("invalid_request", f"empty Authorization header: {BEARER_USAGE}")
    if scheme.lower() != "bearer":
        # Named only when it is a known scheme: a bare key sent without "Bearer " must not be echoed back.
        why = f"the {scheme} scheme is not supported" if scheme.lower() in KNOWN_SCHEMES else "it is not 'Bearer <key>'"
        raise bearer_error("invalid_request", f"malformed Authorization header: {why}: {BEARER_USAGE}")
    token = token.strip(" ")
    if not token:
        raise bearer_error("invalid_request", f"Authorization: Bearer without a key: {BEARER_USAGE}")
    if not KEY_CHARS.fullmatch(token):
        raise bearer_error("invalid_request", "malformed Authorization header: the Bearer key must be one word of "
                           f"printable ASCII: {BEARER_USAGE}")  # fmt: skip
    return token


def bearer_error(code: str, message: str) -> Unauthorized:
    """A 401 with RFC 6750's error code in its `WWW-Authenticate: Bearer` challenge."""
    error = Unauthorized(message)
    error.challenge = f'Bearer realm="warmpod", error="{code}"'
    return error


def admit(
    *,
    route: str | None,
    path: str,
    site: Site,
    authorization: str | None,
    cert_tenant: str | None,
    keys: KeyTable | None,
    mutual_tls: bool,
) -> str | None:
    """The tenant a request is admitted as (None: an open route, no tenant named), or Unauthorized."""
    if route in OPEN_ROUTES or (site is Site.METRICS and path == METRICS_PATH):
        return cert_tenant
    if keys is None and not mutual_tls:
        return ANONYMOUS  # no door
    token = parse_bearer(authorization) if keys is not None else None
    if token is not None and keys is not None:
        tenant = keys.lookup(token)
        if tenant is None:
            raise bearer_error("invalid_token", f"unknown API key (revoked, mistyped or from another server): "
                               f"{BEARER_USAGE}")  # fmt: skip
        if cert_tenant is not None and cert_tenant != tenant:
            mismatch = f"the API key belongs to tenant {tenant!r}, the client certificate to {cert_tenant!r}"
            raise bearer_error("invalid_token", f"{mismatch}: send a key of the certificate's tenant, or none")
        return tenant
    if cert_tenant is not None:
        return cert_tenant
    if keys is not None:
        raise Unauthorized(f"missing API key: {BEARER_USAGE}")
    raise Unauthorized(f"no client certificate: this port serves the health routes and {METRICS_PATH} only; send "
                       "requests to the TLS port with a client certificate of the --tls-client-ca CAs")  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or "" (every address): assume reachable from elsewhere


def exposure_problem(host: str, metrics_host: str | None, *, door: bool, allow_unauthenticated: bool) -> str | None:
    """Why the server must not start without a door on these addresses (None: it may). `metrics_host`: where the
    metrics site binds, None without one."""
    if door or allow_unauthenticated:
        return None
    for flag, address in (("--host", host), ("--metrics-host", metrics_host)):
        if address is not None and not is_loopback(address):
            return (f"{flag} {address or '(all addresses)'} is reachable from other machines and no client needs a "
                    "key: give --api-key-file (or --tls-client-ca), or --allow-unauthenticated to serve anyone who "
                    "reaches it")  # fmt: skip
    return None


# ------------------------------------------------------------------------------------------ the shell


FileState = tuple[int, int, int, int]  # device, inode, size, mtime_ns


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "warmpod_auth_reloads", "API key file changes taken (the new keys apply to new requests)",
            registry=registry,
        )  # fmt: skip
        self.reload_errors = Counter(
            "warmpod_auth_reload_errors",
            "API key file changes refused (unreadable, empty, malformed, removed): the old keys stay",
            registry=registry,
        )
        self.keys = Gauge("warmpod_auth_keys", "API keys accepted now", registry=registry)


def _file_state(path: Path) -> FileState | None:
    try:
        s = os.stat(path)  # follows symlinks: a Secret's `..data` swap changes the inode
    except OSError:
        return None
    return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)


class Door:
    """What the door middleware reads: the keys (swapped whole at a reload), whether mutual TLS names tenants, and
    which local ports are the metrics site's."""

    def __init__(self, key_file: Path | None, keys: KeyTable | None, *, mutual_tls: bool = False,
                 state: FileState | None = None) -> None:  # fmt: skip
        self.key_file = key_file
        self.keys = keys
        self.mutual_tls = mutual_tls
        self.metrics_ports: set[int] = set()  # filled by `serve` once the metrics site listens
        self.metrics: AuthMetrics | None = None
        self._seen = state  # the file state last acted on, good or bad

    @classmethod
    def load(cls, key_file: Path | None, *, mutual_tls: bool = False) -> Door:
        """The door the flags describe; AuthError for a key file that cannot be used (exit 2 at start)."""
        if key_file is None:
            return cls(None, None, mutual_tls=mutual_tls)
        state = _file_state(key_file)
        keys = read_key_file(key_file)
        log.info("API keys: %d key(s) of %d tenant(s) from %s", len(keys.entries), len(keys.tenants), key_file)
        return cls(key_file, keys, mutual_tls=mutual_tls, state=state)

    @property
    def closed(self) -> bool:
        """Whether requests need a credential at all."""
        return self.keys is not None or self.mutual_tls

    def attach(self, registry: CollectorRegistry) -> None:
        if self.key_file is None:
            return
        self.metrics = AuthMetrics(registry)
        self.metrics.keys.set(len(self.keys.entries) if self.keys else 0)

    def reload_if_changed(self) -> bool | None:
        """Take the key file if it changed since last seen: True (reloaded), False (refused: old keys kept, not
        tried again until the file changes again), None (unchanged)."""
        if self.key_file is None:
            return None
        state = _file_state(self.key_file)
        if state == self._seen:
            return None
        try:
            keys = read_key_file(self.key_file)
            if _file_state(self.key_file) != state:
                return None  # changed while read: take it at the next poll
        except AuthError as e:
            self._seen = state
            log.error("API key file reload failed, keeping the %d key(s) loaded before: %s",
                      len(self.keys.entries) if self.keys else 0, e)  # fmt: skip
            if self.metrics is not None:
                self.metrics.reload_errors.inc()
            return False
        self.keys, self._seen = keys, state
        log.info("API keys reloaded: %d key(s) of %d tenant(s) from %s", len(keys.entries), len(keys.tenants),
                 self.key_file)  # fmt: skip
        if self.metrics is not None:
            self.metrics.reloads.inc()
            self.metrics.keys.set(len(keys.entries))
        return True

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:  # a bug here must not end the rotation
                log.exception("API key file reload failed unexpectedly; keeping the keys loaded before")
                if self.metrics is not None:
                    self.metrics.reload_errors.inc()


DOOR = web.AppKey("door", Door)


async def door_ctx(app: web.Application) -> AsyncIterator[None]:
    """The key file's watcher, while the app runs."""
    door = app[DOOR]
    task = asyncio.create_task(door.watch(), name="api key reload") if door.key_file is not None else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def local_site(request: web.Request, door: Door) -> Site:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    return Site.METRICS if port in door.metrics_ports else Site.PUBLIC


@web.middleware
async def door_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit the request (its tenant under `TENANT`) or raise Unauthorized, before the handler runs."""
    door = request.app[DOOR]
    peercert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    tenant = admit(
        route=request.match_info.route.name,
        path=request.path,
        site=local_site(request, door),
        authorization=request.headers.get("Authorization"),
        cert_tenant=certificate_tenant(peercert) if door.mutual_tls else None,
        keys=door.keys,
        mutual_tls=door.mutual_tls,
    )
    if tenant is not None:
        request[TENANT] = tenant
    return await handler(request)
