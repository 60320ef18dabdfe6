"""Replay an interaction log into ``shop-events``, optionally scoring the lists that come back.

Readers turn every supported log format into contract events (stream/events.py):

* JSON lines (``.jsonl``, ``.ndjson``, ``.json``) and msgpack streams (``.msgpack``, ``.mpk``)
  of maps with ``user_id``, ``item_id``, ``type``, ``ts`` and optionally ``event_id``;
* CSV (``.csv``) whose header names those columns (``event_id`` optional, extra columns ignored);
* Parquet (``.parquet``, ``.pq``) with those columns; needs ``pyarrow`` (optional dependency);
* the sequence-per-line files of the reference data (``.txt``: ``user item item ...``, oldest
  first, no types, no timestamps). Each item becomes a ``purchase`` (the logs are Amazon
  reviews, and a review follows a purchase). Timestamps are synthetic and deterministic: the
  k-th item of a user is at ``SEQUENCE_EPOCH + k * SEQUENCE_STEP_S + jitter(user)`` with the
  jitter in ``[0, SEQUENCE_STEP_S)`` taken from a hash of the user id. Replayed in ts order,
  users interleave (everyone's first item, then everyone's second, ...) and a user's next
  event comes a whole step after the previous one, which is what a prequential evaluation
  needs, while each user's own order is the file's order.

``ts`` is seconds since the epoch (a number, or an ISO-8601 string / Parquet timestamp).
Event ids are the log's ``event_id`` where it has one, else a hash of (file name, position,
user, item, ts): a second replay of the same file sends the same ids, so the worker can drop
duplicates. A line that cannot become a valid event is a :class:`Rejected` with a reason; the
replay counts reasons, shows the first few, and sends the rest.

Events are sent in ts order (a stable sort: ties keep file order), keyed by user id, so a
user's events land on one partition in order. Pacing: ``speed=X`` keeps the log's
inter-arrival times divided by X, ``rate=N`` sends N events/s, ``max_speed`` sends as fast as
the broker takes them (the default when no pacing is given).

``evaluate=True`` is a prequential (test-then-train) evaluation: the ``recommendations`` topic
is followed while replaying, and just before each event is sent, the latest list published
for its user so far is scored against the event's item (HR@10, NDCG@10 over the events whose
user had a list). Lists need time to come back: at ``max_speed`` a user's next events are
usually sent before the list for the previous one exists, so the evaluation is pessimistic
(lower coverage, staler lists); pace the replay (``rate`` or ``speed``) to measure the model.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from stream.compat import ensure_topics, log_end_offsets, topic_partitions
from stream.events import (EVENTS_TOPIC, RECOMMENDATIONS_TOPIC, InvalidMessage, ShopEvent,
                           decode_recommendations, encode_event)
from model.data import EVENT_TYPES

log = logging.getLogger(__name__)

# Synthetic time for sequence-per-line files (see module doc).
SEQUENCE_EPOCH = 1_600_000_000.0   # 2020-09-13, any fixed instant works
SEQUENCE_STEP_S = 3600.0           # one event per user per hour
SEQUENCE_EVENT_TYPE = "purchase"

JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
MSGPACK_SUFFIXES = {".msgpack", ".mpk", ".msgpk"}
SEQUENCE_SUFFIXES = {".txt"}
REQUIRED_COLUMNS = ("user_id", "item_id", "type", "ts")

SHOWN_REJECTS = 5          # first rejected lines shown in the summary and the log
MAX_BATCHES_IN_FLIGHT = 16  # batches sent before waiting for their acknowledgements
PROGRESS_EVERY = 500       # events between progress bar updates
SLEEP_MIN_S = 0.002        # paced replays sleep only when this far ahead of schedule
LINGER_MS = 5
METADATA_TIMEOUT_S = 10.0
MAX_BATCH_BYTES = 256 * 1024
EVAL_K = 10
LIST_FETCH_WAIT_MS = 20    # lists are read as soon as they exist: a late list is a stale one
TOPIC_WAIT_S = 0.5         # poll interval while the recommendations topic does not exist yet

_EVENT_TYPES = frozenset(EVENT_TYPES)


class LogFormatError(ValueError):
    """The file as a whole cannot be read (unknown format, CSV without the needed columns)."""


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    event: ShopEvent
    where: str  # "file:line" (or "file:line#k" for the k-th item of a sequence line)


@dataclass(frozen=True, slots=True)
class Rejected:
    where: str
    reason: str       # a short fixed category, counted in the summary
    detail: str = ""  # the offending value or line, shortened


# ----------------------------------------------------------------------------- reading

def iter_log(path: str | Path, format: str | None = None) -> Iterator[ReplayRecord | Rejected]:
    """Every record of a log file, in file order, as a contract event or a rejection.

    ``format`` is one of jsonl, csv, parquet, msgpack, sequences; by default it follows the
    file's suffix.
    """
    path = Path(path)
    fmt = format or _format_of(path)
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
               "msgpack": _read_msgpack, "sequences": _read_sequences}
    if fmt not in readers:
        raise LogFormatError(f"unknown log format {fmt!r} (known: {', '.join(readers)})")
    return readers[fmt](path)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("csv", CSV_SUFFIXES),
                          ("parquet", PARQUET_SUFFIXES), ("msgpack", MSGPACK_SUFFIXES),
                          ("sequences", SEQUENCE_SUFFIXES)):
        if suffix in suffixes:
            return fmt
    raise LogFormatError(f"{path}: cannot tell the log format from the suffix {suffix!r}; "
                         "use .jsonl, .csv, .parquet, .msgpack or .txt")


def _short(value, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def stable_event_id(source: str, position: str, user_id: str, item_id: str, ts: float) -> str:
    """A deterministic id for a log record without one (same file, same line -> same id)."""
    key = "\x1f".join((source, position, user_id, item_id, repr(float(ts))))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _id_field(raw: dict, key: str) -> str | Rejected:
    value = raw.get(key)
    if value is None or value == "":
        return Rejected("", f"missing {key}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return Rejected("", f"bad {key}", _short(value))
    return str(value)


def _parse_ts(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, datetime):
        ts = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(value, str):
        try:
            ts = float(value)
        except ValueError:
            try:
                dt = datetime.fromisoformat(value.strip())
            except ValueError:
                return None
            ts = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    else:
        return None
    return ts if math.isfinite(ts) and ts >= 0 else None


def to_record(raw, source: str, position: str) -> ReplayRecord | Rejected:
    """Validate one raw map from a log; ``source``/``position`` name it (and seed its id)."""
    where = f"{source}:{position}"
    if not isinstance(raw, dict):
        return Rejected(where, "not a map", _short(raw))
    user = _id_field(raw, "user_id")
    item = _id_field(raw, "item_id")
    for value in (user, item):
        if isinstance(value, Rejected):
            return Rejected(where, value.reason, value.detail)
    etype = raw.get("type")
    if etype is None or etype == "":
        return Rejected(where, "missing type")
    if not isinstance(etype, str) or etype not in _EVENT_TYPES:
        return Rejected(where, "unknown type", _short(etype))
    if raw.get("ts") is None or raw.get("ts") == "":
        return Rejected(where, "missing ts")
    ts = _parse_ts(raw["ts"])
    if ts is None:
        return Rejected(where, "bad ts", _short(raw["ts"]))
    event_id = raw.get("event_id")
    if event_id is None or event_id == "":
        event_id = stable_event_id(source, position, user, item, ts)
    elif isinstance(event_id, bool) or not isinstance(event_id, (str, int)):
        return Rejected(where, "bad event_id", _short(event_id))
    # Every check of the contract (stream/events.py: event_from_dict) has been made above.
    return ReplayRecord(ShopEvent(str(event_id), user, item, etype, ts), where)


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                yield Rejected(f"{path.name}:{lineno}", "not JSON", _short(line))
                continue
            yield to_record(raw, path.name, str(lineno))


def _read_csv(path: Path):
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise LogFormatError(f"{path}: the CSV header lacks {', '.join(missing)} "
                                 f"(needs {', '.join(REQUIRED_COLUMNS)}, event_id optional)")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            lineno = reader.line_num
            if len(row) != len(header):
                yield Rejected(f"{path.name}:{lineno}", "wrong column count",
                               f"{len(row)} columns, header has {len(header)}")
                continue
            yield to_record(dict(zip(header, row)), path.name, str(lineno))


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LogFormatError("reading Parquet needs pyarrow: pip install 'streamrec[replay]' "
                             "(or pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    columns = [c for c in ("event_id", *REQUIRED_COLUMNS) if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(columns=columns or None):
        for raw in batch.to_pylist():
            row += 1
            yield to_record(raw, path.name, str(row))


def _read_msgpack(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        n = 0
        try:
            for raw in unpacker:
                n += 1
                yield to_record(raw, path.name, str(n))
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
            # A msgpack stream has no line breaks to resynchronise on: the rest is lost, said so.
            yield Rejected(f"{path.name}:{n + 1}", "malformed msgpack",
                           f"{type(exc).__name__} at byte {unpacker.tell()}; rest of file skipped")
            return
        if unpacker.tell() != size:  # the Unpacker stops silently on a truncated last object
            yield Rejected(f"{path.name}:{n + 1}", "truncated msgpack",
                           f"{size - unpacker.tell()} trailing bytes")


def _user_jitter(user: str) -> float:
    h = int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8).digest(), "big")
    return (h / 2**64) * SEQUENCE_STEP_S


def _read_sequences(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                yield Rejected(f"{path.name}:{lineno}", "no items", _short(line))
                continue
            user, jitter = parts[0], _user_jitter(parts[0])
            for k, item in enumerate(parts[1:]):  # split() parts are non-empty strings: valid ids
                ts = SEQUENCE_EPOCH + k * SEQUENCE_STEP_S + jitter
                position = f"{lineno}#{k}"
                event_id = stable_event_id(path.name, position, user, item, ts)
                yield ReplayRecord(ShopEvent(event_id, user, item, SEQUENCE_EVENT_TYPE, ts),
                                   f"{path.name}:{position}")


# ----------------------------------------------------------------------------- evaluation

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

    def on_list(self, value: bytes) -> None:
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


async def _follow_lists(bootstrap: str, topic: str, evaluation: Evaluation, ready: asyncio.Event) -> None:
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
                        evaluation.on_list(record.value)
        ready.set()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    evaluation.on_list(record.value)
    finally:
        ready.set()
        await consumer.stop()


# ----------------------------------------------------------------------------- replay

@dataclass
class ReplaySummary:
    sent: int
    rejected: Counter
    duration_s: float
    rate: float
    evaluation: Evaluation | None = None
    source: str = ""
    skipped_by_time: int = 0
    examples: list[Rejected] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {"source": self.source, "sent": self.sent, "rejected": dict(self.rejected),
               "duration_s": round(self.duration_s, 3), "rate": round(self.rate, 1),
               "skipped_by_time": self.skipped_by_time}
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation.as_dict()
        return out

    def __str__(self) -> str:
        lines = [f"replayed {self.sent:,} events from {self.source} in {self.duration_s:.2f} s "
                 f"({self.rate:,.0f} events/s)"]
        if self.skipped_by_time:
            lines.append(f"outside the time range: {self.skipped_by_time:,}")
        n_rejected = sum(self.rejected.values())
        if n_rejected:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in self.rejected.most_common())
            lines.append(f"rejected {n_rejected:,} records ({reasons}); first ones:")
            lines += [f"  {r.where}: {r.reason}" + (f" ({r.detail})" if r.detail else "")
                      for r in self.examples]
        if self.evaluation is not None:
            lines.append(f"evaluation: {self.evaluation}")
        return "\n".join(lines)


class LoadedLog(NamedTuple):
    events: list[ShopEvent]       # in ts order (stable: ties keep file order)
    rejected: Counter             # reason -> count
    examples: list[Rejected]      # the first few rejections
    skipped_by_time: int          # valid events outside [from_ts, to_ts)


def load_events(path: str | Path, from_ts: float | None = None, to_ts: float | None = None,
                format: str | None = None) -> LoadedLog:
    """A whole log, validated, filtered to ``from_ts <= ts < to_ts`` and sorted by ts."""
    events: list[ShopEvent] = []
    rejected: Counter = Counter()
    examples: list[Rejected] = []
    skipped = 0
    for rec in iter_log(path, format):
        if isinstance(rec, Rejected):
            rejected[rec.reason] += 1
            if len(examples) < SHOWN_REJECTS:
                examples.append(rec)
                log.warning("rejected %s: %s%s", rec.where, rec.reason, f" ({rec.detail})" if rec.detail else "")
            continue
        ts = rec.event.ts
        if (from_ts is not None and ts < from_ts) or (to_ts is not None and ts >= to_ts):
            skipped += 1
            continue
        events.append(rec.event)
    events.sort(key=lambda e: e.ts)  # stable: equal timestamps keep file order
    return LoadedLog(events, rejected, examples, skipped)


def _schedule(events: list[ShopEvent], speed: float | None, rate: float | None):
    """Seconds after the start at which each event is due; None sends as fast as possible."""
    if rate is not None:
        return lambda i: i / rate
    if speed is not None:
        ts0 = events[0].ts if events else 0.0
        return lambda i: (events[i].ts - ts0) / speed
    return None


async def replay(path: str | Path, bootstrap: str, topic: str = EVENTS_TOPIC, *,
                 speed: float | None = None, rate: float | None = None, max_speed: bool = False,
                 from_ts: float | None = None, to_ts: float | None = None, evaluate: bool = False,
                 progress: bool = True, format: str | None = None, partitions: int | None = None,
                 recommendations_topic: str = RECOMMENDATIONS_TOPIC) -> ReplaySummary:
    """Send a log's events to ``topic`` (keyed by user, in ts order) at the chosen pace.

    At most one of ``speed``, ``rate`` and ``max_speed``; none means ``max_speed``.
    ``partitions`` creates the topic with that many partitions if it does not exist yet (Tansu
    would otherwise auto-create it with 4).
    """
    if (speed is not None) + (rate is not None) + bool(max_speed) > 1:
        raise ValueError("choose one pace: speed, rate or max_speed")
    if (speed is not None and speed <= 0) or (rate is not None and rate <= 0):
        raise ValueError("speed and rate must be positive")
    t_read = time.perf_counter()
    events, rejected, examples, skipped = await asyncio.to_thread(load_events, path, from_ts, to_ts, format)
    log.info("read %d events from %s in %.1f s", len(events), path, time.perf_counter() - t_read)
    due = _schedule(events, speed, rate)
    if partitions:
        await ensure_topics(bootstrap, {topic: partitions})

    evaluation = Evaluation() if evaluate else None
    follower = None
    if evaluation is not None:
        ready = asyncio.Event()
        follower = asyncio.create_task(_follow_lists(bootstrap, recommendations_topic, evaluation, ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([follower, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if follower.done():
            follower.result()  # raises what stopped it

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=LINGER_MS,
                                max_batch_size=MAX_BATCH_BYTES)
    await producer.start()
    bar = _progress_bar(len(events), Path(path).name, progress)
    loop = asyncio.get_running_loop()
    shown = 0
    t0 = loop.time()
    try:
        batcher = await _Batcher.open(producer, topic)
        for i, event in enumerate(events):
            if due is not None:
                ahead = t0 + due(i) - loop.time()
                if ahead > SLEEP_MIN_S:
                    await batcher.flush()  # what is due now leaves now
                    bar.update(i - shown)
                    shown = i
                    await asyncio.sleep(ahead)
            if evaluation is not None:
                evaluation.score(event)
            await batcher.add(event.user_id.encode(), encode_event(event))
            if i - shown >= PROGRESS_EVERY:
                bar.update(i - shown)
                shown = i
        await batcher.flush()
        await batcher.delivered()
        bar.update(len(events) - shown)
    finally:
        bar.close()
        await producer.stop()
        if follower is not None:
            if follower.done() and not follower.cancelled() and follower.exception() is not None:
                log.warning("following %s failed, the evaluation is partial: %r",
                            recommendations_topic, follower.exception())
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    duration = loop.time() - t0
    return ReplaySummary(sent=len(events), rejected=rejected, duration_s=duration,
                         rate=len(events) / duration if duration > 0 else 0.0,
                         evaluation=evaluation, source=str(path), skipped_by_time=skipped,
                         examples=examples)


class _Batcher:
    """Records into per-partition batches (aiokafka's ``create_batch``/``send_batch``).

    About five times fewer Python calls per event than ``producer.send``. Records go to the
    partition Kafka's default partitioner picks for the key (murmur2, as the Java client), so
    a user's events share one partition with any other producer's; batches of one partition
    are queued in order, and the producer keeps one request in flight per partition.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: list[int]):
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self._partition_of: dict[bytes, int] = {}
        self._open: dict[int, object] = {}
        self._futures: list[asyncio.Future] = []

    @classmethod
    async def open(cls, producer: AIOKafkaProducer, topic: str) -> "_Batcher":
        loop = asyncio.get_running_loop()
        deadline = loop.time() + METADATA_TIMEOUT_S
        # A topic created a moment ago can show up in metadata before its partitions do.
        while not (partitions := await producer.partitions_for(topic)):
            if loop.time() > deadline:
                raise TimeoutError(f"topic {topic!r} has no partitions after {METADATA_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
            await producer.client.force_metadata_update()
        return cls(producer, topic, sorted(partitions))

    def partition(self, key: bytes) -> int:
        p = self._partition_of.get(key)
        if p is None:
            p = self._partition_of[key] = self.partitions[(murmur2(key) & 0x7FFFFFFF) % len(self.partitions)]
        return p

    async def add(self, key: bytes, value: bytes) -> None:
        p = self.partition(key)
        batch = self._open.get(p)
        if batch is None:
            batch = self._open[p] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it, start another
            await self._send(p)
            batch = self._open[p] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit in a batch")

    async def _send(self, p: int) -> None:
        batch = self._open.pop(p)
        self._futures.append(await self.producer.send_batch(batch, self.topic, partition=p))
        if len(self._futures) >= MAX_BATCHES_IN_FLIGHT:
            await self.delivered()

    async def flush(self) -> None:
        for p in list(self._open):
            await self._send(p)

    async def delivered(self) -> None:
        """Wait until every batch sent so far is acknowledged (raises a delivery error)."""
        futures, self._futures = self._futures, []
        await asyncio.gather(*futures)


def _progress_bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"replay {name}", unit="ev", unit_scale=True,
                disable=not enabled, smoothing=0.1, dynamic_ncols=True)
