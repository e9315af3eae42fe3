"""The serving benchmark's pure parts (bench/serve_bench.py) on made-up responses and numbers, without servers: the
requests each protocol gets, the check of every response (V2 and OpenAI, fp32 and bf16 tolerances), the batch counts
read from warmpod's /metrics, the in-process replay's plan, the server variants, the tables and the goal lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_bench import (
    DIM,
    MODEL,
    OPENAI,
    TOLERANCE,
    V2,
    Exchange,
    Limit,
    Replay,
    Run,
    ServerSpec,
    Summary,
    batch_counts,
    check,
    count_diff,
    goal_level,
    goal_lines,
    infinity_args,
    limit_table,
    replay,
    replay_plan,
    request_body,
    results_table,
    server_specs,
    summarize,
    summarize_replays,
)
from warmpod.server.metrics import ServerMetrics


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


REFERENCE = np.stack([unit(0), unit(1)])


def v2_body(vector: np.ndarray, datatype: str = "FP32", shape: tuple[int, ...] = (1, DIM)) -> bytes:
    out = {"name": "embedding", "datatype": datatype, "shape": list(shape), "data": vector.tolist()}
    return json.dumps({"model_name": MODEL, "outputs": [out]}).encode()


def openai_body(*vectors: np.ndarray) -> bytes:
    data = [{"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "data": data, "model": MODEL, "usage": {}}).encode()


def why(body: bytes, api: str = V2, dtype: str = "fp32", sentence: int = 1, status: int = 200) -> str | None:
    return check(Exchange(sentence, 0.01, status, body), REFERENCE, api, TOLERANCE[dtype])


def test_each_protocol_gets_one_sentence_in_its_own_request() -> None:
    v2 = json.loads(request_body("a b", V2))
    assert v2 == {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a b"]}]}
    assert json.loads(request_body("a b", OPENAI)) == {"model": MODEL, "input": ["a b"]}


def test_a_v2_response_is_checked_for_shape_type_and_closeness() -> None:
    assert why(v2_body(REFERENCE[1])) is None
    assert why(v2_body(REFERENCE[1] + 5e-4)) is None  # within 1e-3 everywhere
    assert why(v2_body(REFERENCE[1] + 2e-3)) == "embedding differs from the reference by more than 0.001"
    assert why(v2_body(REFERENCE[0])) == "embedding differs from the reference by more than 0.001"  # another sentence
    assert why(v2_body(REFERENCE[1], "FP16")) == f"embedding is FP16 [1, {DIM}], not FP32 [1, {DIM}]"
    assert why(v2_body(REFERENCE[1], shape=(DIM,))) == f"embedding is FP32 [{DIM}], not FP32 [1, {DIM}]"
    assert why(b'{"outputs": []}') == "malformed response (KeyError)"
    assert why(b"not json") == "malformed response (JSONDecodeError)"
    assert why(v2_body(REFERENCE[1]), status=503) == "HTTP 503"


def test_an_openai_response_is_one_item_of_dim_floats_checked_the_same_way() -> None:
    assert why(openai_body(REFERENCE[1]), OPENAI) is None
    assert why(openai_body(REFERENCE[0]), OPENAI) == "embedding differs from the reference by more than 0.001"
    assert why(openai_body(REFERENCE[1], REFERENCE[1]), OPENAI) == "2 items in 'data', not one with index 0"
    assert why(openai_body(REFERENCE[1][:100]), OPENAI) == f"'embedding' is not a list of {DIM} floats"
    # A base64 answer (what the openai client asks for by default) is not what the bench asked for.
    b64 = json.dumps({"data": [{"embedding": "AAAA", "index": 0}]}).encode()
    assert why(b64, OPENAI) == f"'embedding' is not a list of {DIM} floats"
    # An unnormalised vector is not the model's embedding (MiniLM's modules.json ends with Normalize).
    assert why(openai_body(REFERENCE[1] * 2), OPENAI) == "embedding differs from the reference by more than 0.001"


def test_bf16_rows_pass_on_cosine_not_on_elements() -> None:
    rng = np.random.default_rng(7)
    near = REFERENCE[1] + rng.standard_normal(DIM).astype(np.float32) * 2e-3  # bf16-like: elements off by ~2e-3
    assert why(v2_body(near), dtype="fp32") is not None
    assert why(v2_body(near), dtype="bf16") is None
    far = REFERENCE[1] + rng.standard_normal(DIM).astype(np.float32) * 0.05
    assert why(v2_body(far), dtype="bf16") == "embedding's cosine to the reference below 0.999"
    assert why(v2_body(np.zeros(DIM, np.float32)), dtype="bf16") == "embedding's cosine to the reference below 0.999"
    assert why(v2_body(np.full(DIM, np.nan, np.float32)), dtype="bf16") == "embedding not finite or of another shape"
    assert TOLERANCE["bf16"].describe() == "cosine ≥ 0.999"
    assert TOLERANCE["fp32"].describe() == "every element within 0.001"


def test_batch_counts_come_from_warmpods_own_metrics_page() -> None:
    def samples(sizes: list[int]) -> list:  # type: ignore[type-arg]
        metrics = ServerMetrics(CollectorRegistry())
        for rows in sizes:
            metrics.observe_batch(MODEL, rows, 0.01)
        metrics.observe_batch("other-model", 5, 0.01)
        text = generate_latest(metrics.registry).decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    before = batch_counts(samples([1, 1, 8]))
    after = batch_counts(samples([1, 1, 8, 8, 8, 32, 1]))
    assert before == {1: 2, 8: 1}
    assert after == {1: 3, 8: 3, 32: 1}
    assert count_diff(after, before) == {1: 1, 8: 2, 32: 1}
    assert count_diff(before, before) == {}


def test_the_replay_plan_has_the_servers_batches_largest_first_sentences_in_order() -> None:
    plan = replay_plan({3: 1, 5: 2, 1: 1}, n_sentences=4)
    assert [len(b) for b in plan] == [5, 5, 3, 1]
    assert plan == [[0, 1, 2, 3, 0], [1, 2, 3, 0, 1], [2, 3, 0], [1]]
    assert replay_plan({}, 4) == []


class FakeModel:
    """prepare_texts/run like a ServedModel: the 'embedding' of sentence i is REFERENCE[i]; sentence 'bad' is off."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def prepare_texts(self, texts: list[str]) -> str:
        return texts[0]

    def run(self, batch: list[str]) -> list[dict[str, np.ndarray]]:
        self.batches.append(len(batch))
        return [{"embedding": (REFERENCE[int(t)] if t != "bad" else -REFERENCE[0])[None, :]} for t in batch]


def test_replay_runs_every_batch_once_and_checks_every_row() -> None:
    model = FakeModel()
    sentences = ["0", "1"]
    plan = replay_plan({2: 3, 1: 1}, len(sentences))

    def close(i: int, v: np.ndarray) -> str | None:
        return TOLERANCE["fp32"].why_not(v, REFERENCE[i])

    got = replay(model, sentences, plan, 2, close)  # type: ignore[arg-type]
    assert sorted(model.batches) == [1, 2, 2, 2]
    assert (got.rows, got.batches, got.threads, got.errors) == (7, 4, 2, {})
    assert got.rows_per_s > 0
    bad = replay(FakeModel(), ["0", "bad"], plan, 1, close)  # type: ignore[arg-type]
    assert bad.errors == {"embedding differs from the reference by more than 0.001": 3}
    assert bad.rows == 4


def test_infinity_runs_offline_on_the_cpu_with_replicas_and_no_extras() -> None:
    spec = server_specs(["infinity"], [], [], [], infinity_replicas=[2], infinity_dtypes=["bf16"])[0]
    args = infinity_args(spec, Path("/m"))
    flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and not args[i + 1].startswith("--")}
    assert args[0] == "v2"
    assert flag["--model-id"] == "/m" and flag["--engine"] == "torch" and flag["--device"] == "cpu"
    assert flag["--device-id"] == "0,1" and flag["--dtype"] == "bfloat16" and flag["--log-level"] == "warning"
    assert {"--no-bettertransformer", "--no-compile", "--no-vector-disk-cache"} <= set(args)
    assert "--batch-size" not in args  # its default batching
    assert (spec.api, spec.dtype, spec.workers, spec.key) == (OPENAI, "bf16", 2, "infinity-bf16-r2")


def test_server_specs_cover_every_variant_once() -> None:
    names = ["warmpod", "mlserver", "kserve", "infinity"]
    both = [1, 2]
    specs = server_specs(names, both, both, both, warmpod_dtypes=["fp32", "bf16"], warmpod_apis=[V2, OPENAI],
                         infinity_replicas=both)  # fmt: skip
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)) == 8 + 2 + 2 + 2
    assert "warmpod-bf16-w2-openai" in keys and "infinity-fp32-r1" in keys
    assert {s.dtype for s in specs if s.family != "warmpod" and s.family != "infinity"} == {"fp32"}
    with pytest.raises(SystemExit, match="unknown server"):
        server_specs(["triton"], [], [], [])


def summary(rps: float, p99: float) -> Summary:
    return Summary(rps, p99 / 2, p99, 0, 3, 300, 1.0, 0.05, 0.0, (rps - 1, rps + 1))


def spec(key: str, family: str, dtype: str = "fp32") -> ServerSpec:
    return ServerSpec(key, family, key, "", dtype=dtype)


SPECS = [
    spec("wp-fp32", "warmpod"),
    spec("wp-bf16", "warmpod", "bf16"),
    spec("ml-1", "mlserver"),
    spec("ml-2", "mlserver"),
    spec("inf-1", "infinity"),
]


def test_goal_lines_judge_bf16_against_each_baselines_best_and_fp32_against_its_limit() -> None:
    sums = {
        "wp-fp32": {32: summary(190, 260)},
        "wp-bf16": {32: summary(300, 200)},
        "ml-1": {32: summary(110, 300)},
        "ml-2": {32: summary(140, 310)},  # MLServer's best: 300 / 140 = 2.14x, p99 better
        "inf-1": {32: summary(210, 150)},  # 1.43x only, and a better p99
    }
    limits = {"wp-fp32": Limit(200, (195, 205), 20, 25.0, 0, 3), "wp-bf16": Limit(400, (390, 410), 15, 33.3, 0, 3)}
    lines = goal_lines(SPECS, sums, limits, 32)
    assert len(lines) == 3
    assert "MLServer's best" in lines[0] and "**met**: 2.14x ml-2's throughput (300 vs 140 req/s)" in lines[0]
    assert "infinity-emb's best" in lines[1] and "**not met**: 1.43x inf-1's" in lines[1]
    assert "**met**: 0.95 (190 req/s served vs 200 rows/s" in lines[2]
    # A slower p99 fails the goal however fast.
    sums["wp-bf16"][32] = summary(300, 320)
    assert "**not met**: 2.14x" in goal_lines(SPECS, sums, limits, 32)[0]
    # Nothing to judge against.
    lines = goal_lines(SPECS[:2], sums, {}, 32)
    assert lines[0].endswith("not judged (MLServer not measured at concurrency 32)")
    assert lines[2].endswith("not judged (no replay)")


def test_the_tables_name_the_best_warmpod_and_each_replay() -> None:
    sums = {"wp-fp32": {8: summary(150, 90), 32: summary(190, 260)}, "wp-bf16": {8: summary(200, 60)},
            "ml-1": {8: summary(100, 120)}}  # fmt: skip
    table = results_table(SPECS[:3], sums, [8, 32])
    assert "| 8 | **wp-bf16** | 200 |" in table and "| 32 | **wp-fp32** | 190 |" in table
    assert "| 8 | ml-1 | 100 | 60.0 | 120.0 | 2.00x | 2.00x |" in table
    assert "| 32 | wp-bf16 | failed |" in table
    limits = {"wp-fp32": summarize_replays([Replay(400, 20, 1, 2.0, {}), Replay(400, 20, 1, 1.6, {})])}
    assert limits["wp-fp32"] is not None
    lt = limit_table(SPECS[:3], sums, {k: v for k, v in limits.items() if v}, 32)
    assert "| wp-fp32 | 20 (20.0) | 225 (200-250) | 190 | 0.84 | 0 |" in lt
    assert "| wp-bf16 | not replayed |" in lt
    assert summarize_replays([Replay(0, 0, 1, 1.0, {"x": 1})]) is None


def test_goals_are_judged_at_32_or_the_highest_level_measured() -> None:
    assert goal_level([1, 8, 32]) == 32
    assert goal_level([1, 8]) == 8


def test_summaries_are_medians_over_rounds() -> None:
    def run(ok: int, p99: float, errors: dict[str, int] | None = None) -> Run:
        return Run(32, ok, errors or {}, 1.0, p99 / 2, p99, 0.1, 1.0, 0.0, 0.0)

    s = summarize([run(100, 50), run(120, 90, {"HTTP 500": 1}), run(110, 70)])
    assert s is not None and (s.rps, s.p99_ms, s.errors, s.runs, s.requests) == (110, 70, 1, 3, 330)
    assert summarize([run(0, float("nan"), {"x": 3})]) is None
