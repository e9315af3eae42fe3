"""`warmpod store ls ROOT`: what a store holds (models, versions, which is current, bytes, source, when staged), on a
sidecar's store or a node's. Reads the store FORMAT (warmpod.store) only; dot entries (a node's .views and .volumes,
a model's .lock) are never models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmpod.errors import UsageError
from warmpod.store import VERSIONS, StoreError, current_version, read_manifest, version_numbers


@dataclass(frozen=True)
class VersionListing:
    version: str
    current: bool
    bytes: int  # the version's files on disk (manifest included)
    source: str | None  # the manifest's source URI (credentials already removed); None when unreadable
    created_at: str | None


@dataclass(frozen=True)
class ModelListing:
    name: str
    versions: tuple[VersionListing, ...]  # oldest first

    @property
    def bytes(self) -> int:
        return sum(v.bytes for v in self.versions)

    @property
    def current(self) -> str | None:
        return next((v.version for v in self.versions if v.current), None)


def list_store(root: Path) -> list[ModelListing]:
    """Every model directory of `root` (by name) with its published versions; a model whose load never published
    anything has none."""
    models = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if not (Path(entry.path) / VERSIONS).is_dir() and not (Path(entry.path) / "current").is_symlink():
            continue  # not a model directory
        models.append(list_model(root, entry.name))
    return models


def list_model(root: Path, name: str) -> ModelListing:
    current = current_version(root, name)
    versions = []
    for number in version_numbers(root, name):
        version = str(number)
        path = Path(root) / name / VERSIONS / version
        try:
            manifest: dict[str, Any] = read_manifest(root, name, version)
        except (OSError, StoreError):
            manifest = {}
        source = manifest.get("source")
        versions.append(
            VersionListing(
                version=version,
                current=version == current,
                bytes=tree_bytes(path),
                source=source.get("uri") if isinstance(source, dict) else None,
                created_at=manifest.get("created_at"),
            )
        )
    return ModelListing(name, tuple(versions))


def tree_bytes(path: Path) -> int:
    """The bytes of the regular files under `path` (0 when it vanished meanwhile: a version being collected)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total


def to_json(root: Path, models: Sequence[ModelListing]) -> dict[str, Any]:
    return {
        "root": str(root),
        "bytes": sum(m.bytes for m in models),
        "models": [
            {
                "name": m.name,
                "current": m.current,
                "bytes": m.bytes,
                "versions": [
                    {
                        "version": v.version,
                        "current": v.current,
                        "bytes": v.bytes,
                        "source": v.source,
                        "created_at": v.created_at,
                    }
                    for v in m.versions
                ],
            }
            for m in models
        ],
    }


def format_bytes(n: int) -> str:
    """1536 → '1.5 KiB' (binary units, as --max-bytes takes them)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def to_table(models: Sequence[ModelListing]) -> str:
    rows = [("MODEL", "VERSION", "CURRENT", "BYTES", "CREATED", "SOURCE")]
    for m in models:
        if not m.versions:
            rows.append((m.name, "-", "", "0 B", "-", "(nothing published)"))
        for v in m.versions:
            rows.append(
                (
                    m.name,
                    v.version,
                    "*" if v.current else "",
                    format_bytes(v.bytes),
                    v.created_at or "-",
                    v.source or "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in rows
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmpod store", description="Inspect a warmpod store (a sidecar's or a node's).")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list models and versions", description="List a store's models and versions.")
    ls.add_argument("root", type=Path, metavar="ROOT", help="the store root, e.g. /dev/shm/warmpod")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.root.is_dir():
            raise UsageError(f"ROOT {args.root}: not a directory (a store root, e.g. /dev/shm/warmpod)")
        models = list_store(args.root)
    except UsageError as e:
        print(f"warmpod store: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"warmpod store: error: ROOT {args.root}: cannot read: {e.strerror}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(args.root, models), indent=1))
    elif models:
        print(to_table(models))
    else:
        print(f"no models in {args.root}")
    return 0
