"""Where brokers differ, and Faust's defects: handled here and nowhere else.

streamrec runs on Apache Kafka (what shops run) and on the embedded Tansu broker (the demo's
default). Each difference below was measured; ``tests/test_compat.py`` shows on both brokers
whether the problem exists, and each workaround applies only where it is needed.

Embedded broker (Tansu) only -- :data:`TANSU`'s profile:

* ``ListOffsets(latest)`` answers the base offset of the newest record batch + 1, not the high
  watermark, so ``end_offsets()`` is short by up to a batch (lag, and Faust's table recovery
  would stop before the changelog's tail). The high watermark a Fetch response carries is
  right: :func:`log_end_offsets` reads it from a one-shot fetch there. Kafka's ListOffsets is
  exact and cheaper, so Kafka uses it.
* Group joins wait ``session_timeout / 2``: the worker uses 6 s sessions on Tansu (a start
  takes a few seconds instead of ~33). On Kafka a join does not wait, and 10 s sessions (3 s
  heartbeats) detect a dead worker without evicting a busy one.
* A parked Fetch (long poll) is not answered when new records arrive: under steady traffic
  records wait up to about half of ``fetch_max_wait_ms`` (Faust hard-codes 1500 ms: p50 400 ms).
  :func:`patch_faust_fetch_wait` caps the wait at 50 ms there. Kafka answers at once.
* No transactions and no idempotent producers (``InitProducerId`` fails): exactly-once is
  refused and producers are plain ``acks=all`` ones (:func:`probe_transactions`).
* Unknown topics are auto-created with 4 partitions when a client asks for their metadata.
  :func:`ensure_topics` creates every topic explicitly, on both brokers, and never asks
  for the metadata of a topic that does not exist.

Apache Kafka only:

* Exactly-once writes transaction markers into the changelog. A ``read_committed`` consumer
  never sees them, so Faust's recovery, which waits for the offset before the high watermark,
  would wait forever (or, in Faust's own exactly-once mode, ~10 s per recovery).
  :func:`recovery_end_offsets` gives it the offset after the last committed data record.
  Faust's consumer reads ``read_committed`` on Kafka (:func:`patch_faust_consumer`), so state
  and events from aborted transactions are never seen.

Faust 0.15, on any broker:

* When table recovery completes, Faust resumes the stream partitions *before* it seeks them to
  their committed offsets and clears its queues. Records fetched in between are thrown away,
  and their re-fetched copies are dropped as already read: a worker starting with a backlog
  lost hundreds of events (the kill -9 test). :func:`patch_faust_resume_after_seek` resumes
  those partitions only after the seek and the clearing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

log = logging.getLogger(__name__)

TANSU, KAFKA = "tansu", "kafka"
HIGH_WATERMARK_TIMEOUT_S = 10.0
TOPIC_READY_TIMEOUT_S = 30.0
RETRY_TIMEOUT_S = 15.0
FETCH_MAX_WAIT_MS = 50                  # Tansu: parked fetches are answered late
RECOVERY_SCAN_START = 16                # records read back from the stable end to find the last data record


@dataclass(frozen=True)
class BrokerProfile:
    """What a broker kind needs from streamrec (see the module doc)."""

    kind: str
    group_settings: dict = field(default_factory=dict)   # Faust broker_* settings (seconds)
    fetch_max_wait_ms: int | None = None                 # cap on Faust's parked fetch; None: Faust's
    exact_list_offsets: bool = True                      # ListOffsets(latest) is the high watermark
    read_committed: bool = True                          # Faust's consumer skips aborted transactions
    idempotent_producers: bool = True                    # InitProducerId answered (Tansu: refused)


PROFILES = {
    TANSU: BrokerProfile(TANSU, dict(broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
                                     broker_rebalance_timeout=6.0),
                         fetch_max_wait_ms=FETCH_MAX_WAIT_MS, exact_list_offsets=False, read_committed=False,
                         idempotent_producers=False),
    KAFKA: BrokerProfile(KAFKA, dict(broker_session_timeout=10.0, broker_heartbeat_interval=3.0)),
}

async def broker_profile(bootstrap: str) -> BrokerProfile:
    """The profile of the broker at ``bootstrap`` (Tansu names its cluster ``tansu_cluster``)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        cluster_id = (await admin.describe_cluster()).get("cluster_id") or ""
    finally:
        await admin.close()
    return PROFILES[TANSU if cluster_id.startswith("tansu") else KAFKA]


# ----------------------------------------------------------------------------- capabilities

async def broker_count(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


async def probe_transactions(bootstrap: str, timeout: float = 15.0) -> str | None:
    """None when the broker runs transactions; else why not (``InitProducerId`` fails on Tansu)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="streamrec-probe-transactions")
    try:
        await asyncio.wait_for(producer.start(), timeout)
        await producer.begin_transaction()
        await producer.abort_transaction()
        return None
    except (KafkaError, asyncio.TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    finally:
        await producer.stop()


# ----------------------------------------------------------------------------- offsets

async def log_end_offsets(bootstrap: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """True log-end offsets (high watermarks): ListOffsets on Kafka, a Fetch on Tansu."""
    tps = list(tps)
    if not tps:
        return {}
    if (await broker_profile(bootstrap)).exact_list_offsets:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            return await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
    return await high_watermarks(bootstrap, tps)


async def high_watermarks(bootstrap: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """High watermarks taken from Fetch responses rather than ListOffsets (Tansu)."""
    tps = list(tps)
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                group_id=None, fetch_max_bytes=1024, max_partition_fetch_bytes=1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        # ListOffsets(latest) is a lower bound of the high watermark: fetching from there
        # is cheap (at most the last batch) and the response carries the true watermark.
        lower = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(lower[tp] - 1, 0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HIGH_WATERMARK_TIMEOUT_S
        while any(consumer.highwater(tp) is None for tp in tps):
            if loop.time() > deadline:
                missing = [tp for tp in tps if consumer.highwater(tp) is None]
                raise TimeoutError(f"no fetch response carried a high watermark for {missing}")
            await consumer.getmany(*tps, timeout_ms=200, max_records=1)
        return {tp: consumer.highwater(tp) for tp in tps}
    finally:
        await consumer.stop()


async def recovery_end_offsets(bootstrap: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """For a ``read_committed`` reader: the offset after the last committed data record.

    Below the last stable offset a log can end in transaction markers (or aborted records),
    which such a reader never receives; this reads back from the stable end, widening the
    window until it meets a data record.
    """
    tps = list(tps)
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        stable = await consumer.end_offsets(tps)   # the last stable offset under read_committed
        consumer.assign(tps)
        out = {}
        for tp in tps:
            out[tp] = await _last_data_offset(consumer, tp, stable[tp]) + 1
            consumer.pause(tp)
        return out
    finally:
        await consumer.stop()


async def _last_data_offset(consumer: AIOKafkaConsumer, tp: TopicPartition, stable: int) -> int:
    window, loop = RECOVERY_SCAN_START, asyncio.get_running_loop()
    while stable > 0:
        start = max(0, stable - window)
        consumer.seek(tp, start)
        last, deadline = -1, loop.time() + HIGH_WATERMARK_TIMEOUT_S
        while await consumer.position(tp) < stable:
            if loop.time() > deadline:
                raise TimeoutError(f"could not read {tp} up to its stable offset {stable}")
            for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                if record.offset < stable:
                    last = max(last, record.offset)
        if last >= 0 or start == 0:
            return last
        window *= 8
    return -1


async def retrying(call, timeout: float = RETRY_TIMEOUT_S):
    """``await call()``, again while it fails with a retriable error (Kafka creates its offsets
    topic, and so a group coordinator, on the first use of any group)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return await call()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


async def committed_offsets(bootstrap: str, group: str,
                            tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The group's committed offsets, asked for with explicit partitions (None: no commit)."""
    tps = list(tps)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        result = await retrying(lambda: admin.list_consumer_group_offsets(group, partitions=tps))
    finally:
        await admin.close()
    out: dict[TopicPartition, int | None] = {tp: None for tp in tps}
    for tp, meta in result.items():
        out[tp] = meta.offset if meta.offset is not None and meta.offset >= 0 else None
    return out


# ----------------------------------------------------------------------------- topics

async def topic_partitions(bootstrap: str, names: Iterable[str] | None = None) -> dict[str, list[int]]:
    """Partition ids of the existing topics among ``names`` (default: all topics).

    Never asks for a missing topic's metadata (Tansu would create it), and reads the answer
    from the admin client: a fresh consumer's ``partitions_for_topic`` can still be empty.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = sorted(existing if names is None else existing & set(names))
        described = await admin.describe_topics(wanted) if wanted else []
    finally:
        await admin.close()
    return {t["topic"]: sorted(p["partition"] for p in t["partitions"]) for t in described}


class TopicMismatch(ValueError):
    """An existing topic cannot be used as it is (wrong partition count)."""


async def ensure_topics(bootstrap: str, topics: Mapping[str, int], configs: Mapping[str, dict] | None = None,
                        *, exact: Iterable[str] = (), replication: int | None = None,
                        timeout: float = TOPIC_READY_TIMEOUT_S) -> dict[str, int]:
    """Create missing topics and wait until every one has a leader for each partition.

    Returns each topic's partition count. Topics in ``exact`` must already have the count
    asked for (:class:`TopicMismatch` otherwise); others are used as they are. Replication
    defaults to min(3, brokers). Only existing topics' metadata is ever asked for.
    """
    exact = set(exact)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        if replication is None:
            replication = min(3, len((await admin.describe_cluster())["brokers"]))
        new = [NewTopic(name, partitions, replication, topic_configs=(configs or {}).get(name, {}))
               for name, partitions in topics.items() if name not in existing]
        if new:
            response = await admin.create_topics(new)
            for name, code, *message in response.topic_errors:
                error = for_code(code)
                if code and error.__name__ != "TopicAlreadyExistsError":
                    raise error(f"creating topic {name}: {message[0] if message else ''}")
            log.info("created topics %s", ", ".join(f"{t.name}({t.num_partitions}x{replication})" for t in new))
        counts = await _wait_for_leaders(admin, list(topics), timeout)
    finally:
        await admin.close()
    for name in exact:
        if counts[name] != topics[name]:
            raise TopicMismatch(f"topic {name} has {counts[name]} partitions, {topics[name]} expected")
    return counts


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        described = {t["topic"]: t for t in await admin.describe_topics(names)}
        ready = {name: len(t["partitions"]) for name, t in described.items()
                 if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])}
        if len(ready) == len(names):
            return ready
        if time.monotonic() > deadline:
            missing = sorted(set(names) - set(ready))
            raise TimeoutError(f"topics {missing} have no leader after {timeout:.0f}s")
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- Faust patches

def patch_faust(profile: BrokerProfile) -> None:
    """Apply what ``profile`` needs to Faust's consumer and recovery (idempotent)."""
    patch_faust_consumer(profile)
    patch_faust_recovery(profile)
    patch_faust_resume_after_seek()


def patch_faust_consumer(profile: BrokerProfile) -> None:
    """Faust builds its consumer ``read_uncommitted`` with ``fetch_max_wait_ms=1500``; per profile,
    read committed records only (Kafka) and cap the parked fetch (Tansu)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread, "_streamrec_original_create", None)
    if original is None:
        original = AIOKafkaConsumerThread._create_worker_consumer
        AIOKafkaConsumerThread._streamrec_original_create = original

    def _create_worker_consumer(self, transport):
        consumer = original(self, transport)
        # both are read when the consumer starts its fetcher
        if profile.fetch_max_wait_ms is not None:
            consumer._fetch_max_wait_ms = profile.fetch_max_wait_ms
        if profile.read_committed:
            consumer._isolation_level = "read_committed"
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def patch_faust_recovery(profile: BrokerProfile) -> None:
    """Make Faust's table recovery read changelogs to their true end (see module doc)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    ends = recovery_end_offsets if profile.read_committed else high_watermarks

    async def _highwaters(self, partitions):
        consumer = self._ensure_consumer()
        bootstrap = ",".join(f"{h}:{p}" for h, p in _bootstrap_of(consumer))
        return await ends(bootstrap, [TopicPartition(tp.topic, tp.partition) for tp in partitions])

    AIOKafkaConsumerThread._highwaters = _highwaters


def _bootstrap_of(consumer: AIOKafkaConsumer) -> list[tuple[str, int]]:
    servers = consumer._client._bootstrap_servers
    if isinstance(servers, str):
        servers = servers.split(",")
    out = []
    for server in servers:
        host, _, port = server.rpartition(":")
        out.append((host, int(port)))
    return out


def patch_faust_resume_after_seek() -> None:
    """Resume stream partitions after recovery's seek and queue clearing (see module doc)."""
    from faust.tables.recovery import Recovery

    if getattr(Recovery, "_streamrec_resume_after_seek", False):
        return
    original = Recovery.on_recovery_completed

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        consumer = self.app.consumer
        held: set = set()
        consumer.resume_partitions = held.update  # instance attribute: shadows the method
        try:
            await original(self, generation_id)
        finally:  # the same end state as Faust's, also when a new rebalance interrupts it
            del consumer.resume_partitions
            if held:
                consumer.resume_partitions(held)

    Recovery.on_recovery_completed = on_recovery_completed
    Recovery._streamrec_resume_after_seek = True
