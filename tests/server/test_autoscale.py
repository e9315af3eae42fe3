"""The autoscaling policy (pure): settings validated, capacity estimated at the SLO, scale-up before the SLO breaks,
reaction when it breaks, panic never scaling down, scale-down stabilization, unknown replicas, limits."""

from __future__ import annotations

import itertools
import math

import pytest

from tests.kit.metrics import MetricsPage
from warmpod.pods.policy import (
    PolicyConfig,
    PolicyError,
    PolicyState,
    ReplicaSample,
    above_top_bucket,
    capacity_at_slo,
    decide,
    format_latency,
    histogram_quantile,
    latency_quantile,
    observe_replica,
    parse_snapshot,
    pod_scale_factor,
    sample_between,
    snapshot_from_families,
    supervise,
)

pytestmark = pytest.mark.unit

CONFIG = PolicyConfig(slo_quantile=0.95, slo_target_s=0.1, min_replicas=1, max_replicas=10)
FAST = ((0.01, 0.0), (0.025, 50.0), (0.05, 100.0), (float("inf"), 100.0))  # p95 ≈ 48 ms
SLOW = ((0.05, 0.0), (0.1, 10.0), (0.25, 60.0), (float("inf"), 100.0))  # p95 beyond 250 ms


def replica(name: str, rate: float, busy: float, buckets: tuple[tuple[float, float], ...] = FAST) -> ReplicaSample:
    return ReplicaSample(name, rate_rps=rate, busy=busy, service_s=0.01, latency_buckets=buckets)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas 3 is more than max_replicas 2"),
        ({"stable_window_s": -1}, "stable_window_s must not be negative"),
        ({"slo_quantile": 1.0}, r"slo_quantile must be in \(0, 1\), got 1.0"),
        ({"slo_quantile": 0}, r"slo_quantile must be in \(0, 1\)"),
        ({"slo_target_s": 0}, "slo_target_s must be positive"),
        ({"min_replicas": 0}, "min_replicas 0 needs scale_to_zero"),
        ({"panic_window_s": 90}, "panic_window_s 90 is longer than stable_window_s 60.0"),
        ({"service_cv2": -1}, "service_cv2 must not be negative"),
    ],
)
def test_invalid_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        PolicyConfig(**settings)  # type: ignore[arg-type]


def test_policy_errors_name_their_settings_and_render_with_the_callers_names() -> None:
    with pytest.raises(PolicyError) as low:
        PolicyConfig(max_replicas=0)
    assert str(low.value) == "max_replicas must be at least 1, got 0" and low.value.settings == ("max_replicas",)
    with pytest.raises(PolicyError) as negative:
        PolicyConfig(min_replicas=-1, max_replicas=0)
    assert str(negative.value) == "min_replicas must not be negative, got -1"
    with pytest.raises(PolicyError) as crossed:
        PolicyConfig(min_replicas=3, max_replicas=2)
    assert crossed.value.settings == ("min_replicas", "max_replicas")
    flags = {"min_replicas": "--min-replicas", "max_replicas": "--max-replicas"}
    assert crossed.value.render(flags) == "--min-replicas 3 is more than --max-replicas 2"
    assert crossed.value.render({"max_replicas": "--max"}) == "min_replicas 3 is more than --max 2"  # others kept
    assert str(crossed.value) == crossed.value.render() == "min_replicas 3 is more than max_replicas 2"


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    assert histogram_quantile(0.5, FAST) == pytest.approx(0.025)
    assert histogram_quantile(0.95, FAST) == pytest.approx(0.025 + 0.025 * 45 / 50)
    assert histogram_quantile(0.95, SLOW) == pytest.approx(0.25)  # in the +Inf bucket: the last finite bound
    assert histogram_quantile(0.95, ()) is None


def test_a_quantile_beyond_the_top_finite_bucket_is_only_known_to_be_above_it() -> None:
    """A 30 s request against the server's 10 s top bucket: the quantile is "> 10 s", not "10000 ms"."""
    assert not above_top_bucket(0.95, FAST) and above_top_bucket(0.95, SLOW) and not above_top_bucket(0.95, ())
    assert above_top_bucket(0.5, ((1.0, 0.0), (math.inf, 3.0)))
    page = MetricsPage("m", workers=1).serve(20, 30.0, batches=20, batch_s=30.0)
    buckets = parse_snapshot(page.text(), at=0.0).latency_buckets
    assert buckets[-2] == (10.0, 0.0) and histogram_quantile(0.95, buckets) == 10.0  # the top bound, a lower bound
    assert above_top_bucket(0.95, buckets)
    assert format_latency(10.0, above_top_bucket=True) == "> 10 s"
    assert format_latency(0.0483) == "48 ms"
    d = decide([replica("w1", 1, 0.01, buckets)], 1, PolicyState(), 0.0, CONFIG)
    assert d.observed_quantile_s == 10.0 and d.observed_above_top_bucket and d.replicas == 2
    assert d.reason == "panic: p95 > 10 s, over the 100 ms target"
    late = ((0.05, 0.0), (0.1, 10.0), (0.25, 100.0), (math.inf, 100.0))  # p95 = 0.1 + 0.15 x 85/90 s, within
    within = decide([replica("w1", 20, 0.2, late)], 1, PolicyState(), 0.0, CONFIG)
    assert not within.observed_above_top_bucket and within.reason == "panic: p95 242 ms, over the 100 ms target"


def test_capacity_at_the_slo_follows_the_queueing_formula() -> None:
    sample = replica("a", rate=50, busy=0.5)  # saturation 100 rps, forward pass 10 ms
    capacity = capacity_at_slo(sample, CONFIG)
    assert capacity is not None
    rho = capacity / 100
    assert latency_quantile(rho, 0.01, CONFIG) == pytest.approx(CONFIG.slo_target_s, rel=1e-3)  # L(rho*) = T
    assert 0.8 < rho < 0.9  # near-constant forward times (M/D/1) allow a high utilisation
    exponential = capacity_at_slo(sample, PolicyConfig(service_cv2=1.0))  # M/M/1-like: more headroom kept
    assert exponential is not None and exponential < capacity
    assert capacity_at_slo(replica("idle", rate=0, busy=0), CONFIG) is None


def test_scales_up_before_the_slo_breaks() -> None:
    # Latency still fine (p95 ≈ 48 ms), but 2 replicas each at 90% busy: demand exceeds capacity at the SLO.
    state, current = PolicyState(), 2
    for t in range(0, 61, 2):
        d = decide([replica("a", 90, 0.9), replica("b", 90, 0.9)], current, state, float(t), CONFIG)
        state = d.state
    assert d.observed_quantile_s is not None and d.observed_quantile_s < CONFIG.slo_target_s
    assert d.replicas == math.ceil(180 / d.capacity_rps)  # type: ignore[operator]
    assert d.replicas > current and not d.panicking


def test_reacts_when_the_slo_is_broken_and_never_scales_down_in_panic() -> None:
    d = decide([replica("a", 20, 0.2, SLOW)], 2, PolicyState(), 0.0, CONFIG)
    assert d.panicking and d.replicas >= 3 and "panic" in d.reason
    # The burst is over and the load is tiny, but the panic window holds: no scale-down.
    later = decide([replica("a", 1, 0.01), replica("b", 1, 0.01), replica("c", 1, 0.01)], 3, d.state, 30.0, CONFIG)
    assert later.panicking and later.replicas == 3


def test_scale_down_waits_for_the_stabilization_window() -> None:
    state, current = PolicyState(), 4
    decisions = []
    for t in range(0, 700, 10):
        rate, busy = (70, 0.7) if t < 60 else (5, 0.05)  # 280 rps needs 4 replicas, then 20 rps needs 1
        d = decide([replica(n, rate, busy) for n in "abcd"[:current]], current, state, float(t), CONFIG)
        state, current = d.state, d.replicas
        decisions.append((t, current))
    assert all(r == 4 for t, r in decisions if t < 60)
    first_down = next(t for t, r in decisions if r < 4)
    assert first_down >= 50 + CONFIG.scale_down_window_s  # the last 4-replica recommendation holds for 300 s
    assert decisions[-1][1] == 1
    assert all(b >= a // 2 for (_, a), (_, b) in itertools.pairwise(decisions))  # at most halved per tick


def test_a_need_above_max_replicas_says_it_was_clipped() -> None:
    """A burst needing more replicas than max_replicas allows: the reason says both numbers, and names the setting
    as the caller does (`warmpod up`: its flag)."""
    # 50 ms forward passes, always busy, latency within the target: ~23 rps per replica at the SLO, 100 rps → 5.
    burst = ReplicaSample("a", rate_rps=100, busy=1.0, service_s=0.05, latency_buckets=FAST)
    config = PolicyConfig(max_replicas=2)
    d = decide([burst], 1, PolicyState(), 0.0, config)
    need = math.ceil(100 / d.capacity_rps)  # type: ignore[operator]
    assert need > 2 and d.panicking and d.replicas == 2
    assert d.reason == f"panic: burst needs {need}, clipped to max_replicas 2"
    flagged = decide([burst], 1, PolicyState(), 0.0, config, {"max_replicas": "--max-replicas"})
    assert flagged.reason == f"panic: burst needs {need}, clipped to --max-replicas 2"
    ticked = supervise([burst], 1, [], PolicyState(), 0.0, config, {"max_replicas": "--max-replicas"})
    assert ticked.replicas == 2 and ticked.reason == flagged.reason
    # Not panicking (the need is under twice the current count): the stable need, clipped, says how many it was.
    stable = decide([burst], 3, PolicyState(), 0.0, PolicyConfig(max_replicas=3))
    assert not stable.panicking and stable.replicas == 3
    assert stable.reason.endswith(f" rps per replica; needs {need}, clipped to max_replicas 3"), stable.reason
    # Breaking the SLO at the limit: the reaction's need, clipped.
    late = decide([replica("a", 20, 0.2, SLOW)], 2, PolicyState(), 0.0, PolicyConfig(max_replicas=2))
    assert late.replicas == 2 and late.reason == "panic: p95 > 0.25 s, over the 100 ms target; needs 4, clipped to " \
        "max_replicas 2"  # fmt: skip
    within = decide([burst], 1, PolicyState(), 0.0, PolicyConfig(max_replicas=10))
    assert within.replicas == need and "clipped" not in within.reason


def test_unknown_replica_blocks_scale_down_and_counts_as_loaded() -> None:
    samples = [replica("a", 1, 0.01), ReplicaSample("b", ok=False)]
    d = decide(samples, 2, PolicyState(), 0.0, PolicyConfig(scale_down_window_s=0, stable_window_s=0, panic_window_s=0))
    assert d.replicas == 2 and d.unknown == ("b",) and "b is unknown" in d.reason
    assert d.demand_rps == 2  # the unknown replica assumed to carry the average


def test_limits_and_scale_to_zero() -> None:
    # 50 ms forward passes against a 100 ms p95 target: ~23 rps per replica at the SLO; 100 rps → 5, capped at 3.
    slow = ReplicaSample("a", rate_rps=100, busy=1.0, service_s=0.05, latency_buckets=SLOW)
    capped = decide([slow], 1, PolicyState(), 0.0, PolicyConfig(max_replicas=3))
    assert capped.capacity_rps is not None and capped.capacity_rps < 30 and capped.replicas == 3
    zero = PolicyConfig(min_replicas=0, scale_to_zero=True, stable_window_s=10, panic_window_s=1,
                        scale_down_window_s=0, scale_to_zero_grace_s=5)  # fmt: skip
    state = PolicyState()
    for t in range(0, 20):
        d = decide([ReplicaSample("a")], 1, state, float(t), zero)
        state = d.state
    assert d.replicas == 0 and "scale-to-zero" in d.reason
    assert decide([ReplicaSample("activator", rate_rps=1)], 0, state, 21.0, zero).replicas == 1


# ------------------------------------------------------------------------------- observations from /metrics


def _exposition(requests: int, latency_s: float, batches: int, batch_s: float, workers: int = 2) -> str:
    page = MetricsPage("m", workers).serve(requests, latency_s, batches=batches, batch_s=batch_s)
    return page.serve(1, 9.0, code="400").text()  # errors are not the SLO's requests


def test_a_sample_from_two_scrapes_of_real_server_metrics() -> None:
    before = parse_snapshot(_exposition(10, 0.02, 5, 0.04), at=100.0)
    after = parse_snapshot(_exposition(110, 0.02, 55, 0.04), at=110.0)
    sample = sample_between("w1", before, after)
    assert sample.ok and sample.rate_rps == pytest.approx(10.0)
    assert sample.busy == pytest.approx(50 * 0.04 / (10 * 2))  # forward time / (interval x workers)
    assert sample.service_s == pytest.approx(0.04)
    assert histogram_quantile(0.95, sample.latency_buckets) == pytest.approx(0.02, rel=0.3)


def test_a_restarted_replica_counts_from_zero() -> None:
    before = parse_snapshot(_exposition(500, 0.02, 250, 0.04), at=0.0)
    after = parse_snapshot(_exposition(20, 0.02, 10, 0.04), at=10.0)
    assert sample_between("w1", before, after).rate_rps == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<html>502 Bad Gateway</html>", "not a Prometheus exposition"),
        ("# HELP other_metric x\n# TYPE other_metric gauge\nother_metric 1\n", "no warmpod_\\* serving metrics"),
    ],
)
def test_garbage_metrics_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_snapshot(text, at=0.0)


def test_pod_scale_factor_is_demand_over_capacity_or_the_slo_overshoot() -> None:
    busy = ReplicaSample("a", rate_rps=35, busy=0.5, service_s=0.01, latency_buckets=FAST)
    assert pod_scale_factor(busy, CONFIG) == pytest.approx(35 / capacity_at_slo(busy, CONFIG))  # type: ignore[operator]
    late = ReplicaSample("b", rate_rps=1, busy=0.01, service_s=0.01, latency_buckets=SLOW)
    assert pod_scale_factor(late, CONFIG) == pytest.approx(0.25 / 0.1)
    assert pod_scale_factor(ReplicaSample("idle"), CONFIG) == 0.0


def test_a_registry_read_directly_gives_the_snapshot_its_exposition_gives() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from warmpod.server.metrics import ServerMetrics

    metrics = ServerMetrics(CollectorRegistry())
    metrics.workers.set(3)
    for latency in (0.004, 0.02, 0.02, 0.3, 12.0):
        metrics.request_seconds.labels("m", "embeddings", "200").observe(latency)
    metrics.request_seconds.labels("m", "infer", "503").observe(0.001)
    metrics.batch_seconds.labels("m").observe(0.015)
    direct = snapshot_from_families(metrics.registry.collect(), at=5.0)
    assert direct == parse_snapshot(generate_latest(metrics.registry).decode(), at=5.0)
    assert direct.requests == 5 and direct.workers == 3 and direct.latency_buckets[-1] == (math.inf, 5.0)
    with pytest.raises(ValueError, match="no warmpod_"):
        snapshot_from_families(CollectorRegistry().collect(), at=0.0)


# ------------------------------------------------------------------------------- one tick of a supervisor


def test_a_replicas_first_scrape_is_its_baseline_and_an_unreadable_one_keeps_it() -> None:
    first = parse_snapshot(_exposition(10, 0.02, 5, 0.04), at=0.0)
    second = parse_snapshot(_exposition(30, 0.02, 15, 0.04), at=2.0)
    assert observe_replica("w1", None, first) == (None, first)
    sample, baseline = observe_replica("w1", first, None)
    assert sample == ReplicaSample("w1", ok=False) and baseline is first
    sample, baseline = observe_replica("w1", first, second)
    assert sample == sample_between("w1", first, second) and baseline is second


def test_a_tick_without_samples_decides_nothing() -> None:
    state = PolicyState(capacity_rps=5.0)
    waiting = supervise([], 0, ["w1"], state, 0.0, CONFIG)
    assert waiting.replicas is None and waiting.decision is None and waiting.state is state
    assert waiting.reason == "waiting for a ready worker"
    assert supervise([], 1, [], state, 0.0, CONFIG).reason == "first scrape of a ready worker"


def test_a_scale_up_waits_for_the_replicas_still_starting() -> None:
    burst = [replica("w1", 20, 0.2, SLOW)]  # the SLO is broken: the policy wants more
    assert supervise(burst, 2, [], PolicyState(), 0.0, CONFIG).replicas == 4
    held = supervise(burst, 1, ["w2"], PolicyState(), 0.0, CONFIG)  # 2 replicas, one of them starting
    assert held.replicas == 2 and held.reason.endswith("; holding until w2 is ready")
    assert held.decision is not None and held.decision.replicas == 4 and held.state == held.decision.state
    idle = [replica(n, 1, 0.01) for n in ("w1", "w2")]
    quiet = PolicyConfig(stable_window_s=0, panic_window_s=0, scale_down_window_s=0)
    assert supervise(idle, 2, ["w3"], PolicyState(), 0.0, quiet).replicas == 1  # scale-down is not held
