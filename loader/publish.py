"""The loader's side of the store: the single-writer lock, staging, atomic publish and garbage collection.

The format these functions keep is described once, in `warmpod.store` (FORMAT); readers never import this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warmpod.loader.errors import StoreBusy
from warmpod.store import (
    CURRENT,
    FORMAT,
    MANIFEST,
    STAGING,
    VERSIONS,
    StoreError,
    current_version,
    model_dir,
    read_manifest,
    version_dir,
    version_numbers,
)


@contextlib.contextmanager
def writer_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the model's single-writer lock; a second loader for the same model fails at once."""
    mdir = model_dir(root, name)
    mdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(mdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"another loader is writing model {name!r} in {root} (lock {mdir / '.lock'})") from None
        yield
    finally:
        os.close(fd)


def find_version(root: Path, name: str, digest: str) -> str | None:
    """The newest published version staged from a source with this identity digest."""
    for n in reversed(version_numbers(root, name)):
        try:
            if read_manifest(root, name, str(n))["source"]["digest"] == digest:
                return str(n)
        except (OSError, StoreError, KeyError):
            continue
    return None


def staging_dir(root: Path, name: str, digest: str) -> Path:
    """Where a load of the source with this identity digest builds its version."""
    return model_dir(root, name) / STAGING / digest[:32]


def clean_staging(root: Path, name: str, keep: Path | None = None) -> list[Path]:
    """Delete staging leftovers except `keep` (a same-identity load that can be resumed). Returns what was removed."""
    sdir = model_dir(root, name) / STAGING
    removed = []
    if sdir.is_dir():
        for p in sdir.iterdir():
            if keep is None or p != keep:
                _remove(p)
                removed.append(p)
    return removed


def publish_version(root: Path, name: str, staged: Path, manifest: dict[str, Any]) -> str:
    """Turn a complete, validated staging directory into the next version and point `current` at it."""
    mdir = model_dir(root, name)
    numbers = version_numbers(root, name)
    version = str((numbers[-1] if numbers else 0) + 1)
    manifest = {**manifest, "format": FORMAT, "model": name, "version": version}
    for path in staged.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    tmp = staged / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    tmp.chmod(0o444)
    tmp.rename(staged / MANIFEST)
    (mdir / VERSIONS).mkdir(exist_ok=True)
    staged.rename(version_dir(root, name, version))
    point_current(root, name, version)
    return version


def point_current(root: Path, name: str, version: str) -> None:
    mdir = model_dir(root, name)
    tmp = mdir / f".{CURRENT}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(f"{VERSIONS}/{version}")
    tmp.rename(mdir / CURRENT)
    _fsync_dir(mdir)


def gc_versions(root: Path, name: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` versions (never `current`). Returns the removed versions."""
    cur = current_version(root, name)
    numbers = version_numbers(root, name)
    doomed = [str(n) for n in numbers[: max(0, len(numbers) - keep)] if str(n) != cur]
    for v in doomed:
        _remove(version_dir(root, name, v))
    return doomed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
