"""A process's memory mappings from /proc (to prove tensors are views of the store's read-only files)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    path: str


def mappings(pid: int | str = "self") -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5].rstrip("\n") if len(fields) > 5 else ""
            out.append(Mapping(start, end, fields[1], int(fields[2], 16), path))
    return out


def mapping_of(address: int, pid: int | str = "self") -> Mapping:
    """The one mapping holding `address`."""
    found = [m for m in mappings(pid) if m.start <= address < m.end]
    assert len(found) == 1, hex(address)
    return found[0]


def resident_kib(address: int) -> int:
    """Resident KiB of the mapping holding `address` in this process (/proc/self/smaps)."""
    with open("/proc/self/smaps", encoding="utf-8") as f:
        inside = False
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                inside = low <= address < high
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise LookupError(address)


def smaps_kib(pid: int | str = "self", path: str | None = None) -> dict[str, int]:
    """The KiB fields of /proc/PID/smaps (Rss, Shared_Clean, Private_Dirty, ...) summed over the mappings of the file
    `path`, or over every mapping when `path` is None."""
    totals: dict[str, int] = {}
    inside = path is None
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: address range, perms, ...
                inside = path is None or (len(head) > 5 and head[5].rstrip("\n") == path)
            elif inside and len(head) == 3 and head[2] == "kB":
                totals[head[0].rstrip(":")] = totals.get(head[0].rstrip(":"), 0) + int(head[1])
    return totals
