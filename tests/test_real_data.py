"""A smoke test on real shop data (../shared/data, when it is there): four epochs on Amazon Beauty
must rank the held-out item far better than the most popular items do.

Measured (2 cores): NDCG@10 .0391 vs popularity .0055, HR@10 .0672 vs .0115, in ~110 s. A slice of
the log is not enough: on its first 4,000 users even 10 epochs stay below popularity."""

from __future__ import annotations

import pytest

from model.data import load_log
from model.evaluate import evaluate, evaluate_popularity
from model.train import TrainConfig, train


@pytest.mark.slow
def test_a_short_training_on_beauty_beats_popularity_clearly(shared_data, tmp_path):
    log = load_log(shared_data / "Beauty.txt")
    cfg = TrainConfig(epochs=4, val_users=1000, max_minutes=5)
    artifact = train(log, cfg, out_dir=tmp_path / "model", progress=False)
    model, popular = evaluate(artifact, log, "test"), evaluate_popularity(log, "test")
    assert model["users"] == popular["users"] == len(log)
    assert model["NDCG@10"] > 4 * popular["NDCG@10"] and model["HR@10"] > 3 * popular["HR@10"], (model, popular)
