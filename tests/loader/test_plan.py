"""Pure planning: byte ranges of a file, retry backoff, size strings."""

from __future__ import annotations

import itertools
import random

import pytest

from warmpod.cliargs import parse_size
from warmpod.loader.plan import ByteRange, RetryPolicy, human_bytes, plan_ranges

MiB = 1 << 20


# ---------------------------------------------------------------- plan_ranges


@pytest.mark.parametrize(
    ("size", "chunk", "start"),
    [
        (100, 10, 0),
        (101, 10, 0),
        (99, 10, 0),
        (5, 10, 0),
        (1, 1, 0),
        (100, 7, 33),
        (16 * MiB + 3, 4 * MiB, 8),
    ],
)
def test_ranges_cover_start_to_size_exactly_once(size: int, chunk: int, start: int) -> None:
    ranges = plan_ranges(size, chunk, start)
    assert [r.index for r in ranges] == list(range(len(ranges)))
    assert ranges[0].offset == start
    assert ranges[-1].end == size
    for before, after in itertools.pairwise(ranges):
        assert before.end == after.offset  # no gap, no overlap
    assert all(0 < r.length <= chunk for r in ranges)
    assert all(r.length == chunk for r in ranges[:-1])  # only the last one may be short
    assert sum(r.length for r in ranges) == size - start


def test_last_chunk_is_short() -> None:
    assert plan_ranges(25, 10) == [ByteRange(0, 0, 10), ByteRange(1, 10, 10), ByteRange(2, 20, 5)]


def test_exact_multiple_has_no_empty_tail() -> None:
    assert plan_ranges(20, 10) == [ByteRange(0, 0, 10), ByteRange(1, 10, 10)]


def test_size_zero_and_start_at_end_plan_nothing() -> None:
    assert plan_ranges(0, 10) == []
    assert plan_ranges(50, 10, start=50) == []


def test_start_offsets_the_plan() -> None:
    assert plan_ranges(30, 10, start=8) == [ByteRange(0, 8, 10), ByteRange(1, 18, 10), ByteRange(2, 28, 2)]


@pytest.mark.parametrize("chunk", [0, -1])
def test_invalid_chunk_size(chunk: int) -> None:
    with pytest.raises(ValueError, match=f"chunk size must be positive, got {chunk}"):
        plan_ranges(10, chunk)


@pytest.mark.parametrize("start", [-1, 11])
def test_start_outside_the_file(start: int) -> None:
    with pytest.raises(ValueError, match=rf"start {start} outside \[0, 10\]"):
        plan_ranges(10, 4, start)


# ---------------------------------------------------------------- RetryPolicy


class UpperBound(random.Random):
    """A Random whose uniform() always returns its upper bound: exposes the cap of each attempt."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_delay_cap_grows_exponentially_then_stays_at_max() -> None:
    policy = RetryPolicy(attempts=10, base_seconds=0.1, max_seconds=1.0)
    caps = [policy.delay(n, UpperBound()) for n in range(1, 8)]
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_delay_jitter_stays_within_zero_and_cap() -> None:
    policy = RetryPolicy(base_seconds=0.1, max_seconds=5.0)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        cap = min(5.0, 0.1 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        # Full jitter: spread over the whole interval, not clustered at the cap.
        assert min(delays) < cap * 0.1 and max(delays) > cap * 0.9


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    first = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    again = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == again


def test_delay_never_exceeds_max_seconds() -> None:
    policy = RetryPolicy(base_seconds=1.0, max_seconds=2.5)
    assert all(policy.delay(n, UpperBound()) <= 2.5 for n in range(1, 60))


# ---------------------------------------------------------------- parse_size / human_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("16MiB", 16 * MiB),
        ("16M", 16 * MiB),
        ("16mb", 16 * MiB),
        ("16 MiB", 16 * MiB),
        ("  2KiB ", 2048),
        ("1KB", 1024),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("1.5G", 1610612736),
        ("2T", 2 << 40),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "abc", "MiB", "-1", "1.5.5", "16XB", "16 MiB extra", "1e3", "0x10"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert f"not a size: {text!r}" in message
    assert "16MiB" in message  # the message shows what a size looks like


@pytest.mark.parametrize("text", ["1iB", "4096i"])
def test_parse_size_refuses_binary_marker_without_unit(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (16 * MiB, "16.0 MiB"),
        (3 << 29, "1.5 GiB"),
        (1 << 40, "1024.0 GiB"),
        (-5, "-5 B"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text
