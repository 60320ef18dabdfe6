"""Lag snapshots against a known backlog on both brokers (and against Kafka's own tool), and
each Burrow rule on synthetic windows."""

from __future__ import annotations

import io
import json
import time

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.compat import ensure_topics
from stream.lag import (OK, REWIND, STALL, STOP, WARN, LagEvaluator, LagSnapshot, PartitionLag,
                        lag_snapshot, render_table, watch)

TOPIC = "lag-events"
BACKLOG = {0: 50, 1: 30, 2: 20}      # records per partition
COMMITS = {0: 10, 1: 30}             # partition 2: never committed
GROUP = "lag-test"
AGE_S = 3600.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backlog(broker):
    await ensure_topics(broker.bootstrap, {TOPIC: 3})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    old_ms = int((time.time() - AGE_S) * 1000)
    try:
        futures = [await producer.send(TOPIC, b"x", partition=p, timestamp_ms=old_ms + i)
                   for p, n in BACKLOG.items() for i in range(n)]
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(TOPIC, p) for p in BACKLOG])
        await consumer.commit({TopicPartition(TOPIC, p): off for p, off in COMMITS.items()})
    finally:
        await consumer.stop()
    return broker.bootstrap


@pytest.mark.integration
async def test_snapshot_reports_end_minus_committed(backlog):
    snap = await lag_snapshot(backlog, GROUP, [TOPIC])
    rows = {p.partition: p for p in snap.partitions}
    assert sorted(rows) == [0, 1, 2]
    for p, end in BACKLOG.items():
        committed = COMMITS.get(p, 0)  # no commit: counted from the log start
        assert (rows[p].committed, rows[p].end, rows[p].lag) == (committed, end, end - committed)
    assert rows[2].has_commit is False and rows[0].has_commit is True
    assert snap.total_lag == 40 + 0 + 20
    assert AGE_S - 60 < rows[0].lag_seconds < AGE_S + 60   # backlog written with old timestamps
    assert AGE_S - 60 < rows[2].lag_seconds < AGE_S + 60
    assert rows[1].lag_seconds == 0.0
    assert snap.members == 0


@pytest.mark.integration
async def test_lag_equals_what_kafkas_own_consumer_groups_tool_reports(backlog, broker):
    """`streamrec lag --json` against `kafka-consumer-groups --describe` at the same backlog."""
    if broker.kind != "kafka":
        pytest.skip("Kafka's tool reads log ends with ListOffsets, which Tansu answers short")
    import asyncio

    from stream.kafka import describe_consumer_group

    ours = {(r["topic"], r["partition"]): r
            for r in json.loads((await lag_snapshot(backlog, GROUP, [TOPIC])).to_json())["partitions"]}
    theirs = {(r["topic"], r["partition"]): r for r in await asyncio.to_thread(describe_consumer_group, backlog, GROUP)}
    # Kafka's tool leaves out partitions the group never committed; streamrec counts them from the log start
    assert set(ours) - set(theirs) == {(TOPIC, p) for p in BACKLOG if p not in COMMITS}
    assert theirs and set(theirs) <= set(ours)
    for key, k in theirs.items():
        assert (ours[key]["committed"], ours[key]["end"], ours[key]["lag"]) == (k["committed"], k["end"], k["lag"])


@pytest.mark.integration
async def test_json_shape(backlog):
    snap = await lag_snapshot(backlog, GROUP, [TOPIC])
    doc = json.loads(snap.to_json())
    assert list(doc) == ["group", "status", "total_lag", "partitions"]
    assert (doc["group"], doc["status"], doc["total_lag"]) == (GROUP, "OK", 60)
    types = {"topic": str, "partition": int, "committed": int, "end": int, "lag": int,
             "lag_seconds": float, "status": str}
    for row in doc["partitions"]:
        assert list(row) == list(types)
        assert all(isinstance(row[k], t) for k, t in types.items())


@pytest.mark.integration
async def test_default_topics(backlog):
    # the group committed on TOPIC only: that is the default
    snap = await lag_snapshot(backlog, GROUP)
    assert {p.topic for p in snap.partitions} == {TOPIC}
    # a group that never committed falls back to shop-events (absent here: nothing to report)
    snap = await lag_snapshot(backlog, "nobody")
    assert snap.partitions == [] and snap.total_lag == 0


@pytest.mark.integration
async def test_watch_stops_after_iterations(backlog):
    from rich.console import Console

    out = io.StringIO()
    last = await watch(backlog, GROUP, 0.05, topics=[TOPIC], window=2, iterations=2,
                       console=Console(file=out, width=120, force_terminal=False))
    assert last is not None and last.total_lag == 60
    assert GROUP in out.getvalue() and TOPIC in out.getvalue()
    # the backlog did not move between the two snapshots and nobody consumes: stopped
    assert last.status == STOP


# ----------------------------------------------------------------------------- evaluation rules

def run(evaluator: LagEvaluator, windows, members: int | None = 1) -> str:
    """Feed (committed, end) pairs of one partition, one snapshot per second; the last status."""
    snap = None
    for t, (committed, end) in enumerate(windows):
        row = PartitionLag("t", 0, committed, end, max(0, end - committed))
        snap = evaluator.update(LagSnapshot("g", [row], taken_at=1000.0 + t, members=members))
    return snap.partitions[0].status


def test_ok_when_lag_reaches_zero_in_window():
    assert run(LagEvaluator(4), [(0, 10), (10, 10), (10, 20), (10, 30)]) == OK


def test_ok_when_consumer_catches_up():
    assert run(LagEvaluator(4), [(0, 40), (20, 50), (45, 60), (60, 70)]) == OK


def test_warn_when_lag_grows_while_offsets_advance():
    assert run(LagEvaluator(4), [(0, 10), (5, 20), (10, 30), (15, 40)]) == WARN


def test_stall_when_offset_stuck_with_members():
    assert run(LagEvaluator(4), [(5, 10), (5, 12), (5, 12), (5, 15)], members=1) == STALL


def test_stop_when_nobody_commits():
    assert run(LagEvaluator(4), [(5, 10), (5, 12), (5, 12), (5, 15)], members=0) == STOP
    # offsets moved early in the window, then nothing for longer than they moved
    assert run(LagEvaluator(5), [(0, 50), (5, 50), (5, 50), (5, 50), (5, 50)], members=0) == STOP


def test_rewind_when_offset_goes_back():
    assert run(LagEvaluator(4), [(10, 30), (5, 30)]) == REWIND


def test_incomplete_window_is_ok():
    assert run(LagEvaluator(4), [(5, 10), (5, 12)], members=0) == OK


def test_group_status_is_worst_partition():
    ev = LagEvaluator(2)
    for t, (c0, c1) in enumerate([(0, 10), (5, 5)]):
        rows = [PartitionLag("t", 0, c0, 20, 20 - c0), PartitionLag("t", 1, c1, 20, 20 - c1)]
        snap = ev.update(LagSnapshot("g", rows, taken_at=float(t), members=1))
    assert [p.status for p in snap.partitions] == [OK, REWIND] and snap.status == REWIND


def test_render_table():
    from rich.console import Console

    snap = LagSnapshot("g", [PartitionLag("shop-events", 3, 5, 9, 4, 1.5, WARN)], status=WARN)
    out = io.StringIO()
    Console(file=out, width=120).print(render_table(snap))
    text = out.getvalue()
    assert "shop-events" in text and "WARN" in text and "total lag 4" in text
