"""Fair queuing between tenants: the batch queue as one FIFO per tenant, served in weighted fair order of rows.

THE ORDER (start-time fair queuing, a weighted fair queuing of rows). Every queued chunk gets a virtual start tag when
it arrives: the later of the queue's virtual time and the end of its tenant's previous chunk, where a chunk of `rows`
rows ends `rows / weight` after it starts. A batch takes chunks in order of start tag (ties: arrival order), so:
- tenants that all wait get rows in proportion to their weights (`--tenant-weight`, default 1), whatever their
  request sizes or how many requests each has queued;
- a tenant that was idle starts at the queue's virtual time — the tag of the latest chunk sent to a forward pass — so
  its first chunk goes in the next batch or the one after, however far a flooding tenant's backlog reaches: no credit
  saved up while idle, no debt either;
- within a tenant the order is first in, first out, and with one tenant the queue is exactly a FIFO.
Batches may still mix tenants, and never mix models (after a hot swap, chunks prepared by the old model run on it): a
tenant whose next chunk does not fit (too many rows, or another model) sits out the rest of this batch, so its own order
holds; the batch's first chunk is always taken, even one of more than max-rows rows.

ADMISSION (the bounded queue). The queue holds at most `max_queue` chunks. While it has room, anyone gets in, so a
tenant alone can fill it. When it is full, an arriving tenant is admitted if it holds fewer than its fair share —
`max_queue * its weight / the weights of the tenants waiting (itself included)` — and the newest chunk of the tenant
furthest over its share is dropped to make room (its request gets the 503); a tenant at or over its share is refused
(503). So a tenant that floods the queue gets the 503s, and one sending at a modest rate does not.

Everything here is plain data and arithmetic: no clock, no event loop (the batcher owns both).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from warmpod.server.model import Prepared
from warmpod.server.tenancy import ANONYMOUS

Outputs = dict[str, np.ndarray]


@dataclass(eq=False)  # identity: one request is one Pending, whatever its fields
class Pending:
    """A request (or one chunk of a large one) waiting for its share of a batch."""

    prepared: Prepared
    enqueued: float
    deadline: float
    future: asyncio.Future[Outputs] = field(repr=False)
    abandoned: bool = False  # the client gave up (deadline or disconnect): skip it if it has not started
    tenant: str = ANONYMOUS
    tag: float = 0.0  # virtual start in the fair order (set by FairQueue.push)
    order: int = 0  # arrival order (set by FairQueue.push): breaks ties between equal tags


@dataclass(frozen=True)
class Admission:
    """What `FairQueue.admit` decided for one arriving request."""

    admit: bool
    share: float  # the tenant's fair share of the queue now, in chunks
    evict: str | None = None  # admit after dropping this tenant's newest chunk


class FairQueue:
    """Per-tenant FIFOs of Pending chunks, taken in weighted fair order (see the module's docstring)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        for tenant, weight in self.weights.items():
            if not weight > 0:
                raise ValueError(f"tenant {tenant!r} has weight {weight}; weights must be positive")
        self.queues: dict[str, deque[Pending]] = {}  # only tenants with chunks queued
        self.vtime = 0.0  # the start tag of the latest chunk taken
        self.finish: dict[str, float] = {}  # where each tenant's last queued chunk ends, while that is after vtime
        self._arrivals = 0

    @classmethod
    def fifo(cls, queue: deque[Pending]) -> FairQueue:
        """A view of one tenant's FIFO (`queue` itself: taking from the view pops from it)."""
        fair = cls()
        if queue:
            fair.queues[queue[0].tenant] = queue
        return fair

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def __bool__(self) -> bool:
        return bool(self.queues)

    def __iter__(self) -> Iterator[Pending]:
        for q in list(self.queues.values()):
            yield from q

    def count(self, tenant: str) -> int:
        """Chunks `tenant` has queued."""
        q = self.queues.get(tenant)
        return len(q) if q is not None else 0

    def counts(self) -> dict[str, int]:
        return {tenant: len(q) for tenant, q in self.queues.items()}

    def oldest(self) -> float:
        """When the longest-waiting chunk was queued (each FIFO's head is its oldest); the queue must not be empty."""
        return min(q[0].enqueued for q in self.queues.values())

    def push(self, pending: Pending) -> None:
        """Queue a chunk at its tenant's tail, tagged with its virtual start."""
        tenant = pending.tenant
        pending.tag = max(self.vtime, self.finish.get(tenant, self.vtime))
        pending.order = self._arrivals
        self._arrivals += 1
        self.finish[tenant] = pending.tag + pending.prepared.rows / self.weight(tenant)
        self.queues.setdefault(tenant, deque()).append(pending)

    def fair_share(self, tenant: str, max_queue: int, arriving: str | None = None) -> float:
        """`tenant`'s share of a queue of `max_queue` chunks among the tenants waiting now, itself and `arriving`."""
        waiting = set(self.queues) | {tenant} | ({arriving} if arriving is not None else set())
        return max_queue * self.weight(tenant) / sum(self.weight(t) for t in waiting)

    def admit(self, tenant: str, max_queue: int) -> Admission:
        """May `tenant` queue one more chunk in a queue of at most `max_queue`? (See ADMISSION in the docstring.)"""
        share = self.fair_share(tenant, max_queue)
        if len(self) < max_queue:
            return Admission(admit=True, share=share)
        if self.count(tenant) + 1 > share:
            return Admission(admit=False, share=share)
        over = max((t for t in self.queues if t != tenant), key=lambda t: (self.count(t) / self.weight(t), t))
        return Admission(admit=True, share=share, evict=over)

    def evict_newest(self, tenant: str) -> Pending:
        """Remove and return `tenant`'s newest chunk (its tenant then ends where that chunk started)."""
        q = self.queues[tenant]
        pending = q.pop()
        self.finish[tenant] = pending.tag
        if not q:
            del self.queues[tenant]
        return pending

    def plan(self, max_rows: int) -> tuple[list[Pending], int]:
        """The batch `take` would form now, without taking it; and the rows of the first chunk left out because it did
        not fit (0 if none), so that a caller can tell a batch nothing more fits in from one still filling."""
        taken = dict.fromkeys(self.queues, 0)  # chunks planned from each tenant's head
        left_out: set[str] = set()  # tenants sitting out the rest of this batch
        batch: list[Pending] = []
        rows, overflow = 0, 0
        while rows < max_rows:
            heads = [q[taken[t]] for t, q in self.queues.items() if t not in left_out and taken[t] < len(q)]
            if not heads:
                break
            head = min(heads, key=lambda p: (p.tag, p.order))
            if batch and (head.prepared.model is not batch[0].prepared.model or rows + head.prepared.rows > max_rows):
                if not overflow and head.prepared.model is batch[0].prepared.model:
                    overflow = head.prepared.rows
                left_out.add(head.tenant)
                continue
            batch.append(head)
            rows += head.prepared.rows
            taken[head.tenant] += 1
        return batch, overflow

    def take(self, max_rows: int) -> list[Pending]:
        """Pop the next batch (see THE ORDER in the docstring); the queue must not be empty."""
        batch, _ = self.plan(max_rows)
        for pending in batch:
            q = self.queues[pending.tenant]
            q.popleft()
            if not q:
                del self.queues[pending.tenant]
            self.vtime = max(self.vtime, pending.tag)
        # A tenant whose chunks all end by the virtual time is no different from one never seen: forget it.
        self.finish = {t: end for t, end in self.finish.items() if end > self.vtime or t in self.queues}
        return batch
