"""The recommend step on one thread against ``--lanes`` threads, side by side: µs per list of
``Recommender.recommend`` (encode, search, rerank) for batches of users new to the encoder
cache (full recomputes of their windows: the scale workload's misses), alternating runs.

    python benchmarks/lanes.py --model runs/scale-model        # a 256-wide model of the scale shop
    python benchmarks/lanes.py --model random --lanes 1 --batch 4096   # on a GPU: no model to carry

The users and histories are the scale workload's (``streamrec bench e2e --workload scale``,
which trains such a model into its work directory); the model must know their items.
``--model random`` serves the recipe's encoder with random weights over the scale shop's whole
catalogue (speed does not depend on the weights). On a machine with CUDA the encoder and the
exact search run on the GPU, and the rerank's batch arrays (`DeviceReranker`).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from model.artifact import ModelArtifact, keep_freed_memory
from model.encoder import EncoderConfig, SequenceEncoder
from stream.recommender import Recommender
from streamrec.synthetic import ScaleShop, ScaleSpec, item_id, preloaded_state


def random_model(directory: str) -> str:
    """The recipe's encoder, random weights, over every item of the scale shop."""
    items = [item_id(i) for i in range(ScaleSpec().items)]
    torch.manual_seed(0)
    ModelArtifact(SequenceEncoder(EncoderConfig(n_items=len(items))), items, device="cpu").save(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (trained on the scale shop), or 'random'")
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="users per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per lane)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave malloc's defaults (the worker keeps freed memory: model.artifact.keep_freed_memory)")
    args = parser.parse_args()
    if not args.glibc_defaults:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.model == "random":
        args.model = random_model(tempfile.mkdtemp(prefix="streamrec-random-model-"))

    histories = ScaleShop(ScaleSpec(users=args.batch * args.batches, seed=0)).histories()
    users = list(histories)
    batches = [users[i:i + args.batch] for i in range(0, args.batch * args.batches, args.batch)]
    states = [[preloaded_state(u, histories[u]) for u in b] for b in batches]
    for repeat in range(args.repeats):
        for lanes in (1, args.lanes):
            rec = Recommender(args.model, lanes=lanes)   # an empty cache: every user is a miss
            if repeat == 0 and lanes == 1:
                serving = rec.model
                print(f"encoder on {serving.artifact.device}, {len(serving.artifact.items):,} items, "
                      f"search {serving.index.info.kind} on {serving.index.backend}, torch threads {args.threads}")
            rec.recommend(states[0][:5], batches[0][:5], [1] * 5, [None] * 5)   # warm up
            spent, started = dict.fromkeys(("encode", "search", "rerank"), 0.0), time.perf_counter()
            for b, s in zip(batches, states):
                rec.recommend(s, b, [1] * len(b), [f"{u}/before" for u in b])
                for stage, seconds in rec.timings.items():
                    spent[stage] += seconds
            lists = args.batch * args.batches
            wall = (time.perf_counter() - started) / lists * 1e6
            stages = ", ".join(f"{k} {v / lists * 1e6:.0f}" for k, v in spent.items())
            print(f"lanes {lanes}: {wall:,.0f} us per list (wall); thread us per list: {stages}")


if __name__ == "__main__":
    main()
