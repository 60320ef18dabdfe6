"""The rerank on the CPU (`Reranker`, numpy) against the rerank where the encoder runs
(`DeviceReranker`, torch: a GPU where there is one, else torch on the CPU), side by side on the
same candidates: µs per list at each batch size, alternating rounds, and whether the lists agree.

    python benchmarks/rerank_device.py --model runs/scale-model      # a model of the scale shop
    python benchmarks/rerank_device.py --model random                # random weights (speed does not depend on them)

The users and histories are the scale workload's; their candidates come from the model's own
index, as the worker's do. Times are wall time of one thread; on a GPU they include copying the
candidates in and the picks out.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from index.rerank import DeviceReranker, Reranker, UserContext
from lanes import random_model
from model.artifact import default_device, keep_freed_memory
from stream.recommender import CANDIDATES_PER_K, Recommender
from streamrec.synthetic import ScaleShop, ScaleSpec, preloaded_state


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (trained on the scale shop), or 'random'")
    parser.add_argument("--batches", type=int, nargs="+", default=[20, 256, 4096], help="users per rerank call")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.model == "random":
        args.model = random_model(tempfile.mkdtemp(prefix="streamrec-random-model-"))
    model = Recommender(args.model).model
    device = default_device()
    users = max(args.batches)
    histories = ScaleShop(ScaleSpec(users=users, seed=0)).histories()
    names = list(histories)
    states = [preloaded_state(u, histories[u]) for u in names]
    vectors = model.encode(states, names, [1] * users, [None] * users)
    rules = (model.reranker.config, model.reranker.catalogue, model.artifact.item_embeddings(), model.artifact.items)
    cpu, on_device = Reranker(*rules), DeviceReranker(*rules, device)
    scores, rows = model.index.search(vectors, CANDIDATES_PER_K * cpu.config.k)
    contexts = [UserContext(history=s.items, purchased=frozenset(s.purchased)) for s in states]
    print(f"{len(cpu):,} items, candidates {rows.shape[1]}, the device reranker on {device}, torch threads {args.threads}")
    for batch in args.batches:
        calls = max(1, 4096 // batch)
        parts = [slice((c * batch) % users, (c * batch) % users + batch) for c in range(calls)]
        parts = [p for p in parts if p.stop <= users] or [slice(0, batch)]
        agree = all(cpu.rerank(contexts[p], rows[p], scores[p]) == on_device.rerank(contexts[p], rows[p], scores[p])
                    for p in parts[:2])   # also warms both up
        spent = {"numpy on the cpu": [], f"torch on {device}": []}
        for _ in range(args.rounds):
            for name, reranker in zip(spent, (cpu, on_device)):
                synchronize(device)
                started = time.perf_counter()
                for p in parts:
                    reranker.rerank(contexts[p], rows[p], scores[p])
                synchronize(device)
                spent[name].append((time.perf_counter() - started) / (len(parts) * batch) * 1e6)
        shown = "; ".join(f"{name} {' / '.join(f'{v:,.1f}' for v in values)}" for name, values in spent.items())
        print(f"batch {batch:>5}: us per list in {args.rounds} rounds: {shown}; same lists: {agree}")


if __name__ == "__main__":
    main()
