"""Will the model fit? Free space of the store's filesystem and, inside a container, the cgroup memory limit.

tmpfs pages are charged to the memory cgroup of the process that touches them, so a pod whose emptyDir is
memory-backed can be OOM-killed long before the filesystem says it is full. Roots are parameters for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from warmpod.loader.errors import CapacityError
from warmpod.loader.plan import human_bytes

# cgroup v1 reports "no limit" as a huge number near 2**63.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Room:
    """Bytes available to the store, and which limit decides it."""

    available: int
    limit: str  # human-readable: which limit, with its numbers


def filesystem_room(path: Path) -> Room:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    return Room(free, f"filesystem of {path}: {human_bytes(free)} free of {human_bytes(total)}")


def cgroup_room(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self: Path = Path("/proc/self/cgroup")) -> Room | None:
    """Room under the tightest memory limit of this process's cgroup and its ancestors (v2 or v1); None if
    no limit is set anywhere. Ancestors count: a pod's limit often sits on the pod cgroup, not the container's."""
    rooms = [room for limit, usage in _limit_files(cgroup_root, proc_self) if (room := _room(limit, usage))]
    return min(rooms, key=lambda r: r.available, default=None)


def _room(limit_path: Path, usage_path: Path) -> Room | None:
    try:
        raw = limit_path.read_text().strip()
        if raw == "max" or int(raw) >= _UNLIMITED:
            return None
        limit, usage = int(raw), int(usage_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return Room(
        max(0, limit - usage),
        f"cgroup memory limit {limit_path}: {human_bytes(limit)}, {human_bytes(usage)} in use",
    )


def _limit_files(cgroup_root: Path, proc_self: Path) -> list[tuple[Path, Path]]:
    """Every (limit, usage) file pair that may bound this process: its cgroup from /proc/self/cgroup and each
    ancestor up to the root of the tree it sees (in a container with a cgroup namespace, that root is its own)."""
    v2, v1 = "/", "/"
    try:
        for line in proc_self.read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            if hid == "0" and controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    pairs = [(cgroup_root / d / "memory.max", cgroup_root / d / "memory.current") for d in _ancestors(v2)]
    v1_root = cgroup_root / "memory"
    pairs += [(v1_root / d / "memory.limit_in_bytes", v1_root / d / "memory.usage_in_bytes") for d in _ancestors(v1)]
    return pairs


def _ancestors(path: str) -> list[str]:
    """'/a/b' → ['a/b', 'a', '']: the cgroup itself first, the root last."""
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def check_room(needed: int, rooms: list[Room]) -> None:
    """Refuse before writing a byte when `needed` bytes do not fit under every limit."""
    for room in sorted(rooms, key=lambda r: r.available):
        if needed > room.available:
            raise CapacityError(
                f"store too small: need {human_bytes(needed)} ({needed} bytes), available "
                f"{human_bytes(room.available)} ({room.available} bytes) — {room.limit}. "
                "Raise the emptyDir sizeLimit / memory limit or free space in the store"
            )
