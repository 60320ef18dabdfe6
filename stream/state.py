"""Per-user behaviour state: the bounded recent sequence the encoder reads.

One ``UserState`` per user lives in a Faust table (changelog-backed), stored as msgpack.
Applying events is idempotent by event id, so at-least-once redelivery and repeated replays
never count an event twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import msgpack

from stream.events import ShopEvent

STATE_VERSION = 1
MAX_EVENTS = 50          # history length kept per user (the encoder reads at most this many)
MAX_PURCHASED = 200      # purchased items remembered for the "never recommend again" filter
MAX_EVENT_IDS = 200      # recently applied event ids remembered for de-duplication


@dataclass(slots=True)
class UserState:
    items: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    purchased: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    last_event_id: str | None = None
    last_event_ts: float | None = None

    def apply(self, events: Iterable[ShopEvent], max_events: int = MAX_EVENTS) -> int:
        """Append new events in arrival order; returns how many were new (not seen by id)."""
        seen = set(self.event_ids)
        applied = 0
        for event in events:
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            self.event_ids.append(event.event_id)
            self.items.append(event.item_id)
            self.types.append(event.type)
            self.ts.append(event.ts)
            if event.type == "purchase" and event.item_id not in self.purchased:
                self.purchased.append(event.item_id)
            self.last_event_id, self.last_event_ts = event.event_id, event.ts
            applied += 1
        if applied:
            del self.items[:-max_events], self.types[:-max_events], self.ts[:-max_events]
            del self.purchased[:-MAX_PURCHASED], self.event_ids[:-MAX_EVENT_IDS]
        return applied

    def history(self) -> list[tuple[str, str, float]]:
        """(item, type, ts) oldest first: what ``ModelArtifact.encode`` takes."""
        return list(zip(self.items, self.types, self.ts))

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": STATE_VERSION, "items": self.items, "types": self.types, "ts": self.ts,
            "purchased": self.purchased, "event_ids": self.event_ids,
            "last_event_id": self.last_event_id, "last_event_ts": self.last_event_ts,
        }, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes | None) -> "UserState":
        if raw is None:
            return cls()
        msg = msgpack.unpackb(raw, raw=False)
        if msg.get("v") != STATE_VERSION:
            raise ValueError(f"unsupported user state version {msg.get('v')!r}")
        return cls(msg["items"], msg["types"], msg["ts"], msg["purchased"], msg["event_ids"],
                   msg["last_event_id"], msg["last_event_ts"])


def coalesce_by_user(events: Iterable[tuple[ShopEvent, object]]) -> dict[str, list[tuple[ShopEvent, object]]]:
    """Group a micro-batch by user, keeping each user's arrival order (dicts keep insertion order)."""
    by_user: dict[str, list[tuple[ShopEvent, object]]] = {}
    for pair in events:
        by_user.setdefault(pair[0].user_id, []).append(pair)
    return by_user
