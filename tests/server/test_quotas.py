"""Per-tenant rate limits (pure): `--tenant-quota` and `--tenant-weight` specs parsed or refused with a message,
token buckets on a fake clock, Retry-After in whole seconds, the `*` default, and the tenant label bound of the
per-tenant metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from warmpod.server.metrics import OTHER_TENANT, ServerMetrics, TenantLabels
from warmpod.server.quotas import QuotaSpec, TenantQuotas, TokenBucket, parse_quota, parse_weight

pytestmark = pytest.mark.unit


def test_specs_parse() -> None:
    assert parse_quota("team-a:requests=20,rows=500") == QuotaSpec("team-a", requests=20, rows=500)
    assert parse_quota("*:rows=0.5") == QuotaSpec("*", rows=0.5)
    assert parse_quota(" b : requests = 3 ") == QuotaSpec("b", requests=3)
    assert str(parse_quota("a:rows=500,requests=2.5")) == "a:requests=2.5,rows=500"
    assert parse_weight("team-a=2") == ("team-a", 2.0)
    assert parse_weight("b=0.25") == ("b", 0.25)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("team-a", "'team-a' is not TENANT:requests=R,rows=N (e.g. team-a:requests=20,rows=500, or *:rows=100)"),
        (":rows=1", "':rows=1' names no tenant before ':' (a tenant name, or * for the default)"),
        ("a:", "'a:': '' is not requests=R or rows=N (per second)"),
        ("a:tokens=5", "'a:tokens=5': 'tokens=5' is not requests=R or rows=N (per second)"),
        ("a:rows", "'a:rows': 'rows' is not requests=R or rows=N (per second)"),
        ("a:rows=1,rows=2", "'a:rows=1,rows=2' gives rows twice"),
        ("a:rows=many", "'a:rows=many': rows='many' is not a number"),
        ("a:requests=0", "'a:requests=0': requests must be a positive number per second, got 0"),
        ("a:rows=nan", "'a:rows=nan': rows must be a positive number per second, got nan"),
    ],
)
def test_bad_quota_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_quota(spec)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a", "'a' is not TENANT=WEIGHT (e.g. team-a=2; tenants without one have weight 1)"),
        ("=2", "'=2' is not TENANT=WEIGHT (e.g. team-a=2; tenants without one have weight 1)"),
        ("a=heavy", "'a=heavy': weight 'heavy' is not a number"),
        ("a=-1", "'a=-1': the weight must be a positive number, got -1"),
        ("a=inf", "'a=inf': the weight must be a positive number, got inf"),
    ],
)
def test_bad_weights_say_why(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_weight(spec)
    assert str(e.value) == message


def test_a_bucket_starts_full_refills_and_caps_at_one_second() -> None:
    bucket = TokenBucket(rate=4, updated=100.0)
    for _ in range(4):
        assert bucket.wait(1, 100.0) == 0
        bucket.take(1)
    assert bucket.wait(1, 100.0) == pytest.approx(0.25)
    assert bucket.wait(1, 100.25) == 0
    bucket.take(1)
    assert bucket.wait(4, 200.0) == 0 and bucket.tokens == 4  # an hour idle still holds one second's worth


def test_a_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() -> None:
    bucket = TokenBucket(rate=10, updated=0.0)
    assert bucket.wait(25, 0.0) == 0  # 25 rows > the 10 a bucket holds: allowed from a full bucket...
    bucket.take(25)
    assert bucket.wait(1, 0.0) == pytest.approx(1.6)  # ...and the debt (-15) is repaid before anything else
    assert bucket.wait(25, 2.5) == 0  # full again: the long-run rate stays 10/s


def test_a_slow_rate_still_lets_one_request_through() -> None:
    bucket = TokenBucket(rate=0.5, updated=0.0)
    assert bucket.capacity == 1 and bucket.wait(1, 0.0) == 0
    bucket.take(1)
    assert bucket.wait(1, 0.0) == pytest.approx(2.0)


def test_quotas_refuse_with_whole_seconds_and_a_message_naming_tenant_limit_and_flag() -> None:
    quotas = TenantQuotas([parse_quota("a:requests=2"), parse_quota("*:rows=10")])
    assert quotas.check("a", 1000, 0.0) is None and quotas.check("a", 1000, 0.0) is None  # a has no rows limit
    refusal = quotas.check("a", 1, 0.0)
    assert refusal is not None and refusal.retry_after_s == 1  # 0.5 s, rounded up to a whole second
    assert (
        refusal.message() == "tenant 'a' is over its quota of 2 requests/s (--tenant-quota a:requests=2); retry in 1 s"
    )
    assert quotas.check("a", 1, 0.5) is None
    # b and c have no line of their own: each gets its own buckets from '*'
    assert quotas.check("b", 10, 0.0) is None and quotas.check("c", 10, 0.0) is None
    refusal = quotas.check("b", 5, 0.0)
    assert refusal is not None and refusal.unit == "rows" and refusal.retry_after_s == 1
    assert refusal.message() == "tenant 'b' is over its quota of 10 rows/s (--tenant-quota *:rows=10); retry in 1 s"
    assert quotas.check("b", 30, 1.0) is None  # full again: a 30-row request passes, leaving 20 rows of debt
    refusal = quotas.check("b", 1, 1.0)
    assert refusal is not None and refusal.retry_after_s == 3  # (1 + 20) / 10 = 2.1 s → 3


def test_a_refused_request_takes_nothing() -> None:
    quotas = TenantQuotas([parse_quota("a:requests=5,rows=4")])
    assert quotas.check("a", 4, 0.0) is None
    for _ in range(3):
        refusal = quotas.check("a", 4, 0.0)  # the rows limit refuses; the requests bucket keeps its 4 tokens
        assert refusal is not None and refusal.unit == "rows"
    assert quotas.buckets[("a", "requests")].tokens == 4  # 5, less the one request that passed


def test_without_a_line_or_a_default_nobody_is_limited() -> None:
    quotas = TenantQuotas([parse_quota("a:requests=1")])
    assert all(quotas.check("b", 1000, 0.0) is None for _ in range(100))
    assert not TenantQuotas([]) and TenantQuotas([]).check("a", 1, 0.0) is None


def test_two_lines_for_one_tenant_are_refused() -> None:
    with pytest.raises(ValueError, match="a tenant has two --tenant-quota lines"):
        TenantQuotas([parse_quota("a:requests=1"), parse_quota("a:rows=1")])


def test_buckets_stay_bounded() -> None:
    from warmpod.server import quotas as module

    quotas = TenantQuotas([parse_quota("*:requests=1")])
    for i in range(module.MAX_BUCKETS + 10):
        quotas.check(f"t{i}", 1, float(i))  # each bucket is full again a second later: forgettable
    assert len(quotas.buckets) <= module.MAX_BUCKETS


def test_tenant_labels_are_bounded() -> None:
    labels = TenantLabels(limit=3)
    assert [labels(t) for t in ("a", "b", "a", "c", "d", "e", "b")] == ["a", "b", "a", "c", OTHER_TENANT, OTHER_TENANT,
                                                                          "b"]  # fmt: skip
    metrics = ServerMetrics(CollectorRegistry())
    for i in range(100):
        metrics.observe_tenant(f"tenant-{i}", "m", 200, 0.01, None)
    metrics.observe_tenant("tenant-99", "m", 503, 0.01, "queue_full")
    tenants = {s.labels["tenant"] for f in metrics.registry.collect() for s in f.samples if "tenant" in s.labels}
    assert len(tenants) == 65 and OTHER_TENANT in tenants
    assert metrics.tenant_rejected.labels(OTHER_TENANT, "m", "queue_full")._value.get() == 1
