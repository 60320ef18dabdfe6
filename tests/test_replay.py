"""Log readers (every format, bad lines reported, stable ids) and paced replays through both brokers."""

from __future__ import annotations

import asyncio
import csv
import json

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.compat import ensure_topics, log_end_offsets
from stream.events import decode_event, encode_event, encode_recommendations
from stream.logs import (SEQUENCE_EVENT_TYPE, SEQUENCE_STEP_S, LogFormatError, Rejected, ReplayRecord, iter_log,
                         load_events)
from stream.replay import replay


def split(path, **kw):
    out = list(iter_log(path, **kw))
    return ([r for r in out if isinstance(r, ReplayRecord)], [r for r in out if isinstance(r, Rejected)])


GOOD = [
    {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "view", "ts": 100.0},
    {"user_id": "u1", "item_id": "i2", "type": "purchase", "ts": 101.5},
    {"user_id": 7, "item_id": 8, "type": "click", "ts": 102},
]


# ----------------------------------------------------------------------------- readers

def test_jsonl_reader_reports_bad_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps(e) for e in GOOD] + [
        "{not json",
        json.dumps({"user_id": "u", "item_id": "i", "type": "teleport", "ts": 1}),
        json.dumps({"user_id": "u", "item_id": "i", "type": "view"}),
        json.dumps({"user_id": "u", "item_id": "i", "type": "view", "ts": "yesterday"}),
        json.dumps({"item_id": "i", "type": "view", "ts": 1}),
        json.dumps([1, 2, 3]),
        json.dumps({"user_id": "u", "item_id": "i", "type": ["view"], "ts": 1}),
        json.dumps({"user_id": "u", "item_id": {"a": 1}, "type": "view", "ts": 1}),
        json.dumps({"user_id": "u", "item_id": "i", "type": "view", "ts": 1, "event_id": 1.5}),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    records, rejected = split(path)
    assert [r.event.item_id for r in records] == ["i1", "i2", "8"]
    assert records[0].event.event_id == "e1"
    assert records[2].event.user_id == "7" and records[2].event.ts == 102.0
    assert [r.reason for r in rejected] == ["not JSON", "unknown type", "missing ts", "bad ts",
                                            "missing user_id", "not a map", "unknown type", "bad item_id",
                                            "bad event_id"]
    assert rejected[0].where == "log.jsonl:4"
    for r in records:  # what the readers accept, the wire contract accepts
        assert decode_event(encode_event(r.event)) == r.event


def test_csv_reader(tmp_path):
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "type", "ts", "extra"])
        w.writerow(["u1", "i1", "view", "10", "x"])
        w.writerow(["u1", "i2", "add_to_cart", "2024-01-01T00:00:00Z", "x"])
        w.writerow(["u2", "i3", "view"])                      # too few columns
        w.writerow(["u2", "i3", "view", "-5", "x"])           # negative ts
        w.writerow(["", "i3", "view", "5", "x"])              # empty user
    records, rejected = split(path)
    assert [(r.event.user_id, r.event.item_id) for r in records] == [("u1", "i1"), ("u1", "i2")]
    assert records[1].event.ts == 1704067200.0
    assert [r.reason for r in rejected] == ["wrong column count", "bad ts", "missing user_id"]

    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,when\nu,i,1\n")
    with pytest.raises(LogFormatError, match="type, ts"):
        list(iter_log(bad))


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = GOOD + [{"user_id": "u", "item_id": "i", "type": "nope", "ts": 1.0}]
    table = pa.table({k: [str(r.get(k)) if k != "ts" else float(r["ts"]) for r in rows]
                      for k in ("user_id", "item_id", "type", "ts")})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    records, rejected = split(path)
    assert len(records) == 3 and [r.reason for r in rejected] == ["unknown type"]
    assert rejected[0].where == "log.parquet:4"


def test_msgpack_reader_reports_truncation(tmp_path):
    path = tmp_path / "log.msgpack"
    data = b"".join(msgpack.packb({"v": 1, **e}) for e in GOOD) + msgpack.packb("just a string")
    data += msgpack.packb({"user_id": "u", "item_id": "i", "type": "view", "ts": 5.0})[:-3]
    path.write_bytes(data)
    records, rejected = split(path)
    assert len(records) == 3
    assert [r.reason for r in rejected] == ["not a map", "truncated msgpack"]


def test_sequence_reader_spreads_time_in_order(tmp_path):
    path = tmp_path / "Shop.txt"
    path.write_text("1 10 11 12\n2 11 13\n3\n\n4 10\n")
    records, rejected = split(path)
    assert [r.reason for r in rejected] == ["no items"] and rejected[0].where == "Shop.txt:3"
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r.event.user_id, []).append(r.event)
    assert [e.item_id for e in by_user["1"]] == ["10", "11", "12"]
    ts = [e.ts for e in by_user["1"]]
    assert all(b - a == SEQUENCE_STEP_S for a, b in zip(ts, ts[1:]))
    assert {r.event.type for r in records} == {SEQUENCE_EVENT_TYPE}
    assert all(decode_event(encode_event(r.event)) == r.event for r in records)
    # replayed in ts order: users interleave, each user's own order is kept
    events, *_ = load_events(path)
    assert [e.item_id for e in events if e.user_id == "1"] == ["10", "11", "12"]
    assert [e.user_id for e in events[:3]] != ["1", "1", "1"]


def test_ids_are_stable_and_distinct(tmp_path):
    path = tmp_path / "Shop.txt"
    path.write_text("1 10 11 10\n2 11 13\n")
    first = [r.event.event_id for r in iter_log(path)]
    second = [r.event.event_id for r in iter_log(path)]
    assert first == second and len(set(first)) == len(first)
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in GOOD))
    assert [r.event.event_id for r in iter_log(jsonl)] == [r.event.event_id for r in iter_log(jsonl)]


def test_time_filter_and_summary(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in GOOD) + "\n{oops\n")
    events, rejected, examples, skipped = load_events(path, from_ts=101.0, to_ts=102.0)
    assert [e.item_id for e in events] == ["i2"] and skipped == 2
    assert rejected == {"not JSON": 1} and examples[0].where == "log.jsonl:4"


# ----------------------------------------------------------------------------- replay

def write_stream(path, n_users: int, per_user: int, step: float = 1.0):
    """Round-robin events: user u's k-th event is item k, at ts k*step + u/1000."""
    rows = [{"user_id": f"u{u}", "item_id": str(k), "type": "view", "ts": k * step + u / 1000}
            for k in range(per_user) for u in range(n_users)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


async def read_topic(bootstrap: str, topic: str) -> list:
    ends = await log_end_offsets(bootstrap, [TopicPartition(topic, p) for p in range(3)])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out = []
    try:
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        while len(out) < sum(ends.values()):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += records
    finally:
        await consumer.stop()
    return out


@pytest.mark.integration
async def test_rate_replay_keeps_rate_and_per_user_order(broker, tmp_path):
    path = tmp_path / "log.jsonl"
    write_stream(path, n_users=20, per_user=30)  # 600 events
    summary = await replay(path, broker.bootstrap, "rate-events", rate=300, progress=False, partitions=3)
    assert summary.sent == 600 and not summary.rejected
    expected_s = 599 / 300
    assert expected_s * 0.8 <= summary.duration_s <= expected_s * 1.2, summary
    records = await read_topic(broker.bootstrap, "rate-events")
    assert len(records) == 600
    by_user: dict[str, list[int]] = {}
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = decode_event(rec.value)
        assert rec.key == event.user_id.encode()
        by_user.setdefault(event.user_id, []).append(int(event.item_id))
    assert all(items == list(range(30)) for items in by_user.values()) and len(by_user) == 20


@pytest.mark.integration
async def test_max_replay_keeps_per_user_order_and_default_partitioning(broker, tmp_path):
    from aiokafka.partitioner import DefaultPartitioner

    path = tmp_path / "log.jsonl"
    write_stream(path, n_users=50, per_user=100)  # 5000 events
    summary = await replay(path, broker.bootstrap, "max-events", max_speed=True, progress=False, partitions=3)
    assert summary.sent == 5000
    records = await read_topic(broker.bootstrap, "max-events")
    by_user: dict[str, list[int]] = {}
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert rec.partition == DefaultPartitioner()(rec.key, [0, 1, 2], [0, 1, 2])
        event = decode_event(rec.value)
        by_user.setdefault(event.user_id, []).append(int(event.item_id))
    assert len(by_user) == 50 and all(items == list(range(100)) for items in by_user.values())


@pytest.mark.integration
async def test_the_load_generator_keeps_its_pace_its_order_and_the_default_partitioning(broker):
    """``harness.produce`` (bench e2e's load generator) sends each tick's records as batches:
    every record once, at the rate asked, keyed ones in order on the partition Kafka's default
    partitioner picks, unkeyed ones spread over the partitions."""
    import time

    from aiokafka.partitioner import DefaultPartitioner

    from streamrec import harness

    await ensure_topics(broker.bootstrap, {"paced-events": 3})
    keyed = [(f"user-{n % 40}".encode(), b"%d" % (n // 40)) for n in range(1200)]
    unkeyed = [(None, b"x")] * 30
    started = time.monotonic()
    assert await harness.produce(broker.bootstrap, "paced-events", keyed + unkeyed, rate=1000.0) == 1230
    # paced, not sent at once; the upper bound leaves room for the producer's start and stop
    assert 1229 / 1000 * 0.8 <= time.monotonic() - started <= 1229 / 1000 * 2.0
    records = await read_topic(broker.bootstrap, "paced-events")
    assert len(records) == 1230
    by_user: dict[bytes, list[int]] = {}
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        if rec.key is None:
            continue
        assert rec.partition == DefaultPartitioner()(rec.key, [0, 1, 2], [0, 1, 2])
        by_user.setdefault(rec.key, []).append(int(rec.value))
    assert len(by_user) == 40 and all(seq == list(range(30)) for seq in by_user.values())
    assert {rec.partition for rec in records if rec.key is None} == {0, 1, 2}


@pytest.mark.integration
async def test_speed_replay_scales_inter_arrival_times(broker, tmp_path):
    path = tmp_path / "log.jsonl"
    write_stream(path, n_users=2, per_user=16, step=1.0)   # spans 15 s of log time
    summary = await replay(path, broker.bootstrap, "speed-events", speed=10.0, progress=False, partitions=3)
    assert summary.sent == 32
    assert 1.5 * 0.8 <= summary.duration_s <= 1.5 * 1.25, summary


@pytest.mark.integration
async def test_prequential_evaluation_scores_lists(broker, tmp_path):
    """A fake worker answers each event with the user's next item first: a perfect model."""
    await ensure_topics(broker.bootstrap, {"eval-events": 3, "eval-recs": 3})
    path = tmp_path / "log.jsonl"
    write_stream(path, n_users=8, per_user=6, step=1.0)

    async def perfect_worker():
        consumer = AIOKafkaConsumer("eval-events", bootstrap_servers=broker.bootstrap, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=20)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=1)
        await consumer.start()
        await producer.start()
        try:
            async for rec in consumer:
                e = decode_event(rec.value)
                items = [{"item_id": str(int(e.item_id) + 1), "score": 1.0}, {"item_id": "x", "score": 0.5}]
                await producer.send("eval-recs", encode_recommendations(e.user_id, items, "test", e.event_id, e.ts),
                                    key=rec.key)
        finally:
            await producer.stop()
            await consumer.stop()

    worker = asyncio.create_task(perfect_worker())
    await asyncio.sleep(1.0)  # let the fake worker join
    try:
        summary = await replay(path, broker.bootstrap, "eval-events", rate=20, evaluate=True,
                               progress=False, recommendations_topic="eval-recs")
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    ev = summary.evaluation
    assert ev.events == 48 and ev.lists_received > 0
    assert ev.with_list >= 35  # a user's first event has no list; later ones do: 0.4 s between them
    assert ev.hr >= 0.9 and ev.ndcg >= 0.9
    assert "HR@10" in str(summary)
    doc = json.loads(json.dumps(summary.as_dict()))
    assert doc["sent"] == 48 and doc["evaluation"]["with_list"] == ev.with_list and "hr@10" in doc["evaluation"]


def test_replay_rejects_two_paces(tmp_path):
    with pytest.raises(ValueError, match="one pace"):
        asyncio.run(replay(tmp_path / "x.jsonl", "127.0.0.1:1", rate=10, speed=2))
