"""Shared fixtures: a fresh embedded broker per test module (Tansu memory storage never frees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=str(log_path)) as b:
        yield b


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
