"""Child processes for tests and benchmarks: free ports on 127.0.0.1, waits with a fixed deadline, a logged child
process (start, ready line, stop) and the stop of a whole process group.

Import-light on purpose (no aiohttp, no boto3): the pod launcher and every benchmark import it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A server (or anything waited for) was not ready before its deadline, or its process exited while starting."""


class ProcessExited(ServerStartError):
    """The child process exited while it was waited for."""


# ------------------------------------------------------------------------------------------ ports and waits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port_with_offset(offset: int, *, low: int = 20000, high: int = 30000, exclude: Iterable[int] = ()) -> int:
    """A free port `p` such that `p + offset` is free too (SeaweedFS derives gRPC ports this way)."""
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
    """Poll `predicate` until it returns True and return the seconds that took; raise ServerStartError after `timeout`
    s (a fixed monotonic deadline). `predicate` may raise (e.g. ServerStartError: the process died) to give up early.
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


# ------------------------------------------------------------------------------------------ process groups


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """`sig` to every process of the group `proc` leads (started with start_new_session), unless it has exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM to the process group `proc` leads, SIGKILL to it if `proc` has not exited within `timeout` s: the exit
    code."""
    signal_group(proc, signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        return proc.wait(10)


# ------------------------------------------------------------------------------------------ the child process


class ChildProcess:
    """A program run as a child, its stdout and stderr merged into one pipe: each line is kept with the monotonic time
    it arrived (`lines`) and appended to `log_path` (when given), as soon as it comes (a thread follows the pipe) and
    before anything of the output is looked at (whoever looks first empties the pipe), so a line written before an
    answer is in the log once the answer is. `start` returns once the child is ready: a line matching `ready` arrived,
    or the callable `ready` returned True (None: at once); exiting first is an error that shows the log. `stop` is
    what a pod does to a container: SIGTERM, then SIGKILL after `stop_timeout` s.

    `own_group=True`: the child leads its own session and process group, a stop signals the whole group (the helpers
    a server starts go with it), and the kernel kills the child should this process die without any cleanup
    (die_with_parent). Otherwise only the child itself is signalled: a supervisor stops its own workers.
    """

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        name: str,
        log_path: Path | None = None,
        ready: re.Pattern[str] | Callable[[], bool] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 30,
        own_group: bool = False,
    ) -> None:
        self.argv, self.name, self.log_path, self.readiness = [str(a) for a in argv], name, log_path, ready
        self.env, self.cwd, self.stop_timeout, self.own_group = env, cwd, stop_timeout, own_group
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # monotonic time just before the spawn
        self.match: re.Match[str] | None = None  # the `ready` line, once seen
        self._output: _Output | None = None

    # -- lifecycle
    def spawn(self) -> Self:
        """Start the process and return at once (see `start`)."""
        preexec_fn = None
        if self.own_group:
            from warmpod.pods.process import die_with_parent  # not at the top: the pod launcher imports this module

            preexec_fn = die_with_parent
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_group,
            preexec_fn=preexec_fn,
        )
        self._output = _Output(self.proc, self.log_path)
        threading.Thread(target=self._output.follow, name=f"{self.name}-output", daemon=True).start()
        if self.own_group:
            atexit.register(self._kill_group)  # should no teardown run (an error in a session fixture's setup)
        return self

    def start(self, timeout: float = 60) -> Self:
        """Spawn the process and wait until it is ready; if it is not, the process is stopped and the error raised."""
        self.spawn()
        try:
            if isinstance(self.readiness, re.Pattern):
                self.match = self.wait_for(self.readiness, timeout=timeout)
            elif self.readiness is not None:
                predicate = self.readiness

                def ready_or_dead() -> bool:
                    self.check_alive()
                    return predicate()

                wait_until(ready_or_dead, timeout=timeout, what=f"{self.name} (ready)", interval=0.05,
                           diagnostics=self.log_tail)  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """SIGTERM (unless it has exited already), SIGKILL after `stop_timeout` s: the exit code (None if never
        started). The whole group with `own_group`."""
        proc = self.proc
        if proc is None:
            return None
        if self.own_group:
            atexit.unregister(self._kill_group)
            code = stop_group(proc, self.stop_timeout)
        else:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
        self._drain()
        return code

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- while it runs
    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Until it exits by itself: its exit code (subprocess.TimeoutExpired after `timeout` s)."""
        assert self.proc is not None, f"{self.name} was never started"
        code = self.proc.wait(timeout)
        self._drain()
        return code

    def check_alive(self) -> None:
        """Raise ProcessExited (a ServerStartError), with the log, if the process has exited."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is not None:
            self._drain()
            raise ProcessExited(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")

    # -- its output
    def first(self, pattern: re.Pattern[str]) -> tuple[float, re.Match[str]] | None:
        """The first line matching `pattern` so far, with the monotonic time it arrived."""
        for arrived, line in self.lines:
            if match := pattern.search(line):
                return arrived, match
        return None

    def wait_for(self, pattern: re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """The first line matching `pattern`, once it is there; ProcessExited if the process exits first."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            exited = self.returncode is not None  # asked first: then all it wrote is in the pipe for `first`
            if (hit := self.first(pattern)) is not None:
                found[:] = [hit[1]]
                return True
            if exited:
                self.check_alive()
            return False

        wait_until(seen, timeout=timeout, what=f"{self.name} ({pattern.pattern})", interval=0.02,
                   diagnostics=self.log_tail)  # fmt: skip
        return found[0]

    def log(self) -> str:
        """Everything in its log: what it wrote so far (with `log_path`, all the file holds, earlier runs included)."""
        self._drain()
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(line + "\n" for _, line in self.lines)

    def log_tail(self, max_chars: int = 6000) -> str:
        where = f" ({self.log_path})" if self.log_path else ""
        return f"----- log of {self.name}{where} -----\n{self.log()[-max_chars:]}"

    @property
    def lines(self) -> list[tuple[float, str]]:
        """(monotonic arrival time, line without its newline) of every line of this run so far."""
        self._drain()
        return self._output.lines if self._output is not None else []

    def _drain(self) -> None:
        """Take every line the pipe holds now (once the process has exited: all of them, but what a grandchild still
        writes)."""
        if self._output is not None:
            self._output.pump()

    def _kill_group(self) -> None:
        if self.proc is not None:
            signal_group(self.proc, signal.SIGKILL)


class _Output:
    """One run's output pipe, taken line by line: by a thread as it comes, and by whoever looks at it first (under
    one lock), so that nothing written before a look is missed by it."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path | None) -> None:
        assert proc.stdout is not None
        self.proc, self.pipe = proc, proc.stdout.fileno()
        os.set_blocking(self.pipe, False)
        self.lines: list[tuple[float, str]] = []
        self.log: BinaryIO | None = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed by follow)
        self._lock = threading.Lock()
        self._partial = b""  # the start of a line whose end has not come yet
        self._at_end = False

    def pump(self) -> bool:
        """Take every line the pipe holds now; False once it is at its end (every writer has closed it)."""
        with self._lock:
            while not self._at_end:
                try:
                    chunk = os.read(self.pipe, 1 << 16)
                except BlockingIOError:
                    return True
                arrived = time.monotonic()
                if not chunk:
                    self._at_end = True
                    chunk = b"\n" if self._partial else b""  # a last line without its newline
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                self.lines += [(arrived, raw.decode(errors="replace").rstrip("\r")) for raw in complete]
                if self.log is not None:
                    self.log.write(b"".join(raw + b"\n" for raw in complete))
                    self.log.flush()
            return False

    def follow(self) -> None:
        """The thread's loop; it closes the pipe and the log at the end."""
        while self.pump():
            select.select([self.pipe], [], [], 1.0)
        with self._lock:
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            if self.log is not None:
                self.log.close()
                self.log = None
