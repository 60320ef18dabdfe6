"""Prometheus metrics of a worker, named as kafka_exporter / kafka-lag-exporter name them.

Each :class:`WorkerMetrics` owns its own ``CollectorRegistry``, so tests and several workers in
one process never clash over the global one. The worker calls it once per batch, never per
event: histograms of per-event values are filled from a whole array at once.

    m = WorkerMetrics("streamrec")
    await m.start(port, bootstrap)          # HTTP /metrics on 127.0.0.1 + lag refresher
    m.observe_batch(len(events))            # batch size histogram, events processed counter
    m.observe_batch_wait(seconds)           # how long its oldest records waited to be batched
    m.add_recommend_busy(seconds)           # wall time the recommend thread spent on batches
                                            # (its wait for a core is read from /proc when scraped)
    with m.stage("encode"): ...             # per-stage latency
    m.observe_event_latency(now - event_ts) # event ts -> list produced, an array per batch
    m.count_published(n); m.count_dlq("missing ts")
    await m.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily

from stream.lag import DEFAULT_GROUP, SEVERITY, LagEvaluator, lag_snapshot
from stream.threads import cpu_wait_seconds

log = logging.getLogger(__name__)

STAGES = ("state", "encode", "search", "rerank", "publish")
DEFAULT_VARIANT = "default"   # the variant label of lists served without A/B variants
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EVENT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
LAG_INTERVAL_S = 10.0
LOOPBACK = "127.0.0.1"


class WorkerMetrics:
    def __init__(self, group: str = DEFAULT_GROUP, registry: CollectorRegistry | None = None):
        self.group = group
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["group", "topic", "partition"]
        self.lag = Gauge("kafka_consumergroup_lag", "Consumer group lag in messages (log end - committed)",
                         labels, registry=r)
        self.lag_seconds = Gauge("kafka_consumergroup_lag_seconds",
                                 "Age of the oldest record the group has not consumed", labels, registry=r)
        self.group_status = Gauge("streamrec_consumergroup_status",
                                  "Burrow-style group status: 0 OK, 1 WARN, 2 STALL, 3 STOP, 4 REWIND",
                                  ["group"], registry=r)
        self.events = Counter("streamrec_events_processed", "Shop events processed", registry=r)
        self.dlq = Counter("streamrec_dlq_messages", "Messages sent to the dead-letter topic", ["reason"],
                           registry=r)
        self.published = Counter("streamrec_recommendations_published", "Recommendation lists published, per "
                                 "A/B variant ('default' without variants)", ["variant"], registry=r)
        self.cache_lookups = Counter("streamrec_encoder_cache_lookups", "Users encoded, by outcome: hit "
                                     "(incremental) or miss (full recompute)", ["outcome"], registry=r)
        self.cache_bytes = Gauge("streamrec_encoder_cache_bytes", "Bytes of cached keys/values (active users)",
                                 registry=r)
        self.cache_users = Gauge("streamrec_encoder_cache_users", "Users held by the encoder cache", registry=r)
        self.batch_size = Histogram("streamrec_batch_size", "Events per processed batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram("streamrec_batch_wait_seconds", "How long a batch's oldest records waited "
                                    "in the worker, fetched but not yet in a batch (the queue in front of "
                                    "the recommend thread)", buckets=STAGE_BUCKETS, registry=r)
        self.recommend_busy = Counter("streamrec_recommend_busy_seconds", "Wall seconds the recommend thread "
                                      "spent on batches: its rate is the share of time it is busy (1: always); "
                                      "near 1, batches queue in front of it and latency grows", registry=r)
        r.register(CpuWaitCollector())
        self.stage_latency = Histogram("streamrec_stage_latency_seconds", "Time per batch in each stage",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.event_latency = Histogram("streamrec_event_to_list_latency_seconds",
                                       "From the event's ts to its recommendation list being produced, per variant",
                                       ["variant"], buckets=EVENT_LATENCY_BUCKETS, registry=r)
        self._stages = {s: self.stage_latency.labels(stage=s) for s in STAGES}  # exported from the start
        self._server = None
        self._collector: LagCollector | None = None
        self.port: int | None = None

    # --------------------------------------------------------------- per batch
    def observe_batch(self, n_events: int) -> None:
        """One processed batch of ``n_events`` (also counts the events as processed)."""
        self.batch_size.observe(n_events)
        self.events.inc(n_events)

    def observe_cache(self, hits: int, misses: int, users: int, nbytes: int) -> None:
        """The encoder cache after a batch: new hits and misses, users held, bytes."""
        if hits:
            self.cache_lookups.labels(outcome="hit").inc(hits)
        if misses:
            self.cache_lookups.labels(outcome="miss").inc(misses)
        self.cache_users.set(users)
        self.cache_bytes.set(nbytes)

    def observe_batch_wait(self, seconds: float) -> None:
        self.batch_wait.observe(seconds)

    def add_recommend_busy(self, seconds: float) -> None:
        if seconds > 0:
            self.recommend_busy.inc(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.stage_latency.labels(stage=stage)
        child.observe(seconds)

    @contextmanager
    def stage(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - start)

    def observe_event_latency(self, seconds, variant: str = DEFAULT_VARIANT) -> None:
        """Event-to-list latencies of a whole batch (an array or a list of seconds)."""
        observe_many(self.event_latency.labels(variant=variant), seconds)

    def count_dlq(self, reason: str, n: int = 1) -> None:
        self.dlq.labels(reason=reason).inc(n)

    def count_published(self, n: int = 1, variant: str = DEFAULT_VARIANT) -> None:
        self.published.labels(variant=variant).inc(n)

    def set_lag(self, snapshot) -> None:
        """Set the lag gauges from a :class:`stream.lag.LagSnapshot`."""
        for p in snapshot.partitions:
            key = dict(group=snapshot.group, topic=p.topic, partition=str(p.partition))
            self.lag.labels(**key).set(p.lag)
            self.lag_seconds.labels(**key).set(p.lag_seconds)
        self.group_status.labels(group=snapshot.group).set(SEVERITY.get(snapshot.status, 0))

    def exposition(self) -> bytes:
        """The text exposition, as /metrics serves it."""
        return generate_latest(self.registry)

    # --------------------------------------------------------------- serving
    def start_server(self, port: int, host: str = LOOPBACK) -> int:
        """Serve /metrics on ``host:port`` (port 0: a free one); returns the port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def start(self, port: int, bootstrap: str, *, host: str = LOOPBACK,
                    lag_interval_s: float = LAG_INTERVAL_S, topics: Iterable[str] | None = None) -> int:
        """Start the HTTP server and the lag refresher; returns the port."""
        port = self.start_server(port, host)
        self._collector = LagCollector(self, bootstrap, self.group, lag_interval_s, topics)
        self._collector.start()
        return port

    async def stop(self) -> None:
        if self._collector is not None:
            await self._collector.stop()
            self._collector = None
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()


class CpuWaitCollector:
    """``streamrec_cpu_wait_seconds_total{thread}``: how long the recommend stage's threads
    (``recommend``) and the event loop (``event_loop``) were ready to run but waited for a core
    (the kernel's run-queue delay), read from /proc at each scrape, so the worker does nothing
    for it per batch. Beside the busy counter it tells a stage that has too much to do (busy
    near 1: add workers) from a worker starved of CPU by other processes or a CPU limit (the
    wait grows while the work does not). Absent where /proc cannot tell (not Linux)."""

    NAME = "streamrec_cpu_wait_seconds"
    HELP = ("Seconds the worker's threads were ready to run but waited for a core (run-queue delay), by thread: "
            "recommend (the recommend stage) and event_loop; its rate is the share of time they were held back "
            "by other work on the machine")

    def describe(self):
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["thread"])

    def collect(self):
        waits = cpu_wait_seconds()
        if waits:
            family = CounterMetricFamily(self.NAME, self.HELP, labels=["thread"])
            for thread, seconds in waits.items():
                family.add_metric([thread], seconds)
            yield family


def observe_many(histogram, values) -> None:
    """``histogram.observe`` for every finite value, vectorised (one lock per bucket, not per value)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or bounds is None:  # prometheus_client internals moved: the slow way
        for v in values:
            histogram.observe(float(v))
        return
    # Buckets are stored non-cumulatively: value v counts in the first bucket with v <= bound.
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds))
    for i, c in enumerate(counts[:len(bounds)]):
        if c:
            buckets[i].inc(int(c))
    histogram._sum.inc(float(values.sum()))


class LagCollector:
    """An asyncio task that refreshes the lag gauges from :func:`stream.lag.lag_snapshot`."""

    def __init__(self, metrics: WorkerMetrics, bootstrap: str, group: str = DEFAULT_GROUP,
                 interval_s: float = LAG_INTERVAL_S, topics: Iterable[str] | None = None, window: int = 10):
        self.metrics = metrics
        self.bootstrap = bootstrap
        self.group = group
        self.interval_s = interval_s
        self.topics = list(topics) if topics is not None else None
        self.evaluator = LagEvaluator(window)
        self.last = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lag-collector")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh(self):
        snapshot = self.evaluator.update(await lag_snapshot(self.bootstrap, self.group, self.topics))
        self.metrics.set_lag(snapshot)
        self.last = snapshot
        return snapshot

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broker hiccup must not kill the worker's metrics
                log.warning("lag refresh failed: %r", exc)
            await asyncio.sleep(self.interval_s)
