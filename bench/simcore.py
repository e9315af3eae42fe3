"""A discrete-event simulator of warmpod replicas behind a load balancer, and the autoscalers it compares.

Pure: values in, values out, no clock and no I/O; seconds are simulated seconds, and a seed fixes every draw.

    trace = Trace("step", ((0, 100), (60, 100), (60.001, 400), (300, 400)))  # (seconds, requests per second)
    policy = WarmpodPolicy(PolicyConfig(slo_target_s=0.1))
    result = simulate(trace, ServiceModel(a_s=0.0036, c_s=0.0062), policy, SimConfig(cold_start_s=1.2, seed=1))
    result.attainment(0.1), result.replica_seconds, result.scale_events

The replica is warmpod's server as `server/batcher.py` runs it: a FIFO queue bounded at `max_queue` (a request that
finds it full is refused, 503: a miss), a dynamic batcher whose batch closes at max_batch rows or max_delay after its
first request arrived, `workers` forward passes at once (rows split by `warmpod.server.batcher.share` when several
workers are idle), a forward pass of `rows` taking seconds(rows) = a + c·rows (times a seeded lognormal factor, the
measured spread). A request's latency is its arrival to the end of its batch: HTTP and tokenizer time are left out.

The fleet: requests arrive as a Poisson process with the trace's rate, each sent to the less loaded (queued +
running) of two ready replicas drawn at random (power of two choices: Envoy's least-request, Ray Serve's router). A
new replica serves `cold_start_s` after the decision; a removed one first cancels replicas still starting (newest
first), then drains the newest ready ones: no new requests, its queue finishes (as `warmpod up` reconciles).
Replica-seconds count every replica from its creation (starting included) until it is gone or the trace ends.

Each autoscaler ticks at its real period and reads only what it could read in a cluster:
  WarmpodPolicy  every 2 s, as `warmpod up`'s supervisor: a `warmpod.pods.policy.Snapshot` of each ready replica's
                 counters (requests answered, latency histogram with the server's buckets, forward seconds and
                 count, workers) turned into `ReplicaSample`s by `sample_between` the previous scrape; replicas
                 still starting give no sample but count in `current`, and hold further scale-ups.
  HpaPolicy      every 15 s (HPA's sync period), each pod's CPU over the last 15 s (metrics-server's resolution),
                 with forward-pass time as the CPU: target 70 %, tolerance 0.1, not-yet-ready pods as 0 % on scale
                 up, scale-down stabilization 300 s, scale up by max(100 %, 4 pods) per 15 s.
  KpaPolicy      every 2 s (Knative's tick), the fleet's average concurrency (requests queued or running) over the
                 stable (60 s) and panic (6 s) windows; per-pod target = target concurrency x 70 %; panic at 200 %;
                 max scale-up rate 1000, max scale-down rate 2; no scale to zero.
  RayPolicy      every 2 s (Ray's loop runs every 0.1 s on metrics pushed every 10 s), the fleet's ongoing
                 requests averaged over 30 s (look_back_period_s); target_ongoing_requests 2, upscale delay 30 s,
                 downscale delay 600 s, smoothing factor 1.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from warmpod.pods.policy import PolicyConfig, PolicyState, ReplicaSample, Snapshot, observe_replica, supervise
from warmpod.server.batcher import share
from warmpod.server.metrics import LATENCY_BUCKETS

STARTING, READY, DRAINING, GONE = "starting", "ready", "draining", "gone"
_ARRIVAL, _DONE, _CLOSE, _READY, _TICK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ServiceModel:
    """Seconds of one forward pass of `rows` rows: a + c·rows, times exp(spread·Z) when spread > 0."""

    a_s: float
    c_s: float
    spread: float = 0.0  # sigma of the lognormal factor (0: every pass takes exactly a + c·rows)

    def seconds(self, rows: int) -> float:
        return self.a_s + self.c_s * rows

    def saturation_rps(self, max_batch: int) -> float:
        """Requests per second one worker serves when every batch is full."""
        return max_batch / self.seconds(max_batch)


@dataclass(frozen=True)
class ReplicaSpec:
    """The server's batching settings (`warmpod serve` defaults)."""

    max_batch: int = 32
    max_delay_s: float = 0.002
    max_queue: int = 256
    workers: int = 1


@dataclass(frozen=True)
class Trace:
    """A request rate over time: piecewise linear between (seconds, requests per second) knots."""

    name: str
    knots: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        times = [t for t, _ in self.knots]
        if len(times) < 2 or times[0] != 0 or any(b < a for a, b in itertools.pairwise(times)):
            raise ValueError(f"trace {self.name}: knots must start at 0 and not go back in time")
        if any(r < 0 for _, r in self.knots):
            raise ValueError(f"trace {self.name}: rates must not be negative")

    @property
    def duration_s(self) -> float:
        return self.knots[-1][0]

    def rate(self, t: float | np.ndarray) -> np.ndarray:
        return np.asarray(np.interp(t, [k[0] for k in self.knots], [k[1] for k in self.knots]), dtype=np.float64)

    def arrivals(self, seed: int, step_s: float = 0.005) -> np.ndarray:
        """Arrival times of a Poisson process with this rate: unit-rate arrivals through the inverse of the
        cumulative rate (exact for a rate that is constant within each `step_s`)."""
        grid = np.arange(0.0, self.duration_s + step_s, step_s)
        grid[-1] = self.duration_s
        mid = self.rate((grid[1:] + grid[:-1]) / 2)
        cumulative = np.concatenate(([0.0], np.cumsum(mid * np.diff(grid))))
        total = float(cumulative[-1])
        rng = np.random.default_rng(seed)
        unit = np.cumsum(rng.exponential(1.0, int(total + 10 * math.sqrt(total) + 100)))
        unit = unit[unit < total]
        keep = np.concatenate(([True], np.diff(cumulative) > 0))  # interp needs increasing x: skip rate-0 steps
        return np.asarray(np.interp(unit, cumulative[keep], grid[keep]), dtype=np.float64)


@dataclass(frozen=True)
class SimConfig:
    cold_start_s: float = 1.2
    initial_replicas: int = 1
    replica: ReplicaSpec = field(default_factory=ReplicaSpec)
    seed: int = 0


_Batch = tuple["Replica", list[int], float, float]  # a forward pass: replica, request ids, start, seconds
_Close = tuple["Replica", int]  # a batch's delay ends: replica, token (stale when the batch already started)


class Replica:
    """One server: its queue, its workers, and the counters its /metrics would show."""

    __slots__ = ("batch_seconds", "batches", "buckets", "busy_starts", "close_at", "close_token", "created",
                 "ended", "idle", "outstanding", "queue", "ready_at", "requests", "rid", "running", "state",
                 "workers")  # fmt: skip

    def __init__(self, rid: int, created: float, ready_at: float, workers: int) -> None:
        self.rid, self.created, self.ready_at, self.workers = rid, created, ready_at, workers
        self.state = STARTING
        self.ended = math.inf
        self.queue: deque[int] = deque()
        self.idle = workers
        self.outstanding = 0  # queued + running: what the load balancer compares
        self.close_at = math.inf  # when the batch forming now closes (inf: none is forming)
        self.close_token = 0
        self.requests = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket (not cumulative), +Inf last
        self.batch_seconds = 0.0
        self.batches = 0
        self.running = 0
        self.busy_starts = 0.0  # sum of the start times of the batches running now

    def snapshot(self, now: float) -> Snapshot:
        """What a scrape of /metrics would give now (counters of answered requests and finished batches)."""
        cumulative, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), self.buckets, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return Snapshot(now, float(self.requests), tuple(cumulative), self.batch_seconds, float(self.batches),
                        float(self.workers))  # fmt: skip

    def cpu_seconds(self, now: float) -> float:
        """Forward-pass time so far, the running batches included (the CPU proxy HPA reads)."""
        return self.batch_seconds + self.running * now - self.busy_starts


class Autoscaler(Protocol):
    name: str
    period_s: float

    def decide(self, now: float, fleet: Fleet) -> int: ...


class Fleet:
    """The replica set and the load balancer; `simulate` drives it, autoscalers read it."""

    def __init__(self, arrivals: Sequence[float], service: ServiceModel, config: SimConfig) -> None:
        self.arrivals = arrivals
        self.service = service
        self.config = config
        self.spec = config.replica
        self.rng = random.Random(config.seed)
        self.max_batch, self.max_delay_s = config.replica.max_batch, config.replica.max_delay_s
        self.a_s, self.c_s = service.a_s, service.c_s
        # one factor per forward pass (there are at most as many passes as requests), drawn up front: it is cheaper
        factors = np.exp(service.spread * np.random.default_rng(config.seed + 1).standard_normal(len(arrivals) + 1))
        self.noise = iter(factors.tolist() if service.spread > 0 else itertools.repeat(1.0))
        self.replicas: list[Replica] = []
        self.ready: list[Replica] = []
        self.latency = [math.nan] * len(arrivals)
        self.rejected = 0
        self.inflight = 0  # over the whole fleet
        self.inflight_area = 0.0  # integral of `inflight` over time
        self.inflight_at = 0.0
        self.timeline: list[tuple[float, int, int]] = []  # (time, replicas allocated, replicas ready)
        self.events: list[tuple[float, int, int, object]] = []
        self._seq = 0

    # -------------------------------------------------------------------- what autoscalers read

    @property
    def current(self) -> int:
        """Replicas asked for and not being removed: ready plus starting (a Deployment's spec.replicas)."""
        return sum(1 for r in self.replicas if r.state in (STARTING, READY))

    @property
    def starting(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == STARTING]

    def inflight_integral(self, now: float) -> float:
        return self.inflight_area + self.inflight * (now - self.inflight_at)

    # -------------------------------------------------------------------- the simulation

    def push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, payload))

    def record(self, now: float) -> None:
        allocated = sum(1 for r in self.replicas if r.state != GONE)
        self.timeline.append((now, allocated, len(self.ready)))

    def add_replica(self, now: float) -> None:
        r = Replica(len(self.replicas), now, now + self.config.cold_start_s, self.spec.workers)
        self.replicas.append(r)
        if self.config.cold_start_s <= 0:
            self.make_ready(r, now)
        else:
            self.push(r.ready_at, _READY, r)

    def make_ready(self, r: Replica, now: float) -> None:
        if r.state == STARTING:
            r.state, r.ready_at = READY, now
            self.ready.append(r)

    def scale_to(self, n: int, now: float) -> None:
        current = self.current
        for _ in range(n - current):
            self.add_replica(now)
        remove = current - n
        for r in reversed(self.replicas):
            if remove <= 0:
                break
            if r.state == STARTING:  # not serving yet: cancel it
                r.state, r.ended = GONE, now
                remove -= 1
        for r in sorted(self.ready, key=lambda r: -r.ready_at):
            if remove <= 0 or len(self.ready) <= 1:
                break
            self.ready.remove(r)
            r.state = DRAINING
            if r.outstanding == 0:
                r.state, r.ended = GONE, now
            remove -= 1
        self.record(now)

    def arrive(self, i: int, now: float) -> None:
        ready = self.ready
        n = len(ready)
        if n == 1:
            r = ready[0]
        else:  # two distinct replicas at random (what random.sample(ready, 2) does, at a fraction of its cost)
            rand = self.rng.random
            first = int(rand() * n)
            second = int(rand() * (n - 1))
            a, b = ready[first], ready[second + (second >= first)]
            r = a if a.outstanding <= b.outstanding else b
        if len(r.queue) >= self.spec.max_queue:
            self.latency[i] = math.inf
            self.rejected += 1
            return
        self.inflight_area += self.inflight * (now - self.inflight_at)
        self.inflight_at = now
        self.inflight += 1
        r.queue.append(i)
        r.outstanding += 1
        if r.idle:
            self.dispatch(r, now)

    def dispatch(self, r: Replica, now: float) -> None:
        """Start batches while a worker is idle: at once when max_batch rows wait or the head's delay is over."""
        queue, max_batch = r.queue, self.max_batch
        while r.idle and queue:
            waiting = len(queue)
            if waiting < max_batch:
                due = self.arrivals[queue[0]] + self.max_delay_s
                if due > now:
                    if r.close_at != due:
                        r.close_at = due
                        r.close_token += 1
                        self.push(due, _CLOSE, (r, r.close_token))
                    return
                rows = waiting if r.idle == 1 else min(waiting, share(waiting, max_batch, r.idle))
            else:
                rows = max_batch if r.idle == 1 else share(max_batch, max_batch, r.idle)
            batch = [queue.popleft() for _ in range(rows)] if rows > 1 else [queue.popleft()]
            r.close_at = math.inf
            r.close_token += 1
            r.idle -= 1
            seconds = (self.a_s + self.c_s * rows) * next(self.noise)
            r.running += 1
            r.busy_starts += now
            self._seq += 1
            heapq.heappush(self.events, (now + seconds, self._seq, _DONE, (r, batch, now, seconds)))

    def finish(self, r: Replica, batch: list[int], started: float, seconds: float, now: float) -> None:
        r.running -= 1
        r.busy_starts -= started
        r.batch_seconds += seconds
        r.batches += 1
        r.idle += 1
        arrivals, latency, buckets = self.arrivals, self.latency, r.buckets
        for i in batch:
            lat = now - arrivals[i]
            latency[i] = lat
            buckets[bisect_left(LATENCY_BUCKETS, lat)] += 1
        done = len(batch)
        r.requests += done
        r.outstanding -= done
        self.inflight_area += self.inflight * (now - self.inflight_at)
        self.inflight_at = now
        self.inflight -= done
        if r.state == DRAINING and r.outstanding == 0:
            r.state, r.ended = GONE, now
            self.record(now)
        elif r.queue:
            self.dispatch(r, now)


@dataclass
class Result:
    trace: str
    policy: str
    cold_start_s: float
    duration_s: float
    arrivals: np.ndarray  # seconds
    latency: np.ndarray  # seconds; inf for a refused request
    timeline: np.ndarray  # rows of (time, replicas allocated, replicas ready)
    replica_seconds: float
    scale_events: int
    max_replicas: int
    decisions: list[tuple[float, int, str]]  # (time, replicas decided, why) where the count changed

    @property
    def rejected(self) -> int:
        return int(np.isinf(self.latency).sum())

    def attainment(self, target_s: float) -> float:
        """Fraction of the requests answered within `target_s` (refused ones count as misses)."""
        return float(np.mean(self.latency <= target_s)) if len(self.latency) else 1.0

    def quantile_over_time(self, q: float, window_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(window middles, q-quantile of the latency of the requests that arrived in each window)."""
        edges = np.arange(0.0, self.duration_s + window_s, window_s)
        which = np.digitize(self.arrivals, edges) - 1
        mids, values = [], []
        for k in range(len(edges) - 1):
            lat = self.latency[which == k]
            if len(lat):
                mids.append((edges[k] + edges[k + 1]) / 2)
                values.append(float(np.quantile(lat, q, method="higher")))
        return np.asarray(mids), np.asarray(values)


def simulate(trace: Trace, service: ServiceModel, policy: Autoscaler | None, config: SimConfig) -> Result:
    """Run the trace to its end (and until every request is answered) with `policy` ticking; None: fixed size."""
    arrivals = trace.arrivals(config.seed).tolist()
    fleet = Fleet(arrivals, service, config)
    for _ in range(config.initial_replicas):
        r = Replica(len(fleet.replicas), 0.0, 0.0, config.replica.workers)
        fleet.replicas.append(r)
        fleet.make_ready(r, 0.0)
    fleet.record(0.0)
    if policy is not None:
        fleet.push(policy.period_s, _TICK, None)
    decisions: list[tuple[float, int, str]] = []
    events, n, i = fleet.events, len(arrivals), 0
    pop, arrive, finish, dispatch = heapq.heappop, fleet.arrive, fleet.finish, fleet.dispatch
    while i < n or events:
        while i < n and (not events or arrivals[i] < events[0][0]):
            arrive(i, arrivals[i])
            i += 1
        if not events:
            continue
        now, _, kind, payload = pop(events)
        if kind == _DONE:
            r, batch, started, seconds = cast(_Batch, payload)
            finish(r, batch, started, seconds, now)
        elif kind == _CLOSE:
            r, token = cast(_Close, payload)
            if token == r.close_token:
                r.close_at = math.inf
                dispatch(r, now)
        elif kind == _READY:
            r = cast(Replica, payload)
            if r.state == STARTING:
                fleet.make_ready(r, now)
                fleet.record(now)
        elif kind == _TICK and policy is not None and now < trace.duration_s:
            before = fleet.current
            want = policy.decide(now, fleet)
            if want != before:
                decisions.append((now, want, getattr(policy, "reason", "")))
                fleet.scale_to(want, now)
            fleet.push(now + policy.period_s, _TICK, None)
    end = trace.duration_s
    replica_seconds = sum(max(0.0, min(r.ended, end) - r.created) for r in fleet.replicas)
    fleet.record(end)
    timeline = np.asarray(fleet.timeline, dtype=np.float64)
    return Result(
        trace=trace.name,
        policy=policy.name if policy is not None else "fixed",
        cold_start_s=config.cold_start_s,
        duration_s=end,
        arrivals=np.asarray(arrivals),
        latency=np.asarray(fleet.latency, dtype=np.float64),
        timeline=timeline,
        replica_seconds=replica_seconds,
        scale_events=len(decisions),
        max_replicas=int(timeline[:, 1].max()),
        decisions=decisions,
    )


# ------------------------------------------------------------------------------------------- autoscalers


class WarmpodPolicy:
    """`warmpod.pods.policy.decide` as `warmpod up`'s supervisor applies it (server/supervisor.py, `Supervisor.tick`),
    through the same rules (`warmpod.pods.policy.observe_replica` and `supervise`): each tick scrapes the ready
    replicas; a replica's first scrape is its baseline, later ones give a sample (`sample_between` the previous
    scrape); no sample yet, no decision; `current` counts ready and starting replicas; a scale-up waits while a
    replica is still starting."""

    period_s = 1.0  # `warmpod up --interval` default

    def __init__(self, config: PolicyConfig, name: str = "warmpod SLO policy") -> None:
        self.config, self.name = config, name
        self.state = PolicyState()
        self.previous: dict[int, Snapshot | None] = {}
        self.reason = ""

    def samples(self, now: float, fleet: Fleet) -> list[ReplicaSample]:
        out = []
        for r in fleet.ready:
            sample, self.previous[r.rid] = observe_replica(
                f"replica-{r.rid}", self.previous.get(r.rid), r.snapshot(now)
            )
            if sample is not None:
                out.append(sample)
        return out

    def decide(self, now: float, fleet: Fleet) -> int:
        samples = self.samples(now, fleet)
        starting = [f"replica-{r.rid}" for r in fleet.starting]
        tick = supervise(samples, len(fleet.ready), starting, self.state, now, self.config)
        self.state, self.reason = tick.state, tick.reason
        return fleet.current if tick.replicas is None else tick.replicas


@dataclass
class HpaPolicy:
    """Kubernetes' HPA (v2, default behavior) on CPU utilization, forward-pass time standing in for CPU."""

    min_replicas: int = 1
    max_replicas: int = 20
    target: float = 0.70
    tolerance: float = 0.1
    period_s: float = 15.0  # --horizontal-pod-autoscaler-sync-period; metrics-server's resolution is the same
    down_window_s: float = 300.0
    name: str = "HPA (CPU 70%)"
    reason: str = ""
    _cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # rid → (time, cpu seconds) last read
    _recommendations: list[tuple[float, int]] = field(default_factory=list)

    def decide(self, now: float, fleet: Fleet) -> int:
        current = fleet.current
        utils: list[float] = []
        unready = len(fleet.starting)
        for r in fleet.ready:
            cpu = r.cpu_seconds(now)
            last = self._cpu.get(r.rid)
            self._cpu[r.rid] = (now, cpu)
            if last is None or last[0] < r.ready_at:  # its metric window began before it was ready: set aside
                unready += 1
                continue
            utils.append((cpu - last[1]) / ((now - last[0]) * r.workers))
        desired = current
        if utils:
            ratio = statistics.fmean(utils) / self.target
            if unready and ratio > 1:  # scale up with pods set aside: count them at 0 % and check again
                new_ratio = sum(utils) / (self.target * (len(utils) + unready))
                if abs(new_ratio - 1) > self.tolerance and new_ratio > 1:
                    desired = max(current, math.ceil(new_ratio * (len(utils) + unready)))
            elif abs(ratio - 1) > self.tolerance:
                desired = math.ceil(ratio * len(utils))
            self.reason = f"CPU {statistics.fmean(utils):.0%} of {len(utils)} pods, {unready} set aside"
        self._recommendations = [(t, d) for t, d in self._recommendations if t > now - self.down_window_s]
        self._recommendations.append((now, desired))
        if desired < current:  # scale-down stabilization: the highest recommendation of the window
            desired = min(current, max(d for _, d in self._recommendations))
        desired = min(desired, max(2 * current, current + 4))  # 100 % or 4 pods per 15 s, whichever is more
        return min(max(desired, self.min_replicas), self.max_replicas)


@dataclass
class KpaPolicy:
    """Knative's KPA on concurrency (requests queued or running), stable and panic windows, no scale to zero."""

    target_concurrency: float  # autoscaling.knative.dev/target, per pod
    utilization: float = 0.70  # container-concurrency-target-percentage
    min_replicas: int = 1
    max_replicas: int = 20
    period_s: float = 2.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    name: str = "Knative KPA (concurrency)"
    reason: str = ""
    _history: deque[tuple[float, float]] = field(default_factory=deque)
    _panic_since: float | None = None
    _max_panic_pods: int = 0

    def decide(self, now: float, fleet: Fleet) -> int:
        area = fleet.inflight_integral(now)
        self._history = self._history or deque([(0.0, 0.0)])
        self._history.append((now, area))
        while self._history and self._history[0][0] < now - self.stable_window_s:
            self._history.popleft()
        stable = window_mean(self._history, now, area, self.stable_window_s)
        panic = window_mean(self._history, now, area, self.panic_window_s)
        ready = max(1, len(fleet.ready))
        per_pod = self.target_concurrency * self.utilization
        dspc, dppc = math.ceil(stable / per_pod), math.ceil(panic / per_pod)
        up, down = math.ceil(self.max_scale_up_rate * ready), math.floor(ready / self.max_scale_down_rate)
        stable_pods, panic_pods = min(max(dspc, down), up), min(max(dppc, down), up)
        over = dppc / ready >= self.panic_threshold
        if over:
            self._panic_since = now
        elif self._panic_since is not None and self._panic_since + self.stable_window_s < now:
            self._panic_since, self._max_panic_pods = None, 0
        desired = stable_pods
        if self._panic_since is not None:  # the larger of the two, and never down while panicking
            self._max_panic_pods = max(self._max_panic_pods, stable_pods, panic_pods)
            desired = self._max_panic_pods
        self.reason = f"concurrency stable {stable:.1f} panic {panic:.1f}" + (" (panic)" if self._panic_since else "")
        return min(max(desired, self.min_replicas), self.max_replicas)


@dataclass
class RayPolicy:
    """Ray Serve's default autoscaling policy on ongoing requests (queued or running) per replica."""

    target_ongoing_requests: float = 2.0
    min_replicas: int = 1
    max_replicas: int = 20
    period_s: float = 2.0
    look_back_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    smoothing_factor: float = 1.0
    name: str = "Ray Serve-like (ongoing requests)"
    reason: str = ""
    _history: deque[tuple[float, float]] = field(default_factory=deque)
    _counter: int = 0  # consecutive ticks that wanted more (> 0) or fewer (< 0) replicas

    def decide(self, now: float, fleet: Fleet) -> int:
        area = fleet.inflight_integral(now)
        self._history = self._history or deque([(0.0, 0.0)])
        self._history.append((now, area))
        while self._history and self._history[0][0] < now - self.look_back_s:
            self._history.popleft()
        ongoing = window_mean(self._history, now, area, self.look_back_s)
        running = max(1, len(fleet.ready))
        error = ongoing / (self.target_ongoing_requests * running)
        wanted = math.ceil(running * (1 + (error - 1) * self.smoothing_factor))
        wanted = min(max(wanted, self.min_replicas), self.max_replicas)
        current = fleet.current
        self.reason = f"ongoing {ongoing:.1f} on {running} replicas"
        if wanted > current:
            self._counter = self._counter + 1 if self._counter >= 0 else 1
            if self._counter * self.period_s >= self.upscale_delay_s:
                self._counter = 0
                return wanted
        elif wanted < current:
            self._counter = self._counter - 1 if self._counter <= 0 else -1
            if -self._counter * self.period_s >= self.downscale_delay_s:
                self._counter = 0
                return wanted
        else:
            self._counter = 0
        return current


def window_mean(history: deque[tuple[float, float]], now: float, area: float, window_s: float) -> float:
    """The time average of in-flight requests over the last `window_s` (or what history there is)."""
    since = now - window_s
    start = next(((t, a) for t, a in history if t >= since), None)
    if start is None or start[0] >= now:
        return 0.0
    return (area - start[1]) / (now - start[0])
