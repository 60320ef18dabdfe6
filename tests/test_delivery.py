"""Delivery's producers as the brokers' behaviour calls for them (stream/delivery.py); the
guarantees themselves are tested through a worker process in test_guarantees.py."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, TopicPartition

from stream import delivery


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
