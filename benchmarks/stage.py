"""The recommend stage alone on an end-to-end workload's batches: what one worker's recommend
thread (and its lanes) can do, without a broker, the event loop or the load generator on the
same cores -- the ceiling `streamrec bench e2e` approaches, and a steadier way to compare
changes to the encoder, search and rerank than end-to-end runs (which move ~10-30% from run to
run on 2 cores).

    python benchmarks/stage.py --workload shop                         # trains a small model first
    python benchmarks/stage.py --workload scale --model DIR --lanes 1 2 --repeats 2
    taskset -c 0,1 python benchmarks/stage.py --workload scale --model random   # 2 cores of a GPU machine
    python benchmarks/stage.py --workload scale --model DIR --after 3   # a warm worker: the 4th phase

The events are the workload's first phase (`streamrec/bench.py`; with ``--after N``, the
phase after N that the same recommender serves first, untimed), cut into batches of
``--max-batch`` events in arrival order (a worker at saturation takes full batches), coalesced
per user and applied to each user's state as the pipeline does; each batch then goes through
`Recommender.recommend_batch` with the worker's lanes and garbage-collector settings. Each run
starts from an empty encoder cache and the workload's initial states. Prints events/s and
lists/s of the stage (wall and process CPU), thread seconds per stage, the cache's hit rate,
and the share of the machine's CPU time that its hypervisor gave to other guests meanwhile
(steal: compare runs without it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import torch

from lanes import random_model
from model.artifact import keep_freed_memory
from stream.events import event_from_dict
from stream.recommender import RECOMMEND_STAGES, Recommender
from stream.state import UserState
from stream.worker import WorkerSettings, freeze_startup_heap
from streamrec.bench import E2EOptions, ScaleWorkload, ShopWorkload, host_cpu_ticks, steal_percent


def batches(events: list[dict], max_batch: int) -> list[list]:
    """The phase's events as the pipeline's batches: (user, events of the batch) in first-seen order."""
    out = []
    for start in range(0, len(events), max_batch):
        by_user: dict[str, list] = {}
        for raw in events[start:start + max_batch]:
            event = event_from_dict(raw)
            by_user.setdefault(event.user_id, []).append(event)
        out.append(list(by_user.items()))
    return out


def applied(batch: list, stored: dict[str, bytes]):
    """The pipeline's stage 1 for one batch (it runs on the event loop, untimed here): each
    user's events applied to the stored state; ``recommend_batch``'s arguments."""
    states, users, new, tails, events = [], [], [], [], []
    for user, user_events in batch:
        state = UserState.decode(stored.get(user))
        tails.append(state.last_event_id)
        new.append(state.apply(user_events))
        stored[user] = state.encode()
        states.append(state)
        users.append(user)
        events += user_events
    return states, events, (), users, new, tails


def run(model: Path, lanes: int, work: list[list], start: dict[str, bytes], before: list[list] = (),
        cache_mb: int = WorkerSettings.cache_mb) -> dict:
    """One pass over the batches with a fresh Recommender (an empty cache); the batches of
    ``before`` go through it first, untimed (a worker that has already served them)."""
    rec = Recommender(model, lanes=lanes, cache_bytes=cache_mb << 20)
    # the worker's collector settings: with Python's defaults the collector's passes over the
    # workload's 50k preloaded states ran inside whichever stage allocated next (the scale
    # workload, one lane, 0ab126e: 2,644 events/s against 2,841-2,977 with these)
    freeze_startup_heap()
    stored = dict(start)
    for batch in before:
        rec.recommend_batch(*applied(batch, stored))
    counted_before = rec.cache_counters()
    spent = dict.fromkeys(RECOMMEND_STAGES, 0.0)
    events = lists = 0
    wall = cpu = 0.0
    host_before = host_cpu_ticks()
    for batch in work:
        args = applied(batch, stored)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = rec.recommend_batch(*args)
        wall += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        for stage, seconds in result.timings.items():
            spent[stage] += seconds
        events += len(args[1])
        lists += len(result.lists)
    counters = rec.cache_counters()
    hits, misses = (counters.get(k, 0) - counted_before.get(k, 0) for k in ("cache_hits", "cache_misses"))
    return {"events": events, "lists": lists, "wall": wall, "cpu": cpu, "spent": spent,
            "hits": hits / (hits + misses) if hits + misses else 0.0,
            "steal": steal_percent(host_before, host_cpu_ticks())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("shop", "scale"), default="shop")
    parser.add_argument("--model", help="model directory (default: train one as bench e2e does); 'random': "
                                        "the recipe's encoder with random weights over the scale shop's items")
    parser.add_argument("--events", type=int, default=20000, help="events of the phase")
    parser.add_argument("--max-batch", type=int, default=WorkerSettings.max_batch)
    parser.add_argument("--lanes", type=int, nargs="+", default=[WorkerSettings.lanes])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each lane count, alternating")
    parser.add_argument("--cache-mb", type=int, default=WorkerSettings.cache_mb, help="the worker's --cache-mb")
    parser.add_argument("--after", type=int, default=0,
                        help="phases served, untimed, before the timed one: a warm cache (scale: the same "
                             "users continue; shop: every phase's users are new)")
    args = parser.parse_args()
    keep_freed_memory()
    options = E2EOptions(events=args.events, workload=args.workload)
    workload = ShopWorkload(options) if args.workload == "shop" else ScaleWorkload(options)
    if args.model == "random":
        model = Path(random_model(tempfile.mkdtemp(prefix="streamrec-random-model-")))
    elif args.model:
        model = Path(args.model)
    else:
        model = workload.train(Path(tempfile.mkdtemp(prefix="streamrec-stage-")), options)
    before = [b for n in range(args.after) for b in batches(workload.phase(n), args.max_batch)]
    work = batches(workload.phase(args.after), args.max_batch)
    start = {user: state.encode() for user, state in workload.states()}
    print(f"{args.workload}: {sum(len(b) for b in work):,} lists of {args.events:,} events in {len(work)} batches "
          f"(max {args.max_batch}){f', after {args.after} untimed phase(s)' if args.after else ''}; model {model}")
    for repeat in range(args.repeats):
        for lanes in args.lanes:
            threads = WorkerSettings(broker="", model=None, lanes=lanes).torch_threads   # as the worker sets them
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            r = run(model, lanes, work, start, before, args.cache_mb)
            stages = ", ".join(f"{k} {v / r['lists'] * 1e6:,.0f}" for k, v in r["spent"].items())
            print(f"lanes {lanes}: {r['events'] / r['wall']:,.0f} events/s, {r['lists'] / r['wall']:,.0f} lists/s "
                  f"(wall); process CPU {r['cpu'] / r['lists'] * 1e6:,.0f} us per list; thread us per list: "
                  f"{stages}; cache hits {r['hits']:.1%}; steal {r['steal']:.1f}% of the machine's CPU time")


if __name__ == "__main__":
    main()
