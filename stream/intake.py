"""Record batches of ``shop-events`` straight from Faust's consumer, past its per-message path.

Faust stays the application: its consumer is the one group member, fetches every assigned
partition, seeks after rebalances and recovers the state table. What it no longer does for
shop events is build a ``Message`` and an ``Event`` per record, track an ack per offset and
queue each one to an agent (measured: ~10k messages/s at most here, against ~750k/s for the
same records through aiokafka). Instead, each fetched list of records of a bypassed topic is
handed to :class:`RecordIntake` as it is, and the batch pipeline commits those offsets itself.

Records are taken only where Faust would deliver them itself: while its flow is active
(not during a rebalance or recovery, after which it seeks back to the committed offsets and
fetches the same records again) and from active (not paused) partitions.

Backpressure: after each fetch Faust's fetch loop waits until the intake has room, so
a slow pipeline holds the fetcher back instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Iterable

from faust.transport.utils import DefaultSchedulingStrategy


class RecordIntake:
    """A bounded FIFO of (tp, records) chunks; ``take`` returns up to ``max_records`` at once.

    ``waited`` is how long the oldest records of the last take had been here (fetched, not yet
    in a batch): the queue in front of the recommend thread, one clock reading per fetched chunk."""

    def __init__(self, topics: Iterable[str], max_buffered: int):
        self.topics = frozenset(topics)
        self.max_buffered = max_buffered
        self._chunks: deque[tuple[object, list, float]] = deque()   # (tp, records, arrived: monotonic)
        self.waited = 0.0
        self._buffered = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def buffered(self) -> int:
        return self._buffered

    def offer(self, tp, records: list) -> None:
        if not records:
            return
        self._chunks.append((tp, records, time.monotonic()))
        self._buffered += len(records)
        self._arrived.set()
        if self._buffered >= self.max_buffered:
            self._room.clear()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def take(self, max_records: int, within: float,
                   ready: asyncio.Event | None = None) -> list[tuple[object, list]]:
        """Wait for records, then up to ``within`` seconds more to fill ``max_records``, unless
        ``ready`` is (or becomes) set: the consumer of batches is idle, so waiting would only add
        latency (natural batching: under load the consumer is busy and batches fill by themselves)."""
        while not self._chunks:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + within
        ready = ready or asyncio.Event()   # none given: never ready, wait the whole ``within``
        while self._buffered < max_records and not ready.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            waits = [asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(ready.wait())]
            done, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            if not done:
                break
        out, taken = [], 0
        # chunks arrive in order (a split's rest keeps its place and time): the first is the oldest
        oldest = self._chunks[0][2] if self._chunks else time.monotonic()
        while self._chunks and taken < max_records:
            tp, records, arrived = self._chunks.popleft()
            room = max_records - taken
            if len(records) > room:  # split: the rest stays first in line
                self._chunks.appendleft((tp, records[room:], arrived))
                records = records[:room]
            out.append((tp, records))
            taken += len(records)
        self.waited = time.monotonic() - oldest
        self._buffered -= taken
        if self._buffered < self.max_buffered:
            self._room.set()
        return out

    def clear(self) -> None:
        """Drop everything buffered (a rebalance: the consumer seeks back to committed offsets)."""
        self._chunks.clear()
        self._buffered = 0
        self._room.set()


def install(app, intake: RecordIntake) -> None:
    """Make ``app``'s consumer hand ``intake.topics`` records to ``intake`` (before the app starts)."""
    transport = app.transport
    base = transport.Consumer

    class IntakeScheduler(DefaultSchedulingStrategy):
        def __init__(self, consumer):
            self.consumer = consumer

        def iterate(self, records):
            consumer = self.consumer
            if consumer.flow_active:   # else Faust drops every record and seeks back
                active = consumer._get_active_partitions()
                for tp in [tp for tp in records if tp.topic in intake.topics]:
                    batch = records.pop(tp)
                    if tp in active:
                        intake.offer(tp, batch)
            return super().iterate(records)

    class IntakeConsumer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scheduler = IntakeScheduler(self)

        async def getmany(self, timeout: float):
            async for item in super().getmany(timeout):
                yield item
            await intake.wait_for_room()

    transport.Consumer = IntakeConsumer
