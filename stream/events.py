"""The wire contract: shop events in, recommendation lists out, rejects to the dead-letter topic.

Every message is msgpack with a version field ``v``; nothing is ever pickled. Decoding is
strict (a bad message is rejected with a reason, never guessed at) and cheap, because it runs
once per event on the hot path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from model.data import EVENT_TYPES

SCHEMA_VERSION = 1

EVENTS_TOPIC = "shop-events"
RECOMMENDATIONS_TOPIC = "recommendations"
DLQ_TOPIC = "shop-events-dlq"
ITEMS_TOPIC = "shop-items"

# A control event, not an interaction: erase everything the worker holds about the user
# (right to erasure). It carries no item_id.
DELETE_USER = "delete_user"
_EVENT_TYPES = frozenset(EVENT_TYPES)
# Ids longer than this are refused: they bloat state, keys and logs, and no shop needs them.
MAX_ID_CHARS = 256


class InvalidMessage(ValueError):
    """A message that breaks the contract; ``reason`` is what the dead-letter record says."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ShopEvent:
    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: float


def _require_str(msg: dict, key: str) -> str:
    value = msg.get(key)
    if value is None:
        raise InvalidMessage(f"missing {key}")
    if not isinstance(value, str):
        raise InvalidMessage(f"{key} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidMessage(f"empty {key}")
    if len(value) > MAX_ID_CHARS:
        raise InvalidMessage(f"{key} longer than {MAX_ID_CHARS} characters")
    return value


def _unpack_map(value: bytes | None) -> dict:
    if not value:
        raise InvalidMessage("empty value")
    try:
        msg = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InvalidMessage(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise InvalidMessage(f"not a map: {type(msg).__name__}")
    version = msg.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidMessage(f"unsupported v: {version!r}")
    return msg


def event_from_dict(msg: dict) -> ShopEvent:
    """Validate a decoded map against the v1 event schema (extra keys are ignored)."""
    event_type = msg.get("type")
    if not isinstance(event_type, str):
        raise InvalidMessage("missing type" if event_type is None else "type must be a string")
    if event_type not in _EVENT_TYPES and event_type != DELETE_USER:
        raise InvalidMessage(f"unknown type: {event_type[:40]!r}")
    ts = msg.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise InvalidMessage("missing ts" if ts is None else "ts must be a number")
    if not math.isfinite(ts) or ts < 0:  # NaN, infinite or negative
        raise InvalidMessage(f"invalid ts: {ts!r}")
    return ShopEvent(
        event_id=_require_str(msg, "event_id"),
        user_id=_require_str(msg, "user_id"),
        item_id="" if event_type == DELETE_USER else _require_str(msg, "item_id"),
        type=event_type,
        ts=float(ts),
    )


def decode_event(value: bytes | None) -> ShopEvent:
    """bytes -> ShopEvent, or InvalidMessage with the reason."""
    return event_from_dict(_unpack_map(value))


def decode_keyed_event(key: bytes | None, value: bytes | None) -> ShopEvent:
    """A ``shop-events`` record -> ShopEvent: the value decoded and the key checked against its
    user (the key decides the partition, and so which worker holds the user's state)."""
    event = event_from_dict(_unpack_map(value))
    if key != event.user_id.encode():
        raise InvalidMessage("key does not match user_id")
    return event


def encode_event(event: ShopEvent | dict) -> bytes:
    if isinstance(event, ShopEvent):
        event = {
            "event_id": event.event_id,
            "user_id": event.user_id,
            "item_id": event.item_id,
            "type": event.type,
            "ts": event.ts,
        }
        if event["type"] == DELETE_USER:
            del event["item_id"]
    return msgpack.packb({"v": SCHEMA_VERSION, **event}, use_bin_type=True)


def delete_user_event(user_id: str, event_id: str, ts: float | None = None) -> ShopEvent:
    """The event that erases ``user_id`` (``streamrec forget`` sends these)."""
    return ShopEvent(event_id, user_id, "", DELETE_USER, time.time() if ts is None else ts)


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """A catalogue message from ``shop-items``; ``removed`` is a tombstone (null value)."""

    item_id: str
    in_stock: bool = True
    attributes: tuple[str, ...] = ()
    boost: float = 0.0
    removed: bool = False


def decode_item(key: bytes | None, value: bytes | None) -> ItemUpdate:
    """Decode a ``shop-items`` record; a null value with a key is a removal."""
    if value is None:
        if not key:
            raise InvalidMessage("tombstone without key")
        try:
            return ItemUpdate(item_id=key.decode(), removed=True)
        except UnicodeDecodeError:
            raise InvalidMessage("key is not UTF-8") from None
    msg = _unpack_map(value)
    item_id = _require_str(msg, "item_id")
    in_stock = msg.get("in_stock", True)
    if not isinstance(in_stock, bool):
        raise InvalidMessage("in_stock must be a boolean")
    attributes = msg.get("attributes", [])
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        raise InvalidMessage("attributes must be a list of strings")
    boost = msg.get("boost", 0.0)
    if isinstance(boost, bool) or not isinstance(boost, (int, float)) or boost != boost:
        raise InvalidMessage("boost must be a number")
    return ItemUpdate(item_id, in_stock, tuple(attributes), float(boost))


def encode_item(item_id: str, in_stock: bool = True, attributes=(), boost: float | None = None) -> bytes:
    msg: dict[str, Any] = {"v": SCHEMA_VERSION, "item_id": item_id, "in_stock": in_stock,
                           "attributes": list(attributes)}
    if boost is not None:
        msg["boost"] = boost
    return msgpack.packb(msg, use_bin_type=True)


def encode_recommendations(user_id: str, items: list[dict], model_version: str,
                           event_id: str, event_ts: float, produced_ts: float | None = None,
                           variant: str | None = None) -> bytes:
    msg = {
        "v": SCHEMA_VERSION,
        "user_id": user_id,
        "items": items,
        "model_version": model_version,
        "event_id": event_id,
        "event_ts": event_ts,
        "produced_ts": time.time() if produced_ts is None else produced_ts,
    }
    if variant is not None:   # A/B variants only (an optional key of the v1 contract)
        msg["variant"] = variant
    return msgpack.packb(msg, use_bin_type=True)


def decode_recommendations(value: bytes) -> dict:
    msg = _unpack_map(value)
    for key in ("user_id", "items", "model_version", "event_id", "event_ts", "produced_ts"):
        if key not in msg:
            raise InvalidMessage(f"missing {key}")
    return msg


# A dead letter larger than this would not fit a Kafka record (1 MiB by default, with room for
# the batch's overhead): its original key and value are dropped and only their sizes kept.
MAX_DEAD_LETTER_BYTES = 900_000


def encode_dead_letter(value: bytes | None, reason: str, topic: str, partition: int,
                       offset: int, key: bytes | None = None) -> bytes:
    """The DLQ record keeps the original bytes untouched so the message can be replayed --
    unless they are too large for a record, then it says so and keeps their sizes."""
    msg = {"v": SCHEMA_VERSION, "reason": reason, "topic": topic, "partition": partition, "offset": offset,
           "key": key, "value": value, "ts": time.time()}
    if len(value or b"") + len(key or b"") > MAX_DEAD_LETTER_BYTES:
        msg.update(key=None, value=None, key_bytes=len(key or b""), value_bytes=len(value or b""),
                   reason=f"{reason} (original dropped: too large for a dead letter)")
    return msgpack.packb(msg, use_bin_type=True)


def decode_dead_letter(value: bytes) -> dict:
    return msgpack.unpackb(value, raw=False)
