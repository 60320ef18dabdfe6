"""A short smoke test on real shop data (../shared/data, when it is there): one epoch on a slice
of Amazon Beauty must rank the held-out item far better than the most popular items do."""

from __future__ import annotations

import dataclasses

import pytest

from model.data import load_log
from model.evaluate import evaluate, evaluate_popularity
from model.train import TrainConfig, train

USERS = 4000


@pytest.mark.slow
def test_one_epoch_on_a_slice_of_beauty_beats_popularity_clearly(shared_data, tmp_path):
    log = load_log(shared_data / "Beauty.txt")
    part = dict(list(log.items())[:USERS])
    cfg = TrainConfig(epochs=1, val_users=1000, max_minutes=3)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, dim=64))
    artifact = train(part, cfg, out_dir=tmp_path / "model", progress=False)
    model, popular = evaluate(artifact, part, "test"), evaluate_popularity(part, "test")
    assert model["users"] == popular["users"] == len(part)
    assert model["NDCG@10"] > 3 * popular["NDCG@10"] and model["HR@10"] > 2 * popular["HR@10"], (model, popular)
