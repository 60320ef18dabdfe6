"""Per-user behaviour state: the bounded recent sequence the encoder reads.

One ``UserState`` per user lives in a Faust table (changelog-backed), stored as msgpack.
Applying events is idempotent by event id, so at-least-once redelivery and repeated replays
never count an event twice. A user's recent event ids are remembered as 64-bit digests
(9 bytes each in msgpack, against ~20 for an id string): the state, its changelog record and
its decoding shrink, and two of a user's 200 remembered events share a digest about once in
10^15 events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import msgpack

from model.data import History
from stream.events import ShopEvent

STATE_VERSION = 2        # 1: a map with the event ids themselves (still read)
MAX_EVENTS = 50          # history length kept per user (the encoder reads at most this many)
MAX_PURCHASED = 200      # purchased items remembered for the "never recommend again" filter
MAX_EVENT_IDS = 200      # recently applied event ids remembered for de-duplication
STORES = ("auto", "rocksdb", "memory")   # where the state table keeps its rows; auto: rocksdb if installed


def event_digest(event_id: str) -> int:
    """The 64 bits of an event id that de-duplication remembers."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


@dataclass(slots=True)
class UserState:
    items: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    purchased: list[str] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)       # digests of the recent event ids, oldest first
    last_event_id: str | None = None
    last_event_ts: float | None = None

    def apply(self, events: Iterable[ShopEvent], max_events: int = MAX_EVENTS) -> int:
        """Append new events in arrival order; returns how many were new (not seen by id)."""
        seen = set(self.seen)
        applied = 0
        for event in events:
            digest = event_digest(event.event_id)
            if digest in seen:
                continue
            seen.add(digest)
            self.seen.append(digest)
            self.items.append(event.item_id)
            self.types.append(event.type)
            self.ts.append(event.ts)
            if event.type == "purchase" and event.item_id not in self.purchased:
                self.purchased.append(event.item_id)
            self.last_event_id, self.last_event_ts = event.event_id, event.ts
            applied += 1
        if applied:
            del self.items[:-max_events], self.types[:-max_events], self.ts[:-max_events]
            del self.purchased[:-MAX_PURCHASED], self.seen[:-MAX_EVENT_IDS]
        return applied

    def history(self) -> History:
        """(item, type, ts) oldest first, what the encoders take: a view of this state's lists."""
        return History(self.items, self.types, self.ts)

    def encode(self) -> bytes:
        """A msgpack array (no key names on the hot path): version, then the fields in order."""
        return msgpack.packb([STATE_VERSION, self.items, self.types, self.ts, self.purchased, self.seen,
                              self.last_event_id, self.last_event_ts], use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes | None) -> "UserState":
        if raw is None:
            return cls()
        msg = msgpack.unpackb(raw, raw=False)
        if isinstance(msg, list) and msg and msg[0] == STATE_VERSION:
            return cls(*msg[1:])
        if isinstance(msg, dict) and msg.get("v") == 1:   # written by the previous version
            return cls(msg["items"], msg["types"], msg["ts"], msg["purchased"],
                       [event_digest(i) for i in msg["event_ids"]], msg["last_event_id"], msg["last_event_ts"])
        version = msg[0] if isinstance(msg, list) and msg else msg.get("v") if isinstance(msg, dict) else None
        raise ValueError(f"unsupported user state version {version!r}")


def store_url(choice: str) -> str:
    """Faust's store URL for one of STORES."""
    if choice == "auto":
        try:
            import rocksdict  # noqa: F401
            choice = "rocksdb"
        except ImportError:
            choice = "memory"
    return f"{choice}://"


class StateTable:
    """Users' state rows in the Faust table's store, read and written a batch at a time.

    The batch pipeline bypasses Faust's per-key table API (it needs a current event per key)
    and writes the changelog itself. A row reaches the local store only once its changelog
    record is durable -- acknowledged (at-least-once) or committed with its transaction
    (exactly-once) -- so the store never holds state that the changelog lacks, and a restart
    on the same disk recovers exactly what another worker would. Until then rows are *staged*
    in memory, tagged with the batch that wrote them, and read from there.
    """

    def __init__(self, table):
        self.table = table
        self._staged: dict[bytes, tuple[int, int, bytes]] = {}   # key -> (batch, partition, value)
        self._scan_partition: int | None = None                  # where the retention sweep is
        self._scan_after: bytes | None = None

    @property
    def store(self):
        return self.table.data

    @property
    def staged(self) -> int:
        return len(self._staged)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        missing = []
        for n, key in enumerate(keys):
            row = self._staged.get(key)
            if row is not None:
                out[n] = row[2]   # None: a staged deletion
            else:
                missing.append(n)
        if missing:
            found = self._read(partition, [keys[n] for n in missing])
            for n, value in zip(missing, found):
                out[n] = value
        return out

    def _read(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        store = self.store
        if hasattr(store, "_db_for_partition"):  # RocksDB: one multi-get per partition
            return store._db_for_partition(partition).get(keys)
        return [store.data.get(key) for key in keys]

    def stage(self, batch: int, partition: int, key: bytes, value: bytes | None) -> None:
        """A new row for ``key`` (None deletes it), written to the store once durable."""
        self._staged[key] = (batch, partition, value)

    def persist(self, upto_batch: int, changelog_offsets: dict[int, int]) -> int:
        """Write rows staged by batches <= ``upto_batch`` to the store; returns how many.

        ``changelog_offsets`` (partition -> offset of the last durable changelog record) become
        the store's persisted offsets, from which Faust's recovery resumes after a restart.
        """
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        done = [key for key, (batch, _, _) in self._staged.items() if batch <= upto_batch]
        for key in done:
            _, partition, value = self._staged.pop(key)
            by_partition.setdefault(partition, []).append((key, value))
        store = self.store
        if hasattr(store, "_db_for_partition"):
            import rocksdict

            for partition, rows in by_partition.items():
                batch = rocksdict.WriteBatch(raw_mode=True)
                for key, value in rows:
                    if value is None:
                        batch.delete(key)
                    else:
                        batch.put(key, value)
                store._db_for_partition(partition).write(batch)
        else:
            for partition, rows in by_partition.items():
                for key, value in rows:
                    if value is None:
                        store.data.pop(key, None)
                        store._key_partition.pop(key, None)
                    else:
                        store.data[key] = value
                        store._key_partition[key] = partition
        if changelog_offsets:
            from faust.types import TP

            topic = self.table.changelog_topic.get_topic_name()
            for partition, offset in changelog_offsets.items():
                store.set_persisted_offset(TP(topic, partition), offset)
        return len(done)

    def discard(self) -> None:
        """Forget staged rows (their batches will be processed again)."""
        self._staged.clear()

    def scan(self, partitions, limit: int):
        """Up to ``limit`` (partition, key, value) rows of ``partitions``, continuing where the last
        call stopped and starting over at the end: the retention sweep's bounded step. Staged
        rows win over stored ones; staged deletions are skipped."""
        partitions = sorted(partitions)
        out: list[tuple[int, bytes, bytes]] = []
        for _ in range(len(partitions) + 1):   # at most one pass over every partition per call
            if len(out) >= limit or not partitions:
                break
            if self._scan_partition not in partitions:
                self._scan_partition, self._scan_after = partitions[0], None
            p, want = self._scan_partition, limit - len(out)
            rows = self._rows_after(p, self._scan_after, want)
            for key, value in rows:
                self._scan_after = key
                staged = self._staged.get(key)
                value = staged[2] if staged is not None else value
                if value is not None:
                    out.append((p, key, value))
            if len(rows) < want:   # the end of this partition: the next one, from its start
                later = [q for q in partitions if q > p]
                self._scan_partition, self._scan_after = (later or partitions)[0], None
        return out

    def _rows_after(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        store = self.store
        rows = []
        if hasattr(store, "_db_for_partition"):
            items = store._db_for_partition(partition).items(from_key=after) if after else \
                store._db_for_partition(partition).items()
            for key, value in items:
                if key == after or key == store.offset_key:
                    continue
                rows.append((key, value))
                if len(rows) >= limit:
                    break
            return rows
        keys = sorted(k for k, q in store._key_partition.items() if q == partition and (after is None or k > after))
        return [(k, store.data[k]) for k in keys[:limit] if k in store.data]
