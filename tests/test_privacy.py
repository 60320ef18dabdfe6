"""Erasing a user (right to erasure) and retention, through a worker process and a real broker
(both kinds): tombstones in the state changelog and on the recommendations topic, and nothing
of an erased user comes back after a restart on an empty disk."""

from __future__ import annotations

import asyncio

import pytest

from stream.events import EVENTS_TOPIC, delete_user_event, encode_event
from stream.state import UserState, event_digest
from streamrec import harness

pytestmark = pytest.mark.integration

PARTITIONS = 2
TIMEOUT_S = 90


def event(user, n, ts):
    return {"event_id": f"{user}-{n}", "user_id": user, "item_id": f"sku-{(n * 7) % 120:05d}", "type": "view",
            "ts": float(ts)}


async def last_values(bootstrap: str, topic: str) -> dict[str, bytes | None]:
    """The newest value per key of a topic (None: a tombstone)."""
    return {r.key.decode(): r.value for r in await harness.read_topic(bootstrap, topic, read_committed=True)}


async def send(bootstrap, events):
    await harness.produce(bootstrap, EVENTS_TOPIC, harness.event_records(events))


async def test_delete_user_erases_state_and_list_for_good(broker, tiny_model, tmp_path):
    changelog = "privacy-user-state-changelog"
    collector = harness.ListCollector(broker.bootstrap)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group="privacy",
                                partitions=PARTITIONS, log_path=logs[0])
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, logs[0])
        await collector.start()
        await send(broker.bootstrap, [event(u, n, 1000 + n) for u in ("erased", "kept") for n in range(5)])
        assert await collector.wait_for(lambda c: {"erased", "kept"} <= set(c.latest), TIMEOUT_S)
        await harness.produce(broker.bootstrap, EVENTS_TOPIC,
                              [(b"erased", encode_event(delete_user_event("erased", "del-1", 2000.0)))])
        assert await collector.wait_for(lambda c: "erased" in c.tombstones, TIMEOUT_S)
        assert "erased" not in collector.latest and "kept" in collector.latest
        state = await last_values(broker.bootstrap, changelog)
        assert state["erased"] is None and state["kept"] is not None     # a tombstone in the changelog
        harness.stop_worker(proc)
        # a restart on an empty disk recovers from the changelog: the erased history stays gone
        proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "empty", group="privacy",
                                    partitions=PARTITIONS, log_path=logs[1])
        await harness.wait_for_worker_ready(broker.bootstrap, logs[1])
        await send(broker.bootstrap, [event("erased", 9, 3000)])
        assert await collector.wait_for(lambda c: c.latest.get("erased", {}).get("event_id") == "erased-9",
                                        TIMEOUT_S)
        state = UserState.decode((await last_values(broker.bootstrap, changelog))["erased"])
        assert state.seen == [event_digest("erased-9")] and state.items == ["sku-00063"]
    finally:
        harness.stop_worker(proc)
        await collector.stop()


async def test_users_inactive_past_the_ttl_are_erased_in_the_background(broker, tiny_model, tmp_path):
    changelog = "retention-user-state-changelog"
    collector = harness.ListCollector(broker.bootstrap)
    log_path = tmp_path / "worker.log"
    proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group="retention",
                                partitions=PARTITIONS, log_path=log_path, extra=["--state-ttl", "600"])
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, log_path)
        await collector.start()
        await send(broker.bootstrap, [event("idle", n, 10_000 + n) for n in range(3)])
        assert await collector.wait_for(lambda c: "idle" in c.latest, TIMEOUT_S)
        # an hour of stream time later, in several batches: the sweep reaches the idle user
        for n in range(20):
            await send(broker.bootstrap, [event(f"busy-{n % 4}", n, 13_600 + n)])
            await asyncio.sleep(0.1)
        assert await collector.wait_for(lambda c: "idle" in c.tombstones, TIMEOUT_S), log_path.read_text()[-2000:]
        state = await last_values(broker.bootstrap, changelog)
        assert state["idle"] is None and all(state[f"busy-{n}"] is not None for n in range(4))
    finally:
        harness.stop_worker(proc)
        await collector.stop()
