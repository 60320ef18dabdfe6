"""Turn FAISS candidates into the list a user sees: filters, business boost, diversity, "because".

For each user, in order:

1. drop candidates that are padding (-1), duplicates, purchased by the user, in the user's
   recent history (`drop_recent`), or out of stock / removed in the catalogue
   (`drop_unavailable`);
2. relevance = model score + boost_weight * boost * spread, where spread is the standard
   deviation of the user's remaining candidate scores: a boost of 1.0 lifts an item by one
   standard deviation of that user's scores whatever the scale of the model's scores;
3. greedy maximal marginal relevance (MMR, Carbonell & Goldstein 1998) picks k items: at each
   step the candidate maximising  z(relevance) - diversity * max(0, cos(item, chosen))  where
   z standardises relevance per user, so an exact copy of an already chosen item pays
   `diversity` standard deviations; `max_per_attribute` optionally caps how many items
   may share a specific attribute (e.g. a brand; attributes carried by more than
   `cap_attribute_max_share` of the catalogue, i.e. broad categories, are not capped);
4. "because" is the user's history item whose embedding has the highest inner product
   with the recommended item (None when no history item is known).

Each entry's "score" is its relevance (model score plus boost); the list order is the MMR
order, so with diversity on a later entry can score higher than an earlier one.

Everything is vectorised over the batch of users; Python work is per user, not per candidate,
and the two batched products (candidate similarities, "because") run in bf16 where the CPU
runs it fast (AVX512-BF16, AMX), in float32 elsewhere. `Reranker` does the batch's arrays in
numpy on the CPU; `DeviceReranker` does the same steps in torch on the encoder's GPU, so that a
GPU worker's few CPU cores keep only the per-user Python work (row lookups, exclusion lists,
the output dicts). `reranker_for(device, ...)` picks one. On the CPU numpy stays: its small
operations cost less than torch's, and a worker's batches are mostly small (torch on the CPU,
the same lists, `python benchmarks/rerank_device.py --model DIR` on the scale model, 1 thread:
158-162 against 130-136 us per list in batches of 20 users, 121-123 against 112-118 in 256;
123-139 against 142-163 in 2,048).
Row numbers are the rows of `ItemIndex`: when cold-start items are added, call
`ItemIndex.add(vectors)` and `Reranker.add_items(items, vectors)` with the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from itertools import chain, repeat
from dataclasses import dataclass, field

import numpy as np
import torch

from index.catalogue import Catalogue
from model.artifact import as_float32, bf16_is_fast, host_view

log = logging.getLogger(__name__)

DEFAULT_LIST_LENGTH = 20
# MMR strength in standard deviations of the user's candidate scores (see module docstring).
# Tuned with benchmarks/rerank.py --sweep on Beauty's validation split (trained SASRec-style
# model): 2.0 cost 0.9% NDCG@10 for +0.027 attribute and +0.041 embedding intra-list
# diversity; 3.0 cost 2.7%, 4.0 cost 4.8%. The rule is "at most 3%", so 2.0 keeps a margin.
# Attribute caps (max_per_attribute) cost 5-9% on their own, so they are off by default.
DEFAULT_DIVERSITY = 2.0
DEFAULT_BOOST_WEIGHT = 1.0
# MMR considers the best max(MMR_POOL_MIN, MMR_POOL_PER_SLOT * k) candidates by relevance:
# the cost of each greedy step grows with the pool, and with the default strength the lists
# from a pool of 100 were identical to those from all 200 candidates on Beauty's test users
# (benchmarks/rerank.py --pool-check).
MMR_POOL_PER_SLOT = 5
MMR_POOL_MIN = 50
# Only this many most recent history items are compared for "because" (cost is B*k*H*D).
BECAUSE_HISTORY_MAX = 50
# Attributes carried by more than this share of the catalogue are categories, not caps.
DEFAULT_CAP_ATTRIBUTE_MAX_SHARE = 0.02
NOT_CHOSEN = -1
# The CPU reranks a batch this many users at a time, so that a part's arrays (the pool's vectors,
# 51 KB per user in bf16, and their similarities) stay below glibc's 32 MiB mapping threshold
# and in the caches. A lane's batch of ~1,000 users gathered ~85 MB at once: pages mapped
# fresh on every call, faulted in and zeroed by the kernel, and unmapped again (the third
# phases of `bench e2e --workload scale` on Kafka: 4,781-4,968 against 3,386-4,222 events/s
# whole, docs/performance.md).
CPU_RERANK_PART_USERS = 256
# The similarity and "because" products: bf16 halves the bytes gathered where the CPU runs it
# natively; emulated bf16 (no AVX512-BF16) would be slower than float32.
PRODUCT_DTYPE = torch.bfloat16 if bf16_is_fast(torch.device("cpu")) else torch.float32


@dataclass
class RerankConfig:
    """Knobs of the rerank stage; the defaults are what the stream worker serves."""

    k: int = DEFAULT_LIST_LENGTH
    drop_recent: bool = True
    # How many of the newest known history items `drop_recent` removes; None = the whole history
    # the context carries (what the offline protocol does).
    recent_window: int | None = None
    drop_unavailable: bool = True
    diversity: float = DEFAULT_DIVERSITY
    max_per_attribute: int | None = None
    cap_attribute_max_share: float = DEFAULT_CAP_ATTRIBUTE_MAX_SHARE
    boost_weight: float = DEFAULT_BOOST_WEIGHT


@dataclass
class UserContext:
    """What the reranker needs to know about one user."""

    history: Sequence[str] = ()  # item ids, oldest first, newest last
    purchased: Set[str] = field(default_factory=frozenset)


@dataclass
class UserRows:
    """Each user's item rows of a batch, flat: ``rows[i]`` belongs to user ``owner[i]``, each
    user's rows in their order (``owner`` ascending), so that per-user work is array work."""

    rows: np.ndarray    # int64
    owner: np.ndarray   # int64, ascending
    users: int

    def newest(self, count: int | None) -> UserRows:
        """Each user's last ``count`` rows (None: all of them)."""
        if count is None:
            return self
        counts = np.bincount(self.owner, minlength=self.users)
        take = counts[self.owner] - self._index_in_user(counts) - 1 < count
        return UserRows(self.rows[take], self.owner[take], self.users)

    def codes(self, n: int) -> np.ndarray:
        """``owner * (n + 1) + row``: one code per (user, row) for a batch-wide membership test."""
        return self.owner * (n + 1) + self.rows

    def padded(self, width: int) -> np.ndarray:
        """[users, width]: each user's last ``width`` rows from column 0, oldest first; -1 after."""
        newest = self.newest(width)
        out = np.full((self.users, width), -1, dtype=np.int64)
        out[newest.owner, newest._index_in_user(np.bincount(newest.owner, minlength=self.users))] = newest.rows
        return out

    def _index_in_user(self, counts: np.ndarray) -> np.ndarray:
        """Each row's place among its user's rows (``counts``: rows per user)."""
        return np.arange(len(self.rows)) - (np.cumsum(counts) - counts)[self.owner]


class Reranker:
    """Filters, boosts and diversifies candidate rows into final per-user lists."""

    device = torch.device("cpu")   # where the products' item vectors live (DeviceReranker: its device)
    part_users: int | None = CPU_RERANK_PART_USERS   # users reranked at once (None: the whole batch)

    def __init__(
        self,
        config: RerankConfig,
        catalogue: Catalogue,
        item_vectors: np.ndarray,
        items: list[str],
    ):
        item_vectors = np.asarray(item_vectors, dtype=np.float32)
        if item_vectors.ndim != 2 or len(item_vectors) != len(items):
            raise ValueError(
                f"item_vectors must be [len(items)={len(items)}, dim], got {item_vectors.shape}"
            )
        self.config = config
        self.catalogue = catalogue
        self._items: list[str] = []
        self._row_of: dict[str, int] = {}
        self._vectors = np.empty((0, item_vectors.shape[1]), dtype=np.float32)
        self._unit = self._vectors
        self._cache_key: tuple[int, int] | None = None
        self._product_cache: dict = {}
        self._attributes_key: tuple[int, int] | None = None
        self._capped_attributes: np.ndarray | None = None
        self.add_items(items, item_vectors)

    # ------------------------------------------------------------------ items
    def add_items(self, items: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Append items (same order as `ItemIndex.add`); returns their rows."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise ValueError(f"vectors must be [{len(items)}, {self.dim}], got {vectors.shape}")
        items = [str(i) for i in items]
        clashes = [i for i in items if i in self._row_of]
        if clashes or len(set(items)) != len(items):
            raise ValueError(f"items already known or repeated, e.g. {clashes[:3]}")
        first = len(self._items)
        self._row_of.update((item, first + offset) for offset, item in enumerate(items))
        self._items.extend(items)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self._vectors = np.concatenate([self._vectors, vectors])
        self._unit = np.concatenate([self._unit, vectors / np.maximum(norms, 1e-12)])
        self._items_array = np.array(self._items, dtype=object)
        return np.arange(first, first + len(items), dtype=np.int64)

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    def __len__(self) -> int:
        return len(self._items)

    def row_of(self, item_id: str) -> int | None:
        return self._row_of.get(item_id)

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows of known items, in order; unknown ids are skipped."""
        return self.rows_by_user([item_ids]).rows

    def rows_by_user(self, id_lists: Sequence[Sequence[str]]) -> UserRows:
        """The known rows of each user's ids, in order (unknown ids skipped): one C-level pass of
        dict lookups for the batch (a per-user Python loop cost ~1 us per item)."""
        flat = list(chain.from_iterable(id_lists))
        rows = np.fromiter(map(self._row_of.get, flat, repeat(-1, len(flat))), dtype=np.int64, count=len(flat))
        owner = np.repeat(np.arange(len(id_lists)), [len(ids) for ids in id_lists])
        known = rows >= 0
        return UserRows(rows[known], owner[known], len(id_lists))

    # ---------------------------------------------------------------- caches
    def prepare(self) -> None:
        """Build the lazily kept arrays now: threads that then rerank at once only read them."""
        self._refresh_catalogue_arrays()
        self._for_products("unit")
        self._for_products("vectors")

    def _refresh_catalogue_arrays(self) -> None:
        """Per-row availability, boost and capped-attribute arrays, rebuilt when they change."""
        key = (self.catalogue.version, len(self._items))
        if key == self._cache_key:
            return
        n = len(self._items)
        self._available_rows = np.ones(n, dtype=bool)
        rows = self.rows_of(list(self.catalogue.unavailable_ids))
        self._available_rows[rows] = False
        self._boost_rows = np.zeros(n, dtype=np.float32)
        for item_id, boost in self.catalogue.boosts.items():
            row = self._row_of.get(item_id)
            if row is not None:
                self._boost_rows[row] = boost
        self._cache_key = key
        attributes_key = (self.catalogue.attributes_version, len(self._items))
        if self.config.max_per_attribute is not None and attributes_key != self._attributes_key:
            self._capped_attributes = self._capped_attribute_matrix()
            self._attributes_key = attributes_key

    def _capped_attribute_matrix(self) -> np.ndarray:
        """[N, A] attribute ids (-1 padded) of the attributes that count for the cap."""
        catalogue, max_share = self.catalogue, self.config.cap_attribute_max_share
        ids: dict[str, int] = {}
        per_row = []
        for item in self._items:
            capped = [a for a in catalogue.attributes(item) if catalogue.attribute_share(a) <= max_share]
            per_row.append([ids.setdefault(a, len(ids)) for a in capped])
        width = max((len(r) for r in per_row), default=0) or 1
        matrix = np.full((len(per_row), width), -1, dtype=np.int64)
        for row, attrs in enumerate(per_row):
            matrix[row, : len(attrs)] = attrs
        self._n_capped_attributes = len(ids)
        return matrix

    # ---------------------------------------------------------------- rerank
    def rerank(
        self,
        contexts: list[UserContext],
        cand_rows: np.ndarray,
        cand_scores: np.ndarray,
    ) -> list[list[dict]]:
        """Per user up to k `{"item_id", "score", "because"}` dicts, best first, no duplicates."""
        cand_rows = np.asarray(cand_rows, dtype=np.int64)
        cand_scores = np.asarray(cand_scores, dtype=np.float32)
        if cand_rows.ndim != 2 or cand_rows.shape != cand_scores.shape:
            raise ValueError(f"cand_rows {cand_rows.shape} and cand_scores {cand_scores.shape} must be equal [B, C]")
        if len(contexts) != len(cand_rows):
            raise ValueError(f"{len(contexts)} contexts for {len(cand_rows)} candidate rows")
        if cand_rows.size == 0:
            return [[] for _ in contexts]
        if (cand_rows >= len(self._items)).any():
            log.warning("candidate rows beyond the %d known items ignored; call add_items", len(self._items))
        self._refresh_catalogue_arrays()
        part = self.part_users or len(contexts)
        lists: list[list[dict]] = []
        for start in range(0, len(contexts), part):
            users = slice(start, start + part)
            lists += self._rerank_part(contexts[users], cand_rows[users], cand_scores[users])
        return lists

    def _rerank_part(self, contexts: list[UserContext], cand_rows: np.ndarray,
                     cand_scores: np.ndarray) -> list[list[dict]]:
        history = self.rows_by_user([c.history for c in contexts])
        excluded = self._excluded(contexts, history, cand_rows)
        return self._as_lists(*self._rank(history, cand_rows, cand_scores, excluded))

    def _rank(self, history: UserRows, cand_rows: np.ndarray, cand_scores: np.ndarray,
              excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's arrays: each user's picks [B, k] (rows, -1 = none), their relevance and
        their "because" rows."""
        keep = self._keep_mask(cand_rows, excluded)
        safe_rows = np.where(keep, cand_rows, 0)
        relevance = self._relevance(cand_scores, safe_rows, keep)
        mean, spread = _mean_and_spread(relevance, keep)
        # Only the best `pool` candidates can realistically make the list: MMR runs on those.
        pool = min(relevance.shape[1], max(MMR_POOL_MIN, MMR_POOL_PER_SLOT * self.config.k))
        best = np.argsort(-relevance, axis=1, kind="stable")[:, :pool]
        relevance = np.take_along_axis(relevance, best, 1)
        safe_rows = np.take_along_axis(safe_rows, best, 1)
        keep = np.take_along_axis(keep, best, 1)
        z = np.where(keep, (relevance - mean) / spread, -np.inf).astype(np.float32)
        chosen = self._select(z, safe_rows, keep)  # [B, k] pool columns, -1 = none
        picked = chosen >= 0
        chosen_rows = np.where(picked, np.take_along_axis(safe_rows, np.maximum(chosen, 0), 1), -1)
        chosen_rel = np.take_along_axis(relevance, np.maximum(chosen, 0), 1)
        return chosen_rows, chosen_rel, self._because(history, chosen_rows)

    def _excluded(self, contexts: list[UserContext], history: UserRows, cand_rows: np.ndarray) -> np.ndarray:
        """[B, C] True where a candidate is what its user must not be shown (purchases; recent
        history with `drop_recent`): one hashed membership test of ``user * (N + 1) + row`` codes
        for the whole batch (numpy's; torch.isin took 12 ms against 0.8 for 1,024 users' 200)."""
        n = len(self._items)
        bought = self.rows_by_user([list(c.purchased) for c in contexts])
        codes = [bought.codes(n)]
        if self.config.drop_recent:
            codes.append(history.newest(self.config.recent_window).codes(n))
        return np.isin(cand_rows + np.arange(len(contexts))[:, None] * (n + 1), np.concatenate(codes))

    def _keep_mask(self, cand_rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """False for padding, unknown rows, duplicates, excluded and unavailable items."""
        n = len(self._items)
        keep = (cand_rows >= 0) & (cand_rows < n) & ~excluded
        # Duplicates: keep the first occurrence (stable sort keeps equal rows in column order).
        order = np.argsort(cand_rows, axis=1, kind="stable")
        in_order = np.take_along_axis(cand_rows, order, 1)
        repeat = np.zeros_like(keep)
        repeat[:, 1:] = in_order[:, 1:] == in_order[:, :-1]
        duplicate = np.empty_like(keep)
        np.put_along_axis(duplicate, order, repeat, 1)
        keep &= ~duplicate
        if self.config.drop_unavailable:
            keep &= self._available_rows[np.where(keep, cand_rows, 0)]
        return keep

    def _relevance(self, scores: np.ndarray, safe_rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Model score plus the boost, in units of the user's score spread; -inf where dropped."""
        relevance = np.where(keep, scores, 0.0).astype(np.float32)
        boosts = self._boost_rows[safe_rows]
        if self.config.boost_weight and np.any(boosts[keep]):
            _, spread = _mean_and_spread(relevance, keep)
            relevance = relevance + self.config.boost_weight * boosts * spread
        return np.where(keep, relevance, -np.inf).astype(np.float32)

    def _select(self, z: np.ndarray, safe_rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Greedy MMR on standardised relevance `z` (and attribute caps): [B, k] columns."""
        batch, width = z.shape
        k = min(self.config.k, width)
        diversity = self.config.diversity
        caps = self._capped_attributes if self.config.max_per_attribute is not None else None
        if diversity <= 0 and caps is None:  # columns are already in relevance order
            top = np.broadcast_to(np.arange(k), (batch, k))
            return np.where(keep[:, :k], top, NOT_CHOSEN)
        # z - diversity * (max similarity to the chosen), -inf once chosen or closed. The max
        # only grows, so each step takes the minimum with z - diversity * (similarity to the
        # new pick): the same floats as recomputing it (rounding is monotone), in fewer passes
        # over [B, C]; attribute caps close candidates by setting them to -inf too.
        if diversity > 0:   # numpy's, so that a step's gather is numpy's, not torch's
            # [B, C, C] cosines; bf16 ones as their bits, widened a row (a pick's) at a time:
            # MMR reads 20 of 100 rows, and widening the whole array took ~15 of ~120 us per list
            gram = host_view(self._similarities(safe_rows))
        marginal = np.where(keep, z, -np.inf)
        chosen = np.full((batch, k), NOT_CHOSEN, dtype=np.int64)
        users = np.arange(batch)
        if caps is not None:
            cand_attrs = caps[safe_rows]  # [B, C, A]
            counts = np.zeros((batch, self._n_capped_attributes + 1), dtype=np.int32)
        for step in range(k):
            pick = np.argmax(marginal, axis=1)
            has = marginal[users, pick] > -np.inf
            chosen[:, step] = np.where(has, pick, NOT_CHOSEN)
            if not has.any():
                break
            marginal[users, pick] = -np.inf
            if diversity > 0:
                # the pick's row: its similarities to the pool, contiguous (a column would read
                # one cache line per candidate)
                np.minimum(marginal, z - diversity * as_float32(gram[users, pick]), out=marginal)
            if caps is not None:
                # Only the attributes of this pick can have just reached the cap.
                attrs = cand_attrs[users, pick]  # [B, A]; -1 pads count into the last slot
                counts[users[:, None], attrs] += has[:, None]  # an item's attributes are distinct
                counts[:, -1] = 0
                full = np.where(counts[users[:, None], attrs] >= self.config.max_per_attribute, attrs, -2)
                marginal[(cand_attrs[:, :, :, None] == full[:, None, None, :]).any(axis=(2, 3))] = -np.inf
        return chosen

    def _similarities(self, rows) -> torch.Tensor:
        """[B, C, C] cosine similarities among each user's candidates (a torch tensor): one batched
        product, after which each greedy step only reads a column, instead of C x D work per step."""
        unit = self._product_rows("unit", rows)
        return torch.bmm(unit, unit.transpose(1, 2))

    def _product_rows(self, which: str, rows: np.ndarray) -> torch.Tensor:
        """``rows`` ([...], none negative) of the item or unit vectors, [..., D]. numpy's take
        copies each row whole, where torch's index_select copies bf16 element by element: 1,500
        rows of 256 took ~22 against ~49 us warm, ~170 against ~260 after a large product had
        taken the caches (as the encoder's pass does before a rerank)."""
        table = self._for_products(which)
        return torch.from_numpy(np.take(host_view(table), rows, axis=0)).view(table.dtype)

    def _for_products(self, which: str) -> torch.Tensor:
        """Torch copies of the item vectors (``vectors``) or unit vectors (``unit``) for the
        batched products, on the device in its product dtype; rebuilt when items were added."""
        source = self._vectors if which == "vectors" else self._unit
        cached = self._product_cache.get(which)
        if cached is None or len(cached) != len(source):
            cached = self._product_cache[which] = torch.from_numpy(source).to(self.device, product_dtype(self.device))
        return cached

    def _because(self, history: UserRows, chosen_rows: np.ndarray) -> np.ndarray:
        """[B, k] row of the history item closest (inner product) to each pick; -1 = none."""
        batch, k = chosen_rows.shape
        if not len(history.rows):
            return np.full((batch, k), -1, dtype=np.int64)
        # Always BECAUSE_HISTORY_MAX wide, however long the batch's histories: oneDNN builds a
        # kernel for each new shape of a bf16 product (~0.4 ms), and widths that followed the
        # longest history made a new shape of most batches.
        width = BECAUSE_HISTORY_MAX
        padded = history.padded(width)
        hist = self._product_rows("vectors", np.maximum(padded, 0))
        recs = self._product_rows("vectors", np.maximum(chosen_rows, 0))
        affinity = torch.bmm(recs, hist.transpose(1, 2)).float().numpy()   # [B, k, H]
        invalid = (padded[:, None, :] < 0) | (padded[:, None, :] == chosen_rows[:, :, None])
        affinity[invalid] = -np.inf
        best = np.argmax(affinity, axis=2)
        found = np.isfinite(np.take_along_axis(affinity, best[:, :, None], 2)[:, :, 0])
        return np.where(found, np.take_along_axis(padded, best, 1), -1)

    def _as_lists(self, rows: np.ndarray, scores: np.ndarray, because: np.ndarray) -> list[list[dict]]:
        items = self._items
        lists = []
        for user_rows, user_scores, user_because in zip(rows.tolist(), scores.tolist(), because.tolist()):
            lists.append(
                [
                    {
                        "item_id": items[row],
                        "score": score,
                        "because": items[reason] if reason >= 0 else None,
                    }
                    for row, score, reason in zip(user_rows, user_scores, user_because)
                    if row >= 0
                ]
            )
        return lists


class DeviceReranker(Reranker):
    """`Reranker`'s batch arrays in torch on a device (the encoder's GPU): the same steps and
    rules, the same lists (tests compare the two); only the per-user Python work stays on the
    CPU. The candidates come in and the picks go out as numpy arrays."""

    part_users = None   # a GPU takes the whole batch in one pass

    def __init__(self, config: RerankConfig, catalogue: Catalogue, item_vectors: np.ndarray, items: list[str],
                 device: str | torch.device):
        self.device = torch.device(device)
        self._device_key: tuple | None = None
        super().__init__(config, catalogue, item_vectors, items)

    def _product_rows(self, which: str, rows: torch.Tensor) -> torch.Tensor:
        """``Reranker._product_rows`` for rows on the device: gathered there."""
        return self._for_products(which).index_select(0, rows.reshape(-1)).view(*rows.shape, -1)

    def _refresh_catalogue_arrays(self) -> None:
        super()._refresh_catalogue_arrays()
        key = (self._cache_key, self._attributes_key)
        if key == self._device_key:
            return
        self._available_on = torch.from_numpy(self._available_rows).to(self.device)
        self._boost_on = torch.from_numpy(self._boost_rows).to(self.device)
        self._any_boost = bool(self._boost_rows.any())
        capped = self._capped_attributes
        self._capped_on = None if capped is None else torch.from_numpy(capped).to(self.device)
        self._device_key = key

    @torch.inference_mode()
    def _rank(self, history, cand_rows, cand_scores, excluded):
        rows, scores, excluded = (torch.from_numpy(a).to(self.device) for a in (cand_rows, cand_scores, excluded))
        keep = self._keep_mask(rows, excluded)
        safe_rows = torch.where(keep, rows, 0)
        relevance = self._relevance(scores, safe_rows, keep)
        mean, spread = _device_mean_and_spread(relevance, keep)
        pool = min(relevance.shape[1], max(MMR_POOL_MIN, MMR_POOL_PER_SLOT * self.config.k))
        best = torch.sort(relevance, dim=1, descending=True, stable=True).indices[:, :pool]
        relevance, safe_rows, keep = (t.gather(1, best) for t in (relevance, safe_rows, keep))
        z = torch.where(keep, (relevance - mean) / spread, -torch.inf)
        chosen = self._select(z, safe_rows, keep)
        column = chosen.clamp(min=0)
        chosen_rows = torch.where(chosen >= 0, safe_rows.gather(1, column), NOT_CHOSEN)
        chosen_rel = relevance.gather(1, column)
        because = self._because(history, chosen_rows)
        return tuple(t.cpu().numpy() for t in (chosen_rows, chosen_rel, because))

    def _keep_mask(self, cand_rows: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        keep = (cand_rows >= 0) & (cand_rows < len(self._items)) & ~excluded
        order = torch.sort(cand_rows, dim=1, stable=True).indices
        in_order = cand_rows.gather(1, order)
        repeat = torch.zeros_like(keep)
        repeat[:, 1:] = in_order[:, 1:] == in_order[:, :-1]
        keep &= ~torch.empty_like(keep).scatter_(1, order, repeat)
        if self.config.drop_unavailable:
            keep &= self._available_on[torch.where(keep, cand_rows, 0)]
        return keep

    def _relevance(self, scores: torch.Tensor, safe_rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        relevance = torch.where(keep, scores, 0.0)
        if self.config.boost_weight and self._any_boost:   # a boost of 0 adds exactly nothing
            _, spread = _device_mean_and_spread(relevance, keep)
            relevance = relevance + self.config.boost_weight * self._boost_on[safe_rows] * spread
        return torch.where(keep, relevance, -torch.inf)

    def _select(self, z: torch.Tensor, safe_rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, width = z.shape
        k = min(self.config.k, width)
        diversity = self.config.diversity
        caps = self._capped_on if self.config.max_per_attribute is not None else None
        if diversity <= 0 and caps is None:
            return torch.where(keep[:, :k], torch.arange(k, device=z.device).expand(batch, k), NOT_CHOSEN)
        # As `Reranker._select`, without asking the device after each step whether anyone is
        # left (a user with none left picks -1 from then on).
        if diversity > 0:
            gram = self._similarities(safe_rows)
        marginal = torch.where(keep, z, -torch.inf)
        best = torch.empty((k, batch), dtype=z.dtype, device=z.device)
        picks = torch.empty((k, batch), dtype=torch.int64, device=z.device)
        if caps is not None:
            cand_attrs = caps[safe_rows]  # [B, C, A]
            counts = torch.zeros((batch, self._n_capped_attributes + 1), dtype=torch.int32, device=z.device)
        for step in range(k):
            pick = picks[step]
            torch.max(marginal, dim=1, out=(best[step], pick))
            marginal.scatter_(1, pick[:, None], -torch.inf)
            if diversity > 0:
                similar = gram.gather(1, pick[:, None, None].expand(batch, 1, width))[:, 0]   # the pick's row
                torch.minimum(marginal, z - diversity * similar.float(), out=marginal)
            if caps is not None:
                attrs = cand_attrs.gather(1, pick[:, None, None].expand(batch, 1, cand_attrs.shape[2]))[:, 0]
                slots = attrs % counts.shape[1]   # -1 pads count into the last slot
                counts.scatter_add_(1, slots, (best[step] > -torch.inf)[:, None].int().expand_as(slots))
                counts[:, -1] = 0
                full = torch.where(counts.gather(1, slots) >= self.config.max_per_attribute, attrs, -2)
                closed = (cand_attrs[:, :, :, None] == full[:, None, None, :]).any(dim=3).any(dim=2)
                marginal.masked_fill_(closed, -torch.inf)
        return torch.where(best > -torch.inf, picks, NOT_CHOSEN).T.contiguous()

    def _because(self, history: UserRows, chosen_rows: torch.Tensor) -> torch.Tensor:
        batch, k = chosen_rows.shape
        if not len(history.rows):
            return torch.full((batch, k), -1, dtype=torch.int64, device=self.device)
        padded = torch.from_numpy(history.padded(BECAUSE_HISTORY_MAX)).to(self.device)
        hist = self._product_rows("vectors", padded.clamp(min=0))
        recs = self._product_rows("vectors", chosen_rows.clamp(min=0))
        affinity = torch.bmm(recs, hist.transpose(1, 2)).float()   # [B, k, H]
        invalid = (padded[:, None, :] < 0) | (padded[:, None, :] == chosen_rows[:, :, None])
        affinity.masked_fill_(invalid, -torch.inf)
        best = affinity.argmax(dim=2)
        found = torch.isfinite(affinity.gather(2, best[:, :, None])[:, :, 0])
        return torch.where(found, padded.gather(1, best), -1)


def product_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the similarity and "because" products on ``device`` (bf16 where it is fast
    there: CUDA; on the CPU PRODUCT_DTYPE)."""
    if device.type == "cpu":
        return PRODUCT_DTYPE
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def reranker_for(device: str | torch.device, config: RerankConfig, catalogue: Catalogue,
                 item_vectors: np.ndarray, items: list[str]) -> Reranker:
    """The reranker that does its batch arrays where ``device`` is: numpy on the CPU, torch on a GPU."""
    if torch.device(device).type == "cpu":
        return Reranker(config, catalogue, item_vectors, items)
    return DeviceReranker(config, catalogue, item_vectors, items, device)


def _device_mean_and_spread(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_mean_and_spread` in torch, summed in float64 as numpy sums it there."""
    values = values.double()
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(keep, values, 0.0).sum(dim=1, keepdim=True) / count
    variance = torch.where(keep, values - mean, 0.0).square().sum(dim=1, keepdim=True) / count
    spread = variance.sqrt()
    return mean.float(), torch.where(spread > 0, spread, 1.0).float()


def _mean_and_spread(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user mean and standard deviation of the kept values ([B, 1]; spread 1.0 if 0)."""
    count = np.maximum(keep.sum(axis=1, keepdims=True), 1)
    mean = np.where(keep, values, 0.0).sum(axis=1, keepdims=True) / count
    variance = (np.where(keep, values - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / count
    spread = np.sqrt(variance)
    return mean.astype(np.float32), np.where(spread > 0, spread, 1.0).astype(np.float32)
