"""The dtype benchmark's pure parts (bench/dtype_bench.py) on made-up numbers: medians, the ratio to fp32, the
agreement line and the report section between its markers."""

from __future__ import annotations

import numpy as np

from bench.dtype_bench import MARK_END, MARK_START, Result, Run, agreement, markdown, results_table


def run(load_s: float, weights: int, cold: float) -> Run:
    return Run(load_s=load_s, loader_s=load_s / 2, convert_s=0.1, store_bytes=weights + 4096, weights_bytes=weights,
               cold_start_s=cold, model_load_s=None)  # fmt: skip


def test_the_table_gives_medians_spreads_and_the_size_ratio_to_fp32() -> None:
    fp32 = Result("m", "fp32", [run(0.2, 1000, 1.5), run(0.4, 1000, 1.7), run(0.3, 1000, 1.6)])
    bf16 = Result("m", "bf16", [run(2.0, 500, 1.4), run(1.0, 500, 1.4), run(3.0, 500, 1.4)])
    assert fp32.med("load_s") == 0.3 and fp32.spread("cold_start_s") == "1.50-1.70"
    rows = results_table([fp32, bf16]).splitlines()
    assert rows[2].startswith("| m | fp32 |") and "| 1.000x |" in rows[2] and "**0.30** (0.20-0.40)" in rows[2]
    assert "| 0.500x |" in rows[3] and "**2.00** (1.00-3.00)" in rows[3] and rows[3].endswith("| — | 3 |")


def test_agreement_and_the_section() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert agreement("minilm", a, a) == "min cosine 1.000000 over 2 sentences"
    assert agreement("mlp", np.array([0.5, 0.5]), np.array([0.5, 0.25])) == (
        "max abs difference of the softmax outputs 2.50e-01"
    )
    section = markdown("python -m bench.dtype_bench", ["Date: today"], [Result("m", "fp32", [run(1, 1, 1)])], ["n"])
    assert section.startswith(MARK_START) and section.endswith(MARK_END) and "- Command: `python -m bench" in section
