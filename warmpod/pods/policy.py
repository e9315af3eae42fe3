"""The autoscaling policy: observations in, desired replica count out. Pure — no I/O, no clock of its own.

Each tick the caller (the local supervisor, or a simulator) scrapes every replica's metrics, turns the deltas since
the last tick into one `ReplicaSample` per replica, and calls `decide(samples, current, state, now, config)`. Both
callers do that through `observe_replica` and `supervise`, which hold the rules around it (a replica's first scrape
is only a baseline; no sample, no decision; no scale-up while a replica is starting), so they cannot drift apart.

The formula
-----------
Per replica, from what it served in the interval: its request rate lambda, the fraction of its workers' time spent
in forward passes u (busy), and its mean forward-pass time s (a batch's duration: the service a request waits for).
Its throughput at saturation is mu = lambda / u. Its capacity *at the SLO* is the rate at which the SLO quantile of
latency still meets the target T. With the heavy-traffic M/G/1 tail (Kingman), P(wait > t) ~ rho * exp(-2 (1 - rho)
t / (s (1 + cs2))), the q-quantile of latency is

    L(rho) = s + s * (1 + cs2) / (2 (1 - rho)) * ln(rho / (1 - q))

where cs2 is the squared coefficient of variation of the forward time (`service_cv2`; default 0: a model's forward
passes of one size vary by a few percent — measured sigma 0.055 for MiniLM — so the tail is M/D/1's; 1 gives
M/M/1's, which sized MiniLM replicas ~25% too small in the simulation). rho* solves L(rho*) = T (bisection),
clamped to [0.05, max_utilization], and capacity = mu * rho*.

The fleet's capacity per replica is the median over the replicas that reported. Demand D is the summed request
rate, averaged over two windows (like Knative's KPA): the stable window (60 s) and the panic window (6 s). Then

    desired = ceil(D_stable / capacity)                        normally
    desired = max(current, ceil(D_panic / capacity), react)   while panicking (never below current)

where `react` answers an SLO that is already broken: when the observed q-quantile L exceeds T,
react = max(current + 1, ceil(current * min(L / T, 2))). Panic starts when D_panic / capacity >= 2 x current (KPA's
200% panic threshold) or when L > T, and lasts at least one stable window after the last trigger. Estimating
capacity lets the policy scale *before* the SLO breaks; `react` covers a capacity estimate that is off.

Then, as Kubernetes' HPA does: changes within +/-10% of the current count are ignored (tolerance); scale-down takes
the highest recommendation of the last 300 s (stabilization window); steps are limited (up to x1000 per tick as
KPA's max-scale-up-rate, down to /2 per tick as KPA's max-scale-down-rate); the result is clamped to
[min_replicas, max_replicas], and a need above max_replicas says so in the reason ("burst needs 7, clipped to
max_replicas 2"). The observed quantile comes from the replicas' latency histograms; when it lies beyond the top
finite bucket, all the histogram tells is "above that bound": the decision says so (`observed_above_top_bucket`)
instead of passing the bound off as the quantile. A replica whose metrics could not be read is unknown: the policy
never scales down on missing data (desired >= current while any replica is unknown). With `scale_to_zero`, no demand
for the whole stable window plus `scale_to_zero_grace_s` (KPA: 30 s) gives 0; any demand at zero gives 1.

Defaults compared: HPA — target 70% CPU, tolerance 0.1, scale-down stabilization 300 s, scale-up 100% or 4 pods
per 15 s; KPA — stable window 60 s, panic window 10% of it (6 s), panic threshold 200%, max scale-up rate 1000,
max scale-down rate 2, target 100 concurrent requests (70% utilisation). Here the target is a latency quantile,
not CPU or concurrency.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from string import Formatter
from typing import TYPE_CHECKING

from warmpod.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


class PolicyError(UsageError):
    """Invalid policy settings; the message names the setting(s) and the rule.

    `template` is the message with each setting it names as a named field (`{min_replicas}`) and the values as
    positional ones (`{0}`); `settings` lists those names. `str()` names them as PolicyConfig does; `render(names)`
    as the caller calls them (`warmpod up` passes its flags).
    """

    def __init__(self, template: str, *values: object) -> None:
        self.template, self.values = template, values
        self.settings = tuple(name for _, name, _, _ in Formatter().parse(template) if name and not name.isdigit())
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each setting called by `names[setting]` (those not in `names` keep their own name)."""
        return self.template.format(*self.values, **{s: (names or {}).get(s, s) for s in self.settings})


@dataclass(frozen=True)
class PolicyConfig:
    slo_quantile: float = 0.95
    slo_target_s: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 10
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_down_window_s: float = 300.0
    tolerance: float = 0.1
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    max_utilization: float = 0.9
    service_cv2: float = 0.0
    scale_to_zero: bool = False
    scale_to_zero_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.slo_quantile < 1:
            raise PolicyError("{slo_quantile} must be in (0, 1), got {0}", self.slo_quantile)
        if not self.slo_target_s > 0:
            raise PolicyError("{slo_target_s} must be positive, got {0}", self.slo_target_s)
        if self.min_replicas < 0:
            raise PolicyError("{min_replicas} must not be negative, got {0}", self.min_replicas)
        if self.max_replicas < 1:
            raise PolicyError("{max_replicas} must be at least 1, got {0}", self.max_replicas)
        if self.min_replicas > self.max_replicas:
            raise PolicyError("{min_replicas} {0} is more than {max_replicas} {1}", self.min_replicas,
                              self.max_replicas)  # fmt: skip
        if self.min_replicas == 0 and not self.scale_to_zero:
            raise PolicyError("{min_replicas} 0 needs {scale_to_zero}")
        for name in ("stable_window_s", "panic_window_s", "scale_down_window_s", "scale_to_zero_grace_s"):
            if getattr(self, name) < 0:
                raise PolicyError("{" + name + "} must not be negative, got {0}", getattr(self, name))
        if self.panic_window_s > self.stable_window_s:
            raise PolicyError("{panic_window_s} {0} is longer than {stable_window_s} {1}", self.panic_window_s,
                              self.stable_window_s)  # fmt: skip
        if self.panic_threshold < 1 or self.max_scale_up_rate < 1 or self.max_scale_down_rate < 1:
            raise PolicyError("{panic_threshold}, {max_scale_up_rate} and {max_scale_down_rate} must be at least 1")
        if self.service_cv2 < 0:
            raise PolicyError("{service_cv2} must not be negative, got {0}", self.service_cv2)
        if not 0 < self.max_utilization <= 1 or not 0 <= self.tolerance < 1:
            raise PolicyError("{max_utilization} must be in (0, 1] and {tolerance} in [0, 1)")


@dataclass(frozen=True)
class ReplicaSample:
    """One replica over the last interval (deltas of its counters); `ok` False when its metrics were unreadable."""

    name: str
    ok: bool = True
    rate_rps: float = 0.0  # requests answered per second
    busy: float = 0.0  # fraction of its workers' time in forward passes, 0..1
    service_s: float = 0.0  # mean forward-pass (batch) duration: the service time a request experiences
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound s, cumulative count delta), +inf last


@dataclass(frozen=True)
class PolicyState:
    demand: tuple[tuple[float, float], ...] = ()  # (time, fleet request rate) within the stable window
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, desired) within the scale-down window
    panic_until: float = -math.inf
    capacity_rps: float | None = None  # last known capacity per replica at the SLO
    idle_since: float | None = None  # when demand last became zero


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: PolicyState
    reason: str
    demand_rps: float
    capacity_rps: float | None
    observed_quantile_s: float | None  # with observed_above_top_bucket: the top finite bound, a lower bound only
    panicking: bool = False
    unknown: tuple[str, ...] = field(default=())
    observed_above_top_bucket: bool = False  # the quantile lies in the +Inf bucket: above observed_quantile_s


def format_latency(seconds: float, above_top_bucket: bool = False) -> str:
    """A quantile for people: "48 ms", or "> 10 s" when it lies beyond the histogram's top finite bucket (`seconds`
    is then that bound: the histogram cannot say how far above it)."""
    return f"> {seconds:g} s" if above_top_bucket else f"{seconds * 1e3:.0f} ms"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation within the bucket holding rank q * total."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width > 0 else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def above_top_bucket(q: float, buckets: Sequence[tuple[float, float]]) -> bool:
    """Whether the q-quantile lies in the +Inf bucket, where `histogram_quantile` can only give the top finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return False
    finite = [count for bound, count in buckets if not math.isinf(bound)]
    return not finite or finite[-1] < q * buckets[-1][1]


def merge_buckets(samples: Sequence[ReplicaSample]) -> tuple[tuple[float, float], ...]:
    """Sum the replicas' bucket counts (they share bounds: one server, one metrics definition)."""
    merged: dict[float, float] = {}
    for s in samples:
        for bound, count in s.latency_buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    return tuple(sorted(merged.items()))


def latency_quantile(rho: float, service_s: float, config: PolicyConfig) -> float:
    """The SLO quantile of latency at utilisation rho (heavy-traffic M/G/1; see the module docstring)."""
    if rho <= 0:
        return service_s
    tail = service_s * (1 + config.service_cv2) / (2 * (1 - rho)) * math.log(rho / (1 - config.slo_quantile))
    return service_s + max(0.0, tail)


def capacity_at_slo(sample: ReplicaSample, config: PolicyConfig) -> float | None:
    """Requests per second this replica can serve with its SLO quantile at the target (None: no data)."""
    if sample.rate_rps <= 0 or sample.busy <= 0 or sample.service_s <= 0:
        return None
    low, high = 0.0, 0.999
    for _ in range(40):  # L(rho) grows with rho
        mid = (low + high) / 2
        low, high = (
            (mid, high) if latency_quantile(mid, sample.service_s, config) <= config.slo_target_s else (low, mid)
        )
    saturation = sample.rate_rps / min(sample.busy, 1.0)
    return saturation * min(max(low, 0.05), config.max_utilization)


def _window_mean(points: Sequence[tuple[float, float]], since: float) -> float:
    values = [v for t, v in points if t >= since]
    return sum(values) / len(values) if values else 0.0


def decide(
    samples: Sequence[ReplicaSample],
    current: int,
    state: PolicyState,
    now: float,
    config: PolicyConfig,
    names: Mapping[str, str] | None = None,
) -> Decision:
    """The desired replica count for this tick, and the state to pass to the next one. `names` calls a setting in
    the reason as the caller does (`warmpod up` passes its flags: "clipped to --max-replicas 2"), as
    `PolicyError.render` does."""
    known = [s for s in samples if s.ok]
    unknown = tuple(s.name for s in samples if not s.ok)
    demand = sum(s.rate_rps for s in known)
    if unknown and known:  # the unknown ones serve too: assume they carry the average load
        demand *= len(samples) / len(known)
    capacities = [c for s in known if (c := capacity_at_slo(s, config)) is not None]
    capacity = statistics.median(capacities) if capacities else state.capacity_rps
    latency = merge_buckets(known)
    observed = histogram_quantile(config.slo_quantile, latency)
    above = above_top_bucket(config.slo_quantile, latency)

    history = (*((t, d) for t, d in state.demand if t > now - config.stable_window_s), (now, demand))
    stable = _window_mean(history, now - config.stable_window_s)
    panic_demand = _window_mean(history, now - config.panic_window_s)
    idle_since = (state.idle_since if state.idle_since is not None else now) if demand == 0 else None

    if current == 0:
        desired, reason, panicking = (1, "demand at zero replicas", False) if demand > 0 else (0, "idle at zero", False)
        panic_until = state.panic_until
    else:
        breached = observed is not None and observed > config.slo_target_s
        need_panic = math.ceil(panic_demand / capacity) if capacity else current
        trigger = breached or (capacity is not None and need_panic >= config.panic_threshold * current)
        panic_until = now + config.stable_window_s if trigger else state.panic_until
        panicking = now < panic_until
        if panicking:
            react = max(current + 1, math.ceil(current * min((observed or 0) / config.slo_target_s, 2.0))) \
                if breached else current  # fmt: skip
            desired = max(current, need_panic, react)
            quantile = (f"p{config.slo_quantile * 100:g} {format_latency(observed or 0, above)}, over the "
                        f"{config.slo_target_s * 1e3:g} ms target")  # fmt: skip
            reason = "panic: " + (quantile if breached else f"burst needs {need_panic}")
        elif capacity:
            desired = math.ceil(stable / capacity) if stable > 0 else config.min_replicas
            if abs(desired / current - 1) <= config.tolerance:
                desired = current
            reason = f"stable demand {stable:.1f} rps / capacity {capacity:.1f} rps per replica"
        else:
            desired, reason = current, "no capacity estimate yet"
        if (
            config.scale_to_zero
            and idle_since is not None
            and now - idle_since >= (config.stable_window_s + config.scale_to_zero_grace_s)
        ):
            desired, reason = 0, "idle past the scale-to-zero grace"

    recommendations = (*((t, r) for t, r in state.recommendations if t > now - config.scale_down_window_s),
                       (now, desired))  # fmt: skip
    if desired < current:
        held = max(r for _, r in recommendations)
        if held > desired:
            desired, reason = min(held, current), reason + f"; held by the scale-down window ({held})"
    if unknown and desired < current:
        desired, reason = current, f"no scale-down while {', '.join(unknown)} is unknown"
    if current > 0:
        desired = min(desired, math.ceil(current * config.max_scale_up_rate))
        desired = max(desired, math.floor(current / config.max_scale_down_rate) if desired > 0 else 0)
    floor = 0 if config.scale_to_zero and desired == 0 else config.min_replicas
    desired = max(desired, floor)
    if desired > config.max_replicas:  # say so: "needs 7" alone reads as if 7 were coming
        needs, limit = f"needs {desired}", f"clipped to {(names or {}).get('max_replicas', 'max_replicas')}"
        reason += f", {limit} {config.max_replicas}" if reason.endswith(needs) else \
            f"; {needs}, {limit} {config.max_replicas}"  # fmt: skip
        desired = config.max_replicas

    new_state = replace(state, demand=history, recommendations=recommendations, panic_until=panic_until,
                        capacity_rps=capacity, idle_since=idle_since)  # fmt: skip
    return Decision(desired, new_state, reason, demand, capacity, observed, panicking, unknown, above)


# ------------------------------------------------------------------------------- observations from /metrics


INFERENCE_ENDPOINTS = ("infer", "embeddings")


@dataclass(frozen=True)
class Snapshot:
    """The counters of one scrape of a replica's /metrics that the policy needs (cumulative since its start)."""

    at: float  # the caller's clock (monotonic seconds) when scraped
    requests: float  # inference requests answered 2xx
    latency_buckets: tuple[tuple[float, float], ...]  # cumulative counts of those requests' latency, +inf last
    batch_seconds: float  # total forward-pass time
    batches: float  # forward passes
    workers: float  # forward passes that may run at once


def parse_snapshot(text: str, at: float) -> Snapshot:
    """Read a replica's /metrics exposition; ValueError when it is not a warmpod server's metrics."""
    return snapshot_from_families(parse_families(text), at)


def parse_families(text: str) -> list[Metric]:
    """A /metrics exposition's metric families (prometheus_client's parser); ValueError when it is not one."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError, and others on some malformed input
        raise ValueError(f"not a Prometheus exposition: {e}") from None


def snapshot_from_families(families: Iterable[Metric], at: float) -> Snapshot:
    """The snapshot in a replica's metric families: a parsed exposition (`parse_snapshot`), or its own registry's
    `collect()` (no text in between); ValueError when they are not a warmpod server's metrics."""
    requests = batch_seconds = batches = 0.0
    workers: float | None = None
    buckets: dict[float, float] = {}
    found = False
    for family in families:
        for s in family.samples:
            if s.name == "warmpod_request_duration_seconds_bucket" and _answered(s.labels):
                buckets[float(s.labels["le"])] = buckets.get(float(s.labels["le"]), 0.0) + s.value
            elif s.name == "warmpod_request_duration_seconds_count" and _answered(s.labels):
                requests += s.value
            elif s.name == "warmpod_batch_duration_seconds_sum":
                batch_seconds += s.value
            elif s.name == "warmpod_batch_duration_seconds_count":
                batches += s.value
            elif s.name == "warmpod_workers":
                workers = s.value
            else:
                continue
            found = True
    if not found or workers is None:
        raise ValueError("no warmpod_* serving metrics (warmpod_workers, warmpod_request_duration_seconds) in it")
    return Snapshot(at, requests, tuple(sorted(buckets.items())), batch_seconds, batches, max(workers, 1.0))


def _answered(labels: dict[str, str]) -> bool:
    return labels.get("endpoint") in INFERENCE_ENDPOINTS and labels.get("code", "").startswith("2")


def sample_between(name: str, before: Snapshot, after: Snapshot) -> ReplicaSample:
    """What a replica did between two scrapes. A restarted replica (counters went down) counts from zero."""
    if after.requests < before.requests or after.batches < before.batches:
        before = Snapshot(before.at, 0.0, (), 0.0, 0.0, before.workers)
    elapsed = after.at - before.at
    if elapsed <= 0:
        return ReplicaSample(name, ok=False)
    earlier = dict(before.latency_buckets)
    batch_seconds, batches = after.batch_seconds - before.batch_seconds, after.batches - before.batches
    return ReplicaSample(
        name,
        rate_rps=(after.requests - before.requests) / elapsed,
        busy=min(1.0, batch_seconds / (elapsed * after.workers)),
        service_s=batch_seconds / batches if batches > 0 else 0.0,
        latency_buckets=tuple((b, c - earlier.get(b, 0.0)) for b, c in after.latency_buckets),
    )


# ------------------------------------------------------------------------------- one tick of a supervisor


def observe_replica(
    name: str, previous: Snapshot | None, scraped: Snapshot | None
) -> tuple[ReplicaSample | None, Snapshot | None]:
    """A ready replica's part of a tick, from this tick's scrape (None: unreadable) and its last readable one: the
    sample for `decide` (None from its first readable scrape, which is only the baseline; ok=False when unreadable)
    and the snapshot the next scrape is compared with."""
    if scraped is None:
        return ReplicaSample(name, ok=False), previous
    return (None if previous is None else sample_between(name, previous, scraped)), scraped


@dataclass(frozen=True)
class Tick:
    """What a supervisor does this tick: the replica count to reconcile to (None: no decision, keep the current
    target), why, the state for the next tick, and the policy's decision (None when it was not asked)."""

    replicas: int | None
    reason: str
    state: PolicyState
    decision: Decision | None = None


def supervise(
    samples: Sequence[ReplicaSample],
    ready: int,
    starting: Sequence[str],
    state: PolicyState,
    now: float,
    config: PolicyConfig,
    names: Mapping[str, str] | None = None,
) -> Tick:
    """`decide` as a supervisor applies it (`warmpod up`'s, and the simulator's in bench/): the replicas are the
    `ready` ones plus the `starting` ones (named); no sample yet (every ready replica had only its baseline scrape)
    means no decision; a scale-up waits while a replica is still starting, so a slow start is not answered by
    starting more. `names`: as `decide`'s."""
    if not samples:
        return Tick(None, "first scrape of a ready worker" if ready else "waiting for a ready worker", state)
    current = ready + len(starting)
    decision = decide(samples, current, state, now, config, names)
    desired, reason = decision.replicas, decision.reason
    if desired > current and starting:
        desired = current
        reason += f"; holding until {', '.join(starting)} {'is' if len(starting) == 1 else 'are'} ready"
    return Tick(desired, reason, decision.state, decision)


def pod_scale_factor(sample: ReplicaSample, config: PolicyConfig) -> float:
    """One replica's share of the fleet's scale factor: its demand / its capacity at the SLO, at least its observed
    quantile / the target. The average over replicas is what HPA (or KEDA) compares with a target of 1.0:
    desired = ceil(current x average) — the stable-window part of `decide`, in HPA's own formula."""
    capacity = capacity_at_slo(sample, config)
    factor = sample.rate_rps / capacity if capacity else 0.0
    observed = histogram_quantile(config.slo_quantile, sample.latency_buckets)
    if observed is not None and observed > config.slo_target_s:
        factor = max(factor, observed / config.slo_target_s)
    return factor
