"""Interaction logs: reading them and splitting them the way the literature does.

A log is `{user_id: [(item_id, event_type | None, ts_seconds | None), ...]}`, oldest first.
Three on-disk forms are read: the S3-Rec sequence-per-line `.txt` files (no types, no
timestamps), JSON lines and msgpack streams of contract events
`{"v": 1, "event_id", "user_id", "item_id", "type", "ts"}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from pathlib import Path

import numpy as np

# The event types the model knows as an input feature. The wire contract (stream/events.py)
# accepts exactly these; index 0 of the model's type embedding means "unknown / not logged".
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
TYPE_ID = {t: i + 1 for i, t in enumerate(EVENT_TYPES)}

# Time gaps to the previous event are log2-bucketed; 0 means "unknown" (no ts, or first event).
N_GAP_BUCKETS = 32

Interaction = tuple[str, str | None, float | None]  # (item_id, event type or None, ts or None)
Log = dict[str, list[Interaction]]


class History(Sequence):
    """A user's events as three columns (items, types, times; oldest first), read as a
    sequence of `Interaction`s without making a tuple per event.

    The state table keeps a user's history as these three lists, and serving featurizes every
    cache miss's whole window: `featurize` reads the columns directly, and only the few new
    events a step takes become tuples. A view, not a copy: read it before the lists change."""

    __slots__ = ("items", "types", "ts")

    def __init__(self, items: list[str], types: list[str | None], ts: list[float | None]):
        self.items, self.types, self.ts = items, types, ts

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, at):
        if isinstance(at, slice):
            return list(zip(self.items[at], self.types[at], self.ts[at]))
        return self.items[at], self.types[at], self.ts[at]

    def __iter__(self):
        return zip(self.items, self.types, self.ts)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"History({list(self)!r})"

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
MSGPACK_SUFFIXES = {".msgpack", ".mpk"}
EVENT_KEYS = ("user_id", "item_id", "type", "ts")


# ----------------------------------------------------------------------------- reading

def load_log(path: str | Path) -> Log:
    """Read a log file: .txt sequences, .jsonl/.json event lines, .msgpack/.mpk event stream."""
    path = Path(path)
    kind = _kind(path)
    if kind == "jsonl":
        return _events_to_log(_read_jsonl(path))
    if kind == "msgpack":
        return _events_to_log(_read_msgpack(path))
    return _read_sequences(path)


def _kind(path: Path) -> str:
    """The format from the extension, else from the first byte: '{' JSON, a map header msgpack."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in MSGPACK_SUFFIXES:
        return "msgpack"
    if suffix == ".txt":
        return "sequences"
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] == b"{":
        return "jsonl"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    return "sequences"


def _read_sequences(path: Path) -> Log:
    """S3-Rec form: `user item item ...` per line, chronological; no types, no timestamps."""
    log: Log = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue  # blank lines carry nothing; everything else must parse
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'user_id item_id ...', got {line.strip()!r}")
            user = parts[0]
            if user in log:
                raise ValueError(f"{path}:{lineno}: user {user!r} appears on more than one line")
            log[user] = [(item, None, None) for item in parts[1:]]
    return log


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}:{lineno}", event


def _read_msgpack(path: Path):
    import msgpack

    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        n = 0
        try:
            for n, event in enumerate(unpacker, 1):
                yield f"{path}:{n}", event
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
            raise ValueError(f"{path}:{n + 1}: malformed msgpack ({e})") from None
        # A truncated trailing object makes the Unpacker stop silently; refuse to lose it.
        if unpacker.tell() != path.stat().st_size:
            raise ValueError(f"{path}:{n + 1}: truncated msgpack object at byte {unpacker.tell()}")


def log_from_events(events) -> Log:
    """Contract event maps (e.g. a synthetic shop, or a log already in memory) -> Log."""
    return _events_to_log((f"event {n}", e) for n, e in enumerate(events, 1))


def _events_to_log(events) -> Log:
    """Group contract events by user and sort each user by ts (stable for ties)."""
    log: dict[str, list[tuple[float, str, str]]] = {}
    for where, event in events:
        if not isinstance(event, dict):
            raise ValueError(f"{where}: expected an event map, got {type(event).__name__}")
        missing = [k for k in EVENT_KEYS if k not in event]
        if missing:
            raise ValueError(f"{where}: event lacks {', '.join(missing)}")
        etype, ts = event["type"], event["ts"]
        if etype not in TYPE_ID:
            raise ValueError(f"{where}: unknown event type {etype!r} (known: {', '.join(EVENT_TYPES)})")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise ValueError(f"{where}: ts must be a finite number of seconds, got {ts!r}")
        user, item = event["user_id"], event["item_id"]
        for name, value in (("user_id", user), ("item_id", item)):
            if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
                raise ValueError(f"{where}: {name} must be a non-empty string or int, got {value!r}")
        log.setdefault(str(user), []).append((float(ts), str(item), etype))
    out: Log = {}
    for user, rows in log.items():
        rows.sort(key=lambda r: r[0])  # list.sort is stable: equal ts keep file order
        out[user] = [(item, etype, ts) for ts, item, etype in rows]
    return out


def load_attributes(path: str | Path) -> dict[str, list[str]]:
    """Read `<stem>_item2attributes.json`: item id -> list of attribute ids (as strings)."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object item -> [attribute, ...]")
    return {str(k): [str(a) for a in v] for k, v in raw.items()}


def attributes_beside(path: str | Path) -> Path | None:
    """The attribute file that sits next to a data file, if there is one."""
    path = Path(path)
    candidate = path.with_name(f"{path.stem}_item2attributes.json")
    return candidate if candidate.exists() else None


# ----------------------------------------------------------------------------- splitting

def leave_one_out(log: Log, split: str) -> list[tuple[str, list[Interaction], Interaction | None]]:
    """(user, input history, target) per user, the standard leave-one-out protocol.

    train: input = all but the last two events, target None (the loss is at every position);
    valid: input = all but the last two, target = second-last;
    test:  input = all but the last, target = last.
    Users too short to have a non-empty input for the split are left out.
    """
    out = []
    for user, seq in log.items():
        if split == "train":
            if len(seq) >= 4:  # at least two events left to form one (input, next) pair
                out.append((user, seq[:-2], None))
        elif split == "valid":
            if len(seq) >= 3:
                out.append((user, seq[:-2], seq[-2]))
        elif split == "test":
            if len(seq) >= 2:
                out.append((user, seq[:-1], seq[-1]))
        else:
            raise ValueError(f"split must be 'train', 'valid' or 'test', not {split!r}")
    return out


# ----------------------------------------------------------------------------- tensors

def gap_bucket(gap: float) -> int:
    """Bucket a time gap in seconds: 1 for under a second, then one bucket per doubling."""
    if gap < 1.0:
        return 1
    return min(N_GAP_BUCKETS - 1, 2 + int(math.log2(gap)))


def gap_buckets(gaps: np.ndarray) -> np.ndarray:
    """``gap_bucket`` over an array of gaps (>= 0 seconds), for batches."""
    with np.errstate(divide="ignore"):
        return np.where(gaps < 1.0, 1, np.minimum(N_GAP_BUCKETS - 1, 2 + np.floor(np.log2(gaps)))).astype(np.int64)


def featurize(histories: list[list[Interaction] | History], token_index: dict[str, int], max_len: int,
              width: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Item, type and gap ids of each history's last `max_len` known events (unknown items
    skipped, though their times still count for the next gap), left-padded with 0 into
    int64 [B, width] (width: the longest, or at least ``width``), and each row's length.

    `token_index` maps item id -> encoder id (1..n_items; 0 is padding). One numpy pass over
    the batch's events: serving featurizes every cache miss's 50-event window, and a Python
    loop per event cost ~100 us per user there."""
    counts = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
    n = int(counts.sum())
    if not n:
        empty = np.zeros((len(histories), width), dtype=np.int64)
        return empty, empty.copy(), empty.copy(), np.zeros(len(histories), dtype=np.int64)
    if all(isinstance(h, History) for h in histories):   # the state's own columns
        names, kinds, times = (list(chain.from_iterable(map(attrgetter(field), histories)))
                               for field in History.__slots__)
    else:
        # three passes over one flat list: zip(*events) with one argument per event slowed down
        # ~15x past a few thousand users (2,048 users of 50 events: 45 against 2.5 us per user)
        flat = list(chain.from_iterable(histories))
        names, kinds, times = (list(map(itemgetter(field), flat)) for field in range(3))
    items = np.fromiter(map(token_index.get, names, repeat(0)), dtype=np.int64, count=n)
    types = np.fromiter(map(TYPE_ID.get, kinds, repeat(0)), dtype=np.int64, count=n)
    if None in times:
        times = [np.nan if t is None else t for t in times]
    ts = np.array(times, dtype=np.float64)
    # gap to the last earlier event of the same user that has a time
    user_start = np.repeat(np.cumsum(counts) - counts, counts)
    timed = ~np.isnan(ts)
    last_timed = np.maximum.accumulate(np.where(timed, np.arange(n), -1))
    prev = np.concatenate([[-1], last_timed[:-1]])
    has_prev = timed & (prev >= user_start)
    gap = np.where(has_prev, ts - ts[np.where(has_prev, prev, 0)], 0.0)
    gaps = np.where(has_prev, gap_buckets(np.maximum(0.0, gap)), 0)
    # the last max_len known events of each user, right-aligned
    known = items > 0
    user = np.repeat(np.arange(len(histories)), counts)[known]
    lengths = np.bincount(user, minlength=len(histories))
    back = (np.cumsum(lengths) - 1)[user] - np.arange(len(user))   # 0: the user's last known event
    keep = back < max_len
    lengths = np.minimum(lengths, max_len)
    width = max(width, int(lengths.max(initial=0)))
    rows, cols = user[keep], width - 1 - back[keep]
    out = []
    for values in (items, types, gaps):
        matrix = np.zeros((len(histories), width), dtype=np.int64)
        matrix[rows, cols] = values[known][keep]
        out.append(matrix)
    return out[0], out[1], out[2], lengths
