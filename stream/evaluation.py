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


Z95 = 1.96   # two-sided 95% normal quantile, for the confidence intervals


@dataclass
class Score:
    """HR@k and NDCG@k over some scored events, with 95% confidence intervals (normal
    approximation over events: HR is a proportion, NDCG a mean of per-event gains)."""

    n: int = 0
    hits: int = 0
    ndcg_sum: float = 0.0
    ndcg_sq_sum: float = 0.0

    def add(self, rank: int | None) -> None:
        self.n += 1
        if rank is not None:
            gain = 1.0 / math.log2(rank + 2)
            self.hits += 1
            self.ndcg_sum += gain
            self.ndcg_sq_sum += gain * gain

    @property
    def hr(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def ndcg(self) -> float:
        return self.ndcg_sum / self.n if self.n else 0.0

    @property
    def hr_ci(self) -> float:
        """Half-width of the 95% interval of HR."""
        return Z95 * math.sqrt(self.hr * (1 - self.hr) / self.n) if self.n else 0.0

    @property
    def ndcg_ci(self) -> float:
        if self.n < 2:
            return 0.0
        variance = max(0.0, self.ndcg_sq_sum / self.n - self.ndcg ** 2) * self.n / (self.n - 1)
        return Z95 * math.sqrt(variance / self.n)


@dataclass
class Evaluation:
    """Prequential scores: each event against the latest list its user had when it was sent,
    overall and per A/B variant (the ``variant`` each list names)."""

    k: int = EVAL_K
    events: int = 0          # events scored (all replayed events)
    lists_received: int = 0
    bad_lists: int = 0
    overall: Score = field(default_factory=Score)
    by_variant: dict[str, Score] = field(default_factory=dict)
    latest: dict[str, tuple[list[str], str | None]] = field(default_factory=dict, repr=False)

    @property
    def with_list(self) -> int:       # events whose user had a list
        return self.overall.n

    @property
    def hits(self) -> int:
        return self.overall.hits

    @property
    def hr(self) -> float:
        return self.overall.hr

    @property
    def ndcg(self) -> float:
        return self.overall.ndcg

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
            variant = msg.get("variant")
        except (InvalidMessage, KeyError, TypeError):
            self.bad_lists += 1
            return
        self.latest[user] = (items, None if variant is None else str(variant))
        self.lists_received += 1

    def score(self, event: ShopEvent) -> None:
        self.events += 1
        latest = self.latest.get(event.user_id)
        if latest is None:
            return
        items, variant = latest
        rank = items.index(event.item_id) if event.item_id in items else None
        self.overall.add(rank)
        if variant is not None:
            self.by_variant.setdefault(variant, Score()).add(rank)

    def as_dict(self) -> dict:
        k = self.k
        out = {"k": k, f"hr@{k}": round(self.hr, 6), f"ndcg@{k}": round(self.ndcg, 6),
               "events": self.events, "with_list": self.with_list, "coverage": round(self.coverage, 6),
               "hits": self.hits, "lists_received": self.lists_received, "bad_lists": self.bad_lists}
        if self.by_variant:
            out["variants"] = {name: {f"hr@{k}": round(s.hr, 6), f"hr@{k}_ci95": round(s.hr_ci, 6),
                                      f"ndcg@{k}": round(s.ndcg, 6), f"ndcg@{k}_ci95": round(s.ndcg_ci, 6),
                                      "events": s.n, "hits": s.hits}
                               for name, s in sorted(self.by_variant.items())}
        return out

    def __str__(self) -> str:
        k = self.k
        text = (f"HR@{k} {self.hr:.4f}  NDCG@{k} {self.ndcg:.4f}  over {self.with_list:,} "
                f"of {self.events:,} events whose user had a list ({self.coverage:.1%}); "
                f"{self.hits:,} hits, {self.lists_received:,} lists received"
                + (f", {self.bad_lists} unreadable" if self.bad_lists else ""))
        for name, s in sorted(self.by_variant.items()):
            text += (f"\n  variant {name}: HR@{k} {s.hr:.4f} ± {s.hr_ci:.4f}  NDCG@{k} {s.ndcg:.4f} ± "
                     f"{s.ndcg_ci:.4f}  (95% intervals, {s.n:,} events)")
        return text


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
