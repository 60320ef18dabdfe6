"""Live item state (stock, attributes, merchandising boost) from the `shop-items` topic.

The topic is compacted: one message per item with its latest state, and a tombstone when
the item is deleted. The stream worker validates messages and calls `update` / `remove`;
the reranker reads the state here.

Items the catalogue has never heard of count as available: a shop that never publishes
catalogue messages still gets recommendations. Only items known to be out of stock or
removed are filtered out.

`version` increases on every change, `attributes_version` only when some item's attributes
change, so readers can cache per-row arrays (see `Reranker`) and rebuild them only when
the relevant counter moves.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

NO_BOOST = 0.0


class Catalogue:
    """Per-item stock, attributes and boost; unknown items are available with no boost."""

    def __init__(self) -> None:
        self._attributes: dict[str, tuple[str, ...]] = {}
        self._unavailable: set[str] = set()
        self._boosts: dict[str, float] = {}
        self._attribute_counts: Counter[str] = Counter()
        self.version = 0
        self.attributes_version = 0

    @classmethod
    def from_item2attributes(cls, path: str | os.PathLike) -> Catalogue:
        """Seed attributes from an `*_item2attributes.json` file (item id -> attribute ids)."""
        with open(path) as handle:
            raw: Mapping[str, list] = json.load(handle)
        catalogue = cls()
        for item_id, attributes in raw.items():
            catalogue._set_attributes(str(item_id), attributes)
        log.info("catalogue seeded with attributes of %d items from %s", len(raw), path)
        return catalogue

    # --------------------------------------------------------------- updates
    def update(self, item: Mapping) -> None:
        """Apply one validated `shop-items` message: item_id, in_stock, attributes, boost."""
        item_id = str(item["item_id"])
        if "attributes" in item and item["attributes"] is not None:
            self._set_attributes(item_id, item["attributes"])
        if item.get("in_stock", True):
            self._unavailable.discard(item_id)
        else:
            self._unavailable.add(item_id)
        boost = float(item.get("boost") or NO_BOOST)
        if boost != NO_BOOST:
            self._boosts[item_id] = boost
        else:
            self._boosts.pop(item_id, None)
        self.version += 1

    def remove(self, item_id: str) -> None:
        """Tombstone: the item was deleted from the shop and must not be recommended."""
        item_id = str(item_id)
        self._unavailable.add(item_id)
        self._boosts.pop(item_id, None)
        self.version += 1

    def _set_attributes(self, item_id: str, attributes: Iterable) -> None:
        new = tuple(dict.fromkeys(str(a) for a in attributes))
        old = self._attributes.get(item_id)
        if old == new:
            return
        self.attributes_version += 1
        self._attribute_counts.subtract(old or ())
        self._attribute_counts.update(new)
        self._attributes[item_id] = new

    # ---------------------------------------------------------------- queries
    def available(self, item_ids: Iterable[str]) -> np.ndarray:
        """Boolean mask: False for items known to be out of stock or removed."""
        unavailable = self._unavailable
        return np.fromiter((i not in unavailable for i in item_ids), dtype=bool)

    def is_available(self, item_id: str) -> bool:
        return item_id not in self._unavailable

    def attributes(self, item_id: str) -> tuple[str, ...]:
        return self._attributes.get(item_id, ())

    def boost(self, item_id: str) -> float:
        return self._boosts.get(item_id, NO_BOOST)

    @property
    def unavailable_ids(self) -> frozenset[str]:
        """Items known to be out of stock or removed (small; readers build masks from it)."""
        return frozenset(self._unavailable)

    @property
    def boosts(self) -> Mapping[str, float]:
        """Items with a non-zero boost."""
        return dict(self._boosts)

    @property
    def item_attributes(self) -> Mapping[str, tuple[str, ...]]:
        return self._attributes

    def attribute_share(self, attribute: str) -> float:
        """Share of attributed items carrying `attribute` (to tell brands from broad categories)."""
        return self._attribute_counts.get(attribute, 0) / max(1, len(self._attributes))

    def __bool__(self) -> bool:
        """Always true, even when empty, so `x or Catalogue()` never swaps out a live object."""
        return True

    def __len__(self) -> int:
        return len(self._attributes)
