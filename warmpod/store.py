"""The warmpod store: immutable model versions on shared memory, published atomically, read zero-copy.

The bottom floor: this module is the format, its names and its reader (`open_model`, `StagedModel`,
`VersionWatcher`). The loader's writer (`warmpod.loader.publish`), the server and the edge import it; it imports
nothing of theirs. Readers get the store's own errors (`StoreError` and below), never bare built-ins.

FORMAT (warmpod-store/1)
========================

A store is a directory ROOT (default /dev/shm/warmpod). For each model NAME:

    ROOT/NAME/versions/N/         a published version; N is a decimal integer, increasing per model
    ROOT/NAME/versions/N/manifest.json
    ROOT/NAME/versions/N/<files>  the model's files at their source-relative paths
    ROOT/NAME/current             symlink to "versions/N", the version readers use
    ROOT/NAME/staging/            the loader's work area; readers MUST NOT look inside
    ROOT/NAME/.lock               flock(2)ed exclusively by the one loader writing NAME

Rules:
1. NAME MUST match [A-Za-z0-9][A-Za-z0-9._-]{0,127} (no "/", no "..", not empty).
2. A version directory MUST be complete before it appears under versions/: the loader builds it in staging/, writes
   manifest.json last, and renames the directory into versions/ (rename is atomic on one filesystem).
3. Published files MUST NOT change: they are mode 0444 and nobody writes them. Every *.safetensors file MUST pass
   the safetensors header rules (see warmpod.safetensors_header) and be byte-identical to its source, or, in a
   converted version (manifest "conversion"), hold the same tensors with every F64/F32/F16 one converted to the
   conversion's dtype (round to nearest even) and every other one byte-identical.
4. `current` MUST only be replaced by renaming a fresh symlink over it, and only to a complete version.
5. manifest.json is a JSON object with: "format" ("warmpod-store/1"), "model", "version", "source" ({"uri": with
   credentials removed, "identity": per-file identity (size, ETag/mtime/...), "digest": sha256 of that identity, and
   of the conversion's dtype in a converted version}), "files" ([{"path", "size", "sha256" (hex or null when not
   computed), "kind": "safetensors"|"aux"}]: the published bytes' size and sha256),
   "tensors" ({name: {"file", "dtype", "shape", "offsets": [begin, end] absolute in the file}}),
   "loader_version", "created_at" (RFC 3339 UTC), "load_seconds"; a converted version also has "conversion"
   ({"dtype": e.g. "BF16", "source_digest": the source identity's digest without the dtype, "files": {path:
   {"source_size", "source_sha256" (hex or null), "converted": {source dtype: tensors}, "kept": {dtype: tensors}}}}).
6. The loader keeps the newest K versions (default 2) plus `current`, and removes older ones. A reader that has
   mapped a version keeps valid memory after removal (tmpfs frees pages only when the last mapping goes); a reader
   opening a version MUST retry from `current` if a file vanished under it.
7. Leftovers in staging/ belong to a crashed loader: the next loader reuses complete files of the same source
   identity and deletes everything else there before writing.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from warmpod.errors import UsageError, WarmpodError

if TYPE_CHECKING:
    import torch

FORMAT = "warmpod-store/1"
DEFAULT_ROOT = Path("/dev/shm/warmpod")
MANIFEST = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"
STAGING = "staging"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(WarmpodError):
    """The store cannot give what was asked: the base of the store's errors."""


class NotPublished(StoreError):
    """The model has no published version (yet: a reader may wait for the loader)."""

    exit_code = 3
    kind = "not_published"


class CorruptVersion(StoreError):
    """A published version that breaks the format: an unreadable manifest, a dtype this reader cannot map. The store
    is damaged, not the model: a server stops with exit 1 (as on any unexpected failure), and restaging fixes it."""

    exit_code = 1
    kind = "invalid"


class InvalidWeights(StoreError):
    """A file breaks the safetensors header rules (warmpod.safetensors_header), so it may not enter the store."""

    exit_code = 5
    kind = "invalid"


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


def model_dir(root: Path, name: str) -> Path:
    return Path(root) / check_model_name(name)


def version_dir(root: Path, name: str, version: str) -> Path:
    return model_dir(root, name) / VERSIONS / version


def version_numbers(root: Path, name: str) -> list[int]:
    vdir = model_dir(root, name) / VERSIONS
    if not vdir.is_dir():
        return []
    return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())


def current_version(root: Path, name: str) -> str | None:
    """The version `current` points to, or None when nothing is published."""
    try:
        target = os.readlink(model_dir(root, name) / CURRENT)
    except FileNotFoundError:
        return None
    return Path(target).name


def read_manifest(root: Path, name: str, version: str) -> dict[str, Any]:
    """A published version's manifest. FileNotFoundError if the version is gone; CorruptVersion if unreadable."""
    path = version_dir(root, name, version) / MANIFEST
    with open(path, encoding="utf-8") as f:
        return _manifest_from(f.read(), path)


def _manifest_from(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CorruptVersion(f"{path}: the manifest is not JSON ({e}): restage the model with `warmpod load`") from None
    if not isinstance(data, dict):
        raise CorruptVersion(f"{path}: the manifest must be a JSON object (store FORMAT rule 5)")
    return data


# ---------------------------------------------------------------- reader side (server, edge)

_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


@dataclass
class StagedModel:
    """One published version, mapped read-only. Tensors are views of the mappings: no byte is copied.

    The mappings stay valid after the version is garbage-collected; they are released when the last view goes.
    """

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    maps: dict[str, mmap.mmap] = field(repr=False)

    @property
    def tensor_index(self) -> dict[str, TensorEntry]:
        return {
            n: TensorEntry(n, t["file"], t["dtype"], tuple(t["shape"]), t["offsets"][0], t["offsets"][1])
            for n, t in self.manifest["tensors"].items()
        }

    @property
    def conversion(self) -> dict[str, Any] | None:
        """How the loader converted this version's tensors (FORMAT rule 5: "dtype", "source_digest", per file what was
        converted), or None when they are as the source has them."""
        conversion = self.manifest.get("conversion")
        return conversion if isinstance(conversion, dict) else None

    def buffer(self, name: str) -> memoryview:
        """A tensor's raw bytes as a read-only memoryview of the mapping (for consumers without torch)."""
        t = self.manifest["tensors"][name]
        begin, end = t["offsets"]
        return memoryview(self.maps[t["file"]])[begin:end]

    def file_path(self, rel: str) -> Path:
        """A non-weight file of this version (config.json, tokenizer.json, ...)."""
        return self.path / rel

    def populate(self) -> int:
        """Map every page of the weights into this process now (madvise MADV_POPULATE_READ), so the first forward
        does not take a page fault per 4 KiB. Runs without the GIL: call it on a thread beside other start-up work.
        Returns the bytes populated (0 where the kernel lacks MADV_POPULATE_READ, Linux < 5.14: nothing is lost).
        """
        done = 0
        for mapping in self.maps.values():
            if _madvise_populate(mapping):
                done += len(mapping)
        return done

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a torch tensor viewing the read-only mapping (writing to one faults: don't)."""
        return {name: self.tensor(name) for name in self.manifest["tensors"]}

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        t = self.manifest["tensors"][name]
        dtype_name = _TORCH_DTYPES.get(t["dtype"])
        if dtype_name is None or not hasattr(torch, dtype_name):
            raise CorruptVersion(f"tensor {name!r}: dtype {t['dtype']} has no torch equivalent in this torch")
        dtype = getattr(torch, dtype_name)
        begin, end = t["offsets"]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(t["shape"], dtype=dtype)
        with warnings.catch_warnings():
            # torch warns that the buffer is not writable: that is the point, the mapping is PROT_READ.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.maps[t["file"]], dtype=dtype, count=count, offset=begin)
        return flat.view(t["shape"])


_MADV_POPULATE_READ = 22  # linux/mman.h; Python 3.11's mmap module does not name it


def _madvise_populate(mapping: mmap.mmap) -> bool:
    import numpy as np

    view = np.frombuffer(mapping, dtype=np.uint8)  # only to learn the mapping's address
    try:
        return bool(_madvise()(view.ctypes.data, len(mapping), _MADV_POPULATE_READ) == 0)  # ctypes drops the GIL
    finally:
        del view


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    """libc's madvise, loaded once (every mapping of every version populates through it)."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", madvise)


def open_model(root: Path, name: str, attempts: int = 5) -> StagedModel:
    """Map the current version of `name`. NotPublished when nothing is published; CorruptVersion when it is broken."""
    last: OSError | None = None
    for _ in range(attempts):
        version = current_version(root, name)
        if version is None:
            raise NotPublished(f"model {name!r} has no published version in {root}")
        vdir = version_dir(root, name, version)
        try:
            return _map_version(name, version, vdir)
        except FileNotFoundError as e:  # garbage-collected between readlink and open: follow `current` again
            last = e
    raise NotPublished(f"model {name!r}: its current version kept vanishing while opening ({last})")


def _map_version(name: str, version: str, vdir: Path) -> StagedModel:
    with open(vdir / MANIFEST, encoding="utf-8") as f:
        manifest = _manifest_from(f.read(), vdir / MANIFEST)
    maps: dict[str, mmap.mmap] = {}
    for entry in manifest["files"]:
        if entry["kind"] != "safetensors" or entry["size"] == 0:
            continue
        with open(vdir / entry["path"], "rb") as f:
            maps[entry["path"]] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return StagedModel(name=name, version=version, path=vdir, manifest=manifest, maps=maps)


def wait_ready(
    root: Path,
    name: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    interval: float = 0.05,
) -> StagedModel:
    """Block until a version of `name` is published, then open it. Raises TimeoutError after `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        try:
            return open_model(root, name)
        except NotPublished:
            if clock() >= deadline:
                raise TimeoutError(f"model {name!r} was not published in {root} within {timeout:g} s") from None
            sleep(interval)


class VersionWatcher:
    """Notices when a newer version of a model is published (a readlink per poll: cheap enough for 10 Hz)."""

    def __init__(self, root: Path, name: str, seen: str | None = None) -> None:
        self.root, self.name, self.seen = Path(root), name, seen

    def poll(self) -> str | None:
        """The newly published version since the last poll, or None."""
        now = current_version(self.root, self.name)
        if now is not None and now != self.seen:
            self.seen = now
            return now
        return None
