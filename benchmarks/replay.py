"""Replay throughput: N synthetic events at max speed into a fresh embedded broker.

    python benchmarks/replay.py --events 200000 --users 20000 --partitions 4 --format jsonl

Prints the reading rate (file -> validated contract events) and the sending rate (events/s
acknowledged by the broker), which is what ``streamrec replay --max`` achieves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from stream.broker import EmbeddedBroker
from stream.compat import ensure_topics, log_end_offsets
from stream.logs import load_events
from stream.replay import replay
from aiokafka import TopicPartition

TOPIC = "shop-events"


def write_log(path: Path, n_events: int, n_users: int, n_items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events)
    items = rng.zipf(1.3, n_events) % n_items
    types = rng.choice(["view", "click", "add_to_cart", "purchase"], n_events, p=[0.7, 0.15, 0.1, 0.05])
    ts = 1_700_000_000.0 + np.cumsum(rng.exponential(0.05, n_events))
    rows = ({"user_id": f"user-{u}", "item_id": f"sku-{i}", "type": str(t), "ts": float(s)}
            for u, i, t, s in zip(users, items, types, ts))
    if path.suffix == ".msgpack":
        with open(path, "wb") as f:
            for r in rows:
                f.write(msgpack.packb(r))
    else:
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


async def run(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bench.{args.format}"
        write_log(path, args.events, args.users, args.items)
        t = time.perf_counter()
        events, *_ = load_events(path)
        read_s = time.perf_counter() - t
        print(f"read    {len(events):,} events in {read_s:.2f} s ({len(events) / read_s:,.0f} events/s)")
        with EmbeddedBroker() as broker:
            await ensure_topics(broker.bootstrap, {TOPIC: args.partitions})
            summary = await replay(path, broker.bootstrap, TOPIC, max_speed=True, progress=args.progress)
            ends = await log_end_offsets(broker.bootstrap, [TopicPartition(TOPIC, p) for p in range(args.partitions)])
        print(f"send    {summary.sent:,} events in {summary.duration_s:.2f} s ({summary.rate:,.0f} events/s), "
              f"{args.partitions} partitions; broker holds {sum(ends.values()):,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--format", choices=["jsonl", "msgpack"], default="jsonl")
    ap.add_argument("--progress", action="store_true")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
