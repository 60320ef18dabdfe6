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
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stream.events import EVENTS_TOPIC
from stream.threads import EVENT_LOOP, RECOMMEND_THREAD, STAGE_THREADS, wait_by_role
from streamrec import harness
from streamrec.synthetic import ShopSpec, extend_in_time, generate

REBALANCE_SETTLE_S = 8.0
BROKER_KINDS = ("tansu", "kafka")
# seconds of traffic through a fresh broker before a run (harness.warm_up_broker): Kafka's JVM
# compiles its request paths while it serves; Tansu is compiled ahead of time and keeps every
# record in memory, so it gets none
BROKER_WARMUP_S = {"kafka": 30.0, "tansu": 0.0}


WORKLOADS = ("shop", "scale")
SCALE_TRAIN_USERS = 10_000


@dataclass
class E2EOptions:
    events: int = 20000
    users: int = 2000
    items: int = 600
    workload: str = "shop"          # shop: the demo's small shop; scale: ScaleSpec (50k users, 60k items)
    rates: list[float | None] = field(default_factory=lambda: [None])   # None: as fast as possible
    partitions: int = 4
    max_batch: int | None = None     # the worker's --max-batch (default: the worker's)
    workers: int = 1                # worker processes in the consumer group
    model: Path | None = None
    broker_kind: str = "tansu"
    guarantee: str = "at_least_once"
    compare: list[str] = field(default_factory=list)   # baselines: "naive", "commit:<sha>"
    cache_mb: int | None = None      # the worker's --cache-mb (default: the worker's)
    lanes: int | None = None         # the worker's --lanes (default: the worker's)
    store: str | None = None         # the worker's --store (default: the worker's)
    worker_cpus: list[int] | None = None   # pin every worker process (and baseline) to these CPUs
    broker_warmup_s: float | None = None   # None: BROKER_WARMUP_S of the broker kind
    train_epochs: int = 3
    seed: int = 0

    def warmup_seconds(self) -> float:
        return BROKER_WARMUP_S[self.broker_kind] if self.broker_warmup_s is None else self.broker_warmup_s


def shop_events(options: E2EOptions) -> list[dict]:
    """The synthetic shop's events, repeated later in time until there are ``options.events``."""
    return extend_in_time(generate(ShopSpec(users=options.users, items=options.items, seed=options.seed)),
                          options.events)


def start_broker(kind: str, workdir: Path):
    if kind == "kafka":
        from stream.kafka import KafkaCluster

        return KafkaCluster(nodes=1, data_dir=workdir / "kafka").start()
    from stream.broker import EmbeddedBroker

    return EmbeddedBroker(log_path=str(workdir / "broker.log")).start()


class ShopWorkload:
    """The demo's shop; every phase replays the same events on users of its own."""

    def __init__(self, options: E2EOptions):
        self.events = shop_events(options)
        self.users = len({e["user_id"] for e in self.events})

    def phase(self, n: int) -> list[dict]:
        tag = f"p{n}-"
        return [{**e, "user_id": tag + e["user_id"], "event_id": tag + e["event_id"]} for e in self.events]

    def train(self, workdir: Path, options: E2EOptions, positions: str = "rope") -> Path:
        from model.data import log_from_events
        from model.train import TrainConfig

        return _train(log_from_events(self.events), workdir, TrainConfig(epochs=options.train_epochs), positions)

    def states(self):
        """(user, UserState) before the first phase: none, every phase's users are new."""
        return iter(())

    async def preload(self, bootstrap: str, partitions: int, legacy: bool = False) -> None:
        pass


class ScaleWorkload:
    """Users whose state already holds full histories (written to the state changelog before
    the worker starts), a large catalogue, Zipf activity; phases continue the users' walks."""

    def __init__(self, options: E2EOptions):
        from streamrec.synthetic import ScaleShop, ScaleSpec

        self.options = options
        self.shop = ScaleShop(ScaleSpec(users=max(options.users, 50_000), seed=options.seed))
        self.histories = self.shop.histories()
        self.users = len(self.histories)

    def phase(self, n: int) -> list[dict]:
        return self.shop.stream(self.options.events)

    def train(self, workdir: Path, options: E2EOptions, positions: str = "rope") -> Path:
        from model.train import TrainConfig

        sample = dict(list(self.histories.items())[:SCALE_TRAIN_USERS])
        # a short run with a sampled softmax: the benchmark needs the recipe's width and a
        # trained geometry for the index, not its accuracy
        return _train(sample, workdir, TrainConfig(epochs=1, negatives=2048, val_users=2000, max_minutes=5),
                      positions)

    def states(self):
        """(user, UserState) before the first phase: every user's full history."""
        from streamrec.synthetic import preloaded_state

        return ((user, preloaded_state(user, history)) for user, history in self.histories.items())

    async def preload(self, bootstrap: str, partitions: int, legacy: bool = False) -> None:
        """Every user's history as a state row in the changelog (``legacy``: the format of
        versions before state v2, for an earlier commit's worker)."""
        from stream.worker import WorkerSettings

        settings = WorkerSettings(broker=bootstrap, model=Path("."), partitions=partitions)
        from stream import compat

        await compat.ensure_topics(bootstrap, settings.topics(), settings.topic_configs())

        sizes = []

        def measured():
            for key, value in state_rows(self.histories, legacy):
                sizes.append(len(value))
                yield key, value

        await harness.produce(bootstrap, settings.changelog_topic, measured(), acks="all")
        self.state_bytes_per_user = round(sum(sizes) / max(1, len(sizes)))


def state_rows(histories: dict, legacy: bool = False):
    """(key, value) state changelog rows of users who already have ``histories`` (the worker's
    own rule applied to them); ``legacy``: state v1, which versions before state v2 read."""
    from streamrec.synthetic import preloaded_state

    for user, history in histories.items():
        state = preloaded_state(user, history)
        if legacy:
            import msgpack

            yield user.encode(), msgpack.packb({
                "v": 1, "items": state.items, "types": state.types, "ts": state.ts,
                "purchased": state.purchased, "event_ids": [f"{user}/h{n}" for n in range(len(history))],
                "last_event_id": state.last_event_id, "last_event_ts": state.last_event_ts})
        else:
            yield user.encode(), state.encode()


def run_e2e(options: E2EOptions) -> dict:
    """The worker, then each baseline in ``options.compare``: the same workload and phases, a
    fresh broker each (Tansu's memory never frees, and every run starts from the same state)."""
    if options.broker_kind not in BROKER_KINDS:
        raise ValueError(f"broker kind must be one of {', '.join(BROKER_KINDS)}")
    if options.workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
    from model.artifact import default_device   # where the workers' encoders run

    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    workload = ShopWorkload(options) if options.workload == "shop" else ScaleWorkload(options)
    model = options.model or workload.train(workdir / "rope", options)
    phases = [workload.phase(n) for n in range(len(options.rates))]   # the same events for every run
    # an earlier commit serves models of its own format: learned positions, no input convolution,
    # same recipe and data
    learned = workload.train(workdir / "learned", options, positions="learned") \
        if any(v.startswith("commit:") for v in options.compare) else None
    runs = []
    for variant in ["worker", *options.compare]:
        run_model = learned if variant.startswith("commit:") else model
        runs.append(_run_variant(variant, run_model, workload, phases, options, workdir / variant.replace(":", "-")))
    return {"broker": options.broker_kind, "guarantee": options.guarantee, "workers": options.workers,
            "workload": options.workload, "events_per_phase": options.events, "users": workload.users,
            "worker_cpus": options.worker_cpus,
            "broker_warmup_s": options.warmup_seconds(), "device": default_device().type, "runs": runs}


def _run_variant(variant: str, model: Path, workload, phases: list[list[dict]], options: E2EOptions,
                 workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    launch, cleanup = _launcher(variant, options, workdir)
    broker = start_broker(options.broker_kind, workdir)
    try:
        warmup_s = options.warmup_seconds()
        if warmup_s:
            asyncio.run(harness.warm_up_broker(broker.bootstrap, warmup_s, options.partitions))
        asyncio.run(workload.preload(broker.bootstrap, options.partitions, legacy=variant.startswith("commit:")))
        logs = [workdir / f"worker-{n}.log" for n in range(options.workers)]
        workers = [launch(broker.bootstrap, model, workdir / f"state-{n}", log) for n, log in enumerate(logs)]
        try:
            results = asyncio.run(_drive(broker.bootstrap, phases, options, logs, [w.pid for w in workers],
                                         broker.pids))
            peak_rss = [peak_rss_mb(w.pid) for w in workers]
        finally:
            for worker in workers:
                harness.stop_worker(worker)
    finally:
        broker.cleanup()
        cleanup()
        # the broker's log and the workers' state are GBs at scale; the models and logs stay
        for path in [workdir / "kafka", *workdir.glob("state-*")]:
            shutil.rmtree(path, ignore_errors=True)
    return {"variant": variant, "model": str(model), "phases": results, "peak_rss_mb": peak_rss,
            "state_bytes_per_user": getattr(workload, "state_bytes_per_user", None),
            "worker_stage_seconds": [_last_stage_line(log) for log in logs]}


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), MiB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _launcher(variant: str, options: E2EOptions, workdir: Path):
    """(start a worker process, clean up) for ``worker``, ``naive`` or ``commit:<sha>``."""
    repo = Path(__file__).resolve().parents[1]
    if variant == "worker":
        extra = harness.worker_flags(guarantee=options.guarantee, max_batch=options.max_batch,
                                     cache_mb=options.cache_mb, lanes=options.lanes, store=options.store)
        return (lambda b, m, d, log: harness.start_worker(b, m, d, partitions=options.partitions, log_path=log,
                                                          extra=extra, cpus=options.worker_cpus)), (lambda: None)
    if variant == "naive":
        command = [sys.executable, str(repo / "benchmarks" / "naive_worker.py")]
        return (lambda b, m, d, log: harness.start_worker(b, m, d, partitions=options.partitions, log_path=log,
                                                          command=command, cpus=options.worker_cpus)), (lambda: None)
    if variant.startswith("commit:"):
        source = workdir / "source"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(source), variant[7:]],
                       check=True, capture_output=True)
        extra = harness.worker_flags(max_batch=options.max_batch)

        def cleanup():
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(source)], capture_output=True)

        return (lambda b, m, d, log: harness.start_worker(b, m, d, partitions=options.partitions, log_path=log,
                                                          extra=extra, source=source,
                                                          cpus=options.worker_cpus)), cleanup
    raise ValueError(f"unknown variant {variant!r}: worker, naive or commit:<sha>")


def _last_stage_line(log: Path) -> str | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "stage seconds" in line]
    return lines[-1].split("processed ")[-1].strip() if lines else None


def _train(log, workdir: Path, config, positions: str = "rope") -> Path:
    from model.train import train
    from stream.recommender import write_model_dir

    encoder = dataclasses.replace(config.encoder, positions=positions)
    if positions == "learned":   # what earlier commits load: no input convolution either
        encoder = dataclasses.replace(encoder, conv_kernel=0)
    config = dataclasses.replace(config, encoder=encoder)
    out = workdir / "model"
    write_model_dir(out, lambda tmp: train(log, config, out_dir=tmp, progress=False), users_for_tuning=log)
    return out


class ProcessCpu(NamedTuple):
    loop_s: float     # the event loop's thread (the main one), user + system
    total_s: float    # every thread, user + system
    kernel_s: float   # every thread, system
    faults: int       # minor page faults, every thread
    recommend_s: float = float("nan")   # the recommend stage's threads (stream.threads.STAGE_THREADS)
    recommend_wait_s: float = float("nan")   # their run-queue delay: ready to run, waiting for a core
    loop_wait_s: float = float("nan")        # the event loop's


def _stat(path: str) -> tuple[str, list[int]]:
    """A /proc stat file's name and its fields from the 8th: minflt, cminflt, majflt, cmajflt,
    utime, stime (ticks)."""
    text = Path(path).read_text()
    name, rest = text[text.index("(") + 1:].rsplit(")", 1)
    return name, [int(f) for f in rest.split()[7:13]]


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU seconds so far, every thread, from its /proc stat alone (nan where it
    cannot be read): the broker's, whose threads need no telling apart."""
    try:
        _, fields = _stat(f"/proc/{pid}/stat")
    except (OSError, IndexError, ValueError):
        return float("nan")
    return (fields[4] + fields[5]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> ProcessCpu:
    """A worker's CPU seconds and page faults so far, from /proc (Linux; nan elsewhere).

    The kernel's share shows what the process's code does not: in a virtual machine whose host
    takes freed memory back (virtio-balloon free page reporting), the first touch of a page
    cost the worker 17-40 µs of system time instead of ~1.4 after another process had freed GBs,
    and a phase that mapped fresh memory ran at half speed for it.
    """
    tick = os.sysconf("SC_CLK_TCK")
    # each thread's ticks (the main one is the event loop's); one read of the process's own
    # totals, which keep what threads that have ended used
    threads: dict[str, tuple[str, list[int]]] = {}
    named = []   # (task directory, OS name): their waits for a core by role, from the same scan
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            threads[task.parent.name] = thread = _stat(str(task))
        except (OSError, IndexError, ValueError):   # the thread has ended meanwhile
            continue
        named.append((task.parent, thread[0]))
    try:
        _, every = _stat(f"/proc/{pid}/stat")
        _, loop = threads[str(pid)]
    except (OSError, IndexError, ValueError, KeyError):
        return ProcessCpu(float("nan"), float("nan"), float("nan"), 0)
    stage = [f[4] + f[5] for name, f in threads.values() if name.startswith(STAGE_THREADS)]
    waits = wait_by_role(named, str(pid))
    return ProcessCpu((loop[4] + loop[5]) / tick, (every[4] + every[5]) / tick, every[5] / tick, every[0],
                      sum(stage) / tick if stage else float("nan"),   # none named so (a baseline): nan
                      waits[RECOMMEND_THREAD] if stage else float("nan"), waits[EVENT_LOOP])


def host_cpu_ticks(stat: str | None = None) -> tuple[int, int]:
    """(stolen, all) CPU ticks of the whole machine since boot, from /proc/stat's ``cpu`` line
    (Linux; (0, 0) elsewhere). On a virtual machine the hypervisor's other guests take "steal"
    time from it: a phase that ran while they did is slower, whatever the code."""
    try:
        line = (stat if stat is not None else Path("/proc/stat").read_text()).splitlines()[0].split()
        ticks = [int(t) for t in line[1:9]]   # user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share (%) of the machine's CPU time stolen between two ``host_cpu_ticks`` readings;
    nan where there were none."""
    stolen, ticks = (a - b for a, b in zip(after, before))
    return 100 * stolen / ticks if ticks > 0 else float("nan")


async def _drive(bootstrap: str, phases: list[list[dict]], options: E2EOptions, logs: list[Path],
                 pids: list[int], broker_pids: list[int]) -> list[dict]:
    for log in logs:
        await harness.wait_for_worker_ready(bootstrap, log)
    if len(logs) > 1:
        await asyncio.sleep(REBALANCE_SETTLE_S)  # later joiners trigger a rebalance
    collector = harness.ListCollector(bootstrap, read_committed=options.guarantee == "exactly_once")
    await collector.start()
    try:
        results = []
        for events, rate in zip(phases, options.rates):
            before, host_before = [cpu_seconds(pid) for pid in pids], host_cpu_ticks()
            own_s, broker_s = time.process_time(), sum(map(process_cpu_seconds, broker_pids))
            result = await _phase(bootstrap, events, rate, collector)
            own_s, broker_s = time.process_time() - own_s, sum(map(process_cpu_seconds, broker_pids)) - broker_s
            after, host_after = [cpu_seconds(pid) for pid in pids], host_cpu_ticks()
            # the machine's other tenants: the broker, and this process (the load generator and
            # the list reader); on a shared machine, cores the worker did not get
            result["broker_cpu_us_per_event"] = round(broker_s / len(events) * 1e6, 1)
            result["bench_cpu_us_per_event"] = round(own_s / len(events) * 1e6, 1)
            result["host_steal_percent"] = round(steal_percent(host_before, host_after), 1)
            loop_s, total_s, kernel_s, faults = (sum(a[f] - b[f] for a, b in zip(after, before)) for f in range(4))
            # a thread pool starts its threads with its first task: none yet counts as 0 s so far
            stage_s, wait_s, loop_wait_s = (sum(getattr(a, f) - (0.0 if math.isnan(getattr(b, f)) else getattr(b, f))
                                                for a, b in zip(after, before))
                                            for f in ("recommend_s", "recommend_wait_s", "loop_wait_s"))
            result["loop_cpu_us_per_event"] = round(loop_s / len(events) * 1e6, 1)
            result["loop_wait_us_per_event"] = round(loop_wait_s / len(events) * 1e6, 1)
            result["recommend_cpu_us_per_event"] = round(stage_s / len(events) * 1e6, 1)
            result["recommend_wait_us_per_event"] = round(wait_s / len(events) * 1e6, 1)
            result["worker_cpu_us_per_event"] = round(total_s / len(events) * 1e6, 1)
            result["worker_kernel_percent"] = round(100 * kernel_s / total_s, 1) if total_s > 0 else float("nan")
            result["worker_page_faults_per_event"] = round(faults / len(events), 1)
            results.append(result)
        return results
    finally:
        await collector.stop()


async def _phase(bootstrap: str, events: list[dict], rate: float | None, collector) -> dict:
    """One offered rate, until every list is current."""
    first_latency = len(collector.latencies)
    # The load generator must not stall: a full garbage collection over the lists collected so
    # far took ~200 ms in the middle of a 5,000/s phase, and the events it held back went out
    # as one burst (the p99 of that phase). Earlier objects are frozen out of those passes.
    gc.collect()
    gc.freeze()
    started = time.time()
    await harness.produce(bootstrap, EVENTS_TOPIC, harness.event_records(events, now_ts=True), rate=rate)
    produced = time.time() - started
    last = {e["user_id"]: e["event_id"] for e in events}
    complete = await collector.wait_for(
        lambda c: all(c.latest.get(u, {}).get("event_id") == i for u, i in last.items()), timeout=600)
    elapsed = time.time() - started
    lat = np.asarray(collector.latencies[first_latency:]) * 1000
    seen = np.asarray(collector.visible_latencies[first_latency:]) * 1000
    # the tail's shape: one slow second (a stall) or every second (the worker is too slow)
    second = (np.asarray(collector.produced_at[first_latency:]) - started).astype(int).clip(0)
    by_second = [round(float(np.percentile(lat[second == s], 99)), 1) for s in np.unique(second)]
    return {
        "offered_rate": rate or "max",
        "started_at": round(started, 3),   # unix time: to line the phase up with other logs
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
        "latency_p99_ms_by_second": by_second,
    }


def render(result: dict) -> str:
    """Each run's phases as an aligned table, its stage seconds, and the throughput ratios."""
    cols = ("offered_rate", "throughput_events_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms",
            "visible_p50_ms", "visible_p99_ms", "seconds_until_all_lists_current", "lists",
            "loop_cpu_us_per_event", "loop_wait_us_per_event", "recommend_cpu_us_per_event",
            "recommend_wait_us_per_event", "worker_cpu_us_per_event", "worker_kernel_percent",
            "worker_page_faults_per_event", "broker_cpu_us_per_event", "bench_cpu_us_per_event",
            "host_steal_percent", "complete")
    head = ("offered/s", "events/s", "p50 ms", "p99 ms", "max ms", "seen p50", "seen p99", "s to current",
            "lists", "loop us/ev", "loop wait us/ev", "rec us/ev", "rec wait us/ev", "cpu us/ev", "kernel %",
            "faults/ev", "broker us/ev", "bench us/ev", "steal %", "complete")
    lines = [f"broker {result['broker']}, {result['guarantee']}, {result['workers']} worker(s), workload "
             f"{result['workload']}: {result['events_per_phase']:,} events per phase, {result['users']:,} users"
             + (f", worker on CPUs {','.join(map(str, result['worker_cpus']))}" if result.get("worker_cpus") else "")
             + (f", broker warmed up for {result['broker_warmup_s']:g} s" if result.get("broker_warmup_s") else "")
             + (", encoder on the GPU" if result.get("device") == "cuda" else "")]
    for run in result["runs"]:
        rows = [head] + [tuple(str(p.get(c, "-")) for c in cols) for p in run["phases"]]   # "-": an older result
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines.append(f"-- {run['variant']} (model {run['model']}); peak RSS MiB {run['peak_rss_mb']}"
                     + (f"; state {run['state_bytes_per_user']} bytes/user" if run.get("state_bytes_per_user") else ""))
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines += [f"   p99 ms by second at {p['offered_rate']}/s: "
                  + " ".join(f"{v:g}" for v in p["latency_p99_ms_by_second"])
                  for p in run["phases"] if p["offered_rate"] != "max"]
        lines += [f"   stages: {s}" for s in run["worker_stage_seconds"]]
    first = result["runs"][0]["phases"][0]["throughput_events_per_s"]
    for run in result["runs"][1:]:
        lines.append(f"worker / {run['variant']}: {first / run['phases'][0]['throughput_events_per_s']:.1f}x "
                     f"events/s in the first phase")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_e2e(E2EOptions())))
