"""The Faust worker: for each micro-batch of shop events, update state, recommend, publish.

    shop-events ─▶ decode/validate (bad ─▶ shop-events-dlq) ─▶ coalesce per user
       ─▶ user-state table ─▶ encode + search + rerank (one batched call, off-loop)
       ─▶ recommendations (one list per user per batch) ─▶ ack ─▶ offsets committed

Offsets are committed only after the batch's lists (and state changelog) are written, so a
crash can repeat a list but never lose one (at-least-once; state updates are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
import numpy as np
from faust.streams import _current_event

from index.rerank import RerankConfig
from index.trending import event_weights
from stream import compat
from stream.events import (DLQ_TOPIC, EVENTS_TOPIC, ITEMS_TOPIC, RECOMMENDATIONS_TOPIC, InvalidMessage,
                           decode_event, decode_item, encode_dead_letter, encode_recommendations)
from stream.recommender import Recommender
from stream.state import UserState, coalesce_by_user

log = logging.getLogger(__name__)

STATE_TABLE = "user-state"
STATS_LOG_INTERVAL_S = 10.0
BATCH_ATTEMPTS = 3
BATCH_RETRY_BACKOFF_S = 1.0
EXIT_BATCH_FAILED = 70


@dataclass
class WorkerSettings:
    broker: str
    model: Path
    group: str = "streamrec"
    partitions: int = 4
    max_batch: int = 512            # events per micro-batch (one encoder call, one FAISS search)
    batch_wait_s: float = 0.02      # how long a partial batch waits for more events
    store: str = "auto"             # "rocksdb", "memory" or "auto" (rocksdb when rocksdict imports)
    data_dir: Path = Path(".streamrec")
    reload_interval_s: float = 5.0  # how often the model directory is checked for a new version
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 only inside a container, for Prometheus to scrape
    torch_threads: int = max(1, (os.cpu_count() or 2) - 1)  # leave a core to the event loop
    rerank: RerankConfig = field(default_factory=RerankConfig)

    @property
    def changelog_topic(self) -> str:
        return f"{self.group}-{STATE_TABLE}-changelog"

    def topics(self) -> dict[str, int]:
        """Every topic the worker uses, with its partition count (created up front)."""
        return {EVENTS_TOPIC: self.partitions, RECOMMENDATIONS_TOPIC: self.partitions,
                DLQ_TOPIC: 1, ITEMS_TOPIC: 1, self.changelog_topic: self.partitions}


def store_url(choice: str) -> str:
    if choice == "auto":
        try:
            import rocksdict  # noqa: F401
            choice = "rocksdb"
        except ImportError:
            choice = "memory"
    return f"{choice}://"


class EventContext:
    """Points Faust's "current event" at ``event`` while a table key is written.

    In a ``take_events`` batch, Faust's current event is the batch's last one, possibly from
    another partition; a table write must go to the changelog partition (and RocksDB column)
    of the event that caused it, i.e. the user's own partition.
    """

    __slots__ = ("event", "token")

    def __init__(self, event):
        self.event = event

    def __enter__(self):
        self.token = _current_event.set(weakref.ref(self.event))

    def __exit__(self, *exc):
        _current_event.reset(self.token)


def create_app(settings: WorkerSettings, recommender: Recommender, metrics=None) -> faust.App:
    compat.patch_faust_recovery()
    compat.patch_faust_fetch_wait()
    compat.patch_faust_resume_after_seek()
    app = faust.App(
        settings.group,
        broker=f"kafka://{settings.broker}",
        store=store_url(settings.store),
        datadir=str(settings.data_dir),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        stream_buffer_maxsize=max(4096, 4 * settings.max_batch),
        broker_commit_interval=1.0,
        producer_linger=0.002,
        **compat.FAST_GROUP_SETTINGS,
    )
    events = app.topic(EVENTS_TOPIC, partitions=settings.partitions, key_serializer="raw",
                       value_serializer="raw")
    table = app.Table(STATE_TABLE, default=None, partitions=settings.partitions,
                      key_type=bytes, value_type=bytes)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recommend")
    catalogue_updates: list = []   # applied between batches, never while a batch reads the catalogue
    stats = {"events": 0, "dlq": 0, "published": 0, "batches": 0,
             "seconds": dict.fromkeys(("state", "encode", "search", "rerank", "publish"), 0.0)}

    async def dead_letter(message, reason: str) -> None:
        stats["dlq"] += 1
        if metrics:
            metrics.count_dlq(reason.split(":")[0])
        await app.producer.send(DLQ_TOPIC, message.key, encode_dead_letter(
            message.value, reason, message.topic, message.partition, message.offset, message.key),
            None, None, None)

    @app.task
    async def follow_catalogue():
        """Stock, attributes and boosts from the compacted ``shop-items`` topic.

        Every worker needs the whole catalogue, so it is read outside the consumer group
        (all partitions, from the beginning) like a global table.
        """
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(ITEMS_TOPIC) or {0}
            consumer.assign([TopicPartition(ITEMS_TOPIC, p) for p in sorted(partitions)])
            async for record in consumer:
                try:
                    catalogue_updates.append(decode_item(record.key, record.value))
                except InvalidMessage as exc:
                    await dead_letter(record, exc.reason)
        finally:
            await consumer.stop()

    @app.agent(events, name="recommend")
    async def recommend_agent(stream):
        """For each batch of events: update state, encode, search, rerank, publish."""
        loop = asyncio.get_running_loop()
        async for batch in stream.take_events(settings.max_batch, within=settings.batch_wait_s):
            apply_catalogue_updates(recommender, catalogue_updates)
            recommender.swap_if_pending()
            await process_batch_or_exit(batch, loop)

    async def process_batch_or_exit(batch, loop) -> None:
        """Retry a failing batch (state updates are idempotent); if it keeps failing, exit hard.

        Faust acks a taken batch even when the body raises, so swallowing the error would let
        its offsets be committed without lists: exiting before the next commit keeps
        at-least-once, and the restarted worker processes the batch again.
        """
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                return await process_batch(batch, loop)
            except Exception:
                log.exception("batch of %d events failed (attempt %d/%d)", len(batch), attempt, BATCH_ATTEMPTS)
                await asyncio.sleep(BATCH_RETRY_BACKOFF_S * attempt)
        log.critical("giving up on a batch; exiting without committing its offsets")
        logging.shutdown()
        os._exit(EXIT_BATCH_FAILED)

    async def process_batch(batch, loop) -> None:
        t0 = time.perf_counter()
        valid = []
        for event in batch:
            try:
                valid.append((decode_event(event.message.value), event))
            except InvalidMessage as exc:
                await dead_letter(event.message, exc.reason)
        by_user = coalesce_by_user(valid)
        states = []
        for user, pairs in by_user.items():
            key = user.encode()
            state = UserState.decode(table.get(key))
            if state.apply(e for e, _ in pairs):
                with EventContext(pairs[-1][1]):
                    table[key] = state.encode()
            states.append(state)
        if valid:
            recommender.trending.observe([e.item_id for e, _ in valid], [e.ts for e, _ in valid],
                                         event_weights([e.type for e, _ in valid]))
        t1 = time.perf_counter()
        if states:
            lists, version = await loop.run_in_executor(executor, recommender.recommend, states)
            t2 = time.perf_counter()
            now = time.time()
            futures = [
                await app.producer.send(
                    RECOMMENDATIONS_TOPIC, user.encode(),
                    encode_recommendations(user, ranked, version, state.last_event_id,
                                           state.last_event_ts, now),
                    None, None, None)
                for (user, state, ranked) in zip(by_user, states, lists)
            ]
            await asyncio.gather(*futures)
        else:
            t2 = t1
        # The table's changelog goes through Faust's buffer: flush it before the batch is acked.
        await app.producer.buffer.flush()
        await app.producer.flush()
        t3 = time.perf_counter()
        timings = {"state": t1 - t0, **(recommender.timings if states else {}), "publish": t3 - t2}
        stats["events"] += len(batch)
        stats["published"] += len(states)
        stats["batches"] += 1
        for stage, spent in timings.items():
            stats["seconds"][stage] += spent
        if metrics:
            metrics.observe_batch(len(batch))
            for stage, spent in timings.items():
                metrics.observe_stage(stage, spent)
            metrics.count_published(len(states))
            if states:
                metrics.observe_event_latency(time.time() - np.fromiter((s.last_event_ts for s in states), float))

    @app.timer(STATS_LOG_INTERVAL_S)
    async def log_stats():
        log.info("processed %d events in %d batches, %d lists, %d dead letters; stage seconds %s",
                 stats["events"], stats["batches"], stats["published"], stats["dlq"],
                 {k: round(v, 2) for k, v in stats["seconds"].items()})

    @app.timer(settings.reload_interval_s)
    async def poll_model():
        """Hot-swap: load a new model version off-loop; the agent swaps it in between batches."""
        await asyncio.get_running_loop().run_in_executor(None, recommender.poll_for_new_version)

    if metrics is not None:
        @app.task
        async def start_metrics():
            await metrics.start(settings.metrics_port, settings.broker, host=settings.metrics_host)

    return app


def apply_catalogue_updates(recommender: Recommender, updates: list) -> None:
    if not updates:
        return
    pending, updates[:] = list(updates), []
    for item in pending:
        if item.removed:
            recommender.catalogue.remove(item.item_id)
        else:
            recommender.catalogue.update({"item_id": item.item_id, "in_stock": item.in_stock,
                                          "attributes": list(item.attributes), "boost": item.boost})
    recommender.sync_catalogue()


class BrokerUnavailable(RuntimeError):
    """The bootstrap address answers no Kafka protocol."""


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> None:
    """Create topics, load the model, and run the Faust worker until SIGINT/SIGTERM."""
    import faiss
    import torch

    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.torch_threads)
    recommender = Recommender(settings.model, settings.rerank)  # fails fast on a bad model path
    try:
        asyncio.run(compat.ensure_topics(settings.broker, settings.topics()))
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach a Kafka broker at {settings.broker}: {exc}") from exc
    metrics = None
    if settings.metrics_port is not None:
        from stream.metrics import WorkerMetrics
        metrics = WorkerMetrics(settings.group)
    app = create_app(settings, recommender, metrics)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
