"""Exponentially decayed item popularity from the live stream: the list for cold-start users.

A user with no usable history has nothing for the encoder to work with; what the shop's
other users interact with right now is the best guess. Each event adds its weight to the
item's score, and scores halve every `half_life_s` seconds of event time.

Scores are stored relative to a reference time t0 (value * 2**((t - t0) / half_life)), so an
observation is one vectorised add and nothing decays item by item; t0 moves forward
(rescaling all scores once) before the exponent could overflow float64.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from index.catalogue import Catalogue

log = logging.getLogger(__name__)

DEFAULT_HALF_LIFE_S = 6 * 3600.0
# Purchases and carts say more about what is hot than views; unknown types weigh 1.
EVENT_WEIGHTS: Mapping[str, float] = {"view": 1.0, "click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
# Rebase t0 when the newest event is this many half-lives past it (2**200 is far from overflow).
REBASE_AFTER_HALF_LIVES = 200.0
INITIAL_CAPACITY = 1024


def event_weights(event_types: Sequence[str | None]) -> np.ndarray:
    """Weights for a batch of event types (see EVENT_WEIGHTS)."""
    return np.fromiter((EVENT_WEIGHTS.get(t, 1.0) for t in event_types), dtype=np.float64)


class Trending:
    """Decayed popularity per item; `top(k)` reads the current ranking."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S):
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        self.half_life_s = float(half_life_s)
        self._slot_of: dict[str, int] = {}
        self._items: list[str] = []
        self._scores = np.zeros(INITIAL_CAPACITY, dtype=np.float64)
        self._t0: float | None = None
        self.latest_ts: float | None = None

    def observe(
        self,
        item_ids: Sequence[str],
        ts: np.ndarray | Sequence[float] | float,
        weights: np.ndarray | Sequence[float] | float | None = None,
    ) -> None:
        """Add a batch of events: item ids, event times (seconds), weights (default 1)."""
        if len(item_ids) == 0:
            return
        ts = np.broadcast_to(np.asarray(ts, dtype=np.float64), (len(item_ids),))
        weights = np.broadcast_to(
            np.asarray(1.0 if weights is None else weights, dtype=np.float64), (len(item_ids),)
        )
        newest = float(ts.max())
        if self._t0 is None:
            self._t0 = newest
        self.latest_ts = newest if self.latest_ts is None else max(self.latest_ts, newest)
        if (self.latest_ts - self._t0) / self.half_life_s > REBASE_AFTER_HALF_LIVES:
            self._rebase(self.latest_ts)
        slots = self._slots(item_ids)
        growth = np.exp2((ts - self._t0) / self.half_life_s)
        np.add.at(self._scores, slots, weights * growth)

    def top(
        self,
        k: int,
        exclude: Set[str] = frozenset(),
        now: float | None = None,
        available: Catalogue | None = None,
    ) -> list[tuple[str, float]]:
        """The k hottest items as (item_id, score decayed to `now`), best first.

        `now` defaults to the newest event seen; `available` (a Catalogue) drops items that are
        out of stock or removed.
        """
        count = len(self._items)
        if count == 0 or k < 1:
            return []
        now = self.latest_ts if now is None else now
        scores = self._scores[:count].copy()
        dropped = set(exclude)
        if available is not None:  # the unavailable set is small; the item list may not be
            dropped |= available.unavailable_ids
        if dropped:
            scores[[self._slot_of[i] for i in dropped if i in self._slot_of]] = -np.inf
        take = min(k, count)
        best = np.argpartition(-scores, take - 1)[:take]
        best = best[np.argsort(-scores[best], kind="stable")]
        best = best[np.isfinite(scores[best]) & (scores[best] > 0)]
        decay = np.exp2((self._t0 - now) / self.half_life_s)
        return [(self._items[slot], float(scores[slot] * decay)) for slot in best]

    def score(self, item_id: str, now: float | None = None) -> float:
        """Decayed score of one item at `now` (0.0 when never seen)."""
        slot = self._slot_of.get(item_id)
        if slot is None:
            return 0.0
        now = self.latest_ts if now is None else now
        return float(self._scores[slot] * np.exp2((self._t0 - now) / self.half_life_s))

    def __bool__(self) -> bool:
        """Always true, even when empty, so `x or Trending()` never swaps out a live object."""
        return True

    def __len__(self) -> int:
        return len(self._items)

    def _slots(self, item_ids: Sequence[str]) -> np.ndarray:
        """Slot per event, creating slots for new items (Python work per distinct item only)."""
        unique, inverse = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_inverse=True)
        slot_of = self._slot_of
        unique_slots = np.empty(len(unique), dtype=np.int64)
        for position, item in enumerate(unique.tolist()):
            slot = slot_of.get(item)
            if slot is None:
                slot = slot_of[item] = len(self._items)
                self._items.append(item)
            unique_slots[position] = slot
        if len(self._items) > len(self._scores):
            grown = np.zeros(max(len(self._items), 2 * len(self._scores)), dtype=np.float64)
            grown[: len(self._scores)] = self._scores
            self._scores = grown
        return unique_slots[inverse.reshape(-1)]

    def _rebase(self, t0: float) -> None:
        self._scores *= np.exp2((self._t0 - t0) / self.half_life_s)
        self._t0 = t0
        log.debug("trending rebased to t0=%s", t0)
