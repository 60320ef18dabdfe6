"""Encode a user's new events one position at a time, against a cache of keys and values.

With rotary positions (model/encoder.py) the keys and values an event produced in each layer
never change as newer events arrive; what changes is only how far back each one lies. So a
user's vector after a new event needs one position's pass through the blocks, attending over
the cached keys and values of that user's last ``max_len - 1`` known events -- not a pass over
the whole window (per event: ~1/max_len of the linear layers' work). A user's several new events
in one batch (a session's burst, coalesced) go through one pass together, attending to the
cached ring and causally to each other.

The cache keeps, per user, each layer's keys (rotated by their position) and values in a ring
of ``max_len`` slots indexed by position, the next position, the user's last vector, and the
id of the last event folded in. Positions are moved back by a multiple of ``max_len`` (keys
rotated back with them) before they grow large enough to cost float32 precision. Users are
evicted least-recently-used beyond a byte budget; a user the cache does not hold (or holds
for another event or model version) is encoded in full from the stored history, which
refills the cache.

Agreement: for a history of at most ``max_len`` known events, incremental and full encoding
compute the same thing; they differ by rounding (tests/test_incremental.py states the
tolerance). Past ``max_len`` events the incremental vector still sees, through its cached
keys, a little of the events older than the window that a full recompute cannot see.
"""

from __future__ import annotations

import copy
import zlib
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from model.artifact import cpu_has_amx_bf16, host_view
from model.data import Interaction, TYPE_ID, featurize, gap_bucket
from model.encoder import Packing, SequenceEncoder, encode_packed, rotate

DEFAULT_BUDGET_BYTES = 1 << 30      # 1 GiB of keys/values: ~10k active users at 256 wide, bf16
MAX_STEPS = 8                       # more new known events than this in one batch: encode in full
# A step pass's fixed cost in positions of full-recompute work. Fitted on the shop workload's
# passes (batches of 126 events, 256 wide, bf16, 1 thread): a step pass took 2.1 ms + 25 us per
# padded position, a full recompute (packed) 2.2 ms + 12.9 us per position. So a batch that
# recomputes someone anyway takes a few short windows along rather than paying for a step pass.
ROUND_COST = 160
# a position in a step pass, in the same unit: it attends over a gathered ring, and padding
# counts (a one-off measurement, 256 wide, bf16, 1 thread: ~19-21 us per padded position at
# 64-256 users with 4-6 new events, against ~13 us per position of a full recompute)
STEP_POSITION_COST = 1.5
# users per full-recompute pass: a pass's activations (~26 MB at 128 users of 50 events, 256
# wide) stay in the caches and the heap; 512 users in passes of 128 took 565-810 us per user
# against 657-904 in one pass (bf16, 1 thread, 6 alternating runs: benchmarks/encoder.py
# --full-chunks 128 512)
FULL_CHUNK = 128
# On a GPU one pass takes a whole batch's misses: there a pass costs its kernel launches and the
# Python around them, not its activations. The scale workload's first phase on an H200 with the
# process pinned to 2 cores (2 lanes, random weights; benchmarks/stage.py's run from a scratch
# script, one run each, in one process): passes of up to 4,096 users 8,304 events/s, encode 228
# us per list; passes of 128 users 4,672 events/s, 631 us. Those runs still compiled attention
# kernels per shape (`model.artifact.keep_attention_precompiled`, found after), the 128-user runs first.
GPU_FULL_CHUNK = 4096
# a full-recompute pass packs its windows into shared rows (model/encoder.py) only when that
# saves at least this many padded positions: the packing's indexing costs a pass ~0.3-0.6 ms,
# the work of ~30-50 positions (bf16, 1 thread, scratch runs, alternating: one window of 1-50
# events 1,869 against 1,587 us, 8 windows of 50 events 5,518-5,814 against 4,678-5,123)
PACK_MIN_SAVED_POSITIONS = 48
# passes of up to this many rows (users x positions) find their linear layers' kernels built
# at load (``FusedLinear.build_kernels``: 128 row counts, 1.1 s at 256 wide); larger passes
# come with a backlog, where a kernel's few ms do not matter. bench e2e --rates
# max,500,2000,5000,5000 on Kafka, p99 at the first 5,000/s phase: 27.8, 27.3, 30.7 and 33.1 ms
# against 61.3, 46.3, 36.5, 45.7 and 27.3 without (docs/performance.md, "Kernels built at load")
KERNEL_ROWS = 2048
REBASE_WINDOWS = 64                 # positions move back by this many windows (3,200 at max_len 50)


# a step pass's queries (users x new events) from which its attention runs as products on a
# CPU without AMX: one-event passes of 1 / 2 / 4 / 8 warm users took 961 / 989 / 1,129 / 1,329
# us with products against 876 / 948 / 1,113 / 1,410 with the fused operator (scratch, bf16, 1
# thread, an AMD EPYC with AVX512-BF16). With AMX tiles torch's fused bf16 attention is the
# faster at every size: `benchmarks/encoder.py --attention 5` on a Xeon with AMX, passes of 1 /
# 8 / 64 / 512 warm users: 1,521 / 1,859 / 4,260 / 32,922 us fused against 1,584 / 2,081 /
# 6,744 / 69,569 with products
PRODUCTS_MIN_QUERIES = 8


def attend_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Attention of queries q [..., R, hd] over keys and values [..., S, hd] where ``visible``
    [..., R, S] (broadcast; False: masked), as plain products in float32; float32 [..., R, hd].

    torch's fused CPU attention works in blocks of many queries; a step has one or a few per
    user. One query over 50 cached keys, 4 heads of 64 (scratch, 1 thread): 64 users 1,163
    against 283 us, 8 users 150 against 44, with float32's accuracy instead of bf16's."""
    scores = torch.matmul(q.float() * q.shape[-1] ** -0.5, k.float().transpose(-1, -2))
    scores.masked_fill_(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v.float())


def with_bf16_linears(encoder: SequenceEncoder, fuse: bool = True) -> SequenceEncoder:
    """``encoder`` with its blocks' linear layers in bf16, for passes under bf16 autocast.

    Autocast casts every float32 weight to bf16 again on each pass (a pass is one call); cast
    once instead, the numbers are the same and a small pass is ~0.1 ms cheaper (256 wide, 2
    layers, 1 thread: ~0.78 against ~0.88 ms for one user, `benchmarks/encoder.py --pass-users`).
    Only the blocks are copied (~3 MB at 256 wide); the embeddings and the rest stay shared. An
    encoder already cast is returned as it is, so that lanes can share one copy. With ``fuse``,
    on the CPU, the layers become ``FusedLinear``s: the same products, but the feed-forward's
    GELU rounds to bf16 once instead of twice (vectors move by bf16 rounding, ~1e-2).
    """
    if encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16:
        return encoder
    serving = copy.copy(encoder)
    serving._modules = dict(encoder._modules)   # so that replacing blocks leaves ``encoder`` alone
    serving.blocks = copy.deepcopy(encoder.blocks)
    for module in serving.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    if fuse and FusedLinear.available(serving.blocks[0].attn.qkv.weight):
        for block in serving.blocks:
            attn, mlp = block.attn, block.mlp
            attn.qkv, attn.proj, mlp.out = FusedLinear(attn.qkv), FusedLinear(attn.proj), FusedLinear(mlp.out)
            mlp.fc, mlp.act = FusedLinear(mlp.fc, gelu=True), torch.nn.Identity()
        # the last block's last-only passes project the newest query apart from every position's
        # keys and values (``CausalSelfAttention.project_last``): its parts packed now, at load
        last = serving.blocks[-1].attn
        for lo, hi in last.projection_parts():
            last.qkv.part(lo, hi)
    return serving


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to one of few sizes: exact to 32, then 16 sizes per doubling (at
    most 1/16 more rows). oneDNN compiles a kernel the first time it meets a shape, and a
    pass's rows (users x positions) take thousands of values: a new shape's first [rows, 256] x
    [256, 1024] product took ~0.8 ms (100-199 rows) to ~1.4 ms (1,000-1,099) more than the
    next (scratch). `benchmarks/encoder.py --linear-rows` compares padded and exact rows."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


class FusedLinear(torch.nn.Module):
    """A bf16 linear layer as one oneDNN inner product on the CPU, its weights packed once into
    oneDNN's layout and its bias (and the GELU after it) fused in.

    torch's own CPU linear re-lays the weights out on every call, copies the broadcast bias
    into its output, and GELU then makes another pass: one thread, a [1, 256] x [256, 768]
    product took ~28 against ~49 us, [64, 256] x [256, 1024] ~47-58 against ~72-90, and on a
    64-user miss pass the feed-forward's first layer and GELU ~2.9 against ~5.8 ms. The ops
    are torch's own (the ones inductor packs and fuses linear layers into); where they are
    missing or refuse, serving keeps torch.nn.Linear."""

    PACK_ROWS = 64   # the batch the layout is chosen for; 1 to 3,200 rows measured alike or better

    def __init__(self, linear: torch.nn.Linear, gelu: bool = False):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.PACK_ROWS)
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")
        self.parts: dict[tuple[int, int], FusedLinear] = {}

    def part(self, lo: int, hi: int) -> "FusedLinear":
        """This layer's outputs ``lo:hi`` as a layer of their own (``model.encoder.linear_outputs``),
        packed the first time it is asked for and kept."""
        if (lo, hi) not in self.parts:
            layer = torch.nn.Linear(self.weight.shape[1], hi - lo, bias=self.bias is not None,
                                    dtype=self.weight.dtype, device=self.weight.device)
            with torch.no_grad():
                layer.weight.copy_(self.weight[lo:hi])
                if self.bias is not None:
                    layer.bias.copy_(self.bias[lo:hi])
            self.parts[(lo, hi)] = FusedLinear(layer, gelu=self.attr == "gelu")
        return self.parts[(lo, hi)]

    def forward(self, x):
        x = x.to(self.weight.dtype)
        rows = x.numel() // x.shape[-1]
        padded = bucket_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.attr, [], self.algorithm)
        flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, self.attr, [], self.algorithm)
        return out[:rows].view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def build_kernels(module: torch.nn.Module, max_rows: int) -> int:
        """Have oneDNN build, now, the kernel of every row count (``bucket_rows``) up to
        ``max_rows`` for each layer shape among ``module``'s FusedLinears; returns how many it
        built. Kernels are kept per shape (any layer of that shape reuses one), and under
        traffic a new row count's first pass through a block's four layers took 4.5-6.5 ms more
        than the next (50-112 rows, 1 thread, scratch): in a shop's first 5,000 events/s a few
        of its batches paid that."""
        shapes = {}
        for fused in module.modules():
            if isinstance(fused, FusedLinear):
                for layer in (fused, *fused.parts.values()):
                    shapes.setdefault((tuple(layer.weight.shape), layer.attr), layer)
        sizes = sorted({bucket_rows(rows) for rows in range(1, max_rows + 1)})
        with torch.inference_mode():
            for rows in sizes:
                for layer in shapes.values():
                    layer(torch.zeros(rows, layer.weight.shape[1], dtype=layer.weight.dtype))
        return len(sizes) * len(shapes)

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        """Whether oneDNN takes this (CPU, bf16) weight: a trial product, both attributes."""
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
            return False
        try:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
            x = torch.zeros(2, 1, weight.shape[1], dtype=weight.dtype)
            with torch.inference_mode():
                FusedLinear(layer)(x), FusedLinear(layer, gelu=True)(x)
        except (AttributeError, RuntimeError):
            return False
        return True


@dataclass
class EncodeRequest:
    """One user's history after a batch was applied, and what of it is new."""

    user: str
    history: list[Interaction]          # the stored window, oldest first (unknown items included)
    new: int = 0                        # how many of its last events the batch appended
    tail_before: str | None = None      # id of the event before the new ones (None: no earlier one)
    tail_after: str | None = None       # id of the last event


@dataclass
class CacheStats:
    hits: int = 0              # users encoded incrementally (or unchanged)
    misses: int = 0            # users encoded in full
    evictions: int = 0
    steps: int = 0             # positions encoded incrementally
    users: int = 0
    bytes: int = 0
    capacity: int = 0
    slot_bytes: int = 0

    def as_dict(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "evictions": self.evictions, "steps": self.steps, "users": self.users, "bytes": self.bytes,
                "capacity_users": self.capacity, "bytes_per_user": self.slot_bytes}


@dataclass
class Lane:
    """One lane's share of the cache: its slots, its users in least-recently-used order, its
    counters. A thread encoding one lane's users touches no other lane's."""

    slot_of: OrderedDict[str, int]
    free: list[int]
    stats: CacheStats


class IncrementalEncoder:
    """User vectors for a batch of requests, incremental where the cache allows, else in full.

    The cache is split into ``lanes`` by a stable hash of the user id, each lane with its own
    slots, LRU order and counters, so that one thread per lane encodes its users at once
    without locks (torch releases the GIL inside its operators). A call without a lane takes
    users of every lane in the same passes: a small batch pays each pass's fixed cost once,
    not once per lane."""

    def __init__(self, encoder: SequenceEncoder, token_index: dict[str, int], *,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, bf16: bool = False, round_cost: float = ROUND_COST,
                 claim: bool = False, lanes: int = 1):
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        cfg = encoder.cfg
        if cfg.positions != "rope":
            raise ValueError("incremental encoding needs rotary positions (a model trained with positions='rope')")
        self.encoder = with_bf16_linears(encoder.eval()) if bf16 else encoder.eval()
        self.token_index = token_index
        self.cfg = cfg
        self.device = device or next(encoder.parameters()).device
        self.inputs = self.encoder.input_table()   # the weights are fixed while serving
        self.dtype = dtype or torch.float32
        # bf16 matrix products (CUDA, AVX512-BF16): ~2x the vectors/s, agreement to ~1e-2
        self.bf16 = bf16
        # a step's attention (_attend): fused, in the cache's dtype where bf16 is fast, else in
        # float32 (a bf16 cache on a CPU without bf16 instructions is upcast: emulated bf16 cost
        # more); on a CPU without AMX, as float32 products from PRODUCTS_MIN_QUERIES queries
        self.attend_dtype = self.dtype if bf16 else torch.float32
        self.attend_products = self.device.type == "cpu" and not (
            self.attend_dtype == torch.bfloat16 and cpu_has_amx_bf16())
        self.window = cfg.max_len
        self.round_cost = round_cost
        self.full_chunk = FULL_CHUNK if self.device.type == "cpu" else GPU_FULL_CHUNK
        # the embedded inputs of each user's last conv_kernel - 1 known events (0: none), which
        # the input convolution mixes into the next event's
        self.before = max(0, cfg.conv_kernel - 1)
        layers, heads, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        slot_bytes = (layers * 2 * heads * self.window * hd + self.before * cfg.dim) * itemsize + cfg.dim * 4
        self.lane_capacity = max(1, budget_bytes // lanes // slot_bytes)   # lane n: slots n * this onwards
        self.capacity = self.lane_capacity * lanes
        # torch.empty: pages are only touched (resident) once a slot is used, unless ``claim``
        shape = (self.capacity, heads, self.window, hd)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.out = torch.empty(self.capacity, cfg.dim, dtype=torch.float32, device=self.device)
        if claim:
            for tensor in (*self.keys, *self.values, self.out):
                tensor.zero_()
        self.recent = torch.zeros(self.capacity, self.before, cfg.dim, dtype=self.dtype, device=self.device)
        self.count = np.zeros(self.capacity, dtype=np.int64)      # the next event's position
        self.start = np.zeros(self.capacity, dtype=np.int64)      # positions below it are padding
        self.tail: list[str | None] = [None] * self.capacity
        self.lanes = [Lane(OrderedDict(), [], CacheStats(capacity=self.lane_capacity, slot_bytes=slot_bytes))
                      for _ in range(lanes)]
        self.clear()
        self._ring = torch.arange(self.window, device=self.device)
        self.host_copies = self.device.type == "cpu"   # slots copied through numpy (below)

    # ------------------------------------------------------------------ public
    def encode(self, requests: list[EncodeRequest], lane: int | None = None) -> np.ndarray:
        """float32 [B, dim]; a user with no known item gets a zero row. With ``lane``, every
        request's user must hash to that lane (``lane_of``): only its share is touched."""
        out = np.zeros((len(requests), self.cfg.dim), dtype=np.float32)
        where = self.lane_of([r.user for r in requests]).tolist() if lane is None else [lane] * len(requests)
        lanes = [self.lanes[n] for n in where]   # each request's lane
        full, steps, fresh, busy = [], [], set(), set()
        for n, req in enumerate(requests):
            stepping = self._stepping(req, lanes[n], busy)
            if stepping is None:
                full.append(n)
                continue
            slot, new, empty = stepping
            steps.append((n, slot, new))
            busy.add(slot)
            if empty:
                fresh.add(n)
        if steps:
            steps, longer = self._cheapest_width(requests, steps, full_pass=bool(full))
            # in batch order: in a batch larger than the budget the last users keep their slots
            full = sorted(full + longer)
        with self.autocast():
            if steps:
                self._step(requests, steps, out, fresh)
            for first in range(0, len(full), self.full_chunk):
                part = full[first:first + self.full_chunk]
                self._encode_full([requests[n] for n in part], part, out, [lanes[n] for n in part])
        self._count_users()
        return out

    def autocast(self) -> torch.autocast:
        """bf16 autocast for a pass (one per call: lanes' threads each enter their own)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def lane_of(self, users: list[str]) -> np.ndarray:
        """Each user's lane (crc32 of the id: the same in every process and run)."""
        n = len(self.lanes)
        if n == 1:
            return np.zeros(len(users), dtype=np.int64)
        return np.fromiter((zlib.crc32(u.encode()) % n for u in users), dtype=np.int64, count=len(users))

    @property
    def slot_of(self) -> ChainMap:
        """Every lane's users and their slots (a view: change them through the lanes)."""
        return ChainMap(*(lane.slot_of for lane in self.lanes))

    @property
    def stats(self) -> CacheStats:
        """The lanes' counters summed."""
        total = CacheStats(slot_bytes=self.lanes[0].stats.slot_bytes)
        for lane in self.lanes:
            for f in fields(CacheStats):
                if f.name != "slot_bytes":
                    setattr(total, f.name, getattr(total, f.name) + getattr(lane.stats, f.name))
        return total

    def clear(self) -> None:
        """Drop every user (after a failed batch: an entry may be half updated)."""
        for n, lane in enumerate(self.lanes):
            lane.slot_of.clear()
            lane.free = list(range((n + 1) * self.lane_capacity - 1, n * self.lane_capacity - 1, -1))
        self.tail = [None] * self.capacity
        self._count_users()

    def forget(self, user: str) -> None:
        self._drop(user, self.lanes[int(self.lane_of([user])[0])])

    def _drop(self, user: str, lane: Lane) -> None:
        slot = lane.slot_of.pop(user, None)
        if slot is not None:
            lane.free.append(slot)
            self._count_users()

    def _count_users(self) -> None:
        for lane in self.lanes:
            lane.stats.users = len(lane.slot_of)
            lane.stats.bytes = lane.stats.users * lane.stats.slot_bytes

    def _lane_at(self, slot: int) -> Lane:
        return self.lanes[slot // self.lane_capacity]

    # ------------------------------------------------------------------ incremental
    def _stepping(self, req: EncodeRequest, lane: Lane, busy: set[int]):
        """(slot, new known events, from an empty ring) for a request (of ``lane``) the step pass
        can take, else None (full recompute)."""
        if req.new > MAX_STEPS:
            return None
        slot = lane.slot_of.get(req.user)
        if slot is not None and self.tail[slot] == req.tail_before:
            new = self._new_known(req)
            return None if new is None else (slot, new, False)
        if req.tail_before is None and req.new == len(req.history):
            # the whole history is new (a first visit): its events go through the same pass
            # as the warm users', from an empty ring, instead of a pass of their own
            new = self._new_known(req)
            slot = self._slot_for(req.user, lane, busy) if new else None
            if slot is not None:
                return slot, new, True
        return None

    def _new_known(self, req: EncodeRequest):
        """(item, type, gap) ids of the new known events, or None if they cannot be stepped."""
        history, first = req.history, len(req.history) - req.new
        if first < 0:
            return None
        prev_ts = None
        for n in range(first - 1, -1, -1):   # the newest older event with a time (no copy of the list)
            if history[n][2] is not None:
                prev_ts = history[n][2]
                break
        rows = []
        for item, etype, ts in history[first:]:
            gap = 0 if ts is None or prev_ts is None else gap_bucket(max(0.0, ts - prev_ts))
            if ts is not None:
                prev_ts = ts
            token = self.token_index.get(item)
            if token is not None:
                rows.append((token, TYPE_ID.get(etype, 0) if etype is not None else 0, gap))
        return rows

    def _cheapest_width(self, requests, steps, full_pass: bool):
        """All stepped users go through one pass as wide as the most new events among them
        (shorter ones padded), so a user with many new events widens everyone's pass; a full
        recompute costs ~ its window. Pick the width that costs least (0: no step pass); users
        with more new events than that go to full recompute. Costs in positions of
        full-recompute work: each pass's fixed cost ~ROUND_COST (the full pass's is already
        paid when ``full_pass``), a step pass's width per stepped user at STEP_POSITION_COST
        each, a full window ~its length."""
        counts = np.array([len(new) for _, _, new in steps])
        widest = int(counts.max(initial=0))
        if widest <= 1:
            return steps, []
        windows = np.array([min(len(requests[n].history), self.window) for n, _, _ in steps])
        costs = []
        for r in range(widest + 1):
            full = counts > r
            costs.append((self.round_cost + STEP_POSITION_COST * r * (~full).sum() if r else 0)
                         + windows[full].sum() + (self.round_cost if full.any() and not full_pass else 0))
        best = int(np.argmin(costs))
        keep = counts <= best   # a user with no known new event (0) is always kept: nothing to compute
        return [s for s, k in zip(steps, keep) if k], [n for (n, _, _), k in zip(steps, keep) if not k]

    def _step(self, requests, steps, out: np.ndarray, fresh: set[int]) -> None:
        """Fold each user's new known events in: one pass for all users, as wide as the most
        new events (a user's events attend to its cached ring and, causally, to each other).
        Users in ``fresh`` start from an empty ring: counted as misses, not hits."""
        lengths = np.array([len(new) for _, _, new in steps])
        slots = np.array([s for _, s, _ in steps])
        empty = np.array([n in fresh for n, _, _ in steps], dtype=bool)
        for (n, slot, new), first in zip(steps, empty.tolist()):
            lane = self._lane_at(slot)
            lane.slot_of.move_to_end(requests[n].user)
            self.tail[slot] = requests[n].tail_after
            lane.stats.misses += first
            lane.stats.hits += not first
            lane.stats.steps += len(new)
        if empty.any():
            self._empty(slots[empty])
        width = int(lengths.max(initial=0))
        ids = np.zeros((len(steps), width, 3), dtype=np.int64)   # right-padded: pads come after every real event
        for row, (_, _, new) in enumerate(steps):
            if new:
                ids[row, :len(new)] = new
        stepped = lengths > 0    # a user whose new events are all unknown items keeps its vector
        if stepped.any():
            ids_t = torch.from_numpy(ids[stepped]).to(self.device)
            if width == 1:
                self._advance_one(slots[stepped], ids_t[:, 0, 0], ids_t[:, 0, 1], ids_t[:, 0, 2])
            else:
                self._advance(slots[stepped], ids_t[..., 0], ids_t[..., 1], ids_t[..., 2], lengths[stepped])
        rows = np.array([n for n, _, _ in steps])
        out[rows] = self.out[torch.from_numpy(slots)].cpu().numpy()

    def _empty(self, slots: np.ndarray) -> None:
        """Slots that hold nothing: every ring position hidden (below 0), zero keys and values
        (hidden, but 0 * NaN is NaN), no earlier inputs for the convolution."""
        self.count[slots] = self.start[slots] = 0
        for tensor in (*self.keys, *self.values, self.recent):
            self._put(tensor, slots)

    @torch.inference_mode()
    def _advance(self, slots: np.ndarray, items, types, gaps, lengths: np.ndarray) -> None:
        """``lengths[b]`` new positions ([B, R] ids, right-padded) for each of ``slots``: they
        attend over the cached ring as it was before the batch and causally over each other;
        then the valid ones are written into the ring."""
        enc, W = self.encoder, self.window
        B, R = items.shape
        self._rebase(slots)
        count = torch.from_numpy(self.count[slots]).to(self.device)                 # [B] first new position
        start = torch.from_numpy(self.start[slots]).to(self.device)
        index = torch.from_numpy(slots).to(self.device)
        n_new = torch.from_numpy(lengths).to(self.device)
        offsets = torch.arange(R, device=self.device)
        positions = count[:, None] + offsets[None, :]                                # [B, R]
        rotation = enc.rotation(positions)[:, :, None]                               # [2, B, 1, R, hd]
        # the position each ring slot holds before the batch; new position p sees the cached
        # ones in p - W + 1 .. count - 1 that are not padding, and the new ones up to itself
        held = (count - 1)[:, None] - ((count - 1)[:, None] - self._ring[None, :]) % W   # [B, W]
        old = (held[:, None, :] >= start[:, None, None]) & (held[:, None, :] > positions[:, :, None] - W)
        causal = torch.ones(R, R, dtype=torch.bool, device=self.device).tril()
        hidden = ~torch.cat([old, causal.expand(B, R, R)], -1)[:, None]              # [B, 1, R, W + R]
        x = enc.embed(items, types, gaps, inputs=self.inputs)                        # [B, R, D]
        if self.before:
            window = torch.cat([self._gather(self.recent, slots).to(x.dtype), x], 1)  # [B, K - 1 + R, D]
            last = (n_new[:, None] + torch.arange(self.before, device=self.device))[..., None]
            self._put(self.recent, slots, window.gather(1, last.expand(-1, -1, x.shape[-1])).to(self.dtype))
            x = enc.mix_recent(window)[:, self.before:]
        x = enc.ln_in(x)
        # where the valid new positions go in the ring
        user, offset = (offsets[None, :] < n_new[:, None]).nonzero(as_tuple=True)
        at, ring = index[user], (count[user] + offset) % W
        for layer, block in enumerate(enc.blocks):
            q, k, v = (t.float() for t in block.attn.heads(x))                      # [B, H, R, hd]
            q, k = rotate(q, rotation), rotate(k, rotation)
            k, v = k.to(self.dtype), v.to(self.dtype)
            # a gather of the users' rings, then the new keys beside them
            keys = torch.cat([self._gather(self.keys[layer], slots), k], 2)          # [B, H, W + R, hd]
            values = torch.cat([self._gather(self.values[layer], slots), v], 2)
            y = self._attend(q, keys, values, hidden)                                # [B, H, R, hd]
            x = block.residual(x, block.attn.merge(y))
            self.keys[layer][at, :, ring] = k[user, :, offset]
            self.values[layer][at, :, ring] = v[user, :, offset]
        self.out[index] = x[torch.arange(B, device=self.device), n_new - 1].float()
        self.count[slots] += lengths

    @torch.inference_mode()
    def _advance_one(self, slots: np.ndarray, items, types, gaps) -> None:
        """One new position for each of ``slots``: write its keys into the ring, attend over the
        ring. The common case (one event per user per batch), cheaper than ``_advance``'s
        general pass: no copy of the gathered rings beside the new keys, no mask per position."""
        enc, W = self.encoder, self.window
        self._rebase(slots)
        count = torch.from_numpy(self.count[slots]).to(self.device)                 # [B] positions
        start = torch.from_numpy(self.start[slots]).to(self.device)
        index = torch.from_numpy(slots).to(self.device)
        ring = count % W                                                             # the new event's slot
        rotation = enc.rotation(count)[:, :, None, None]                            # [2, B, 1, 1, hd]
        # the position each ring slot holds once the new event is in; below `start`: padding
        held = count[:, None] - (count[:, None] - self._ring[None, :]) % W
        hidden = (held < start[:, None])[:, None, None, :]                           # [B, 1, 1, W]
        x = enc.embed(items, types, gaps, inputs=self.inputs)[:, None, :]            # [B, 1, D]
        if self.before:
            window = torch.cat([self._gather(self.recent, slots).to(x.dtype), x], 1)  # [B, K, D]
            self._put(self.recent, slots, window[:, 1:].to(self.dtype))
            x = enc.mix_recent(window, last_only=True)
        x = enc.ln_in(x)
        for layer, block in enumerate(enc.blocks):
            q, k, v = (t.float() for t in block.attn.heads(x))                      # [B, H, 1, hd]
            q, k = rotate(q, rotation), rotate(k, rotation)
            self.keys[layer][index, :, ring] = k[:, :, 0].to(self.dtype)
            self.values[layer][index, :, ring] = v[:, :, 0].to(self.dtype)
            # attention over one query: a gather of the users' rings, then one fused operator
            keys = self._gather(self.keys[layer], slots)
            values = self._gather(self.values[layer], slots)
            y = self._attend(q, keys, values, hidden)                                # [B, H, 1, hd]
            x = block.residual(x, block.attn.merge(y))
        self.out[index] = x[:, 0].float()
        self.count[slots] += 1

    def _attend(self, q, keys, values, hidden):
        """Attention of queries q [B, H, R, hd] (float32) over gathered keys and values [B, H, S, hd]
        (cache dtype), ``hidden`` [B, 1, R or 1, S] masked out; float32 [B, H, R, hd]. On a CPU
        without AMX, from PRODUCTS_MIN_QUERIES queries, as products in float32
        (`attend_by_products`); else one fused operator (scores, mask, softmax and weighted sum)
        in ``attend_dtype``."""
        if self.attend_products and q.shape[0] * q.shape[2] >= PRODUCTS_MIN_QUERIES:
            return attend_by_products(q, keys, values, ~hidden)
        dtype = self.attend_dtype
        return F.scaled_dot_product_attention(q.to(dtype), keys.to(dtype), values.to(dtype), attn_mask=~hidden).float()

    def _rebase(self, slots: np.ndarray) -> None:
        """Move far-advanced users' positions (and keys) back by a multiple of the window."""
        step = REBASE_WINDOWS * self.window
        old = slots[self.count[slots] >= 2 * step]
        if not len(old):
            return
        index = torch.from_numpy(old).to(self.device)
        back = self.encoder.rotation(torch.tensor(-step, device=self.device))
        for keys in self.keys:
            keys[index] = rotate(keys[index].float(), back).to(self.dtype)
        self.count[old] -= step
        self.start[old] -= step

    # ------------------------------------------------------------------ full recompute
    @torch.inference_mode()
    def _encode_full(self, requests: list[EncodeRequest], where: list[int], out: np.ndarray,
                     lanes: list[Lane]) -> None:
        """Each request (of ``lanes``, one each) encoded in full from its history; the window
        refills its slot."""
        *columns, lengths = featurize([r.history for r in requests], self.token_index, self.window)
        known = np.flatnonzero(lengths > 0)
        for n in range(len(requests)):
            lanes[n].stats.misses += 1
            if lengths[n] == 0:   # nothing to encode: a cold user, not cached
                self._drop(requests[n].user, lanes[n])
        if not len(known):
            return
        lengths = lengths[known]
        kvs: list = []
        embedded: list = []
        width = columns[0].shape[1]
        padding = len(lengths) * width - int(lengths.sum())   # what packing could save at most
        packing = Packing.of(lengths) if padding >= PACK_MIN_SAVED_POSITIONS else None
        if packing is not None and (len(lengths) - len(packing.owner)) * width >= PACK_MIN_SAVED_POSITIONS:
            ids = [packing.lay_out(c[known]) for c in columns]
            h = encode_packed(self.encoder, *(torch.from_numpy(i).to(self.device) for i in ids), packing,
                              kv_out=kvs, embedded_out=embedded, inputs=self.inputs).float()   # [B, D]
            rows, column = packing.row, packing.column
        else:   # (almost) one window a row anyway: left-padded, without the packing's indexing
            ids = [c[known] for c in columns]
            h = self.encoder(*(torch.from_numpy(i).to(self.device) for i in ids), kv_out=kvs,
                             last_only=True, embedded_out=embedded, inputs=self.inputs)[:, -1].float()
            rows, column = np.arange(len(known)), width - lengths
        slots = np.array([self._slot_for(requests[n].user, lanes[n]) for n in known])
        out[np.asarray(where)[known]] = h.cpu().numpy()
        # a budget smaller than the batch hands a slot on within it: the last user keeps it
        _, last = np.unique(slots[::-1], return_index=True)
        if len(last) < len(slots):
            keep = np.sort(len(slots) - 1 - last)
            slots, known, h, lengths = slots[keep], known[keep], h[torch.from_numpy(keep)], lengths[keep]
            rows, column = rows[keep], column[keep]
        # each user's whole row goes into ring slots 0..width-1 as positions 0..width-1, its own
        # window at column..column + length - 1 and the places before it below its ``start``
        # (hidden; those after it lie ahead of its ``count``): one copy per tensor, not one per user
        every = len(rows) == len(ids[0]) and (rows == np.arange(len(rows))).all()
        index = torch.from_numpy(rows).to(self.device)
        for layer, (k, v) in enumerate(kvs):
            self._put(self.keys[layer], slots, (k if every else k.index_select(0, index)).to(self.dtype))
            self._put(self.values[layer], slots, (v if every else v.index_select(0, index)).to(self.dtype))
        if self.before:   # each window's last ``before`` inputs as the pass embedded them, 0 before its start
            back = column[:, None] + lengths[:, None] - self.before + np.arange(self.before)[None, :]
            inside = torch.from_numpy(back >= column[:, None]).to(self.device)[..., None]
            at = [torch.from_numpy(a).to(self.device) for a in (rows[:, None], back.clip(0))]
            tail = embedded[0][at[0], at[1]]                                            # [B, before, D]
            self._put(self.recent, slots, (tail * inside).to(self.dtype))
        self.count[slots] = column + lengths
        self.start[slots] = column
        self.out[torch.from_numpy(slots).to(self.device)] = h
        for n, slot in zip(known, slots):
            self.tail[slot] = requests[n].tail_after

    # ------------------------------------------------------------------ slot copies
    # A slot of a cache tensor is one contiguous block (heads x window x head_dim). On the CPU
    # they are copied through numpy, a block at a time; torch's index_copy_ and index_select go
    # element by element: 64 slots of 256-wide bf16 keys took ~200 against ~970 us to write
    # (from the forward pass's strided keys, padding included) and ~150 against ~320 to gather.
    def _gather(self, cache: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        """A copy of ``slots``' rows of a cache tensor."""
        if not self.host_copies:
            return cache.index_select(0, torch.from_numpy(slots).to(self.device))
        return torch.from_numpy(host_view(cache)[slots]).view(cache.dtype)

    def _put(self, cache: torch.Tensor, slots: np.ndarray, rows: torch.Tensor | None = None):
        """Write ``rows`` (one per slot) into ``slots`` of a cache tensor; rows shorter along
        dimension 2 (a window shorter than the ring) are followed by zeros. None: zero the slots."""
        width = 0 if rows is None else rows.shape[2]
        if not self.host_copies:
            index = torch.from_numpy(slots).to(self.device)
            if rows is None:
                cache.index_fill_(0, index, 0)
            else:
                cache.index_copy_(0, index, F.pad(rows, (0, 0, 0, cache.shape[2] - width)))
            return
        target = host_view(cache)
        if rows is not None:
            target[slots, :, :width] = host_view(rows)
        if width < cache.shape[2]:
            target[slots, :, width:] = 0

    # ------------------------------------------------------------------ slots
    def _slot_for(self, user: str, lane: Lane, busy: set[int] | frozenset = frozenset()) -> int | None:
        """The user's slot in its ``lane``, else a free one, else the lane's least recently used
        user's -- unless that one is ``busy`` (stepped in this batch): then None."""
        slot = lane.slot_of.get(user)
        if slot is not None:
            lane.slot_of.move_to_end(user)
            return slot
        if lane.free:
            slot = lane.free.pop()
        else:
            oldest, slot = next(iter(lane.slot_of.items()))
            if slot in busy:
                return None
            del lane.slot_of[oldest]
            lane.stats.evictions += 1
        lane.slot_of[user] = slot
        return slot


def for_serving(encoder: SequenceEncoder, token_index: dict[str, int], budget_bytes: int = DEFAULT_BUDGET_BYTES,
                lanes: int = 1) -> IncrementalEncoder:
    """The serving configuration: a bf16 cache (half the bytes to gather), and the linear
    layers in bf16 where the hardware runs bfloat16 fast (CUDA, AVX512-BF16); ``lanes``
    shares of budget_bytes / lanes each, claimed now on the CPU (`check_cache_fits` first)."""
    from model.artifact import bf16_is_fast   # at call time: tests patch model.artifact's

    device = next(encoder.parameters()).device
    claim = device.type == "cpu"   # a GPU's memory is allocated at once anyway
    if claim:
        check_cache_fits(budget_bytes)
    bf16 = bf16_is_fast(device)
    if bf16:   # one bf16 copy of the blocks for all lanes (they only read it)
        encoder = with_bf16_linears(encoder.eval())
        FusedLinear.build_kernels(encoder.blocks, KERNEL_ROWS)
    return IncrementalEncoder(encoder, token_index, budget_bytes=budget_bytes, device=device, dtype=torch.bfloat16,
                              bf16=bf16, claim=claim, lanes=lanes)


def check_cache_fits(budget_bytes: int, available: int | None = None) -> None:
    """Refuse a CPU cache budget the machine cannot hold, before it is claimed all at once.

    Claimed at start, a budget beyond the memory left fails here with its size, not as an
    out-of-memory kill hours later when the cache fills; and the pages are faulted in and zeroed
    before the worker takes traffic instead of while it drains the backlog a restart leaves:
    filling a cold 1 GiB cache cost 1-2 µs of kernel time per 4 KiB page (the scale workload,
    `bench e2e --workload scale`: page zeroing was ~18% of the worker's CPU samples in `perf`).
    ``available``: bytes free (for tests); default `available_memory_bytes`.
    """
    available = available_memory_bytes() if available is None else available
    if available is not None and budget_bytes > available:
        raise MemoryError(f"the encoder cache budget ({budget_bytes >> 20:,} MiB, --cache-mb) is more than the "
                          f"memory available ({available >> 20:,} MiB): lower --cache-mb (0 turns the cache off)")


def available_memory_bytes() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, capped by the cgroup's
    limit less its usage (a container's); None where neither can be read (not Linux)."""
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
