"""ItemIndex, Catalogue, Trending and AttributeEmbedder: the pieces under the reranker."""

from __future__ import annotations

import json
import warnings

import faiss
import numpy as np
import pytest
import torch

from index import item_index as item_index_module
from index.catalogue import Catalogue
from index.cold_start import AttributeEmbedder
from index.item_index import IndexInfo, ItemIndex, recall_at_k
from index.trending import EVENT_WEIGHTS, Trending, event_weights

DIM = 16


def clustered(n: int, dim: int = DIM, clusters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-mixture vectors with varying norms, and each vector's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    vectors = centres[labels] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors *= rng.uniform(0.5, 1.5, size=(n, 1)).astype(np.float32)
    return vectors.astype(np.float32), labels


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


# --------------------------------------------------------------------------- ItemIndex
def test_flat_search_matches_brute_force():
    vectors, _ = clustered(500)
    queries, _ = clustered(8, seed=1)
    index = ItemIndex.build(vectors, kind="flat")
    scores, rows = index.search(queries, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (8, 10)
    np.testing.assert_array_equal(rows, exact_top(vectors, queries, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, rows, 1), rtol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_auto_uses_flat_below_threshold_and_ivf_above(monkeypatch):
    vectors, _ = clustered(400)
    assert ItemIndex.build(vectors, use_gpu=False).info.kind == "flat"
    monkeypatch.setattr(item_index_module, "EXACT_MAX_ITEMS", 100)
    assert ItemIndex.build(vectors, use_gpu=False).info.kind == "ivf"
    # with a GPU for exact search the threshold is GPU_EXACT_MAX_ITEMS (on a CPU-only machine
    # use_gpu=True only picks the kind: the index stays on the CPU, with a warning)
    assert ItemIndex.build(vectors, use_gpu=True).info.kind == "flat"
    monkeypatch.setattr(item_index_module, "GPU_EXACT_MAX_ITEMS", 200)
    assert ItemIndex.build(vectors, use_gpu=True).info.kind == "ivf"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_exact_search_agrees_with_faiss(monkeypatch, tmp_path, device):
    """The GPU path without faiss-gpu (a matrix product and top-k in torch) finds what faiss's
    flat index finds, in chunks of queries, pads past the catalogue, adds rows and saves."""
    vectors, _ = clustered(3000)
    queries = item_index_module.tuning_queries(vectors, 300, seed=3)
    reference = ItemIndex(faiss.IndexFlatIP(vectors.shape[1]), IndexInfo("flat", vectors.shape[1]))
    reference.add(vectors)
    assert reference.backend == "faiss-cpu"
    index = ItemIndex.build(vectors, kind="flat", use_gpu=False)
    assert index.backend == "torch-cpu"   # exact search on the CPU runs through torch
    index.to_torch(device)
    assert index.backend == f"torch-{device}" and len(index) == 3000
    monkeypatch.setattr(item_index_module, "TORCH_SCORE_CHUNK", 3000 * 64)   # 64 queries a chunk
    want_scores, want_rows = reference.search(queries, 100)
    scores, rows = index.search(queries, 100)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    assert recall_at_k(rows, want_rows) >= 0.999   # only near-ties may swap at the boundary
    new = vectors[:5] * 3.0   # longer copies of five items: the best match for their own queries
    np.testing.assert_array_equal(index.add(new), np.arange(3000, 3005))
    np.testing.assert_array_equal(index.search(new, 1)[1][:, 0], np.arange(3000, 3005))
    small = ItemIndex.build(vectors[:3], kind="flat", use_gpu=False)
    small.to_torch(device)
    scores, rows = small.search(queries[:2], 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and (rows[:, :3] >= 0).all()
    index.save(tmp_path / "items.faiss")
    loaded = ItemIndex.load(tmp_path / "items.faiss", use_gpu=False)
    assert loaded.backend == "torch-cpu" and len(loaded) == 3005
    np.testing.assert_array_equal(loaded.search(new, 1)[1][:, 0], np.arange(3000, 3005))
    with pytest.raises(ValueError, match="only a flat index"):
        ItemIndex.build(vectors, kind="hnsw", use_gpu=False).to_torch(device)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_kinds_reach_high_recall(kind):
    vectors, _ = clustered(3000)
    queries = item_index_module.tuning_queries(vectors, 100, seed=7)
    index = ItemIndex.build(vectors, kind=kind)
    assert index.info.kind == kind and len(index) == 3000
    scores, rows = index.search(queries, 100)
    assert recall_at_k(rows, exact_top(vectors, queries, 100)) >= 0.95
    true_scores = np.take_along_axis(queries @ vectors.T, rows, 1)  # scores are inner products
    np.testing.assert_allclose(scores, true_scores, rtol=1e-3, atol=1e-3)
    if kind == "ivf":
        assert 1 <= index.info.nprobe <= index.info.nlist
        assert index.info.nlist == item_index_module.ivf_nlist(3000)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_querys_length_changes_its_scores_but_not_its_candidates(kind):
    """Inner-product order does not depend on a query's length, and neither do the candidates
    an approximate index finds: each query is scaled onto the items' sphere before the probe.
    Scores scale with the query; a zero query scores ~0 everywhere (float32 distances)."""
    vectors, _ = clustered(3000)
    queries = item_index_module.tuning_queries(vectors, 50, seed=3)
    index = ItemIndex.build(vectors, kind=kind)
    scores, rows = index.search(queries, 50)
    for factor in (1e-3, 40.0):
        longer_scores, longer_rows = index.search(queries * factor, 50)
        np.testing.assert_array_equal(longer_rows, rows)
        np.testing.assert_allclose(longer_scores, scores * factor, rtol=1e-4, atol=1e-6 * factor)
    zero_scores, zero_rows = index.search(np.zeros((1, vectors.shape[1]), np.float32), 5)
    assert (zero_rows >= 0).all()
    np.testing.assert_allclose(zero_scores, 0, atol=1e-4)
    if kind == "ivf":   # one probed list of a few items: rows it cannot fill score -inf, without overflow
        index.set_nprobe(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            short_scores, short_rows = index.search(queries * 40.0, 50)
        assert (short_rows < 0).any() and np.isneginf(short_scores[short_rows < 0]).all()


def test_ivf_tuned_on_given_user_vectors_keeps_recall_for_them():
    """Encoder outputs need not look like items; tuning on a sample of them must cover them."""
    vectors, _ = clustered(3000)
    rng = np.random.default_rng(11)
    away = -vectors.mean(axis=0)  # users pointing away from the item cloud, as trained ones can
    users = (away + 2.0 * rng.standard_normal((400, DIM))).astype(np.float32)
    index = ItemIndex.build(vectors, kind="ivf", tuning_queries=users[:200])
    _, rows = index.search(users[200:], 100)
    assert recall_at_k(rows, exact_top(vectors, users[200:], 100)) >= 0.97
    with pytest.raises(ValueError, match="tuning_queries"):
        ItemIndex.build(vectors, kind="ivf", tuning_queries=users[:, :4])


def test_fewer_items_than_k_pads_with_minus_one():
    vectors, _ = clustered(5)
    scores, rows = ItemIndex.build(vectors).search(vectors[:2], 8)
    assert (rows[:, :5] >= 0).all() and (rows[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_appends_rows_that_search_finds(kind):
    vectors, _ = clustered(1000)
    index = ItemIndex.build(vectors, kind=kind)
    new = 10.0 * np.eye(3, DIM, dtype=np.float32)  # long vectors: top-1 for their own direction
    rows = index.add(new)
    np.testing.assert_array_equal(rows, [1000, 1001, 1002])
    assert len(index) == 1003
    _, found = index.search(new, 1)
    np.testing.assert_array_equal(found[:, 0], rows)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    vectors, _ = clustered(1000)
    index = ItemIndex.build(vectors, kind=kind)
    index.add(vectors[:3] * 2)
    path = tmp_path / "items.faiss"
    index.save(path)
    loaded = ItemIndex.load(path)
    assert loaded.info == index.info and len(loaded) == len(index)
    queries = vectors[:20] + 0.1
    for before, after in zip(index.search(queries, 50), loaded.search(queries, 50)):
        np.testing.assert_array_equal(before, after)
    if kind != "flat":  # the sidecar carries settings the FAISS file alone does not
        (tmp_path / "items.faiss.json").unlink()
        with pytest.raises(FileNotFoundError, match="items.faiss.json"):
            ItemIndex.load(path)


def test_wrong_input_is_rejected_clearly():
    vectors, _ = clustered(100)
    index = ItemIndex.build(vectors)
    with pytest.raises(ValueError, match="dim 8"):
        index.search(np.zeros((2, 8), dtype=np.float32), 5)
    with pytest.raises(TypeError, match="float"):
        index.search(np.zeros((2, DIM), dtype=np.int64), 5)
    with pytest.raises(ValueError, match="2-D"):
        index.search(np.zeros(DIM, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="dim"):
        index.add(np.zeros((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="kind"):
        ItemIndex.build(vectors, kind="lsh")
    scores, _ = index.search(np.zeros((1, DIM), dtype=np.float64), 3)  # float64 is converted
    assert scores.dtype == np.float32


# --------------------------------------------------------------------------- Catalogue
def test_catalogue_availability_rules():
    catalogue = Catalogue()
    catalogue.update({"item_id": "a", "in_stock": True, "attributes": ["brand1"]})
    catalogue.update({"item_id": "b", "in_stock": False, "attributes": []})
    catalogue.update({"item_id": "c", "in_stock": True, "attributes": []})
    catalogue.remove("c")
    mask = catalogue.available(["a", "b", "c", "never-heard-of"])
    np.testing.assert_array_equal(mask, [True, False, False, True])
    catalogue.update({"item_id": "b", "in_stock": True, "attributes": []})
    assert catalogue.available(["b"])[0]


def test_catalogue_attributes_boost_and_version():
    catalogue = Catalogue()
    version = catalogue.version
    catalogue.update({"item_id": "a", "in_stock": True, "attributes": ["x", "y", "x"], "boost": 0.5})
    assert catalogue.version > version
    assert catalogue.attributes("a") == ("x", "y")
    assert catalogue.boost("a") == 0.5 and catalogue.boost("unknown") == 0.0
    assert catalogue.attributes("unknown") == ()
    catalogue.update({"item_id": "a", "in_stock": True, "attributes": ["x"]})
    assert catalogue.boost("a") == 0.0 and catalogue.attribute_share("y") == 0.0


def test_catalogue_seeded_from_item2attributes(tmp_path):
    path = tmp_path / "Shop_item2attributes.json"
    path.write_text(json.dumps({"1": [3, 4], "2": [4]}))
    catalogue = Catalogue.from_item2attributes(path)
    assert catalogue.attributes("1") == ("3", "4") and len(catalogue) == 2
    assert catalogue.attribute_share("4") == 1.0
    assert catalogue.available(["1", "2"]).all()


# ---------------------------------------------------------------------------- Trending
def test_trending_halves_every_half_life():
    trending = Trending(half_life_s=100.0)
    trending.observe(["a"], ts=0.0)
    assert trending.score("a", now=0.0) == pytest.approx(1.0)
    assert trending.score("a", now=100.0) == pytest.approx(0.5)
    assert trending.score("a", now=300.0) == pytest.approx(0.125)


def test_trending_prefers_recent_and_heavy_events():
    trending = Trending(half_life_s=100.0)
    trending.observe(["old", "old", "old"], ts=[0.0, 0.0, 0.0])  # 3 at t=0 -> 0.75 at t=200
    trending.observe(["new"], ts=200.0)  # 1 at t=200
    trending.observe(["bought"], ts=200.0, weights=event_weights(["purchase"]))
    top = trending.top(3)
    assert [item for item, _ in top] == ["bought", "new", "old"]
    assert top[0][1] == pytest.approx(EVENT_WEIGHTS["purchase"])
    assert top[2][1] == pytest.approx(0.75)


def test_event_weights_favour_purchases_and_default_to_one():
    np.testing.assert_array_equal(event_weights(["view", "purchase", None, "bogus"]),
                                  [1.0, EVENT_WEIGHTS["purchase"], 1.0, 1.0])
    assert EVENT_WEIGHTS["purchase"] > EVENT_WEIGHTS["add_to_cart"] > EVENT_WEIGHTS["view"]


def test_trending_exclude_availability_and_batching():
    trending = Trending(half_life_s=10.0)
    trending.observe(np.array(["a", "b", "a", "c", "a", "b"]), ts=np.arange(6.0))
    assert [item for item, _ in trending.top(2)] == ["a", "b"]
    assert [item for item, _ in trending.top(5, exclude={"a"})] == ["b", "c"]
    catalogue = Catalogue()
    catalogue.remove("b")
    assert [item for item, _ in trending.top(5, available=catalogue)] == ["a", "c"]
    assert Trending().top(5) == []


def test_trending_survives_long_time_spans():
    trending = Trending(half_life_s=1.0)
    trending.observe(["a"], ts=0.0)
    trending.observe(["b", "b"], ts=5000.0)  # 5000 half-lives later: forces a rebase
    trending.observe(["c"], ts=5000.0)
    assert [item for item, _ in trending.top(3)] == ["b", "c"]  # "a" decayed to 0
    assert trending.score("b") == pytest.approx(2.0)


# --------------------------------------------------------------------------- Cold start
def cluster_catalogue(n: int = 600, clusters: int = 12):
    """Items whose brand (attribute) is their cluster, plus one attribute everyone has."""
    vectors, labels = clustered(n, clusters=clusters, seed=3)
    items = [f"i{row}" for row in range(n)]
    attributes = {item: ["everything", f"brand{label}"] for item, label in zip(items, labels)}
    return vectors, labels, items, attributes


@pytest.mark.parametrize("method", ["mean", "ridge"])
def test_attribute_embedding_lands_in_its_cluster(method):
    vectors, labels, items, attributes = cluster_catalogue()
    embedder = AttributeEmbedder.fit(vectors, items, attributes, method=method)
    vector = embedder.embed(["brand4", "everything"])
    assert vector is not None and vector.shape == (DIM,)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = np.argsort(-(unit @ vector))[:20]
    assert (labels[nearest] == 4).mean() >= 0.9
    brand_norms = np.linalg.norm(vectors[labels == 4], axis=1)
    assert brand_norms.min() < np.linalg.norm(vector) < brand_norms.max()


def test_attribute_embedding_unknown_attributes_give_none():
    vectors, _, items, attributes = cluster_catalogue()
    embedder = AttributeEmbedder.fit(vectors, items, attributes)
    assert embedder.embed(["no-such-brand"]) is None
    assert embedder.embed([]) is None
    batch, known = embedder.embed_many([["brand1"], ["nope"]])
    np.testing.assert_array_equal(known, [True, False])
    assert not batch[1].any()


def test_cold_start_item_ranks_high_for_a_user_of_its_brand():
    vectors, labels, items, attributes = cluster_catalogue()
    embedder = AttributeEmbedder.fit(vectors, items, attributes)
    index = ItemIndex.build(vectors)
    new_row = index.add(embedder.embed(["brand7", "everything"])[None, :])[0]
    history = np.flatnonzero(labels == 7)[:5]
    user = vectors[history].mean(axis=0, keepdims=True)  # a user who buys brand7
    _, rows = index.search(user, 60)  # 10% of the catalogue; brand7 is 1/12 of it
    assert new_row in rows[0]
    other = vectors[np.flatnonzero(labels == 2)[:5]].mean(axis=0, keepdims=True)
    _, rows = index.search(other, 60)
    assert new_row not in rows[0]


def test_empty_catalogue_and_trending_are_truthy():
    """`catalogue or Catalogue()` must keep the caller's (still empty) live object."""
    assert Catalogue() and Trending()


def test_with_a_gpu_a_saved_approximate_index_is_served_exactly(tiny_model, tmp_path, monkeypatch):
    """On a GPU exact search is fast (TorchExactIP or faiss-gpu), so a worker that loads a model
    saved with an IVF index (trained on a CPU, say) searches exactly instead; without one it
    keeps the saved index."""
    import shutil

    from index.rerank import RerankConfig
    from model.artifact import ModelArtifact
    from stream import recommender

    model = shutil.copytree(tiny_model, tmp_path / "model")
    vectors = ModelArtifact.load(model, device="cpu").item_embeddings()
    ItemIndex.build(vectors, kind="ivf", use_gpu=False).save(model / recommender.INDEX_FILE)
    for gpu, kind in ((False, "ivf"), (True, "flat")):
        monkeypatch.setattr(recommender, "gpu_available", lambda: gpu)
        assert recommender.ServingModel.load(model, Catalogue(), RerankConfig()).index.info.kind == kind


def test_a_search_runs_to_its_end_while_another_thread_holds_the_gil():
    """faiss's Python module installs an interrupt callback that takes the GIL inside searches;
    placing an index removes it, so that the worker's lanes search while its event loop runs
    Python. Here this thread keeps the GIL (a switch interval of 1,000 s) and watches the
    result arrays: a search that needed the GIL would never fill them (with faiss's callback
    put back after the build, this test fails)."""
    import sys
    import threading
    import time

    faiss.PythonInterruptCallback.reset()   # as faiss's import leaves it
    vectors, _ = clustered(20000, dim=64)
    ItemIndex.build(vectors[:100], kind="flat")
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, 64, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    ivf.nprobe = 16
    queries = item_index_module.tuning_queries(vectors, 500, seed=3)
    found = np.full((len(queries), 10), -1, dtype=np.int64)
    scores = np.zeros((len(queries), 10), dtype=np.float32)
    search = threading.Thread(target=lambda: ivf.search(queries, 10, D=scores, I=found))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        search.start()
        deadline = time.monotonic() + 20
        while found[-1, 0] == -1 and time.monotonic() < deadline:
            pass
        done = bool(found[-1, 0] != -1)
    finally:
        sys.setswitchinterval(interval)
    search.join()
    assert done
