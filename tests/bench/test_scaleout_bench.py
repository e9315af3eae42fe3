"""The scale-out benchmark's pure parts (bench/scaleout_bench.py): which proxy records are the model's bytes, the
medians per pod, the cluster's origin bytes, the goals (met and missed), the cold starts handed to the simulator, and
a store's bytes counted once per file however many names it has."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.scaleout_bench import (
    BUCKET,
    HugeSample,
    PodSample,
    cumulative,
    huge_goals,
    memory_goal,
    next_pod_goal,
    node_for,
    object_get_bytes,
    origin_goal,
    origin_totals,
    parse_args,
    pod_rows,
    sim_cold_starts,
    summary_table,
)
from bench.serverproc import GiB
from tests.kit.threaded_http import RequestRecord

MODEL = 2 * GiB


def sample(setup: str, pod: int, ready: float, *, rep: int = 1, origin: int = 0, store: int = MODEL, pods: int = 8,
           publish: float | None = None) -> PodSample:  # fmt: skip
    node = node_for(pod, pods)
    first = pod in (1, pods // 2 + 1)
    return PodSample(setup, rep, pod, node, first, ready, origin, store, servers_pss=300, servers_own=200,
                     pods_on_node=pod if node == "A" else pod - pods // 2, publish_s=publish)  # fmt: skip


def cluster(setup: str, *, later: float, first: float = 9.0, origin_first: int = MODEL, rep: int = 1,
            store_per_pod: bool = False) -> list[PodSample]:  # fmt: skip
    """Eight pods of one setup: the first on each node takes `first` s and reads `origin_first` bytes, the rest
    take `later` s and read nothing (or, `store_per_pod`, each pod one copy)."""
    out = []
    for pod in range(1, 9):
        on_node = pod if pod <= 4 else pod - 4
        is_first = on_node == 1
        out.append(sample(setup, pod, first if is_first else later, rep=rep, origin=origin_first if is_first else 0,
                          store=MODEL * on_node if store_per_pod else MODEL))  # fmt: skip
    return out


@pytest.mark.unit
def test_only_object_gets_count_as_the_models_bytes() -> None:
    records = [
        RequestRecord("GET", f"/{BUCKET}/m/model.safetensors", range="bytes=0-262143", body_bytes=262144),
        RequestRecord("GET", f"/{BUCKET}/m/model.safetensors", range="bytes=0-99", body_bytes=100),
        RequestRecord("GET", f"/{BUCKET}/m/config.json", body_bytes=40),
        RequestRecord("GET", f"/{BUCKET}/", query="list-type=2&prefix=m%2F", body_bytes=900),  # a listing
        RequestRecord("GET", f"/{BUCKET}", query="list-type=2", body_bytes=900),
        RequestRecord("HEAD", f"/{BUCKET}/m/config.json"),
        RequestRecord("GET", "/other-bucket/m/model.safetensors", body_bytes=5000),
    ]
    assert object_get_bytes(records, BUCKET) == 262144 + 100 + 40


@pytest.mark.unit
def test_pods_split_over_two_nodes_in_order() -> None:
    assert [node_for(p, 8) for p in range(1, 9)] == ["A"] * 4 + ["B"] * 4
    assert [node_for(p, 5) for p in range(1, 6)] == ["A", "A", "A", "B", "B"]


@pytest.mark.unit
def test_rows_are_medians_per_setup_and_pod_in_order() -> None:
    samples = [sample("peer", 2, t, rep=r, publish=0.01) for r, t in enumerate((1.6, 1.2, 1.3))]
    samples += [sample("sidecar", 1, 9.0), sample("sidecar", 2, 7.0, rep=2), sample("sidecar", 2, 5.0, rep=1)]
    rows = pod_rows(samples)
    assert [(r.setup, r.pod) for r in rows] == [("sidecar", 1), ("sidecar", 2), ("peer", 2)]
    peer = rows[-1]
    assert (peer.ready_s, peer.ready_min_s, peer.ready_max_s, peer.runs) == (1.3, 1.2, 1.6, 3)
    assert peer.publish_s == 0.01 and peer.load_s is None and not peer.first_on_node
    assert rows[1].ready_s == 6.0  # the median of two


@pytest.mark.unit
def test_origin_bytes_add_up_per_round_and_cumulatively() -> None:
    samples = cluster("node", later=1.3, rep=1) + cluster("node", later=1.3, rep=2, origin_first=MODEL + 1)
    assert origin_totals(samples) == {"node": [2 * MODEL, 2 * MODEL + 2]}
    assert cumulative([1, 0, 2.5]) == [1, 1, 3.5]


@pytest.mark.unit
def test_the_next_pod_goal_compares_later_pods_with_the_staged_start() -> None:
    rows = pod_rows(cluster("peer", later=1.40, first=6.0))
    met = next_pod_goal(rows, "peer", staged_s=1.25)
    assert met.met and "1.25 + 0.2 = 1.45 s" in met.detail and "+0.15 s" in met.detail
    missed = next_pod_goal(rows, "peer", staged_s=1.15)
    assert not missed.met and "(6 of 6 late)" in missed.detail
    assert missed.line().startswith("- (c) node cache, peer fetch: every pod after the first on a node ready")
    assert "**missed**" in missed.line()
    assert not next_pod_goal(rows, "sidecar", staged_s=1.25).met  # nothing measured: not met
    beside = next_pod_goal(rows, "peer", staged_s=1.15, beside_s=1.42)
    assert not beside.met and beside.detail.endswith("a staged start beside the last pods took 1.42 s")


@pytest.mark.unit
def test_the_summary_has_a_row_per_measured_setup() -> None:
    samples = cluster("peer", later=1.40, first=6.0, origin_first=0)
    samples[0].origin_bytes = MODEL
    table = summary_table(pod_rows(samples), samples, 1.3, MODEL, {"peer": [1.45, 1.35, 1.5]})
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row == "| (c) node cache, peer fetch | A 6.00, B 6.00 | 1.40 (1.40) | +0.10 | 1.45 | 1.00 | 1.00 |"


@pytest.mark.unit
def test_the_origin_goal_allows_page_rounding_only() -> None:
    header_probe = 256 * 1024  # the loader reads the first 256 KiB twice
    peer = cluster("peer", later=1.3, origin_first=0)
    peer[0].origin_bytes = MODEL + header_probe
    goal = origin_goal(peer, "peer", MODEL)
    assert goal.met and "1.000 x" in goal.detail
    node = cluster("node", later=1.3)
    assert not origin_goal(node, "node", MODEL).met  # one copy per node: 2 x


@pytest.mark.unit
def test_the_memory_goal_takes_the_fullest_node() -> None:
    shared = pod_rows(cluster("node", later=1.3))
    goal = memory_goal(shared, "node", MODEL)
    assert goal.met and "node A, 4 pods: 1.00 x; node B, 4 pods: 1.00 x" in goal.detail
    own = pod_rows(cluster("sidecar", later=9.0, store_per_pod=True))
    goal = memory_goal(own, "sidecar", MODEL)
    assert not goal.met and "node A, 4 pods: 4.00 x" in goal.detail


@pytest.mark.unit
def test_the_huge_page_goal_is_the_big_start_over_the_small_one_per_store() -> None:
    samples = [HugeSample("huge", "0.1 GiB", r, 1.10, 1.0, 100) for r in (1, 2)]
    samples += [HugeSample("huge", "4 GiB", r, t, 1.2, 4096) for r, t in ((1, 1.30), (2, 1.34))]
    samples += [HugeSample("plain", "0.1 GiB", 1, 1.10, 1.0, 0), HugeSample("plain", "4 GiB", 1, 1.80, 1.7, 0)]
    huge, plain = huge_goals(samples, "0.1 GiB", "4 GiB")
    assert huge.met and "1.20x (1.32 s vs 1.10 s)" in huge.detail
    assert not plain.met and "1.64x" in plain.detail
    assert huge_goals(samples, "0.1 GiB", "8 GiB") == []


@pytest.mark.unit
def test_the_simulator_gets_one_cold_start_per_kind_of_new_pod() -> None:
    rows = pod_rows(
        cluster("sidecar", later=8.0, first=9.0) + cluster("node", later=1.3, first=7.0)
        + cluster("peer", later=1.5, first=4.0)
    )  # fmt: skip
    starts = sim_cold_starts(rows)
    assert starts == {"sidecar": 8.0, "node cache, model on the node": 1.4,
                      "node cache, first pod on a node (from a peer)": 4.0}  # fmt: skip


@pytest.mark.unit
def test_a_store_counts_each_file_once(tmp_path: Path) -> None:
    from bench.scaleout_bench import allocated_bytes

    (tmp_path / "m" / "v1").mkdir(parents=True)
    (tmp_path / "m" / "v1" / "model.safetensors").write_bytes(b"x" * 10000)
    os.link(tmp_path / "m" / "v1" / "model.safetensors", tmp_path / "m" / "again.safetensors")
    alone = os.lstat(tmp_path / "m" / "v1" / "model.safetensors").st_blocks * 512
    assert alone >= 10000 and allocated_bytes(tmp_path) == alone


@pytest.mark.unit
def test_quick_writes_nothing_unless_told() -> None:
    quick = parse_args(["--quick"])
    assert (quick.size_gib, quick.pods, quick.reps, quick.out, quick.png, quick.json) == (0.1, 4, 1, "", "", "")
    told = parse_args(["--quick", "--out", "x.md"])
    assert told.out == "x.md" and told.png == ""
    full = parse_args([])
    assert (full.size_gib, full.pods, full.huge_gib) == (2.0, 8, [0.1, 4.0]) and full.out.endswith("BENCHMARKS.md")


@pytest.mark.unit
def test_a_runs_results_read_back_as_they_were_written(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    from bench.scaleout_bench import Results

    res = Results(["Command: `python -m bench.scaleout_bench`"], MODEL, [1.6, 1.7], {"peer": [1.9]},
                  cluster("peer", later=1.4), [HugeSample("huge", "4 GiB", 1, 1.7, 1.5, 4 << 30)],
                  ["0.1 GiB", "4 GiB"])  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(asdict(res)))
    assert Results.load(tmp_path / "run.json") == res
