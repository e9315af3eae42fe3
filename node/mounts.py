"""Mount system calls the node agent needs (Linux, CAP_SYS_ADMIN): read-only bind mounts for pods' volumes, the
node store's tmpfs, unmounting, and whether a path is a mount point. Thin wrappers of mount(2)/umount2(2) through
libc, so no `mount` binary is needed in the image; errors are OSError with the path and the reason."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _check(result: int, what: str, path: Path | str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}", str(path))


def _mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    result = _libc().mount(
        source.encode() if source is not None else None,
        str(target).encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data is not None else None,
    )
    _check(result, f"mount {source or ''} ({fstype or 'bind'})", target)


def bind_read_only(source: Path, target: Path, *, recursive: bool = True) -> None:
    """Bind `source` at `target`, read-only (and nosuid, nodev): a bind, then a remount that adds the flags (the
    kernel ignores MS_RDONLY on the first call). Recursive: mounts below `source` come along."""
    _mount(str(source), target, None, MS_BIND | (MS_REC if recursive else 0))
    try:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError:
        unmount(target)
        raise


def mount_tmpfs(target: Path, *, size_bytes: int, huge: str | None = None, mode: int = 0o755) -> None:
    """A tmpfs of at most `size_bytes` at `target` (`huge`: the tmpfs huge= option, e.g. "within_size")."""
    options = [f"size={size_bytes}", f"mode={mode:o}"] + ([f"huge={huge}"] if huge else [])
    _mount("warmpod-node", target, "tmpfs", MS_NOSUID | MS_NODEV, ",".join(options))


def unmount(target: Path, *, lazy: bool = False) -> None:
    _check(_libc().umount2(str(target).encode(), MNT_DETACH if lazy else 0), "umount", target)


def make_private(target: Path) -> None:
    """Stop mount events at `target` from propagating (for tests' own namespaces)."""
    _mount(None, target, None, MS_PRIVATE | MS_REC)


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, str]:
    """Every mount point of this mount namespace → its options (the fifth and sixth fields of mountinfo)."""
    points: dict[str, str] = {}
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        points[_unescape(fields[4])] = fields[5]
    return points


def is_mount_point(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    return str(Path(path).resolve()) in mount_points(mountinfo)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field
