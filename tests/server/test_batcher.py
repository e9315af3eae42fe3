"""The dynamic batcher: batch forming (pure), fixed delay deadline, bounded queue, deadlines, per-request results."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from warmpod.server.batcher import BatchQueue, Pending, rows_ready, take_batch
from warmpod.server.errors import BadRequest, DeadlineExceeded, ServerError, Unavailable
from warmpod.server.metrics import ServerMetrics
from warmpod.server.model import Prepared, ServedModel
from warmpod.server.tensors import Tensor, TensorSpec


class Doubler(ServedModel):
    """Returns each row times two; records every batch it ran; can be slowed down or made to fail on a value."""

    family = "test"

    def __init__(self, delay_s: float = 0.0, fail_on: float | None = None) -> None:
        super().__init__("double", "1", None)
        self.delay_s, self.fail_on = delay_s, fail_on
        self.batches: list[int] = []
        self.started = threading.Event()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1,)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1,)),)

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        return Prepared(rows=len(inputs["x"].data), data=inputs["x"].data, model=self)

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        self.started.set()
        x = np.concatenate([p.data for p in batch])
        if self.fail_on is not None and self.fail_on in x:
            raise ValueError(f"cannot take {self.fail_on}")
        self.batches.append(len(x))
        time.sleep(self.delay_s)
        out, start = [], 0
        for p in batch:
            out.append({"y": x[start : start + p.rows] * 2})
            start += p.rows
        return out

    def example_inputs(self) -> dict[str, Tensor]:
        return {}


def item(model: ServedModel | None, rows: int) -> Pending:
    return Pending(Prepared(rows=rows, data=None, model=model), 0.0, 1.0, future=None)  # type: ignore[arg-type]


def test_take_batch_fills_up_to_max_rows_and_keeps_order() -> None:
    m = Doubler()
    q = deque([item(m, 3), item(m, 4), item(m, 2), item(m, 1)])
    assert [p.prepared.rows for p in take_batch(q, 8)] == [3, 4]  # 3+4+2 > 8: the 2 waits (no reordering)
    assert [p.prepared.rows for p in take_batch(q, 8)] == [2, 1]
    assert not q


def test_an_oversized_request_runs_alone() -> None:
    m = Doubler()
    q = deque([item(m, 40), item(m, 1)])
    assert [p.prepared.rows for p in take_batch(q, 32)] == [40]
    assert rows_ready(deque([item(m, 40)]), 32) == 40


def test_requests_of_an_old_model_never_share_a_batch_with_the_new_one() -> None:
    old, new = Doubler(), Doubler()
    q = deque([item(old, 1), item(old, 1), item(new, 1), item(old, 1)])
    assert [p.prepared.model for p in take_batch(q, 8)] == [old, old]
    assert rows_ready(q, 8) == 1
    assert [p.prepared.model for p in take_batch(q, 8)] == [new]


def x(*values: float) -> Tensor:
    data = np.array(values, dtype=np.float32)
    return Tensor("x", "FP32", data.shape, data)


async def with_queue(model: Doubler, **kwargs: float) -> tuple[BatchQueue, asyncio.Task[None], ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(1)
    settings = {"max_batch_size": 8, "max_delay_s": 0.05, "max_queue": 64, **kwargs}
    queue = BatchQueue(
        model_name="double",
        executor=executor,
        metrics=ServerMetrics(CollectorRegistry()),
        max_batch_size=int(settings["max_batch_size"]),
        max_delay_s=settings["max_delay_s"],
        max_queue=int(settings["max_queue"]),
    )
    return queue, asyncio.create_task(queue.run_forever()), executor


async def stop(task: asyncio.Task[None], executor: ThreadPoolExecutor) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    executor.shutdown()


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        model = Doubler()
        queue, task, ex = await with_queue(model, max_batch_size=64, max_delay_s=0.2)
        deadline = time.monotonic() + 10
        values = [[float(i), float(i) + 0.5] for i in range(20)]
        results = await asyncio.gather(*(queue.submit(model.prepare({"x": x(*v)}), deadline) for v in values))
        await stop(task, ex)
        for v, r in zip(values, results, strict=True):
            assert r["y"].tolist() == [2 * e for e in v]
        assert model.batches == [40]  # all 20 requests (40 rows) arrived within the delay: one forward pass

    asyncio.run(main())


def test_batch_closes_when_full_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        model = Doubler()
        queue, task, ex = await with_queue(model, max_batch_size=4, max_delay_s=30.0)
        started = time.monotonic()
        deadline = started + 10
        await asyncio.gather(*(queue.submit(model.prepare({"x": x(1.0)}), deadline) for _ in range(8)))
        await stop(task, ex)
        assert model.batches == [4, 4]
        assert time.monotonic() - started < 10  # a 30 s delay was never waited for

    asyncio.run(main())


def test_the_delay_is_a_fixed_deadline_from_the_first_request() -> None:
    """A request arriving late in the window does not extend it: the batch leaves at first + delay."""

    async def main() -> None:
        model = Doubler()
        delay = 0.3
        queue, task, ex = await with_queue(model, max_batch_size=100, max_delay_s=delay)
        deadline = time.monotonic() + 10
        t0 = time.monotonic()
        first = asyncio.create_task(queue.submit(model.prepare({"x": x(1.0)}), deadline))
        await asyncio.sleep(delay * 0.8)
        second = asyncio.create_task(queue.submit(model.prepare({"x": x(2.0)}), deadline))
        await asyncio.gather(first, second)
        elapsed = time.monotonic() - t0
        await stop(task, ex)
        assert model.batches == [2]
        assert elapsed < delay * 1.8 + 0.5, elapsed  # not first + delay + delay (a sliding window)

    asyncio.run(main())


def test_full_queue_refuses_at_once() -> None:
    async def main() -> None:
        model = Doubler(delay_s=0.3)
        queue, task, ex = await with_queue(model, max_batch_size=1, max_delay_s=0.0, max_queue=2)
        deadline = time.monotonic() + 10
        running = asyncio.create_task(queue.submit(model.prepare({"x": x(1.0)}), deadline))
        while not model.started.is_set():
            await asyncio.sleep(0.005)
        waiting = [asyncio.create_task(queue.submit(model.prepare({"x": x(2.0)}), deadline)) for _ in range(2)]
        await asyncio.sleep(0)
        t = time.monotonic()
        with pytest.raises(Unavailable, match="queue is full") as e:
            await queue.submit(model.prepare({"x": x(3.0)}), deadline)
        assert time.monotonic() - t < 0.1
        assert e.value.reason == "queue_full" and e.value.status == 503
        await asyncio.gather(running, *waiting)
        await stop(task, ex)

    asyncio.run(main())


def test_deadline_gives_504_and_an_expired_request_never_runs() -> None:
    async def main() -> None:
        model = Doubler(delay_s=0.4)
        queue, task, ex = await with_queue(model, max_batch_size=1, max_delay_s=0.0)
        now = time.monotonic()
        slow = asyncio.create_task(queue.submit(model.prepare({"x": x(1.0)}), now + 10))
        while not model.started.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(DeadlineExceeded):
            await queue.submit(model.prepare({"x": x(2.0)}), now + 0.1)  # waits behind the 0.4 s forward
        await slow
        await asyncio.sleep(0.05)
        await stop(task, ex)
        assert model.batches == [1]  # the expired request was dropped, not run

    asyncio.run(main())


def test_a_failing_request_fails_alone() -> None:
    async def main() -> None:
        model = Doubler(fail_on=13.0)
        queue, task, ex = await with_queue(model, max_delay_s=0.2)
        deadline = time.monotonic() + 10
        results = await asyncio.gather(
            *(queue.submit(model.prepare({"x": x(v)}), deadline) for v in (1.0, 13.0, 2.0)), return_exceptions=True
        )
        await stop(task, ex)
        assert results[0]["y"].tolist() == [2.0]  # type: ignore[index]
        assert results[2]["y"].tolist() == [4.0]  # type: ignore[index]
        assert isinstance(results[1], ServerError) and not isinstance(results[1], BadRequest)
        assert "forward pass failed: ValueError: cannot take 13.0" in str(results[1])

    asyncio.run(main())


def test_workers_run_batches_at_once() -> None:
    """With two workers, two slow batches overlap: both finish in about one forward's time, not two."""

    async def main() -> None:
        model = Doubler(delay_s=0.5)
        executor = ThreadPoolExecutor(2)
        queue = BatchQueue(
            model_name="double", executor=executor, workers=2, max_batch_size=1, max_delay_s=0.0, max_queue=8
        )
        task = asyncio.create_task(queue.run_forever())
        started = time.monotonic()
        deadline = started + 10
        results = await asyncio.gather(*(queue.submit(model.prepare({"x": x(v)}), deadline) for v in (1.0, 2.0)))
        elapsed = time.monotonic() - started
        await stop(task, executor)
        assert [r["y"].tolist() for r in results] == [[2.0], [4.0]]
        assert model.batches == [1, 1]
        assert elapsed < 0.95, elapsed  # one worker would need 1.0 s

    asyncio.run(main())


def test_waiting_rows_are_shared_among_idle_workers() -> None:
    from warmpod.server.batcher import share

    assert share(8, 32, 1) == 32  # one worker: take all (up to the maximum)
    assert share(8, 32, 2) == 4  # two idle workers: half each
    assert share(7, 32, 2) == 4
    assert share(1, 32, 2) == 1
    assert share(100, 32, 2) == 32
