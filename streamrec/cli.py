"""The ``streamrec`` command line: broker, train, eval, worker, replay, lag, demo, bench."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

# rich_markup_mode=None: plain help, without the "<bool>" metavar rich panels put on flags
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Streaming real-time recommendations for online shops (Kafka in, lists out).")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks: end-to-end throughput and latency.")
app.add_typer(bench_app, name="bench")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def broker(port: int = typer.Option(9092, help="Loopback port to listen on."),
           host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default).")):
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) in the foreground."""
    from stream.broker import EmbeddedBroker

    import signal

    def stop_on_sigterm(*_):  # `kill` must not orphan the broker process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    b = EmbeddedBroker(port=port, host=host).start()
    typer.echo(f"broker listening on {b.bootstrap} (memory storage; Ctrl-C to stop)")
    try:
        b.wait()
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


@app.command()
def kafka(nodes: int = typer.Option(1, help="1 node, or 3 (replication 3, min.insync.replicas 2)."),
          port: Optional[int] = typer.Option(None, help="Loopback port of the first node (default: a free one)."),
          dir: Path = typer.Option(Path(".streamrec/kafka"), "--dir",
                                   help="Cluster directory: log dirs, config, ports; reused when it exists.")):
    """Run Apache Kafka (KRaft) on loopback in the foreground, fetched with Maven on first use."""
    import signal

    from stream.kafka import EXIT_MISSING_TOOL, KAFKA_VERSION, KafkaCluster, KafkaStartError, KafkaUnavailable

    if nodes not in (1, 3):
        _fail("--nodes must be 1 or 3")

    def stop_on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        cluster = KafkaCluster(nodes=nodes, port=port, data_dir=dir)
        cluster.start()
    except KafkaUnavailable as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(EXIT_MISSING_TOOL)
    except (KafkaStartError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"Apache Kafka {KAFKA_VERSION}, {nodes} node(s): bootstrap {cluster.bootstrap} "
               f"(data in {dir}; Ctrl-C to stop)")
    code = 0
    try:
        code = cluster.wait()
        typer.secho(f"a Kafka node exited with code {code}; stopping the others (logs in {dir})", fg="red", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    if code:
        raise typer.Exit(1)


@app.command()
def train(data: Path = typer.Option(..., exists=True, dir_okay=False, help="Event log or sequence file."),
          out: Path = typer.Option(..., help="Model directory to write (replaced atomically)."),
          epochs: Optional[int] = typer.Option(
              None, help="Epochs; the learning rate decays to 0 over them (default: the recipe's 13)."),
          max_minutes: Optional[float] = typer.Option(
              None, help="Wall-clock cap on training; the learning rate decays to 0 over it (default: the recipe's "
                         "18 minutes)."),
          dim: Optional[int] = typer.Option(
              None, help="Embedding width, a multiple of the recipe's head count (default: 256). Smaller serves faster; "
                         "64 served ~1.45x the events/s end to end, at ~18% lower NDCG@10 on Beauty."),
          positions: Optional[str] = typer.Option(
              None, help="rope (the default: relative positions, served one new event at a time) or learned "
                         "(positions counted back from the newest event, served by full recompute)."),
          seed: int = typer.Option(0, help="Random seed (weights, batches, validation sample)."),
          attributes: Optional[Path] = typer.Option(None, exists=True, help="item -> attributes JSON."),
          progress: bool = typer.Option(True, help="Show a progress bar."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each epoch and the data read.")):
    """Train the sequence encoder and write a versioned model directory with its FAISS index."""
    _logging(verbose)
    from dataclasses import replace

    from model.data import load_attributes
    from model.train import TrainConfig
    from model.train import train as train_model
    from stream.recommender import write_model_dir

    cfg = TrainConfig(seed=seed)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if max_minutes is not None:
        cfg = replace(cfg, max_minutes=max_minutes)
    try:
        if dim is not None:
            cfg = replace(cfg, encoder=replace(cfg.encoder, dim=dim))
        if positions is not None:
            cfg = replace(cfg, encoder=replace(cfg.encoder, positions=positions))
        artifact = write_model_dir(out, lambda tmp: train_model(
            data, cfg, out_dir=tmp, progress=progress,
            attributes=load_attributes(attributes) if attributes else None), users_for_tuning=data)
    except ValueError as exc:
        _fail(str(exc))
    m = artifact.metadata.get("metrics", {})
    typer.echo(f"model {artifact.version} -> {out}")
    typer.echo(json.dumps(m, indent=None, default=float))


UNKNOWN_TARGETS_WARN = 0.5   # eval warns when more than this share of the targets is new to the model


@app.command("eval")
def evaluate(model: Path = typer.Option(..., exists=True, file_okay=False,
                                        help="Model directory, or a folder of them (the newest is evaluated)."),
             data: Path = typer.Option(..., exists=True, dir_okay=False, help="Event log or sequence file."),
             split: str = typer.Option("test", help="test (last item) or valid (second-last)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Full-ranking leave-one-out HR@10/NDCG@10 (+@20), history masked."""
    from model.artifact import ModelArtifact
    from model.data import load_log
    from model.evaluate import evaluate as run_eval
    from stream.recommender import resolve_model_dir

    t0 = time.perf_counter()
    try:
        model = resolve_model_dir(model)   # a folder of versions, as the worker takes it
        artifact = ModelArtifact.load(model)
        metrics = run_eval(artifact, load_log(data), split=split)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if metrics["users"] and metrics["unknown_targets"] > UNKNOWN_TARGETS_WARN * metrics["users"]:
        typer.secho(f"warning: {metrics['unknown_targets']:,} of {metrics['users']:,} target items are unknown to "
                    f"the model (counted as misses): is {data.name} from the shop the model was trained on?",
                    fg="yellow", err=True)
    result = {"model": str(model), "model_version": artifact.version, "data": str(data),
              "split": split, **{k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()},
              "seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")


@app.command()
def worker(broker: str = typer.Option(..., help="Kafka bootstrap HOST:PORT."),
           model: Optional[Path] = typer.Option(
               None, exists=True, help="Model directory, or a folder of them (newest wins); or --variant."),
           group: str = typer.Option("streamrec", help="Consumer group id."),
           partitions: int = typer.Option(4, help="Partitions of the topics the worker creates."),
           max_batch: Optional[int] = typer.Option(
               None, help="Events per micro-batch at most (default: 4,096; batches are as large as the "
                          "load makes them, so this bounds only a backlog's)."),
           batch_wait: float = typer.Option(0.02, help="Seconds a partial batch waits for more events while the previous one is being recommended (an idle worker takes a batch at once)."),
           store: str = typer.Option("auto", help="State store: rocksdb, memory or auto."),
           data_dir: Path = typer.Option(Path(".streamrec"), help="Local state (RocksDB) directory."),
           k: int = typer.Option(20, help="List length."),
           metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port."),
           metrics_host: str = typer.Option("127.0.0.1", help="Metrics bind address (0.0.0.0 in a container)."),
           reload_interval: float = typer.Option(5.0, help="Seconds between checks for a new model version."),
           guarantee: str = typer.Option(
               "at_least_once", help="at_least_once (any broker) or exactly_once (transactions: Apache Kafka)."),
           commit_interval: float = typer.Option(
               0.1, help="Seconds between offset commits (exactly_once: between transaction commits)."),
           cache_mb: int = typer.Option(1024, help="Encoder key/value cache for active users, MiB (~100 KiB per "
                                                   "user at 256 wide), held from start on the CPU; 0: recompute "
                                                   "every user in full."),
           lanes: Optional[int] = typer.Option(
               None, help="Recommend threads, each on its own users and share of the cache (default: 2, or 1 "
                          "on one core)."),
           variant: Optional[list[str]] = typer.Option(
               None, help="A/B: NAME=MODEL_DIR[:WEIGHT], once per variant; each user always gets the same one."),
           experiment: str = typer.Option("streamrec", help="A/B: name of the experiment (part of the user's hash)."),
           state_ttl: Optional[float] = typer.Option(
               None, help="Erase users inactive for this many seconds (event time), in the background, with "
                          "tombstones (default: keep everyone)."),
           loglevel: str = typer.Option("info", help="Log level: debug, info, warning, error.")):
    """Run the Faust worker: shop-events in, recommendations out."""
    from index.rerank import RerankConfig
    from stream.compat import TopicMismatch
    from stream.delivery import GUARANTEES
    from stream.state import STORES
    from stream.worker import BrokerUnavailable, GuaranteeUnsupported, WorkerSettings, run_worker

    if store not in STORES:
        _fail(f"--store must be one of: {', '.join(STORES)}")
    if guarantee not in GUARANTEES:
        _fail(f"--guarantee must be one of: {', '.join(GUARANTEES)}")
    from stream.variants import parse_variant

    try:
        variants = [parse_variant(v) for v in variant or []]
    except ValueError as exc:
        _fail(str(exc))
    if (model is None) == (not variants):
        _fail("give --model, or --variant (once per variant), not both")
    try:
        settings = WorkerSettings(broker=broker, model=model, group=group, partitions=partitions,
                                  batch_wait_s=batch_wait, store=store,
                                  data_dir=data_dir, metrics_port=metrics_port, metrics_host=metrics_host,
                                  reload_interval_s=reload_interval, rerank=RerankConfig(k=k),
                                  guarantee=guarantee, commit_interval_s=commit_interval, cache_mb=cache_mb,
                                  state_ttl_s=state_ttl, variants=variants, experiment=experiment,
                                  **{name: value for name, value in (("lanes", lanes), ("max_batch", max_batch))
                                     if value is not None})   # None: the worker's own default
    except ValueError as exc:   # --lanes or --max-batch below 1
        _fail(str(exc))
    sys.argv = sys.argv[:1]  # Faust's Worker parses argv itself
    try:
        run_worker(settings, loglevel=loglevel)
    except (FileNotFoundError, BrokerUnavailable, GuaranteeUnsupported, TopicMismatch, MemoryError) as exc:
        _fail(str(exc))


@app.command()
def replay(path: Path = typer.Argument(..., exists=True, dir_okay=False,
                                       help="Event log: JSON lines, CSV, Parquet, msgpack or sequence-per-line."),
           broker: str = typer.Option(..., help="Kafka bootstrap HOST:PORT."),
           topic: str = typer.Option("shop-events", help="Topic to produce to."),
           speed: Optional[float] = typer.Option(None, help="Keep original inter-arrival times, scaled by X."),
           rate: Optional[float] = typer.Option(None, help="Steady N events/s."),
           max_speed: bool = typer.Option(False, "--max", help="As fast as the broker takes (the default)."),
           from_ts: Optional[float] = typer.Option(None, "--from", help="Only events with ts >= this."),
           to_ts: Optional[float] = typer.Option(None, "--to", help="Only events with ts < this."),
           partitions: Optional[int] = typer.Option(None, help="Create the topic with this many partitions if missing."),
           evaluate: bool = typer.Option(False, "--evaluate", help="Prequential HR@10/NDCG@10 against the live lists."),
           progress: bool = typer.Option(True, help="Show a progress bar."),
           as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object.")):
    """Replay a logged event stream into Kafka in the contract's schema (per-user order kept)."""
    from stream.replay import replay as run_replay

    if (speed is not None) + (rate is not None) + max_speed > 1:
        _fail("choose one of --speed, --rate, --max")
    try:
        summary = asyncio.run(run_replay(path, broker, topic, speed=speed, rate=rate, max_speed=max_speed,
                                         from_ts=from_ts, to_ts=to_ts, evaluate=evaluate, progress=progress,
                                         partitions=partitions))
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), default=str))
    else:
        typer.echo(str(summary))


@app.command()
def forget(users: list[str] = typer.Argument(..., help="User ids to erase."),
           broker: str = typer.Option(..., help="Kafka bootstrap HOST:PORT."),
           topic: str = typer.Option("shop-events", help="The worker's input topic.")):
    """Erase users (right to erasure): the worker deletes their state (a changelog tombstone),
    withdraws their list (a tombstone on recommendations), and later events start afresh."""
    import uuid

    from stream.events import delete_user_event, encode_event
    from streamrec.harness import produce

    records = [(u.encode(), encode_event(delete_user_event(u, f"forget-{uuid.uuid4().hex}"))) for u in users]
    try:
        sent = asyncio.run(produce(broker, topic, records, acks="all"))
    except Exception as exc:  # unreachable broker, missing topic
        _fail(f"could not send to {topic} at {broker}: {exc!r}")
    typer.echo(f"sent {sent} delete_user event(s) to {topic}")


@app.command()
def lag(broker: str = typer.Option(..., help="Kafka bootstrap HOST:PORT."),
        group: str = typer.Option("streamrec", help="Consumer group id."),
        topic: Optional[list[str]] = typer.Option(None, help="Topics (default: those the group commits)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        watch: bool = typer.Option(False, "--watch", help="Refresh a live table until Ctrl-C."),
        interval: float = typer.Option(5.0, help="Seconds between refreshes with --watch."),
        window: int = typer.Option(10, help="Snapshots in the status window (Burrow-style)."),
        samples: int = typer.Option(1, help="Without --watch: snapshots taken for the status (interval apart).")):
    """Consumer lag per partition: committed, log end, lag, lag seconds, status."""
    from stream.lag import LagEvaluator, lag_snapshot, render_table, run_watch

    if watch:
        run_watch(broker, group, interval, topics=topic, window=window)
        return

    async def snapshots():
        evaluator, snap = LagEvaluator(max(2, min(window, samples))), None
        for n in range(max(1, samples)):
            if n:
                await asyncio.sleep(interval)
            snap = evaluator.update(await lag_snapshot(broker, group, topic))
        return snap

    snap = asyncio.run(snapshots())
    if as_json:
        typer.echo(snap.to_json())
    else:
        from rich.console import Console

        Console().print(render_table(snap))


@app.command()
def generate(out: Path = typer.Option(..., help="Events file to write (JSON lines, contract schema)."),
             users: int = typer.Option(2000, help="Users of the synthetic shop."),
             items: int = typer.Option(600, help="Items of its catalogue."),
             seed: int = typer.Option(0, help="Random seed (the same seed writes the same log)."),
             attributes: Optional[Path] = typer.Option(None, help="Also write item -> attributes JSON here.")):
    """Write synthetic shop traffic (categories, power-law popularity, sessions, funnel) as a log."""
    from streamrec.synthetic import ShopSpec, catalogue
    from streamrec.synthetic import generate as synthesize

    spec = ShopSpec(users=users, items=items, seed=seed)
    events = synthesize(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for e in events:
            f.write(json.dumps({"v": 1, **e}) + "\n")
    if attributes:
        attributes.write_text(json.dumps(catalogue(spec)))
    typer.echo(f"{len(events):,} events of {users:,} users over {items:,} items -> {out}")


@app.command()
def demo(data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                             help="Use this event log instead of synthetic traffic."),
         users: int = typer.Option(2000, help="Synthetic shop: users."),
         items: int = typer.Option(600, help="Synthetic shop: items."),
         train_minutes: float = typer.Option(1.5, help="Training time cap."),
         rate: float = typer.Option(2000.0, help="Events per second streamed to the worker."),
         seconds: float = typer.Option(30.0, help="How long to stream."),
         workdir: Optional[Path] = typer.Option(None, help="Keep models and logs here (default: a temp dir)."),
         seed: int = typer.Option(0, help="Random seed of the synthetic shop and the training.")):
    """Everything at once: broker, synthetic shop, training, worker, live view, summary."""
    from streamrec.demo import DemoOptions, run_demo

    run_demo(DemoOptions(data=data, users=users, items=items, train_minutes=train_minutes, rate=rate,
                         seconds=seconds, workdir=workdir, seed=seed))


@bench_app.command("e2e")
def bench_e2e(events: int = typer.Option(20000, help="Events per phase."),
              workload: str = typer.Option(
                  "shop", help="shop: the demo's (600 items, short histories); scale: 50k users with full "
                               "histories, 60k items, Zipf activity."),
              users: int = typer.Option(2000, help="Synthetic shop: users."),
              items: int = typer.Option(600, help="Synthetic shop: items."),
              rates: str = typer.Option("max", help="Offered rates, one phase each: 'max' or events/s, "
                                                    "comma separated (e.g. max,500,2000)."),
              broker_kind: str = typer.Option("tansu", help="Broker to start: tansu (embedded) or kafka."),
              guarantee: str = typer.Option("at_least_once", help="The worker's --guarantee."),
              partitions: int = typer.Option(4, help="Partitions of the topics."),
              max_batch: Optional[int] = typer.Option(None, help="The worker's --max-batch (default: its own)."),
              workers: int = typer.Option(1, help="Worker processes in the consumer group."),
              model: Optional[Path] = typer.Option(None, help="Model dir (default: train a small one)."),
              cache_mb: Optional[int] = typer.Option(None, help="The worker's --cache-mb (default: its own)."),
              lanes: Optional[int] = typer.Option(None, help="The worker's --lanes (default: its own)."),
              store: Optional[str] = typer.Option(None, help="The worker's --store: rocksdb, memory or auto "
                                                             "(default: its own)."),
              worker_cpus: Optional[str] = typer.Option(
                  None, help="Pin each worker (and baseline) to these CPUs, as taskset lists them (0,1 or 0-3): "
                             "one worker on 2 cores of a larger machine, the broker and load on the rest."),
              broker_warmup: Optional[float] = typer.Option(
                  None, help="Seconds of traffic through each fresh broker before its run, on topics of its own, "
                             "so that Kafka's JVM has compiled its request paths (default: 30 on kafka, 0 on "
                             "tansu)."),
              compare: str = typer.Option("", help="Baselines run after the worker, same workload: 'naive' "
                                                   "(a per-event Faust agent), 'commit:<sha>' (an earlier worker)."),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """End to end through a real broker: events/s and p50/p99 latency (produced_ts - event ts)."""
    from stream.state import STORES
    from streamrec.bench import BROKER_KINDS, WORKLOADS, E2EOptions, render, run_e2e
    from streamrec.harness import parse_cpus

    if workload not in WORKLOADS:
        _fail(f"--workload must be one of: {', '.join(WORKLOADS)}")
    if broker_kind not in BROKER_KINDS:
        _fail(f"--broker-kind must be one of: {', '.join(BROKER_KINDS)}")
    if store is not None and store not in STORES:
        _fail(f"--store must be one of: {', '.join(STORES)}")
    try:
        parsed = [None if r.strip() == "max" else float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        _fail(f"--rates takes 'max' or numbers, comma separated; got {rates!r}")
    if not parsed or any(r is not None and r <= 0 for r in parsed):
        _fail("--rates needs at least one phase, each 'max' or a positive rate")
    if broker_warmup is not None and broker_warmup < 0:
        _fail("--broker-warmup takes seconds, 0 or more")
    try:
        cpus = parse_cpus(worker_cpus) if worker_cpus is not None else None
    except ValueError as e:
        _fail(f"--worker-cpus: {e}")
    result = run_e2e(E2EOptions(events=events, users=users, items=items, workload=workload, rates=parsed,
                                partitions=partitions,
                                max_batch=max_batch, workers=workers, model=model, broker_kind=broker_kind,
                                guarantee=guarantee, compare=[c.strip() for c in compare.split(",") if c.strip()],
                                cache_mb=cache_mb, lanes=lanes, store=store, worker_cpus=cpus,
                                broker_warmup_s=broker_warmup))
    typer.echo(json.dumps(result) if as_json else render(result))


@bench_app.command("chaos")
def bench_chaos(broker_kind: str = typer.Option("tansu", help="tansu (embedded) or kafka."),
                scenarios: str = typer.Option(",".join(("kill", "rebalance", "broker-restart", "node-kill",
                                                        "malformed", "model-corrupt", "catalogue-flood")),
                                              help="Comma separated, run one at a time on a fresh broker."),
                events: int = typer.Option(20000, help="Good events per scenario."),
                rate: float = typer.Option(1500.0, help="Events/s offered."),
                kills: int = typer.Option(10, help="kill -9s in the 'kill' scenario."),
                malformed: Optional[int] = typer.Option(None, help="Malformed messages (default: as many as good)."),
                catalogue_updates: int = typer.Option(100_000, help="shop-items updates in 'catalogue-flood'."),
                model: Optional[Path] = typer.Option(None, help="Model dir (default: train one on the events)."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Faults while traffic flows, then every acknowledged event checked against the outputs."""
    from streamrec.chaos import SCENARIOS, ChaosOptions, render, run_chaos

    chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        _fail(f"--scenarios takes {', '.join(SCENARIOS)}; got {', '.join(unknown) or 'none'}")
    from streamrec.bench import BROKER_KINDS

    if broker_kind not in BROKER_KINDS:
        _fail(f"--broker-kind must be one of {', '.join(BROKER_KINDS)}")
    rows = run_chaos(ChaosOptions(broker_kind=broker_kind, scenarios=chosen, events=events, rate=rate, kills=kills,
                                  malformed=malformed, catalogue_updates=catalogue_updates, model=model))
    typer.echo(json.dumps([r.as_dict() for r in rows]) if as_json else render(rows))
    if not all(r.ok or r.notes.startswith("skipped") for r in rows):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
