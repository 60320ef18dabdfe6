"""Delivery guarantees of the batch pipeline: how its records are produced and offsets committed.

``at_least_once`` (the default, any broker): one producer with ``acks=all`` (idempotent where
the broker allows); a batch's lists, state changelog and dead letters are acknowledged before
its offsets are committed through the group, so a crash can repeat a list but never lose one.

``exactly_once`` (brokers with transactions: Apache Kafka): one transactional producer per
assigned ``shop-events`` partition (``transactional.id`` = group-topic-partition, so a new owner
fences a zombie and aborts what it left open). Lists, changelog records, dead letters and the
consumed offsets of a partition commit in one transaction, every ``commit_interval``; a
``read_committed`` consumer of ``recommendations`` sees each (user, event) list once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

log = logging.getLogger(__name__)

AT_LEAST_ONCE, EXACTLY_ONCE = "at_least_once", "exactly_once"
GUARANTEES = (AT_LEAST_ONCE, EXACTLY_ONCE)
LINGER_MS = 2
# A transactional producer's retries. Apache Kafka answers AddPartitionsToTxn with
# CONCURRENT_TRANSACTIONS while the previous transaction's markers are still being written (56
# times in 20 s at 500 events/s), and aiokafka then waits retry_backoff_ms (100 by default)
# unless no partition is in the transaction yet (then 20). bench e2e --guarantee exactly_once
# --rates max,500,2000,5000 on Kafka, p99 at 500/s: 33.8 and 35.4 ms at 10 against 199.3 and
# 266.1 at 100 (alternating runs), then 33.9 and 32.8 at 20.
TXN_RETRY_BACKOFF_MS = 20


# (topic, key, value, source: the shop-events partition it came from, partition: None for the
# producer's default partitioner on the key, as a send would choose)
Record = tuple[str, "bytes | None", "bytes | None", int, "int | None"]


class DeliveryFailed(RuntimeError):
    """Records could not be made durable (or a newer owner fenced this worker)."""


@dataclass(slots=True)
class SentBatch:
    """Records of one topic partition sent as one record batch; ``future`` gives the first's
    metadata once the broker has them."""

    topic: str
    partition: int
    records: int
    future: asyncio.Future

    def last_offset(self) -> int:
        """The offset of the batch's last record (the batch is acknowledged)."""
        return self.future.result().offset + self.records - 1


MURMUR2_SEED, MURMUR2_M = 0x9747B28C, np.uint32(0x5BD1E995)
# Keys of one length hashed together in numpy from this many on: numpy's passes cost ~14 µs
# whatever the count, aiokafka's murmur2 ~1.8 µs a key (scratch: 15.0 against 14.1 µs for 8
# keys, 21.4 against 110.1 for 64).
MURMUR2_VECTOR_MIN_KEYS = 8


def murmur2_many(keys: list[bytes]) -> np.ndarray:
    """Kafka's murmur2 of each key (uint32), as the Java client and aiokafka's default
    partitioner compute it one key at a time, over the keys of a length at once."""
    out = np.empty(len(keys), np.uint32)
    by_length: dict[int, list[int]] = {}
    for n, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(n)
    for length, which in by_length.items():
        if len(which) < MURMUR2_VECTOR_MIN_KEYS:
            for n in which:
                out[n] = murmur2(keys[n])
            continue
        data = np.frombuffer(b"".join([keys[n] for n in which]), np.uint8).reshape(len(which), length)
        h = np.full(len(which), MURMUR2_SEED ^ length, np.uint32)
        whole = length // 4
        words = np.ascontiguousarray(data[:, :whole * 4]).view("<u4")
        for w in range(whole):
            k = words[:, w] * MURMUR2_M
            k ^= k >> 24
            k *= MURMUR2_M
            h *= MURMUR2_M
            h ^= k
        tail = data[:, whole * 4:].astype(np.uint32)
        if length % 4 >= 3:
            h ^= tail[:, 2] << 16
        if length % 4 >= 2:
            h ^= tail[:, 1] << 8
        if length % 4 >= 1:
            h ^= tail[:, 0]
            h *= MURMUR2_M
        h ^= h >> 13
        h *= MURMUR2_M
        h ^= h >> 15
        out[which] = h
    return out


class _Batching:
    """Records sent as one record batch per topic partition, not one ``send`` each.

    A send costs the event loop ~11.5 µs of CPU per record (a coroutine, a metadata check, the
    partitioner's murmur2 in Python, the accumulator's bookkeeping, a future), a record batch
    per partition ~5 (``benchmarks/publish.py``, the sender's own work included). Keyed records
    go to the partition ``send`` would have chosen (the producer's default partitioner, Kafka's
    murmur2), in the order given within each partition. A pipeline batch's records are all
    there at once, so its record batches go closed: none waits ``linger_ms`` for more."""

    def _owner(self, source: int) -> int:
        """Which producer sends a record of ``source``: 0, the only one, unless transactional."""
        return 0

    async def _producer_for(self, owner: int) -> AIOKafkaProducer:
        raise NotImplementedError

    async def send_batches(self, records: list[Record]) -> list[SentBatch]:
        grouped: dict[tuple[int, str, int], list[tuple[bytes | None, bytes | None]]] = {}
        for (topic, key, value, source, _), partition in zip(records, await self._partitions(records)):
            where = (self._owner(source), topic, partition)
            group = grouped.get(where)
            if group is None:
                group = grouped[where] = []
            group.append((key, value))
        sent = []
        for (owner, topic, partition), rows in grouped.items():
            producer = await self._producer_for(owner)
            builder, count = producer.create_batch(), 0
            for key, value in rows:
                if builder.append(timestamp=None, key=key, value=value) is None:   # full: send it, start another
                    sent.append(SentBatch(topic, partition, count,
                                          await producer.send_batch(builder, topic, partition=partition)))
                    builder, count = producer.create_batch(), 0
                    builder.append(timestamp=None, key=key, value=value)   # a batch's first record always fits
                count += 1
            builder.close()   # complete: no linger, the sender takes it on its next turn
            sent.append(SentBatch(topic, partition, count,
                                  await producer.send_batch(builder, topic, partition=partition)))
        return sent

    async def _partitions(self, records: list[Record]) -> list[int]:
        """Each record's partition: its own, else murmur2 of its key over the topic's partitions
        (aiokafka's ``DefaultPartitioner``), or any one for a record without a key."""
        out = [partition for *_, partition in records]
        unset: dict[str, list[int]] = {}
        for n, (topic, *_, partition) in enumerate(records):
            if partition is None:
                unset.setdefault(topic, []).append(n)
        for topic, which in unset.items():
            producer = await self._producer_for(self._owner(records[which[0]][3]))
            known = sorted(await producer.partitions_for(topic))
            keyed = [n for n in which if records[n][1] is not None]
            if keyed:
                picks = (murmur2_many([records[n][1] for n in keyed]) & 0x7FFFFFFF) % len(known)
                for n, pick in zip(keyed, picks.tolist()):
                    out[n] = known[pick]
            for n in which:
                if out[n] is None:
                    out[n] = random.choice(known)
        return out


class _Committing:
    """Consumed offsets gathered per batch and committed at most every ``commit_interval_s``."""

    commit_interval_s: float
    _pending: dict
    _last_commit: float

    def _due(self, offsets: dict[TopicPartition, int], force: bool) -> dict[TopicPartition, int] | None:
        """Add ``offsets``; the offsets to commit now (and forget), or None if it is not time."""
        self._pending.update(offsets)
        if not self._pending or not (force or time.monotonic() - self._last_commit >= self.commit_interval_s):
            return None
        pending, self._pending = self._pending, {}
        self._last_commit = time.monotonic()
        return pending


class AtLeastOnce(_Committing, _Batching):
    """One producer; durability = every send acknowledged; offsets committed through the group."""

    guarantee = AT_LEAST_ONCE

    def __init__(self, bootstrap: str, commit_offsets, *, idempotent: bool, commit_interval_s: float):
        self.bootstrap = bootstrap
        self._commit_offsets = commit_offsets      # async (offsets: {TopicPartition: int}) -> bool
        self.commit_interval_s = commit_interval_s
        self.idempotent = idempotent
        self._producer: AIOKafkaProducer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=LINGER_MS,
                                          enable_idempotence=self.idempotent, max_batch_size=1 << 20)
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        pass

    async def on_revoked(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._pending.pop(tp, None)

    async def _producer_for(self, owner: int) -> AIOKafkaProducer:
        return self._producer

    async def batch_sent(self, futures: list[asyncio.Future]) -> None:
        """Wait until every record of a batch is acknowledged (the pipeline's batch is then durable)."""
        try:
            await asyncio.gather(*futures)
        except Exception as exc:
            raise DeliveryFailed(f"records not acknowledged: {exc!r}") from exc

    def batch_durable(self) -> bool:
        return True   # at-least-once: durable as soon as acknowledged

    async def complete(self, offsets: dict[TopicPartition, int], force: bool = False) -> bool:
        """Record consumed offsets; commit them when the interval is up (or ``force``)."""
        pending = self._due(offsets, force)
        return bool(pending) and await self._commit_offsets(pending)


class ExactlyOnce(_Committing, _Batching):
    """A transactional producer per input partition; durability = the transaction committed."""

    guarantee = EXACTLY_ONCE

    def __init__(self, bootstrap: str, group: str, topic: str, *, commit_interval_s: float):
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.commit_interval_s = commit_interval_s
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._open: set[int] = set()                    # partitions with a transaction in progress
        self._pending: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()

    def transactional_id(self, partition: int) -> str:
        return f"{self.group}-{self.topic}-{partition}"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        producers, self._producers = self._producers, {}
        await asyncio.gather(*(p.stop() for p in producers.values()), return_exceptions=True)

    async def on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Producers for exactly the assigned partitions: a new one fences the previous owner and
        ends what it left open, before this worker reads the committed offsets."""
        assigned = {tp.partition for tp in tps if tp.topic == self.topic}
        gone = [p for p in self._producers if p not in assigned]
        await asyncio.gather(*(self._producers.pop(p).stop() for p in gone), return_exceptions=True)
        producers = {p: AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id(p),
                                         acks="all", linger_ms=LINGER_MS, max_batch_size=1 << 20,
                                         retry_backoff_ms=TXN_RETRY_BACKOFF_MS)
                     for p in assigned if p not in self._producers}
        await asyncio.gather(*(p.start() for p in producers.values()))
        self._producers.update(producers)

    async def on_revoked(self, tps: Iterable[TopicPartition]) -> None:
        """The pipeline has committed before this; producers stay until the next assignment."""
        for tp in tps:
            self._pending.pop(tp, None)

    def _owner(self, source: int) -> int:
        return source

    async def _producer_for(self, source: int) -> AIOKafkaProducer:
        """The source partition's producer, in a transaction."""
        producer = self._producers.get(source)
        if producer is None:
            raise DeliveryFailed(f"no transactional producer for {self.topic}[{source}] (not assigned)")
        if source not in self._open:
            await producer.begin_transaction()
            self._open.add(source)
        return producer

    async def batch_sent(self, futures: list[asyncio.Future]) -> None:
        pass   # a transaction's records are waited for when it commits

    def batch_durable(self) -> bool:
        return False  # durable only once its transaction commits

    async def complete(self, offsets: dict[TopicPartition, int], force: bool = False) -> bool:
        """Commit each open transaction with its partition's consumed offsets (interval or ``force``)."""
        pending = self._due(offsets, force)
        if not pending:
            return False
        try:
            await asyncio.gather(*(self._commit_partition(tp, offset) for tp, offset in pending.items()))
        except Exception as exc:
            raise DeliveryFailed(f"transaction commit failed: {exc!r}") from exc
        return True

    async def _commit_partition(self, tp: TopicPartition, offset: int) -> None:
        producer = self._producers[tp.partition]
        if tp.partition not in self._open:  # offsets only (every record of the batch was bad or a duplicate)
            await producer.begin_transaction()
            self._open.add(tp.partition)
        await producer.send_offsets_to_transaction({tp: offset}, self.group)
        await producer.commit_transaction()
        self._open.discard(tp.partition)
