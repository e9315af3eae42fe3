"""The door benchmark's pure parts (bench/door_bench.py) on made-up numbers, without servers: the key file, the open
loop's schedule, the rotation of orders, medians over rounds, the ratio and the report's tables."""

from __future__ import annotations

import math

import pytest

from bench.door_bench import (
    KEYS,
    LEVELS,
    FairRun,
    LoadRun,
    door_table,
    fair_table,
    key_file_text,
    observations,
    ratio,
    rotated,
    send_times,
    summarize_fair,
    summarize_load,
)
from warmpod.server.auth import parse_key_file


def load_run(rps: float, p99_ms: float = 100.0, errors: dict[str, int] | None = None) -> LoadRun:
    return LoadRun(ok=round(rps * 10), errors=errors or {}, wall_s=10.0, p50_ms=p99_ms / 2, p99_ms=p99_ms)


def fair_run(b_p99_ms: float, a_503: int = 0, b_503: int = 0) -> FairRun:
    return FairRun(b_sent=100, b_ok=100 - b_503, b_503=b_503, a_sent=1000, a_ok=1000 - a_503, a_503=a_503,
                   errors={}, b_p50_ms=b_p99_ms / 2, b_p99_ms=b_p99_ms, wall_s=10.0)  # fmt: skip


def test_the_key_file_is_what_the_server_reads() -> None:
    text = key_file_text(KEYS)
    assert text.splitlines() == [f"{t}:{k}" for t, k in KEYS.items()]
    assert parse_key_file(text, "keys") is not None


def test_send_times_are_a_fixed_rate_below_the_length() -> None:
    assert send_times(4, 1) == [0, 0.25, 0.5, 0.75]
    assert len(send_times(20, 15)) == 300
    assert send_times(0, 10) == []


def test_orders_rotate_round_by_round() -> None:
    assert [rotated(("a", "b", "c"), r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]  # fmt: skip


def test_load_summary_is_medians_over_rounds_and_errors_summed() -> None:
    s = summarize_load([load_run(100, 50), load_run(120, 90, {"HTTP 500": 1}), load_run(110, 70, {"x": 2})])
    assert s is not None
    assert (s.rps, s.p99_ms, s.errors, s.rounds) == (110, 70, 3, 3)
    assert summarize_load([]) is None


def test_ratio_and_the_door_table() -> None:
    assert ratio(90, 100) == pytest.approx(0.9)
    assert math.isnan(ratio(1, 0))
    sums = {v: {c: summarize_load([load_run(rps)]) for c in LEVELS} for v, rps in (("plain", 200), ("door", 180))}
    table = door_table({v: {c: s for c, s in by.items() if s} for v, by in sums.items()})
    assert table.count("**0.90**") == len(LEVELS)
    assert "| 8 | plain HTTP, no keys | 200.0 |" in table
    assert "| 32 | API key + TLS | failed |" in door_table({"plain": {}, "door": {}})


def test_fair_summary_and_table() -> None:
    fs = summarize_fair([fair_run(40, a_503=700), fair_run(60, a_503=800), fair_run(50, a_503=900)])
    assert fs is not None
    assert (fs.b_p99_ms, fs.a_503, fs.b_sent, fs.rounds) == (50, 2400, 300, 3)
    alone = summarize_fair([fair_run(20)])
    fifo = summarize_fair([fair_run(900, a_503=600, b_503=80)])
    assert alone is not None and fifo is not None
    sums = {"alone": alone, "fair": fs, "fifo": fifo}
    table = fair_table(sums)
    assert "| B alone | 10.0 | 20.0 | 100 | 0 | — | — | — |" in table
    assert "| 2400 |" in table
    assert "failed" in fair_table({"alone": alone})
    lines = observations({}, sums)
    assert len(lines) == 1 and "80 of 100 B requests refused" in lines[0]
