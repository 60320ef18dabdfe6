"""What producing a batch's records costs the event loop: a send per record (the worker before
record batches) against one record batch per topic partition (``Delivery.send_batches``, what
stage 2 of ``stream/pipeline.py`` does), side by side on one broker.

    python benchmarks/publish.py                        # a local Apache Kafka (fetched once)
    python benchmarks/publish.py --broker-kind tansu --lists 1000 --rounds 5

Each pipeline batch is ``--lists`` users: a list (20 items, as the worker encodes it) to
``recommendations`` keyed by the user, and a state row (the scale workload's size) to the
changelog in the user's partition, all acknowledged before the next batch, as at-least-once
waits. The two ways alternate, ``--rounds`` batches each; printed: the event loop's CPU (its
thread's, which runs aiokafka's sender too) and wall time per list, medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from stream import compat
from stream.delivery import AtLeastOnce
from stream.events import RECOMMENDATIONS_TOPIC, encode_recommendations
from streamrec.bench import start_broker

CHANGELOG = "streamrec-user-state-changelog"
PARTITIONS = 4
STATE_ROW_BYTES = 1_732     # a scale-workload user's state row (README)


def pipeline_records(lists: int, batch: int) -> list[tuple]:
    """(topic, key, value, source, partition) of one pipeline batch, in stage 2's order."""
    items = [{"item_id": f"item-{n:05d}", "score": 0.5 - n / 100, "because": f"item-{n + 7:05d}"} for n in range(20)]
    users = [f"user-{batch:03d}-{u:05d}" for u in range(lists)]
    records = [(RECOMMENDATIONS_TOPIC, u.encode(), encode_recommendations(u, items, "v1", f"e-{u}", 1.7e9, 1.7e9),
                n % PARTITIONS, None) for n, u in enumerate(users)]
    records += [(CHANGELOG, u.encode(), bytes(STATE_ROW_BYTES), n % PARTITIONS, n % PARTITIONS)
                for n, u in enumerate(users)]
    return records


async def per_record(delivery: AtLeastOnce, records: list[tuple]) -> None:
    """The worker before record batches: a send per record, through the same producer."""
    producer = delivery._producer
    futures = [await producer.send(topic, value, key=key, partition=partition)
               for topic, key, value, _, partition in records]
    await asyncio.gather(*futures)


async def batched(delivery: AtLeastOnce, records: list[tuple]) -> None:
    sent = await delivery.send_batches(records)
    await delivery.batch_sent([s.future for s in sent])


async def run(bootstrap: str, idempotent: bool, lists: int, rounds: int) -> None:
    await compat.ensure_topics(bootstrap, {RECOMMENDATIONS_TOPIC: PARTITIONS, CHANGELOG: PARTITIONS})

    async def commit(offsets):
        return True

    delivery = AtLeastOnce(bootstrap, commit, idempotent=idempotent, commit_interval_s=1.0)
    await delivery.start()
    timed: dict[str, list[tuple[float, float]]] = {"a send per record": [], "record batches": []}
    try:
        for n in range(rounds + 1):   # the first round warms both up, untimed
            for name, produce in (("a send per record", lambda r: per_record(delivery, r)),
                                  ("record batches", lambda r: batched(delivery, r))):
                records = pipeline_records(lists, 2 * n + (name == "record batches"))
                cpu, wall = time.thread_time(), time.perf_counter()
                await produce(records)
                if n:
                    timed[name].append((time.thread_time() - cpu, time.perf_counter() - wall))
    finally:
        await delivery.stop()
    for name, runs in timed.items():
        cpu = statistics.median(c for c, _ in runs) / lists * 1e6
        wall = statistics.median(w for _, w in runs) / lists * 1e6
        print(f"{name:>17}: {cpu:5.1f} µs of event-loop CPU per list ({cpu / 2:.1f} per record), "
              f"{wall:5.1f} µs wall; {lists:,} lists x {rounds} batches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-kind", choices=("kafka", "tansu"), default="kafka")
    parser.add_argument("--lists", type=int, default=2000, help="users per pipeline batch")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamrec-publish-") as tmp:
        broker = start_broker(args.broker_kind, Path(tmp))
        try:
            asyncio.run(run(broker.bootstrap, args.broker_kind == "kafka", args.lists, args.rounds))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
