"""End to end through a real broker (both kinds): a worker process, plain aiokafka clients.

Every user gets a list; the final list reflects the user's last event; purchased items are
never recommended; each kind of malformed message lands in the DLQ with its reason while the
good events around it are still processed; a kill -9 loses no list.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream import compat
from stream.events import (DLQ_TOPIC, EVENTS_TOPIC, InvalidMessage, decode_dead_letter, decode_event,
                           encode_event)
from stream.state import UserState, event_digest
from streamrec import harness

pytestmark = pytest.mark.integration

PARTITIONS = 2
LIST_TIMEOUT_S = 90


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


GOOD = {"v": 1, "event_id": "x", "user_id": "u", "item_id": "i", "type": "view", "ts": 1.0}
MALFORMED = [  # (key, value, reason prefix)
    (b"bad-1", b"\xc1\xc1 not msgpack", "not msgpack"),
    (b"bad-2", pack([1, 2]), "not a map"),
    (b"bad-3", pack({k: v for k, v in GOOD.items() if k != "user_id"}), "missing user_id"),
    (b"bad-4", pack({**GOOD, "user_id": ""}), "empty user_id"),
    (b"bad-5", pack({k: v for k, v in GOOD.items() if k != "item_id"}), "missing item_id"),
    (b"bad-6", pack({**GOOD, "item_id": ""}), "empty item_id"),
    (b"bad-7", pack({**GOOD, "ts": "noon"}), "ts must be a number"),
    (b"bad-8", pack({**GOOD, "user_id": 7}), "user_id must be a string"),
    (b"bad-9", pack({**GOOD, "v": 99}), "unsupported v"),
    (b"bad-10", pack({**GOOD, "type": "wishlist"}), "unknown type"),
    (b"bad-11", b"", "empty value"),
]


@pytest.fixture(scope="module")
def worker(broker, tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("worker")
    log_path = workdir / "worker.log"
    proc = harness.start_worker(broker.bootstrap, tiny_model, workdir / "state", partitions=PARTITIONS,
                                log_path=log_path)
    asyncio.run(harness.wait_for_worker_ready(broker.bootstrap, log_path))
    yield proc, workdir, log_path
    harness.stop_worker(proc)


def last_event_ids(events) -> dict[str, str]:
    return {e["user_id"]: e["event_id"] for e in events}


def stale_users(collector, last: dict[str, str]) -> list[str]:
    """Users whose latest list is not for their last event."""
    return [u for u, i in last.items() if collector.latest.get(u, {}).get("event_id") != i]


def describe_stale(collector, last: dict[str, str], events) -> str:
    """Why a wait for current lists failed: the stale users, their listed vs last event."""
    position = {e["event_id"]: n for n, e in enumerate(events)}
    stale = stale_users(collector, last)
    shown = ", ".join(f"{u}: listed #{position.get(collector.latest.get(u, {}).get('event_id'))} "
                      f"of last #{position[last[u]]}"
                      f"{' (listed earlier)' if last[u] in collector.listed else ''}" for u in stale[:5])
    return f"{len(stale)}/{len(last)} users stale after {collector.messages} lists ({shown})"


async def describe_offsets(bootstrap: str, collector, last: dict[str, str]) -> str:
    """Where the stale users' last events sit against the group's committed offsets."""
    tps = [TopicPartition(EVENTS_TOPIC, p) for p in range(PARTITIONS)]
    committed = await compat.committed_offsets(bootstrap, "streamrec", tps)
    wanted = {last[u]: u for u in stale_users(collector, last)}
    records = await read_topic(bootstrap, EVENTS_TOPIC, 10**9, timeout=5)
    at = []
    for r in records:
        try:
            event_id = decode_event(r.value).event_id
        except InvalidMessage:  # the malformed messages of the DLQ test
            continue
        if event_id in wanted:
            at.append(f"{wanted[event_id]}'s last event at {r.partition}/{r.offset}")
    return f"committed {({tp.partition: o for tp, o in committed.items()})}; " + ", ".join(at[:5])


def interleave(events, bad, every=97):
    """Good events with a malformed message after every ``every``-th one."""
    out, bad = [], list(bad)
    for n, e in enumerate(events, 1):
        out.append((e["user_id"].encode(), encode_event(e)))
        if n % every == 0 and bad:
            key, value, _ = bad.pop(0)
            out.append((key, value))
    out.extend((key, value) for key, value, _ in bad)
    return out


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(records) < expected and loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_every_user_gets_a_current_list_and_bad_messages_go_to_dlq(broker, worker, tiny_shop, tiny_model):
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 3 == 0][:1500]
    # a user whose only items the model has never seen still gets a (trending) list
    events += [{"event_id": f"cold-{n}", "user_id": "cold-user", "item_id": f"never-seen-{n}", "type": "view",
                "ts": events[-1]["ts"] + n} for n in range(3)]
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    try:
        await harness.produce(broker.bootstrap, EVENTS_TOPIC, interleave(events, MALFORMED))
        last = last_event_ids(events)
        assert await collector.wait_for(lambda c: not stale_users(c, last), LIST_TIMEOUT_S), \
            describe_stale(collector, last, events)
    finally:
        await collector.stop()

    version = json.loads((tiny_model / "metadata.json").read_text())["version"]
    purchased: dict[str, set] = {}
    for e in events:
        if e["type"] == "purchase":
            purchased.setdefault(e["user_id"], set()).add(e["item_id"])
    by_id = {e["event_id"]: e for e in events}
    for user, msg in collector.latest.items():
        ids = [i["item_id"] for i in msg["items"]]
        assert ids, f"{user} got an empty list"
        assert len(ids) == len(set(ids)) <= 20
        assert not set(ids) & purchased.get(user, set()), f"{user} was recommended an item it bought"
        assert msg["model_version"] == version
        assert msg["event_ts"] == by_id[msg["event_id"]]["ts"]
        assert msg["produced_ts"] >= msg["event_ts"]
    assert all(not i["item_id"].startswith("never-seen") for i in collector.latest["cold-user"]["items"])

    dead = await read_topic(broker.bootstrap, DLQ_TOPIC, len(MALFORMED))
    records = [decode_dead_letter(r.value) for r in dead]
    assert len(records) == len(MALFORMED)
    by_key = {r["key"]: r for r in records}
    sent = await read_topic(broker.bootstrap, EVENTS_TOPIC, len(events) + len(MALFORMED))
    at = {(r.partition, r.offset): r for r in sent}
    for key, value, reason in MALFORMED:
        record = by_key[key]
        assert record["reason"].startswith(reason), (key, record["reason"])
        assert record["value"] == value and record["topic"] == EVENTS_TOPIC
        assert at[(record["partition"], record["offset"])].value == value  # points at the original


async def test_kill_9_loses_no_list_and_no_state(broker, worker, tiny_shop, tiny_model, tmp_path):
    """At-least-once: after a hard kill mid-stream, a worker restarted on an empty disk rebuilds
    its state from the changelog to the true end (stream/compat.py: Tansu's ListOffsets gap),
    lists every event, and still never recommends what a user bought before the kill."""
    proc, _, _ = worker
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 3 == 1][:3000]
    first, second = events[:2000], events[2000:]
    last = last_event_ids(events)
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    try:
        await harness.produce(broker.bootstrap, EVENTS_TOPIC, harness.event_records(first))
        late = {e["event_id"] for e in first[500:]}
        await collector.wait_for(lambda c: any(m["event_id"] in late for m in c.latest.values()), 60)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log_path = tmp_path / "restarted.log"
        restarted = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "fresh-state",
                                         partitions=PARTITIONS, log_path=log_path)
        try:
            await harness.wait_for_worker_ready(broker.bootstrap, log_path)
            await harness.produce(broker.bootstrap, EVENTS_TOPIC, harness.event_records(second))
            if not await collector.wait_for(lambda c: not stale_users(c, last), LIST_TIMEOUT_S):
                pytest.fail("\n".join([describe_stale(collector, last, events),
                                        await describe_offsets(broker.bootstrap, collector, last),
                                        log_path.read_text()[-3000:]]))
        finally:
            harness.stop_worker(restarted)
    finally:
        await collector.stop()

    bought: dict[str, set] = {}
    for e in events:
        if e["type"] == "purchase":
            bought.setdefault(e["user_id"], set()).add(e["item_id"])
    for user in last:
        listed = {i["item_id"] for i in collector.latest[user]["items"]}
        assert not listed & bought.get(user, set()), f"{user}: a purchase from before the kill was forgotten"
    changelog = await read_topic(broker.bootstrap, "streamrec-user-state-changelog", 10**9, timeout=5)
    states = {r.key.decode(): UserState.decode(r.value) for r in changelog if r.value is not None}
    for user in last:
        ids = [event_digest(e["event_id"]) for e in events if e["user_id"] == user]
        kept = states[user].seen
        assert kept == ids[-len(kept):], f"{user}: state lost or repeated events across the kill"
