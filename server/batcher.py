"""Dynamic batching: requests arriving within max-batch-delay of the first one share one forward pass.

The delay is a fixed deadline set when the first request of a batch arrives — later arrivals never extend it. A
batch closes at that deadline or as soon as it holds max-batch-size rows, whichever comes first; the forward pass
runs on a worker thread so the event loop keeps accepting requests, and each request gets exactly its own rows back.
The queue is bounded: when it is full, `submit` refuses at once (503) instead of letting memory and latency grow.
It is shared fairly between tenants (warmpod.server.fairqueue): batches take rows in weighted fair order, and when it
is full the tenant holding more than its share gets the 503s; with one tenant it is a plain FIFO.
A request larger than a batch is cut into chunks that queue like other requests (see `submit`): no request can
monopolise the model, and one past its deadline (or whose client left) stops using it within one forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

from warmpod.server.errors import DeadlineExceeded, ServerError, Unavailable
from warmpod.server.fairqueue import FairQueue, Outputs, Pending
from warmpod.server.metrics import ServerMetrics
from warmpod.server.model import Prepared, ServedModel, merge_outputs
from warmpod.server.tenancy import ANONYMOUS

log = logging.getLogger(__name__)

__all__ = ["BatchQueue", "Outputs", "Pending", "rows_ready", "run_isolated", "share", "take_batch"]


def take_batch(queue: FairQueue | deque[Pending], max_rows: int) -> list[Pending]:
    """Pop the next batch: chunks in fair order between tenants (warmpod.server.fairqueue), FIFO within one.

    The first chunk is always taken (one larger than `max_rows` runs alone); later ones join while the rows fit and
    they were prepared by the same model (after a hot swap, requests prepared by the old model run on it). A plain
    deque is one tenant's queue.
    """
    return _fair(queue).take(max_rows)


def rows_ready(queue: FairQueue | deque[Pending], max_rows: int) -> int:
    """Rows the next batch would hold if it closed now, counting the first chunk that would not fit (so a batch that
    nothing more fits in reads as full, at least `max_rows`)."""
    if not queue:
        return 0
    batch, overflow = _fair(queue).plan(max_rows)
    return sum(p.prepared.rows for p in batch) + overflow


def _fair(queue: FairQueue | deque[Pending]) -> FairQueue:
    return queue if isinstance(queue, FairQueue) else FairQueue.fifo(queue)


def share(rows: int, max_rows: int, idle_workers: int) -> int:
    """Rows for the next batch: all that wait (up to max_rows), split evenly when several workers are idle, so
    eight waiting requests become two batches of four on two idle workers rather than one of eight beside an idle one.
    """
    if idle_workers <= 1:
        return max_rows
    return max(1, min(max_rows, -(-rows // idle_workers)))


def run_isolated(model: ServedModel, batch: Sequence[Prepared]) -> list[Outputs | Exception]:
    """Run a batch; if it fails, run its requests one by one so one bad request fails alone (worker thread).

    A batch stopped at its deadline is not retried: its requests' time is spent.
    """
    try:
        return list(model.run(batch))
    except DeadlineExceeded as e:
        return [e] * len(batch)
    except Exception as e:
        if len(batch) == 1:
            return [e]
    results: list[Outputs | Exception] = []
    for p in batch:
        try:
            results.append(model.run([p])[0])
        except Exception as e:
            results.append(e)
    return results


class BatchQueue:
    """The bounded queue in front of the model, and the task that turns it into batches."""

    def __init__(
        self,
        *,
        model_name: str,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        executor: Executor,
        workers: int = 1,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.executor = executor
        self.workers = workers
        self.metrics = metrics
        self.clock = clock
        self._queue = FairQueue(tenant_weights)
        self._running_items: set[Pending] = set()  # the requests in forward passes now
        self._arrived = asyncio.Event()
        self._idle_workers = workers  # forward passes that may start now
        self._worker_freed = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._queue)

    async def submit(self, prepared: Prepared, deadline: float, tenant: str = ANONYMOUS) -> Outputs:
        """Run one request of `tenant` and return its outputs.

        Tenants share the queue fairly (warmpod.server.fairqueue): rows in proportion to their weights, and when the
        queue is full the tenant holding more than its share gets the 503s. A request of more than max-batch-size
        rows runs as chunks of at most that many rows, queued a few at a time (one per worker) at its tenant's tail
        behind other requests' work: a large request never holds the model while small ones wait, and its deadline
        is checked between chunks. Unavailable when the queue is full (or its chunk is dropped for another tenant's);
        DeadlineExceeded at the deadline, and its remaining chunks never run; cancelled (the client went away),
        the same. A chunk that started runs to its end: one forward pass is the longest a request can overstay.
        """
        start = self.clock()
        if deadline <= start:
            raise DeadlineExceeded("the request deadline passed before the request was queued")
        self._admit(tenant)
        chunks = prepared.split(self.max_batch_size)
        queued: deque[Pending] = deque()  # this request's chunks in the queue or running, oldest first
        outputs: list[Outputs] = []
        try:
            while len(outputs) < len(chunks):
                while len(outputs) + len(queued) < len(chunks) and len(queued) < self.workers:
                    queued.append(self._enqueue(chunks[len(outputs) + len(queued)], deadline, tenant))
                remaining = max(0.0, deadline - self.clock())
                outputs.append(await asyncio.wait_for(asyncio.shield(queued[0].future), remaining))
                queued.popleft()
        except TimeoutError:
            done = f", {len(outputs)} of its {len(chunks)} chunks done" if len(chunks) > 1 else ""
            raise DeadlineExceeded(
                f"no result within the request deadline (waited {self.clock() - start:.3g} s in the queue and "
                f"forward{done})"
            ) from None
        finally:
            for pending in queued:  # deadline, cancellation or a failed chunk: what has not started never runs
                pending.abandoned = True
                if pending.future.done() and not pending.future.cancelled():
                    pending.future.exception()  # seen: one error (dropped, or past its deadline) answers the request
        return merge_outputs(outputs)

    def _admit(self, tenant: str) -> None:
        """Make room for one more chunk of `tenant`, or refuse it (503): see ADMISSION in warmpod.server.fairqueue."""
        queue, limit = self._queue, self.max_queue
        decision = queue.admit(tenant, limit)
        if not decision.admit:
            if set(queue.queues) <= {tenant}:
                message = f"the batch queue is full ({limit} requests waiting); retry later or on another replica"
            else:
                message = (
                    f"the batch queue is full ({len(queue)} requests waiting) and tenant {tenant!r} already holds "
                    f"{queue.count(tenant)} of them, its fair share while other tenants wait ({decision.share:.3g} of "
                    f"--max-queue {limit}, by --tenant-weight); retry later or on another replica"
                )
            raise Unavailable(message, reason="queue_full")
        if decision.evict is not None:
            over = decision.evict
            held, share = queue.count(over), queue.fair_share(over, limit, arriving=tenant)
            dropped = queue.evict_newest(over)
            dropped.abandoned = True
            if not dropped.future.done():
                dropped.future.set_exception(
                    Unavailable(
                        f"the batch queue is full: tenant {over!r}'s request was dropped to make room for another "
                        f"tenant's, as {over!r} held {held} of the {limit} places, more than its fair share "
                        f"({share:.3g}, by --tenant-weight); retry later or on another replica",
                        reason="queue_full",
                    )
                )

    def _enqueue(self, chunk: Prepared, deadline: float, tenant: str) -> Pending:
        pending = Pending(chunk, self.clock(), deadline, asyncio.get_running_loop().create_future(), tenant=tenant)
        self._queue.push(pending)
        self._gauge()
        self._arrived.set()
        return pending

    def busy_with(self, model: ServedModel) -> bool:
        """True while a request prepared by `model` is queued or running."""
        return any(p.prepared.model is model for p in (*self._queue, *self._running_items))

    def idle(self) -> bool:
        return not self._queue and not self._running_items

    async def run_forever(self) -> None:
        try:
            while True:
                while not self._idle_workers:  # a batch forms only when a worker can take it: meanwhile requests queue
                    self._worker_freed.clear()
                    await self._worker_freed.wait()
                while not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._fill(due=self._queue.oldest() + self.max_delay_s)
                batch = take_batch(self._queue, share(rows_ready(self._queue, self.max_batch_size),
                                                      self.max_batch_size, self._idle_workers))  # fmt: skip
                self._idle_workers -= 1
                self._gauge()
                task = asyncio.create_task(self._run_then_release(batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
        finally:
            for task in list(self._batches):
                task.cancel()

    async def _run_then_release(self, batch: list[Pending]) -> None:
        try:
            await self._run(batch)
        finally:
            self._idle_workers += 1
            self._worker_freed.set()

    async def _fill(self, due: float) -> None:
        """Wait until the batch is full or its fixed deadline passes."""
        while rows_ready(self._queue, self.max_batch_size) < self.max_batch_size:
            remaining = due - self.clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, batch: list[Pending]) -> None:
        start = self.clock()
        live = []
        for p in batch:
            if p.abandoned or p.future.done():
                continue
            if p.deadline <= start:
                p.future.set_exception(DeadlineExceeded("the request deadline passed while it waited in the queue"))
                continue
            live.append(p)
        if not live:
            return
        model = live[0].prepared.model
        assert model is not None, "a prepared request always names its model"
        if self.metrics is not None:
            for p in live:
                self.metrics.queue_wait_seconds.labels(self.model_name).observe(start - p.enqueued)
            self.metrics.batch_size.labels(self.model_name).observe(sum(p.prepared.rows for p in live))
        self._running_items.update(live)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, run_isolated, model, [p.prepared for p in live]
            )
        except Exception as e:  # the executor itself failed (shut down): every request of the batch gets it
            results = [e] * len(live)
        finally:
            for p in live:
                self._running_items.discard(p)
        if self.metrics is not None:
            self.metrics.batch_seconds.labels(self.model_name).observe(self.clock() - start)
            self.metrics.observe_batch(self.model_name, sum(p.prepared.rows for p in live), self.clock() - start)
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(_as_server_error(result))
            else:
                p.future.set_result(result)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.labels(self.model_name).set(len(self._queue))


def _as_server_error(e: Exception) -> ServerError:
    if isinstance(e, ServerError):
        return e
    log.error("forward pass failed", exc_info=e)
    return ServerError(f"the model's forward pass failed: {type(e).__name__}: {e}")
