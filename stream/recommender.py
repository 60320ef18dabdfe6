"""One micro-batch of users -> ranked lists: encode (model/), search (index/), rerank (index/).

This is the batched, CPU/GPU-heavy part of the worker; it runs off the event loop in a
worker thread (torch and faiss release the GIL). With ``lanes`` > 1 a large batch's users are split
by a hash of their id and each part is encoded, searched and reranked on its own thread, with
its own share of the encoder cache: the cores work on one batch at once. A new model directory
is loaded in the background and swapped in between batches (hot-swap), so each list names the
model version that produced it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.catalogue import Catalogue
from index.cold_start import AttributeEmbedder
from index.item_index import EXACT_MAX_ITEMS, GPU_EXACT_MAX_ITEMS, ItemIndex, gpu_available
from index.rerank import Reranker, RerankConfig, UserContext, reranker_for
from index.trending import Trending, event_weights
from model.artifact import METADATA, ModelArtifact
from model.data import load_log
from model.incremental import DEFAULT_BUDGET_BYTES, EncodeRequest, IncrementalEncoder, for_serving
from stream.state import UserState
from stream.threads import LANE_THREAD, name_os_thread

log = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
CANDIDATES_PER_K = 10       # FAISS candidates fetched per list slot, before filters and diversity
MIN_CANDIDATES = 100
TUNING_USERS = 512          # user vectors the ANN index's nprobe is tuned on
REFIT_GROWTH = 1.2          # refit the attribute embedder when the catalogue grew by 20%
RECOMMEND_STAGES = ("encode", "search", "rerank")   # the stages of stream.metrics.STAGES timed here
# Smaller batches stay on the calling thread: every lane's users in the same encoder passes,
# one search and one rerank. Each pass, search and rerank has a fixed cost that only a large
# part repays.
PARALLEL_MIN_USERS = 64


def start_stage_thread() -> None:
    """Initializer of the recommend stage's threads (an executor's). A new thread's OpenMP team
    size is the machine's, not what the main thread set: faiss gets the torch thread count.
    The OS thread takes the name Python gave it (``recommend_0``, ``lane_0``), so that ``top -H``
    and /proc tell the stage's CPU apart from the event loop's (stream/threads.py)."""
    import faiss
    import torch

    faiss.omp_set_num_threads(torch.get_num_threads())
    name_os_thread(threading.current_thread().name)


@dataclass
class BatchResult:
    """What the recommend thread hands back for a batch: one entry per user, in order."""

    lists: list[list[dict]]
    versions: list[str]             # the model version that made each list
    variants: list[str | None]      # each user's A/B variant (None without variants)
    timings: dict[str, float]       # stage seconds (thread seconds, summed over lanes): encode, search, rerank


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a folder of them (the newest complete one wins), or a symlink."""
    path = Path(path)
    if (path / METADATA).exists():
        return path.resolve()
    if path.is_dir():
        versions = sorted((p for p in path.iterdir() if (p / METADATA).exists()),
                          key=lambda p: (p / METADATA).stat().st_mtime)
        if versions:
            return versions[-1].resolve()
    raise FileNotFoundError(f"no model directory at {path} (expected {METADATA} there or in a subfolder)")


def write_model_dir(out: Path, train_into, users_for_tuning=None):
    """Train into a temporary sibling, add the item index, then rename into place.

    A worker watching ``out`` (or its parent) never sees a half-written model. Above the
    exact-search size the ANN index is tuned on real user vectors (``users_for_tuning``: a
    log or its path), which sit elsewhere in the space than item vectors do.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    artifact = train_into(tmp)
    vectors = artifact.item_embeddings()
    tuning = None
    if users_for_tuning is not None and len(vectors) > EXACT_MAX_ITEMS:
        users = users_for_tuning if isinstance(users_for_tuning, dict) else load_log(users_for_tuning)
        tuning = artifact.encode(list(users.values())[:TUNING_USERS])
    ItemIndex.build(vectors, tuning_queries=tuning).save(tmp / INDEX_FILE)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return artifact


def read_version(model_dir: Path) -> str:
    import json

    return json.loads((model_dir / METADATA).read_text())["version"]


@dataclass
class ServingModel:
    """A loaded model version: encoder, its item index and a reranker over its items.

    Items the model never saw (new in the catalogue) are appended to both the index and the
    reranker, in the same order, with attribute-based vectors.
    """

    artifact: ModelArtifact
    index: ItemIndex
    reranker: Reranker
    path: Path
    incremental: IncrementalEncoder | None = None   # rotary models: one position per new event
    added: set[str] = field(default_factory=set)
    embedder: AttributeEmbedder | None = None
    embedder_fitted_on: int = -1   # catalogue size the embedder was fitted on

    @property
    def version(self) -> str:
        return self.artifact.version

    @classmethod
    def load(cls, path: str | Path, catalogue: Catalogue, config: RerankConfig,
             cache_bytes: int = DEFAULT_BUDGET_BYTES, lanes: int = 1) -> "ServingModel":
        started = time.perf_counter()
        model_dir = resolve_model_dir(path)
        artifact = ModelArtifact.load(model_dir)
        vectors = artifact.item_embeddings()
        index_path = model_dir / INDEX_FILE
        # on a GPU exact search ("auto" there) beats a saved approximate index
        exact_on_gpu = gpu_available() and len(vectors) <= GPU_EXACT_MAX_ITEMS
        index = ItemIndex.load(index_path) if index_path.exists() and not exact_on_gpu else ItemIndex.build(vectors)
        reranker = reranker_for(artifact.device, config, catalogue, vectors, artifact.items)   # beside the encoder
        incremental = None
        if artifact.config.positions == "rope" and cache_bytes > 0:
            incremental = for_serving(artifact.encoder, artifact.token_index, cache_bytes, lanes)
        log.info("loaded model %s from %s (%d items, %s encoding) in %.2fs", artifact.version, model_dir,
                 len(artifact.items), "incremental" if incremental else "full", time.perf_counter() - started)
        return cls(artifact, index, reranker, model_dir, incremental)

    def split(self, count: int, users, new, lanes: int) -> list[tuple[int, list[int]]]:
        """The batch's ``count`` rows per lane, as (lane, rows): by the cache's hash of the user
        where the cache is used (a user's entry lives in one lane), else in ``lanes`` contiguous parts."""
        if self.incremental is not None and users is not None and new is not None:
            lane = self.incremental.lane_of(users)
            return [(n, rows) for n in range(len(self.incremental.lanes))
                    if (rows := np.flatnonzero(lane == n).tolist())]
        bounds = np.linspace(0, count, lanes + 1).astype(int)
        return [(0, list(range(a, b))) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def encode(self, states: list[UserState], users=None, new=None, tails=None, lane: int | None = None) -> np.ndarray:
        """User vectors: incremental where the model and the cache allow, else in full (also
        without ``new``: what each state gained is unknown). ``lane``: every user hashes to it
        (None: users of any lane, in the same passes)."""
        if self.incremental is None or users is None or new is None:
            return self.artifact.encode([s.history() for s in states])
        return self.incremental.encode([
            EncodeRequest(user, state.history(), n, tail, state.last_event_id)
            for user, state, n, tail in zip(users, states, new, tails)], lane)

    def add_unseen_items(self, catalogue: Catalogue) -> int:
        """Make catalogue items with attributes but no trained vector recommendable."""
        known = self.artifact.item_index
        attributes = catalogue.item_attributes
        new = [i for i, attrs in attributes.items() if attrs and i not in known and i not in self.added]
        if not new:
            return 0
        if self.embedder is None or len(attributes) > REFIT_GROWTH * max(self.embedder_fitted_on, 1):
            self.embedder = AttributeEmbedder.fit(self.artifact.item_embeddings(), self.artifact.items,
                                                  attributes)
            self.embedder_fitted_on = len(attributes)
        vectors, ok = self.embedder.embed_many([attributes[i] for i in new])
        items = [i for i, keep in zip(new, ok) if keep]
        if items:
            self.index.add(vectors[ok])
            self.reranker.add_items(items, vectors[ok])
            self.added.update(items)
            log.info("model %s: %d new catalogue items made recommendable from attributes", self.version, len(items))
        return len(items)


class Recommender:
    """Batch recommendation with cold start (trending) and between-batch model swaps."""

    def __init__(self, model_path: str | Path, config: RerankConfig | None = None,
                 catalogue: Catalogue | None = None, trending: Trending | None = None,
                 cache_bytes: int = DEFAULT_BUDGET_BYTES, lanes: int = 1):
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.model_path = Path(model_path)
        self.config = config or RerankConfig()
        self.catalogue = catalogue or Catalogue()
        self.trending = trending or Trending()
        self.cache_bytes = cache_bytes
        self.lanes = lanes
        self.model = ServingModel.load(self.model_path, self.catalogue, self.config, cache_bytes, lanes)
        # the calling thread works one lane, these the others
        self._helpers = ThreadPoolExecutor(lanes - 1, thread_name_prefix=LANE_THREAD,
                                           initializer=start_stage_thread) if lanes > 1 else None
        self._pending: ServingModel | None = None
        self.timings: dict[str, float] = {}
        self._retired_lookups = (0, 0)   # cache hits and misses of the models swapped out

    # --- hot-swap: poll (any thread), then swap on the loop between batches
    def poll_for_new_version(self) -> bool:
        """Load a newer model directory if one appeared; returns True when one is pending."""
        try:
            model_dir = resolve_model_dir(self.model_path)
            version = read_version(model_dir)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            log.warning("model poll: %s", exc)
            return False
        if version == self.model.version or (self._pending and version == self._pending.version):
            return self._pending is not None
        try:
            self._pending = ServingModel.load(model_dir, self.catalogue, self.config, self.cache_bytes, self.lanes)
        except Exception:  # a half-written directory: try again at the next poll
            log.exception("could not load model at %s; keeping %s", model_dir, self.model.version)
            return False
        return True

    def sync_catalogue(self) -> int:
        """Make new catalogue items recommendable (between batches, on the recommend thread)."""
        return self.model.add_unseen_items(self.catalogue)

    def swap_if_pending(self) -> str | None:
        """Serve the pending model from now on (between batches, on the recommend thread)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending.add_unseen_items(self.catalogue)
        if self.model.incremental is not None:   # the counters stay running totals across swaps
            hits, misses = self._retired_lookups
            st = self.model.incremental.stats
            self._retired_lookups = (hits + st.hits, misses + st.misses)
        old, self.model = self.model.version, pending
        log.info("hot-swapped model %s -> %s", old, pending.version)
        return pending.version

    def apply_catalogue(self, updates) -> None:
        """Stock, attribute and boost changes (``ItemUpdate``s) from ``shop-items``."""
        for item in updates:
            if item.removed:
                self.catalogue.remove(item.item_id)
            else:
                self.catalogue.update({"item_id": item.item_id, "in_stock": item.in_stock,
                                       "attributes": list(item.attributes), "boost": item.boost})
        self.sync_catalogue()

    # --- the batch path
    def recommend_batch(self, states: list[UserState], events=(), catalogue_updates=(), users=None, new=None,
                        tails=None, forget=()):
        """The recommend thread's one entry point: catalogue changes, a pending model swap and the
        batch's events (trending) are applied here, between batches, then the lists are made.

        ``users``, ``new`` (events the batch appended to each state) and ``tails`` (each user's last
        event before them) let the encoder fold in only what is new; ``forget`` names erased
        users, whose cached keys and values go.
        """
        if catalogue_updates:
            self.apply_catalogue(catalogue_updates)
        self.swap_if_pending()
        if forget and self.model.incremental is not None:
            for user in forget:
                self.model.incremental.forget(user)
        if events:
            self.trending.observe([e.item_id for e in events], [e.ts for e in events],
                                  event_weights([e.type for e in events]))
        if not states:
            return BatchResult([], [], [], {})
        try:
            lists, version = self.recommend(states, users, new, tails)
        except Exception:
            if self.model.incremental is not None:
                self.model.incremental.clear()   # its entries may be half updated
            raise
        return BatchResult(lists, [version] * len(lists), [None] * len(lists), dict(self.timings))

    def cache_counters(self) -> dict:
        """The encoder cache's running totals since start, across hot-swaps (``cache_*`` keys;
        none if no model served had a cache)."""
        hits, misses = self._retired_lookups
        inc = self.model.incremental
        if inc is None:
            return {"cache_hits": hits, "cache_misses": misses, "cache_users": 0, "cache_bytes": 0} \
                if hits or misses else {}
        st = inc.stats
        return {"cache_hits": hits + st.hits, "cache_misses": misses + st.misses, "cache_users": st.users,
                "cache_bytes": st.bytes}

    def recommend(self, states: list[UserState], users=None, new=None, tails=None) -> tuple[list[list[dict]], str]:
        """Lists for each state, and the version of the model that made them."""
        model = self.model  # one version for the whole batch, even if a swap is pending
        parallel = self._helpers is not None and len(states) >= PARALLEL_MIN_USERS
        parts = model.split(len(states), users, new, self.lanes) if parallel else []
        args = (model, states, users, new, tails)
        if len(parts) > 1:
            model.reranker.prepare()   # shared arrays built here, only read by the lanes
            helpers = [self._helpers.submit(self._recommend_lane, *args, *part) for part in parts[1:]]
            try:
                done = [self._recommend_lane(*args, *parts[0])]
            finally:   # never leave a lane running into the next batch (or a cache clear)
                wait(helpers)
            done += [f.result() for f in helpers]
        else:   # every lane's users in the same encoder passes, then one search and rerank
            spent = dict.fromkeys(RECOMMEND_STAGES, 0.0)
            everyone = list(range(len(states)))
            vectors = self._encode_rows(*args, None, everyone, spent)
            done = [(everyone, self._rank_rows(model, states, everyone, vectors, spent), spent)]
        lists: list[list[dict]] = [[] for _ in states]
        self.timings = timings = dict.fromkeys(RECOMMEND_STAGES, 0.0)
        for rows, ranked, spent in done:
            for i, got in zip(rows, ranked):
                lists[i] = got
            for stage, seconds in spent.items():
                timings[stage] += seconds
        started = time.perf_counter()
        for i, state in enumerate(states):
            if not lists[i]:  # cold start: no usable history, or filters left nothing
                lists[i] = self.cold_start(state)
        timings["rerank"] += time.perf_counter() - started
        return lists, model.version

    @classmethod
    def _recommend_lane(cls, model: ServingModel, states, users, new, tails, lane: int, rows: list[int]):
        """Encode, search and rerank the batch's ``rows`` (one lane's users): (rows, lists, seconds)."""
        spent = dict.fromkeys(RECOMMEND_STAGES, 0.0)
        vectors = cls._encode_rows(model, states, users, new, tails, lane, rows, spent)
        return rows, cls._rank_rows(model, states, rows, vectors, spent), spent

    @staticmethod
    def _encode_rows(model: ServingModel, states, users, new, tails, lane: int | None, rows: list[int], spent: dict):
        """User vectors of the batch's ``rows`` (one lane's users, or any with ``lane`` None), in their order."""
        started = time.perf_counter()
        pick = (lambda values: None if values is None else [values[i] for i in rows])
        vectors = model.encode([states[i] for i in rows], pick(users), pick(new), pick(tails), lane)
        spent["encode"] += time.perf_counter() - started
        return vectors

    @staticmethod
    def _rank_rows(model: ServingModel, states, rows: list[int], vectors: np.ndarray, spent: dict) -> list[list[dict]]:
        """Search and rerank for the batch's ``rows`` with ``vectors`` (one per row, in order); []
        where a vector is zero (no known item: cold start)."""
        t0 = time.perf_counter()
        warm = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)
        lists: list[list[dict]] = [[] for _ in rows]
        t1 = t0
        if len(warm):
            n_cand = min(len(model.index), max(MIN_CANDIDATES, CANDIDATES_PER_K * model.reranker.config.k))
            scores, found = model.index.search(vectors[warm], n_cand)
            t1 = time.perf_counter()
            mine = [states[rows[i]] for i in warm]
            contexts = [UserContext(history=s.items, purchased=frozenset(s.purchased)) for s in mine]
            for i, ranked in zip(warm, model.reranker.rerank(contexts, found, scores)):
                lists[i] = ranked
        spent["search"] += t1 - t0
        spent["rerank"] += time.perf_counter() - t1
        return lists

    def cold_start(self, state: UserState) -> list[dict]:
        exclude = set(state.items) | set(state.purchased)
        top = self.trending.top(self.config.k, exclude=exclude, available=self.catalogue)
        return [{"item_id": item, "score": float(score), "because": None} for item, score in top]
