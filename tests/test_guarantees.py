"""Exactly-once through a worker process: on Apache Kafka a read_committed reader sees every
user's final list current and no (user, event) list twice across repeated kill -9s; a broker
without transactions makes the worker refuse the option clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from stream.events import EVENTS_TOPIC
from stream.state import UserState, event_digest
from streamrec import harness

pytestmark = pytest.mark.integration

PARTITIONS = 2
KILLS = 3
LIST_TIMEOUT_S = 120


def test_exactly_once_is_refused_without_transactions(broker, tiny_model, tmp_path):
    if broker.kind != "tansu":
        pytest.skip("Apache Kafka runs transactions")
    result = subprocess.run([sys.executable, "-m", "streamrec.cli", "worker", "--broker", broker.bootstrap,
                             "--model", str(tiny_model), "--guarantee", "exactly_once",
                             "--data-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "exactly_once needs a broker with transactions" in result.stderr


def stale_users(collector, last: dict[str, str]) -> list[str]:
    """Users whose newest list is not for their last event."""
    return [u for u, i in last.items() if collector.latest.get(u, {}).get("event_id") != i]


async def assert_lists_current(collector, last: dict[str, str], log) -> None:
    assert await collector.wait_for(lambda c: not stale_users(c, last), LIST_TIMEOUT_S), \
        f"{len(stale_users(collector, last))} users stale; last log:\n{log.read_text()[-3000:]}"


async def read_committed_states(bootstrap: str, topic: str) -> dict[str, UserState]:
    return {r.key.decode(): UserState.decode(r.value)
            for r in await harness.read_topic(bootstrap, topic, read_committed=True)}


async def test_exactly_once_survives_repeated_kill_9(broker, tiny_shop, tiny_model, tmp_path):
    if broker.kind == "tansu":
        pytest.skip("the embedded broker has no transactions")
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 2 == 0][:4000]
    chunks = [events[n::KILLS + 1] for n in range(KILLS + 1)]   # every chunk spans all users
    chunks = [sorted(c, key=lambda e: e["ts"]) for c in chunks]
    events = [e for c in chunks for e in c]                     # the order they are sent in
    last = {e["user_id"]: e["event_id"] for e in events}
    collector = harness.ListCollector(broker.bootstrap, read_committed=True)
    await collector.start()
    logs = []

    def start(n: int, state_dir) -> subprocess.Popen:
        logs.append(tmp_path / f"worker-{n}.log")
        return harness.start_worker(broker.bootstrap, tiny_model, state_dir, partitions=PARTITIONS,
                                    log_path=logs[-1], extra=["--guarantee", "exactly_once"])

    proc = start(0, tmp_path / "state")
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, logs[-1])
        for n, chunk in enumerate(chunks):
            await harness.produce(broker.bootstrap, EVENTS_TOPIC, harness.event_records(chunk))
            if n == KILLS:
                break
            ids = {e["event_id"] for e in chunk}
            assert await collector.wait_for(lambda c: any(m["event_id"] in ids for m in c.latest.values()), 60)
            os.killpg(proc.pid, signal.SIGKILL)   # mid-chunk: its transaction is open
            proc.wait()
            # every other restart on an empty disk: state comes back from the changelog alone
            proc = start(n + 1, tmp_path / ("state" if n % 2 else f"empty-{n}"))
            await harness.wait_for_worker_ready(broker.bootstrap, logs[-1])
        await assert_lists_current(collector, last, logs[-1])
        assert collector.repeats(last) == 0, f"{collector.repeats(last)} (user, event) lists seen twice"
    finally:
        harness.stop_worker(proc)
        await collector.stop()

    states = await read_committed_states(broker.bootstrap, "streamrec-user-state-changelog")
    for user in last:
        ids = [event_digest(e["event_id"]) for e in events if e["user_id"] == user]
        kept = states[user].seen
        assert kept == ids[-len(kept):], f"{user}: state lost or repeated events across the kills"


async def test_sigterm_commits_what_was_processed_so_a_restart_repeats_nothing(broker, tiny_shop, tiny_model, tmp_path):
    events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 2 == 1]
    last = {e["user_id"]: e["event_id"] for e in events}
    small_batches = ["--max-batch", "64"]   # many batches under way when the signal comes
    collector = harness.ListCollector(broker.bootstrap)
    await collector.start()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group="graceful",
                                partitions=PARTITIONS, log_path=logs[0], extra=small_batches)
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, logs[0])
        await harness.produce(broker.bootstrap, EVENTS_TOPIC, harness.event_records(events))
        assert await collector.wait_for(lambda c: c.messages > 0, 60)
        assert harness.stop_worker(proc) == 0          # SIGTERM mid-backlog
        assert stale_users(collector, last), "the backlog was done before the signal: nothing tested"
        proc = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group="graceful",
                                    partitions=PARTITIONS, log_path=logs[1])
        await harness.wait_for_worker_ready(broker.bootstrap, logs[1])
        await assert_lists_current(collector, last, logs[1])
        assert collector.repeats(last) == 0, f"{collector.repeats(last)} lists repeated after a clean stop"
    finally:
        harness.stop_worker(proc)
        await collector.stop()
