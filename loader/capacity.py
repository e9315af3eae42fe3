"""Will the model fit? Free space of the store's filesystem and, inside a container, the cgroup memory limit.

tmpfs pages are charged to the memory cgroup of the process that touches them, so a pod whose emptyDir is
memory-backed can be OOM-killed long before the filesystem says it is full. Roots are parameters for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loader.errors import CapacityError
from loader.plan import human_bytes

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
    """Room under this process's memory cgroup limit (v2 or v1), or None when there is no limit."""
    for limit_path, usage_path in _limit_files(cgroup_root, proc_self):
        if not limit_path.is_file():
            continue
        raw = limit_path.read_text().strip()
        if raw == "max" or int(raw) >= _UNLIMITED:
            return None
        limit, usage = int(raw), int(usage_path.read_text().strip())
        return Room(
            max(0, limit - usage),
            f"cgroup memory limit {limit_path}: {human_bytes(limit)}, {human_bytes(usage)} in use",
        )
    return None


def _limit_files(cgroup_root: Path, proc_self: Path) -> list[tuple[Path, Path]]:
    """Where this process's memory limit may be: its own cgroup (from /proc/self/cgroup), then the root of a
    namespaced cgroup tree (what a container sees); v2 files before v1."""
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
    v1_root = cgroup_root / "memory"
    return [
        (cgroup_root / v2.lstrip("/") / "memory.max", cgroup_root / v2.lstrip("/") / "memory.current"),
        (cgroup_root / "memory.max", cgroup_root / "memory.current"),
        (v1_root / v1.lstrip("/") / "memory.limit_in_bytes", v1_root / v1.lstrip("/") / "memory.usage_in_bytes"),
        (v1_root / "memory.limit_in_bytes", v1_root / "memory.usage_in_bytes"),
    ]


def check_room(needed: int, rooms: list[Room]) -> None:
    """Refuse before writing a byte when `needed` bytes do not fit under every limit."""
    for room in sorted(rooms, key=lambda r: r.available):
        if needed > room.available:
            raise CapacityError(
                f"store too small: need {human_bytes(needed)} ({needed} bytes), available "
                f"{human_bytes(room.available)} ({room.available} bytes) — {room.limit}. "
                "Raise the emptyDir sizeLimit / memory limit or free space in the store"
            )
