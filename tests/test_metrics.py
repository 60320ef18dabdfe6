"""Metric names and labels as Prometheus scrapes them, and the lag gauges fed from a real broker."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry, Histogram

from stream.compat import ensure_topics
from stream.metrics import EVENT_LATENCY_BUCKETS, WorkerMetrics, observe_many


def sample(m: WorkerMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_exposition_has_names_and_labels():
    m = WorkerMetrics("streamrec")
    m.observe_batch(32)
    m.observe_batch(8)
    with m.stage("encode"):
        pass
    m.observe_stage("search", 0.004)
    m.observe_batch_wait(0.003)
    m.add_recommend_busy(0.25)
    m.add_recommend_busy(0.5)
    m.observe_event_latency(np.array([0.02, 0.3, 1.5]))
    m.count_dlq("missing ts")
    m.count_dlq("not msgpack", 2)
    m.count_published(40)
    text = m.exposition().decode()
    for line in ("streamrec_events_processed_total 40.0",
                 'streamrec_dlq_messages_total{reason="missing ts"} 1.0',
                 'streamrec_dlq_messages_total{reason="not msgpack"} 2.0',
                 'streamrec_recommendations_published_total{variant="default"} 40.0',
                 "streamrec_batch_size_count 2.0",
                 "streamrec_batch_size_sum 40.0",
                 "streamrec_batch_wait_seconds_count 1.0",
                 'streamrec_batch_wait_seconds_bucket{le="0.005"} 1.0',
                 "streamrec_recommend_busy_seconds_total 0.75",
                 'streamrec_event_to_list_latency_seconds_count{variant="default"} 3.0'):
        assert line in text, line
    for stage in ("state", "encode", "search", "rerank", "publish"):  # every stage, even unused
        assert f'streamrec_stage_latency_seconds_count{{stage="{stage}"}}' in text
    assert sample(m, "streamrec_stage_latency_seconds_count", stage="encode") == 1.0
    assert 'streamrec_stage_latency_seconds_bucket{le="0.005",stage="search"} 1.0' in text
    assert "# TYPE kafka_consumergroup_lag gauge" in text
    assert "# TYPE kafka_consumergroup_lag_seconds gauge" in text
    if sys.platform.startswith("linux"):   # read from /proc at the scrape
        assert "# TYPE streamrec_cpu_wait_seconds_total counter" in text
        assert sample(m, "streamrec_cpu_wait_seconds_total", thread="recommend") >= 0
        assert sample(m, "streamrec_cpu_wait_seconds_total", thread="event_loop") >= 0


def test_the_wait_for_a_core_is_the_run_queue_delay_of_the_stages_threads_and_the_event_loops(tmp_path):
    """The kernel's run-queue delay (schedstat's second field, ns) of the threads named as the
    recommend stage's, summed, and of the main thread (the event loop); other threads and
    unreadable ones left out; nothing for a process that is not there."""
    from stream.threads import cpu_wait_seconds

    for tid, name, schedstat in ((42, "python", "9 9000000000 1"), (11, "recommend_0", "7000 2500000000 9"),
                                 (12, "lane_0", "5 500000000 2"), (13, "python", "1 4000000000 1"),
                                 (14, "lane_1", None)):
        task = tmp_path / "42" / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(name + "\n")
        if schedstat is not None:
            (task / "schedstat").write_text(schedstat + "\n")
    assert cpu_wait_seconds(42, proc=tmp_path) == pytest.approx({"recommend": 3.0, "event_loop": 9.0})
    assert cpu_wait_seconds(43, proc=tmp_path) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="run-queue delay from /proc: Linux")
def test_a_stage_thread_that_shares_its_core_counts_the_time_it_waited():
    """Two processes pinned to one core, each a thread named as the stage's that burns 0.4 s of
    CPU: each waits while the other runs, and its count says so (the real kernel's, not a file
    of the test's)."""
    import subprocess

    code = ("import os, sys, threading, time; from stream.threads import name_os_thread, cpu_wait_seconds\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"   # its threads inherit it
            "def burn():\n"
            "    name_os_thread('recommend_0'); ends = time.thread_time() + 0.4\n"
            "    while time.thread_time() < ends: pass\n"
            "    print(cpu_wait_seconds()['recommend'])   # while the thread is there to be read\n"
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
            "stage = threading.Thread(target=burn); stage.start(); stage.join()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:   # both start burning together
        p.stdin.write("go\n")
        p.stdin.flush()
    waited = [float(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert all(w >= 0.1 for w in waited), waited


def test_two_workers_do_not_clash():
    a, b = WorkerMetrics("a"), WorkerMetrics("b")
    a.count_published(3)
    assert sample(a, "streamrec_recommendations_published_total", variant="default") == 3.0
    assert sample(b, "streamrec_recommendations_published_total", variant="default") is None


def test_vectorised_histogram_matches_observe():
    values = np.array([0.0, 0.005, 0.0051, 0.1, 7.0, 299.0, 1e6, np.nan, -1.0])
    fast = Histogram("h", "h", buckets=EVENT_LATENCY_BUCKETS, registry=CollectorRegistry())
    slow = Histogram("h", "h", buckets=EVENT_LATENCY_BUCKETS, registry=CollectorRegistry())
    observe_many(fast, values)
    for v in values[np.isfinite(values)]:
        slow.observe(float(v))
    as_dict = lambda h: {(s.name, tuple(sorted(s.labels.items()))): s.value  # noqa: E731
                         for metric in h.collect() for s in metric.samples if not s.name.endswith("_created")}
    assert as_dict(fast) == as_dict(slow)


@pytest.mark.integration
async def test_server_and_lag_collector(broker):
    await ensure_topics(broker.bootstrap, {"metrics-events": 2})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait("metrics-events", b"x", partition=i % 2,
                                         timestamp_ms=int((time.time() - 120) * 1000))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="mgroup", enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition("metrics-events", p) for p in range(2)]
        consumer.assign(tps)
        await consumer.commit({tps[0]: 2, tps[1]: 6})
    finally:
        await consumer.stop()

    m = WorkerMetrics("mgroup")
    port = await m.start(0, broker.bootstrap, lag_interval_s=0.2)
    try:
        for _ in range(50):
            if m._collector.last is not None:
                break
            await asyncio.sleep(0.1)
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
    finally:
        await m.stop()
    text = body.decode()
    assert "kafka_consumergroup_lag{" in text and 'topic="metrics-events"' in text
    key = dict(group="mgroup", topic="metrics-events")
    assert sample(m, "kafka_consumergroup_lag", partition="0", **key) == 4.0
    assert sample(m, "kafka_consumergroup_lag", partition="1", **key) == 0.0
    lag_s = sample(m, "kafka_consumergroup_lag_seconds", group="mgroup", topic="metrics-events", partition="0")
    assert 100 < lag_s < 200
    assert "streamrec_consumergroup_status" in text


def test_dashboard_and_scrape_config_match_the_exported_names():
    import json
    import re
    from pathlib import Path

    docker = Path(__file__).resolve().parents[1] / "docker"
    dashboard = json.loads((docker / "grafana" / "dashboards" / "streamrec.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(?:kafka|streamrec)_[a-z_]+", e)}
    m = WorkerMetrics()
    m.set_lag(type("S", (), {"group": "g", "status": "OK", "partitions": []})())
    m.count_dlq("bad")  # a labelled family shows its samples once a child exists
    m.observe_cache(1, 1, 1, 1)
    m.count_published(1)
    m.observe_event_latency([0.1])
    exported = {s.name for metric in m.registry.collect() for s in metric.samples} | {
        metric.name for metric in m.registry.collect()}
    assert used and used <= exported, used - exported
    assert {"kafka_consumergroup_lag", "kafka_consumergroup_lag_seconds", "streamrec_dlq_messages_total",
            "streamrec_event_to_list_latency_seconds_bucket", "streamrec_stage_latency_seconds_bucket"} <= used
    assert "job_name: streamrec" in (docker / "prometheus.yml").read_text()
