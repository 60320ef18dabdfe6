"""Synthetic shop traffic for the demo, tests and load tests (no real data needed).

What makes it shop-like rather than noise:
- items belong to categories and brands; popularity within a category follows a power law;
- each user has one to three category interests;
- users come back in sessions (hours to days apart); inside a session they browse one
  category, often moving to an item related to the last one (the sequential signal);
- a funnel: view -> click -> add_to_cart -> purchase, each step less likely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

ZIPF_EXPONENT = 1.1
RELATED_STEP_P = 0.55        # chance the next view is an item related to the last one
FUNNEL = {"click": 0.35, "add_to_cart": 0.25, "purchase": 0.45}  # conditional step probabilities


@dataclass(frozen=True)
class ShopSpec:
    users: int = 2000
    items: int = 600
    categories: int = 12
    brands: int = 40
    sessions_per_user: tuple[int, int] = (2, 6)
    views_per_session: tuple[int, int] = (2, 8)
    start_ts: float = 1_700_000_000.0
    days: float = 30.0
    seed: int = 0


def item_id(i: int) -> str:
    return f"sku-{i:05d}"


def user_id(u: int) -> str:
    return f"user-{u:05d}"


def catalogue(spec: ShopSpec) -> dict[str, list[str]]:
    """item id -> attributes (category and brand), as a shop's catalogue would send them."""
    rng = np.random.default_rng(spec.seed + 1)
    cats = np.arange(spec.items) % spec.categories
    brands = rng.integers(0, spec.brands, spec.items)
    return {item_id(i): [f"category:{cats[i]}", f"brand:{brands[i]}"] for i in range(spec.items)}


def generate(spec: ShopSpec = ShopSpec()) -> list[dict]:
    """Contract-format events (without ``v``), sorted by time across all users."""
    rng = np.random.default_rng(spec.seed)
    by_cat = [np.arange(c, spec.items, spec.categories) for c in range(spec.categories)]
    # power-law popularity inside each category (a random rank order, so ids carry no signal)
    pop = []
    for members in by_cat:
        rank = rng.permutation(len(members)) + 1
        p = rank.astype(float) ** -ZIPF_EXPONENT
        pop.append(p / p.sum())
    events: list[dict] = []
    horizon = spec.days * 86400.0
    for u in range(spec.users):
        n_interests = int(rng.integers(1, 4))
        interests = rng.choice(spec.categories, n_interests, replace=False)
        weights = rng.dirichlet(np.ones(n_interests))
        t = spec.start_ts + float(rng.uniform(0, horizon * 0.3))
        for _ in range(int(rng.integers(*spec.sessions_per_user, endpoint=True))):
            c = int(rng.choice(interests, p=weights))
            members, p = by_cat[c], pop[c]
            pos = int(rng.choice(len(members), p=p))
            for _ in range(int(rng.integers(*spec.views_per_session, endpoint=True))):
                item = item_id(int(members[pos]))
                t += float(rng.exponential(40.0))
                events.append(_event(u, item, "view", t))
                for step in ("click", "add_to_cart", "purchase"):
                    if rng.random() >= FUNNEL[step]:
                        break
                    t += float(rng.exponential(15.0))
                    events.append(_event(u, item, step, t))
                if rng.random() < RELATED_STEP_P:
                    pos = (pos + int(rng.integers(1, 4))) % len(members)
                else:
                    pos = int(rng.choice(len(members), p=p))
            t += float(rng.exponential(horizon / 8))
    events.sort(key=lambda e: e["ts"])
    return events


def extend_in_time(events: list[dict], n: int) -> list[dict]:
    """``n`` events: ``events`` again and again, each round later in time, with fresh ids."""
    if not events:
        return []
    out = list(events[:n])
    while len(out) < n:
        shift = out[-1]["ts"] - events[0]["ts"] + 1.0
        out += [{**e, "event_id": f"{e['event_id']}+{len(out)}", "ts": e["ts"] + shift}
                for e in events[: n - len(out)]]
    return out


def _event(u: int, item: str, kind: str, ts: float) -> dict:
    uid = user_id(u)
    eid = hashlib.blake2b(f"{uid}|{item}|{kind}|{ts:.6f}".encode(), digest_size=10).hexdigest()
    return {"event_id": eid, "user_id": uid, "item_id": item, "type": kind, "ts": round(ts, 6)}


@dataclass(frozen=True)
class ScaleSpec:
    """A load-test shop: a large catalogue, users whose histories are already full, and a
    stream in which a few users are very active and most are not (Zipf over users)."""

    users: int = 50_000
    items: int = 60_000
    categories: int = 200
    history: int = 50              # events each user already has (the encoder's window)
    user_zipf: float = 1.0         # activity of the user at rank r is proportional to r ** -user_zipf
    start_ts: float = 1_750_000_000.0
    seed: int = 0


class ScaleShop:
    """Vectorised walks through a category-structured catalogue (one per user): histories to
    pre-load as state and training data, then a stream that continues each user's walk."""

    TYPES = ("view", "click", "add_to_cart", "purchase")
    TYPE_P = (0.82, 0.1, 0.05, 0.03)

    def __init__(self, spec: ScaleSpec = ScaleSpec()):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.per_cat = spec.items // spec.categories
        rank = np.arange(1, self.per_cat + 1, dtype=float) ** -ZIPF_EXPONENT
        self.rank_p = rank / rank.sum()
        # a random popularity order inside each category, so item ids carry no signal
        self.order = np.stack([self.rng.permutation(self.per_cat) for _ in range(spec.categories)])
        self.category = self.rng.integers(0, spec.categories, spec.users)
        self.pos = self.rng.choice(self.per_cat, spec.users, p=self.rank_p)
        activity = np.arange(1, spec.users + 1, dtype=float) ** -spec.user_zipf
        self.user_p = (activity / activity.sum())[self.rng.permutation(spec.users)]
        self.clock = np.full(spec.users, spec.start_ts)

    def item_of(self, category: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return category * self.per_cat + self.order[category, pos]

    def step(self, users: np.ndarray) -> np.ndarray:
        """Advance the walks of ``users`` by one event each; returns their item numbers."""
        rng, n = self.rng, len(users)
        related = rng.random(n) < RELATED_STEP_P
        jump = rng.random(n) < 0.05                       # now and then, another interest
        self.category[users[jump]] = rng.integers(0, self.spec.categories, int(jump.sum()))
        fresh = rng.choice(self.per_cat, n, p=self.rank_p)
        self.pos[users] = np.where(related & ~jump, (self.pos[users] + rng.integers(1, 4, n)) % self.per_cat, fresh)
        self.clock[users] += rng.exponential(600.0, n)
        return self.item_of(self.category[users], self.pos[users])

    def histories(self) -> dict[str, list[tuple[str, str, float]]]:
        """Every user's first ``history`` events, oldest first."""
        users = np.arange(self.spec.users)
        steps = [(self.step(users), self.rng.choice(4, len(users), p=self.TYPE_P), self.clock.copy())
                 for _ in range(self.spec.history)]
        return {user_id(u): [(item_id(int(items[u])), self.TYPES[types[u]], float(ts[u])) for items, types, ts in steps]
                for u in range(self.spec.users)}

    def stream(self, n: int) -> list[dict]:
        """``n`` contract events continuing the walks, users drawn by activity (Zipf)."""
        users = self.rng.choice(self.spec.users, n, p=self.user_p)
        out = []
        for start in range(0, n, 4096):   # users repeat within a chunk: step them one at a time
            for u in users[start:start + 4096]:
                item = int(self.step(np.array([u]))[0])
                kind = self.TYPES[int(self.rng.choice(4, p=self.TYPE_P))]
                out.append(_event(int(u), item_id(item), kind, float(self.clock[u])))
        return out


def preloaded_state(user: str, history: list[tuple[str, str, float]]):
    """The state the worker would hold after ``history`` (event ids ``{user}/h{n}``), built by
    its own rule (``UserState.apply``): the scale workload's preload and its benchmarks."""
    from stream.events import ShopEvent
    from stream.state import UserState

    state = UserState()
    state.apply([ShopEvent(f"{user}/h{n}", user, item, kind, ts) for n, (item, kind, ts) in enumerate(history)])
    return state
