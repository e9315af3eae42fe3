"""One load: source → staging → validate → publish. The orchestration between the pure rules and the store.

Order of work, and why:
1. List the source and compute its identity digest; a version with that digest already published is reused.
2. Take the model's writer lock; clean staging leftovers of other identities, keep this identity's complete files.
3. Fetch and validate every safetensors header and check every size before writing a byte.
4. Check capacity (filesystem and cgroup memory) for what still has to be written.
5. Stream the files; hash while streaming when digests are pinned.
6. Re-check the source identity (it must not have changed during the load), build the manifest, publish, GC.
A cancelled load (SIGTERM) removes its staging directory; a killed one (SIGKILL) leaves it for the next start.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warmpod import __version__
from warmpod.loader.capacity import Room, cgroup_room, check_room, filesystem_room
from warmpod.loader.errors import IntegrityError, InvalidModel, TransientError, UsageError, first_error
from warmpod.loader.publish import (
    clean_staging,
    find_version,
    gc_versions,
    point_current,
    publish_version,
    staging_dir,
    writer_lock,
)
from warmpod.loader.sources import INDEX_FILE, Source, SourceFile, identity_digest, open_source, redact
from warmpod.loader.stream import Events, Streamer, StreamSettings
from warmpod.safetensors_header import PREFIX_BYTES, Header, header_length, parse_header
from warmpod.store import check_model_name, current_version, version_dir

JOURNAL = ".warmpod-staging.json"
# Most headers fit in the first request; larger ones take a second read.
HEADER_PROBE_BYTES = 256 << 10


@dataclass(frozen=True)
class LoadRequest:
    uri: str
    model: str
    root: Path
    sha256: dict[str, str] = field(default_factory=dict)  # pinned digests by file path in the model
    settings: StreamSettings = field(default_factory=StreamSettings)
    keep: int = 2
    cgroup_root: Path = Path("/sys/fs/cgroup")

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.keep < 1:
            raise UsageError(f"--keep must be at least 1, got {self.keep}")
        for rel, hexdigest in self.sha256.items():
            if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest.lower()):
                raise UsageError(f"--sha256 {rel}=...: not a sha256 hex digest (64 hex characters)")


@dataclass(frozen=True)
class LoadResult:
    model: str
    version: str
    path: Path
    digest: str
    bytes: int  # bytes written in this run (0 when an identical version was already published)
    seconds: float
    reused: bool  # true when the source's identity was already published (nothing copied)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "path": str(self.path),
            "digest": self.digest,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "reused": self.reused,
        }


class LoadEvents(Events):
    """Events of a whole load (on top of the streamer's per-byte ones)."""

    def started(self, uri: str, model: str, files: list[SourceFile], to_copy: int) -> None:
        pass

    def file_done(self, rel: str, size: int, reused: bool) -> None:
        pass


async def load(req: LoadRequest, events: LoadEvents | None = None) -> LoadResult:
    """Stage `req.uri` as a new version of `req.model` (or reuse an identical one). Raises LoaderError."""
    events = events or LoadEvents()
    started = time.monotonic()
    source = await open_source(req.uri, req.settings.concurrency)
    try:
        unknown = sorted(set(req.sha256) - {f.rel for f in source.files})
        if unknown:
            raise UsageError(
                f"--sha256 names {', '.join(unknown)}, not in the source "
                f"(files: {', '.join(f.rel for f in source.files)})"
            )
        req.root.mkdir(parents=True, exist_ok=True)
        with writer_lock(req.root, req.model):
            return await _load_locked(req, source, events, started)
    finally:
        await source.aclose()


async def _load_locked(req: LoadRequest, source: Source, events: LoadEvents, started: float) -> LoadResult:
    digest = source.digest
    existing = find_version(req.root, req.model, digest)
    if existing is not None:
        if current_version(req.root, req.model) != existing:
            point_current(req.root, req.model, existing)
        clean_staging(req.root, req.model)
        return LoadResult(
            req.model,
            existing,
            version_dir(req.root, req.model, existing),
            digest,
            0,
            time.monotonic() - started,
            reused=True,
        )

    sdir = staging_dir(req.root, req.model, digest)
    clean_staging(req.root, req.model, keep=sdir)
    try:
        return await _stage_and_publish(req, source, events, started, sdir)
    except TransientError:
        _discard_incomplete(sdir, digest)  # completed files stay for the next attempt to reuse
        raise
    except BaseException:
        clean_staging(req.root, req.model)  # SIGTERM or a permanent error: leave no memory behind
        raise


async def _stage_and_publish(
    req: LoadRequest, source: Source, events: LoadEvents, started: float, sdir: Path
) -> LoadResult:
    digest = source.digest
    sdir.mkdir(parents=True, exist_ok=True)
    journal = _read_journal(sdir, digest)
    done = {
        f.rel: journal[f.rel]
        for f in source.files
        if f.rel in journal
        and journal[f.rel]["size"] == f.size
        and _size_of(sdir / f.rel) == f.size
        and (f.rel not in req.sha256 or journal[f.rel].get("sha256") == req.sha256[f.rel].lower())
    }

    with Streamer(source, req.settings, events) as streamer:
        headers = await _validated_headers(streamer, source.files)
        to_copy = [f for f in source.files if f.rel not in done]
        needed = sum(f.size for f in to_copy)
        check_room(needed, _rooms(req))
        events.started(req.uri, req.model, source.files, needed)
        for rel in done:
            events.file_done(rel, journal[rel]["size"], reused=True)

        async def stage(f: SourceFile) -> None:
            dest = sdir / f.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            sha = await streamer.copy_file(f, dest, want_sha256=f.rel in req.sha256)
            _check_digest(f, sha, req.sha256.get(f.rel))
            if f.rel in headers:
                _check_staged_header(dest, f.rel, headers[f.rel])
            done[f.rel] = {"size": f.size, "sha256": sha}
            _write_journal(sdir, digest, done)
            events.file_done(f.rel, f.size, reused=False)

        with first_error():
            async with asyncio.TaskGroup() as tg:
                for f in to_copy:
                    tg.create_task(stage(f))

    if identity_digest(await source.refresh()) != digest:
        raise IntegrityError(
            f"{redact(source.uri)}: source changed during load; nothing was published — retry when it is stable"
        )
    manifest = build_manifest(source, headers, done, started)
    if (sdir / INDEX_FILE).is_file():
        check_weight_map(_read_index(sdir / INDEX_FILE), manifest["tensors"])
    (sdir / JOURNAL).unlink()
    version = publish_version(req.root, req.model, sdir, manifest)
    gc_versions(req.root, req.model, req.keep)
    return LoadResult(
        req.model,
        version,
        version_dir(req.root, req.model, version),
        digest,
        needed,
        time.monotonic() - started,
        reused=False,
    )


async def _validated_headers(streamer: Streamer, files: list[SourceFile]) -> dict[str, Header]:
    async def one(f: SourceFile) -> tuple[str, Header]:
        if f.size < PREFIX_BYTES:
            raise InvalidModel(f"{f.rel}: file is {f.size} bytes, shorter than the 8-byte safetensors prefix")
        probe = await streamer.read(f, 0, min(f.size, HEADER_PROBE_BYTES))
        n = header_length(probe, f.rel)
        if PREFIX_BYTES + n > f.size:
            raise InvalidModel(f"{f.rel}: header length {n} runs past the end of the {f.size}-byte file")
        if PREFIX_BYTES + n > len(probe):
            probe += await streamer.read(f, len(probe), PREFIX_BYTES + n - len(probe))
        return f.rel, parse_header(probe[PREFIX_BYTES : PREFIX_BYTES + n], f.rel, f.size)

    pairs = await asyncio.gather(*(one(f) for f in files if f.is_safetensors))
    return dict(pairs)


def _check_staged_header(dest: Path, rel: str, expected: Header) -> None:
    """The staged bytes must carry the header that was validated before streaming."""
    with open(dest, "rb") as fh:
        n = header_length(fh.read(PREFIX_BYTES), rel)
        if parse_header(fh.read(n), rel, _size_of(dest)) != expected:
            raise IntegrityError(f"{rel}: staged header differs from the one validated before streaming")


def _check_digest(f: SourceFile, actual: str | None, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        raise IntegrityError(f"{f.rel}: sha256 mismatch: expected {expected.lower()}, actual {actual}")


def _rooms(req: LoadRequest) -> list[Room]:
    rooms = [filesystem_room(req.root)]
    cg = cgroup_room(req.cgroup_root)
    if cg is not None:
        rooms.append(cg)
    return rooms


def build_manifest(
    source: Source, headers: dict[str, Header], done: dict[str, dict[str, Any]], started: float
) -> dict[str, Any]:
    """The manifest of a staged version (see FORMAT in warmpod.store)."""
    tensors: dict[str, dict[str, Any]] = {}
    for rel in sorted(headers):
        h = headers[rel]
        for t in h.tensors:
            if t.name in tensors:
                raise InvalidModel(f"tensor {t.name!r} is in both {tensors[t.name]['file']} and {rel}")
            tensors[t.name] = {
                "file": rel,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offsets": [h.data_start + t.begin, h.data_start + t.end],
            }
    return {
        "source": {
            "uri": redact(source.uri),
            "identity": {f.rel: f.identity for f in source.files},
            "digest": source.digest,
        },
        "files": [
            {
                "path": f.rel,
                "size": f.size,
                "sha256": done[f.rel].get("sha256"),
                "kind": "safetensors" if f.is_safetensors else "aux",
            }
            for f in source.files
        ],
        "tensors": tensors,
        "loader_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "load_seconds": round(time.monotonic() - started, 4),
    }


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{INDEX_FILE}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise InvalidModel(f'{INDEX_FILE}: must be an object with a "weight_map" object')
    return index


def check_weight_map(index: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> None:
    """A sharded checkpoint's index must agree with its shards' headers, tensor for tensor."""
    weight_map: dict[str, str] = index["weight_map"]
    for name, shard in sorted(weight_map.items()):
        found = tensors.get(name)
        if found is None:
            raise InvalidModel(f"{INDEX_FILE}: maps tensor {name!r} to {shard}, but no shard holds it")
        if found["file"] != shard:
            raise InvalidModel(f"{INDEX_FILE}: maps tensor {name!r} to {shard}, but it is in {found['file']}")
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
        raise InvalidModel(f"{INDEX_FILE}: shards hold tensors the index does not list: {', '.join(unlisted[:5])}")


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _discard_incomplete(sdir: Path, digest: str) -> None:
    done = _read_journal(sdir, digest)
    for path in sdir.rglob("*"):
        rel = str(path.relative_to(sdir))
        if path.is_file() and rel not in done and path.name != JOURNAL:
            path.unlink()


def _read_journal(sdir: Path, digest: str) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((sdir / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("digest") != digest:
        return {}
    done: dict[str, dict[str, Any]] = data.get("done", {})
    return done


def _write_journal(sdir: Path, digest: str, done: dict[str, dict[str, Any]]) -> None:
    tmp = sdir / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps({"digest": digest, "done": done}))
    tmp.rename(sdir / JOURNAL)
