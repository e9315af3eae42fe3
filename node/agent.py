"""The node agent (docs/node-design.md): one store per node, models staged from the admin's catalog with the loader,
handed to pods through read-only views, references recorded on disk, and the least recently used evicted under a
byte budget — never a version a pod references or maps.

The node store is the store FORMAT of `warmpod.store` with two dot directories beside the models:

    ROOT/.views/NAME/NAME        a read-only bind of ROOT/NAME (a symlink where mount(2) is not allowed): what a
                                 pod's volume binds, so the pod sees a store root that holds its model only
    ROOT/.volumes/VOLUME_ID.json one per published volume; reloaded at start, so references survive a restart

Garbage collection is the agent's, not the loader's: every load runs with `keep=KEEP_ALL`, so the loader never
removes a version; after a publish the agent removes the superseded versions nobody uses (the loader's rule of
`--keep 1`, minus what pods still map), and under budget pressure it evicts the least recently used. Both ask
`in_use()` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from warmpod.errors import UsageError, WarmpodError
from warmpod.loader.errors import AccessDenied, CapacityError, SourceNotFound
from warmpod.loader.load import LoadEvents, LoadRequest, LoadResult, load
from warmpod.loader.publish import find_version
from warmpod.loader.sources import open_source, redact
from warmpod.node.catalog import Catalog, CatalogEntry
from warmpod.node.errors import InvalidVolume, NodeError, OverBudget, SourceMissing, StagingTimeout
from warmpod.node.ls import ModelListing, format_bytes, list_model, list_store
from warmpod.node.mounts import bind_read_only, is_mount_point, mount_tmpfs, unmount
from warmpod.store import check_model_name, current_version, model_dir, version_dir, version_numbers

VIEWS = ".views"
VOLUMES = ".volumes"
KEEP_ALL = 1 << 30  # the loader's `keep` for every load: it removes nothing, the agent decides (it knows who uses what)
# A model handed out by ensure_model counts as in use for this long: the CSI call binds it and records the reference
# after ensure_model returns, and an eviction in between must not take it.
HANDOFF_GRACE_S = 60.0
PRELOAD_RETRY_S = 30.0  # a preload that failed is tried again after this long (or --watch, when given)
TMPFS_SOURCE = "warmpod-node"  # the source name of the tmpfs this agent mounts (seen again after a restart)
_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")

Fetched = Literal["peer", "origin"]
# The label of warmpod_node_staging_failures_total for the node's own errors; the loader's keep their `kind`.
_FAILURE_KINDS: dict[type[BaseException], str] = {SourceMissing: "source_missing", OverBudget: "over_budget"}


@dataclass(frozen=True)
class NodeConfig:
    """What `warmpod node` was told (every flag); the agent, the CSI server and the peer port read it."""

    root: Path
    catalog: Catalog
    max_bytes: int | None = None  # the budget (--max-bytes); None: only the filesystem limits it
    preload: tuple[str, ...] = ()
    watch_s: float | None = None
    publish_timeout_s: float = 120.0
    tmpfs: bool = False  # mount a tmpfs of max_bytes at root (where mount(2) is allowed)
    huge: bool = False  # huge=within_size on that tmpfs
    mount_views: bool = True  # False: views are symlinks (in-process tests; a node where mount(2) is not allowed)
    host: str = "0.0.0.0"
    port: int = 8479
    csi_socket: Path | None = None
    kubelet_dir: Path = Path("/var/lib/kubelet")
    node_id: str = ""
    peers: tuple[str, ...] = ()
    peer_token_file: Path | None = None
    proc_root: Path = Path("/proc")  # where in_use() reads every process's maps (tests pass a fake one)
    cgroup_root: Path = Path("/sys/fs/cgroup")  # the loader's capacity check

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise UsageError(f"--max-bytes must be positive, got {self.max_bytes}")
        if self.tmpfs and self.max_bytes is None:
            raise UsageError("--tmpfs needs --max-bytes (the size of the tmpfs)")
        if self.huge and not self.tmpfs:
            raise UsageError("--huge applies to the agent's own tmpfs: add --tmpfs (and --max-bytes)")
        if self.watch_s is not None and not self.watch_s > 0:
            raise UsageError(f"--watch must be a positive number of seconds, got {self.watch_s}")
        if not self.publish_timeout_s > 0:
            raise UsageError(f"--publish-timeout must be a positive number of seconds, got {self.publish_timeout_s}")
        for name in self.preload:
            if name not in self.catalog.models:
                known = ", ".join(sorted(self.catalog.models)) or "none"
                raise UsageError(f"--preload {name}: not in the catalog (it lists: {known})")
        if self.peers and self.peer_token_file is None:
            raise UsageError("--peers needs --peer-token-file (peers only answer requests that carry the token)")


class NodeLog(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


def json_log(event: str, **fields: Any) -> None:
    """One JSON line per event on stderr (the DaemonSet's log)."""
    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), file=sys.stderr, flush=True)


class NodeMetrics:
    """The agent's Prometheus metrics, declared once on a registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.model_bytes = Gauge(
            "warmpod_node_model_bytes", "Bytes of a model's versions in the node store", ["model"], registry=registry
        )
        self.requests = Counter(
            "warmpod_node_requests",
            "Models asked for (ensure_model): hit, already staged; miss, staged for the request",
            ["result"],
            registry=registry,
        )
        self.fetched = Counter(
            "warmpod_node_fetched_bytes", "Bytes staged into the node store, by where they came from", ["from"],
            registry=registry,
        )  # fmt: skip
        self.evictions = Counter(
            "warmpod_node_evictions", "Versions evicted to make room under --max-bytes", registry=registry
        )
        self.staging_failures = Counter(
            "warmpod_node_staging_failures", "Stagings that failed, by kind of failure", ["kind"], registry=registry
        )
        self.volumes = Gauge("warmpod_node_volumes_published", "Pod volumes referencing a model", registry=registry)
        self.budget = Gauge(
            "warmpod_node_budget_bytes", "The node store's byte budget (--max-bytes; 0: none)", registry=registry
        )
        for result in ("hit", "miss"):
            self.requests.labels(result)
        for where in ("peer", "origin"):
            self.fetched.labels(where)


# ---------------------------------------------------------------- pure core: who maps what, what to evict


def mapped_inodes(maps: str) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file mapped in one /proc/PID/maps text. The device is the file's filesystem
    (one tmpfs, however many bind mounts show it), so a pod's mapping of ROOT/NAME through its volume matches the
    agent's stat of the same file under ROOT."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] == "0":
            continue  # anonymous memory, the heap, the stack
        major, _, minor = fields[3].partition(":")
        with contextlib.suppress(ValueError):
            found.add((int(major, 16), int(minor, 16), int(fields[4])))
    return found


@dataclass(frozen=True)
class Eviction:
    """What one eviction removes: some superseded versions of a model, or the whole model (every version, its view)."""

    model: str
    versions: tuple[str, ...]
    bytes: int
    whole_model: bool


def eviction_order(
    models: Sequence[ModelListing], in_use: set[tuple[str, str]], protected: set[str], last_used: Mapping[str, int]
) -> list[Eviction]:
    """Everything that may go, in the order it goes: first the superseded (non-current) versions nobody uses, then
    whole models none of whose versions is in use (by then holding only their current version), least recently used
    first. `protected` models (being staged) are never candidates. A current version goes only with its whole model:
    `current` never points at nothing."""
    stale: list[tuple[int, int, Eviction]] = []
    whole: list[tuple[int, Eviction]] = []
    for m in models:
        if m.name in protected:
            continue
        used = last_used.get(m.name, -1)
        free = [v for v in m.versions if (m.name, v.version) not in in_use]
        stale += [(used, int(v.version), Eviction(m.name, (v.version,), v.bytes, False)) for v in free if not v.current]
        if len(free) == len(m.versions):
            rest = [v for v in m.versions if v.current]
            whole.append((used, Eviction(m.name, tuple(v.version for v in rest), sum(v.bytes for v in rest), True)))
    return [e for *_, e in sorted(stale, key=lambda t: t[:2])] + [e for _, e in sorted(whole, key=lambda t: t[0])]


def plan_eviction(candidates: Iterable[Eviction], to_free: int) -> list[Eviction] | None:
    """The first candidates, in order, that free at least `to_free` bytes; None when all of them cannot."""
    plan, freed = [], 0
    for e in candidates:
        if freed >= to_free:
            break
        plan.append(e)
        freed += e.bytes
    return plan if freed >= to_free else None


# ---------------------------------------------------------------- the agent


@dataclass
class _Preload:
    pending: set[str]
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.pending and not self.failed


class NodeAgent:
    """Stages, hands out, references and evicts the node's models. `start()` before use, `close()` after (or
    `async with`); both the HTTP app and the CSI server use one agent."""

    def __init__(
        self,
        config: NodeConfig,
        registry: CollectorRegistry,
        *,
        log: NodeLog = json_log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.registry, self.log, self.clock = config, registry, log, clock
        self.root = config.root
        self.metrics = NodeMetrics(registry)
        self.metrics.budget.set(config.max_bytes or 0)
        self.preload = _Preload(set(config.preload))
        self._mount_views = config.mount_views
        self._staging: dict[str, asyncio.Task[None]] = {}
        self._reserved: dict[str, int] = {}  # bytes promised to stagings in flight (counted as used)
        self._references: dict[str, dict[str, Any]] = {}
        self._ticks = itertools.count(1)
        self._last_used: dict[str, int] = {}  # model → tick of its last use (the LRU order)
        self._handed_out: dict[str, float] = {}  # model → clock() when ensure_model last returned it
        self._background: list[asyncio.Task[None]] = []

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Mount the tmpfs (when asked), reload references, make every staged model's view, start preloading and
        watching. Views and the tmpfs of an earlier run are kept: pods keep their models across a restart."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.config.tmpfs:
            self._mount_tmpfs()
        (self.root / VIEWS).mkdir(exist_ok=True)
        (self.root / VOLUMES).mkdir(exist_ok=True)
        self._load_references()
        staged = [m for m in list_store(self.root) if m.current is not None]
        for m in sorted(staged, key=lambda m: _mtime(version_dir(self.root, m.name, m.current or ""))):
            self._last_used[m.name] = next(self._ticks)  # the LRU order of an earlier run, as well as it is known
            self._make_view(m.name)
            self.metrics.model_bytes.labels(m.name).set(m.bytes)
        self.log("started", root=str(self.root), models=[m.name for m in staged], volumes=len(self._references))
        self._background.append(asyncio.create_task(self._preload(), name="preload"))
        if self.config.watch_s is not None:
            self._background.append(asyncio.create_task(self._watch(self.config.watch_s), name="watch"))

    async def close(self) -> None:
        """Stop preloading, watching and staging (a cancelled load removes its staging files). Unmounts nothing."""
        tasks = [*self._background, *self._staging.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._background.clear()

    async def __aenter__(self) -> NodeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        """Every --preload model is staged."""
        return self.preload.done

    # -------------------------------------------------------------- handing models out

    def view_dir(self, name: str) -> Path:
        """ROOT/.views/NAME: a store root holding only NAME, what a pod's volume binds."""
        return self.root / VIEWS / name

    def staged(self, name: str) -> bool:
        return current_version(self.root, name) is not None

    async def ensure_model(self, name: str, namespace: str | None) -> Path:
        """The model's view, staged first when it is not (peers, then the origin), waiting at most
        --publish-timeout. NotInCatalog, NamespaceDenied, SourceMissing, OverBudget, StagingTimeout."""
        entry = self.config.catalog.entry(name, namespace)
        self.touch(name)
        if self.staged(name):
            self.metrics.requests.labels("hit").inc()
        else:
            self.metrics.requests.labels("miss").inc()
            task = self._staging_task(entry)
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.publish_timeout_s)
            except TimeoutError:
                raise StagingTimeout(
                    f"model {name!r} is not staged yet after {self.config.publish_timeout_s:g} s (--publish-timeout); "
                    "staging goes on and a retry finds it"
                ) from None
        self._make_view(name)
        self._handed_out[name] = self.clock()
        return self.view_dir(name)

    def touch(self, name: str) -> None:
        """Mark the model used now (the LRU order): ensure_model, a reference, a peer reading it."""
        self._last_used[name] = next(self._ticks)

    def count_fetched(self, source: Fetched, n: int) -> None:
        """`n` more bytes were staged from a peer or from the origin."""
        self.metrics.fetched.labels(source).inc(n)

    # -------------------------------------------------------------- references

    def reference(self, volume_id: str, model: str, *, namespace: str | None, pod: str | None, target: Path) -> None:
        """Record that a pod's volume holds `model` (idempotent: the same volume again keeps its first time)."""
        path = self._volume_path(volume_id)
        if path is None:
            raise InvalidVolume(f"volume id {volume_id!r}: expected letters, digits, '.', '_', ':' or '-' (no '/')")
        try:
            check_model_name(model)
        except UsageError as e:
            raise InvalidVolume(str(e)) from None
        known = self._references.get(volume_id)
        record = {
            "volume_id": volume_id,
            "model": model,
            "namespace": namespace,
            "pod": pod,
            "target": str(target),
            "published_at": known["published_at"] if known and known["model"] == model else _now(),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        tmp.rename(path)
        self._references[volume_id] = record
        self.metrics.volumes.set(len(self._references))
        self.touch(model)

    def unreference(self, volume_id: str) -> dict[str, Any] | None:
        """Forget a volume; its record, or None when it is unknown (idempotent)."""
        record = self._references.pop(volume_id, None)
        path = self._volume_path(volume_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.metrics.volumes.set(len(self._references))
        return record

    def references(self) -> dict[str, dict[str, Any]]:
        """Volume id → its record (a copy)."""
        return {k: dict(v) for k, v in self._references.items()}

    def _volume_path(self, volume_id: str) -> Path | None:
        return self.root / VOLUMES / f"{volume_id}.json" if _VOLUME_ID.fullmatch(volume_id) else None

    def _load_references(self) -> None:
        for path in sorted((self.root / VOLUMES).glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                volume_id, model = record["volume_id"], record["model"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log("volume_record_unreadable", path=str(path), error=str(e))
                continue
            self._references[volume_id] = record
            self._last_used.setdefault(model, next(self._ticks))
        self.metrics.volumes.set(len(self._references))

    # -------------------------------------------------------------- what is in use

    def in_use(self) -> set[tuple[str, str]]:
        """(model, version) pairs never evicted: the current version of every referenced model (and of every model
        handed out in the last HANDOFF_GRACE_S, on its way to a reference), and every version some process maps."""
        now = self.clock()
        models = {r["model"] for r in self._references.values()}
        models |= {m for m, at in self._handed_out.items() if now - at < HANDOFF_GRACE_S}
        used = set()
        for name in models:
            with contextlib.suppress(UsageError):  # a record naming no valid model protects nothing
                version = current_version(self.root, name)
                if version is not None:
                    used.add((name, version))
        return used | self.mapped_versions()

    def mapped_versions(self) -> set[tuple[str, str]]:
        """Versions one of whose files some process maps (any /proc/PID/maps under config.proc_root)."""
        index = self._file_index()
        if not index:
            return set()
        mapped: set[tuple[str, str]] = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.config.proc_root):
                if not entry.name.isdigit():
                    continue
                try:
                    text = Path(entry.path, "maps").read_text(encoding="utf-8", errors="replace")
                except OSError:  # the process exited, or is not ours to read
                    continue
                mapped |= {index[key] for key in mapped_inodes(text) if key in index}
        return mapped

    def _file_index(self) -> dict[tuple[int, int, int], tuple[str, str]]:
        """(major, minor, inode) of every published file → its (model, version)."""
        index = {}
        for model in _model_names(self.root):
            for number in version_numbers(self.root, model):
                for folder, _, files in os.walk(version_dir(self.root, model, str(number))):
                    for name in files:
                        try:
                            st = os.lstat(os.path.join(folder, name))
                        except FileNotFoundError:
                            continue
                        index[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = (model, str(number))
        return index

    # -------------------------------------------------------------- staging

    def _staging_task(self, entry: CatalogEntry) -> asyncio.Task[None]:
        """The one staging of this model: a new one, or the one in flight (ensure_model, preload and the watcher
        share it)."""
        task = self._staging.get(entry.name)
        if task is None:
            task = asyncio.create_task(self._stage_model(entry), name=f"stage {entry.name}")
            self._staging[entry.name] = task
            task.add_done_callback(partial(self._staging_done, entry.name))
        return task

    def _staging_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._staging.get(name) is task:
            del self._staging[name]
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so a staging nobody waits for any more still reports
        if error is not None:
            kind = _FAILURE_KINDS.get(type(error)) or (error.kind if isinstance(error, WarmpodError) else "error")
            self.metrics.staging_failures.labels(kind).inc()
            self.log("staging_failed", model=name, kind=kind, error=str(error))

    async def _stage_model(self, entry: CatalogEntry) -> None:
        name = entry.name
        try:
            origin = await open_source(entry.source)
            try:
                digest, size = origin.digest, sum(f.size for f in origin.files)
            finally:
                await origin.aclose()
            existing = find_version(self.root, name, digest)
            if existing is not None and existing == current_version(self.root, name):
                return  # unchanged since the last staging
            need = 0 if existing is not None else size
            self._make_room(name, need)  # no await between the check and the reservation: one staging decides at a time
            self._reserved[name] = need
            try:
                result = await self.stage(entry, origin_digest=digest)
            finally:
                self._reserved.pop(name, None)
        except NodeError:
            raise
        except (SourceNotFound, AccessDenied) as e:
            raise SourceMissing(f"model {name!r}: the catalog's source cannot be read: {e}") from e
        except CapacityError as e:
            raise OverBudget(f"model {name!r}: the node store is full: {e}") from e
        except WarmpodError as e:
            error = NodeError(f"model {name!r}: staging from {redact(entry.source)} failed: {e}")
            error.kind = e.kind
            raise error from e
        self._published(name, result)

    async def stage(self, entry: CatalogEntry, *, origin_digest: str) -> LoadResult:
        """Fetch the model and publish it as a version with the origin's identity: the one seam where the peers are
        asked first (warmpod.node.peers), the origin otherwise. Raises the loader's errors."""
        if not self.config.peers or self.config.peer_token_file is None:
            return await self.load_from_origin(entry)
        from warmpod.node.peers import load_with_peers, read_token

        loaded = await load_with_peers(
            self.load_request(entry),
            list(self.config.peers),
            read_token(self.config.peer_token_file),
            self.load_events(),
            origin_digest=origin_digest,
        )
        self.log("staged", model=entry.name, peer=loaded.peer, peer_bytes=loaded.peer_bytes,
                 origin_bytes=loaded.origin_bytes, peer_error=loaded.peer_error, misses=loaded.misses)  # fmt: skip
        return loaded.result

    async def load_from_origin(self, entry: CatalogEntry) -> LoadResult:
        return await load(self.load_request(entry), self.load_events())

    def load_request(self, entry: CatalogEntry) -> LoadRequest:
        """The loader's request for a catalog entry: its source and pins, into this store, no loader gc."""
        return LoadRequest(
            uri=entry.source,
            model=entry.name,
            root=self.root,
            sha256=dict(entry.sha256),
            keep=KEEP_ALL,
            cgroup_root=self.config.cgroup_root,
            record_sha256=True,  # every file's digest in the manifest: what a peer checks a copy of this version by
        )

    def load_events(self) -> LoadEvents:
        """Load events that count the bytes fetched (warmpod_node_fetched_bytes_total)."""
        return _Counted(self)

    def _published(self, name: str, result: LoadResult) -> None:
        self._make_view(name)
        self.collect(name)
        if not result.reused:
            self.log("published", model=name, version=result.version, bytes=result.bytes,
                     seconds=round(result.seconds, 3))  # fmt: skip

    def collect(self, name: str, in_use: set[tuple[str, str]] | None = None) -> list[str]:
        """Remove the model's superseded versions that nobody uses (what the loader's gc would, minus the versions
        pods still map). Returns the removed versions."""
        current = current_version(self.root, name)
        stale = [str(n) for n in version_numbers(self.root, name) if str(n) != current]
        if stale:
            in_use = self.in_use() if in_use is None else in_use
            stale = [v for v in stale if (name, v) not in in_use]
            for version in stale:
                shutil.rmtree(version_dir(self.root, name, version), ignore_errors=True)
        self._update_bytes(name)
        return stale

    async def refresh(self) -> None:
        """Re-run the loader for every staged model in the catalog (a changed source publishes a new version; pods
        follow `current` and hot-swap), then collect what nobody uses any more. Failures are logged; what is
        published stays."""
        names = [m.name for m in list_store(self.root) if m.current is not None]
        tasks = [self._staging_task(self.config.catalog.models[n]) for n in names if n in self.config.catalog.models]
        if tasks:
            await asyncio.wait(tasks)  # not gather: cancelling the watcher must not cancel a shared staging
        in_use = self.in_use()
        for name in names:
            if name not in self._staging:
                self.collect(name, in_use)

    async def _watch(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except (OSError, WarmpodError) as e:  # the store stays as it is; the next round tries again
                self.log("watch_failed", error=str(e))

    async def _preload(self) -> None:
        while self.preload.pending or self.preload.failed:
            names = sorted(self.preload.pending | set(self.preload.failed))
            tasks = {n: self._staging_task(self.config.catalog.models[n]) for n in names if not self.staged(n)}
            if tasks:
                await asyncio.wait(tasks.values())
            self.preload.failed = {n: error for n, t in tasks.items() if (error := _failure(t)) is not None}
            self.preload.pending = set()
            for name in names:
                if name not in self.preload.failed:
                    self.touch(name)
                    self._make_view(name)
            if self.preload.failed:
                await asyncio.sleep(self.config.watch_s or PRELOAD_RETRY_S)
        self.log("preloaded", models=list(self.config.preload))

    # -------------------------------------------------------------- the budget

    def _make_room(self, name: str, need: int) -> None:
        """Evict until `need` more bytes fit the budget, or raise OverBudget (evicting nothing) when even evicting
        everything not in use cannot make room."""
        budget = self.config.max_bytes
        if budget is None or need == 0:
            return
        if need > budget:
            raise OverBudget(
                f"model {name!r} needs {format_bytes(need)}, more than the node budget --max-bytes "
                f"{format_bytes(budget)}; raise --max-bytes (and the tmpfs) or serve a smaller model"
            )
        models = list_store(self.root)
        used = sum(m.bytes for m in models) + sum(self._reserved.values())
        if used + need <= budget:
            return
        in_use = self.in_use()
        candidates = eviction_order(models, in_use, {name, *self._staging}, self._last_used)
        plan = plan_eviction(candidates, used + need - budget)
        if plan is None:
            held = sorted({m for m, _ in in_use} | set(self._staging) - {name})
            raise OverBudget(
                f"model {name!r} needs {format_bytes(need)}, but the node budget --max-bytes {format_bytes(budget)} "
                f"holds {format_bytes(used)} and evicting everything not in use frees only "
                f"{format_bytes(sum(e.bytes for e in candidates))} (in use or staging: {', '.join(held) or 'none'}); "
                "raise --max-bytes or wait for pods to release a model"
            )
        for eviction in plan:
            self._evict(eviction)

    def _evict(self, eviction: Eviction) -> None:
        name = eviction.model
        if eviction.whole_model:
            self._remove_view(name)
            shutil.rmtree(model_dir(self.root, name), ignore_errors=True)
            self._last_used.pop(name, None)
            self._handed_out.pop(name, None)
        else:
            for version in eviction.versions:
                shutil.rmtree(version_dir(self.root, name, version), ignore_errors=True)
        self._update_bytes(name)
        self.metrics.evictions.inc(len(eviction.versions))
        self.log("evicted", model=name, versions=list(eviction.versions), bytes=eviction.bytes,
                 whole_model=eviction.whole_model)  # fmt: skip

    def _update_bytes(self, name: str) -> None:
        if model_dir(self.root, name).is_dir():
            self.metrics.model_bytes.labels(name).set(list_model(self.root, name).bytes)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.model_bytes.remove(name)

    # -------------------------------------------------------------- mounts: the tmpfs and the views

    def _mount_tmpfs(self) -> None:
        assert self.config.max_bytes is not None
        if _mounted_here(self.root, TMPFS_SOURCE):
            self.log("tmpfs_kept", root=str(self.root))  # an earlier run's: it holds what pods use
            return
        huge = "within_size" if self.config.huge else None
        try:
            mount_tmpfs(self.root, size_bytes=self.config.max_bytes, huge=huge)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES):
                raise NodeError(f"--tmpfs: cannot mount a tmpfs at {self.root}: {e.strerror}") from None
            self.log("tmpfs_not_mounted", root=str(self.root), reason=f"mount(2) not permitted: {e.strerror}",
                     using="the directory as it is")  # fmt: skip
            return
        self.log("tmpfs_mounted", root=str(self.root), size_bytes=self.config.max_bytes, huge=huge)

    def _make_view(self, name: str) -> None:
        """ROOT/.views/NAME/NAME, once per model: a read-only bind of ROOT/NAME (or a symlink to it)."""
        inner = self.view_dir(name) / name
        if inner.is_symlink() or (self._mount_views and inner.is_dir() and is_mount_point(inner)):
            return
        inner.parent.mkdir(parents=True, exist_ok=True)
        if self._mount_views:
            inner.mkdir(exist_ok=True)
            try:
                bind_read_only(model_dir(self.root, name), inner)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES):
                    raise
                self._mount_views = False
                self.log("views_not_mounted", reason=f"mount(2) not permitted: {e.strerror}", using="symlinks")
            inner.rmdir()
        inner.symlink_to(Path("..", "..", name))

    def _remove_view(self, name: str) -> None:
        inner = self.view_dir(name) / name
        if inner.is_symlink():
            inner.unlink()
        elif inner.is_dir():
            if is_mount_point(inner):
                try:
                    unmount(inner)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    unmount(inner, lazy=True)  # someone stands in it; no pod (it would be in use)
            inner.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.view_dir(name).rmdir()


class _Counted(LoadEvents):
    """A load's bytes, counted as fetched from the origin (bytes_done) or from a peer's copy (mirror_bytes_done)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def bytes_done(self, n: int) -> None:
        self.agent.count_fetched("origin", n)

    def mirror_bytes_done(self, n: int) -> None:
        self.agent.count_fetched("peer", n)


def _failure(task: asyncio.Task[None]) -> str | None:
    """What a finished task failed with, or None when it succeeded."""
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return None if error is None else str(error)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _model_names(root: Path) -> list[str]:
    return [e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _mounted_here(path: Path, source: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether the mount on top at `path` is a tmpfs named `source` (this agent's, from an earlier run)."""
    where, top = str(path.resolve()), None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if fields[4] == where:
            tail = fields[fields.index("-") + 1 :]
            top = (tail[0], tail[1])
    return top == ("tmpfs", source)


# ---------------------------------------------------------------- the HTTP port: health, readiness, metrics

AGENT = web.AppKey("agent", NodeAgent)


def create_app(agent: NodeAgent) -> web.Application:
    """GET /healthz (alive), /ready (200 once every --preload model is staged, else 503), /metrics. The agent is
    started and closed by its owner (the CLI), since the CSI server shares it; peer routes are added beside these
    (warmpod.node.peers.add_peer_routes)."""
    app = web.Application()
    app[AGENT] = agent
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    return app


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _ready(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = {
        "ready": agent.ready,
        "preload": sorted(agent.config.preload),
        "pending": sorted(agent.preload.pending),
        "failed": agent.preload.failed,
    }
    return web.json_response(body, status=200 if agent.ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[AGENT].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
