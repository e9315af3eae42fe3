"""Fair queuing between tenants: the order batches take rows in (pure FairQueue, deterministic), admission to the
bounded queue (a flooder gets the 503s, a tenant alone gets the whole queue), and the same through BatchQueue with a
model that blocks until the test lets it run, so every batch's make-up is known."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from warmpod.server.batcher import BatchQueue, rows_ready, take_batch
from warmpod.server.errors import Unavailable
from warmpod.server.fairqueue import FairQueue, Pending
from warmpod.server.model import Prepared, ServedModel
from warmpod.server.tenancy import ANONYMOUS
from warmpod.server.tensors import Tensor, TensorSpec

pytestmark = pytest.mark.unit


class Gate(ServedModel):
    """Returns each row times two; each forward pass waits until the test opens the gate, and records which
    values (the tests encode the tenant in them) it ran together."""

    family = "test"

    def __init__(self) -> None:
        super().__init__("gate", "1", None)
        self.batches: list[list[float]] = []
        self.started = threading.Semaphore(0)  # released once per forward pass that began
        self.gate = threading.Semaphore(0)  # one release lets one forward pass finish

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1,)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1,)),)

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        return Prepared(rows=len(inputs["x"].data), data=inputs["x"].data, model=self)

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        self.started.release()
        assert self.gate.acquire(timeout=10), "the test never let this forward pass finish"
        x = np.concatenate([p.data for p in batch])
        self.batches.append(x.tolist())
        out, start = [], 0
        for p in batch:
            out.append({"y": x[start : start + p.rows] * 2})
            start += p.rows
        return out

    def example_inputs(self) -> dict[str, Tensor]:
        return {}


MODEL = Gate()


def chunk(tenant: str, rows: int = 1, model: ServedModel | None = MODEL, at: float = 0.0) -> Pending:
    return Pending(Prepared(rows=rows, data=None, model=model), at, at + 10, future=None, tenant=tenant)  # type: ignore[arg-type]


def filled(weights: dict[str, float] | None = None, **queued: int | list[int]) -> FairQueue:
    """A queue with, per tenant, that many 1-row chunks (or chunks of those row counts), pushed tenant by tenant."""
    q = FairQueue(weights)
    for tenant, spec in queued.items():
        for rows in [1] * spec if isinstance(spec, int) else spec:
            q.push(chunk(tenant, rows))
    return q


def tenants(batch: list[Pending]) -> str:
    return "".join(p.tenant for p in batch)


def rows_by_tenant(batches: list[list[Pending]]) -> Counter[str]:
    return Counter({t: sum(p.prepared.rows for b in batches for p in b if p.tenant == t) for t in "abc"})


# ------------------------------------------------------------------------------------------ the order (pure)


def test_one_tenant_is_a_fifo() -> None:
    q = filled(a=[3, 4, 2, 1])
    assert [p.prepared.rows for p in take_batch(q, 8)] == [3, 4]  # the 2 does not fit: it waits, no reordering
    assert [p.prepared.rows for p in take_batch(q, 8)] == [2, 1]
    assert not q and len(q) == 0


def test_a_tenant_arriving_behind_a_backlog_goes_in_the_next_batch() -> None:
    q = filled(a=40)
    assert tenants(take_batch(q, 4)) == "aaaa"
    q.push(chunk("b"))
    assert tenants(take_batch(q, 4)) == "baaa"  # not behind a's 36 queued chunks, as in a FIFO
    assert tenants(take_batch(q, 4)) == "aaaa"


def test_tenants_that_all_wait_alternate() -> None:
    q = filled(a=12, b=12)
    batches = [take_batch(q, 4) for _ in range(6)]
    assert [tenants(b) for b in batches] == ["abab"] * 6


def test_rows_are_shared_in_proportion_to_weights() -> None:
    q = filled({"a": 3}, a=60, b=60, c=60)  # weights 3:1:1
    batches = [take_batch(q, 5) for _ in range(8)]  # 40 rows while all three wait
    assert rows_by_tenant(batches) == Counter(a=24, b=8, c=8)
    assert all(Counter(tenants(b)) == Counter(a=3, b=1, c=1) for b in batches)


def test_fairness_is_in_rows_not_requests() -> None:
    q = filled(a=[8] * 10, b=[1] * 80)
    batches = [take_batch(q, 8) for _ in range(10)]
    assert rows_by_tenant(batches) == Counter(a=40, b=40)  # five of a's 8-row chunks, forty of b's 1-row ones


def test_an_idle_tenant_saves_no_credit() -> None:
    q = filled(a=200, b=1)
    first = [take_batch(q, 4) for _ in range(25)]  # b's one chunk, then a alone for a long while
    assert rows_by_tenant(first) == Counter(a=99, b=1)
    for _ in range(20):
        q.push(chunk("b"))
    later = [take_batch(q, 4) for _ in range(5)]
    assert [tenants(b) for b in later] == ["baba"] * 5  # alternating from now on, not b's 20 first


def test_a_tenant_that_does_not_fit_sits_out_and_keeps_its_order() -> None:
    q = filled(a=[6, 1], b=[1, 1, 1])
    batch = take_batch(q, 4)
    assert [(p.tenant, p.prepared.rows) for p in batch] == [("a", 6)]  # the first chunk is always taken
    batch = take_batch(q, 4)
    # a's next (1 row, tag 6) comes after b's (tags 0, 1, 2): b's three fit, and a's 1-row chunk joins last
    assert [(p.tenant, p.prepared.rows) for p in batch] == [("b", 1), ("b", 1), ("b", 1), ("a", 1)]
    q = filled(a=[1, 4, 1], b=[1, 1])
    assert [(p.tenant, p.prepared.rows) for p in take_batch(q, 4)] == [("a", 1), ("b", 1), ("b", 1)]
    assert [(p.tenant, p.prepared.rows) for p in take_batch(q, 4)] == [("a", 4)]  # a's 1 never jumps its 4


def test_models_never_mix_in_a_batch() -> None:
    old, new = Gate(), Gate()
    q = FairQueue()
    for p in (chunk("a", model=old), chunk("b", model=new), chunk("a", model=old), chunk("b", model=old)):
        q.push(p)
    assert [(p.tenant, p.prepared.model) for p in take_batch(q, 8)] == [("a", old), ("a", old)]
    assert [(p.tenant, p.prepared.model) for p in take_batch(q, 8)] == [("b", new)]
    assert [(p.tenant, p.prepared.model) for p in take_batch(q, 8)] == [("b", old)]


def test_rows_ready_counts_what_would_close_the_batch_and_takes_nothing() -> None:
    q = filled(a=[3, 4, 2], b=[1])
    assert rows_ready(q, 8) == 8 and len(q) == 4  # a3 b1 a4 fit (8 rows): full
    q = filled(a=[3, 6], b=[3])
    assert rows_ready(q, 8) == 12  # a3 b3 = 6, and a's 6 does not fit: counted, so the batch reads as full
    assert rows_ready(FairQueue(), 8) == 0


def test_the_oldest_chunk_sets_the_batch_delay() -> None:
    q = FairQueue()
    q.push(chunk("a", at=5.0))
    q.push(chunk("b", at=3.0))  # (clocks differ only in tests: a FIFO's head is its oldest)
    assert q.oldest() == 3.0


def test_state_is_forgotten_once_every_tenant_is_served() -> None:
    q = filled({"a": 2}, a=5, b=5)
    while q:
        take_batch(q, 3)
    assert not q.queues and set(q.finish) == {"b"}  # b's last chunk (tag 4) ends at 5: b's next would start there
    for _ in range(3):
        q.push(chunk("c"))
    take_batch(q, 3)  # c's tags 4, 5, 6: the virtual time passes the end of b's last chunk
    assert q.vtime == 6 and q.finish == {"c": 7}  # b, as good as never seen, is forgotten: state stays bounded
    q.push(chunk("b"))
    assert next(iter(q)).tag == 6  # b starts at the virtual time


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tenant 'a' has weight 0; weights must be positive"):
        FairQueue({"a": 0})


# ------------------------------------------------------------------------------------------ admission (pure)


def test_a_tenant_alone_gets_the_whole_queue() -> None:
    q = FairQueue()
    for _ in range(8):
        assert q.admit("a", 8).admit
        q.push(chunk("a"))
    decision = q.admit("a", 8)
    assert not decision.admit and decision.share == 8


def test_when_full_another_tenant_is_admitted_and_the_flooder_loses_its_newest() -> None:
    q = filled(a=8)
    newest = list(q)[-1]
    decision = q.admit("b", 8)
    assert decision.admit and decision.evict == "a" and decision.share == 4
    assert q.evict_newest("a") is newest and q.count("a") == 7
    q.push(chunk("b"))
    for _ in range(3):  # b may grow to its share (4 of 8) at a's expense
        assert q.admit("b", 8).evict == "a"
        q.evict_newest("a")
        q.push(chunk("b"))
    assert q.counts() == {"a": 4, "b": 4}
    assert not q.admit("b", 8).admit  # at its share: refused, like a
    assert not q.admit("a", 8).admit


def test_admission_shares_follow_weights_and_the_furthest_over_loses() -> None:
    q = filled({"a": 3}, a=6, b=3, c=3)  # full at 12: shares a 7.2, b 2.4, c 2.4 (weights 3:1:1)
    decision = q.admit("a", 12)
    assert decision.admit and decision.evict in ("b", "c") and decision.share == pytest.approx(7.2)
    assert not q.admit("b", 12).admit  # b holds 3, over its 2.4
    q = filled({"a": 3}, a=12)
    assert q.admit("d", 12).evict == "a"  # d's share: 12 * 1/4 = 3


def test_evicting_the_tail_gives_back_its_place_in_the_order() -> None:
    q = filled(a=3)
    q.evict_newest("a")
    q.push(chunk("a"))
    assert [p.tag for p in q] == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------ through BatchQueue


def x(*values: float) -> Tensor:
    data = np.array(values, dtype=np.float32)
    return Tensor("x", "FP32", data.shape, data)


async def started(model: Gate) -> None:
    """Until a forward pass has begun (bounded)."""
    assert await asyncio.to_thread(model.started.acquire, True, 10), "no forward pass began"


async def queued(queue: BatchQueue, n: int) -> None:
    for _ in range(1000):
        if len(queue) >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(queue)} chunks queued, expected {n}")


def test_the_flooder_gets_the_503s_and_the_other_tenant_runs_next() -> None:
    async def main() -> None:
        model = Gate()
        executor = ThreadPoolExecutor(1)
        queue = BatchQueue(model_name="gate", max_batch_size=1, max_delay_s=0.0, max_queue=4, executor=executor)
        task = asyncio.create_task(queue.run_forever())
        deadline = asyncio.get_running_loop().time() + 30  # the batcher's clock is monotonic, as the loop's
        submit = queue.submit
        first = asyncio.create_task(submit(model.prepare({"x": x(1.0)}), deadline, "a"))  # a's first runs...
        await started(model)
        a = [asyncio.create_task(submit(model.prepare({"x": x(1.0 + i)}), deadline, "a")) for i in range(1, 5)]
        await queued(queue, 4)  # ...and a alone fills the queue
        with pytest.raises(Unavailable) as refused:
            await submit(model.prepare({"x": x(9.0)}), deadline, "a")
        assert refused.value.reason == "queue_full" and refused.value.status == 503
        assert str(refused.value) == "the batch queue is full (4 requests waiting); retry later or on another replica"
        b = asyncio.create_task(submit(model.prepare({"x": x(100.0)}), deadline, "b"))  # b gets in: a's newest goes
        with pytest.raises(Unavailable) as dropped:
            await a[-1]
        assert dropped.value.reason == "queue_full"
        assert str(dropped.value) == (
            "the batch queue is full: tenant 'a''s request was dropped to make room for another tenant's, as 'a' held "
            "4 of the 4 places, more than its fair share (2, by --tenant-weight); retry later or on another replica"
        )
        a2 = asyncio.create_task(submit(model.prepare({"x": x(6.0)}), deadline, "a"))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable) as over:  # a holds 3 of 4 places, over its share of 2: refused at once
            await a2
        assert str(over.value) == (
            "the batch queue is full (4 requests waiting) and tenant 'a' already holds 3 of them, its fair share while "
            "other tenants wait (2 of --max-queue 4, by --tenant-weight); retry later or on another replica"
        )
        b2 = asyncio.create_task(submit(model.prepare({"x": x(101.0)}), deadline, "b"))  # b holds 1: a's newest goes
        with pytest.raises(Unavailable, match=r"tenant 'a''s request was dropped .* 'a' held 3 of the 4 places"):
            await a[-2]
        for _ in range(5):
            model.gate.release()
        results = await asyncio.gather(first, *a[:2], b, b2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        executor.shutdown()
        assert [r["y"].tolist() for r in results] == [[2.0], [4.0], [6.0], [200.0], [202.0]]
        # a's 1.0 was running; then b's first (b, newly arrived, starts at the virtual time), then by turns
        assert model.batches == [[1.0], [100.0], [2.0], [101.0], [3.0]]

    asyncio.run(main())


def test_weights_through_the_batcher() -> None:
    async def main() -> None:
        model = Gate()
        executor = ThreadPoolExecutor(1)
        queue = BatchQueue(model_name="gate", max_batch_size=3, max_delay_s=0.0, max_queue=64, executor=executor,
                           tenant_weights={"b": 2})  # fmt: skip
        task = asyncio.create_task(queue.run_forever())
        deadline = asyncio.get_running_loop().time() + 30
        blocker = asyncio.create_task(queue.submit(model.prepare({"x": x(0.0)}), deadline, "c"))
        await started(model)
        a = [asyncio.create_task(queue.submit(model.prepare({"x": x(1.0 + i)}), deadline, "a")) for i in range(6)]
        await queued(queue, 6)
        b = [asyncio.create_task(queue.submit(model.prepare({"x": x(100.0 + i)}), deadline, "b")) for i in range(6)]
        await queued(queue, 12)
        for _ in range(5):
            model.gate.release()
        results = await asyncio.gather(blocker, *a, *b)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        executor.shutdown()
        assert [r["y"].tolist() for r in results] == [[0.0]] + [[2.0 + 2 * i] for i in range(6)] + [
            [200.0 + 2 * i] for i in range(6)
        ]
        # b (weight 2) gets two rows of every three while both wait, though all of a's were queued first (a FIFO
        # would run [1, 2, 3], [4, 5, 6], then b's)
        assert model.batches[1:] == [[1.0, 100.0, 101.0], [2.0, 102.0, 103.0], [3.0, 104.0, 105.0], [4.0, 5.0, 6.0]]

    asyncio.run(main())


def test_without_tenants_everything_is_anonymous_and_first_come_first_served() -> None:
    async def main() -> None:
        model = Gate()
        executor = ThreadPoolExecutor(1)
        queue = BatchQueue(model_name="gate", max_batch_size=2, max_delay_s=0.0, max_queue=8, executor=executor)
        task = asyncio.create_task(queue.run_forever())
        deadline = asyncio.get_running_loop().time() + 30
        first = asyncio.create_task(queue.submit(model.prepare({"x": x(0.0)}), deadline))
        await started(model)
        rest = [asyncio.create_task(queue.submit(model.prepare({"x": x(float(i))}), deadline)) for i in range(1, 6)]
        await queued(queue, 5)
        assert {p.tenant for p in queue._queue} == {ANONYMOUS}
        for _ in range(4):
            model.gate.release()
        await asyncio.gather(first, *rest)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        executor.shutdown()
        assert model.batches == [[0.0], [1.0, 2.0], [3.0, 4.0], [5.0]]

    asyncio.run(main())
