"""Causal Transformer sequence encoder (SASRec family) with tied item embeddings.

References: SASRec (Kang & McAuley, 2018), trained with full softmax cross-entropy at every
position as in "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?"
(Klenitskiy & Vasilev, 2023). The structure follows nanoGPT: config, small modules, model.

The output at position t depends only on positions <= t, so a user's vector (the output at
the last position) can be recomputed whenever an event arrives. Item scores are inner
products with `item_vectors()`, which are also the input embeddings (tied).

Positions are rotary (RoPE, Su et al. 2021): attention scores depend only on how far apart
two events are, never on where the sequence starts, so an event's keys and values stay valid
as newer events arrive and serving can encode one new event at a time against a cache of
them (model/incremental.py). Models trained before carry learned positions counted back
from the newest event (``positions="learned"``); they load and serve by full recompute.

Rotary positions put order into the attention scores only. A causal depthwise convolution
over the input embeddings (``conv_kernel``) also puts "what came just before" into each
event's input, as a fixed function of the last few events, so it stays incremental too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.data import EVENT_TYPES, N_GAP_BUCKETS


@dataclass
class EncoderConfig:
    n_items: int = 0  # set from the vocabulary; row 0 of the item table is padding
    n_attributes: int = 0  # 0: no attribute features; row 0 of the attribute table is padding
    max_attrs: int = 0  # attributes per item kept in the item -> attribute table
    max_len: int = 50
    dim: int = 256  # Beauty, seed 0, test NDCG@10: .0507 at 64 (.0502 with 1 head), .0618 at 256
    n_layers: int = 2
    # Beauty, seeds 0/1: test NDCG@10 .0617/.0626 with 4 heads vs .0609/.0619 with 1 (8: .0619, seed 0);
    # an epoch also runs faster (~48 s vs ~60 s on 2 cores).
    n_heads: int = 4
    dropout: float = 0.5  # inside the blocks
    emb_dropout: float = 0.5  # on the summed input embeddings
    n_types: int = len(EVENT_TYPES) + 1  # 0 = unknown
    n_gaps: int = N_GAP_BUCKETS  # 0 = unknown
    positions: str = "rope"  # "rope" (relative; incremental serving) or "learned" (older models)
    rope_base: float = 10000.0
    # Each event's input is mixed with the previous conv_kernel - 1 events' (a causal depthwise
    # convolution; 0 or 1: none). Rotary positions put order into attention scores only; this puts
    # "what came just before" into the values. Test NDCG@10, 3 seeds: Sports .0372 vs .0355 without,
    # Beauty .0635 vs .0625; kernel 5 measured .0640 vs .0633 on one Beauty seed.
    conv_kernel: int = 3

    def __post_init__(self):
        if self.n_heads <= 0 or self.dim <= 0 or self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of n_heads ({self.n_heads})")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', not {self.positions!r}")
        if self.conv_kernel < 0 or self.conv_kernel > self.max_len:
            raise ValueError(f"conv_kernel must be between 0 and max_len ({self.max_len}), got {self.conv_kernel}")
        if self.positions == "rope" and (self.dim // self.n_heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got {self.dim // self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """Rotation speed of each of the head_dim / 2 coordinate pairs."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rotation_tables(angles: torch.Tensor) -> torch.Tensor:
    """[2, ..., head_dim]: the (cos, cos) and (-sin, sin) rows that ``rotate`` multiplies by,
    for angles [..., head_dim/2]. Made once per pass and shared by its layers' queries and keys."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)])


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate coordinate pairs (i, i + head_dim/2) of x [..., head_dim] by the angles of
    ``rotation`` (``rotation_tables``, broadcast against x).

    As x * (cos, cos) + (x2, x1) * (-sin, sin): two products over whole rows instead of four
    over half rows, with the same roundings. With queries and keys rotated in one call (below),
    a full recompute of 128 users' windows took 738 us per user against 840 (medians of 6
    alternating runs, bf16, 1 thread; the vectors identical)."""
    half = x.shape[-1] // 2
    rotation = rotation.to(x.dtype)
    return x * rotation[0] + torch.cat([x[..., half:], x[..., :half]], -1) * rotation[1]


# Passes of fewer positions (users x events) than this keep the elementwise forms of the rotation
# and of the input convolution (`rotate_positions`, `SequenceEncoder.mix_recent`): their
# batched forms are oneDNN kernels built the first time each shape comes (a new shape's first
# depthwise convolution ~0.3 ms, rotation product ~0.6 ms more than the next; scratch), and
# small passes come in too many shapes to repay that. Above it the shapes repeat: a backlog's
# full recomputes are passes of 128 users of up to 50 events.
BATCHED_FORMS_MIN_POSITIONS = 2048


def rotate_positions(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``rotate`` for x [B, L, ..., head_dim] at positions 0..L-1 (``rotation`` [2, L, head_dim]).

    In bf16 (serving) each position's rotation is one [head_dim, head_dim] matrix and the rows
    go through one batched product: bf16 elementwise arithmetic is slow on the CPU, and the
    product rounds once where the elementwise form rounds three times. The queries and keys of a
    full recompute (128 users x 50 events, 256 wide, 1 thread) took ~1.3 against ~4.5 ms per
    layer (scratch). The result is laid out position-major (a view in x's shape). Other dtypes
    (training, float32 serving) and small passes (BATCHED_FORMS_MIN_POSITIONS) keep the
    elementwise form."""
    if x.dtype != torch.bfloat16 or x.shape[0] * x.shape[1] < BATCHED_FORMS_MIN_POSITIONS:
        return rotate(x, rotation.reshape(2, rotation.shape[1], *[1] * (x.dim() - 3), rotation.shape[-1]))
    B, L, hd = x.shape[0], x.shape[1], x.shape[-1]
    rows = x.movedim(1, 0).reshape(L, -1, hd)                               # [L, B * ..., hd], one copy
    return torch.bmm(rows, rotation_matrices(rotation, x.dtype)).view(L, B, *x.shape[2:]).movedim(0, 1)


def rotation_matrices(rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[L, head_dim, head_dim]: each position's ``rotate`` as a matrix M, rotate(x) = x @ M for
    the rotation tables [2, L, head_dim] (``rotation_tables``)."""
    L, hd = rotation.shape[1:]
    to = torch.arange(hd, device=rotation.device)
    matrices = torch.diag_embed(rotation[0])                                # x_i cos_i into i
    matrices[:, (to + hd // 2) % hd, to] = rotation[1]                      # x_(i+hd/2) (-/+)sin_i into i
    return matrices.to(dtype)


def linear_outputs(layer: nn.Module, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Outputs ``lo:hi`` of the linear ``layer`` for x, without computing the others: through
    the layer's own part where it keeps parts of itself (serving's ``FusedLinear.part``), else
    through slices of its weights."""
    part = getattr(layer, "part", None)
    if part is not None:
        return part(lo, hi)(x)
    return F.linear(x, layer.weight[lo:hi], None if layer.bias is None else layer.bias[lo:hi])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def project(self, x):
        """x [B, L, D] -> queries, keys and values as one [B, L, 3, H, head_dim] view."""
        B, L, D = x.shape
        return self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads)

    def projection_parts(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The ``qkv`` outputs of the queries, and of the keys with the values."""
        dim = self.qkv.weight.shape[1]
        return (0, dim), (dim, 3 * dim)

    def queries(self, x):
        """x [..., D] -> queries [..., H, head_dim] alone (``projection_parts``)."""
        out = linear_outputs(self.qkv, x, *self.projection_parts()[0])
        return out.view(*x.shape[:-1], self.n_heads, -1)

    def keys_values(self, x):
        """x [..., D] -> keys and values [..., 2, H, head_dim] without the queries."""
        out = linear_outputs(self.qkv, x, *self.projection_parts()[1])
        return out.view(*x.shape[:-1], 2, self.n_heads, -1)

    def project_last(self, x):
        """x [B, L, D] -> the newest position's queries [B, 1, H, head_dim] and every position's
        keys and values [B, L, 2, H, head_dim]. A last-only pass needs no other query: a third
        of the projection over the window is skipped."""
        return self.queries(x[:, -1:]), self.keys_values(x)

    def heads(self, x):
        """x [B, L, D] -> q, k, v [B, H, L, head_dim], keys not yet rotated."""
        return [t.transpose(1, 2) for t in self.project(x).unbind(2)]

    def forward(self, x, mask, rotation=None, kv_out: list | None = None, last_only: bool = False):
        """``mask`` [B, 1, L, L] (True: may attend), or None for windows without padding (causal
        alone); ``rotation`` [2, L, head_dim]: rotary positions (``rotation_tables``); ``kv_out``
        collects the keys (rotated by their positions) and values, which an incremental encoder
        caches; ``last_only``: the last position's output alone (keys and values still come from
        every position)."""
        causal = mask is None and not last_only   # None: every position known, only the future hidden
        if last_only:   # the newest query alone
            q, kv = self.project_last(x)
            k, v = kv.unbind(2)
            if rotation is not None:
                q, k = rotate(q, rotation[:, -1:, None]), rotate_positions(k, rotation)
            mask = None if mask is None else mask[..., -1:, :]
        else:
            qkv = self.project(x)
            v = qkv[:, :, 2]
            if rotation is not None:   # queries and keys rotated together: one pass over their rows
                q, k = rotate_positions(qkv[:, :, :2], rotation).unbind(2)
            else:
                q, k = qkv[:, :, 0], qkv[:, :, 1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # [B, H, L, head_dim]
        if kv_out is not None:
            kv_out.append((k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        return self.merge(y)

    def merge(self, y):
        """The heads' outputs [B, H, L, head_dim] -> [B, L, D], projected (``heads``' inverse)."""
        B, H, L, hd = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, L, H * hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.act = nn.GELU()   # a module, so that serving can fuse it into ``fc`` (model/incremental.py)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.out(self.dropout(self.act(self.fc(x))))


class Block(nn.Module):
    """Post-norm Transformer block (LayerNorm after each residual), as in SASRec and the original
    Transformer. Measured on Beauty (9-minute budget): test NDCG@10 .0577 vs .0549 with GPT-2's
    pre-norm; these models are shallow, so pre-norm's stability at depth buys nothing."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, rotation=None, kv_out: list | None = None, last_only: bool = False):
        y = self.attn(x, mask, rotation, kv_out, last_only)
        return self.residual(x[:, -1:] if last_only else x, y)

    def residual(self, x, y):
        """The block after attention: ``y`` (the attention's output for ``x``) added and
        normalised, then the feed-forward likewise."""
        x = self.ln1(x + self.dropout(y))
        return self.ln2(x + self.dropout(self.mlp(x)))


class SequenceEncoder(nn.Module):
    """Left-padded (items, types, gaps) id sequences -> one hidden vector per position."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0)
        if cfg.positions == "learned":
            # Positions count back from the newest event (left padding).
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        else:
            self.register_buffer("rope_freqs", rope_frequencies(cfg.head_dim, cfg.rope_base), persistent=False)
        self.type_emb = nn.Embedding(cfg.n_types, cfg.dim)
        self.gap_emb = nn.Embedding(cfg.n_gaps, cfg.dim)
        if cfg.n_attributes:
            self.attr_emb = nn.Embedding(cfg.n_attributes + 1, cfg.dim, padding_idx=0)
            # item -> attribute ids (0-padded); a buffer so it is saved with the weights.
            self.register_buffer("item_attrs", torch.zeros(cfg.n_items + 1, cfg.max_attrs, dtype=torch.long))
        if cfg.conv_kernel > 1:
            # zero-initialised: training starts from the plain sum of embeddings
            self.conv = nn.Parameter(torch.zeros(cfg.dim, 1, cfg.conv_kernel))
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_in = nn.LayerNorm(cfg.dim)  # on the summed input embeddings; blocks end normalised
        self.apply(self._init_weights)
        # "Unknown" type and gap start at zero so logs without them see no extra signal.
        nn.init.zeros_(self.type_emb.weight)
        nn.init.zeros_(self.gap_emb.weight)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The input embeddings and the output scoring vectors (tied): all [n_items + 1, dim]
        rows, or only those of `ids` (any shape; encoding a batch needs no more than that)."""
        w = self.item_emb.weight if ids is None else self.item_emb(ids)
        if self.cfg.n_attributes:
            # Mean of each item's attribute vectors, as a bag over the non-padding ids only: the
            # padded [items, max_attrs, dim] gather made a Sports epoch 3x slower (items with up
            # to 37 attributes, mean 6).
            attrs = self.item_attrs if ids is None else self.item_attrs[ids.reshape(-1)]
            keep = attrs > 0
            counts = keep.sum(1)
            offsets = torch.cumsum(counts, 0) - counts
            w = w + F.embedding_bag(attrs[keep], self.attr_emb.weight, offsets, mode="mean").view(w.shape)
        return w

    def type_gap_sums(self) -> torch.Tensor:
        """[n_types * n_gaps, dim]: every (type, gap) pair's embedding sum, row type * n_gaps + gap."""
        return (self.type_emb.weight[:, None] + self.gap_emb.weight[None]).flatten(0, 1)

    def input_table(self) -> torch.Tensor:
        """What ``embed`` adds up, precomputed for serving (its ``inputs``): every item's vector,
        attributes included (rows 0..n_items), then every (type, gap) pair's sum. A pass then
        reads each event's input in one ``embedding_bag`` with the same floats: 128 x 50 events
        (256 wide, 1 thread, scratch) 0.7 against 1.8 ms for the gathers and their sum, and with
        attributes (~6 per item) the item vectors 0.6 against 4.9 ms. One more float32 copy of
        the item table (51 MB at 50k items)."""
        with torch.no_grad():
            return torch.cat([self.item_vectors(), self.type_gap_sums()])

    def embed(self, items, types=None, gaps=None, item_vecs=None, inputs=None):
        """The normalised input of the first block: item (+ attributes), type and time gap.
        ``inputs``: this encoder's ``input_table`` (serving), read instead of the embeddings."""
        if inputs is not None and types is not None and gaps is not None:
            pairs = types * self.cfg.n_gaps + gaps + (self.cfg.n_items + 1)
            rows = torch.stack([items, pairs], -1).view(-1, 2)
            return F.embedding_bag(rows, inputs, mode="sum").view(*items.shape, inputs.shape[1])
        x = self.item_vectors(items) if item_vecs is None else F.embedding(items, item_vecs)
        if types is not None and gaps is not None:
            # one gather from a table of every (type, gap) pair's sum instead of two gathers and
            # two additions over the whole batch: 1.4 against 2.8 ms for 128 x 50 events (scratch)
            return x + F.embedding(types * self.cfg.n_gaps + gaps, self.type_gap_sums())
        if types is not None:
            x = x + self.type_emb(types)
        if gaps is not None:
            x = x + self.gap_emb(gaps)
        return x

    def mix_recent(self, x: torch.Tensor, keep: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """x [B, L, D] embedded inputs plus the causal convolution of the known ones (``keep``
        [B, L, 1]; None: all): position t sees positions t - conv_kernel + 1 .. t, padding as 0.
        ``last_only``: the newest position alone, [B, 1, D] (serving steps one event at a time)."""
        if self.cfg.conv_kernel <= 1:
            return x[:, -1:] if last_only else x
        known = x if keep is None else x * keep
        weight = self.conv[:, 0].to(known.dtype)                # [D, K]; column K-1-j: j events back
        last = weight.shape[1] - 1
        if last_only:   # one product over the newest rows, their columns in the same order
            rows = known[:, -(last + 1):]
            return x[:, -1:] + (rows * weight[:, weight.shape[1] - rows.shape[1]:].T).sum(1, keepdim=True)
        if not torch.is_grad_enabled() and known.shape[0] * known.shape[1] >= BATCHED_FORMS_MIN_POSITIONS:
            return self._convolve(known)
        # shifted multiply-adds into one output: no layout change for a conv1d, no padded copies
        # (4x faster than out-of-place shifted products on a [256, 50, 256] batch, 1 thread)
        out = torch.addcmul(x, known, weight[:, last])
        for back in range(1, min(last, x.shape[1] - 1) + 1):
            out[:, back:].addcmul_(known[:, :-back], weight[:, last - back])
        return out

    def _convolve(self, known: torch.Tensor) -> torch.Tensor:
        """``mix_recent`` without autograd, as one depthwise convolution with the identity folded
        into its newest tap: a single pass over the batch in the layout it already has, read as
        a channels-last image [B, D, 1, L] (128 x 50 events, 256 wide, 1 thread: 0.6 against
        3.3 ms for the multiply-adds; scratch). The same sums at the known positions; at the
        others (padding, which every caller masks) the convolution alone. In float32 as ever:
        autocast would run a convolution in bf16."""
        weight = self.conv.detach().clone()
        weight[:, 0, -1] += 1
        steps = weight.shape[-1] - 1
        with torch.autocast(known.device.type, enabled=False):
            image = known.float().transpose(1, 2)[:, :, None]                 # [B, D, 1, L]
            out = F.conv2d(image, weight[:, :, None], padding=(0, steps), groups=weight.shape[0])
        return out[..., :known.shape[1]].squeeze(2).transpose(1, 2).to(known.dtype)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary tables [2, ..., head_dim] (``rotation_tables``) of integer positions."""
        return rotation_tables(positions.to(torch.float32)[..., None] * self.rope_freqs)

    def forward(self, items, types=None, gaps=None, item_vecs=None, kv_out: list | None = None,
                last_only: bool = False, embedded_out: list | None = None, inputs: torch.Tensor | None = None):
        """items/types/gaps: [B, L] int64, left-padded with 0. Returns [B, L, dim], or [B, 1, dim]
        with ``last_only`` (serving needs the newest position's vector only: the last block then
        runs its projection and MLP for that position alone, ~1/3 less work over a window).
        ``embedded_out`` collects the embedded inputs [B, L, dim] (serving caches the newest
        few for the input convolution of later steps); ``inputs``: see ``embed``."""
        B, L = items.shape
        assert L <= self.cfg.max_len, f"sequence length {L} > max_len {self.cfg.max_len}"
        x = self.embed(items, types, gaps, item_vecs, inputs)
        if embedded_out is not None:
            embedded_out.append(x)
        rotation = None
        if self.cfg.positions == "learned":
            x = x + self.pos_emb(torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=items.device))
        else:  # only distances matter, so the left padding needs no offset
            rotation = self.rotation(torch.arange(L, device=items.device))
        keep = (items > 0).unsqueeze(-1)
        if not self.training and items.device.type == "cpu" and bool(keep.all()):
            keep = None   # full windows (serving's usual case): no padding to mask
        x = self.ln_in(self.mix_recent(x, keep))
        x = self.emb_dropout(x)
        if keep is not None:
            x = x * keep
        # Causal mask; padding keys are hidden, except that each position may see itself so
        # that a padding row never has an empty softmax (its output is ignored anyway). Full
        # windows need none: the attention's own causal form (128 x 50 events, 4 heads, bf16, 1
        # thread: 4.6 against 5.3 ms with the [B, 1, L, L] mask; scratch).
        mask = None
        if keep is not None:
            causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
            eye = torch.eye(L, dtype=torch.bool, device=items.device)
            mask = (causal & (items > 0).unsqueeze(1)) | eye  # [B, L(query), L(key)]
            mask = mask.unsqueeze(1)  # broadcast over heads
        last = len(self.blocks) - 1
        for n, block in enumerate(self.blocks):
            x = block(x, mask, rotation, kv_out, last_only and n == last)
        return x


@dataclass
class Packing:
    """Users' windows packed whole into rows as wide as the longest (first-fit by decreasing
    length), several short ones to a row, each position attending only to its own user's
    earlier ones.

    Serving's full recomputes take windows of all lengths at once; left-padded to the longest,
    a burst of short sessions (the demo shop: 11.7 events on average, padded to 28) computed
    2.4 positions per real one. Packed rows keep the padded pass's shapes (the same products,
    one attention call) for a fraction of the rows."""

    lengths: np.ndarray     # [B] known events of each user
    row: np.ndarray         # [B] the row each user's window is in
    column: np.ndarray      # [B] where it starts in that row
    rank: np.ndarray        # [B] how many windows come before it in that row
    owner: np.ndarray       # [R, W] the user at each place, -1: padding

    @classmethod
    def of(cls, lengths) -> "Packing":
        lengths = np.asarray(lengths, dtype=np.int64)
        width = int(lengths.max(initial=1))
        fill: list[int] = []
        count: list[int] = []
        row, column, rank = (np.zeros(len(lengths), dtype=np.int64) for _ in range(3))
        order = np.argsort(-lengths, kind="stable").tolist()
        smallest = int(lengths[order[-1]]) if order else 0
        open_rows: list[int] = []   # rows with room for the smallest window, in order
        for u in order:
            n = int(lengths[u])
            r = next((i for i in open_rows if fill[i] + n <= width), None)
            if r is None:
                r = len(fill)
                fill.append(0)
                count.append(0)
                open_rows.append(r)
            row[u], column[u], rank[u] = r, fill[r], count[r]
            fill[r] += n
            count[r] += 1
            if fill[r] + smallest > width:
                open_rows.remove(r)
        packing = cls(lengths, row, column, rank, np.full((len(fill), width), -1, dtype=np.int64))
        user, position = packing._events()
        packing.owner[row[user], column[user] + position] = user
        return packing

    def _events(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, position in its window) of every known event, users in order, oldest first."""
        user = np.repeat(np.arange(len(self.lengths)), self.lengths)
        return user, np.arange(len(user)) - (np.cumsum(self.lengths) - self.lengths)[user]

    @property
    def place(self) -> np.ndarray:
        """[R, W] each place's position in its user's window (0: the oldest), -1: padding."""
        return np.where(self.owner >= 0, np.arange(self.owner.shape[1]) - self.column[self.owner], -1)

    def lay_out(self, padded: np.ndarray) -> np.ndarray:
        """A left-padded [B, width] matrix (`featurize`'s layout, each user's window at its end)
        -> [R, W], 0 where padding."""
        user, position = self._events()
        out = np.zeros(self.owner.shape, dtype=padded.dtype)
        out[self.row[user], self.column[user] + position] = \
            padded[user, padded.shape[1] - self.lengths[user] + position]
        return out

    def crossing(self, back: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of the places whose ``back``-th place before lies in another window:
        the first ``back`` places of each window that does not start its row."""
        later = np.flatnonzero(self.column > 0)
        steps = np.arange(back)
        rows = np.repeat(self.row[later], back)
        columns = (self.column[later][:, None] + steps).reshape(-1)
        inside = (steps[None, :] < self.lengths[later][:, None]).reshape(-1) & (columns >= back)
        return rows[inside], columns[inside]

    def visible(self) -> np.ndarray:
        """[R, W(query), W(key)]: a position sees its own user's places up to its own (a window
        is contiguous, so columns order it); padding sees itself at least, so that no softmax
        row is empty (its output is dropped)."""
        width = self.owner.shape[1]
        causal = np.tri(width, dtype=bool)
        return ((self.owner[:, :, None] == self.owner[:, None, :]) & causal) | np.eye(width, dtype=bool)


def encode_packed(encoder: "SequenceEncoder", items, types, gaps, packing: Packing,
                  kv_out: list | None = None, embedded_out: list | None = None,
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Each user's newest output [B, dim] from id tensors [R, W] laid out by ``packing``: what
    ``encoder(...)[:, -1]`` gives for the same windows left-padded, with fewer rows. ``kv_out``
    collects each layer's keys and values, [R, H, W, head_dim], keys rotated by their column (a
    user's window sits in its row as positions column .. column + length - 1). Rotary models
    only: learned positions count back from the newest event. ``embedded_out`` collects the
    embedded inputs [R, W, dim], as ``SequenceEncoder.forward``'s does; ``inputs``: see
    ``SequenceEncoder.embed``."""
    if encoder.cfg.positions != "rope":
        raise ValueError("packed encoding needs rotary positions (positions='rope')")
    device = items.device
    x = encoder.embed(items, types, gaps, inputs=inputs)                          # [R, W, D]
    if embedded_out is not None:
        embedded_out.append(x)
    if encoder.cfg.conv_kernel > 1:
        # mix_recent over the rows (padding only ever follows a row's last window), then the
        # few places that took in the end of the window before theirs take it out again
        out = encoder.mix_recent(x)
        weight = encoder.conv[:, 0].to(x.dtype)
        last = weight.shape[1] - 1
        for back in range(1, min(last, x.shape[1] - 1) + 1):
            rows, columns = (torch.from_numpy(a).to(device) for a in packing.crossing(back))
            if len(rows):
                out.index_put_((rows, columns), -x[rows, columns - back] * weight[:, last - back], accumulate=True)
        x = out
    x = encoder.ln_in(x)
    # rotated by column, not by place: within a user's window the distances are the same
    rotation = encoder.rotation(torch.arange(packing.owner.shape[1], device=device))   # [2, W, hd]
    mask = torch.from_numpy(packing.visible()).to(device)[:, None]               # [R, 1, W, W]
    rows = torch.from_numpy(packing.row).to(device)
    rank = torch.from_numpy(packing.rank).to(device)
    at = torch.from_numpy(packing.column + packing.lengths - 1).to(device)       # each user's newest column
    final = len(encoder.blocks) - 1
    for n, block in enumerate(encoder.blocks):
        attn = block.attn
        if n < final:
            qkv = attn.project(x)                                                  # [R, W, 3, H, hd]
            q, k = rotate_positions(qkv[:, :, :2], rotation).unbind(2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))          # [R, H, W, hd]
            if kv_out is not None:
                kv_out.append((k, v))
            x = block.residual(x, attn.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
            continue
        # the newest places alone go on: each row's users' newest queries over that row's keys
        # (projected apart, as in ``CausalSelfAttention.project_last``)
        kv = attn.keys_values(x)                                                   # [R, W, 2, H, hd]
        k = rotate_positions(kv[:, :, 0], rotation).transpose(1, 2)
        v = kv[:, :, 1].transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        queries = int(packing.rank.max(initial=0)) + 1
        q = rotate(attn.queries(x[rows, at]), rotation[:, at, None])                 # [B, H, hd]
        laid = q.new_zeros(k.shape[0], queries, *q.shape[1:])
        laid[rows, rank] = q
        sees = torch.ones(k.shape[0], 1, queries, k.shape[2], dtype=torch.bool, device=device)
        sees[rows, 0, rank] = mask[rows, 0, at]
        y = F.scaled_dot_product_attention(laid.transpose(1, 2), k, v, attn_mask=sees)   # [R, H, Q, hd]
        y = y.transpose(1, 2)[rows, rank]                                            # [B, H, hd]
        x = block.residual(x[rows, at], attn.proj(y.reshape(y.shape[0], -1)))
    return x
