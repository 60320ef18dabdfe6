"""The batch-native event path: record batches of ``shop-events`` in, one list per user out.

    intake (records of the assigned partitions, straight from Faust's fetcher, stream/intake.py)
      ─▶ stage 1, event loop: decode + validate (bad ─▶ dead letter), coalesce per user,
         apply to each user's state (staged, stream/state.py), hand the batch over
      ─▶ recommend thread: catalogue / model / trending updates, encode, search, rerank
      ─▶ stage 2, event loop: produce lists, changelog rows and dead letters; make them
         durable; persist state; commit offsets or the transaction (stream/delivery.py)

Stage 1 of the next batch runs while the recommend thread works on this one (torch and faiss
release the GIL), so both cores work. Batches finish strictly in order, and a batch's offsets
are committed only after its records are durable: a crash repeats lists, never loses one.
A batch that cannot be made durable ends the worker (exit code 70) before anything of it is
committed; the restarted worker processes it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from aiokafka import TopicPartition

from stream.delivery import DeliveryFailed, SentBatch
from stream.events import (DELETE_USER, DLQ_TOPIC, RECOMMENDATIONS_TOPIC, InvalidMessage, ShopEvent,
                           decode_keyed_event, encode_dead_letter, encode_recommendations)
from stream.intake import RecordIntake
from stream.metrics import DEFAULT_VARIANT, STAGES
from stream.recommender import start_stage_thread
from stream.state import StateTable, UserState
from stream.threads import RECOMMEND_THREAD

log = logging.getLogger(__name__)

EXIT_BATCH_FAILED = 70
MAX_KEY_BYTES = 1024           # a dead letter keeps a longer original key in its value, not as its key
# Retention: rows of the local state the sweep looks at per batch (a bounded cost: ~32 state
# decodes), over the assigned partitions in turn.
SWEEP_ROWS_PER_BATCH = 32
RECOMMEND_ATTEMPTS = 3
RECOMMEND_RETRY_BACKOFF_S = 1.0


@dataclass
class Batch:
    """One micro-batch between the stages: users (one entry each), their states, and what to write."""

    seq: int
    records: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)   # next offset per partition
    users: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    states: list[UserState] = field(default_factory=list)
    new: list[int] = field(default_factory=list)          # events the batch appended to each state
    tails: list[str | None] = field(default_factory=list)  # each user's last event before the batch
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)  # (partition, key, state)
    erased: list[tuple[int, bytes]] = field(default_factory=list)    # users deleted: (partition, key)
    dead: list[tuple[int, bytes | None, bytes, str]] = field(default_factory=list)  # (partition, key, record, reason)
    events: list[ShopEvent] = field(default_factory=list)
    wait_s: float = 0.0      # how long its oldest records waited in the intake
    state_s: float = 0.0


class BatchPipeline:
    def __init__(self, *, recommender, table: StateTable, delivery, intake: RecordIntake, changelog_topic: str,
                 max_batch: int, batch_wait_s: float, metrics=None, catalogue_updates: list | None = None,
                 state_ttl_s: float | None = None):
        self.recommender = recommender
        self.table = table
        self.delivery = delivery
        self.intake = intake
        self.changelog_topic = changelog_topic
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics
        self.catalogue_updates = catalogue_updates if catalogue_updates is not None else []
        self.state_ttl_s = state_ttl_s          # users inactive longer than this (stream time) are erased
        self.active_partitions: set[int] = set()   # of the state table: assigned to this worker
        self._stream_time = 0.0                 # the newest event ts seen
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=RECOMMEND_THREAD,
                                           initializer=start_stage_thread)
        self._handoff: asyncio.Queue = asyncio.Queue(maxsize=1)   # at most one batch ahead of stage 2
        self._seq = 0
        self._done_seq = 0          # the newest batch whose records are all sent
        self._commit_lock = asyncio.Lock()
        self._in_flight = 0
        # Set while the recommend thread has no batch: a partial batch then goes at once instead
        # of waiting batch_wait_s for more (under load the thread is busy and batches fill).
        self._recommending = 0
        self._recommender_idle = asyncio.Event()
        self._recommender_idle.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()    # cleared while a rebalance or a shutdown drains the pipeline
        self._open.set()
        self._durable: list[SentBatch] = []   # changelog batches awaiting persist
        self._cache_seen = (0, 0)   # encoder cache hits and misses already counted in the metrics
        self._busy_s = 0.0          # the recommend thread's wall seconds on batches (it alone writes it)
        self.stats = {"events": 0, "dlq": 0, "published": 0, "batches": 0, "expired": 0, "dlq_oversize": 0,
                      "recommend_busy_s": 0.0,
                      "seconds": dict.fromkeys(STAGES, 0.0)}

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        await asyncio.gather(self._stage1(), self._stage2())

    async def _stage1(self) -> None:
        while True:
            await self._open.wait()
            chunks = await self.intake.take(self.max_batch, self.batch_wait_s, ready=self._recommender_idle)
            if not chunks or not self._open.is_set():
                continue   # a rebalance cleared them: the consumer seeks back to the committed offsets
            self._seq += 1
            batch = self.prepare(self._seq, chunks)
            batch.wait_s = self.intake.waited
            updates, self.catalogue_updates[:] = list(self.catalogue_updates), []
            future = self._submit(batch.states, batch.events, updates, batch.users, batch.new, batch.tails,
                                  [key.decode() for _, key in batch.erased])
            self._in_flight += 1
            self._idle.clear()
            await self._handoff.put((batch, future, updates))

    def _submit(self, *args) -> asyncio.Future:
        """Hand work to the recommend thread (``recommend_batch(*args)``), counted: stage 1 sends
        a partial batch at once only while that thread has nothing, retries included."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._busy_recommending, *args)
        self._recommending += 1
        self._recommender_idle.clear()
        future.add_done_callback(self._recommended)
        return future

    def _busy_recommending(self, *args):
        """``recommend_batch`` on the recommend thread, its wall time counted (failed attempts too):
        how busy that thread is tells how close the worker is to its capacity -- batches queue
        in front of it, and latency grows, as it nears 100%."""
        started = time.perf_counter()
        try:
            return self.recommender.recommend_batch(*args)
        finally:
            self._busy_s += time.perf_counter() - started

    def _recommended(self, _future) -> None:
        self._recommending -= 1
        if not self._recommending:
            self._recommender_idle.set()

    async def _stage2(self) -> None:
        while True:
            try:
                batch, future, updates = await asyncio.wait_for(self._handoff.get(), self.delivery.commit_interval_s)
            except asyncio.TimeoutError:   # traffic paused: commit what is done, so lag reaches 0
                await self._commit(force=True)
                continue
            try:
                await self.finish(batch, future, updates)
            except Exception:  # not durable, nothing committed: the restarted worker redoes it
                self._fatal(f"batch {batch.seq} of {batch.records} records failed; exiting without committing it")
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _commit(self, offsets: dict | None = None, force: bool = False) -> None:
        """Commit consumed offsets (or the transactions) when due; persist state made durable by it."""
        async with self._commit_lock:   # a rebalance's drain waits for a commit under way
            try:
                committed = await self.delivery.complete(offsets or {}, force=force)
            except DeliveryFailed:
                self._fatal("could not commit; exiting")
        if committed and not self.delivery.batch_durable():
            self._persist(self._done_seq)

    @staticmethod
    def _fatal(message: str) -> None:
        log.critical(message, exc_info=True)
        logging.shutdown()
        os._exit(EXIT_BATCH_FAILED)

    # ------------------------------------------------------------------ stage 1
    def prepare(self, seq: int, chunks) -> Batch:
        """Decode, validate, coalesce per user and apply to state: all of it on the event loop."""
        started = time.perf_counter()
        batch = Batch(seq)
        by_user: dict[str, tuple[int, list[ShopEvent]]] = {}
        for tp, records in chunks:
            p = tp.partition
            batch.offsets[TopicPartition(tp.topic, p)] = records[-1].offset + 1
            batch.records += len(records)
            for record in records:
                try:
                    event = decode_keyed_event(record.key, record.value)
                except InvalidMessage as exc:
                    dead = encode_dead_letter(record.value, exc.reason, record.topic, p, record.offset, record.key)
                    key = record.key if len(record.key or b"") <= MAX_KEY_BYTES else None
                    if len(dead) < len(record.value or b""):   # the original did not fit
                        log.warning("dead letter %s[%d]@%d: original of %d bytes dropped (too large)",
                                    record.topic, p, record.offset, len(record.value or b""))
                        self.stats["dlq_oversize"] += 1
                    batch.dead.append((p, key, dead, exc.reason))
                    continue
                entry = by_user.get(event.user_id)
                if entry is None:
                    entry = by_user[event.user_id] = [p, [], False]
                if event.type == DELETE_USER:   # what came before is erased; what follows starts afresh
                    entry[1], entry[2] = [], True
                else:
                    entry[1].append(event)
                    batch.events.append(event)
        by_partition: dict[int, list[str]] = {}
        for user, (p, _, _) in by_user.items():
            by_partition.setdefault(p, []).append(user)
        for p, users in by_partition.items():
            keys = [u.encode() for u in users]
            for user, key, raw in zip(users, keys, self.table.get_many(p, keys)):
                _, events, erased = by_user[user]
                state = UserState() if erased else self._decode_state(user, raw)
                tail = state.last_event_id
                applied = state.apply(events)
                if erased:
                    batch.erased.append((p, key))
                    if not applied:   # nothing after the delete: no state, no list
                        self.table.stage(seq, p, key, None)
                        batch.changelog.append((p, key, None))
                        continue
                if applied:
                    value = state.encode()
                    self.table.stage(seq, p, key, value)
                    batch.changelog.append((p, key, value))
                batch.tails.append(tail)
                batch.new.append(applied)
                batch.users.append(user)
                batch.partitions.append(p)
                batch.states.append(state)
        if batch.events:
            self._stream_time = max(self._stream_time, max(e.ts for e in batch.events))
        if self.state_ttl_s:
            self._expire(batch, seq, {user.encode() for user in by_user})
        batch.state_s = time.perf_counter() - started
        return batch

    def _expire(self, batch: Batch, seq: int, touched: set[bytes]) -> None:
        """Retention: erase the users, among the next rows of the sweep, inactive past the TTL."""
        cutoff = self._stream_time - self.state_ttl_s
        for p, key, value in self.table.scan(self.active_partitions, SWEEP_ROWS_PER_BATCH):
            if key in touched:
                continue
            try:
                last = UserState.decode(value).last_event_ts
            except Exception:
                continue
            if last is not None and last < cutoff:
                self.table.stage(seq, p, key, None)
                batch.changelog.append((p, key, None))
                batch.erased.append((p, key))
                self.stats["expired"] += 1

    @staticmethod
    def _decode_state(user: str, raw: bytes | None) -> UserState:
        try:
            return UserState.decode(raw)
        except Exception as exc:  # a row this version cannot read: start the user afresh, loudly
            log.error("unreadable state row (%s); starting from an empty history", exc)
            return UserState()

    # ------------------------------------------------------------------ stage 2
    async def finish(self, batch: Batch, future, updates) -> None:
        result = await self._recommend(batch, future, updates)
        started = time.perf_counter()
        now = time.time()
        # a tombstone first for an erased user (the shop drops the list), then the lists, the
        # changelog rows (each in its state partition) and the dead letters
        records = [(RECOMMENDATIONS_TOPIC, key, None, p, None) for p, key in batch.erased]
        records += [(RECOMMENDATIONS_TOPIC, user.encode(), encode_recommendations(
                        user, ranked, version, state.last_event_id, state.last_event_ts, now, variant), p, None)
                    for user, p, state, ranked, version, variant in zip(
                        batch.users, batch.partitions, batch.states, result.lists, result.versions, result.variants)]
        records += [(self.changelog_topic, key, value, p, p) for p, key, value in batch.changelog]
        records += [(DLQ_TOPIC, key, value, p, None) for p, key, value, _ in batch.dead]
        sent = await self.delivery.send_batches(records)
        self._durable.extend(s for s in sent if s.topic == self.changelog_topic)
        await self.delivery.batch_sent([s.future for s in sent])
        self._done_seq = batch.seq
        if self.delivery.batch_durable():
            self._persist(batch.seq)
        await self._commit(batch.offsets)
        try:   # counting must never fail a batch that is already durable
            self._account(batch, result, time.perf_counter() - started)
        except Exception:
            log.exception("could not account for batch %d in the stats and metrics", batch.seq)

    async def _recommend(self, batch: Batch, future, updates):
        for attempt in range(1, RECOMMEND_ATTEMPTS + 1):
            try:
                return await future
            except Exception:
                if attempt == RECOMMEND_ATTEMPTS:
                    raise
                log.exception("recommending batch %d failed (attempt %d/%d)", batch.seq, attempt, RECOMMEND_ATTEMPTS)
                await asyncio.sleep(RECOMMEND_RETRY_BACKOFF_S * attempt)
                # users without what is new in them: encoded in full, which rebuilds their cache
                future = self._submit(batch.states, [], updates, batch.users)

    def _persist(self, upto_seq: int) -> None:
        offsets: dict[int, int] = {}
        for sent in self._durable:
            offset = sent.last_offset()
            if offset > offsets.get(sent.partition, -1):
                offsets[sent.partition] = offset
        self._durable.clear()
        self.table.persist(upto_seq, offsets)

    def _account(self, batch: Batch, result, publish_s: float) -> None:
        stats = self.stats
        stats["events"] += batch.records
        stats["dlq"] += len(batch.dead)
        stats["published"] += len(batch.users)
        stats["batches"] += 1
        seconds = {"state": batch.state_s, **result.timings, "publish": publish_s}
        for stage, spent in seconds.items():
            stats["seconds"][stage] = stats["seconds"].get(stage, 0.0) + spent
        # what the thread has added since the last batch counted (the stats hold the total counted)
        busy, stats["recommend_busy_s"] = self._busy_s - stats["recommend_busy_s"], self._busy_s
        m = self.metrics
        if m is not None:
            m.observe_batch(batch.records)
            m.observe_batch_wait(batch.wait_s)
            m.add_recommend_busy(busy)
            for stage, spent in seconds.items():
                m.observe_stage(stage, spent)
            for _, _, _, reason in batch.dead:
                m.count_dlq(reason.split(":")[0])
            if batch.states:
                latency = time.time() - np.fromiter((s.last_event_ts for s in batch.states), float)
                variants = np.array([v or DEFAULT_VARIANT for v in result.variants])
                for variant in np.unique(variants):
                    mine = variants == variant
                    m.count_published(int(mine.sum()), variant)
                    m.observe_event_latency(latency[mine], variant)
            cache = self.recommender.cache_counters()
            if cache:   # running totals since start
                hits, misses = cache["cache_hits"], cache["cache_misses"]
                seen_hits, seen_misses = self._cache_seen
                m.observe_cache(hits - seen_hits, misses - seen_misses, cache["cache_users"], cache["cache_bytes"])
                self._cache_seen = (hits, misses)

    # ------------------------------------------------------------------ rebalances and shutdown
    async def drain(self) -> None:
        """Finish the batches under way and commit them; take nothing new until :meth:`reopen`."""
        self._open.clear()
        self.intake.clear()
        await self._idle.wait()
        await self._commit(force=True)

    async def shutdown(self) -> None:
        """Drain for good and stop the producers (the worker is stopping)."""
        await self.drain()
        await self.delivery.stop()

    def reopen(self) -> None:
        self.intake.clear()
        self._open.set()
