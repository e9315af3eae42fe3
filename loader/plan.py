"""Pure planning: how a file is cut into ranges, how a size string is read, how long to back off before a retry."""

from __future__ import annotations

import random
from dataclasses import dataclass

MiB = 1 << 20
DEFAULT_CHUNK_SIZE = 16 * MiB
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_BUFFER_BYTES = 256 * MiB


@dataclass(frozen=True)
class ByteRange:
    """Bytes [offset, offset + length) of one file; `index` orders the ranges of that file."""

    index: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def plan_ranges(size: int, chunk_size: int, start: int = 0) -> list[ByteRange]:
    """Cut bytes [start, size) into consecutive ranges of at most `chunk_size` bytes."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    if not 0 <= start <= size:
        raise ValueError(f"start {start} outside [0, {size}]")
    return [
        ByteRange(index=i, offset=off, length=min(chunk_size, size - off))
        for i, off in enumerate(range(start, size, chunk_size))
    ]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter"), bounded attempts."""

    attempts: int = 5
    base_seconds: float = 0.1
    max_seconds: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (1 = first retry)."""
        cap = min(self.max_seconds, self.base_seconds * (2 ** (attempt - 1)))
        return rng.uniform(0, cap)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
