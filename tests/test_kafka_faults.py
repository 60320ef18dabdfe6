"""Apache Kafka failing under a running worker: one node stopped and restarted (persistent log
dirs), and one of three nodes (replication 3, min.insync.replicas 2, acks=all) killed with
SIGKILL and brought back. The worker keeps going or recovers by itself, no list is lost, and
the group's lag returns to 0."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from stream.events import EVENTS_TOPIC
from stream.lag import lag_snapshot
from streamrec import harness

pytestmark = pytest.mark.integration

PARTITIONS = 2
TIMEOUT_S = 180


def stale(collector, last: dict[str, str]) -> list[str]:
    return [u for u, i in last.items() if collector.latest.get(u, {}).get("event_id") != i]


async def wait_for_zero_lag(bootstrap: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        snap = await lag_snapshot(bootstrap, "streamrec", [EVENTS_TOPIC])
        if snap.total_lag == 0 or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.5)


async def leader_of(bootstrap: str, topic: str, partition: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return next(p["leader"] for p in described["partitions"] if p["partition"] == partition)


async def run_through_fault(kafka, tiny_shop, tiny_model, tmp_path, fault, *, acks, rate=None) -> None:
    """Stream events through a worker while ``fault(kafka)`` runs, then check every list and the lag."""
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 3 == 0][:2400]
    first, second = events[:1200], events[1200:]
    last = {e["user_id"]: e["event_id"] for e in events}
    log_path = tmp_path / "worker.log"
    proc = harness.start_worker(kafka.bootstrap, tiny_model, tmp_path / "state", partitions=PARTITIONS,
                                log_path=log_path)
    collector = harness.ListCollector(kafka.bootstrap)
    try:
        await harness.wait_for_worker_ready(kafka.bootstrap, log_path)
        await collector.start()
        await harness.produce(kafka.bootstrap, EVENTS_TOPIC, harness.event_records(first), acks=acks)
        ids = {e["event_id"] for e in first}
        await collector.wait_for(lambda c: any(m["event_id"] in ids for m in c.latest.values()), 60)
        producing = asyncio.create_task(harness.produce(kafka.bootstrap, EVENTS_TOPIC,
                                                        harness.event_records(second), acks=acks, rate=rate))
        await fault(kafka, producing)
        await producing
        ok = await collector.wait_for(lambda c: not stale(c, last), TIMEOUT_S)
        assert ok, f"{len(stale(collector, last))}/{len(last)} users stale\n{log_path.read_text()[-4000:]}"
        assert proc.poll() is None, f"the worker exited ({proc.returncode})\n{log_path.read_text()[-4000:]}"
        snap = await wait_for_zero_lag(kafka.bootstrap)
        assert snap.total_lag == 0, snap
    finally:
        harness.stop_worker(proc)
        await collector.stop()


async def test_worker_rides_out_a_single_node_restart(kafka_cluster, tiny_shop, tiny_model, tmp_path):
    kafka = kafka_cluster(1)

    async def restart(kafka, producing):
        await producing                 # the producer needs the broker; the worker is mid-backlog
        await asyncio.to_thread(kafka.stop_node, 0)
        await asyncio.sleep(3)
        await asyncio.to_thread(kafka.start_node, 0)

    await run_through_fault(kafka, tiny_shop, tiny_model, tmp_path, restart, acks=1)


async def test_worker_rides_out_a_killed_node_of_three(kafka_cluster, tiny_shop, tiny_model, tmp_path):
    kafka = kafka_cluster(3)

    async def kill_a_leader(kafka, producing):
        await asyncio.sleep(1.0)        # traffic flowing, acks=all, min.insync.replicas=2
        node = await leader_of(kafka.bootstrap, EVENTS_TOPIC, 0)
        await asyncio.to_thread(kafka.kill_node, node)
        await asyncio.sleep(5)
        await asyncio.to_thread(kafka.start_node, node)

    await run_through_fault(kafka, tiny_shop, tiny_model, tmp_path, kill_a_leader, acks="all", rate=300)
