"""``streamrec bench e2e``: throughput and latency through a real broker and a worker process.

Events are stamped with their send time, so ``produced_ts - event ts`` of each list is the
end-to-end event-to-list latency (producer, broker, worker, broker). Throughput is events
sent divided by the time until every user's list reflects that user's last event.

One invocation runs one broker (the embedded one or Apache Kafka) and one worker through a
series of phases -- by default as fast as possible, then a steady 500 and 2,000 events/s --
each on its own users, so every figure comes from the same broker, worker and workload.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream.events import EVENTS_TOPIC
from streamrec import harness
from streamrec.synthetic import ShopSpec, generate

REBALANCE_SETTLE_S = 8.0
BROKER_KINDS = ("tansu", "kafka")


@dataclass
class E2EOptions:
    events: int = 20000
    users: int = 2000
    items: int = 600
    rates: list[float | None] = field(default_factory=lambda: [None])   # None: as fast as possible
    partitions: int = 4
    max_batch: int = 512
    workers: int = 1                # worker processes in the consumer group
    model: Path | None = None
    broker_kind: str = "tansu"
    guarantee: str = "at_least_once"
    train_epochs: int = 3
    seed: int = 0


def shop_events(options: E2EOptions) -> list[dict]:
    """The synthetic shop's events, repeated later in time until there are ``options.events``."""
    events = generate(ShopSpec(users=options.users, items=options.items, seed=options.seed))
    while len(events) < options.events:
        shift = events[-1]["ts"] - events[0]["ts"] + 1.0
        events += [{**e, "event_id": f"{e['event_id']}+{len(events)}", "ts": e["ts"] + shift}
                   for e in events[: options.events - len(events)]]
    return events[: options.events]


def start_broker(kind: str, workdir: Path):
    if kind == "kafka":
        from stream.kafka import KafkaCluster

        return KafkaCluster(nodes=1, data_dir=workdir / "kafka").start()
    from stream.broker import EmbeddedBroker

    return EmbeddedBroker(log_path=str(workdir / "broker.log")).start()


def run_e2e(options: E2EOptions) -> dict:
    if options.broker_kind not in BROKER_KINDS:
        raise ValueError(f"broker kind must be one of {', '.join(BROKER_KINDS)}")
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    events = shop_events(options)
    model = options.model or _train(events, workdir, options.train_epochs)
    broker = start_broker(options.broker_kind, workdir)
    try:
        logs = [workdir / f"worker-{n}.log" for n in range(options.workers)]
        extra = ["--max-batch", str(options.max_batch), "--guarantee", options.guarantee]
        workers = [harness.start_worker(broker.bootstrap, model, workdir / f"state-{n}",
                                        partitions=options.partitions, log_path=log, extra=extra)
                   for n, log in enumerate(logs)]
        try:
            phases = asyncio.run(_drive(broker.bootstrap, events, options, logs))
        finally:
            for worker in workers:
                harness.stop_worker(worker)
    finally:
        (broker.cleanup if hasattr(broker, "cleanup") else broker.stop)()
    return {"broker": options.broker_kind, "guarantee": options.guarantee, "workers": options.workers,
            "events_per_phase": len(events), "users": len({e["user_id"] for e in events}),
            "phases": phases, "worker_stage_seconds": [_last_stage_line(log) for log in logs]}


def _last_stage_line(log: Path) -> str | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "stage seconds" in line]
    return lines[-1].split("processed ")[-1].strip() if lines else None


def _train(events: list[dict], workdir: Path, epochs: int) -> Path:
    from model.data import log_from_events
    from model.train import TrainConfig, train
    from stream.recommender import write_model_dir

    log = log_from_events(events)
    out = workdir / "model"
    write_model_dir(out, lambda tmp: train(log, TrainConfig(epochs=epochs), out_dir=tmp, progress=False))
    return out


async def _drive(bootstrap: str, events: list[dict], options: E2EOptions, logs: list[Path]) -> list[dict]:
    for log in logs:
        await harness.wait_for_worker_ready(bootstrap, log)
    if len(logs) > 1:
        await asyncio.sleep(REBALANCE_SETTLE_S)  # later joiners trigger a rebalance
    collector = harness.ListCollector(bootstrap, read_committed=options.guarantee == "exactly_once")
    await collector.start()
    try:
        return [await _phase(n, bootstrap, events, rate, collector) for n, rate in enumerate(options.rates)]
    finally:
        await collector.stop()


async def _phase(n: int, bootstrap: str, events: list[dict], rate: float | None, collector) -> dict:
    """One offered rate on the phase's own users (ids prefixed), until every list is current."""
    tag = f"p{n}-"
    events = [{**e, "user_id": tag + e["user_id"], "event_id": tag + e["event_id"]} for e in events]
    first_latency = len(collector.latencies)
    started = time.time()
    await harness.produce(bootstrap, EVENTS_TOPIC, harness.event_records(events, now_ts=True), rate=rate)
    produced = time.time() - started
    last = {e["user_id"]: e["event_id"] for e in events}
    complete = await collector.wait_for(
        lambda c: all(c.latest.get(u, {}).get("event_id") == i for u, i in last.items()), timeout=600)
    elapsed = time.time() - started
    lat = np.asarray(collector.latencies[first_latency:]) * 1000
    seen = np.asarray(collector.visible_latencies[first_latency:]) * 1000
    return {
        "offered_rate": rate or "max",
        "produce_seconds": round(produced, 2),
        "complete": complete,
        "seconds_until_all_lists_current": round(elapsed, 2),
        "throughput_events_per_s": round(len(events) / elapsed, 1),
        "lists": len(lat),
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "latency_max_ms": round(float(lat.max()), 1),
        # arrival at a read_committed (exactly-once) or plain consumer: includes the commit wait
        "visible_p50_ms": round(float(np.percentile(seen, 50)), 1),
        "visible_p99_ms": round(float(np.percentile(seen, 99)), 1),
    }


def render(result: dict) -> str:
    """The phases as an aligned table, then the worker's stage seconds."""
    cols = ("offered_rate", "throughput_events_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms",
            "visible_p50_ms", "visible_p99_ms", "seconds_until_all_lists_current", "lists", "complete")
    head = ("offered/s", "events/s", "p50 ms", "p99 ms", "max ms", "seen p50", "seen p99", "s to current",
            "lists", "complete")
    rows = [head] + [tuple(str(p[c]) for c in cols) for p in result["phases"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"broker {result['broker']}, {result['guarantee']}, {result['workers']} worker(s), "
             f"{result['events_per_phase']:,} events of {result['users']:,} users per phase"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [f"worker stages: {s}" for s in result["worker_stage_seconds"]]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_e2e(E2EOptions())))
