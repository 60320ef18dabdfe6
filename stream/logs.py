"""Logged event streams: every supported format read into contract events (stream/events.py).

Used by ``streamrec replay``, the demo and the benchmarks. Readers turn each format into events:


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
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import msgpack

from model.data import EVENT_TYPES
from stream.events import ShopEvent

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
