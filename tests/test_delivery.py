"""Delivery's producers as the brokers' behaviour calls for them (stream/delivery.py), and its
record batches on both brokers; the guarantees themselves are tested through a worker process
in test_guarantees.py."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from stream import compat, delivery
from streamrec.harness import read_topic


def test_transactional_producers_ask_again_soon_after_a_concurrent_transaction(monkeypatch):
    """One transactional producer per assigned partition; each retries a CONCURRENT_TRANSACTIONS
    answer (the last transaction's markers not yet written) after TXN_RETRY_BACKOFF_MS, not
    aiokafka's 100 ms: at 500 events/s that wait was most of the exactly-once p99 (bench e2e)."""
    made = []

    class Producer:
        def __init__(self, **settings):
            made.append(settings)

        async def start(self):
            pass

    monkeypatch.setattr(delivery, "AIOKafkaProducer", Producer)
    eos = delivery.ExactlyOnce("127.0.0.1:9092", "shop", "shop-events", commit_interval_s=0.1)
    asyncio.run(eos.on_assigned([TopicPartition("shop-events", 0), TopicPartition("shop-events", 1),
                                 TopicPartition("other", 0)]))
    assert sorted(s["transactional_id"] for s in made) == ["shop-shop-events-0", "shop-shop-events-1"]
    default = AIOKafkaProducer.__init__.__kwdefaults__["retry_backoff_ms"]
    assert {s["retry_backoff_ms"] for s in made} == {delivery.TXN_RETRY_BACKOFF_MS} and \
        delivery.TXN_RETRY_BACKOFF_MS < default


def test_murmur2_of_many_keys_is_kafkas_murmur2_of_each():
    """The batch partitioner's hash, over keys of every length 0-40 (each length a separate
    vector pass, its tail bytes handled apart; a few keys of a length one at a time), equals
    aiokafka's (the Java client's) murmur2."""
    rng = random.Random(0)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(41))) for _ in range(3000)]
    keys += [b"", b"u", b"user-1", "usér-ü".encode()]
    assert delivery.murmur2_many(keys).tolist() == [murmur2(key) for key in keys]
    few = keys[:delivery.MURMUR2_VECTOR_MIN_KEYS - 1] + [b"user-2"] * delivery.MURMUR2_VECTOR_MIN_KEYS
    assert delivery.murmur2_many(few).tolist() == [murmur2(key) for key in few]


async def read_back(bootstrap: str, topic: str) -> dict[int, list]:
    """Every record of ``topic`` by partition, in offset order."""
    out: dict[int, list] = {}
    for record in await read_topic(bootstrap, topic):
        out.setdefault(record.partition, []).append(record)
    return out


@pytest.mark.integration
async def test_records_go_in_batches_where_a_send_would_put_them_in_order(broker):
    """``send_batches`` (one record batch per topic partition, stage 2's way of producing): keyed
    records land in the partition aiokafka's ``send`` chooses for the key, each partition keeps
    the order given, a full batch continues in another, and a batch's ``last_offset`` is its
    last record's offset (what the state store persists as its changelog position)."""
    keyed, fixed, by_send = "dlv-keyed", "dlv-fixed", "dlv-by-send"
    await compat.ensure_topics(broker.bootstrap, {keyed: 3, fixed: 2, by_send: 3})
    idempotent = (await compat.broker_profile(broker.bootstrap)).kind == compat.KAFKA

    async def commit(offsets):
        return True

    keys = [f"user-{i}".encode() for i in range(60)]
    records = [(keyed, key, f"{key.decode()}/{n}".encode(), 0, None) for n in range(3) for key in keys]
    records.append((keyed, keys[0], None, 0, None))   # a tombstone, after the key's three records
    big = b"x" * 300_000                               # four of them overflow a 1 MiB batch
    records += [(fixed, b"k", big + bytes([n]), 0, n % 2) for n in range(10)]
    at_least_once = delivery.AtLeastOnce(broker.bootstrap, commit, idempotent=idempotent, commit_interval_s=1.0)
    await at_least_once.start()
    try:
        sent = await at_least_once.send_batches(records)
        await at_least_once.batch_sent([s.future for s in sent])
    finally:
        await at_least_once.stop()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        chosen = {key: (await (await producer.send(by_send, b"", key=key))).partition for key in keys}
    finally:
        await producer.stop()

    got = await read_back(broker.bootstrap, keyed)
    for p, rows in got.items():
        assert all(chosen[r.key] == p for r in rows)
        for key in {r.key for r in rows}:
            values = [r.value for r in rows if r.key == key]
            expected = [f"{key.decode()}/{n}".encode() for n in range(3)] + ([None] if key == keys[0] else [])
            assert values == expected
    assert sum(map(len, got.values())) == len(keys) * 3 + 1
    got = await read_back(broker.bootstrap, fixed)
    assert {p: [r.value[-1] for r in rows] for p, rows in got.items()} == {0: [0, 2, 4, 6, 8], 1: [1, 3, 5, 7, 9]}
    batches = [s for s in sent if s.topic == fixed]
    assert len(batches) == 4 and sum(s.records for s in batches) == 10   # 3 + 2 records in each partition
    for p in (0, 1):
        assert max(s.last_offset() for s in batches if s.partition == p) == got[p][-1].offset
        assert [s.records for s in batches if s.partition == p] == [3, 2]
