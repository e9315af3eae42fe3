"""One load: source → staging → validate → publish. The orchestration between the pure rules and the store.

Order of work, and why:
1. List the source and compute its identity digest; a version with that digest already published is reused.
2. Take the model's writer lock; clean staging leftovers of other identities, keep this identity's complete files.
3. Fetch and validate every safetensors header and check every size before writing a byte.
4. Check capacity (filesystem and cgroup memory) for what still has to be written.
5. Stream the files; hash while streaming when digests are pinned (or every file, with record_sha256 or a mirror).
6. Re-check the source identity (it must not have changed during the load), build the manifest, publish, GC.
A cancelled load (SIGTERM) removes its staging directory; a killed one (SIGKILL) leaves it for the next start.

A converting load (LoadRequest.dtype, `warmpod load --dtype bf16`) stages each safetensors file as above, then
writes its converted copy beside it in staging (one file at a time, so the store's peak is the source files plus
the largest converted one: the capacity check counts that) and renames it over the source copy; only converted
files are published. Its identity digest includes the dtype (`identity_digest`), so its version is never reused for
an as-is load of the same source, nor the other way round. It reads the origin only: a mirror is ignored (with the
reason in LoadResult.mirror_error and the mirror_abandoned event), since a mirror holds another staging's bytes.

A mirror load (LoadRequest.mirror: a copy of the same source elsewhere, e.g. a peer node's published version)
lists the origin as always and reads the bytes from the mirror instead: the origin's listing decides what is
staged, and the version records the origin's URI and identity, as if loaded from it. The mirror is trusted for
nothing (see `Mirror`); its first failure, of any kind, ends its use, and the rest comes from the origin:
files it supplied and that verified stay (the staging journal holds them), a file that failed is rewritten.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warmpod import __version__
from warmpod.errors import WarmpodError
from warmpod.loader.capacity import Room, cgroup_room, check_room, filesystem_room
from warmpod.loader.convert import TARGETS, ConvertedLayout, plan_conversion, write_converted
from warmpod.loader.errors import IntegrityError, InvalidModel, TransientError, UsageError, first_error
from warmpod.loader.plan import RetryPolicy
from warmpod.loader.publish import (
    clean_staging,
    find_version,
    gc_versions,
    point_current,
    publish_version,
    staging_dir,
    writer_lock,
)
from warmpod.loader.sources import (
    INDEX_FILE,
    MirrorSource,
    Source,
    SourceFile,
    identity_digest,
    open_mirror,
    open_source,
    plain_md5,
    redact,
)
from warmpod.loader.stream import Events, Streamer, StreamSettings
from warmpod.safetensors_header import PREFIX_BYTES, Header, header_length, parse_header
from warmpod.store import check_model_name, current_version, read_manifest, version_dir

JOURNAL = ".warmpod-staging.json"
# Most headers fit in the first request; larger ones take a second read.
HEADER_PROBE_BYTES = 256 << 10


@dataclass(frozen=True)
class Mirror:
    """Another copy of the source to read the bytes from, over HTTP(S): file REL is at `url`/REL.

    Trusted for nothing. The load takes a file from it only when the mirror was staged from the same source identity
    (`digest` equals the origin's digest now) and its sizes agree with the origin's listing; every file it supplies
    must then have the size the origin lists, the sha256 `sha256` names (the mirror's manifest), the request's
    pinned sha256 and, where the origin's ETag is a plain MD5 (S3 single-part upload), that MD5. A file without a
    sha256 here comes from the origin.
    """

    url: str
    digest: str  # the source identity digest the mirror's copy was staged from
    sha256: Mapping[str, str]  # per file path: the mirror's sha256 (its manifest's)
    sizes: Mapping[str, int] = field(default_factory=dict)  # per file path: the mirror's sizes, where known
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # sent with every request (a token)


@dataclass(frozen=True)
class LoadRequest:
    uri: str
    model: str
    root: Path
    sha256: dict[str, str] = field(default_factory=dict)  # pinned digests by file path in the model
    settings: StreamSettings = field(default_factory=StreamSettings)
    keep: int = 2
    cgroup_root: Path = Path("/sys/fs/cgroup")
    # Hash every file while streaming and record it in the manifest (pinned or not): a version that others verify
    # against (a node's, served to peers) needs them. Implied by a mirror.
    record_sha256: bool = False
    mirror: Mirror | None = None
    # Convert floating-point tensors to this safetensors dtype while staging (warmpod.loader.convert); None: as is.
    dtype: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.dtype is not None and self.dtype not in TARGETS.values():
            raise UsageError(f"dtype {self.dtype!r}: the loader converts to {', '.join(sorted(TARGETS.values()))}")
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
    bytes: int  # source bytes staged in this run (0 when an identical version was already published)
    seconds: float
    reused: bool  # true when the source's identity was already published (nothing copied)
    mirror: str | None = None  # the mirror's URI (redacted) when the request named one
    mirror_bytes: int = 0  # bytes fetched from the mirror (a file that failed to verify included)
    origin_bytes: int = 0  # bytes fetched from the origin (headers included, listings not)
    mirror_error: str | None = None  # why the mirror was refused or stopped being used; None: it served its files
    dtype: str | None = None  # the dtype floating-point tensors were converted to (None: staged as the source has them)
    converted_tensors: int = 0  # tensors converted (0 with a dtype: the source had no floating-point tensor to convert)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "path": str(self.path),
            "digest": self.digest,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "reused": self.reused,
        }
        if self.dtype is not None:
            out |= {"dtype": self.dtype, "converted_tensors": self.converted_tensors}
        if self.mirror is not None:
            out |= {
                "mirror": self.mirror,
                "mirror_bytes": self.mirror_bytes,
                "origin_bytes": self.origin_bytes,
                "mirror_error": self.mirror_error,
            }
        return out


class LoadEvents(Events):
    """Events of a whole load (on top of the streamer's per-byte ones)."""

    def started(self, uri: str, model: str, files: list[SourceFile], to_copy: int) -> None:
        pass

    def file_done(self, rel: str, size: int, reused: bool) -> None:
        pass

    def mirror_bytes_done(self, n: int) -> None:
        """`n` more bytes are in the store, from the mirror (`bytes_done` hears the origin's). Progress by
        default; a caller that counts bytes by where they came from overrides both."""
        self.bytes_done(n)

    def mirror_abandoned(self, mirror: str, reason: str) -> None:
        """The mirror (redacted URI) was refused or failed; what it has not supplied comes from the origin."""

    def file_converted(self, rel: str, layout: ConvertedLayout, seconds: float) -> None:
        """A staged file was converted to `layout.target` (or, `layout.identity`, had nothing to convert)."""


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
    digest = identity_digest(source.files, req.dtype)
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
            mirror=redact(req.mirror.url) if req.mirror else None,
            dtype=req.dtype,
            converted_tensors=_converted_count(read_manifest(req.root, req.model, existing)),
        )

    sdir = staging_dir(req.root, req.model, digest)
    clean_staging(req.root, req.model, keep=sdir)
    try:
        return await _stage_and_publish(req, source, events, started, sdir, digest)
    except TransientError:
        _discard_incomplete(sdir, digest)  # completed files stay for the next attempt to reuse
        raise
    except BaseException:
        clean_staging(req.root, req.model)  # SIGTERM or a permanent error: leave no memory behind
        raise


async def _stage_and_publish(
    req: LoadRequest, source: Source, events: LoadEvents, started: float, sdir: Path, digest: str
) -> LoadResult:
    record_all = req.record_sha256 or req.mirror is not None
    sdir.mkdir(parents=True, exist_ok=True)
    journal = _read_journal(sdir, digest)
    done = {
        f.rel: journal[f.rel]
        for f in source.files
        if f.rel in journal
        and journal[f.rel]["size"] == f.size
        and _size_of(sdir / f.rel) == journal[f.rel].get("staged_size", f.size)
        and (f.rel not in req.sha256 or journal[f.rel].get("sha256") == req.sha256[f.rel].lower())
        and (not record_all or journal[f.rel].get("sha256"))
    }

    from_origin = _CountedEvents(events)
    mirror = await _MirrorUse.open(req, source, events)
    try:
        with Streamer(source, req.settings, from_origin) as streamer:
            mirror.share_limits(streamer)
            headers, mirror_headers = await _validated_headers(streamer, source.files, mirror, from_origin)
            layouts = {rel: plan_conversion(h, req.dtype, rel) for rel, h in headers.items()} if req.dtype else {}
            to_copy = [f for f in source.files if f.rel not in done]
            needed = sum(f.size for f in to_copy)
            # Files convert one at a time, each beside its source copy: the peak is every source plus one converted.
            converting = [layouts[f.rel].file_size for f in to_copy if f.rel in layouts and not layouts[f.rel].identity]
            check_room(needed + max(converting, default=0), _rooms(req))
            one_at_a_time = asyncio.Lock()
            events.started(req.uri, req.model, source.files, needed)
            for rel in done:
                events.file_done(rel, journal[rel]["size"], reused=True)

            async def stage(f: SourceFile) -> None:
                dest = sdir / f.rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                sha = await mirror.copy_verified(f, dest, req.sha256.get(f.rel), headers.get(f.rel))
                if sha is None:  # from the origin (a failed mirror copy is overwritten: the file is truncated first)
                    sha = await streamer.copy_file(f, dest, want_sha256=record_all or f.rel in req.sha256)
                    _check_digest(f, sha, req.sha256.get(f.rel))
                    if f.rel in mirror_headers:  # validated from the mirror's bytes: validate the origin's now
                        headers[f.rel] = _staged_header(dest, f.rel)
                    elif f.rel in headers:
                        _check_staged_header(dest, f.rel, headers[f.rel])
                entry: dict[str, Any] = {"size": f.size, "sha256": sha}
                layout = layouts.get(f.rel)
                if layout is not None:  # journaled once converted: a resumed load never takes a source copy for done
                    async with one_at_a_time:
                        entry |= await _convert(dest, layout, sha, events)
                done[f.rel] = entry
                _write_journal(sdir, digest, done)
                events.file_done(f.rel, f.size, reused=False)

            with first_error():
                async with asyncio.TaskGroup() as tg:
                    for f in to_copy:
                        tg.create_task(stage(f))
    finally:
        await mirror.aclose()

    if identity_digest(await source.refresh(), req.dtype) != digest:
        raise IntegrityError(
            f"{redact(source.uri)}: source changed during load; nothing was published — retry when it is stable"
        )
    staged_headers = {rel: layouts[rel].header if rel in layouts else h for rel, h in headers.items()}
    manifest = build_manifest(source, staged_headers, done, started, digest)
    if req.dtype is not None:
        manifest["conversion"] = conversion_record(req.dtype, source.digest, layouts, done)
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
        mirror=redact(req.mirror.url) if req.mirror else None,
        mirror_bytes=mirror.fetched,
        origin_bytes=from_origin.bytes,
        mirror_error=mirror.error,
        dtype=req.dtype,
        converted_tensors=_converted_count(manifest),
    )


async def _convert(dest: Path, layout: ConvertedLayout, source_sha: str | None, events: LoadEvents) -> dict[str, Any]:
    """Replace the staged source copy `dest` by its conversion (written beside it, then renamed over it: staging
    never holds a half-converted file under the file's name). Returns the journal's fields for the converted file;
    its sha256 is computed whenever the source's was (the manifest records the staged bytes' own)."""
    began = time.monotonic()
    if layout.identity:
        events.file_converted(layout.file, layout, time.monotonic() - began)
        return {}
    partial = dest.with_name(dest.name + ".converting")
    sha = await asyncio.to_thread(write_converted, dest, partial, layout, source_sha is not None)
    partial.rename(dest)
    events.file_converted(layout.file, layout, time.monotonic() - began)
    return {"staged_size": layout.file_size, "staged_sha256": sha}


def conversion_record(
    dtype: str, source_digest: str, layouts: Mapping[str, ConvertedLayout], done: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The manifest's "conversion" record (see FORMAT in warmpod.store): the target dtype, the identity digest of the
    source as it is, and per safetensors file what was converted and the source file's size and sha256."""
    return {
        "dtype": dtype,
        "source_digest": source_digest,
        "files": {rel: layouts[rel].record(done[rel]["size"], done[rel].get("sha256")) for rel in sorted(layouts)},
    }


def _converted_count(manifest: Mapping[str, Any]) -> int:
    files = (manifest.get("conversion") or {}).get("files", {})
    return sum(sum(entry["converted"].values()) for entry in files.values())


def plan_mirror(
    files: Sequence[SourceFile], digest: str, mirror: Mirror, pins: Mapping[str, str]
) -> tuple[frozenset[str], str | None]:
    """The files a load may take from `mirror`, and why it takes none (None when it may take some). Pure.

    A mirror of another source identity, or whose sizes or sha256 contradict the origin's listing or the pins, is
    refused whole: it is not a copy of this source. A file it has no sha256 for is left to the origin."""
    if mirror.digest != digest:
        return frozenset(), f"it holds source identity {mirror.digest[:16]}, the origin is now {digest[:16]}"
    for f in files:
        size, sha, pin = mirror.sizes.get(f.rel), mirror.sha256.get(f.rel), pins.get(f.rel)
        if size is not None and size != f.size:
            return frozenset(), f"{f.rel} is {size} bytes there, {f.size} at the origin"
        if sha is not None and pin is not None and sha.lower() != pin.lower():
            return frozenset(), f"{f.rel}: its sha256 {sha.lower()} is not the pinned {pin.lower()}"
    usable = frozenset(f.rel for f in files if _is_sha256(mirror.sha256.get(f.rel)))
    return usable, (None if usable else "it names no sha256 for any file of the source")


def _is_sha256(value: str | None) -> bool:
    return value is not None and len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())


class _CountedEvents(Events):
    """The streamer's events, passed on, with the bytes of one source counted (and told to `bytes_done`, the
    inner events' own or another of their hooks)."""

    def __init__(self, inner: Events, bytes_done: Callable[[int], None] | None = None) -> None:
        self.inner, self.bytes = inner, 0
        self.tell = bytes_done or inner.bytes_done

    def bytes_done(self, n: int) -> None:
        self.bytes += n
        self.tell(n)

    def retry(self, where: str, attempt: int, delay: float, error: str) -> None:
        self.inner.retry(where, attempt, delay, error)


class _MirrorUse:
    """One load's use of its mirror: the files it may still supply, the first failure that ended its use, the bytes
    it sent. Without a mirror (or with one refused) it supplies nothing and the load reads the origin alone."""

    # One attempt per range: any failure ends the mirror's use; retrying is the origin's job.
    RETRY = RetryPolicy(attempts=1)

    def __init__(self, events: LoadEvents, where: str, source: MirrorSource | None, usable: frozenset[str]) -> None:
        self.events, self.where, self.source, self.usable = events, where, source, usable
        self.counted = _CountedEvents(events, events.mirror_bytes_done)
        self.streamer: Streamer | None = None
        self.error: str | None = None
        self.sha256: Mapping[str, str] = {}

    @classmethod
    async def open(cls, req: LoadRequest, origin: Source, events: LoadEvents) -> _MirrorUse:
        if req.mirror is None:
            return cls(events, "", None, frozenset())
        if req.dtype is not None:
            use = cls(events, redact(req.mirror.url), None, frozenset())
            use.abandon(f"a --dtype {req.dtype} load reads the origin only (a mirror holds another staging's bytes)")
            return use
        usable, refused = plan_mirror(origin.files, origin.digest, req.mirror, req.sha256)
        use = cls(events, redact(req.mirror.url), None, usable)
        if refused is not None:
            use.abandon(refused)
            return use
        use.source = await open_mirror(req.mirror.url, origin.files, req.mirror.headers)
        use.sha256 = {rel: sha.lower() for rel, sha in req.mirror.sha256.items()}
        return use

    def share_limits(self, origin: Streamer) -> None:
        if self.source is not None:
            self.streamer = origin.sharing_limits(self.source, self.RETRY, self.counted)

    @property
    def fetched(self) -> int:
        return self.counted.bytes

    def serves(self, f: SourceFile) -> bool:
        return self.streamer is not None and self.error is None and f.rel in self.usable

    def abandon(self, reason: str) -> None:
        """End the mirror's use: no request more goes to it (a file in flight from it fails, and comes from the
        origin too)."""
        if self.error is None:
            self.error = reason
            if self.source is not None:
                self.source.end(reason)
            self.events.mirror_abandoned(self.where, reason)

    def _there(self, f: SourceFile) -> SourceFile:
        """The mirror's file for the origin's `f` (same path in the model, same size and identity)."""
        assert self.source is not None
        return next(m for m in self.source.files if m.rel == f.rel)

    async def read(self, f: SourceFile, offset: int, length: int) -> bytes:
        assert self.streamer is not None
        data = await self.streamer.read(self._there(f), offset, length)
        self.counted.bytes += len(data)
        return data

    async def copy_verified(self, f: SourceFile, dest: Path, pin: str | None, header: Header | None) -> str | None:
        """`f` copied from the mirror to `dest` and verified: its sha256. None when the mirror does not serve it or
        failed on it (then its use ends, and `dest` holds bytes the origin's copy will overwrite)."""
        if not self.serves(f):
            return None
        assert self.streamer is not None
        md5 = plain_md5(f.identity)
        try:
            algorithms = ("sha256", "md5") if md5 else ("sha256",)
            digests = await self.streamer.copy_file_hashed(self._there(f), dest, algorithms)
            sha = digests["sha256"]
            if sha != self.sha256[f.rel]:
                raise IntegrityError(f"{f.rel}: its bytes do not match its manifest (sha256 {sha})")
            _check_digest(f, sha, pin)
            if md5 is not None and digests["md5"] != md5:
                raise IntegrityError(f"{f.rel}: its bytes are not the origin's (MD5 {digests['md5']}, ETag {md5})")
            if header is not None:
                _check_staged_header(dest, f.rel, header)
        except Exception as e:  # anything, the network or the bytes: the origin has the rest
            self.abandon(_reason(f, e))
            return None
        return sha

    async def aclose(self) -> None:
        if self.source is not None:
            await self.source.aclose()


def _reason(f: SourceFile, e: Exception) -> str:
    """Why a mirror failed on `f`, for a log line: our errors name the file already."""
    return str(e) if isinstance(e, WarmpodError) else f"{f.rel}: {type(e).__name__}: {e}"


async def _validated_headers(
    streamer: Streamer, files: list[SourceFile], mirror: _MirrorUse, from_origin: _CountedEvents
) -> tuple[dict[str, Header], set[str]]:
    """Every safetensors file's header, fetched and validated before a byte is staged, and the files whose header
    came from the mirror (checked against the mirror's manifest only once the file is staged)."""
    from_mirror: set[str] = set()

    async def origin_read(f: SourceFile, offset: int, length: int) -> bytes:
        data = await streamer.read(f, offset, length)
        from_origin.bytes += len(data)
        return data

    async def one(f: SourceFile) -> tuple[str, Header]:
        if mirror.serves(f):
            try:
                header = await _read_header(mirror.read, f)
                from_mirror.add(f.rel)
                return f.rel, header
            except Exception as e:  # a mirror that fails, or sends a broken header, is done: ask the origin
                mirror.abandon(_reason(f, e))
        return f.rel, await _read_header(origin_read, f)

    pairs = await asyncio.gather(*(one(f) for f in files if f.is_safetensors))
    return dict(pairs), from_mirror


async def _read_header(read: Callable[[SourceFile, int, int], Awaitable[bytes]], f: SourceFile) -> Header:
    if f.size < PREFIX_BYTES:
        raise InvalidModel(f"{f.rel}: file is {f.size} bytes, shorter than the 8-byte safetensors prefix")
    probe = await read(f, 0, min(f.size, HEADER_PROBE_BYTES))
    n = header_length(probe, f.rel)
    if PREFIX_BYTES + n > f.size:
        raise InvalidModel(f"{f.rel}: header length {n} runs past the end of the {f.size}-byte file")
    if PREFIX_BYTES + n > len(probe):
        probe += await read(f, len(probe), PREFIX_BYTES + n - len(probe))
    return parse_header(probe[PREFIX_BYTES : PREFIX_BYTES + n], f.rel, f.size)


def _staged_header(dest: Path, rel: str) -> Header:
    """The header of a staged file, validated (InvalidModel when it breaks the safetensors rules)."""
    with open(dest, "rb") as fh:
        n = header_length(fh.read(PREFIX_BYTES), rel)
        return parse_header(fh.read(n), rel, _size_of(dest))


def _check_staged_header(dest: Path, rel: str, expected: Header) -> None:
    """The staged bytes must carry the header that was validated before streaming."""
    if _staged_header(dest, rel) != expected:
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
    source: Source,
    headers: dict[str, Header],
    done: dict[str, dict[str, Any]],
    started: float,
    digest: str,
) -> dict[str, Any]:
    """The manifest of a staged version (see FORMAT in warmpod.store). `headers`: the staged files' (converted ones
    when the load converts); `digest`: the version's identity digest (the source's, with the dtype if converted)."""
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
            "digest": digest,
        },
        "files": [
            {
                "path": f.rel,
                "size": done[f.rel].get("staged_size", f.size),
                "sha256": done[f.rel].get("staged_sha256", done[f.rel].get("sha256")),
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
