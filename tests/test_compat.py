"""stream/compat.py against the real embedded broker: true log ends, also inside Faust."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream import compat

pytestmark = pytest.mark.integration

RECORDS = 300


async def produce_in_batches(bootstrap: str, topic: str, partitions: int) -> None:
    await compat.ensure_topics(bootstrap, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        for chunk in range(3):  # several multi-record batches per partition
            futures = [await producer.send(topic, b"x", partition=n % partitions) for n in range(RECORDS // 3)]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_high_watermarks_count_every_record(broker):
    await produce_in_batches(broker.bootstrap, "compat-hw", 2)
    tps = [TopicPartition("compat-hw", p) for p in (0, 1)]
    ends = await compat.high_watermarks(broker.bootstrap, tps)
    assert ends == {tps[0]: RECORDS // 2, tps[1]: RECORDS // 2}


async def test_high_watermark_of_an_empty_partition_is_zero(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-empty": 1})
    tp = TopicPartition("compat-empty", 0)
    assert await compat.high_watermarks(broker.bootstrap, [tp]) == {tp: 0}


async def test_ensure_topics_creates_the_partition_count_asked_for(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-three": 3})
    await compat.ensure_topics(broker.bootstrap, {"compat-three": 3})  # idempotent
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        assert consumer.partitions_for_topic("compat-three") == {0, 1, 2}
    finally:
        await consumer.stop()


async def test_faust_recovery_highwaters_are_patched_to_the_true_end(broker):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    await produce_in_batches(broker.bootstrap, "compat-faust", 1)
    compat.patch_faust_recovery()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()

    class Thread:  # the two attributes Faust's _highwaters reads
        def _ensure_consumer(self):
            return consumer

    try:
        ends = await AIOKafkaConsumerThread._highwaters(Thread(), [TP("compat-faust", 0)])
    finally:
        await consumer.stop()
    assert ends == {TopicPartition("compat-faust", 0): RECORDS}


async def test_committed_offsets_none_without_commit_then_exact(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-commit": 1})
    tp = TopicPartition("compat-commit", 0)
    assert await compat.committed_offsets(broker.bootstrap, "compat-group", [tp]) == {tp: None}
    await produce_in_batches(broker.bootstrap, "compat-commit", 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="compat-group",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 123})
    finally:
        await consumer.stop()
    assert await compat.committed_offsets(broker.bootstrap, "compat-group", [tp]) == {tp: 123}


async def test_faust_resumes_stream_partitions_only_after_the_seek_and_queue_clearing():
    """Faust's own order (resume, seek, clear queues) loses the records fetched in between."""
    from unittest.mock import AsyncMock, MagicMock

    from faust.tables.recovery import Recovery

    compat.patch_faust_resume_after_seek()
    order: list[str] = []
    stream_tp, changelog_tp = ("events", 0), ("changelog", 0)

    class Consumer:  # what on_recovery_completed calls on Faust's consumer
        def assignment(self):
            return {stream_tp, changelog_tp}

        async def perform_seek(self):
            order.append("seek")

        def resume_partitions(self, tps):
            order.append(f"resume {sorted(tps)}")

        def resume_flow(self):
            pass

    app = MagicMock(consumer=Consumer(), consumer_generation_id=3)
    app.on_rebalance_complete.send = AsyncMock()
    app._fetcher.maybe_start = AsyncMock()
    app.flow_control.resume.side_effect = lambda: order.append("clear queues")
    recovery = MagicMock(app=app, _is_changelog_tp=lambda tp: tp == changelog_tp)
    recovery.tables.values.return_value = []

    async def wait(coro, timeout=None):
        await coro

    recovery._wait = wait
    await Recovery.on_recovery_completed(recovery, generation_id=3)
    assert order == ["seek", "clear queues", f"resume {[stream_tp]}"]
    assert "resume_partitions" not in vars(app.consumer)  # Faust's method is back
