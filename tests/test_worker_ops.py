"""Operating a running worker through a real broker (both kinds): catalogue changes, hot-swap,
consumer lag at a known backlog, and idempotent replays."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer

from model.train import TrainConfig, train
from stream.broker import free_port
from stream.events import DLQ_TOPIC, EVENTS_TOPIC, ITEMS_TOPIC, decode_dead_letter, encode_item
from stream.lag import lag_snapshot
from stream.replay import replay
from stream.state import UserState, event_digest
from streamrec import harness
from stream.recommender import write_model_dir
from streamrec.synthetic import ShopSpec, catalogue

pytestmark = pytest.mark.integration

PARTITIONS = 2
TIMEOUT_S = 90
SWAP_WAIT_S = 60   # how long events keep coming for a hot-swap


@pytest.fixture(scope="module")
def models_root(broker, tmp_path_factory, tiny_model):
    """A folder of model versions: the worker serves the newest and hot-swaps to newer ones
    (one per broker: the hot-swap test adds versions)."""
    root = tmp_path_factory.mktemp("models-root")
    shutil.copytree(tiny_model, root / "v1")
    return root


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def worker(broker, models_root, metrics_port, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ops-worker")
    log_path = workdir / "worker.log"
    proc = harness.start_worker(broker.bootstrap, models_root, workdir / "state", partitions=PARTITIONS,
                                log_path=log_path, extra=["--reload-interval", "1",
                                                          "--metrics-port", str(metrics_port)])
    asyncio.run(harness.wait_for_worker_ready(broker.bootstrap, log_path))
    yield proc
    harness.stop_worker(proc)


def event(user, item, n, kind="view", ts=1_800_000_000.0):
    return {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": kind, "ts": ts + n}


async def send_events(bootstrap, events):
    await harness.produce(bootstrap, EVENTS_TOPIC, harness.event_records(events))


async def latest_list(collector, user, event_id):
    assert await collector.wait_for(lambda c: c.latest.get(user, {}).get("event_id") == event_id, TIMEOUT_S)
    return collector.latest[user]


async def test_catalogue_stock_removal_boost_and_new_items(broker, worker, tiny_shop):
    spec_attrs = catalogue(ShopSpec(users=300, items=120, categories=6, seed=7))
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    try:
        # the shop publishes its catalogue (attributes of every known item)
        await harness.produce(broker.bootstrap, ITEMS_TOPIC,
                              ((i.encode(), encode_item(i, True, attrs)) for i, attrs in spec_attrs.items()))
        user = "catalogue-user"
        history = [e["item_id"] for e in tiny_shop[0] if e["type"] == "view"][:6]
        await send_events(broker.bootstrap, [event(user, item, n) for n, item in enumerate(history)])
        before = [i["item_id"] for i in (await latest_list(collector, user, f"{user}-5"))["items"]]
        out_of_stock, removed, boosted = before[0], before[1], before[-1]
        # a brand-new item carrying exactly the attributes of the user's newest history item
        new_attrs = spec_attrs[history[-1]]
        await harness.produce(broker.bootstrap, ITEMS_TOPIC, [
            (out_of_stock.encode(), encode_item(out_of_stock, False, spec_attrs[out_of_stock])),
            (removed.encode(), None),
            (boosted.encode(), encode_item(boosted, True, spec_attrs[boosted], boost=5.0)),
            (b"brand-new-item", encode_item("brand-new-item", True, new_attrs)),
            (b"bad-item", msgpack.packb({"v": 1, "item_id": "bad-item", "in_stock": "maybe"})),
        ])
        await asyncio.sleep(1.0)  # the catalogue is applied between batches
        await send_events(broker.bootstrap, [event(user, history[-1], 6, kind="click")])
        after = [i["item_id"] for i in (await latest_list(collector, user, f"{user}-6"))["items"]]
        assert out_of_stock not in after and removed not in after
        assert boosted in after[:3], (boosted, after)
        assert "brand-new-item" in after, after
    finally:
        await collector.stop()
    dead = [decode_dead_letter(r.value) for r in await read_all(broker.bootstrap, DLQ_TOPIC)]
    assert [(d["key"], d["topic"]) for d in dead if d["key"] == b"bad-item"] == [(b"bad-item", ITEMS_TOPIC)]
    assert next(d for d in dead if d["key"] == b"bad-item")["reason"].startswith("in_stock must be a boolean")


async def test_hot_swap_names_the_new_version_and_loses_no_list(broker, worker, models_root, tiny_shop):
    v1 = json.loads((models_root / "v1" / "metadata.json").read_text())["version"]
    users = [f"swap-user-{u}" for u in range(30)]
    items = [e["item_id"] for e in tiny_shop[0]][:200]
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    try:
        first = [event(u, items[(n * 7 + k) % len(items)], n) for k, u in enumerate(users) for n in range(3)]
        await send_events(broker.bootstrap, first)
        for u in users:
            assert (await latest_list(collector, u, f"{u}-2"))["model_version"] == v1
        new = write_model_dir(models_root / "v2", lambda tmp: train(
            tiny_shop[1], TrainConfig(epochs=1, seed=1), out_dir=tmp, progress=False))
        assert new.version != v1
        # keep events flowing while the worker notices and loads v2: it swaps between batches, so
        # events must still come once it has loaded (13 s on a slow CI run, ~4 s usually)
        deadline, n = time.monotonic() + SWAP_WAIT_S, 3
        while True:
            await send_events(broker.bootstrap, [event(u, items[(n * 7 + k) % len(items)], n)
                                                 for k, u in enumerate(users)])
            if all(collector.latest.get(u, {}).get("model_version") == new.version for u in users):
                break
            if time.monotonic() > deadline:
                break
            n += 1
            await asyncio.sleep(0.3)
        last = n
        for u in users:
            msg = await latest_list(collector, u, f"{u}-{last}")
            assert msg["model_version"] == new.version
    finally:
        await collector.stop()


async def read_all(bootstrap, topic):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                return out
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()


async def wait_lag(bootstrap, group, predicate, timeout=TIMEOUT_S):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        snap = await lag_snapshot(bootstrap, group, topics=[EVENTS_TOPIC])
        if predicate(snap) or loop.time() > deadline:
            return snap
        await asyncio.sleep(0.5)


async def test_lag_of_a_stopped_worker_is_the_backlog_and_drains(broker, worker, tiny_model, tiny_shop, tmp_path):
    group = "lag-test"
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 5 == 2]
    first, backlog = events[:400], events[400:1000]
    log_path = tmp_path / "w1.log"
    proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group=group,
                                partitions=PARTITIONS, log_path=log_path)
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, log_path)
        await send_events(broker.bootstrap, first)
        assert (await wait_lag(broker.bootstrap, group, lambda s: s.total_lag == 0)).total_lag == 0
    finally:
        harness.stop_worker(proc)  # graceful: commits what it processed
    committed_before = {(p.topic, p.partition): p.committed
                        for p in (await lag_snapshot(broker.bootstrap, group, [EVENTS_TOPIC])).partitions}
    await send_events(broker.bootstrap, backlog)
    snap = await lag_snapshot(broker.bootstrap, group, topics=[EVENTS_TOPIC])
    assert snap.total_lag == len(backlog)
    for p in snap.partitions:
        assert p.committed == committed_before[(p.topic, p.partition)]
        assert p.lag == p.end - p.committed >= 0
    assert json.loads(snap.to_json())["total_lag"] == len(backlog)

    log_path = tmp_path / "w2.log"
    proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group=group,
                                partitions=PARTITIONS, log_path=log_path)
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, log_path)
        assert (await wait_lag(broker.bootstrap, group, lambda s: s.total_lag == 0)).total_lag == 0
    finally:
        harness.stop_worker(proc)


async def test_repeated_replay_changes_no_state_twice(broker, worker, tiny_shop, tmp_path):
    changelog = "streamrec-user-state-changelog"
    events = [{**e, "user_id": f"replay-{e['user_id']}"} for e in tiny_shop[0][:800]]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"v": 1, **e}) + "\n" for e in events))
    users = {e["user_id"] for e in events}

    await replay(path, broker.bootstrap, max_speed=True, progress=False)
    await wait_lag(broker.bootstrap, "streamrec", lambda s: s.total_lag == 0)
    writes_after_first = len(await read_all(broker.bootstrap, changelog))

    await replay(path, broker.bootstrap, max_speed=True, progress=False)
    assert (await wait_lag(broker.bootstrap, "streamrec", lambda s: s.total_lag == 0)).total_lag == 0
    records = await read_all(broker.bootstrap, changelog)
    assert len(records) == writes_after_first, "the second replay changed user state"

    latest = {r.key.decode(): UserState.decode(r.value) for r in records if r.key.decode() in users}
    per_user = {}
    for e in events:
        per_user.setdefault(e["user_id"], []).append(event_digest(e["event_id"]))
    for user, state in latest.items():
        assert len(state.seen) == len(set(state.seen))
        assert state.seen == per_user[user][-len(state.seen):]


async def test_worker_serves_prometheus_metrics(broker, worker, metrics_port, tiny_shop):
    import urllib.request

    user = "metrics-user"
    await send_events(broker.bootstrap, [event(user, e["item_id"], n) for n, e in enumerate(tiny_shop[0][:5])])
    await harness.produce(broker.bootstrap, EVENTS_TOPIC, [(b"metrics-user", b"not msgpack")])
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    try:
        await latest_list(collector, user, f"{user}-4")
    finally:
        await collector.stop()

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:  # lag gauges appear after the collector's first refresh
        text = await asyncio.to_thread(scrape)
        if 'kafka_consumergroup_lag{group="streamrec",partition="0",topic="shop-events"}' in text \
                or loop.time() > deadline:
            break
        await asyncio.sleep(1)
    assert 'kafka_consumergroup_lag{group="streamrec",partition="0",topic="shop-events"}' in text
    assert "kafka_consumergroup_lag_seconds{" in text
    for stage in ("state", "encode", "search", "rerank", "publish"):
        assert f'streamrec_stage_latency_seconds_count{{stage="{stage}"}}' in text
    processed = [line for line in text.splitlines() if line.startswith("streamrec_events_processed_total ")]
    assert processed and float(processed[0].split()[-1]) >= 6
    assert 'streamrec_dlq_messages_total{reason="not msgpack"}' in text
    assert "streamrec_event_to_list_latency_seconds_bucket" in text
    assert "streamrec_batch_size_bucket" in text
    waits = [line for line in text.splitlines() if line.startswith("streamrec_batch_wait_seconds_count ")]
    assert waits and float(waits[0].split()[-1]) >= 1   # every batch observed how long it waited
    busy = [line for line in text.splitlines() if line.startswith("streamrec_recommend_busy_seconds_total ")]
    assert busy and float(busy[0].split()[-1]) > 0   # the recommend thread's time on those batches
    for thread in ("recommend", "event_loop"):   # their waits for a core, read from /proc
        waited = [line for line in text.splitlines()
                  if line.startswith(f'streamrec_cpu_wait_seconds_total{{thread="{thread}"}} ')]
        assert waited and float(waited[0].split()[-1]) >= 0


def test_the_worker_freezes_its_startup_heap_and_collects_young_objects_rarely():
    """In a process of its own: the freeze and the threshold are process-wide."""
    import subprocess
    import sys

    code = ("import gc; from stream.worker import GC_YOUNG_THRESHOLD, freeze_startup_heap; "
            "before = gc.get_threshold(); freeze_startup_heap(); "
            "print(gc.get_freeze_count() > 0, gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]), "
            "GC_YOUNG_THRESHOLD > before[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
