"""``streamrec bench e2e``: throughput and latency through a real broker and a worker process.

Events are stamped with their send time, so ``produced_ts - event ts`` of each list is the
end-to-end event-to-list latency (producer, broker, worker, broker). Throughput is events
sent divided by the time until every user's list reflects that user's last event.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream.broker import EmbeddedBroker
from stream.events import EVENTS_TOPIC
from streamrec import harness
from streamrec.synthetic import ShopSpec, generate


REBALANCE_SETTLE_S = 8.0


@dataclass
class E2EOptions:
    events: int = 20000
    users: int = 2000
    items: int = 600
    rate: float | None = None       # None: as fast as the producer goes
    partitions: int = 4
    max_batch: int = 512
    workers: int = 1                # worker processes in the consumer group
    model: Path | None = None
    train_epochs: int = 3
    seed: int = 0


def run_e2e(options: E2EOptions) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    spec = ShopSpec(users=options.users, items=options.items, seed=options.seed)
    events = generate(spec)
    while len(events) < options.events:  # longer runs: the same shop, later in time
        shift = events[-1]["ts"] - events[0]["ts"] + 1.0
        events += [{**e, "event_id": f"{e['event_id']}+{len(events)}", "ts": e["ts"] + shift}
                   for e in events[: options.events - len(events)]]
    events = events[: options.events]
    model = options.model or _train(events, workdir, options.train_epochs)
    with EmbeddedBroker(log_path=str(workdir / "broker.log")) as broker:
        logs = [workdir / f"worker-{n}.log" for n in range(options.workers)]
        workers = [harness.start_worker(broker.bootstrap, model, workdir / f"state-{n}",
                                        partitions=options.partitions, log_path=log,
                                        extra=["--max-batch", str(options.max_batch)])
                   for n, log in enumerate(logs)]
        try:
            result = asyncio.run(_drive(broker.bootstrap, events, options, logs))
        finally:
            for worker in workers:
                harness.stop_worker(worker)
    result["worker_stage_seconds"] = [_last_stage_line(log) for log in logs]
    return result


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


async def _drive(bootstrap: str, events: list[dict], options: E2EOptions, logs: list[Path]) -> dict:
    for log in logs:
        await harness.wait_for_worker_ready(bootstrap, log)
    if len(logs) > 1:
        await asyncio.sleep(REBALANCE_SETTLE_S)  # later joiners trigger a rebalance
    collector = harness.ListCollector(bootstrap)
    await collector.start()
    started = time.time()
    await harness.produce(bootstrap, EVENTS_TOPIC, harness.event_records(events, now_ts=True), rate=options.rate)
    produced = time.time() - started
    last = {e["user_id"]: e["event_id"] for e in events}
    complete = await collector.wait_for(
        lambda c: all(c.latest.get(u, {}).get("event_id") == i for u, i in last.items()), timeout=600)
    elapsed = time.time() - started
    await collector.stop()
    lat = np.asarray(collector.latencies) * 1000
    return {
        "events": len(events),
        "workers": options.workers,
        "users": len(last),
        "offered_rate": options.rate or "max",
        "produce_seconds": round(produced, 2),
        "complete": complete,
        "seconds_until_all_lists_current": round(elapsed, 2),
        "throughput_events_per_s": round(len(events) / elapsed, 1),
        "lists": collector.messages,
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "latency_max_ms": round(float(lat.max()), 1),
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_e2e(E2EOptions())))
