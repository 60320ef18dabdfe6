"""What the load generator of ``streamrec bench e2e`` costs its machine: the CPU per event of
``streamrec.harness.produce`` sending the shop's events at a paced rate, stamped at send time as
a latency phase sends them (``harness.event_records(..., now_ts=True)``).

    python benchmarks/load_generator.py                      # a local Apache Kafka (fetched once)
    python benchmarks/load_generator.py --broker-kind tansu --rate 2000 --rounds 5

On a 2-core machine the load generator, the broker and the worker share the cores, so what the
generator takes is not the worker's. Printed per round: events, wall seconds (the pace kept:
events / rate when it keeps up) and this process's CPU per event (the generator's encoding and
batching and aiokafka's sender), then the median over rounds. Compare versions by running this
file from a checkout of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from stream import compat
from streamrec import harness
from streamrec.bench import E2EOptions, ShopWorkload, start_broker

TOPIC = "streamrec-load-generator"
PARTITIONS = 4


async def run(bootstrap: str, events: list[dict], rate: float, rounds: int) -> None:
    await compat.ensure_topics(bootstrap, {TOPIC: PARTITIONS})
    per_event = []
    for n in range(rounds):
        cpu, wall = time.process_time(), time.monotonic()
        await harness.produce(bootstrap, TOPIC, harness.event_records(events, now_ts=True), rate=rate)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        per_event.append(cpu / len(events) * 1e6)
        print(f"round {n + 1}: {len(events):,} events in {wall:.2f} s ({len(events) / wall:,.0f}/s), "
              f"CPU {per_event[-1]:.1f} us per event", flush=True)
    print(f"median CPU {statistics.median(per_event):.1f} us per event at {rate:,.0f} events/s offered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-kind", choices=("kafka", "tansu"), default="kafka")
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second offered")
    parser.add_argument("--events", type=int, default=20_000, help="events per round (the shop's phase)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    events = ShopWorkload(E2EOptions(events=args.events)).phase(0)[:args.events]
    with tempfile.TemporaryDirectory(prefix="streamrec-load-generator-") as workdir:
        broker = start_broker(args.broker_kind, Path(workdir))
        try:
            asyncio.run(run(broker.bootstrap, events, args.rate, args.rounds))
        finally:
            broker.cleanup()


if __name__ == "__main__":
    main()
