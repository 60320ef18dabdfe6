"""Full-ranking leave-one-out evaluation (HR@k, NDCG@k), the protocol of the S3-Rec papers.

Every item is scored; the items in the user's history before the target are removed from
the ranking (the target itself is always ranked, even when it was seen before). The rank of
the target is the number of remaining items that score strictly higher. A target that the
model's vocabulary does not know counts as a miss.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from model.data import Log, featurize, leave_one_out


@dataclass
class EvalSet:
    """One split, turned into tensors once (training evaluates validation every epoch)."""

    items: torch.Tensor  # [U, L] left-padded inputs (encoder indices)
    types: torch.Tensor
    gaps: torch.Tensor
    targets: torch.Tensor  # [U] encoder index of the target, 0 if unknown to the vocabulary
    seen_rows: torch.Tensor  # (row, item) pairs to remove from each user's ranking
    seen_cols: torch.Tensor

    @property
    def users(self) -> int:
        return int(self.targets.shape[0])


def build_eval_set(log: Log, token_index: dict[str, int], max_len: int, split: str) -> EvalSet:
    """`token_index`: item id -> encoder id (1..n_items), as ModelArtifact.token_index."""
    rows = leave_one_out(log, split)
    items, types, gaps, _ = featurize([hist for _, hist, _ in rows], token_index, max_len, width=1)
    seen_rows, seen_cols = [], []
    for r, (_, hist, _) in enumerate(rows):
        seen = {token_index[i] for i, _, _ in hist if i in token_index}
        seen_rows.extend([r] * len(seen))
        seen_cols.extend(seen)
    return EvalSet(
        items=torch.from_numpy(items),
        types=torch.from_numpy(types),
        gaps=torch.from_numpy(gaps),
        targets=torch.tensor([token_index.get(t[0], 0) for _, _, t in rows], dtype=torch.long),
        seen_rows=torch.tensor(seen_rows, dtype=torch.long),
        seen_cols=torch.tensor(seen_cols, dtype=torch.long),
    )


def target_ranks(user_vecs: torch.Tensor, item_vecs: torch.Tensor, es: EvalSet,
                 batch_size: int = 1024) -> torch.Tensor:
    """Rank (0 = top) of each user's target among all items; item_vecs row 0 is padding."""
    ranks = torch.empty(es.users, dtype=torch.long)
    item_vecs = item_vecs.to(user_vecs.device)
    n_rows = item_vecs.shape[0]
    # (row, col) pairs sorted by row, so each batch's slice is found by binary search.
    order = torch.argsort(es.seen_rows, stable=True)
    seen_rows, seen_cols = es.seen_rows[order], es.seen_cols[order]
    for s in range(0, es.users, batch_size):
        e = min(s + batch_size, es.users)
        u = user_vecs[s:e]
        scores = u @ item_vecs.T  # [b, n_items + 1]
        tgt = es.targets[s:e].to(u.device)
        tgt_score = scores.gather(1, tgt[:, None])
        lo, hi = torch.searchsorted(seen_rows, torch.tensor([s, e])).tolist()
        scores[(seen_rows[lo:hi] - s).to(u.device), seen_cols[lo:hi].to(u.device)] = -torch.inf
        scores[:, 0] = -torch.inf
        r = torch.gt(scores, tgt_score).view(torch.uint8).sum(1, dtype=torch.long)  # faster than bool sum
        r[tgt == 0] = n_rows  # unknown target: a miss
        ranks[s:e] = r.cpu()
    return ranks


def metrics_from_ranks(ranks: torch.Tensor, ks=(10, 20)) -> dict:
    out = {}
    r = ranks.double()
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = hit.double().mean().item() if len(r) else 0.0
        out[f"NDCG@{k}"] = (hit / torch.log2(r + 2)).mean().item() if len(r) else 0.0
    out["users"] = int(len(r))
    return out


def evaluate(artifact, log: Log, split: str = "test", ks=(10, 20), batch_size: int = 1024,
             eval_set: EvalSet | None = None) -> dict:
    """HR@k and NDCG@k of `artifact` on `log` (full ranking, leave-one-out `split`)."""
    es = eval_set or build_eval_set(log, artifact.token_index, artifact.config.max_len, split)
    dev = artifact.device
    users = artifact.encode_tensors(es.items.to(dev), es.types.to(dev), es.gaps.to(dev))
    with torch.inference_mode():
        item_vecs = artifact.encoder.item_vectors().float()
        ranks = target_ranks(users, item_vecs, es, batch_size)
    out = metrics_from_ranks(ranks, ks)
    out["unknown_targets"] = int((es.targets == 0).sum())   # items the model never saw: misses
    return out


def evaluate_popularity(log: Log, split: str = "test", ks=(10, 20)) -> dict:
    """The most-popular baseline: items ranked by training-part counts, history removed."""
    counts = Counter(i for _, hist, _ in leave_one_out(log, "valid") for i, _, _ in hist)
    vocab = sorted({i for seq in log.values() for i, _, _ in seq})
    item_index = {item: n + 1 for n, item in enumerate(vocab)}
    es = build_eval_set(log, item_index, 1, split)
    # Popularity plus a tie-break by vocabulary order, in float64 so that it stays exact.
    pop = torch.tensor([0.0] + [counts[i] + 0.5 * (1 - n / (len(vocab) + 1)) for n, i in enumerate(vocab)],
                       dtype=torch.float64)
    ranks = target_ranks(torch.ones(es.users, 1, dtype=torch.float64), pop[:, None], es)
    return metrics_from_ranks(ranks, ks)

