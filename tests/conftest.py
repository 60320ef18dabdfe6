"""Shared fixtures: a fresh broker per test module, the embedded one (Tansu) and Apache Kafka.

Every test that goes through a broker takes the ``broker`` fixture and so runs on both kinds
(``STREAMREC_TEST_BROKERS=tansu`` or ``=kafka`` narrows it for a quick local run). Each module
gets a fresh broker: Tansu's memory storage never frees, and the modules reuse topic names and
the worker's group id. Without Java or Maven the Kafka runs are skipped, except under CI,
where a Kafka that cannot start is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BROKER_KINDS = [k for k in os.environ.get("STREAMREC_TEST_BROKERS", "tansu,kafka").split(",") if k]


def kafka_unavailable(exc: Exception):
    """Skip a test that needs Apache Kafka here -- but under CI, fail it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"Apache Kafka cannot run under CI: {exc}")
    pytest.skip(f"Apache Kafka unavailable: {exc}")


def start_broker(kind: str, workdir: Path, nodes: int = 1):
    """A started broker of ``kind`` (skips, or fails under CI, when Kafka cannot run here)."""
    if kind == "tansu":
        return EmbeddedBroker(log_path=str(workdir / "tansu.log")).start()
    from stream.kafka import KafkaCluster, KafkaUnavailable

    try:
        return KafkaCluster(nodes=nodes, data_dir=workdir / "kafka").start()
    except KafkaUnavailable as exc:
        kafka_unavailable(exc)


@pytest.fixture(scope="session")
def kafka_runtime() -> Path:
    """Java 17+ and the Kafka jars (fetched once): the folder of jars."""
    from stream.kafka import KafkaUnavailable, check_java, kafka_libs

    try:
        check_java()
        return kafka_libs()
    except KafkaUnavailable as exc:
        kafka_unavailable(exc)


@pytest.fixture(scope="module", params=BROKER_KINDS)
def broker(request, tmp_path_factory):
    b = start_broker(request.param, tmp_path_factory.mktemp(f"broker-{request.param}"))
    yield b
    b.cleanup()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_shop():
    """A small synthetic shop log (contract events) and its training log."""
    from model.data import log_from_events
    from streamrec.synthetic import ShopSpec, generate

    events = generate(ShopSpec(users=300, items=120, categories=6, seed=7))
    return events, log_from_events(events)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_shop) -> Path:
    """A model directory (weights, vocab, FAISS index) trained for a few epochs on ``tiny_shop``."""
    from model.train import TrainConfig, train
    from stream.recommender import write_model_dir

    out = tmp_path_factory.mktemp("models") / "tiny"
    write_model_dir(out, lambda tmp: train(tiny_shop[1], TrainConfig(epochs=2, seed=0), out_dir=tmp,
                                           progress=False))
    return out


@pytest.fixture
def kafka_cluster(tmp_path):
    """Start Apache Kafka clusters of 1 or 3 nodes of a test's own (stopped afterwards)."""
    started = []

    def start(nodes: int = 1):
        cluster = start_broker("kafka", tmp_path / f"kafka-{len(started)}", nodes=nodes)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.cleanup()


@pytest.fixture(params=BROKER_KINDS)
def fresh_broker(request, tmp_path_factory):
    """A broker of the test's own, on both kinds (for tests that read whole topics)."""
    b = start_broker(request.param, tmp_path_factory.mktemp(f"fresh-{request.param}"))
    yield b
    b.cleanup()
