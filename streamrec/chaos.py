"""``streamrec bench chaos``: faults while traffic flows, then every acknowledged event checked.

Modelled on how the most trusted systems test themselves (Kafka's system tests, Jepsen): a
steady stream goes through a real broker and worker processes while one kind of fault is
injected; afterwards every good event the producer had acknowledged is checked against the
outputs -- each user's final list must reflect the user's last event, and no event may be in
a user's state twice -- and every malformed message must be in the dead-letter topic.

Scenarios (one at a time, each on a fresh broker):

* ``kill``: kill -9 of the worker, ``kills`` times, restarted each time (every other restart
  on an empty state directory);
* ``rebalance``: two workers, a third joins under load, one leaves cleanly, one is killed;
* ``broker-restart``: the (single-node, persistent) Apache Kafka stopped and started again;
* ``node-kill``: one node of three (replication 3, ``min.insync.replicas`` 2) killed and brought back;
* ``malformed``: malformed messages of more than 20 kinds (a fixed corpus and a mutation
  fuzzer) mixed 1:1 with good events;
* ``model-corrupt``: a model version appears half-written, then corrupt, then valid, during traffic;
* ``catalogue-flood``: ``shop-items`` updates flood in during traffic.

Each prints one row: events offered, users, lists lost, events double-applied, repeated lists,
dead letters expected and got, worker crashes, recovery seconds (fault to lag 0), peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from aiokafka import AIOKafkaProducer

from stream.events import (DLQ_TOPIC, EVENTS_TOPIC, ITEMS_TOPIC, MAX_ID_CHARS, InvalidMessage, decode_dead_letter,
                           decode_event, decode_keyed_event, encode_event, encode_item)
from stream.lag import lag_snapshot
from stream.state import UserState
from streamrec import harness

SCENARIOS = ("kill", "rebalance", "broker-restart", "node-kill", "malformed", "model-corrupt", "catalogue-flood")
KAFKA_ONLY = {"broker-restart", "node-kill"}   # Tansu keeps its log in memory: a restart loses it
GROUP = "streamrec"
SETTLE_TIMEOUT_S = 300.0
MAX_PRODUCE_BYTES = 1 << 22   # the chaos producer tries values past the broker's 1 MiB limit


@dataclass
class ChaosOptions:
    broker_kind: str = "tansu"
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    events: int = 20000               # good events per scenario
    rate: float = 1500.0              # events/s offered (good and malformed together)
    partitions: int = 4
    kills: int = 10
    malformed: int | None = None      # malformed messages in "malformed" (default: as many as good events)
    catalogue_updates: int = 100_000
    model: Path | None = None
    seed: int = 0
    max_batch: int | None = None      # the worker's --max-batch (default: the worker's)


@dataclass
class Row:
    scenario: str
    broker: str
    offered: int = 0
    users: int = 0
    lists_lost: int = 0
    double_applied: int = 0
    repeated_lists: int = 0
    dead_expected: Counter = field(default_factory=Counter)
    dead_got: Counter = field(default_factory=Counter)
    crashes: int = 0
    recovery_s: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    notes: str = ""

    @property
    def ok(self) -> bool:
        return not self.lists_lost and not self.double_applied and not self.crashes and \
            self.dead_expected == self.dead_got

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "broker": self.broker, "offered": self.offered, "users": self.users,
                "lists_lost": self.lists_lost, "double_applied": self.double_applied,
                "repeated_lists": self.repeated_lists, "dead_letters_expected": sum(self.dead_expected.values()),
                "dead_letters_got": sum(self.dead_got.values()),
                "dead_letters_by_reason": {r: [self.dead_expected[r], self.dead_got[r]]
                                           for r in sorted(set(self.dead_expected) | set(self.dead_got))},
                "worker_crashes": self.crashes,
                "recovery_s": [round(s, 1) for s in self.recovery_s], "peak_rss_mb": round(self.peak_rss_mb, 1),
                "ok": self.ok, "notes": self.notes}


# ----------------------------------------------------------------------------- workload

def good_events(n: int, seed: int) -> list[dict]:
    """Real Amazon Beauty sequences when ../shared/data is there (ts spread as replay spreads
    them), the synthetic shop otherwise; in ts order, each user's order kept."""
    from streamrec.bench import shop_events, E2EOptions

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "Beauty.txt"
    if data.exists():
        from stream.logs import load_events

        events, users, kept = load_events(data).events, set(), 0
        per_user = Counter(e.user_id for e in events)
        for user, count in per_user.items():   # whole users, until there are n events
            if kept >= n:
                break
            users.add(user)
            kept += count
        return [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "type": e.type, "ts": e.ts}
                for e in events if e.user_id in users][:n]
    return shop_events(E2EOptions(events=n, seed=seed))


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def malformed_corpus(rng: random.Random, good: dict) -> list[tuple[str, bytes | None, bytes | None]]:
    """(kind, key, value) of every fixed kind; ``good`` is a valid event to bend."""
    key = good["user_id"].encode()
    e = {"v": 1, **good}
    corpus = [
        ("truncated msgpack", key, pack(e)[: rng.randint(1, 10)]),
        ("deep nesting", key, b"\x91" * 5000 + b"\x90"),   # [[[...[]...]]], 5000 levels
        ("huge user_id", b"u" * 200_000, pack({**e, "user_id": "u" * 200_000})),
        ("huge item_id", key, pack({**e, "item_id": "i" * 100_000})),
        ("nan ts", key, pack({**e, "ts": float("nan")})),
        ("inf ts", key, pack({**e, "ts": float("inf")})),
        ("negative ts", key, pack({**e, "ts": -5.0})),
        ("bool ts", key, pack({**e, "ts": True})),
        ("non-utf8 key", b"\xff\xfe" + key, pack(e)),
        ("non-utf8 user_id", key, b"\x86\xa1v\x01\xa8event_id\xa1x\xa7user_id\xa2\xff\xfe\xa7item_id\xa1i"
                                  b"\xa4type\xa4view\xa2ts\xcb?\xf8\x00\x00\x00\x00\x00\x00"),
        ("event_id not a string", key, pack({**e, "event_id": 12})),
        ("user_id not a string", key, pack({**e, "user_id": [1, 2]})),
        ("item_id not a string", key, pack({**e, "item_id": {"a": 1}})),
        ("type not a string", key, pack({**e, "type": 3})),
        ("ts not a number", key, pack({**e, "ts": "noon"})),
        ("unknown v", key, pack({**e, "v": 7})),
        ("missing v", key, pack({k: v for k, v in e.items() if k != "v"})),
        ("unknown type", key, pack({**e, "type": "wishlist"})),
        ("missing item_id", key, pack({k: v for k, v in e.items() if k != "item_id"})),
        ("empty user_id", key, pack({**e, "user_id": ""})),
        ("key disagrees with user_id", b"someone-else", pack(e)),
        ("not a map", key, pack([1, 2, 3])),
        ("empty value", key, b""),
        ("null value", key, None),
        ("near-max value", key, os.urandom(950_000)),
        ("over-max value", key, os.urandom(1_200_000)),
    ]
    return corpus


def duplicate_of(good: dict) -> tuple[str, bytes, bytes]:
    """A valid event re-sent with the id it already had: applied once, never a dead letter."""
    return "duplicated event id", good["user_id"].encode(), encode_event(good)


def fuzzed(rng: random.Random, good: dict) -> tuple[str, bytes, bytes]:
    """A mutation of a valid event: bytes flipped, cut, or a field swapped for junk."""
    raw = bytearray(encode_event(good))
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return "fuzz: bytes flipped", good["user_id"].encode(), bytes(raw)
    if choice < 0.6:
        return "fuzz: cut", good["user_id"].encode(), bytes(raw[: rng.randrange(1, len(raw))])
    junk = rng.choice([None, 0, -1, 1e308, "", [], {}, "x" * (MAX_ID_CHARS + 1), b"\x00"])
    field_ = rng.choice(["event_id", "user_id", "item_id", "type", "ts", "v"])
    return f"fuzz: {field_} junk", good["user_id"].encode(), pack({"v": 1, **good, field_: junk})


def expected_outcome(key: bytes | None, value: bytes | None) -> str | None:
    """None for a valid event, else the dead-letter reason the contract gives it."""
    try:
        decode_keyed_event(key, value)
    except InvalidMessage as exc:
        return exc.reason
    return None


def reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


# ----------------------------------------------------------------------------- processes

class Workers:
    """Worker processes of a scenario: started, killed, stopped; counts unexpected exits."""

    def __init__(self, bootstrap: str, model: Path, workdir: Path, options: ChaosOptions):
        self.bootstrap, self.model, self.workdir, self.options = bootstrap, model, workdir, options
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.states: dict[int, Path] = {}
        self.crashes = 0
        self.peak_rss_mb = 0.0
        self._n = 0

    async def start(self, state: Path | None = None) -> int:
        """A new worker on ``state`` (default: a fresh, empty directory of its own)."""
        n = self._n
        self._n += 1
        state = state or self.workdir / f"state-{n}"
        self.states[n] = state
        self.logs[n] = self.workdir / f"worker-{n}.log"
        self.procs[n] = harness.start_worker(self.bootstrap, self.model, state, partitions=self.options.partitions,
                                             log_path=self.logs[n],
                                             extra=harness.worker_flags(reload_interval=1,
                                                                        max_batch=self.options.max_batch))
        await harness.wait_for_worker_ready(self.bootstrap, self.logs[n], timeout=180)
        return n

    def _note_rss(self, n: int) -> None:
        from streamrec.bench import peak_rss_mb

        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb(self.procs[n].pid) or 0.0)

    def kill(self, n: int) -> None:
        self._note_rss(n)
        os.killpg(self.procs[n].pid, signal.SIGKILL)
        self.procs.pop(n).wait()

    def stop(self, n: int) -> None:
        self._note_rss(n)
        harness.stop_worker(self.procs.pop(n))

    def check(self) -> None:
        """Count workers that exited without being told to."""
        for n, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.crashes += 1
                self.procs.pop(n)

    def stop_all(self) -> None:
        self.check()
        for n in list(self.procs):
            self.stop(n)

    @property
    def running(self) -> list[int]:
        return sorted(self.procs)


# ----------------------------------------------------------------------------- one scenario

class Traffic:
    """The producer of a scenario: good events (and malformed ones) at a steady rate, with
    ``acks=all``; remembers what the broker acknowledged."""

    def __init__(self, bootstrap: str, rate: float):
        self.bootstrap, self.rate = bootstrap, rate
        self.acked_good: list[dict] = []
        self.acked_bad: Counter = Counter()   # expected dead-letter reason kind -> count
        self.refused = 0                      # records the broker would not take (over its size limit)
        self.sent = 0

    async def run(self, records: list[tuple[bytes | None, bytes | None, dict | None, str | None]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                    max_request_size=MAX_PRODUCE_BYTES, request_timeout_ms=30000)
        await producer.start()
        started = time.monotonic()
        pending: list = []
        try:
            for key, value, good, reason in records:
                pending.append((await self._send(producer, key, value), good, reason))
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
                if len(pending) >= 500:
                    await self._settle(pending)
            await self._settle(pending)
        finally:
            await producer.stop()

    async def _send(self, producer, key, value):
        try:
            return await producer.send(EVENTS_TOPIC, value, key=key)
        except Exception as exc:   # over the producer's own limit
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut

    async def _settle(self, pending: list) -> None:
        for fut, good, reason in pending:
            try:
                await fut
            except Exception:   # not acknowledged: not owed an output
                self.refused += 1
                continue
            if good is not None:
                self.acked_good.append(good)
            else:
                self.acked_bad[reason_kind(reason)] += 1
        pending.clear()


async def wait_for_zero_lag(bootstrap: str, since: float, timeout: float = SETTLE_TIMEOUT_S,
                            below: int = 1) -> float | None:
    """Seconds from ``since`` until the group's lag on shop-events is under ``below`` (None: not
    in time). With traffic still flowing, "caught up" is a lag under half a second of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await lag_snapshot(bootstrap, GROUP, [EVENTS_TOPIC])).total_lag < below:
                return time.monotonic() - since
        except Exception:
            pass
        await asyncio.sleep(0.5)
    return None


def expected_last(acked_good: list[dict]) -> dict[str, str]:
    """Each user's last event that counts: an event id the user already had is a duplicate,
    applied once (the worker remembers a user's recent ids, stream/state.py)."""
    from stream.state import MAX_EVENT_IDS

    seen: dict[str, list[str]] = {}
    last: dict[str, str] = {}
    for e in acked_good:
        ids = seen.setdefault(e["user_id"], [])
        if e["event_id"] in ids:
            continue
        ids.append(e["event_id"])
        del ids[:-MAX_EVENT_IDS]
        last[e["user_id"]] = e["event_id"]
    return last


async def check(row: Row, bootstrap: str, traffic: Traffic, collector: harness.ListCollector) -> None:
    """Every acknowledged good event against the lists and the state; dead letters by reason."""
    last = expected_last(traffic.acked_good)
    await collector.wait_for(lambda c: all(c.latest.get(u, {}).get("event_id") == i for u, i in last.items()),
                             SETTLE_TIMEOUT_S / 2)
    row.users = len(last)
    row.lists_lost = sum(collector.latest.get(u, {}).get("event_id") != i for u, i in last.items())
    row.repeated_lists = collector.repeats(last)
    states = {}
    for r in await harness.read_topic(bootstrap, f"{GROUP}-user-state-changelog", read_committed=True):
        states[r.key] = r.value
    for user in last:
        raw = states.get(user.encode())
        if raw is None:
            continue
        seen = UserState.decode(raw).seen
        row.double_applied += len(seen) - len(set(seen))
    row.dead_expected = Counter(traffic.acked_bad)
    for r in await harness.read_topic(bootstrap, DLQ_TOPIC):
        row.dead_got[reason_kind(decode_dead_letter(r.value)["reason"])] += 1


async def stream_with_fault(row: Row, bootstrap: str, records, fault, rate: float) -> Traffic:
    traffic = Traffic(bootstrap, rate)
    producing = asyncio.create_task(traffic.run(records))
    try:
        await fault()
    finally:
        await producing
    row.offered = traffic.sent
    return traffic


# ----------------------------------------------------------------------------- the scenarios

def run_chaos(options: ChaosOptions) -> list[Row]:
    from streamrec.bench import start_broker

    workdir = Path(tempfile.mkdtemp(prefix="streamrec-chaos-"))
    good = good_events(options.events, options.seed)
    model = options.model or train_model(good, workdir)
    rows = []
    for scenario in options.scenarios:
        row = Row(scenario, options.broker_kind)
        if scenario in KAFKA_ONLY and options.broker_kind != "kafka":
            row.notes = "skipped: the embedded broker keeps its log in memory"
            rows.append(row)
            continue
        scenario_dir = workdir / scenario
        scenario_dir.mkdir()
        if scenario == "node-kill":
            from stream.kafka import KafkaCluster

            broker = KafkaCluster(nodes=3, data_dir=scenario_dir / "kafka").start()
        else:
            broker = start_broker(options.broker_kind, scenario_dir)
        try:
            asyncio.run(_scenario(row, broker, model, good, options, scenario_dir))
        finally:
            broker.cleanup()
        rows.append(row)
    return rows


def train_model(events: list[dict], workdir: Path) -> Path:
    from model.data import log_from_events
    from model.train import TrainConfig, train
    from stream.recommender import write_model_dir

    out = workdir / "models" / "v1"
    write_model_dir(out, lambda tmp: train(log_from_events(events), TrainConfig(epochs=2), out_dir=tmp,
                                           progress=False))
    return out


async def _scenario(row: Row, broker, model: Path, good: list[dict], options: ChaosOptions, workdir: Path) -> None:
    rng = random.Random(options.seed)
    models_root = workdir / "models"   # a folder of versions of the scenario's own (model-corrupt adds to it)
    shutil.copytree(model, models_root / "v1")
    workers = Workers(broker.bootstrap, models_root, workdir, options)
    collector = harness.ListCollector(broker.bootstrap)
    records = [(e["user_id"].encode(), encode_event(e), e, None) for e in good]
    try:
        await workers.start()
        await collector.start()
        fault = await _fault(row.scenario, rng, broker, workers, good, records, options, row)
        traffic = await stream_with_fault(row, broker.bootstrap, records, fault, options.rate)
        workers.check()
        settled = await wait_for_zero_lag(broker.bootstrap, time.monotonic())
        if settled is None:
            row.notes += " lag did not reach 0"
        await check(row, broker.bootstrap, traffic, collector)
        if traffic.refused:
            row.notes += f" {traffic.refused} records refused by the broker (over its size limit)"
        if row.scenario == "model-corrupt":
            versions = Counter(m["model_version"] for m in collector.latest.values())
            row.notes += f" final lists by model version: {dict(versions)}"
            if "corrupt-v3" in versions:
                row.crashes += 1   # served a model that could not be loaded: as bad as a crash
    finally:
        workers.stop_all()
        row.crashes += workers.crashes
        row.peak_rss_mb = workers.peak_rss_mb
        await collector.stop()


async def _fault(scenario, rng, broker, workers: Workers, good, records, options, row: Row):
    """Returns the coroutine function that injects ``scenario``'s faults while traffic flows;
    may also rewrite ``records`` (malformed) or prepare files (model-corrupt)."""
    duration = len(records) / options.rate

    async def recovered(since: float) -> None:
        took = await wait_for_zero_lag(broker.bootstrap, since, timeout=120, below=max(1, int(options.rate / 2)))
        if took is not None:
            row.recovery_s.append(took)

    if scenario == "kill":
        async def fault():
            for k in range(options.kills):
                await asyncio.sleep(duration / (options.kills + 1))
                (n,) = workers.running
                state = workers.states[n]
                workers.kill(n)
                since = time.monotonic()
                await workers.start(None if k % 2 else state)   # every other restart on an empty disk
                await recovered(since)
        return fault

    if scenario == "rebalance":
        await workers.start()   # two in the group from the start

        async def fault():
            await asyncio.sleep(duration / 4)
            since = time.monotonic()
            await workers.start()                    # a third joins
            await asyncio.sleep(duration / 4)
            workers.stop(workers.running[0])         # one leaves cleanly
            await asyncio.sleep(duration / 4)
            workers.kill(workers.running[0])         # one dies
            await recovered(since)
        return fault

    if scenario in ("broker-restart", "node-kill"):
        # the one node stopped cleanly for 3 s; or one node of three killed for 5 s
        node, kill, pause = (0, False, 3) if scenario == "broker-restart" else (1, True, 5)

        async def fault():
            await asyncio.sleep(duration / 3)
            since = time.monotonic()
            await asyncio.to_thread(broker.stop_node, node, kill)
            await asyncio.sleep(pause)
            await asyncio.to_thread(broker.start_node, node)
            await recovered(since)
        return fault

    if scenario == "malformed":
        bad = []
        n_bad = options.malformed if options.malformed is not None else len(good)
        while len(bad) < n_bad:
            corpus = malformed_corpus(rng, rng.choice(good))
            bad.extend(corpus)
            bad.extend(None for _ in range(len(corpus)))   # fuzzed from the event beside it
        mixed = []
        for n, rec in enumerate(records):
            mixed.append(rec)
            if n < len(bad):
                kind, key, value = bad[n] or (fuzzed(rng, rec[2]) if rng.random() < 0.9 else duplicate_of(rec[2]))
                reason = expected_outcome(key, value)
                if reason is None:   # a harmless mutation: a good event of its own
                    event = decode_event(value)
                    mixed.append((key, value, {"event_id": event.event_id, "user_id": event.user_id}, None))
                else:
                    mixed.append((key, value, None, reason))
        records[:] = mixed

        async def fault():
            pass
        return fault

    if scenario == "model-corrupt":
        root = workers.model   # the folder of versions the worker watches

        async def fault():
            await asyncio.sleep(duration / 4)
            half = root / "v2-half"                   # no metadata.json yet: not a version
            shutil.copytree(root / "v1", half)
            (half / "metadata.json").unlink()
            await asyncio.sleep(duration / 4)
            corrupt = root / "v3-corrupt"             # complete-looking, weights truncated
            shutil.copytree(root / "v1", corrupt)
            meta = json.loads((corrupt / "metadata.json").read_text())
            meta["version"] = "corrupt-v3"
            (corrupt / "metadata.json").write_text(json.dumps(meta))
            weights = corrupt / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
            await asyncio.sleep(duration / 4)
            shutil.rmtree(corrupt)
        return fault

    if scenario == "catalogue-flood":
        items = sorted({e["item_id"] for e in good})

        async def fault():
            updates = ((i.encode(), encode_item(i, rng.random() > 0.1, [f"brand:{rng.randrange(50)}"]))
                       for i in (rng.choice(items) for _ in range(options.catalogue_updates)))
            await harness.produce(broker.bootstrap, ITEMS_TOPIC, updates)
        return fault

    raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")


def render(rows: list[Row]) -> str:
    head = ("scenario", "broker", "offered", "users", "lost", "double", "repeated", "dlq exp/got", "crashes",
            "recovery s", "peak RSS MB", "ok")
    table = [head]
    for r in rows:
        d = r.as_dict()
        table.append((r.scenario, r.broker, f"{r.offered:,}", f"{r.users:,}", str(r.lists_lost), str(r.double_applied),
                      str(r.repeated_lists), f"{d['dead_letters_expected']:,}/{d['dead_letters_got']:,}",
                      str(r.crashes), ",".join(f"{s:.0f}" for s in r.recovery_s) or "-", f"{r.peak_rss_mb:.0f}",
                      "yes" if r.ok else "NO"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    for r in rows:
        if r.notes.strip():
            lines.append(f"{r.scenario}: {r.notes.strip()}")
        mismatched = {k: v for k, v in r.as_dict()["dead_letters_by_reason"].items() if v[0] != v[1]}
        if mismatched:
            lines.append(f"{r.scenario}: dead letters expected/got differ: {mismatched}")
    return "\n".join(lines)
