"""Kafka-protocol differences of the embedded broker (Tansu), and a Faust defect: handled
here and nowhere else.

Measured against Apache Kafka semantics:

* ``ListOffsets(latest)`` answers the base offset of the newest record batch + 1, not the
  high watermark. aiokafka's ``end_offsets()`` is therefore short by up to a batch, and
  Faust's table recovery (which uses it) would stop before the changelog tail. The high
  watermark that a Fetch response carries *is* right, so :func:`high_watermarks` reads it
  from a one-shot fetch. On Apache Kafka both agree, so this is correct on either broker.
* Committed offsets are read with the admin client and explicit partitions
  (:func:`committed_offsets`).
* Group joins wait ``session_timeout / 2``: :data:`FAST_GROUP_SETTINGS` keeps a worker's
  start at a few seconds instead of ~33 s.
* No transactions: the worker runs at-least-once and its state updates are idempotent.
* Unknown topics are auto-created with 4 partitions: :func:`ensure_topics` creates every
  topic we use explicitly, with the partition count we want.
* A parked Fetch (long poll) is not answered when new records arrive: under steady traffic
  records wait up to about half of ``fetch_max_wait_ms`` (measured: p50 400 ms, p99 750 ms
  at Faust's hard-coded 1500 ms; p50 33 ms at 100 ms). :func:`patch_faust_fetch_wait`
  shortens the wait. On Kafka a short wait only costs a few more empty fetch round trips.

One Faust defect, on any broker, is handled here too because it is patched the same way:

* When table recovery completes, Faust 0.15 resumes the stream partitions *before* it seeks
  them to their committed offsets and clears its stream queues. Records fetched in between
  are queued, advance Faust's read offsets, and are then thrown away with the queues; their
  re-fetched copies fall below the read offsets and are dropped as already read, and the
  commit can skip past them. A worker that starts with a backlog (a restart after a crash, a
  replay) could silently lose hundreds of events this way (measured in the kill -9 test).
  :func:`patch_faust_resume_after_seek` resumes those partitions only once the seek and the
  queue clearing are done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

# Faust settings (seconds) that keep group joins short on Tansu and are fine on Kafka.
FAST_GROUP_SETTINGS = dict(broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
                           broker_rebalance_timeout=6.0)

HIGH_WATERMARK_TIMEOUT_S = 10.0
FETCH_MAX_WAIT_MS = 50


async def high_watermarks(bootstrap: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """True log-end offsets, taken from Fetch responses rather than ListOffsets."""
    tps = list(tps)
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                group_id=None, fetch_max_bytes=1024, max_partition_fetch_bytes=1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        # ListOffsets(latest) is a lower bound of the high watermark: fetching from there
        # is cheap (at most the last batch) and the response carries the true watermark.
        lower = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(lower[tp] - 1, 0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HIGH_WATERMARK_TIMEOUT_S
        while any(consumer.highwater(tp) is None for tp in tps):
            if loop.time() > deadline:
                missing = [tp for tp in tps if consumer.highwater(tp) is None]
                raise TimeoutError(f"no fetch response carried a high watermark for {missing}")
            await consumer.getmany(*tps, timeout_ms=200, max_records=1)
        return {tp: consumer.highwater(tp) for tp in tps}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str,
                            tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The group's committed offsets, asked for with explicit partitions (None: no commit)."""
    tps = list(tps)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        result = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    out: dict[TopicPartition, int | None] = {tp: None for tp in tps}
    for tp, meta in result.items():
        out[tp] = meta.offset if meta.offset is not None and meta.offset >= 0 else None
    return out


async def ensure_topics(bootstrap: str, topics: Mapping[str, int], configs: Mapping[str, dict] | None = None) -> None:
    """Create each topic with its partition count; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, partitions, 1, topic_configs=(configs or {}).get(name, {}))
               for name, partitions in topics.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", ", ".join(f"{t.name}({t.num_partitions})" for t in new))
    finally:
        await admin.close()


def patch_faust_recovery() -> None:
    """Make Faust's table recovery read changelogs to their true end (see module doc)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_streamrec_patched", False):
        return

    async def _highwaters(self, partitions):
        consumer = self._ensure_consumer()
        bootstrap = ",".join(f"{h}:{p}" for h, p in _bootstrap_of(consumer))
        return await high_watermarks(bootstrap, [TopicPartition(tp.topic, tp.partition) for tp in partitions])

    AIOKafkaConsumerThread._highwaters = _highwaters
    AIOKafkaConsumerThread._streamrec_patched = True


def _bootstrap_of(consumer: AIOKafkaConsumer) -> list[tuple[str, int]]:
    servers = consumer._client._bootstrap_servers
    if isinstance(servers, str):
        servers = servers.split(",")
    out = []
    for server in servers:
        host, _, port = server.rpartition(":")
        out.append((host, int(port)))
    return out


def patch_faust_fetch_wait(max_wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Faust builds its consumer with ``fetch_max_wait_ms=1500``; use ``max_wait_ms`` instead."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread, "_streamrec_original_create", None)
    if original is None:
        original = AIOKafkaConsumerThread._create_worker_consumer
        AIOKafkaConsumerThread._streamrec_original_create = original

    def _create_worker_consumer(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms  # read when the consumer starts its fetcher
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def patch_faust_resume_after_seek() -> None:
    """Resume stream partitions after recovery's seek and queue clearing (see module doc)."""
    from faust.tables.recovery import Recovery

    if getattr(Recovery, "_streamrec_resume_after_seek", False):
        return
    original = Recovery.on_recovery_completed

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        consumer = self.app.consumer
        held: set = set()
        consumer.resume_partitions = held.update  # instance attribute: shadows the method
        try:
            await original(self, generation_id)
        finally:  # the same end state as Faust's, also when a new rebalance interrupts it
            del consumer.resume_partitions
            if held:
                consumer.resume_partitions(held)

    Recovery.on_recovery_completed = on_recovery_completed
    Recovery._streamrec_resume_after_seek = True
