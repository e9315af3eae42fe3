"""The mixed-load benchmark's arithmetic (bench/mixed_bench.py) on made-up numbers, without servers: percentiles,
medians over rounds, the p99 growth in chunk forward passes and its verdict, the answer checks, the report lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.mixed_bench import (
    API,
    BIG_ROWS,
    SHORT_WORDS,
    Inputs,
    Phase,
    Summary,
    check,
    goal_line,
    latency_percentiles,
    p99_growth,
    results_table,
    round_growths,
    summarize,
)
from bench.serve_bench import DIM, ServerSpec


def phase(p99_ms: float, *, big: bool = False, ok: int = 100, wall_s: float = 10.0, p50_ms: float = 50.0,
          big_ok: int = 0, big_p50_s: float = math.nan, errors: dict[str, int] | None = None) -> Phase:  # fmt: skip
    return Phase(big=big, ok=ok, errors=errors or {}, wall_s=wall_s, p50_ms=p50_ms, p99_ms=p99_ms, big_ok=big_ok,
                 big_p50_s=big_p50_s, client_cpu=0.05, server_cpu=1.0, other_cpu=0.0, busy_before=0.0)  # fmt: skip


def test_percentiles_are_in_ms_and_interpolated() -> None:
    p50, p99 = latency_percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p50 == pytest.approx(50.5)
    assert p99 == pytest.approx(99.01)
    assert all(math.isnan(v) for v in latency_percentiles([]))


def test_growth_in_chunks_meets_the_goal_up_to_two_chunks_inclusive() -> None:
    at_limit = p99_growth(alone_p99_ms=200.0, mixed_p99_ms=500.0, chunk_ms=150.0)
    assert (at_limit.ms, at_limit.chunks, at_limit.met) == (pytest.approx(300.0), pytest.approx(2.0), True)
    over = p99_growth(200.0, 500.5, 150.0)
    assert over.chunks == pytest.approx(300.5 / 150) and not over.met
    shrank = p99_growth(300.0, 250.0, 100.0)
    assert shrank.ms == pytest.approx(-50.0) and shrank.chunks == pytest.approx(-0.5) and shrank.met


@pytest.mark.parametrize(
    ("alone", "mixed", "chunk"), [(200.0, 300.0, 0.0), (math.nan, 300.0, 100.0), (200.0, math.nan, 100.0)]
)
def test_growth_that_cannot_be_judged_is_not_met(alone: float, mixed: float, chunk: float) -> None:
    g = p99_growth(alone, mixed, chunk)
    assert math.isnan(g.chunks) and not g.met


def test_summary_takes_medians_over_rounds_and_counts_every_error() -> None:
    rounds = [
        phase(400.0, big=True, ok=300, wall_s=20.0, p50_ms=300.0, big_ok=3, big_p50_s=6.0),
        phase(500.0, big=True, ok=200, wall_s=20.0, p50_ms=320.0, big_ok=2, big_p50_s=7.0, errors={"small: 503": 4}),
        phase(450.0, big=True, ok=250, wall_s=25.0, p50_ms=310.0, big_ok=4, big_p50_s=6.5),
        phase(math.nan, big=True, ok=0, wall_s=20.0, errors={"small: HTTP 500": 7}),  # failed: errors only
    ]
    s = summarize(rounds)
    assert s is not None
    assert s.p99_ms == 450.0 and s.p50_ms == 310.0 and s.big_p50_s == 6.5
    assert s.rps == pytest.approx(10.0)  # 15, 10, 10 req/s
    assert s.big_rows_per_s == pytest.approx(3 * BIG_ROWS / 20)  # 76.8, 51.2, 81.9 rows/s
    assert (s.errors, s.runs, s.requests, s.big_ok) == (11, 3, 750, 9)
    assert summarize([phase(math.nan, ok=0)]) is None


def test_each_round_growth_needs_both_phases() -> None:
    rounds = [
        {False: phase(200.0), True: phase(350.0, big=True)},
        {False: phase(220.0)},  # the mixed phase failed: no growth for this round
        {True: phase(500.0, big=True), False: phase(250.0)},
    ]
    assert [g.chunks for g in round_growths(rounds, chunk_ms=100.0)] == [pytest.approx(1.5), pytest.approx(2.5)]


def summary(p99_ms: float, p50_ms: float = 100.0, big_ok: int = 0) -> Summary:
    return Summary(rps=150.0, p50_ms=p50_ms, p99_ms=p99_ms, big_ok=big_ok, big_rows_per_s=80.0 if big_ok else 0.0,
                   big_p50_s=6.0 if big_ok else math.nan, errors=0, runs=3, requests=9000, client_cpu=0.05,
                   server_cpu=1.0, other_cpu=0.01)  # fmt: skip


def test_goal_line_states_growth_in_ms_and_chunks_and_the_verdict() -> None:
    line = goal_line("warmpod (workers=1)", summary(213.1), summary(454.0), chunk_ms=305.0)
    assert line == ("- warmpod (workers=1): **met** — p99 213.1 → 454.0 ms, +240.9 ms = +0.79 chunk forwards (limit 2)")
    growths = [p99_growth(200, 300, 100), p99_growth(200, 450, 100)]
    missed = goal_line("MLServer", summary(266.9), summary(4783.5), 305.0, growths)
    assert "**not met**" in missed and "+14.81 chunk forwards" in missed and "per round 1.00 to 2.50" in missed
    assert "not judged" in goal_line("MLServer", summary(266.9), None, 305.0)


def test_table_has_both_phases_per_server_and_marks_a_failed_one() -> None:
    specs = [ServerSpec("warmpod-w1", "warmpod", "warmpod (workers=1)", ""), ServerSpec("mlserver-w2", "mlserver",
             "MLServer (parallel_workers=2)", "", workers=2)]  # fmt: skip
    sums = {
        "warmpod-w1": {False: summary(200.0), True: summary(450.0, big_ok=9)},
        "mlserver-w2": {False: summary(260.0)},  # its mixed phase failed in every round
    }
    lines = results_table(specs, sums).splitlines()
    assert len(lines) == 2 + 4
    assert lines[3].startswith("| warmpod (workers=1) | yes | 150 | 100.0 | 450.0 | 9 (80) | 6.00 |")
    assert lines[4].startswith("| MLServer (parallel_workers=2) | no | 150 | 100.0 | 260.0 | — | — |")
    assert lines[5] == "| MLServer (parallel_workers=2) | yes | failed | | | | | | | |"


def test_inputs_short_sentences_for_small_requests_all_for_the_big_one() -> None:
    inputs = Inputs.make()
    assert inputs.small and all(len(inputs.sentences[i].split()) <= SHORT_WORDS for i in inputs.small)
    assert len(inputs.big) == BIG_ROWS and set(inputs.big) == set(range(len(inputs.sentences)))


def test_answers_are_checked_per_row_for_both_apis() -> None:
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((2, DIM)).astype(np.float32)
    openai = json.dumps({"data": [{"index": 1, "embedding": expected[1].tolist()},
                                  {"index": 0, "embedding": expected[0].tolist()}]}).encode()  # fmt: skip
    assert check(200, openai, API["warmpod"], expected) is None  # rows put back in index order
    v2 = {"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [2, DIM], "data": expected.ravel().tolist()}]}
    assert check(200, json.dumps(v2).encode(), API["mlserver"], expected) is None
    assert check(503, b"{}", API["warmpod"], expected) == "HTTP 503"
    assert check(200, b"not json", API["mlserver"], expected) == "malformed response (JSONDecodeError)"
    assert check(200, openai, API["warmpod"], expected[:1]) == f"embedding shape [2, {DIM}], not [1, {DIM}]"
    assert check(200, openai, API["warmpod"], expected + 0.01) == "embedding differs from the reference"
    v2["outputs"][0]["datatype"] = "FP64"
    assert check(200, json.dumps(v2).encode(), API["mlserver"], expected) == "malformed response (ValueError)"
