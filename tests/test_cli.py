"""The command line as a user runs it: train -> eval reproduces the saved metrics; replay -> lag."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import msgpack
import pytest
from typer.testing import CliRunner

from streamrec.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def shop_log(tmp_path_factory, tiny_shop):
    path = tmp_path_factory.mktemp("logs") / "events.jsonl"
    path.write_text("".join(json.dumps({"v": 1, **e}) + "\n" for e in tiny_shop[0]))
    return path


def test_train_then_eval_reproduces_the_saved_metrics(shop_log, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", "--data", str(shop_log), "--out", str(out), "--epochs", "2",
                                 "--dim", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dim"] == 32
    assert {"model.safetensors", "config.json", "vocab.json", "metadata.json", "items.faiss",
            "metrics.json", "training_curve.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "metadata.json").read_text())["metrics"]["test"]
    result = runner.invoke(app, ["eval", "--model", str(out), "--data", str(shop_log), "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)
    for key in ("HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        assert measured[key] == pytest.approx(saved[key], abs=1e-6)


def test_train_rejects_a_malformed_log_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"v": 1, "user_id": "u"\n')
    result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "m"), "--no-progress"])
    assert result.exit_code == 2
    assert "bad.jsonl" in result.output


def test_train_rejects_a_width_the_heads_do_not_divide(shop_log, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(shop_log), "--out", str(tmp_path / "m"),
                                 "--dim", "50", "--no-progress"])
    assert result.exit_code == 2
    assert "multiple of n_heads" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, message", [
    (["--store", "disk"], "--store must be"),
    (["--rates", "max,fast"], "--rates takes"),
    (["--workload", "huge"], "--workload must be one of"),
    (["--worker-cpus", "0,x"], "--worker-cpus: a CPU list is numbers and ranges"),
    (["--worker-cpus", "0-100000"], "--worker-cpus: CPUs '0-100000': this machine has CPUs 0-"),
    (["--broker-warmup", "-1"], "--broker-warmup takes seconds, 0 or more"),
])
def test_bench_e2e_rejects_bad_options_before_starting_anything(args, message):
    result = runner.invoke(app, ["bench", "e2e", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_a_pinned_worker_runs_on_its_cpus_and_sizes_its_threads_by_them(tmp_path):
    """bench e2e --worker-cpus pins the worker from its start; the worker then counts the CPUs it
    may use (its affinity), not the machine's, for its lanes and torch threads."""
    import sys

    from streamrec.harness import parse_cpus, start_worker

    assert parse_cpus("0") == [0] and parse_cpus(" 0 , 0-0,") == [0]
    probe = ("import os; from stream.worker import CORES, WorkerSettings; s = WorkerSettings(broker='', model=None); "
             "print(sorted(os.sched_getaffinity(0)), CORES, s.lanes, s.torch_threads)")
    log = tmp_path / "worker.log"
    proc = start_worker("127.0.0.1:1", None, tmp_path, log_path=log, command=[sys.executable, "-c", probe],
                        cpus=[0])
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert log.read_text().split() == ["[0]", "1", "1", "1"]


@pytest.mark.integration
def test_replay_then_lag_json(broker, shop_log):
    result = runner.invoke(app, ["replay", str(shop_log), "--broker", broker.bootstrap, "--topic", "cli-events",
                                 "--partitions", "2", "--max", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["sent"] > 0
    result = runner.invoke(app, ["lag", "--broker", broker.bootstrap, "--group", "nobody", "--topic", "cli-events",
                                 "--json"])
    assert result.exit_code == 0, result.output
    lag = json.loads(result.output)
    assert lag["group"] == "nobody" and lag["total_lag"] == summary["sent"]  # no commit: from log start
    assert {p["partition"] for p in lag["partitions"]} == {0, 1}
    assert set(lag["partitions"][0]) == {"topic", "partition", "committed", "end", "lag", "lag_seconds", "status"}


def test_worker_explains_a_missing_model_and_an_unreachable_broker(tmp_path, tiny_model):
    result = runner.invoke(app, ["worker", "--broker", "127.0.0.1:1", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no model directory" in result.output
    result = runner.invoke(app, ["worker", "--broker", "127.0.0.1:1", "--model", str(tiny_model)])
    assert result.exit_code == 2 and "cannot reach a Kafka broker at 127.0.0.1:1" in result.output
    result = runner.invoke(app, ["worker", "--broker", "127.0.0.1:1", "--model", str(tiny_model), "--lanes", "0"])
    assert result.exit_code == 2 and "lanes must be at least 1, got 0" in result.output
    result = runner.invoke(app, ["worker", "--broker", "127.0.0.1:1", "--model", str(tiny_model), "--max-batch", "0"])
    assert result.exit_code == 2 and "max_batch must be at least 1, got 0" in result.output
    result = runner.invoke(app, ["worker", "--broker", "127.0.0.1:1", "--model", str(tiny_model),
                                 "--cache-mb", str(1 << 30)])   # 1 PiB: the cache is claimed at start
    assert result.exit_code == 2 and "encoder cache budget (1,073,741,824 MiB, --cache-mb)" in result.output


@pytest.mark.integration
def test_worker_refuses_a_state_changelog_partitioned_unlike_the_events(broker, tiny_model, tmp_path):
    import asyncio

    from stream.compat import ensure_topics

    counts = asyncio.run(ensure_topics(broker.bootstrap, {"shop-events": 2, "odd-user-state-changelog": 5}))
    result = runner.invoke(app, ["worker", "--broker", broker.bootstrap, "--model", str(tiny_model),
                                 "--group", "odd", "--data-dir", str(tmp_path / "state")])
    assert result.exit_code == 2, result.output
    assert f"odd-user-state-changelog has 5 partitions, {counts['shop-events']} expected" in result.output


def test_eval_takes_a_folder_of_versions_and_explains_a_missing_model(shop_log, tmp_path, tiny_model):
    import shutil

    versions = tmp_path / "versions"
    shutil.copytree(tiny_model, versions / "v1")
    result = runner.invoke(app, ["eval", "--model", str(versions), "--data", str(shop_log), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"].endswith("v1")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "empty"), "--data", str(shop_log)])
    assert result.exit_code == 2 and "no model directory" in result.output


def test_eval_warns_when_the_log_is_from_another_shop(tiny_model, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"v": 1, "event_id": f"e{n}", "user_id": f"u{n % 5}", "item_id": f"x{n}",
                                         "type": "view", "ts": float(n)}) + "\n" for n in range(40)))
    result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(other)])
    assert result.exit_code == 0, result.output
    assert "unknown to the model" in result.output


def test_bench_reports_the_hosts_stolen_cpu_time_per_phase():
    from streamrec.bench import host_cpu_ticks, render

    stat = "cpu  100 5 40 800 10 0 5 40 0 0\ncpu0 50 2 20 400 5 0 2 20 0 0\n"
    assert host_cpu_ticks(stat) == (40, 1000)
    assert host_cpu_ticks("") == (0, 0)
    stolen, ticks = host_cpu_ticks()   # this machine's, or (0, 0) where there is no /proc/stat
    assert 0 <= stolen <= ticks
    phase = {"offered_rate": 500.0, "throughput_events_per_s": 499.9, "latency_p50_ms": 16.0, "latency_p99_ms": 33.1,
             "latency_max_ms": 63.3, "visible_p50_ms": 21.6, "visible_p99_ms": 40.6,
             "seconds_until_all_lists_current": 40.01, "lists": 6309, "loop_cpu_us_per_event": 250.5, "loop_wait_us_per_event": 40.5,
             "recommend_cpu_us_per_event": 610.5, "recommend_wait_us_per_event": 88.5, "worker_cpu_us_per_event": 1045.5, "worker_kernel_percent": 17.3, "worker_page_faults_per_event": 6.3,
             "broker_cpu_us_per_event": 80.5, "bench_cpu_us_per_event": 21.5, "host_steal_percent": 12.5, "complete": True,
             "latency_p99_ms_by_second": [30.0, 33.1]}
    result = {"broker": "kafka", "guarantee": "at_least_once", "workers": 1, "workload": "shop",
              "events_per_phase": 20000, "users": 1502,
              "runs": [{"variant": "worker", "model": "m", "peak_rss_mb": [1.0], "phases": [phase],
                        "worker_stage_seconds": []}]}
    head, row = render(result).splitlines()[2:4]
    assert head.split()[-2:] == ["%", "complete"]
    assert "cpu us/ev  kernel %  faults/ev  broker us/ev  bench us/ev  steal %" in head
    assert "loop us/ev  loop wait us/ev  rec us/ev  rec wait us/ev  cpu us/ev" in head
    assert row.split()[-11:] == ["250.5", "40.5", "610.5", "88.5", "1045.5", "17.3", "6.3", "80.5", "21.5", "12.5",
                                 "True"]


def test_bench_counts_a_workers_kernel_time_and_page_faults():
    """The kernel's share and the page faults per event beside each phase's CPU: in a virtual
    machine that hands freed memory back to its host, fresh pages cost a phase its speed."""
    import mmap

    from streamrec.bench import cpu_seconds

    size = 64 << 20
    fresh = mmap.mmap(-1, size)   # anonymous pages, mapped apart from any allocator's reuse
    before = cpu_seconds(os.getpid())
    for offset in range(0, size, 4096):
        fresh[offset] = 1
    after = cpu_seconds(os.getpid())
    fresh.close()
    assert after.faults - before.faults >= size // (2 << 20)   # at least one per page, huge ones included
    assert 0 <= after.kernel_s <= after.total_s and after.loop_s <= after.total_s
    missing = cpu_seconds(2 ** 22 + 7)   # no such process
    assert missing.faults == 0 and all(v != v for v in missing[:3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names and /proc: Linux")
def test_bench_counts_the_recommend_stages_threads_by_the_name_the_os_shows():
    """The recommend thread and the lanes' helpers name their OS threads (``top -H``, /proc), and
    bench e2e counts their CPU apart: the recommend stage's share of a worker's CPU per phase."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from stream.recommender import start_stage_thread
    from stream.threads import RECOMMEND_THREAD
    from streamrec.bench import cpu_seconds

    def burn(seconds: float) -> int:
        ends = time.thread_time() + seconds
        while time.thread_time() < ends:
            pass
        return threading.get_native_id()

    with ThreadPoolExecutor(1, thread_name_prefix=RECOMMEND_THREAD, initializer=start_stage_thread) as stage:
        tid = stage.submit(burn, 0).result()
        name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        before = cpu_seconds(os.getpid())
        stage.submit(burn, 0.3).result()
        middle = cpu_seconds(os.getpid())
        burn(0.1)   # the test's own thread: not the stage's
        after = cpu_seconds(os.getpid())
    assert name == f"{RECOMMEND_THREAD}_0"
    tick = 1 / os.sysconf("SC_CLK_TCK")   # the process's and its threads' sums round apart
    assert 0.2 <= middle.recommend_s - before.recommend_s <= middle.total_s - before.total_s + 2 * tick
    assert after.recommend_s == middle.recommend_s and after.total_s - middle.total_s >= 0.05


@pytest.mark.integration
def test_a_broker_warm_up_relays_records_and_takes_its_topics_away(broker):
    """bench e2e's warm-up (Kafka's by default) goes through the paths a workload does and
    leaves the broker's topics as it found them; Tansu has no idempotent producers."""
    from stream.compat import topic_partitions
    from streamrec.bench import E2EOptions
    from streamrec.harness import WARMUP_TOPICS, warm_up_broker

    assert E2EOptions(broker_kind="kafka").warmup_seconds() > 0 == E2EOptions(broker_kind="tansu").warmup_seconds()
    assert E2EOptions(broker_kind="kafka", broker_warmup_s=0).warmup_seconds() == 0
    before = set(asyncio.run(topic_partitions(broker.bootstrap)))
    relayed = asyncio.run(warm_up_broker(broker.bootstrap, 3.0, partitions=2, rate=2000))
    assert relayed > 1000
    after = set(asyncio.run(topic_partitions(broker.bootstrap)))
    assert not after & set(WARMUP_TOPICS)
    assert after - before <= {"__consumer_offsets"}   # Kafka's, made for the relay's group


@pytest.mark.integration
def test_bench_counts_the_cpu_the_broker_spends_on_traffic(broker):
    """bench e2e's "broker us/ev": each broker kind names its processes, and their CPU time,
    read as a worker's is, grows with the traffic it serves (a warm-up relay's requests)."""
    from streamrec.bench import process_cpu_seconds
    from streamrec.harness import warm_up_broker

    assert broker.pids
    before = sum(process_cpu_seconds(pid) for pid in broker.pids)
    assert asyncio.run(warm_up_broker(broker.bootstrap, 2.0, partitions=2, rate=2000)) > 1000
    assert sum(process_cpu_seconds(pid) for pid in broker.pids) > before


@pytest.mark.parametrize("legacy", [False, True])
def test_bench_preloads_states_an_earlier_worker_can_read(legacy):
    """The scale workload's preload, in the state format of this worker or (legacy) of one
    before state v2, which `--compare commit:<sha>` runs: the same users, events and dedupe."""
    from stream.state import UserState, event_digest
    from streamrec.bench import state_rows

    histories = {"u1": [("i1", "view", 1.0), ("i2", "purchase", 2.0)], "u2": [("i3", "click", 3.0)]}
    rows = dict(state_rows(histories, legacy))
    assert set(rows) == {b"u1", b"u2"}
    u1 = UserState.decode(rows[b"u1"])
    assert (u1.items, u1.purchased, u1.last_event_id) == (["i1", "i2"], ["i2"], "u1/h1")
    assert u1.seen == [event_digest("u1/h0"), event_digest("u1/h1")]
    assert isinstance(msgpack.unpackb(rows[b"u2"]), dict) == legacy
