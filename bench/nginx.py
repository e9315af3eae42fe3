"""Local servers for benchmarks: a SeaweedFS S3 gateway and an nginx static file server.

Both are bound to 127.0.0.1 only, on free ports picked at start, with every file they write (data, config,
logs, pid, sockets) in a temporary directory that the caller owns. Both are context managers: leaving the
`with` block stops the process (SIGTERM, then SIGKILL after a bounded wait) and removes what it wrote.

    with SeaweedS3(workdir) as s3:          # s3.endpoint, s3.access_key, s3.secret_key, s3.version
        s3.create_bucket("bench")
        s3.upload_file(local_path, "bench", "model/model.safetensors")
    with NginxStatic(workdir, root=model_dir) as web:
        print(web.url + "/model.safetensors")

Readiness and shutdown loops are bounded in count and time. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free TCP ports on `host` (all sockets held open until every port is chosen).

    Ports are kept below 55000 because SeaweedFS derives defaults as port+10000 and we set every gRPC port
    explicitly anyway; this just keeps the numbers valid if a default ever slips through.
    """
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 20):  # bounded: enough tries to find `count` ports below the cap
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port < 55000 and port not in ports:
                socks.append(s)
                ports.append(port)
            else:
                s.close()
    finally:
        for s in socks:
            s.close()
    if len(ports) != count:
        raise RuntimeError(f"could not find {count} free ports on {host}")
    return ports


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until `host:port` accepts a TCP connection; raise if `proc` exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it has not exited within `timeout_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


class SeaweedS3:
    """`weed server` (master + volume + filer + S3 gateway, one process) with one access key.

    Authentication: an S3 identities file (`-s3.config`) with a single admin identity; requests signed with
    any other key are rejected. Telemetry is turned off (`-master.telemetry=false`), WebDAV, IAM, Iceberg and
    Lance listeners are disabled, and every remaining listener (HTTP and gRPC for master, volume, filer, S3)
    gets an explicit free port on 127.0.0.1.
    """

    access_key = "warmpod-bench"
    secret_key = "warmpod-bench-secret"
    region = "us-east-1"

    def __init__(self, workdir: str | Path, weed: str | None = None) -> None:
        self.weed = weed or shutil.which("weed") or "weed"
        self.root = Path(tempfile.mkdtemp(prefix="seaweed-", dir=workdir))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.log_path = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def version(self) -> str:
        out = subprocess.run([self.weed, "version"], capture_output=True, text=True, timeout=30, check=False)
        first = (out.stdout or out.stderr).strip().splitlines()
        # e.g. "version 8000GB 4.48 pypi linux amd64": pick the dotted number, keep the rest as the build.
        words = first[0].replace("version ", "", 1).split() if first else []
        number = next((w for w in words if w[:1].isdigit() and "." in w), "unknown")
        build = " ".join(w for w in words if w != number)
        return f"{number} ({build})" if build else number

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _write_identities(self) -> Path:
        path = self.root / "s3.json"
        ident = {
            "identities": [
                {
                    "name": "bench",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path.write_text(json.dumps(ident))
        return path

    def command(self) -> list[str]:
        p = self.ports
        data = self.root / "data"
        return [
            self.weed,
            "server",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._write_identities()}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-webdav=false",
            "-iam=false",
        ]

    def start(self) -> SeaweedS3:
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        (self.root / "data").mkdir()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def _wait_ready(self) -> None:
        """The S3 port listens early; wait until a bucket can be created and an object written and read."""
        assert self.proc is not None
        wait_for_port(HOST, self.ports["s3"], START_TIMEOUT_S, self.proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}):\n{tail(self.log_path)}")
            try:
                c = self.client()
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                    c.create_bucket(Bucket="ready-probe")
                c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if c.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # the gateway answers 5xx until volumes are registered
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 not ready after {START_TIMEOUT_S:.0f}s: {last}\n{tail(self.log_path)}")

    def create_bucket(self, bucket: str) -> None:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            c.create_bucket(Bucket=bucket)

    def upload_file(self, path: str | Path, bucket: str, key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
        self.client().upload_file(str(path), bucket, key, Config=cfg)
        head = self.client().head_object(Bucket=bucket, Key=key)
        if int(head["ContentLength"]) != os.path.getsize(path):
            raise RuntimeError(f"upload of {key} is {head['ContentLength']} bytes, expected {os.path.getsize(path)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        # weed also puts gRPC unix sockets in /tmp, named by port: remove only the ones for our ports.
        for port in self.ports.values():
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


NGINX_CONF = """\
worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {host}:{port};
        root {docroot};
        autoindex on;
    }}
}}
"""


class NginxStatic:
    """Debian's nginx serving `root` over HTTP with sendfile, as a foreground (daemon off) child process.

    nginx's workers drop to `nobody` when started as root, so `root` and its parents must be world-readable
    (the caller's temp dirs are made 0755 for this).
    """

    def __init__(self, workdir: str | Path, root: str | Path, nginx: str = "/usr/sbin/nginx") -> None:
        self.nginx = nginx
        self.docroot = Path(root).resolve()
        self.root = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def version(self) -> str:
        out = subprocess.run([self.nginx, "-v"], capture_output=True, text=True, timeout=30, check=False)
        return (out.stderr or out.stdout).strip().replace("nginx version: ", "")

    def start(self) -> NginxStatic:
        (self.port,) = free_ports(1)
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, host=HOST, port=self.port, docroot=self.docroot))
        # -e: error log before the config is read (else nginx tries /var/log/nginx/error.log first).
        cmd = [self.nginx, "-p", str(self.root), "-c", str(conf), "-e", str(self.root / "error.log")]
        with open(self.root / "stdout.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(HOST, self.port, START_TIMEOUT_S, self.proc)
            urllib.request.urlopen(self.url + "/", timeout=10).read(4096)
        except (OSError, RuntimeError) as exc:
            err = tail(self.root / "error.log")
            self.stop()
            raise RuntimeError(f"nginx not serving {self.docroot}: {exc}\n{err}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NginxStatic:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
