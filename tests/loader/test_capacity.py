"""Capacity checks: free space on the store's filesystem and the cgroup memory limit (faked in tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmpod.loader.capacity import Room, cgroup_room, check_room, filesystem_room
from warmpod.loader.errors import CapacityError

GiB = 1 << 30
V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 reports for "no limit" on 4 KiB pages


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def cg(tmp_path: Path) -> Path:
    return tmp_path / "sys" / "fs" / "cgroup"


@pytest.fixture
def proc_self(tmp_path: Path) -> Path:
    return tmp_path / "proc" / "self" / "cgroup"


# ---------------------------------------------------------------- check_room


def test_check_room_passes_when_everything_fits() -> None:
    check_room(100, [Room(100, "filesystem"), Room(1000, "cgroup")])
    check_room(0, [Room(0, "full")])
    check_room(10**12, [])


def test_check_room_names_needed_and_available_bytes() -> None:
    with pytest.raises(CapacityError) as info:
        check_room(3 * GiB, [Room(2 * GiB, "filesystem of /dev/shm: 2.0 GiB free of 8.0 GiB")])
    message = str(info.value)
    assert f"need 3.0 GiB ({3 * GiB} bytes)" in message
    assert f"available 2.0 GiB ({2 * GiB} bytes)" in message
    assert "filesystem of /dev/shm" in message
    assert "sizeLimit" in message  # says how to fix it


def test_check_room_reports_the_tightest_limit() -> None:
    rooms = [Room(10 * GiB, "filesystem of /dev/shm"), Room(1000, "cgroup memory limit"), Room(5000, "other")]
    with pytest.raises(CapacityError, match="cgroup memory limit") as info:
        check_room(2000, rooms)
    assert "(1000 bytes)" in str(info.value) and "(2000 bytes)" in str(info.value)


# ---------------------------------------------------------------- cgroup_room


def test_cgroup_v2_namespaced_root(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n")
    write(cg / "memory.max", f"{GiB}\n")
    write(cg / "memory.current", "1048576\n")
    room = cgroup_room(cg, proc_self)
    assert room is not None
    assert room.available == GiB - (1 << 20)
    assert str(cg / "memory.max") in room.limit and "1.0 GiB" in room.limit and "1.0 MiB in use" in room.limit


def test_cgroup_v2_root_without_proc_file(cg: Path, tmp_path: Path) -> None:
    write(cg / "memory.max", "4096")
    write(cg / "memory.current", "96")
    room = cgroup_room(cg, tmp_path / "missing")
    assert room is not None and room.available == 4000


def test_cgroup_v2_path_from_proc_self(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/kubepods/pod1\n")
    write(cg / "kubepods" / "pod1" / "memory.max", str(2 * GiB))
    write(cg / "kubepods" / "pod1" / "memory.current", str(GiB))
    # A different limit at the root must not win over the process's own cgroup.
    write(cg / "memory.max", str(64 * GiB))
    write(cg / "memory.current", "0")
    room = cgroup_room(cg, proc_self)
    assert room is not None
    assert room.available == GiB
    assert "kubepods/pod1/memory.max" in room.limit


def test_cgroup_v2_path_not_visible_falls_back_to_root(cg: Path, proc_self: Path) -> None:
    # Without a cgroup namespace view the host path is listed, but the container sees its cgroup at the root.
    write(proc_self, "0::/kubepods/burstable/pod9/abc\n")
    write(cg / "memory.max", "1000")
    write(cg / "memory.current", "250")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 750


def test_cgroup_v2_max_is_unlimited(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n")
    write(cg / "memory.max", "max\n")
    write(cg / "memory.current", "123")
    assert cgroup_room(cg, proc_self) is None


def test_cgroup_v1_with_path(cg: Path, proc_self: Path) -> None:
    write(
        proc_self,
        "12:pids:/docker/abc\n11:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/x\n",
    )
    write(cg / "memory" / "docker" / "abc" / "memory.limit_in_bytes", str(512 << 20))
    write(cg / "memory" / "docker" / "abc" / "memory.usage_in_bytes", str(12 << 20))
    room = cgroup_room(cg, proc_self)
    assert room is not None
    assert room.available == 500 << 20
    assert "docker/abc/memory.limit_in_bytes" in room.limit and "512.0 MiB, 12.0 MiB in use" in room.limit


def test_cgroup_v1_namespaced_root(cg: Path, proc_self: Path) -> None:
    write(proc_self, "4:memory:/docker/abc\n")
    write(cg / "memory" / "memory.limit_in_bytes", "8192")
    write(cg / "memory" / "memory.usage_in_bytes", "192")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 8000


def test_cgroup_v1_huge_number_is_unlimited(cg: Path, proc_self: Path) -> None:
    write(proc_self, "4:memory:/\n")
    write(cg / "memory" / "memory.limit_in_bytes", V1_UNLIMITED)
    write(cg / "memory" / "memory.usage_in_bytes", "1")
    assert cgroup_room(cg, proc_self) is None


def test_the_tightest_limit_wins_across_hierarchies(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n4:memory:/\n")
    write(cg / "memory.max", "3000")
    write(cg / "memory.current", "0")
    write(cg / "memory" / "memory.limit_in_bytes", "1000")
    write(cg / "memory" / "memory.usage_in_bytes", "0")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 1000


def test_a_limit_on_an_ancestor_cgroup_counts(cg: Path, proc_self: Path) -> None:
    """Kubernetes puts the pod's limit on the pod cgroup; the container's own may say "max"."""
    write(proc_self, "0::/kubepods/pod1/ctr\n")
    write(cg / "kubepods" / "pod1" / "ctr" / "memory.max", "max")
    write(cg / "kubepods" / "pod1" / "ctr" / "memory.current", "100")
    write(cg / "kubepods" / "pod1" / "memory.max", "5000")
    write(cg / "kubepods" / "pod1" / "memory.current", "1200")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 3800
    assert "kubepods/pod1/memory.max" in room.limit


def test_usage_over_limit_leaves_no_room(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n")
    write(cg / "memory.max", "1000")
    write(cg / "memory.current", "1500")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 0


def test_no_cgroup_files_means_no_limit(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n")
    cg.mkdir(parents=True)
    assert cgroup_room(cg, proc_self) is None


def test_malformed_proc_self_is_ignored(cg: Path, proc_self: Path) -> None:
    write(proc_self, "garbage without colons\n")
    write(cg / "memory.max", "100")
    write(cg / "memory.current", "40")
    room = cgroup_room(cg, proc_self)
    assert room is not None and room.available == 60


def test_cgroup_room_feeds_check_room(cg: Path, proc_self: Path) -> None:
    write(proc_self, "0::/\n")
    write(cg / "memory.max", str(GiB))
    write(cg / "memory.current", "0")
    room = cgroup_room(cg, proc_self)
    assert room is not None
    with pytest.raises(CapacityError, match="cgroup memory limit") as info:
        check_room(GiB + 1, [room])
    assert f"({GiB + 1} bytes)" in str(info.value) and f"({GiB} bytes)" in str(info.value)


# ---------------------------------------------------------------- filesystem_room


def test_filesystem_room_matches_statvfs(tmp_path: Path) -> None:
    room = filesystem_room(tmp_path)
    st = os.statvfs(tmp_path)
    # Other processes may write meanwhile: same filesystem, same figure within a margin.
    assert abs(room.available - st.f_bavail * st.f_frsize) < 256 << 20
    assert room.available >= 0
    assert room.limit.startswith(f"filesystem of {tmp_path}: ")
    assert " free of " in room.limit
