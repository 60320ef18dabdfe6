"""Reranker: each filter, the boost rule, diversity (MMR and attribute caps), "because"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index import rerank
from index.catalogue import Catalogue
from index.rerank import DeviceReranker, Reranker, RerankConfig, UserContext, reranker_for

DIM = 8


def basis(i: int, scale: float = 1.0) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[i % DIM] = scale
    return vector


def make_reranker(n: int = 10, config: RerankConfig | None = None, catalogue: Catalogue | None = None):
    """Items i0..i{n-1}, each on its own axis (no two alike) unless a test says otherwise."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    items = [f"i{row}" for row in range(n)]
    config = RerankConfig(diversity=0.0) if config is None else config
    return Reranker(config, Catalogue() if catalogue is None else catalogue, vectors, items)


def candidates(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows in the given order with strictly decreasing scores."""
    rows_arr = np.array(rows, dtype=np.int64)
    scores = np.tile(np.linspace(1.0, 0.1, rows_arr.shape[1], dtype=np.float32), (len(rows), 1))
    return rows_arr, scores


def ids(result: list[dict]) -> list[str]:
    return [entry["item_id"] for entry in result]


def random_batch(rng, items: list[str], batch: int, width: int, history: int, purchased: int):
    """``batch`` users' candidate rows (``width`` distinct each), their scores best first, and
    contexts with ``history`` and ``purchased`` random items."""
    n = len(items)
    rows = np.stack([rng.permutation(n)[:width] for _ in range(batch)])
    scores = np.sort(rng.standard_normal((batch, width)).astype(np.float32), axis=1)[:, ::-1].copy()
    contexts = [UserContext(history=[items[r] for r in rng.choice(n, history, replace=False)],
                            purchased={items[r] for r in rng.choice(n, purchased, replace=False)})
                for _ in range(batch)]
    return rows, scores, contexts


def test_plain_order_and_output_shape():
    reranker = make_reranker(config=RerankConfig(k=3, diversity=0.0))
    rows, scores = candidates([[4, 2, 7, 1, 0]])
    [result] = reranker.rerank([UserContext()], rows, scores)
    assert ids(result) == ["i4", "i2", "i7"]
    assert set(result[0]) == {"item_id", "score", "because"}
    assert result[0]["score"] == pytest.approx(1.0) and isinstance(result[0]["score"], float)
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)


def test_purchased_items_are_always_removed():
    reranker = make_reranker(config=RerankConfig(drop_recent=False, diversity=0.0))
    rows, scores = candidates([[1, 2, 3], [1, 2, 3]])
    contexts = [UserContext(purchased={"i2"}), UserContext()]
    first, second = reranker.rerank(contexts, rows, scores)
    assert ids(first) == ["i1", "i3"]
    assert ids(second) == ["i1", "i2", "i3"]  # the exclusion is per user


def test_recent_history_is_removed_by_default_and_optionally_kept():
    rows, scores = candidates([[1, 2, 3, 4]])
    context = UserContext(history=["i3", "i1", "unknown-item"])
    [dropped] = make_reranker(config=RerankConfig(diversity=0.0)).rerank([context], rows, scores)
    assert ids(dropped) == ["i2", "i4"]
    [kept] = make_reranker(config=RerankConfig(drop_recent=False, diversity=0.0)).rerank([context], rows, scores)
    assert ids(kept) == ["i1", "i2", "i3", "i4"]
    window = RerankConfig(recent_window=1, diversity=0.0)  # only the newest history item
    [windowed] = make_reranker(config=window).rerank([UserContext(history=["i3", "i1"])], rows, scores)
    assert ids(windowed) == ["i2", "i3", "i4"]
    wider = RerankConfig(recent_window=5, diversity=0.0)   # wider than the history: all of it
    [short] = make_reranker(config=wider).rerank([UserContext(history=["i4", "i3", "i1"])], rows, scores)
    assert ids(short) == ["i2"]


def test_users_rows_in_one_flat_batch():
    reranker = make_reranker()
    users = reranker.rows_by_user([["i1", "gone", "i2", "i3"], [], ["i9", "i0"]])
    assert users.rows.tolist() == [1, 2, 3, 9, 0] and users.owner.tolist() == [0, 0, 0, 2, 2]
    assert users.newest(2).rows.tolist() == [2, 3, 9, 0] and users.newest(0).rows.tolist() == []
    assert users.padded(2).tolist() == [[2, 3], [-1, -1], [9, 0]]
    assert users.padded(4).tolist() == [[1, 2, 3, -1], [-1, -1, -1, -1], [9, 0, -1, -1]]
    assert users.codes(10).tolist() == [1, 2, 3, 31, 22]


def test_unavailable_items_are_removed_unknown_items_kept():
    catalogue = Catalogue()
    catalogue.update({"item_id": "i1", "in_stock": False, "attributes": []})
    catalogue.update({"item_id": "i2", "in_stock": True, "attributes": []})
    catalogue.remove("i3")
    reranker = make_reranker(catalogue=catalogue, config=RerankConfig(diversity=0.0))
    rows, scores = candidates([[1, 2, 3, 4]])
    [result] = reranker.rerank([UserContext()], rows, scores)
    assert ids(result) == ["i2", "i4"]  # i4 never appeared on shop-items: available
    catalogue.update({"item_id": "i1", "in_stock": True, "attributes": []})  # back in stock
    [result] = reranker.rerank([UserContext()], rows, scores)
    assert ids(result) == ["i1", "i2", "i4"]
    keep_all = make_reranker(catalogue=catalogue, config=RerankConfig(drop_unavailable=False, diversity=0.0))
    assert ids(keep_all.rerank([UserContext()], rows, scores)[0]) == ["i1", "i2", "i3", "i4"]


def test_padding_duplicates_and_short_lists():
    reranker = make_reranker(config=RerankConfig(k=5, diversity=0.5))
    rows = np.array([[2, 2, -1, 5, 2], [-1, -1, -1, -1, -1], [3, 99, 4, -1, -1]], dtype=np.int64)
    scores = np.array([[0.9, 0.8, -np.inf, 0.5, 0.4], [-np.inf] * 5, [0.3, 0.2, 0.1, -np.inf, -np.inf]], np.float32)
    first, empty, third = reranker.rerank([UserContext()] * 3, rows, scores)
    assert ids(first) == ["i2", "i5"] and empty == [] and ids(third) == ["i3", "i4"]  # 99 is unknown


def test_k_caps_the_list_and_empty_batches_work():
    reranker = make_reranker(config=RerankConfig(k=2, diversity=0.0))
    rows, scores = candidates([[0, 1, 2, 3]])
    assert len(reranker.rerank([UserContext()], rows, scores)[0]) == 2
    empty = np.zeros((0, 4))
    assert reranker.rerank([], empty.astype(np.int64), empty) == []
    with pytest.raises(ValueError):
        reranker.rerank([UserContext()], rows, scores[:, :2])


def test_boost_adds_score_spread_units():
    catalogue = Catalogue()
    reranker = make_reranker(catalogue=catalogue, config=RerankConfig(diversity=0.0, boost_weight=1.0))
    rows = np.array([[0, 1, 2, 3]])
    scores = np.array([[4.0, 3.0, 2.0, 1.0]], dtype=np.float32)  # std = sqrt(1.25)
    catalogue.update({"item_id": "i3", "in_stock": True, "attributes": [], "boost": 3.0})
    [result] = reranker.rerank([UserContext()], rows, scores)
    assert ids(result) == ["i3", "i0", "i1", "i2"]
    assert result[0]["score"] == pytest.approx(1.0 + 3.0 * np.sqrt(1.25), rel=1e-5)
    no_boost = make_reranker(catalogue=catalogue, config=RerankConfig(diversity=0.0, boost_weight=0.0))
    assert ids(no_boost.rerank([UserContext()], rows, scores)[0]) == ["i0", "i1", "i2", "i3"]


def near_duplicates_reranker(diversity: float, max_per_attribute: int | None = None):
    """Rows 0-4 are near copies (direction e0, brand A); rows 5-9 each point elsewhere (brand B..F)."""
    rng = np.random.default_rng(1)
    vectors = np.stack([basis(0) + 0.01 * rng.standard_normal(DIM) for _ in range(5)]
                       + [basis(i) for i in range(1, 6)]).astype(np.float32)
    items = [f"i{row}" for row in range(10)]
    catalogue = Catalogue()
    for row, item in enumerate(items):
        brand = "A" if row < 5 else "BCDEF"[row - 5]
        catalogue.update({"item_id": item, "in_stock": True, "attributes": [f"brand-{brand}"]})
    config = RerankConfig(k=5, diversity=diversity, max_per_attribute=max_per_attribute, cap_attribute_max_share=0.6)
    return Reranker(config, catalogue, vectors, items)


def test_mmr_diversity_breaks_up_near_duplicates():
    rows = np.arange(10)[None, :]
    scores = np.linspace(1.0, 0.5, 10, dtype=np.float32)[None, :]
    [plain] = near_duplicates_reranker(diversity=0.0).rerank([UserContext()], rows, scores)
    assert ids(plain) == ["i0", "i1", "i2", "i3", "i4"]
    [diverse] = near_duplicates_reranker(diversity=3.0).rerank([UserContext()], rows, scores)
    assert ids(diverse)[0] == "i0"  # the best item always leads
    assert sum(item in {"i0", "i1", "i2", "i3", "i4"} for item in ids(diverse)) == 1
    [mild] = near_duplicates_reranker(diversity=1.0).rerank([UserContext()], rows, scores)
    assert 1 < sum(item in {"i0", "i1", "i2", "i3", "i4"} for item in ids(mild)) < 5


def test_attribute_cap_limits_items_per_brand():
    rows = np.arange(10)[None, :]
    scores = np.linspace(1.0, 0.5, 10, dtype=np.float32)[None, :]
    [capped] = near_duplicates_reranker(diversity=0.0, max_per_attribute=2).rerank([UserContext()], rows, scores)
    assert ids(capped) == ["i0", "i1", "i5", "i6", "i7"]


def test_because_is_the_closest_history_item():
    vectors = np.stack([basis(0), basis(1), basis(2), basis(0, 2.0) + basis(1, 0.1), basis(1, 2.0)])
    items = ["h0", "h1", "h2", "r0", "r1"]
    reranker = Reranker(RerankConfig(diversity=0.0), Catalogue(), vectors, items)
    rows = np.array([[3, 4], [3, 4]])
    scores = np.array([[2.0, 1.0], [2.0, 1.0]], dtype=np.float32)
    with_history, without = reranker.rerank([UserContext(history=["h0", "h1", "h2"]), UserContext()], rows, scores)
    assert [(r["item_id"], r["because"]) for r in with_history] == [("r0", "h0"), ("r1", "h1")]
    assert [r["because"] for r in without] == [None, None]


def test_items_added_later_can_be_recommended():
    reranker = make_reranker(n=4)
    rows, scores = candidates([[5, 4, 0]])
    [before] = reranker.rerank([UserContext()], rows, scores)
    assert ids(before) == ["i0"]  # rows 4 and 5 unknown yet: skipped, not a crash
    new_rows = reranker.add_items(["new-a", "new-b"], np.stack([basis(3), basis(4)]))
    np.testing.assert_array_equal(new_rows, [4, 5])
    [after] = reranker.rerank([UserContext(history=["new-a"])], rows, scores)
    assert ids(after) == ["new-b", "i0"]
    with pytest.raises(ValueError):
        reranker.add_items(["new-a"], basis(0)[None, :])


def test_batch_of_users_is_independent():
    reranker = make_reranker(n=50, config=RerankConfig(k=10))
    rng = np.random.default_rng(5)
    rows = np.stack([rng.permutation(50)[:30] for _ in range(8)])
    scores = -np.sort(-rng.standard_normal((8, 30)).astype(np.float32), axis=1)
    contexts = [UserContext(history=[f"i{r}" for r in rows[u, :3]]) for u in range(8)]
    batched = reranker.rerank(contexts, rows, scores)
    one_by_one = [reranker.rerank([c], rows[u : u + 1], scores[u : u + 1])[0] for u, c in enumerate(contexts)]
    assert batched == one_by_one
    for u, result in enumerate(batched):
        assert len(result) == 10 and len(set(ids(result))) == 10
        assert not set(ids(result)) & set(contexts[u].history)


def test_a_batch_reranked_in_parts_gets_the_lists_of_one_pass():
    """The CPU reranks `CPU_RERANK_PART_USERS` users at a time (a GPU the whole batch): parts of
    3 users give each user of an 8-user batch the list one pass over the batch gives, with
    diversity, attribute caps, purchases and "because" in play."""
    assert Reranker.part_users == rerank.CPU_RERANK_PART_USERS and DeviceReranker.part_users is None
    rng = np.random.default_rng(11)
    n, batch, width = 80, 8, 30
    items = [f"i{row}" for row in range(n)]
    catalogue = Catalogue()
    for row, item in enumerate(items):
        catalogue.update({"item_id": item, "attributes": [f"brand-{row % 9}"]})
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    rows, scores, contexts = random_batch(rng, items, batch, width, history=6, purchased=3)
    config = RerankConfig(k=8, diversity=2.0, max_per_attribute=2, cap_attribute_max_share=0.2)
    whole, in_parts = (Reranker(config, catalogue, vectors, items) for _ in range(2))
    whole.part_users, in_parts.part_users = None, 3
    assert in_parts.rerank(contexts, rows, scores) == whole.rerank(contexts, rows, scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diversity_and_because_in_either_product_precision(monkeypatch, dtype):
    """bf16 products where the CPU runs them natively, float32 elsewhere: the same lists."""
    monkeypatch.setattr(rerank, "PRODUCT_DTYPE", dtype)
    rows = np.arange(10)[None, :]
    scores = np.linspace(1.0, 0.5, 10, dtype=np.float32)[None, :]
    reranker = near_duplicates_reranker(diversity=3.0)
    [diverse] = reranker.rerank([UserContext(history=["i9"])], rows, scores)
    assert reranker._for_products("unit").dtype == dtype
    assert ids(diverse)[0] == "i0"
    assert sum(item in {"i0", "i1", "i2", "i3", "i4"} for item in ids(diverse)) == 1
    assert all(entry["because"] == "i9" for entry in diverse)


def mmr_reference(z: np.ndarray, gram: np.ndarray, k: int, diversity: float) -> list[int]:
    """Greedy MMR for one user, spelled out: the candidate maximising z - diversity * max(0,
    highest similarity to the chosen); -inf z never chosen."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_value = None, -np.inf
        for c in range(len(z)):
            if c in chosen or z[c] == -np.inf:
                continue
            closest = max([np.float32(0.0)] + [gram[c, p] for p in chosen])
            value = z[c] - np.float32(diversity) * closest
            if value > best_value:
                best, best_value = c, value
        if best is None:
            break
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("diversity", [0.5, 2.0])
def test_the_batched_greedy_selection_is_per_user_mmr(diversity):
    """The batched loop (the minimum taken step by step) picks what MMR picks for each user."""
    rng = np.random.default_rng(3)
    reranker = make_reranker(n=60, config=RerankConfig(k=12, diversity=diversity))
    batch, width = 6, 40
    rows = np.stack([rng.permutation(60)[:width] for _ in range(batch)])
    z = rng.standard_normal((batch, width)).astype(np.float32)
    keep = rng.random((batch, width)) > 0.2
    keep[-1, 5:] = False   # a user with fewer candidates than k
    z = np.where(keep, z, -np.inf).astype(np.float32)
    chosen = reranker._select(z, rows, keep)
    gram = reranker._similarities(rows).float().numpy()
    for user in range(batch):
        expected = mmr_reference(z[user], gram[user], 12, diversity)
        assert chosen[user][: len(expected)].tolist() == expected
        assert (chosen[user][len(expected):] == rerank.NOT_CHOSEN).all()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_reranker_keeps_every_rule_and_makes_the_cpus_lists(monkeypatch, device):
    """`DeviceReranker` (torch, where the encoder runs; on the CPU here, on the GPU where there is
    one) against `Reranker` (numpy): filters, boosts, duplicates, padding, MMR, attribute caps and
    "because" give the same lists, and every rule holds in them. Both multiply in the device's
    product dtype (bf16 on a GPU whatever the CPU has)."""
    monkeypatch.setattr(rerank, "PRODUCT_DTYPE", rerank.product_dtype(torch.device(device)))
    rng = np.random.default_rng(7)
    n, batch, width = 300, 24, 60
    items = [f"i{row}" for row in range(n)]
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    catalogue = Catalogue()
    for row, item in enumerate(items):
        catalogue.update({"item_id": item, "in_stock": row % 17 != 0, "attributes": [f"brand-{row % 40}"],
                          "boost": 1.5 if row % 23 == 0 else None})
    rows, scores, contexts = random_batch(rng, items, batch, width, history=20, purchased=5)
    rows[:, -5:] = rows[:, :5]      # duplicates
    rows[0, 30:] = -1               # padding
    for config in (RerankConfig(k=10), RerankConfig(k=10, diversity=0.0),
                   RerankConfig(k=10, max_per_attribute=2, cap_attribute_max_share=0.05, recent_window=5)):
        on_device = DeviceReranker(config, catalogue, vectors, items, device).rerank(contexts, rows, scores)
        on_cpu = Reranker(config, catalogue, vectors, items).rerank(contexts, rows, scores)
        assert [[(e["item_id"], e["because"]) for e in lst] for lst in on_device] == \
            [[(e["item_id"], e["because"]) for e in lst] for lst in on_cpu]
        assert [e["score"] for lst in on_device for e in lst] == \
            pytest.approx([e["score"] for lst in on_cpu for e in lst], rel=1e-6, abs=1e-6)
        for context, result, user_rows in zip(contexts, on_device, rows):
            shown = ids(result)
            assert len(shown) == len(set(shown)) == 10
            assert set(shown) <= {items[r] for r in user_rows if r >= 0}
            assert not set(shown) & context.purchased
            assert not set(shown) & set(context.history[-(config.recent_window or len(context.history)):])
            assert all(int(item[1:]) % 17 for item in shown)                       # in stock
            assert all(entry["because"] in context.history for entry in result)
            if config.max_per_attribute:
                brands = [int(item[1:]) % 40 for item in shown]
                assert max(brands.count(b) for b in brands) <= 2


def test_the_worker_reranks_where_its_encoder_runs():
    """numpy on the CPU; torch on a GPU (made without touching it: its arrays go there at the first batch)."""
    config, vectors, items = RerankConfig(), np.eye(DIM, dtype=np.float32), [f"i{row}" for row in range(DIM)]
    assert type(reranker_for(torch.device("cpu"), config, Catalogue(), vectors, items)) is Reranker
    on_gpu = reranker_for("cuda", config, Catalogue(), vectors, items)
    assert isinstance(on_gpu, DeviceReranker) and on_gpu.device == torch.device("cuda")
