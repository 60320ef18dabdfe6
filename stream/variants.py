"""A/B variants: several models served at once, each user always in the same one.

``streamrec worker --variant control=models/a:1 --variant treatment=models/b:1`` serves both;
a user's variant is a stable hash of the experiment name and the user id mapped onto the
weights, so it is the same on every worker, after every restart and rebalance, and changes
only when the experiment name or the weights do. Each list names its ``variant``; each
variant's model directory (or folder of versions) is hot-swapped on its own. The catalogue
and the trending items are shared: they describe the shop, not a model.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream.recommender import BatchResult, Recommender

DEFAULT_EXPERIMENT = "streamrec"


@dataclass(frozen=True)
class Variant:
    name: str
    model: Path
    weight: float = 1.0


def parse_variant(spec: str) -> Variant:
    """``NAME=MODEL_DIR[:WEIGHT]`` -> Variant (a clear ValueError otherwise)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant takes NAME=MODEL_DIR[:WEIGHT], got {spec!r}")
    path, weight = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass   # a colon in the path itself
    if not weight > 0:
        raise ValueError(f"variant {name}: the weight must be positive, got {weight}")
    return Variant(name, Path(path), weight)


def bucket(experiment: str, user: str) -> float:
    """A user's stable position in [0, 1) for ``experiment`` (the same on every machine)."""
    digest = hashlib.blake2b(f"{experiment}\x1f{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def shares(variants: list[Variant]) -> list[float]:
    """The upper ends of the variants' consecutive shares of [0, 1), in order."""
    return list(np.cumsum([v.weight for v in variants]) / sum(v.weight for v in variants))


def assign(experiment: str, user: str, variants: list[Variant], bounds: list[float] | None = None) -> int:
    """The index of ``user``'s variant: weights cut [0, 1) into consecutive shares (``bounds``:
    ``shares(variants)``, computed once by a caller that assigns many users)."""
    bounds = shares(variants) if bounds is None else bounds
    return min(bisect.bisect_right(bounds, bucket(experiment, user)), len(variants) - 1)


class VariantRecommender:
    """Recommender's batch interface over one Recommender per variant (shared catalogue, trending)."""

    def __init__(self, variants: list[Variant], config=None, experiment: str = DEFAULT_EXPERIMENT,
                 cache_bytes: int | None = None, lanes: int = 1):
        if not variants:
            raise ValueError("no variants")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ, got {names}")
        self.variants = variants
        self.experiment = experiment
        kwargs = {"lanes": lanes}
        if cache_bytes is not None:
            kwargs["cache_bytes"] = cache_bytes // len(variants)
        first = Recommender(variants[0].model, config, **kwargs)
        self.recommenders = [first] + [Recommender(v.model, config, catalogue=first.catalogue,
                                                   trending=first.trending, **kwargs) for v in variants[1:]]
        self.bounds = shares(variants)

    def variant_of(self, user: str) -> int:
        return assign(self.experiment, user, self.variants, self.bounds)

    def recommend_batch(self, states, events=(), catalogue_updates=(), users=None, new=None, tails=None, forget=()):
        """Recommender.recommend_batch per variant, put back in the batch's order (stage seconds
        summed over the variants)."""
        first = self.recommenders[0]
        if catalogue_updates:
            first.apply_catalogue(catalogue_updates)   # the shared catalogue, and the first model's items
            for rec in self.recommenders[1:]:
                rec.sync_catalogue()
        for n, rec in enumerate(self.recommenders):
            # the shop's events feed trending once; each model forgets the erased users
            rec.recommend_batch([], events if n == 0 else (), (), forget=forget)
        lists: list = [None] * len(states)
        versions: list = [None] * len(states)
        names: list = [None] * len(states)
        timings: dict[str, float] = {}
        groups: dict[int, list[int]] = {}
        for n, user in enumerate(users):
            groups.setdefault(self.variant_of(user), []).append(n)
        for v, rows in groups.items():
            rec = self.recommenders[v]
            got = rec.recommend_batch([states[n] for n in rows], (), (), [users[n] for n in rows],
                                      [new[n] for n in rows] if new is not None else None,
                                      [tails[n] for n in rows] if tails is not None else None)
            for n, ranked, version in zip(rows, got.lists, got.versions):
                lists[n], versions[n], names[n] = ranked, version, self.variants[v].name
            for stage, seconds in got.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return BatchResult(lists, versions, names, timings)

    def poll_for_new_version(self) -> bool:
        return any([rec.poll_for_new_version() for rec in self.recommenders])

    def cache_counters(self) -> dict:
        total: dict = {}
        for rec in self.recommenders:
            for key, value in rec.cache_counters().items():
                total[key] = total.get(key, 0) + value
        return total
