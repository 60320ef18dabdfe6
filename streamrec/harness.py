"""Drive a running worker from outside, as a shop would: produce events, read the lists.

Shared by the demo, the end-to-end benchmark and the integration tests, so all three
exercise the same path: a separate worker process, a real broker, plain aiokafka clients.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Collection, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.compat import FETCH_MAX_WAIT_MS, broker_profile, ensure_topics, topic_partitions
from stream.events import RECOMMENDATIONS_TOPIC, decode_recommendations, encode_event
from stream.replay import MAX_BATCH_BYTES, RecordBatcher

PRODUCE_CHUNK = 2000      # records between waits for the broker's acknowledgements
PACE_TICKS_PER_S = 50     # a paced load's sends per second


def start_worker(bootstrap: str, model: Path | None, data_dir: Path, *, group: str = "streamrec",
                 partitions: int = 4, log_path: Path | None = None, extra: Iterable[str] = (),
                 command: list[str] | None = None, source: Path | None = None,
                 cpus: Collection[int] | None = None) -> subprocess.Popen:
    """``streamrec worker`` as a subprocess (its own session, so it can be stopped cleanly).

    ``command`` replaces ``python -m streamrec.cli worker`` (a baseline taking the same
    flags); ``source`` runs the code of another checkout (an earlier commit) instead of this one;
    ``model`` None leaves the models to ``extra`` (``--variant``); ``cpus`` pins the process to
    those CPUs from its start (one worker on 2 cores of a larger machine; it sizes its threads
    by them).
    """
    cmd = [*(command or [sys.executable, "-m", "streamrec.cli", "worker"]), "--broker", bootstrap,
           *(["--model", str(model)] if model is not None else []), "--group", group,
           "--partitions", str(partitions), "--data-dir", str(data_dir), *extra]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=str(source) if source is not None else None, preexec_fn=pin)


def parse_cpus(text: str) -> list[int]:
    """A CPU list as taskset writes it ("0,1", "0-3,8") -> sorted CPU numbers of this machine."""
    cpus = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"a CPU list is numbers and ranges, comma separated (0,1 or 0-3), not {text!r}") from None
    available = os.cpu_count() or 1
    if not cpus or min(cpus) < 0 or max(cpus) >= available:
        raise ValueError(f"CPUs {text!r}: this machine has CPUs 0-{available - 1}")
    return sorted(cpus)


def worker_flags(**options) -> list[str]:
    """``streamrec worker`` flags for the options given, by name (``max_batch`` ->
    ``--max-batch``); None leaves that one to the worker's own default."""
    return [arg for name, value in options.items() if value is not None
            for arg in (f"--{name.replace('_', '-')}", str(value))]


def stop_worker(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def wait_for_worker_ready(bootstrap: str, log_path: Path, timeout: float = 90.0,
                                limit: float = 900.0) -> None:
    """Faust prints "Worker ready" once partitions are assigned and tables recovered. A large
    state recovers for minutes (1M users: ~5k changelog records/s), printing progress, so the
    wait ends after ``timeout`` seconds without a new log line (or ``limit`` in all)."""
    started = last_change = time.monotonic()
    size = -1
    while time.monotonic() - last_change < timeout and time.monotonic() - started < limit:
        if log_path.exists():
            data = log_path.read_bytes()
            if b"Worker ready" in data:
                return
            if len(data) != size:
                size, last_change = len(data), time.monotonic()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"worker not ready after {time.monotonic() - started:.0f}s; see {log_path}")


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
                  rate: float | None = None, on_sent: Callable[[int], None] | None = None,
                  acks: int | str = 1) -> int:
    """Send (key, value) records, paced at ``rate`` per second when given; returns the count.

    A paced load goes out in ticks of 1/``PACE_TICKS_PER_S`` s, each tick's records as record
    batches sent at once (``RecordBatcher``): the load generator shares its machine with the
    worker and the broker in ``bench e2e``, and ``producer.send`` per record cost it 36.5-36.8 µs
    of CPU per event at 5,000/s against 17.1 (``benchmarks/load_generator.py``, 2026-12-06).
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=acks, max_batch_size=MAX_BATCH_BYTES)
    await producer.start()
    sent = 0
    tick = max(1, int(rate / PACE_TICKS_PER_S)) if rate else 0
    started = time.monotonic()
    try:
        batcher = await RecordBatcher.open(producer, topic)
        for key, value in records:
            await batcher.add(key, value)
            sent += 1
            if tick and sent % tick == 0:
                await batcher.flush()   # what is due now leaves now
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if sent % PRODUCE_CHUNK == 0:
                await batcher.flush()
                await batcher.delivered()
                if on_sent:
                    on_sent(sent)
        await batcher.flush()
        await batcher.delivered()
        if on_sent:
            on_sent(sent)
    finally:
        await producer.stop()
    return sent


def event_records(events: Iterable[dict], now_ts: bool = False):
    """Contract events as (key, value); ``now_ts`` stamps each with the send time (latency runs)."""
    for e in events:
        if now_ts:
            e = {**e, "ts": time.time()}
        yield e["user_id"].encode(), encode_event(e)


async def read_topic(bootstrap: str, topic: str, read_committed: bool = False, idle_polls: int = 5) -> list:
    """Every record of ``topic`` from the beginning, until ``idle_polls`` polls bring nothing new."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_bytes=1 << 24, max_partition_fetch_bytes=1 << 23,
                                isolation_level="read_committed" if read_committed else "read_uncommitted")
    await consumer.start()
    out, idle = [], 0
    try:
        while idle < idle_polls:
            batches = await consumer.getmany(timeout_ms=250)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


class ListCollector:
    """Reads ``recommendations`` from the beginning and keeps each user's latest list.

    ``read_committed`` sees only lists of committed transactions (exactly-once workers);
    ``repeats()`` counts (user, event id) lists seen more than once.
    """

    def __init__(self, bootstrap: str, topic: str = RECOMMENDATIONS_TOPIC, read_committed: bool = False):
        self.bootstrap, self.topic = bootstrap, topic
        self.isolation_level = "read_committed" if read_committed else "read_uncommitted"
        self.latest: dict[str, dict] = {}
        self.listed: set[str] = set()   # every event id a list was published for
        self.seen: Counter[tuple[str, str]] = Counter()   # (user, event id) -> lists
        self.tombstones: set[str] = set()                 # users whose list was withdrawn
        self.messages = 0
        self.latencies: list[float] = []          # produced_ts - event ts (the worker's side)
        self.visible_latencies: list[float] = []  # arrival here - event ts (what a shop sees)
        self.produced_at: list[float] = []        # produced_ts of each list, beside its latency
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                          isolation_level=self.isolation_level)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        # the worker creates the topic: until then there is nothing to read (and asking for a
        # missing topic by name would auto-create it on Tansu)
        while not (partitions := (await topic_partitions(self.bootstrap, [self.topic])).get(self.topic)):
            await asyncio.sleep(0.2)
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            arrived = time.time()
            for records in batches.values():
                for r in records:
                    if r.value is None:   # a tombstone: the user was erased
                        self.latest.pop(r.key.decode(), None)
                        self.tombstones.add(r.key.decode())
                        continue
                    msg = decode_recommendations(r.value)
                    self.latest[msg["user_id"]] = msg
                    self.listed.add(msg["event_id"])
                    self.seen[msg["user_id"], msg["event_id"]] += 1
                    self.latencies.append(msg["produced_ts"] - msg["event_ts"])
                    self.produced_at.append(msg["produced_ts"])
                    self.visible_latencies.append(arrived - msg["event_ts"])
                    self.messages += 1

    def repeats(self, users=None) -> int:
        """Lists beyond the first for the same (user, event), for ``users`` (default: all)."""
        return sum(n - 1 for (user, _), n in self.seen.items() if n > 1 and (users is None or user in users))

    async def wait_for(self, predicate: Callable[["ListCollector"], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            if self._task is not None and self._task.done():
                self._task.result()  # the reader died: raise its error rather than time out
                raise RuntimeError("the list collector stopped reading")
            await asyncio.sleep(0.1)
        return predicate(self)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer:
            await self._consumer.stop()


WARMUP_TOPICS = ("streamrec-warmup-events", "streamrec-warmup-lists", "streamrec-warmup-state")
WARMUP_RATE = 5000.0   # events/s: requests compile the broker's paths, bytes only fill its disk


async def warm_up_broker(bootstrap: str, seconds: float, partitions: int = 4, rate: float = WARMUP_RATE) -> int:
    """Relay records through the broker for ``seconds``, on topics of its own, before anything
    is measured; returns the records relayed.

    A fresh Apache Kafka compiles its request paths while it serves them: on the scale workload
    its JIT compiler threads took ~0.5 s of CPU in each of the first four phases of 20k events
    (as much as the rest of the broker), cores that a worker in production, beside a broker that
    has long done so, keeps. The relay does what a workload does: a producer of events, a
    consumer group that fetches them, writes a list and a state row for each (``acks=all``,
    idempotent where the broker has idempotent producers, the state to a compacted topic) and
    commits, and a reader of the lists, at ``rate`` events/s of small records (at full speed
    its gigabytes still went to disk in the measured phases). Its topics are deleted after.
    It is not all of it: the JIT throws away part of the relay's compiled code when the worker's
    clients come (request kinds and types it had not seen) and compiles it again in the first
    measured phases (docs/performance.md, "The machine's other tenants").
    """
    events, lists, states = WARMUP_TOPICS
    await ensure_topics(bootstrap, {events: partitions, lists: partitions, states: partitions},
                        {states: {"cleanup.policy": "compact"}})
    profile = await broker_profile(bootstrap)
    writer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                              enable_idempotence=profile.idempotent_producers, max_batch_size=1 << 20)
    relay = AIOKafkaConsumer(events, bootstrap_servers=bootstrap, group_id="streamrec-warmup",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    reader = AIOKafkaConsumer(lists, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                              enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    started: list = []
    deadline, relayed = 0.0, 0

    def fed():   # paced by ``produce``, until the deadline
        event = bytes(100)
        for n in itertools.count():
            if time.monotonic() >= deadline:
                return
            yield b"w%d" % (n % 10_000), event

    async def write():
        nonlocal relayed
        listed, state = bytes(200), bytes(300)
        while time.monotonic() < deadline:
            batches = await relay.getmany(timeout_ms=100)
            keys = [r.key for records in batches.values() for r in records]
            sends = [await writer.send(topic, value, key=key) for key in keys
                     for topic, value in ((lists, listed), (states, state))]
            await asyncio.gather(*sends)
            if keys:
                await relay.commit()
            relayed += len(keys)

    async def read():
        while time.monotonic() < deadline:
            await reader.getmany(timeout_ms=100)

    try:
        for client in (writer, relay, reader):
            await client.start()
            started.append(client)
        deadline = time.monotonic() + seconds
        await asyncio.gather(produce(bootstrap, events, fed(), rate=rate), write(), read())
    finally:   # whatever failed, the clients that started stop and the topics go
        for client in started:
            await client.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics(list(WARMUP_TOPICS))
        finally:
            await admin.close()
    return relayed
