"""stream/compat.py on both brokers: each difference it handles, shown to exist (or not) on
each broker, and each workaround giving the right answer on both."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

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


async def list_offsets_latest(bootstrap: str, tps) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def test_the_broker_is_recognised(broker):
    profile = await compat.broker_profile(broker.bootstrap)
    assert profile.kind == broker.kind


async def test_list_offsets_latest_falls_short_only_on_tansu(broker):
    await produce_in_batches(broker.bootstrap, "compat-hw", 2)
    tps = [TopicPartition("compat-hw", p) for p in (0, 1)]
    truth = {tp: RECORDS // 2 for tp in tps}
    assert await compat.high_watermarks(broker.bootstrap, tps) == truth   # a Fetch's watermark: right on both
    listed = await list_offsets_latest(broker.bootstrap, tps)
    if broker.kind == "tansu":
        assert all(listed[tp] < truth[tp] for tp in tps), listed   # the newest batch's base offset + 1
    else:
        assert listed == truth
    assert await compat.log_end_offsets(broker.bootstrap, tps) == truth


async def test_high_watermark_of_an_empty_partition_is_zero(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-empty": 1})
    tp = TopicPartition("compat-empty", 0)
    assert await compat.log_end_offsets(broker.bootstrap, [tp]) == {tp: 0}
    assert await compat.high_watermarks(broker.bootstrap, [tp]) == {tp: 0}


async def join_seconds(bootstrap: str, topic: str, group: str, session_timeout_ms: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=1000)
    started = time.monotonic()
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        return time.monotonic() - started
    finally:
        await consumer.stop()


async def test_group_join_waits_half_the_session_timeout_only_on_tansu(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-join": 1})
    seconds = await join_seconds(broker.bootstrap, "compat-join", "compat-join-group", 10_000)
    if broker.kind == "tansu":
        assert seconds >= 4.0, seconds          # ~ session_timeout / 2
    else:
        assert seconds < 2.5, seconds


async def fetch_delays_ms(bootstrap: str, topic: str, samples: int = 5) -> list[float]:
    """Record delivery delay to a consumer parked in a 1.5 s long poll (Faust's own setting)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=1500)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    tp = TopicPartition(topic, 0)
    delays = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        for n in range(samples):
            await consumer.getmany(tp, timeout_ms=50)   # park a fetch
            await asyncio.sleep(0.3 + 0.13 * n)
            sent = time.monotonic()
            await producer.send_and_wait(topic, b"x", partition=0)
            while not (await consumer.getmany(tp, timeout_ms=3000)).get(tp):
                pass
            delays.append((time.monotonic() - sent) * 1000)
    finally:
        await producer.stop()
        await consumer.stop()
    return delays


async def test_parked_fetch_is_answered_late_only_on_tansu(broker):
    await compat.ensure_topics(broker.bootstrap, {"compat-park": 1})
    median = statistics.median(await fetch_delays_ms(broker.bootstrap, "compat-park"))
    profile = await compat.broker_profile(broker.bootstrap)
    if broker.kind == "tansu":
        assert median > 150, median
        assert profile.fetch_max_wait_ms == compat.FETCH_MAX_WAIT_MS
    else:
        assert median < 100, median
        assert profile.fetch_max_wait_ms is None


async def test_unknown_topics_are_auto_created_only_on_tansu(broker):
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait("compat-typo", b"x"), 10)
    except Exception:
        pass
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        topics = await admin.list_topics()
        partitions = (len((await admin.describe_topics(["compat-typo"]))[0]["partitions"])
                      if "compat-typo" in topics else None)
    finally:
        await admin.close()
    assert partitions == (4 if broker.kind == "tansu" else None)


async def test_ensure_topics_creates_the_count_asked_for_and_rejects_a_mismatch(broker):
    counts = await compat.ensure_topics(broker.bootstrap, {"compat-three": 3})
    assert counts == {"compat-three": 3}
    assert await compat.ensure_topics(broker.bootstrap, {"compat-three": 3}) == counts  # idempotent
    assert await compat.topic_partitions(broker.bootstrap, ["compat-three", "compat-missing"]) == \
        {"compat-three": [0, 1, 2]}
    assert await compat.ensure_topics(broker.bootstrap, {"compat-three": 5}) == counts   # used as it is
    with pytest.raises(compat.TopicMismatch, match="compat-three has 3 partitions, 5 expected"):
        await compat.ensure_topics(broker.bootstrap, {"compat-three": 5}, exact=["compat-three"])


async def test_transactions_and_idempotent_producers_exist_only_on_kafka(broker):
    why = await compat.probe_transactions(broker.bootstrap)
    assert (why is None) == (broker.kind == "kafka"), why
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True)
    try:
        await asyncio.wait_for(producer.start(), 15)
        idempotent = True
    except Exception:
        idempotent = False
    finally:
        await producer.stop()
    assert idempotent == (broker.kind == "kafka")


async def test_recovery_end_is_after_the_last_committed_record_not_the_markers(broker):
    if broker.kind == "tansu":
        pytest.skip("the embedded broker has no transactions, so no markers")
    await compat.ensure_topics(broker.bootstrap, {"compat-txn": 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id="compat-txn")
    await producer.start()
    try:
        for _ in range(5):          # offsets 0-2 + marker 3, ..., 16-18 + marker 19
            async with producer.transaction():
                for _ in range(3):
                    await producer.send("compat-txn", b"kept", partition=0)
        await producer.begin_transaction()   # 20-21 + abort marker 22
        for _ in range(2):
            await producer.send("compat-txn", b"aborted", partition=0)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    tp = TopicPartition("compat-txn", 0)
    assert await compat.log_end_offsets(broker.bootstrap, [tp]) == {tp: 23}
    assert await compat.recovery_end_offsets(broker.bootstrap, [tp]) == {tp: 19}


async def test_faust_recovery_highwaters_are_patched_to_the_true_end(broker):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    await produce_in_batches(broker.bootstrap, "compat-faust", 1)
    compat.patch_faust_recovery(await compat.broker_profile(broker.bootstrap))
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()

    class Thread:  # the one attribute Faust's _highwaters reads
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
    """Faust's own order (resume, seek, clear queues) loses the records fetched in between;
    a broker-independent defect (the kill -9 test shows it on both brokers)."""
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
