"""The Faust worker: group membership, the user-state table, and the batch pipeline.

    shop-events ─▶ intake (record batches from Faust's fetcher) ─▶ stream/pipeline.py:
       decode/validate (bad ─▶ shop-events-dlq) ─▶ coalesce per user ─▶ user-state table
       ─▶ encode + search + rerank (recommend thread) ─▶ recommendations ─▶ commit

Faust is the application: the worker's lifecycle, the consumer group (its assignor
co-partitions ``shop-events`` with the state changelog), the state table's store and its
recovery from the changelog after a restart or rebalance, the catalogue follower and timers.
The events themselves skip Faust's per-message path (stream/intake.py); the pipeline
commits their offsets -- through the group (at-least-once) or in transactions (exactly-once).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from index.rerank import RerankConfig
from stream import compat, intake as intake_module
from stream.delivery import AT_LEAST_ONCE, EXACTLY_ONCE, GUARANTEES, AtLeastOnce, ExactlyOnce
from stream.events import (DLQ_TOPIC, EVENTS_TOPIC, ITEMS_TOPIC, RECOMMENDATIONS_TOPIC, InvalidMessage,
                           decode_item, encode_dead_letter)
from stream.intake import RecordIntake
from stream.pipeline import BatchPipeline
from model.artifact import keep_freed_memory, usable_cores
from model.incremental import DEFAULT_BUDGET_BYTES
from stream.recommender import Recommender
from stream.state import StateTable, store_url
from stream.threads import cpu_wait_seconds

log = logging.getLogger(__name__)

STATE_TABLE = "user-state"
CORES = usable_cores()
DEFAULT_LANES = min(2, CORES)
STATS_LOG_INTERVAL_S = 10.0
INTAKE_BATCHES = 4        # records buffered ahead of the pipeline, in batches
DRAIN_TIMEOUT_S = 30.0    # a stopping worker's wait for the batches under way


@dataclass
class WorkerSettings:
    broker: str
    model: Path | None             # a model directory or a folder of versions (None with variants)
    group: str = "streamrec"
    partitions: int = 4             # used when shop-events does not exist yet; an existing topic's count wins
    # Events per micro-batch at most. Below saturation batches are as large as the load makes
    # them (tens to hundreds of events); a backlog is taken in large ones, where a user's events
    # coalesce into one list and each pass, search and rerank pays its fixed cost once: at
    # saturation, 4,096 against 512 made 2,401-2,472 against 1,873-1,913 events/s on the scale
    # workload and 11,074-12,883 against 7,179-8,091 on the shop (bench e2e, Kafka, alternating).
    max_batch: int = 4096
    batch_wait_s: float = 0.02      # how long a partial batch waits for more while the recommend thread is busy
    store: str = "auto"             # "rocksdb", "memory" or "auto" (rocksdb when rocksdict imports)
    data_dir: Path = Path(".streamrec")
    reload_interval_s: float = 5.0  # how often the model directory is checked for a new version
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 only inside a container, for Prometheus to scrape
    # Recommend threads, each on its own users and share of the cache (stream/recommender.py).
    # The scale workload's misses on 2 cores (benchmarks/lanes.py): 1,039-1,071 us per list on one
    # thread, 596-618 on two.
    lanes: int = DEFAULT_LANES
    torch_threads: int | None = None   # per lane; default: the cores but one (the event loop's) over the lanes
    rerank: RerankConfig = field(default_factory=RerankConfig)
    guarantee: str = AT_LEAST_ONCE
    commit_interval_s: float = 0.1  # offsets (or transactions) committed at most this often
    replication: int | None = None  # of the topics the worker creates; default min(3, brokers)
    cache_mb: int = DEFAULT_BUDGET_BYTES >> 20   # encoder key/value cache for active users (0: off)
    state_ttl_s: float | None = None  # erase users inactive this long (event time), in the background
    variants: list = field(default_factory=list)   # A/B (stream/variants.py); empty: serve ``model``
    experiment: str = "streamrec"

    def __post_init__(self):
        if self.lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {self.lanes}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.torch_threads is None:
            self.torch_threads = max(1, (CORES - 1) // self.lanes)

    @property
    def changelog_topic(self) -> str:
        return f"{self.group}-{STATE_TABLE}-changelog"

    def topics(self) -> dict[str, int]:
        """Every topic the worker uses, with its partition count (created up front)."""
        return {EVENTS_TOPIC: self.partitions, RECOMMENDATIONS_TOPIC: self.partitions,
                DLQ_TOPIC: 1, ITEMS_TOPIC: 1, self.changelog_topic: self.partitions}

    def topic_configs(self) -> dict[str, dict]:
        """State and catalogue keep the newest value per key, forever."""
        return {self.changelog_topic: {"cleanup.policy": "compact"}, ITEMS_TOPIC: {"cleanup.policy": "compact"}}


class BrokerUnavailable(RuntimeError):
    """The bootstrap address answers no Kafka protocol."""


class GuaranteeUnsupported(RuntimeError):
    """``exactly_once`` asked of a broker without transactions."""


async def prepare_broker(settings: WorkerSettings) -> compat.BrokerProfile:
    """Detect the broker, check the guarantee, create the topics; settles partitions and replication."""
    profile = await compat.broker_profile(settings.broker)
    if settings.guarantee == EXACTLY_ONCE:
        why = await compat.probe_transactions(settings.broker)
        if why:
            raise GuaranteeUnsupported(
                f"--guarantee exactly_once needs a broker with transactions; {settings.broker} "
                f"({profile.kind}) refused one ({why}). Use --guarantee at_least_once there.")
    if settings.replication is None:
        settings.replication = min(3, await compat.broker_count(settings.broker))
    counts = await compat.ensure_topics(settings.broker, {EVENTS_TOPIC: settings.partitions},
                                        replication=settings.replication)
    if counts[EVENTS_TOPIC] != settings.partitions:
        log.warning("%s has %d partitions: the state table and outputs follow it (not --partitions %d)",
                    EVENTS_TOPIC, counts[EVENTS_TOPIC], settings.partitions)
        settings.partitions = counts[EVENTS_TOPIC]
    await compat.ensure_topics(settings.broker, settings.topics(), settings.topic_configs(),
                               exact=[settings.changelog_topic], replication=settings.replication)
    return profile


def create_app(settings: WorkerSettings, recommender, profile: compat.BrokerProfile,
               metrics=None) -> faust.App:
    compat.patch_faust(profile)
    app = faust.App(
        settings.group,
        broker=f"kafka://{settings.broker}",
        store=store_url(settings.store),
        datadir=str(settings.data_dir),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication or 1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",   # Faust's own; the pipeline implements --guarantee
        producer_linger=0.002,
        **profile.group_settings,
    )
    events = app.topic(EVENTS_TOPIC, partitions=settings.partitions, key_serializer="raw",
                       value_serializer="raw")
    table = app.Table(STATE_TABLE, default=None, partitions=settings.partitions,
                      key_type=bytes, value_type=bytes)
    intake = RecordIntake({EVENTS_TOPIC}, max_buffered=INTAKE_BATCHES * settings.max_batch)
    intake_module.install(app, intake)
    if settings.guarantee == EXACTLY_ONCE:
        delivery = ExactlyOnce(settings.broker, settings.group, EVENTS_TOPIC,
                               commit_interval_s=settings.commit_interval_s)
    else:
        async def commit_offsets(offsets: dict[TopicPartition, int]) -> bool:
            from faust.types import TP

            return await app.consumer._commit({TP(tp.topic, tp.partition): o for tp, o in offsets.items()})

        delivery = AtLeastOnce(settings.broker, commit_offsets, idempotent=profile.idempotent_producers,
                               commit_interval_s=settings.commit_interval_s)
    catalogue_updates: list = []   # applied by the recommend thread between batches
    pipeline = BatchPipeline(recommender=recommender, table=StateTable(table), delivery=delivery, intake=intake,
                             changelog_topic=settings.changelog_topic, max_batch=settings.max_batch,
                             batch_wait_s=settings.batch_wait_s, metrics=metrics,
                             catalogue_updates=catalogue_updates, state_ttl_s=settings.state_ttl_s)
    app.pipeline = pipeline  # for tests and diagnostics

    @app.agent(events, name="recommend")
    async def subscribe_events(stream):
        """Subscribes the group to shop-events and co-partitions the state table with it; the
        records go to the batch pipeline through the intake, never to this agent."""
        async for _ in stream:  # pragma: no cover - nothing is ever delivered here
            pass

    @app.task
    async def run_pipeline():
        await delivery.start()
        await pipeline.run()

    @app.on_partitions_revoked.connect
    async def finish_before_revoke(sender, revoked, **kwargs):
        await pipeline.drain()
        await delivery.on_revoked([TopicPartition(tp.topic, tp.partition) for tp in revoked])

    @app.on_partitions_assigned.connect
    async def start_assigned(sender, assigned, **kwargs):
        await delivery.on_assigned([TopicPartition(tp.topic, tp.partition) for tp in assigned])
        pipeline.active_partitions = {tp.partition for tp in assigned if tp.topic == EVENTS_TOPIC}
        pipeline.reopen()

    async def dead_letter(record, reason: str) -> None:
        if metrics:
            metrics.count_dlq(reason.split(":")[0])
        await app.producer.send(DLQ_TOPIC, record.key, encode_dead_letter(
            record.value, reason, record.topic, record.partition, record.offset, record.key),
            None, None, None)

    @app.task
    async def follow_catalogue():
        """Stock, attributes and boosts from the compacted ``shop-items`` topic.

        Every worker needs the whole catalogue, so it is read outside the consumer group
        (all partitions, from the beginning) like a global table.
        """
        partitions = (await compat.topic_partitions(settings.broker, [ITEMS_TOPIC]))[ITEMS_TOPIC]
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(ITEMS_TOPIC, p) for p in partitions])
            async for record in consumer:
                try:
                    catalogue_updates.append(decode_item(record.key, record.value))
                except InvalidMessage as exc:
                    await dead_letter(record, exc.reason)
        finally:
            await consumer.stop()

    @app.timer(STATS_LOG_INTERVAL_S)
    async def log_stats():
        log_pipeline_stats(pipeline)

    @app.timer(settings.reload_interval_s)
    async def poll_model():
        """Hot-swap: load a new model version off-loop; the recommend thread swaps it in between batches."""
        await asyncio.get_running_loop().run_in_executor(None, recommender.poll_for_new_version)

    if metrics is not None:
        @app.task
        async def start_metrics():
            await metrics.start(settings.metrics_port, settings.broker, host=settings.metrics_host)

    return app


def log_pipeline_stats(pipeline: BatchPipeline) -> None:
    s = pipeline.stats
    cache = pipeline.recommender.cache_counters()
    looked_up = cache.get("cache_hits", 0) + cache.get("cache_misses", 0)
    cached = (f"; encoder cache {cache['cache_hits'] / looked_up:.1%} hits of {looked_up}, "
              f"{cache['cache_users']} users, {cache['cache_bytes'] / 2**20:.0f} MiB") if looked_up else ""
    waited = "".join(f", {thread.replace('_', ' ')} waited for a core {seconds:.2f} s"
                     for thread, seconds in cpu_wait_seconds().items())
    log.info("processed %d events in %d batches, %d lists, %d dead letters; stage seconds %s; recommend thread "
             "busy %.2f s%s%s", s["events"], s["batches"], s["published"], s["dlq"],
             {k: round(v, 2) for k, v in s["seconds"].items()}, s["recommend_busy_s"], waited, cached)


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> None:
    """Create topics, load the model, and run the Faust worker until SIGINT/SIGTERM."""
    import faiss
    import torch

    if settings.guarantee not in GUARANTEES:
        raise ValueError(f"--guarantee must be one of {', '.join(GUARANTEES)}")
    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.torch_threads)
    keep_freed_memory()
    if settings.variants:   # fails fast on a bad model path, like a single model
        from stream.variants import VariantRecommender

        recommender = VariantRecommender(settings.variants, settings.rerank, settings.experiment,
                                         cache_bytes=settings.cache_mb << 20, lanes=settings.lanes)
    else:
        recommender = Recommender(settings.model, settings.rerank, cache_bytes=settings.cache_mb << 20,
                                  lanes=settings.lanes)
    try:
        profile = asyncio.run(prepare_broker(settings))
    except (KafkaError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach a Kafka broker at {settings.broker}: {exc}") from exc
    metrics = None
    if settings.metrics_port is not None:
        from stream.metrics import WorkerMetrics
        metrics = WorkerMetrics(settings.group)
    app = create_app(settings, recommender, profile, metrics)
    worker = DrainingWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    freeze_startup_heap()
    worker.execute_from_commandline()


# objects allocated (net) between young-generation collections; Python's default is 700
GC_YOUNG_THRESHOLD = 50_000


def freeze_startup_heap() -> None:
    """Keep the objects of startup (torch, Faust, the model) out of the garbage collector's
    full passes: each pass over them stopped the worker for 100-128 ms (measured with a gc
    callback on the shop benchmark). Frozen objects are still freed by reference counting.

    A batch's events, states and lists are acyclic and die with it; collected every 700
    allocations they were traversed while still alive and promoted, and then traversed again
    by the older generations' passes. Collected every 50,000, most are freed by reference
    counting before a pass sees them: over a worker's life on the scale workload (`bench e2e
    --workload scale --rates max,max`, a gc callback, startup included) the collector took
    0.58-0.65 s against 1.63-1.91 (young passes 497 against ~3,200; the longest young pause
    16-18 against 8-11 ms, the longest middle one 3 against 8-14 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class DrainingWorker(faust.Worker):
    """On SIGTERM/SIGINT, finish and commit the batches under way, then let Faust stop.

    Faust stops its consumer and closes the state store before anything else; draining first
    means a stopped worker leaves no processed-but-uncommitted events behind (no repeated lists
    after a clean restart) and no open transaction.
    """

    _draining = False

    def _schedule_shutdown(self, signum) -> None:
        if self._draining:
            return super()._schedule_shutdown(signum)
        self._draining = True
        asyncio.ensure_future(self._drain_then_stop(signum), loop=self.loop)

    async def _drain_then_stop(self, signum) -> None:
        try:
            await asyncio.wait_for(self.app.pipeline.shutdown(), DRAIN_TIMEOUT_S)
        except Exception:
            log.exception("could not drain the pipeline before stopping; its last batches will be redone")
        log_pipeline_stats(self.app.pipeline)
        faust.Worker._schedule_shutdown(self, signum)
