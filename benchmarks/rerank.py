"""What the rerank stage costs in accuracy and buys in diversity, offline on Beauty.

    python benchmarks/rerank.py --model DIR [--data ../shared/data/Beauty.txt]
        [--split test] [--sweep] [--cold-start]

The serving path, replayed: encode each user's leave-one-out input (all but the last event
for `test`, all but the last two for `valid`), retrieve CANDIDATES rows from `ItemIndex`,
then either keep the plain top-k with the history masked (`RerankConfig(diversity=0)`,
the published protocol) or apply the default `Reranker`. Per configuration it prints
NDCG@10 and HR@10 of the held-out item, catalogue coverage (distinct items in all top-10
lists / catalogue), and intra-list diversity of the top-10: 1 - mean pairwise attribute
Jaccard, and 1 - mean pairwise embedding cosine.

`--sweep` tries several diversity strengths and attribute caps (run it on `--split valid`
to choose the default without looking at the test targets); `--cold-start` compares the
AttributeEmbedder methods on held-out items.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from index.catalogue import Catalogue
from index.cold_start import METHODS as EMBEDDER_METHODS
from index.cold_start import AttributeEmbedder
from index.item_index import ItemIndex
from index import rerank as rerank_module
from index.rerank import Reranker, RerankConfig, UserContext
from shared_data import SHARED_DATA

log = logging.getLogger(__name__)

DEFAULT_DATA = SHARED_DATA / "Beauty.txt"
CANDIDATES = 200
EVAL_K = 10
ENCODE_BATCH = 1024
MAX_NDCG_LOSS = 0.03
SWEEP_DIVERSITY = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SWEEP_CAPS = (None, 5, 3)
COLD_START_HOLDOUT = 0.1
NEIGHBOURS = 10


def attributes_path(data: Path) -> Path:
    return data.with_name(f"{data.stem}_item2attributes.json")


def encode_users(artifact, histories: list) -> np.ndarray:
    parts = [artifact.encode(histories[s : s + ENCODE_BATCH]) for s in range(0, len(histories), ENCODE_BATCH)]
    return np.concatenate(parts).astype(np.float32)


def attribute_matrix(items: list[str], catalogue: Catalogue) -> np.ndarray:
    """Dense multi-hot [N, A] attributes (fine at Beauty's 12k items x ~1.2k attributes)."""
    ids: dict[str, int] = {}
    pairs = [(row, ids.setdefault(a, len(ids))) for row, item in enumerate(items) for a in catalogue.attributes(item)]
    matrix = np.zeros((len(items), max(1, len(ids))), dtype=np.float32)
    rows, cols = zip(*pairs) if pairs else ((), ())
    matrix[list(rows), list(cols)] = 1.0
    return matrix


def list_metrics(lists: list[list[dict]], targets: list[str], row_of: dict[str, int],
                 attributes: np.ndarray, unit: np.ndarray) -> dict:
    """NDCG@10, HR@10, coverage and intra-list diversity of the top-10 of each list."""
    ndcg = hits = 0.0
    top = np.full((len(lists), EVAL_K), -1, dtype=np.int64)
    for user, (result, target) in enumerate(zip(lists, targets)):
        ranked = [entry["item_id"] for entry in result[:EVAL_K]]
        top[user, : len(ranked)] = [row_of[item] for item in ranked]
        if target in ranked:
            rank = ranked.index(target)
            hits += 1
            ndcg += 1.0 / np.log2(rank + 2)
    valid = top >= 0
    pair_mask = (valid[:, :, None] & valid[:, None, :]) & ~np.eye(EVAL_K, dtype=bool)[None]
    attrs = attributes[np.maximum(top, 0)]  # [U, 10, A]
    inter = np.einsum("uia,uja->uij", attrs, attrs)
    sizes = attrs.sum(axis=2)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    vecs = unit[np.maximum(top, 0)]
    cosine = np.einsum("uid,ujd->uij", vecs, vecs)
    pairs = pair_mask.sum()
    return {
        "NDCG@10": ndcg / len(lists),
        "HR@10": hits / len(lists),
        "coverage@10": len(np.unique(top[valid])) / len(row_of),
        "ILD-attr@10": 1.0 - float((jaccard * pair_mask).sum() / max(pairs, 1)),
        "ILD-emb@10": 1.0 - float((cosine * pair_mask).sum() / max(pairs, 1)),
        "mean length": float(valid.sum(axis=1).mean()),
    }


def evaluate(name: str, reranker: Reranker, contexts, cand_rows, cand_scores, targets, row_of, attributes, unit):
    started = time.perf_counter()
    lists = []
    for s in range(0, len(contexts), ENCODE_BATCH):
        batch = slice(s, s + ENCODE_BATCH)
        lists += reranker.rerank(contexts[batch], cand_rows[batch], cand_scores[batch])
    elapsed = time.perf_counter() - started
    metrics = list_metrics(lists, targets, row_of, attributes, unit)
    metrics["rerank ms/1k users"] = 1000.0 * elapsed / len(contexts) * 1000
    return {"config": name, **metrics}


def print_table(rows: list[dict], baseline: float) -> None:
    columns = ["config", "NDCG@10", "vs plain", "HR@10", "coverage@10", "ILD-attr@10", "ILD-emb@10",
               "rerank ms/1k users"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        row = {**row, "vs plain": f"{100 * (row['NDCG@10'] / baseline - 1):+.1f}%"}
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.4f}" if row[c] < 10 else f"{row[c]:.0f}"
                 for c in columns]
        print("| " + " | ".join(cells) + " |", flush=True)


def cold_start_comparison(artifact, item_vectors: np.ndarray, attributes: dict,
                          user_vectors: np.ndarray, targets: list[str]) -> None:
    """Hold out items, embed them from attributes only, and see how they would be served.

    Per method: cosine between the attribute embedding and the item's trained vector, overlap
    of their 10 nearest catalogue items, and, for the users whose held-out target is such an
    item, the rank of the target among all items when it carries the attribute embedding
    (the trained vector's rank is the upper bound; a random vector ranks ~50%).
    """
    rng = np.random.default_rng(0)
    items = artifact.items
    row_of = {item: row for row, item in enumerate(items)}
    held = rng.random(len(items)) < COLD_START_HOLDOUT
    train_rows, test_rows = np.flatnonzero(~held), np.flatnonzero(held)
    exact = ItemIndex.build(item_vectors[train_rows], kind="flat")
    _, true_neighbours = exact.search(item_vectors[test_rows], NEIGHBOURS)
    unit = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True)
    target_rows = np.array([row_of.get(t, -1) for t in targets])
    users = np.flatnonzero(np.isin(target_rows, test_rows))
    user_vecs, user_targets = user_vectors[users], target_rows[users]
    all_scores = user_vecs @ item_vectors.T  # [U, N]: the other items keep their trained vectors

    def target_ranks(target_vectors: np.ndarray) -> np.ndarray:
        own = np.einsum("ud,ud->u", user_vecs, target_vectors)
        scores = all_scores.copy()
        scores[np.arange(len(users)), user_targets] = -np.inf
        return (scores > own[:, None]).sum(axis=1)

    print(f"\n# cold start: {len(test_rows)} items held out ({100 * COLD_START_HOLDOUT:.0f}%), "
          f"{len(users)} test users whose target is one of them")
    print("| item vector | embedded | cosine to trained | neighbour overlap@10 | median target rank | HR@100 |")
    print("|---|---|---|---|---|---|")
    ranks = target_ranks(item_vectors[user_targets])
    print(f"| trained (upper bound) | - | 1.000 | 1.000 | {np.median(ranks):.0f} | {np.mean(ranks < 100):.3f} |")
    for method in EMBEDDER_METHODS:
        embedder = AttributeEmbedder.fit(item_vectors[train_rows], [items[r] for r in train_rows], attributes,
                                         method=method)
        vectors, known = embedder.embed_many([attributes.get(items[r], []) for r in test_rows])
        _, found = exact.search(vectors[known], NEIGHBOURS)
        overlap = np.mean([len(np.intersect1d(a, b)) / NEIGHBOURS for a, b in zip(found, true_neighbours[known])])
        embedded_unit = vectors[known] / np.linalg.norm(vectors[known], axis=1, keepdims=True)
        cosine = np.einsum("nd,nd->n", embedded_unit, unit[test_rows][known]).mean()
        by_row = np.zeros_like(item_vectors)
        by_row[test_rows] = vectors
        ranks = target_ranks(by_row[user_targets])
        print(f"| attributes, {method} | {known.sum()}/{len(test_rows)} | {cosine:.3f} | {overlap:.3f} | "
              f"{np.median(ranks):.0f} | {np.mean(ranks < 100):.3f} |")


def pool_check(config, catalogue, item_vectors, items, contexts, cand_rows, cand_scores) -> None:
    """Share of list entries that change when MMR may pick from all candidates, not the pool."""
    def lists():
        reranker = Reranker(config, catalogue, item_vectors, items)
        out = []
        for s in range(0, len(contexts), ENCODE_BATCH):
            batch = slice(s, s + ENCODE_BATCH)
            out += reranker.rerank(contexts[batch], cand_rows[batch], cand_scores[batch])
        return out

    pooled = lists()
    saved = rerank_module.MMR_POOL_MIN
    rerank_module.MMR_POOL_MIN = cand_rows.shape[1]
    try:
        full = lists()
    finally:
        rerank_module.MMR_POOL_MIN = saved
    same = sum(len({e["item_id"] for e in a} & {e["item_id"] for e in b}) for a, b in zip(pooled, full))
    total = sum(len(b) for b in full)
    pool = max(saved, rerank_module.MMR_POOL_PER_SLOT * config.k)
    print(f"\npool check: lists from a pool of {pool} share {100 * same / max(total, 1):.2f}% of entries "
          f"with lists from all {cand_rows.shape[1]} candidates")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="directory written by model.train")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--sweep", action="store_true", help="try several diversity strengths and caps")
    parser.add_argument("--cold-start", action="store_true", help="compare AttributeEmbedder methods")
    parser.add_argument("--pool-check", action="store_true",
                        help="how often MMR on the whole candidate list picks differently than on its pool")
    parser.add_argument("--users", type=int, default=0, help="evaluate only the first N users (0 = all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from model.artifact import ModelArtifact
    from model.data import leave_one_out, load_attributes, load_log

    artifact = ModelArtifact.load(args.model, device="cpu")
    item_vectors = artifact.item_embeddings()
    items = list(artifact.items)
    catalogue = Catalogue.from_item2attributes(attributes_path(args.data))
    rows = leave_one_out(load_log(args.data), args.split)
    if args.users:
        rows = rows[: args.users]
    started = time.perf_counter()
    user_vectors = encode_users(artifact, [history for _, history, _ in rows])
    index = ItemIndex.build(item_vectors)
    cand_scores, cand_rows = index.search(user_vectors, CANDIDATES)
    print(f"# {args.data.name} split={args.split} users={len(rows)} items={len(items)} dim={item_vectors.shape[1]} "
          f"index={index.info.kind} candidates={CANDIDATES} (encode+search {time.perf_counter() - started:.1f}s)")
    contexts = [UserContext(history=[item for item, _, _ in history]) for _, history, _ in rows]
    targets = [target[0] for _, _, target in rows]
    row_of = {item: row for row, item in enumerate(items)}
    attributes = attribute_matrix(items, catalogue)
    unit = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True)
    default = RerankConfig()
    configs = {"plain top-k (history masked)": replace(default, diversity=0.0, max_per_attribute=None),
               f"default rerank {describe(default)}": default}
    if args.sweep:
        for diversity in SWEEP_DIVERSITY:
            for cap in SWEEP_CAPS:
                config = replace(default, diversity=diversity, max_per_attribute=cap)
                configs.setdefault(describe(config), config)
    results = []
    for name, config in configs.items():
        reranker = Reranker(config, catalogue, item_vectors, items)
        results.append(evaluate(name, reranker, contexts, cand_rows, cand_scores, targets, row_of, attributes, unit))
    baseline = results[0]["NDCG@10"]
    print_table(results, baseline)
    if args.sweep:
        allowed = [r for r in results[1:] if r["NDCG@10"] >= (1 - MAX_NDCG_LOSS) * baseline]
        best = max(allowed, key=lambda r: r["ILD-attr@10"], default=None)
        if best:
            print(f"\nmost diverse (attributes) within {100 * MAX_NDCG_LOSS:.0f}% NDCG@10: {best['config']}")
    if args.pool_check:
        pool_check(default, catalogue, item_vectors, items, contexts, cand_rows, cand_scores)
    if args.cold_start:
        cold_start_comparison(artifact, item_vectors, load_attributes(attributes_path(args.data)),
                              user_vectors, targets)


def describe(config: RerankConfig) -> str:
    return f"(diversity={config.diversity}, max_per_attribute={config.max_per_attribute})"


if __name__ == "__main__":
    main()
