"""The autoscaling simulator's core (bench/simcore.py): requests are conserved, one replica below its capacity meets
the SLO, latency is never below a forward pass, the batcher waits its delay, runs are deterministic per seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.simcore import (
    Autoscaler,
    HpaPolicy,
    KpaPolicy,
    RayPolicy,
    ReplicaSpec,
    Result,
    ServiceModel,
    SimConfig,
    Trace,
    WarmpodPolicy,
    simulate,
)
from warmpod.pods.policy import PolicyConfig

SERVICE = ServiceModel(a_s=0.0035, c_s=0.0062)  # the fitted MiniLM numbers, no spread: forward passes exact
NOISY = ServiceModel(a_s=0.0035, c_s=0.0062, spread=0.06)


def constant(rate: float, seconds: float) -> Trace:
    return Trace("constant", ((0.0, rate), (seconds, rate)))


def burst() -> Trace:
    """Low, then far beyond what one replica serves (its queue fills: refusals), then low again."""
    return Trace("burst", ((0.0, 40.0), (20.0, 40.0), (20.001, 900.0), (40.0, 900.0), (40.001, 40.0), (120.0, 40.0)))


def assert_conserved(res: Result) -> None:
    assert not np.isnan(res.latency).any(), "every arrival is answered or refused"
    answered = np.isfinite(res.latency)
    assert answered.sum() + res.rejected == len(res.arrivals)
    assert (res.latency[answered] > 0).all()


@pytest.mark.parametrize(
    "policy",
    [
        None,
        WarmpodPolicy(PolicyConfig(slo_target_s=0.1, max_replicas=8)),
        HpaPolicy(max_replicas=8),
        KpaPolicy(target_concurrency=5.0, max_replicas=8),
        RayPolicy(max_replicas=8),
    ],
    ids=["fixed", "warmpod", "hpa", "kpa", "ray"],
)
def test_every_request_is_answered_or_refused(policy: Autoscaler | None) -> None:
    res = simulate(burst(), NOISY, policy, SimConfig(cold_start_s=1.2, initial_replicas=1, seed=3))
    assert_conserved(res)
    assert len(res.arrivals) > 15_000
    if policy is None:  # one replica, 900 req/s for 20 s: its 256-request queue fills and the rest is refused
        assert res.rejected > 5_000
        assert res.replica_seconds == pytest.approx(120.0)
    else:
        assert res.max_replicas > 1  # the burst made every policy scale up
    starts, allocated = res.timeline[:, 0], res.timeline[:, 1]
    assert (np.diff(starts) >= 0).all() and (allocated >= 1).all()


def test_one_replica_below_its_capacity_meets_the_slo() -> None:
    res = simulate(constant(50.0, 120.0), NOISY, None, SimConfig(initial_replicas=1, seed=1))
    assert res.rejected == 0
    assert res.attainment(0.1) >= 0.999
    assert res.replica_seconds == pytest.approx(120.0)


def test_the_policy_keeps_one_replica_when_one_is_enough() -> None:
    res = simulate(constant(30.0, 120.0), NOISY, WarmpodPolicy(PolicyConfig(slo_target_s=0.1)), SimConfig(seed=1))
    assert res.max_replicas == 1 and res.scale_events == 0
    assert res.attainment(0.1) == 1.0


def test_latency_is_never_below_a_forward_pass() -> None:
    res = simulate(constant(120.0, 60.0), SERVICE, None, SimConfig(initial_replicas=1, seed=2))
    assert_conserved(res)
    assert res.latency.min() >= SERVICE.seconds(1) - 1e-9


def test_a_lone_request_waits_the_batch_delay_then_runs_alone() -> None:
    spec = ReplicaSpec(max_delay_s=0.002)
    res = simulate(constant(1.0, 200.0), SERVICE, None, SimConfig(initial_replicas=1, replica=spec, seed=4))
    alone = spec.max_delay_s + SERVICE.seconds(1)
    assert np.median(res.latency) == pytest.approx(alone, abs=1e-9)


def test_two_workers_serve_more_than_one() -> None:
    trace = constant(200.0, 60.0)  # beyond one worker's saturation (~155 req/s), within two
    one = simulate(trace, SERVICE, None, SimConfig(initial_replicas=1, seed=5))
    two = simulate(trace, SERVICE, None, SimConfig(initial_replicas=1, replica=ReplicaSpec(workers=2), seed=5))
    assert two.attainment(0.1) > 0.99 > one.attainment(0.1)


def test_runs_are_deterministic_per_seed() -> None:
    def run(seed: int) -> Result:
        return simulate(burst(), NOISY, WarmpodPolicy(PolicyConfig(slo_target_s=0.1)), SimConfig(seed=seed))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a.latency, b.latency)
    np.testing.assert_array_equal(a.timeline, b.timeline)
    assert a.decisions == b.decisions and a.replica_seconds == b.replica_seconds
    assert len(a.arrivals) != len(c.arrivals) or not np.array_equal(a.latency, c.latency)


def test_arrivals_follow_the_trace_rate() -> None:
    trace = Trace("ramp", ((0.0, 100.0), (100.0, 300.0)))
    arrivals = trace.arrivals(seed=0)
    expected = 100.0 * (100.0 + 300.0) / 2  # the area under the rate
    assert abs(len(arrivals) - expected) < 5 * math.sqrt(expected)
    assert (np.diff(arrivals) >= 0).all() and arrivals[0] >= 0 and arrivals[-1] <= 100.0
    first, second = (arrivals < 50).sum(), (arrivals >= 50).sum()
    assert second / first == pytest.approx(250 / 150, rel=0.05)  # mean rate 150 then 250


def test_bad_traces_are_refused() -> None:
    with pytest.raises(ValueError, match="must start at 0"):
        Trace("late", ((1.0, 5.0), (2.0, 5.0)))
    with pytest.raises(ValueError, match="must not be negative"):
        Trace("negative", ((0.0, 5.0), (2.0, -1.0)))
