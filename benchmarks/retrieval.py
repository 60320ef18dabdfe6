"""Candidate retrieval: exact vs approximate inner-product search on a clustered catalogue.

    python benchmarks/retrieval.py [--n 1000000] [--dim 64] [--queries 1000] [--methods ...]

Synthetic item vectors imitate trained embeddings: a Gaussian mixture whose cluster sizes
follow a power law (a few huge categories, a long tail), clusters grouped under a handful of
"departments", and norms that vary log-normally (popular items are longer). Queries are
user-like: a random convex mix of 1-5 catalogue items (the user's interests) plus noise.

Per method it prints recall@100 against exact search, queries/s for batches of 1000 (median
of repeats), build seconds and index memory (serialized size). `--n` takes several sizes,
e.g. `--n 1000000 18357 12101` (the Sports and Beauty catalogue sizes); `--model DIR`
replaces the synthetic data with a trained model's item embeddings and encoded users.
"""

from __future__ import annotations

import argparse
import logging
import time

import faiss
import numpy as np

from index import item_index as item_index_module
from index.item_index import ItemIndex, recall_at_k
from shared_data import SHARED_DATA

log = logging.getLogger(__name__)

K = 100
BATCH = 1000
REPEATS = 3
ITEMS_PER_CLUSTER = 500  # mean; the sizes themselves are power-law
CLUSTER_SIZE_EXPONENT = 1.2  # Zipf-like exponent of cluster sizes
DEPARTMENTS = 24
WITHIN_CLUSTER_SPREAD = 0.5  # item noise relative to the centre spread
NORM_SIGMA = 0.35  # log-normal sigma of item norms
QUERY_NOISE = 0.3
METHODS = ("exact", "ivf", "ivf-users", "ivf-ip", "hnsw", "auto")
TUNING_USERS = 256  # user vectors (disjoint from the measured queries) for "ivf-users"


def synthetic_catalogue(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 clustered item vectors with power-law cluster sizes and varying norms."""
    rng = np.random.default_rng(seed)
    clusters = max(2, n // ITEMS_PER_CLUSTER)
    departments = rng.standard_normal((DEPARTMENTS, dim))
    centres = departments[rng.integers(0, DEPARTMENTS, clusters)] + 0.8 * rng.standard_normal((clusters, dim))
    weights = 1.0 / np.arange(1, clusters + 1) ** CLUSTER_SIZE_EXPONENT
    labels = rng.choice(clusters, size=n, p=weights / weights.sum())
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 200_000):  # chunks keep float64 temporaries small
        part = slice(start, min(n, start + 200_000))
        chunk = centres[labels[part]] + WITHIN_CLUSTER_SPREAD * rng.standard_normal((part.stop - part.start, dim))
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        chunk *= rng.lognormal(0.0, NORM_SIGMA, size=(len(chunk), 1))
        vectors[part] = chunk
    return vectors


def user_queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """User-like queries: random convex mixes of 1-5 catalogue items plus noise."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    queries = np.empty((count, dim), dtype=np.float32)
    for row in range(count):
        liked = vectors[rng.integers(0, n, size=rng.integers(1, 6))]
        mix = liked.T @ rng.dirichlet(np.ones(len(liked)))
        queries[row] = mix + QUERY_NOISE * np.linalg.norm(mix) * rng.standard_normal(dim) / np.sqrt(dim)
    return queries


def queries_per_second(index, queries: np.ndarray) -> float:
    """Median throughput over REPEATS passes of batches of BATCH queries."""
    rates = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for start in range(0, len(queries), BATCH):
            index.search(queries[start : start + BATCH], K)
        rates.append(len(queries) / (time.perf_counter() - started))
    return float(np.median(rates))


def memory_mb(index: ItemIndex) -> float:
    return len(faiss.serialize_index(index.faiss_index())) / 2**20


def build(method: str, vectors: np.ndarray, user_sample: np.ndarray) -> ItemIndex:
    if method == "exact":
        return ItemIndex.build(vectors, kind="flat", use_gpu=False)
    if method == "ivf-users":  # nprobe tuned on other users' vectors instead of the stand-in
        return ItemIndex.build(vectors, kind="ivf", use_gpu=False, tuning_queries=user_sample)
    if method == "ivf-ip":  # IVF searching inner product directly, without the L2 reduction
        saved = item_index_module.IVF_MIPS_TO_L2
        item_index_module.IVF_MIPS_TO_L2 = False
        try:
            return ItemIndex.build(vectors, kind="ivf", use_gpu=False)
        finally:
            item_index_module.IVF_MIPS_TO_L2 = saved
    return ItemIndex.build(vectors, kind=method, use_gpu=False)


def describe(index: ItemIndex) -> str:
    info = index.info
    if info.kind == "ivf":
        return f"ivf nlist={info.nlist} nprobe={info.nprobe}" + (" l2" if info.l2_radius else " ip")
    if info.kind == "hnsw":
        return f"hnsw M={item_index_module.HNSW_M} ef={info.ef_search}"
    return "flat"


def trained_vectors(model_dir: str, data: str, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item embeddings of a trained model, encoded random users, and other users to tune on."""
    from model.artifact import ModelArtifact
    from model.data import load_log

    artifact = ModelArtifact.load(model_dir, device="cpu")
    histories = list(load_log(data).values())
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(histories), size=min(n_queries + TUNING_USERS, len(histories)), replace=False)
    queries = artifact.encode([histories[i] for i in chosen]).astype(np.float32)
    return artifact.item_embeddings(), queries[:-TUNING_USERS], queries[-TUNING_USERS:]


def run(n: int, dim: int, n_queries: int, methods: list[str], model: str | None = None,
        data: str | None = None) -> list[dict]:
    started = time.perf_counter()
    if model:
        vectors, queries, user_sample = trained_vectors(model, data, n_queries)
        n, dim, n_queries = vectors.shape[0], vectors.shape[1], len(queries)
    else:
        vectors = synthetic_catalogue(n, dim)
        queries = user_queries(vectors, n_queries)
        user_sample = user_queries(vectors, TUNING_USERS, seed=2)
    source = f"trained model {model}, users of {data}" if model else "synthetic"
    print(f"\n# n={n:,} dim={dim} queries={n_queries} {source} (data {time.perf_counter() - started:.1f}s)",
          flush=True)
    exact = build("exact", vectors, user_sample)
    _, truth = exact.search(queries, K)
    rows = []
    exact_qps = None
    for method in methods:
        started = time.perf_counter()
        index = exact if method == "exact" else build(method, vectors, user_sample)
        build_s = 0.0 if method == "exact" else time.perf_counter() - started
        _, found = index.search(queries, K)
        qps = queries_per_second(index, queries)
        if method == "exact":
            exact_qps = qps
        rows.append({
            "n": n, "method": method, "config": describe(index),
            "recall": recall_at_k(found, truth), "qps": qps,
            "speedup": qps / exact_qps if exact_qps else float("nan"),
            "build_s": build_s, "memory_mb": memory_mb(index),
        })
        print_row(rows[-1])
    return rows


HEADER = f"| {'n':>9} | {'method':<9} | {'config':<28} | {'recall@100':>10} | {'queries/s':>9} | {'x exact':>7} | {'build s':>7} | {'memory MB':>9} |"


def print_row(row: dict) -> None:
    if not getattr(print_row, "printed_header", False):
        print(HEADER)
        print("|" + "|".join("-" * (len(cell)) for cell in HEADER.split("|")[1:-1]) + "|")
        print_row.printed_header = True
    print(
        f"| {row['n']:>9,} | {row['method']:<9} | {row['config']:<28} | {row['recall']:>10.4f} | "
        f"{row['qps']:>9,.0f} | {row['speedup']:>7.1f} | {row['build_s']:>7.1f} | {row['memory_mb']:>9.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["exact", "ivf", "ivf-ip", "hnsw", "auto"], choices=METHODS)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0 = FAISS default)")
    parser.add_argument("--model", help="use this trained model's item embeddings and user vectors instead")
    parser.add_argument("--data", default=str(SHARED_DATA / "Beauty.txt"),
                        help="log whose users --model encodes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, k={K}, batch={BATCH}, "
          f"queries/s = median of {REPEATS} passes")
    methods = ["exact"] + [m for m in args.methods if m != "exact"]
    if args.model:
        run(0, 0, args.queries, methods, args.model, args.data)
        return
    for n in args.n:
        run(n, args.dim, args.queries, methods)


if __name__ == "__main__":
    main()
