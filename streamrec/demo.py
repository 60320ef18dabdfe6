"""``streamrec demo``: the whole system on one machine, then a summary.

broker (embedded Tansu) -> synthetic shop (or --data) -> train a small model -> worker
-> stream the held-out part of the traffic live -> watch lists change -> stop everything.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from stream.broker import EmbeddedBroker
from stream.events import DLQ_TOPIC, EVENTS_TOPIC
from streamrec import harness
from streamrec.synthetic import ShopSpec, extend_in_time, generate

TRAIN_SHARE = 0.8            # oldest share of the traffic trains the model; the rest is streamed
WATCHED_USERS = 3
REFRESH_S = 0.5


@dataclass
class DemoOptions:
    data: Path | None = None
    users: int = 2000
    items: int = 600
    train_minutes: float = 1.5
    rate: float = 2000.0
    seconds: float = 30.0
    workdir: Path | None = None
    seed: int = 0
    partitions: int = 4


def load_events(options: DemoOptions) -> list[dict]:
    if options.data is None:
        return generate(ShopSpec(users=options.users, items=options.items, seed=options.seed))
    from stream.logs import load_events as read_log

    events, rejected, _, _ = read_log(options.data)
    if rejected:
        Console().print(f"[yellow]skipped {sum(rejected.values()):,} bad records in {options.data}: "
                        f"{dict(rejected.most_common(5))}[/]")
    if not events:
        raise SystemExit(f"no valid events in {options.data}")
    return [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "type": e.type, "ts": e.ts}
            for e in events]


def run_demo(options: DemoOptions) -> dict:
    console = Console()
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="streamrec-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with EmbeddedBroker(log_path=str(workdir / "broker.log")) as broker:
        console.print(f"[bold]1/4[/] embedded broker (Tansu) on [cyan]{broker.bootstrap}[/]")
        events = load_events(options)
        cut = int(len(events) * TRAIN_SHARE)
        history, live = events[:cut], events[cut:]
        source = options.data or f"synthetic shop: {options.users} users, {options.items} items"
        console.print(f"[bold]2/4[/] {len(events):,} events ({source}); training on the oldest "
                      f"{len(history):,}, streaming the newest {len(live):,}")
        model_dir = train_demo_model(history, workdir, options.train_minutes, console)
        console.print(f"[bold]3/4[/] worker starting (group streamrec, {options.partitions} partitions)")
        log_path = workdir / "worker.log"
        worker = harness.start_worker(broker.bootstrap, model_dir, workdir / "state",
                                      partitions=options.partitions, log_path=log_path)
        try:
            summary = asyncio.run(stream_live(broker.bootstrap, history, live, options, log_path, console))
        finally:
            harness.stop_worker(worker)
    test = json.loads((model_dir / "metadata.json").read_text()).get("metrics", {}).get("test", {})
    summary["model"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in test.items()}
    summary["wall_seconds"] = round(time.time() - started, 1)
    if options.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        summary["workdir"] = str(workdir)  # model, broker and worker logs are kept there
    print_summary(summary, console)
    return summary


def train_demo_model(history: list[dict], workdir: Path, minutes: float, console: Console) -> Path:
    from model.data import log_from_events
    from model.train import TrainConfig, train
    from stream.recommender import write_model_dir

    log = log_from_events(history)
    t0 = time.time()
    out = workdir / "models" / "demo"
    artifact = write_model_dir(out, lambda tmp: train(log, TrainConfig(max_minutes=minutes), out_dir=tmp))
    test = artifact.metadata.get("metrics", {}).get("test", {})
    console.print(f"    model {artifact.version}: {time.time() - t0:.0f}s, test HR@10 "
                  f"{test.get('HR@10', float('nan')):.3f}, NDCG@10 {test.get('NDCG@10', float('nan')):.3f}")
    return out


async def stream_live(bootstrap: str, history: list[dict], live: list[dict], options: DemoOptions,
                      log_path: Path, console: Console) -> dict:
    from stream.lag import lag_snapshot

    await harness.wait_for_worker_ready(bootstrap, log_path)
    collector = harness.ListCollector(bootstrap)
    await collector.start()
    # Watch a few users who have history and will act again during the live part.
    live_users = {e["user_id"] for e in live}
    watched = [u for u in dict.fromkeys(e["user_id"] for e in reversed(history)) if u in live_users][:WATCHED_USERS]
    budget = int(options.rate * options.seconds)
    stream = extend_in_time(live, budget)
    if len(stream) > len(live):
        console.print(f"    the held-out traffic has {len(live):,} events: replayed again, later in time, "
                      f"to fill {options.seconds:.0f} s at {options.rate:,.0f}/s")
    sent = [0]
    console.print(f"[bold]4/4[/] streaming {len(stream):,} events at {options.rate:,.0f}/s "
                  f"(event ts = send time, so latency is end to end)")
    producing = asyncio.create_task(harness.produce(
        bootstrap, EVENTS_TOPIC, harness.event_records(stream, now_ts=True), rate=options.rate,
        on_sent=lambda n: sent.__setitem__(0, n)))
    t0 = time.time()
    lag = None
    with Live(console=console, refresh_per_second=4) as view:
        while True:
            done = producing.done()
            try:
                lag = await lag_snapshot(bootstrap, "streamrec", topics=[EVENTS_TOPIC])
            except Exception:  # the group may not have committed yet
                lag = None
            view.update(render(collector, sent[0], time.time() - t0, lag, watched, history, stream[:sent[0]]))
            if done and lag is not None and lag.total_lag == 0 and collector.messages:
                break
            if time.time() - t0 > options.seconds + 60:
                break
            await asyncio.sleep(REFRESH_S)
    await producing
    elapsed = time.time() - t0
    last = {e["user_id"]: e["event_id"] for e in stream}
    await collector.wait_for(lambda c: all(c.latest.get(u, {}).get("event_id") == i for u, i in last.items()), 30)
    await collector.stop()
    lat = np.array(collector.latencies) if collector.latencies else np.zeros(1)
    dlq = await count_topic(bootstrap, DLQ_TOPIC)
    return {
        "events_streamed": len(stream),
        "users_streamed": len(last),
        "users_with_current_list": sum(collector.latest.get(u, {}).get("event_id") == i for u, i in last.items()),
        "lists_received": collector.messages,
        "dead_letters": dlq,
        "throughput_events_per_s": round(len(stream) / elapsed, 1),
        "latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "latency_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
        "final_lag": lag.total_lag if lag else None,
    }


def render(collector: harness.ListCollector, sent: int, elapsed: float, lag, watched: list[str],
           history: list[dict], streamed: list[dict]):
    lat = collector.latencies[-2000:]
    p50 = f"{np.percentile(lat, 50) * 1000:.0f} ms" if lat else "-"
    p99 = f"{np.percentile(lat, 99) * 1000:.0f} ms" if lat else "-"
    head = (f"events sent [bold]{sent:,}[/] ({sent / max(elapsed, 1e-9):,.0f}/s)   lists received "
            f"[bold]{collector.messages:,}[/]   lag [bold]{lag.total_lag if lag else '-'}[/] "
            f"({lag.status if lag else '-'})   latency p50 {p50}, p99 {p99}")
    table = Table(expand=True, show_lines=True)
    table.add_column("user", no_wrap=True)
    table.add_column("recent history (newest last)")
    table.add_column("latest list (top 5)")
    for user in watched:
        hist = [f"{e['type']}:{e['item_id']}" for e in history[-20000:] + streamed if e["user_id"] == user][-5:]
        rec = collector.latest.get(user)
        items = ", ".join(i["item_id"] for i in rec["items"][:5]) if rec else "-"
        table.add_row(user, " ".join(hist), items)
    return Panel(Group(head, table), title="streamrec demo: live")


async def count_topic(bootstrap: str, topic: str) -> int:
    from aiokafka import TopicPartition

    from stream.compat import log_end_offsets

    try:
        return sum((await log_end_offsets(bootstrap, [TopicPartition(topic, 0)])).values())
    except Exception:
        return 0


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title="streamrec demo: summary", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)
