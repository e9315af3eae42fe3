"""nginx serving a directory over HTTP with sendfile, for the load benchmark's http:// path: a foreground child
process bound to 127.0.0.1 on a free port, every file it writes (config, logs, pid, temp dirs) in a temporary
directory the caller's workdir holds, stopped (SIGTERM, SIGKILL after 10 s) and cleaned up when the `with` block ends.

    with NginxStatic(workdir, root=model_dir) as web:
        print(web.url + "/model.safetensors")
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.kit.procs import LOOPBACK, ChildProcess, free_port

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0

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
        self.process: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def version(self) -> str:
        out = subprocess.run([self.nginx, "-v"], capture_output=True, text=True, timeout=30, check=False)
        return (out.stderr or out.stdout).strip().replace("nginx version: ", "")

    def start(self) -> NginxStatic:
        self.port = free_port()
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, host=LOOPBACK, port=self.port, docroot=self.docroot))
        # -e: error log before the config is read (else nginx tries /var/log/nginx/error.log first).
        cmd = [self.nginx, "-p", str(self.root), "-c", str(conf), "-e", str(self.root / "error.log")]
        self.process = ChildProcess(cmd, name="nginx", log_path=self.root / "stdout.log", ready=self._serving,
                                    stop_timeout=STOP_TIMEOUT_S, own_group=True)  # fmt: skip
        try:
            self.process.start(timeout=START_TIMEOUT_S)
        except Exception as exc:
            error_log = self.root / "error.log"
            errors = error_log.read_text(errors="replace")[-3000:] if error_log.exists() else ""
            self.stop()
            raise RuntimeError(f"nginx not serving {self.docroot}: {exc}\n{errors}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def _serving(self) -> bool:
        """The port takes connections and the root's listing is served."""
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1.0).close()
        except OSError:
            return False
        urllib.request.urlopen(self.url + "/", timeout=10).read(4096)  # an error here is nginx's, not a slow start
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NginxStatic:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
