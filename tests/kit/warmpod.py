"""warmpod itself, from this checkout, for tests and benchmarks: its CLI run to the end (output, JSON events, error
lines, what it left in the store), models staged with its loader, and its HTTP server as a child process."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.kit.clients import http
from tests.kit.procs import ChildProcess, wait_until
from warmpod.loader.load import LoadRequest, load
from warmpod.pods.lines import LISTENING_LINE

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ the CLI


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a warmpod child: this one without AWS_* and WARMPOD_* settings (each test or benchmark
    sets what it means to), the checkout first on PYTHONPATH (for `tests.*` factories and `bench.*` modules), then
    `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WARMPOD_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def warmpod_cmd(*args: str | Path) -> list[str]:
    """The command line of `warmpod ARGS...` run from this checkout by this interpreter."""
    return [sys.executable, "-m", "warmpod", *map(str, args)]


def load_cmd(*args: str | Path) -> list[str]:
    return warmpod_cmd("load", *args)


def run_warmpod(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`warmpod ARGS...` to the end, stdin closed, output captured as text; `env` added to child_env()."""
    return subprocess.run(
        warmpod_cmd(*args),
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_load(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_warmpod("load", *args, env=env, timeout=timeout)


def result_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON event lines the CLI logged (non-JSON lines, like the final error line, are skipped)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def error_line(proc: subprocess.CompletedProcess[str], prog: str = "warmpod load") -> str:
    """The last `PROG: error: ...` line the CLI wrote to stderr (asserted to be there)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error:")]
    assert lines, f"exit {proc.returncode}, no {prog} error line in stderr:\n{proc.stderr}"
    return lines[-1]


def published_nothing(store: Path, model: str) -> bool:
    """True when the model has no `current` and no version, and staging holds no files."""
    mdir = store / model
    versions = mdir / "versions"
    staged = [p for p in (mdir / "staging").rglob("*") if p.is_file()] if (mdir / "staging").exists() else []
    return (
        not (mdir / "current").exists()
        and not (versions.exists() and any(versions.iterdir()))
        and not any(p.stat().st_size for p in staged)
    )


def stage(source: Path, store: Path, model: str) -> str:
    """Stage a model directory (or URL) into `store` with the loader, in this process, and return the version."""
    result = asyncio.run(load(LoadRequest(uri=str(source), model=model, root=store)))
    return result.version


# ------------------------------------------------------------------------------------------ the server


class ServerProcess(ChildProcess):
    """Any command line that runs warmpod's HTTP server, on a free port (port 0, read back from its 'listening on'
    line), started once /v2/health/ready answers 200 (or only listening, with `wait_ready=False`)."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        name: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        own_group: bool = False,
        stop_timeout: float = 30,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(argv, name=name, log_path=log_path, env=env, cwd=cwd, own_group=own_group,
                         stop_timeout=stop_timeout)  # fmt: skip
        self.port = 0
        self.tls = tls  # a client context for a server run with --tls-cert: url is https, readiness checked over TLS

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, *, wait_ready: bool = True) -> Self:
        deadline = time.monotonic() + timeout
        self.spawn()
        try:
            self.wait_listening(timeout)
            if wait_ready:
                self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_listening(self, timeout: float) -> float:
        """Until its 'listening on' line: sets `port`, returns the monotonic time the line arrived."""
        self.match = self.wait_for(LISTENING_LINE, timeout=timeout)
        self.port = int(self.match.group(2))
        seen = self.first(LISTENING_LINE)
        assert seen is not None
        return seen[0]

    def ready(self) -> bool:
        try:
            return http("GET", self.url + "/v2/health/ready", timeout=5, context=self.tls)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        def ready_or_dead() -> bool:
            self.check_alive()
            return self.ready()

        wait_until(ready_or_dead, timeout=timeout, what=f"{self.name} (ready)", diagnostics=self.log_tail)


class WarmpodServer(ServerProcess):
    """`warmpod serve` from this checkout as a child process (see ServerProcess)."""

    def __init__(
        self,
        store: Path,
        model: str,
        *args: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        command: Sequence[str | Path] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.store, self.model = store, model
        command = command or ("serve", "--model", model, "--store", store)
        log_path = log_dir / f"serve-{model}-{time.monotonic_ns()}.log"
        argv = warmpod_cmd(*command, "--port", "0", *args)
        super().__init__(argv, log_path=log_path, name="warmpod serve", env=child_env(env), tls=tls)

    @classmethod
    def edge(cls, bundle: Path, *args: str, log_dir: Path, env: dict[str, str] | None = None,
             tls: ssl.SSLContext | None = None) -> WarmpodServer:  # fmt: skip
        """`warmpod edge serve BUNDLE_OR_MODEL` instead (same protocol, same handling here)."""
        server = cls(bundle, bundle.name, *args, log_dir=log_dir, env=env, command=("edge", "serve", bundle), tls=tls)
        server.name = "warmpod edge serve"
        return server
