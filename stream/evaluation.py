"""Prequential (test-then-train) evaluation of the live lists while a log is replayed.

``evaluate=True`` is a prequential (test-then-train) evaluation: the ``recommendations`` topic
is followed while replaying, and just before each event is sent, the latest list published
for its user so far is scored against the event's item (HR@10, NDCG@10 over the events whose
user had a list). Lists need time to come back: at ``max_speed`` a user's next events are
usually sent before the list for the previous one exists, so the evaluation is pessimistic
(lower coverage, staler lists); pace the replay (``rate`` or ``speed``) to measure the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.compat import log_end_offsets, topic_partitions
from stream.events import InvalidMessage, ShopEvent, decode_recommendations

log = logging.getLogger(__name__)

EVAL_K = 10
LIST_FETCH_WAIT_MS = 20    # lists are read as soon as they exist: a late list is a stale one
TOPIC_WAIT_S = 0.5         # poll interval while the recommendations topic does not exist yet


@dataclass
class Evaluation:
    """Prequential scores: each event against the latest list its user had when it was sent."""

    k: int = EVAL_K
    events: int = 0          # events scored (all replayed events)
    with_list: int = 0       # ... whose user had a list
    hits: int = 0
    ndcg_sum: float = 0.0
    lists_received: int = 0
    bad_lists: int = 0
    latest: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def hr(self) -> float:
        return self.hits / self.with_list if self.with_list else 0.0

    @property
    def ndcg(self) -> float:
        return self.ndcg_sum / self.with_list if self.with_list else 0.0

    @property
    def coverage(self) -> float:
        return self.with_list / self.events if self.events else 0.0

    def on_list(self, value: bytes | None, key: bytes | None = None) -> None:
        if value is None:   # a tombstone: the user was erased, no list any more
            if key is not None:
                self.latest.pop(key.decode(errors="replace"), None)
            return
        try:
            msg = decode_recommendations(value)
            items = [str(it["item_id"]) for it in msg["items"][:self.k]]
            user = str(msg["user_id"])
        except (InvalidMessage, KeyError, TypeError):
            self.bad_lists += 1
            return
        self.latest[user] = items
        self.lists_received += 1

    def score(self, event: ShopEvent) -> None:
        self.events += 1
        items = self.latest.get(event.user_id)
        if items is None:
            return
        self.with_list += 1
        try:
            rank = items.index(event.item_id)
        except ValueError:
            return
        self.hits += 1
        self.ndcg_sum += 1.0 / math.log2(rank + 2)

    def as_dict(self) -> dict:
        return {"k": self.k, f"hr@{self.k}": round(self.hr, 6), f"ndcg@{self.k}": round(self.ndcg, 6),
                "events": self.events, "with_list": self.with_list, "coverage": round(self.coverage, 6),
                "hits": self.hits, "lists_received": self.lists_received, "bad_lists": self.bad_lists}

    def __str__(self) -> str:
        return (f"HR@{self.k} {self.hr:.4f}  NDCG@{self.k} {self.ndcg:.4f}  over {self.with_list:,} "
                f"of {self.events:,} events whose user had a list ({self.coverage:.1%}); "
                f"{self.hits:,} hits, {self.lists_received:,} lists received"
                + (f", {self.bad_lists} unreadable" if self.bad_lists else ""))


async def follow_lists(bootstrap: str, topic: str, evaluation: Evaluation, ready: asyncio.Event) -> None:
    """Feed every list published from now on into ``evaluation`` until cancelled."""
    start_at_end = True
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=LIST_FETCH_WAIT_MS)
    await consumer.start()
    try:
        while not (partitions := (await topic_partitions(bootstrap, [topic])).get(topic)):
            if start_at_end:
                log.warning("topic %s does not exist yet; evaluating lists from when it appears", topic)
            start_at_end = False  # created after we started: every list in it is new
            ready.set()
            await asyncio.sleep(TOPIC_WAIT_S)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if start_at_end:
            # Lists published before the replay count too (a user's list "just before" an
            # event may be old): catch up to the current end before the first event is sent.
            ends = await log_end_offsets(bootstrap, tps)
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    for record in records:
                        evaluation.on_list(record.value, record.key)
        ready.set()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    evaluation.on_list(record.value, record.key)
    finally:
        ready.set()
        await consumer.stop()
