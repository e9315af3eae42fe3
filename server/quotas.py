"""Per-tenant rate limits (`--tenant-quota`): token buckets of requests and rows per second, checked before any
forward pass; over the limit is 429 with Retry-After.

SPEC: `TENANT:requests=R,rows=N` (either or both; per second, numbers > 0), `*:...` for every tenant without its own
line. Each tenant has its own buckets (the `*` line is a default for each, not a pool they share). A bucket holds one
second's worth (at least 1), refills continuously, and starts full. A request needs its tokens (1 request, its rows);
one of more rows than a bucket holds passes when the bucket is full and leaves it in debt, so a tenant's long-run rate
never exceeds its limit and a large request is delayed, not refused forever. A refused request takes no tokens.

Pure: the clock is an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT = "*"  # the quota line for tenants without their own
UNITS = ("requests", "rows")
MAX_BUCKETS = 4096  # past this many tenants with buckets, full ones (no different from new ones) are forgotten


@dataclass(frozen=True)
class QuotaSpec:
    """One `--tenant-quota` line: the limits per second of one tenant (or `*`)."""

    tenant: str
    requests: float | None = None
    rows: float | None = None

    def __str__(self) -> str:
        limits = ",".join(f"{unit}={_number(value)}" for unit, value in self.limits())
        return f"{self.tenant}:{limits}"

    def limits(self) -> list[tuple[str, float]]:
        pairs = (("requests", self.requests), ("rows", self.rows))
        return [(unit, value) for unit, value in pairs if value is not None]


def parse_quota(text: str) -> QuotaSpec:
    """`TENANT:requests=R,rows=N` → QuotaSpec; ValueError naming what is wrong."""
    tenant, colon, rest = text.rpartition(":")
    if not colon:
        raise ValueError(f"{text!r} is not TENANT:requests=R,rows=N (e.g. team-a:requests=20,rows=500, or *:rows=100)")
    tenant = tenant.strip()
    if not tenant:
        raise ValueError(f"{text!r} names no tenant before ':' (a tenant name, or * for the default)")
    values: dict[str, float] = {}
    for item in rest.split(","):
        unit, eq, number = (part.strip() for part in item.partition("="))
        if unit not in UNITS or not eq:
            raise ValueError(f"{text!r}: {item.strip()!r} is not requests=R or rows=N (per second)")
        if unit in values:
            raise ValueError(f"{text!r} gives {unit} twice")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"{text!r}: {unit}={number!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{text!r}: {unit} must be a positive number per second, got {number}")
        values[unit] = value
    return QuotaSpec(tenant, requests=values.get("requests"), rows=values.get("rows"))


def parse_weight(text: str) -> tuple[str, float]:
    """`TENANT=W` → (tenant, weight); ValueError naming what is wrong."""
    tenant, eq, number = text.rpartition("=")
    tenant = tenant.strip()
    if not eq or not tenant:
        raise ValueError(f"{text!r} is not TENANT=WEIGHT (e.g. team-a=2; tenants without one have weight 1)")
    try:
        weight = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: weight {number.strip()!r} is not a number") from None
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"{text!r}: the weight must be a positive number, got {number.strip()}")
    return tenant, weight


@dataclass
class TokenBucket:
    """`rate` tokens per second, holding at most `capacity` (one second's worth, at least 1); starts full."""

    rate: float
    updated: float
    tokens: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    @property
    def capacity(self) -> float:
        return max(self.rate, 1.0)

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait(self, n: float, now: float) -> float:
        """Seconds until `n` tokens may be taken (0: now). More than the capacity may be taken from a full bucket."""
        self.refill(now)
        need = min(n, self.capacity)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: float) -> None:
        self.tokens -= n  # below zero after a request larger than the bucket: debt, repaid by the refill


@dataclass(frozen=True)
class Refusal:
    """A request over its tenant's quota: which limit, and when it may come back."""

    tenant: str
    spec: QuotaSpec
    unit: str
    limit: float
    retry_after_s: int  # whole seconds, at least 1

    def message(self) -> str:
        return (
            f"tenant {self.tenant!r} is over its quota of {_number(self.limit)} {self.unit}/s "
            f"(--tenant-quota {self.spec}); retry in {self.retry_after_s} s"
        )


class TenantQuotas:
    """The `--tenant-quota` lines and each tenant's buckets."""

    def __init__(self, specs: list[QuotaSpec] | tuple[QuotaSpec, ...]) -> None:
        self.specs = {spec.tenant: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("a tenant has two --tenant-quota lines; give each tenant one (requests and rows together)")
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def spec_for(self, tenant: str) -> QuotaSpec | None:
        return self.specs.get(tenant, self.specs.get(DEFAULT))

    def check(self, tenant: str, rows: int, now: float) -> Refusal | None:
        """Take a request of `rows` rows from `tenant`'s buckets, or say why not (taking nothing)."""
        spec = self.spec_for(tenant)
        if spec is None:
            return None
        wanted = {"requests": 1, "rows": rows}
        buckets = [(unit, limit, self._bucket(tenant, unit, limit, now)) for unit, limit in spec.limits()]
        waits = [(bucket.wait(wanted[unit], now), unit, limit) for unit, limit, bucket in buckets]
        wait, unit, limit = max(waits)
        if wait > 0:
            return Refusal(tenant, spec, unit, limit, max(1, math.ceil(wait)))
        for unit, _, bucket in buckets:
            bucket.take(wanted[unit])
        return None

    def _bucket(self, tenant: str, unit: str, rate: float, now: float) -> TokenBucket:
        bucket = self.buckets.get((tenant, unit))
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self.buckets[(tenant, unit)] = TokenBucket(rate, now)
        return bucket

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self.buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self.buckets[key]


def _number(value: float) -> str:
    return f"{value:g}"
