"""Consumer lag of the worker's group, per partition, and a Burrow-style health status.

A snapshot reads, per partition: the group's committed offset, the true log-end offset (the
high watermark from a Fetch response, see stream/compat.py), lag = end - committed (never
negative) and lag_seconds, the age of the oldest record not yet consumed (0 without lag). A
partition the group never committed counts from the log start.

Status follows Burrow's evaluation rules (github.com/linkedin/Burrow/wiki/Consumer-Lag-Evaluation-Rules)
over a sliding window of snapshots, checked in this order, worst first:

* OK      when the lag is 0 now or anywhere in the window (the consumer caught up);
* REWIND  when the committed offset went backwards between two snapshots;
* STOP    when the consumer stopped committing: the last commit is older than the span of
          commits in the window (a commit's time is when a snapshot first saw that offset);
          only while the group has no active member, since a live member may be committing
          the same offset again, which an outside reader cannot see;
* STALL   when the committed offset did not move across the whole window (members active);
* WARN    when offsets move but the lag never decreased across the window (falling behind);
* OK      otherwise.

STOP, STALL and WARN need a full window; until then a lagging partition is OK. The group's
status is its worst partition's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.compat import committed_offsets, log_end_offsets, retrying, topic_partitions
from stream.events import EVENTS_TOPIC

log = logging.getLogger(__name__)

DEFAULT_GROUP = "streamrec"
DEFAULT_WINDOW = 10
OLDEST_RECORD_TIMEOUT_S = 3.0

OK, WARN, STALL, STOP, REWIND = "OK", "WARN", "STALL", "STOP", "REWIND"
SEVERITY = {OK: 0, WARN: 1, STALL: 2, STOP: 3, REWIND: 4}
STATUS_STYLE = {OK: "green", WARN: "yellow", STALL: "red", STOP: "bold red", REWIND: "magenta"}


@dataclass
class PartitionLag:
    topic: str
    partition: int
    committed: int        # the log start offset where the group has no commit
    end: int
    lag: int
    lag_seconds: float = 0.0
    status: str = OK
    has_commit: bool = True


@dataclass
class LagSnapshot:
    group: str
    partitions: list[PartitionLag]
    taken_at: float = field(default_factory=time.time)
    members: int | None = None    # active members of the group; None: unknown
    status: str = OK

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_dict(self) -> dict:
        keys = ("topic", "partition", "committed", "end", "lag", "lag_seconds", "status")
        return {"group": self.group, "status": self.status, "total_lag": self.total_lag,
                "partitions": [{k: v for k, v in asdict(p).items() if k in keys} for p in self.partitions]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ----------------------------------------------------------------------------- reading

async def lag_snapshot(bootstrap: str, group: str = DEFAULT_GROUP,
                       topics: Iterable[str] | None = None) -> LagSnapshot:
    """The group's lag on every partition of ``topics``.

    ``topics`` defaults to the topics the group has committed offsets for, else ``shop-events``.
    Topics that do not exist are left out (asking for them could auto-create them).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = {t: [TopicPartition(t, p) for p in ids] for t, ids in (await topic_partitions(bootstrap)).items()}
        existing = set(parts)
        committed: dict[TopicPartition, int | None] = {}
        if topics is None:
            candidates = [tp for t in sorted(existing) if not t.startswith("__") for tp in parts[t]]
            committed = await committed_offsets(bootstrap, group, candidates) if candidates else {}
            topics = sorted({tp.topic for tp, off in committed.items() if off is not None}) or [EVENTS_TOPIC]
        tps = [tp for t in topics if t in existing for tp in parts[t]]
        if not tps:
            return LagSnapshot(group, [], members=await group_members(bootstrap, group))
        if not all(tp in committed for tp in tps):
            committed = await committed_offsets(bootstrap, group, tps)
        ends = await log_end_offsets(bootstrap, tps)
        starts = await consumer.beginning_offsets(tps)
        rows = []
        for tp in tps:
            has_commit = committed[tp] is not None
            position = committed[tp] if has_commit else starts[tp]
            rows.append(PartitionLag(tp.topic, tp.partition, position, ends[tp],
                                     max(0, ends[tp] - position), has_commit=has_commit))
        await _fill_lag_seconds(consumer, rows)
        members = await group_members(bootstrap, group)
    finally:
        await consumer.stop()
    return LagSnapshot(group, rows, members=members)


async def _fill_lag_seconds(consumer: AIOKafkaConsumer, rows: list[PartitionLag]) -> None:
    """lag_seconds = now - timestamp of the record at the committed offset (lagging partitions)."""
    lagging = {TopicPartition(r.topic, r.partition): r for r in rows if r.lag > 0}
    if not lagging:
        return
    consumer.assign(list(lagging))
    for tp, row in lagging.items():
        consumer.seek(tp, row.committed)
    waiting = set(lagging)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OLDEST_RECORD_TIMEOUT_S
    while waiting and loop.time() < deadline:
        batches = await consumer.getmany(*waiting, timeout_ms=200, max_records=len(waiting))
        now = time.time()
        for tp, records in batches.items():
            if records and tp in waiting:
                lagging[tp].lag_seconds = max(0.0, now - records[0].timestamp / 1000.0)
                waiting.discard(tp)
                consumer.pause(tp)
    if waiting:
        log.warning("no record fetched at the committed offset of %s; lag_seconds left at 0",
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(waiting)))


async def group_members(bootstrap: str, group: str) -> int | None:
    """How many members the group has now (0: nobody consumes); None when the broker won't say."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await retrying(lambda: admin.describe_consumer_groups([group]))
        for response in responses:
            for error_code, group_id, _state, _ptype, _proto, members, *_ in response.groups:
                if group_id == group and error_code == 0:
                    return len(members)
    except Exception as exc:  # describing is a nicety; lag is still right without it
        log.debug("describe group %s failed: %r", group, exc)
    finally:
        await admin.close()
    return None


# ----------------------------------------------------------------------------- evaluation

@dataclass(frozen=True, slots=True)
class _Seen:
    taken_at: float
    committed: int
    lag: int
    commit_seen_at: float  # when a snapshot first saw this committed offset


class LagEvaluator:
    """Burrow's rules over the last ``window`` snapshots of each partition (see module doc)."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        if window < 2:
            raise ValueError("the window needs at least 2 snapshots")
        self.window = window
        self._history: dict[tuple[str, int], deque[_Seen]] = {}

    def update(self, snapshot: LagSnapshot) -> LagSnapshot:
        """Add a snapshot and set its partitions' and group's status (returns it)."""
        worst = OK
        for p in snapshot.partitions:
            history = self._history.setdefault((p.topic, p.partition), deque(maxlen=self.window))
            prev = history[-1] if history else None
            seen_at = prev.commit_seen_at if prev and prev.committed == p.committed else snapshot.taken_at
            history.append(_Seen(snapshot.taken_at, p.committed, p.lag, seen_at))
            p.status = self.partition_status(history, snapshot.members)
            if SEVERITY[p.status] > SEVERITY[worst]:
                worst = p.status
        snapshot.status = worst
        return snapshot

    def partition_status(self, history: deque[_Seen] | list[_Seen], members: int | None) -> str:
        if any(s.lag == 0 for s in history):
            return OK
        seen = list(history)
        pairs = list(zip(seen, seen[1:]))
        if any(b.committed < a.committed for a, b in pairs):
            return REWIND
        if len(seen) < self.window:
            return OK
        first, last = seen[0], seen[-1]
        if not members and (last.taken_at - last.commit_seen_at) > (last.commit_seen_at - first.commit_seen_at):
            return STOP
        if all(b.committed == a.committed for a, b in pairs):
            return STALL
        if all(b.lag >= a.lag for a, b in pairs):
            return WARN
        return OK


# ----------------------------------------------------------------------------- display

def render_table(snapshot: LagSnapshot):
    """A rich Table of the snapshot, one row per partition."""
    from rich.table import Table

    members = "?" if snapshot.members is None else str(snapshot.members)
    title = (f"group [bold]{snapshot.group}[/]  status [{STATUS_STYLE.get(snapshot.status, '')}]"
             f"{snapshot.status}[/]  total lag {snapshot.total_lag:,}  members {members}  "
             f"{time.strftime('%H:%M:%S', time.localtime(snapshot.taken_at))}")
    table = Table(title=title, title_justify="left",
                  caption=None if snapshot.partitions else "no partitions: the topics do not exist yet")
    for name in ("topic", "partition", "committed", "end", "lag", "lag s", "status"):
        table.add_column(name, justify="left" if name in ("topic", "status") else "right")
    for p in snapshot.partitions:
        committed = f"{p.committed:,}" if p.has_commit else f"({p.committed:,})"
        table.add_row(p.topic, str(p.partition), committed, f"{p.end:,}", f"{p.lag:,}",
                      f"{p.lag_seconds:.1f}", f"[{STATUS_STYLE.get(p.status, '')}]{p.status}[/]")
    return table


async def watch(bootstrap: str, group: str = DEFAULT_GROUP, interval_s: float = 5.0, *,
                topics: Iterable[str] | None = None, window: int = DEFAULT_WINDOW,
                iterations: int | None = None, console=None) -> LagSnapshot | None:
    """Refresh a live table every ``interval_s`` until cancelled or after ``iterations``."""
    from rich.live import Live

    topics = list(topics) if topics is not None else None
    evaluator = LagEvaluator(window)
    last = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        n = 0
        while iterations is None or n < iterations:
            if n:
                await asyncio.sleep(interval_s)
            last = evaluator.update(await lag_snapshot(bootstrap, group, topics))
            live.update(render_table(last), refresh=True)
            n += 1
    return last


def run_watch(bootstrap: str, group: str = DEFAULT_GROUP, interval_s: float = 5.0, **kwargs) -> LagSnapshot | None:
    """``watch`` for a CLI: Ctrl-C ends it quietly."""
    try:
        return asyncio.run(watch(bootstrap, group, interval_s, **kwargs))
    except KeyboardInterrupt:
        return None
