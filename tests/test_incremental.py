"""Incremental encoding (one new event against cached keys/values) agrees with full recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoder import EncoderConfig, SequenceEncoder
from model.incremental import EncodeRequest, IncrementalEncoder

# fp32 rounding through two blocks and a softmax: agreement to this many absolute units
# on vectors whose entries are O(1) (LayerNorm output)
TOLERANCE = 1e-4
# the CUDA cases run where there is a GPU (CI has none; see the README's GPU section)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_encoder(max_len=12, n_items=40, dim=32, heads=4, seed=0, device="cpu"):
    torch.manual_seed(seed)
    enc = SequenceEncoder(EncoderConfig(n_items=n_items, max_len=max_len, dim=dim, n_heads=heads))
    for p in enc.parameters():   # a trained-looking model: weights well away from their init
        torch.nn.init.normal_(p, std=0.3)
    return enc.to(device).eval(), {f"i{n}": n for n in range(1, n_items + 1)}


def history(rng, length, n_items=40, unknown=0.0):
    out, ts = [], 1000.0
    for _ in range(length):
        ts += float(rng.exponential(600))
        item = "never-seen" if rng.random() < unknown else f"i{rng.integers(1, n_items + 1)}"
        out.append((item, ["view", "click", "add_to_cart", "purchase"][rng.integers(4)], ts))
    return out


def full(enc, index, hist, window):
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    return inc.encode([EncodeRequest("u", hist[-window:], new=0, tail_before="x", tail_after="x")])[0]


def take_batched_forms(monkeypatch, batched: bool) -> None:
    """Passes of any size take the batched forms of the rotation and the input convolution
    (model.encoder.BATCHED_FORMS_MIN_POSITIONS), or none do."""
    from model import encoder

    monkeypatch.setattr(encoder, "BATCHED_FORMS_MIN_POSITIONS", 0 if batched else 1 << 62)


@pytest.mark.parametrize("batched", [False, True], ids=["elementwise", "batched"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_event_by_event_equals_full_recompute_up_to_the_window(dtype, device, batched, monkeypatch):
    take_batched_forms(monkeypatch, batched)
    enc, index = make_encoder(device=device)
    rng = np.random.default_rng(1)
    users = {f"u{n}": history(rng, 12) for n in range(6)}
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20, dtype=dtype)
    tol = TOLERANCE if dtype == torch.float32 else 5e-2
    for t in range(12):   # one event per user per batch, all users in one batch
        requests = [EncodeRequest(u, h[: t + 1], new=1, tail_before=str(t - 1) if t else None, tail_after=str(t))
                    for u, h in users.items()]
        got = inc.encode(requests)
        for req, vec in zip(requests, got):
            np.testing.assert_allclose(vec, full(enc, index, req.history, 12), atol=tol)
    assert inc.stats.misses == len(users) and inc.stats.hits == 11 * len(users)


def test_several_new_events_unknown_items_and_duplicates():
    enc, index = make_encoder()
    rng = np.random.default_rng(2)
    hist = history(rng, 12, unknown=0.25)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20, round_cost=0)   # always step
    inc.encode([EncodeRequest("u", hist[:3], new=3, tail_before=None, tail_after="2")])
    got = inc.encode([EncodeRequest("u", hist[:8], new=5, tail_before="2", tail_after="7")])[0]
    np.testing.assert_allclose(got, full(enc, index, hist[:8], 12), atol=TOLERANCE)
    again = inc.encode([EncodeRequest("u", hist[:8], new=0, tail_before="7", tail_after="7")])[0]
    np.testing.assert_array_equal(again, got)   # a redelivered batch: the cached vector
    assert inc.stats.hits == 2 and inc.stats.misses == 1


@pytest.mark.parametrize("device", DEVICES)
def test_several_events_per_user_in_one_pass_equal_stepping_them_one_at_a_time(monkeypatch, device):
    """Users with 1-5 new events each, in one pass, past the window (the ring wraps inside
    a pass): the same vectors as folding the events in one by one."""
    enc, index = make_encoder(max_len=8, device=device)
    rng = np.random.default_rng(6)
    users = {f"u{n}": history(rng, 40, unknown=0.1) for n in range(5)}
    together = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    # always step (past the window a full recompute no longer sees what the steps saw)
    monkeypatch.setattr(together, "_cheapest_width", lambda requests, steps, **_: (steps, []))
    one_by_one = IncrementalEncoder(enc, index, budget_bytes=1 << 20)

    def request(user, upto, new, before):
        return EncodeRequest(user, users[user][max(0, upto - 8): upto], new=new,
                             tail_before=None if before == 0 else str(before - 1), tail_after=str(upto - 1))

    done = dict.fromkeys(users, 0)
    for batch in range(8):
        requests = []
        for n, user in enumerate(users):
            new = 1 + (n + batch) % 5
            requests.append(request(user, done[user] + new, new, done[user]))
        got = together.encode(requests)
        for req, vec in zip(requests, got):
            before = done[req.user]
            for upto in range(before + 1, before + req.new + 1):
                want = one_by_one.encode([request(req.user, upto, 1, upto - 1)])[0]
            np.testing.assert_allclose(vec, want, atol=TOLERANCE)
            done[req.user] += req.new
    assert together.stats.misses == len(users) and together.stats.hits == 7 * len(users)


def test_a_user_with_many_new_events_among_single_steps_is_recomputed_in_full():
    enc, index = make_encoder(max_len=50)
    rng = np.random.default_rng(5)
    hists = [history(rng, 40) for _ in range(20)]
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 22)
    inc.encode([EncodeRequest(f"u{n}", h[:30], new=30, tail_after="a") for n, h in enumerate(hists)])
    # nineteen users one event on, one user eight: a pass eight wide for all would cost more
    # than recomputing that one user's window
    cut = [31] * 19 + [38]
    got = inc.encode([EncodeRequest(f"u{n}", h[:c], new=c - 30, tail_before="a", tail_after="b")
                      for n, (h, c) in enumerate(zip(hists, cut))])
    for n, (h, c) in enumerate(zip(hists, cut)):
        np.testing.assert_allclose(got[n], full(enc, index, h[:c], 50), atol=TOLERANCE)
    assert inc.stats.hits == 19 and inc.stats.misses == 20 + 1


def test_a_first_visit_goes_through_the_warm_users_pass():
    """A user whose whole history is new (no event before the batch) starts from an empty
    ring in the step pass: the same vector as a full recompute, and no full pass runs."""
    enc, index = make_encoder()
    rng = np.random.default_rng(8)
    warm, first = history(rng, 9), history(rng, 4, unknown=0.25)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    inc.encode([EncodeRequest("warm", warm[:6], new=6, tail_after="5")])
    inc._encode_full = None   # a full pass would fail
    got = inc.encode([EncodeRequest("warm", warm, new=3, tail_before="5", tail_after="8"),
                      EncodeRequest("first", first, new=4, tail_after="f3")])
    np.testing.assert_allclose(got[0], full(enc, index, warm, 12), atol=TOLERANCE)
    np.testing.assert_allclose(got[1], full(enc, index, first, 12), atol=TOLERANCE)
    assert inc.stats.hits == 1 and inc.stats.misses == 2   # a first visit is a miss, stepped or not
    step = inc.encode([EncodeRequest("first", first + warm[:1], new=1, tail_before="f3", tail_after="f4")])[0]
    np.testing.assert_allclose(step, full(enc, index, first + warm[:1], 12), atol=TOLERANCE)


def test_a_stale_entry_or_a_long_gap_falls_back_to_full_recompute():
    enc, index = make_encoder()
    rng = np.random.default_rng(3)
    hist = history(rng, 10)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    inc.encode([EncodeRequest("u", hist[:4], new=4, tail_before=None, tail_after="3")])
    # the cache holds the user up to event "3", but this batch follows event "5" (another worker had it)
    got = inc.encode([EncodeRequest("u", hist[:7], new=1, tail_before="5", tail_after="6")])[0]
    np.testing.assert_allclose(got, full(enc, index, hist[:7], 12), atol=TOLERANCE)
    assert inc.stats.misses == 2


def test_past_the_window_the_cache_slides_and_stays_close():
    enc, index = make_encoder(max_len=8)
    rng = np.random.default_rng(4)
    hist = history(rng, 30)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    for t in range(30):
        got = inc.encode([EncodeRequest("u", hist[max(0, t - 7): t + 1], new=1, tail_before=str(t - 1) if t else None,
                                        tail_after=str(t))])[0]
    reference = full(enc, index, hist[-8:], 8)
    # the first layer's keys are the same; the second layer's carry context from before the window
    cos = float(got @ reference / np.linalg.norm(got) / np.linalg.norm(reference))
    assert cos > 0.9, cos


def test_budget_evicts_least_recently_used_users():
    enc, index = make_encoder()
    rng = np.random.default_rng(5)
    inc = IncrementalEncoder(enc, index, budget_bytes=1)   # room for one user
    assert inc.capacity == 1
    inc.encode([EncodeRequest("a", history(rng, 3), new=3, tail_after="a2")])
    inc.encode([EncodeRequest("b", history(rng, 3), new=3, tail_after="b2")])
    assert list(inc.slot_of) == ["b"] and inc.stats.evictions == 1
    assert inc.stats.as_dict()["bytes"] == inc.stats.slot_bytes


def test_a_user_without_known_items_gets_zeros_and_no_slot():
    enc, index = make_encoder()
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    got = inc.encode([EncodeRequest("cold", [("never-seen", "view", 1.0)], new=1, tail_after="c")])
    assert not got.any() and "cold" not in inc.slot_of


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [False, True], ids=["elementwise", "batched"])
def test_bf16_serving_stays_close_to_fp32(device, batched, monkeypatch):
    take_batched_forms(monkeypatch, batched)
    enc, index = make_encoder(device=device)
    rng = np.random.default_rng(6)
    hist = history(rng, 12)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20, dtype=torch.bfloat16, bf16=True)
    inc.encode([EncodeRequest("u", hist[:6], new=6, tail_after="5")])
    got = inc.encode([EncodeRequest("u", hist[:9], new=3, tail_before="5", tail_after="8")])[0]
    recomputed = inc.encode([EncodeRequest("v", hist[:9], new=0, tail_before="x", tail_after="8")])[0]   # a full pass
    reference = full(enc, index, hist[:9], 12)
    for vector in (got, recomputed):
        cos = float(vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference))
        assert cos > 0.99, cos


def test_bf16_weights_cast_once_give_what_autocast_gives_and_leave_the_model_alone():
    """Cast once, the numbers are autocast's; fused (oneDNN, CPU) they move by bf16 rounding."""
    from model.incremental import FusedLinear, with_bf16_linears

    enc, index = make_encoder()
    rng = np.random.default_rng(7)
    hists = [history(rng, 10) for _ in range(3)]
    outs = []
    for serving in (with_bf16_linears(enc, fuse=False), enc, with_bf16_linears(enc)):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20, dtype=torch.bfloat16, bf16=True)
        inc.encoder = serving   # enc itself: autocast casts the float32 weights in every pass
        first = inc.encode([EncodeRequest(f"u{n}", h[:7], new=7, tail_after="6") for n, h in enumerate(hists)])
        then = inc.encode([EncodeRequest(f"u{n}", h, new=3, tail_before="6", tail_after="9")
                           for n, h in enumerate(hists)])
        outs.append((first, then))
    for cast_once, autocast, fused in zip(*outs):
        np.testing.assert_array_equal(cast_once, autocast)
        np.testing.assert_allclose(fused, autocast, atol=2e-2)
    if FusedLinear.available(with_bf16_linears(enc, fuse=False).blocks[0].attn.qkv.weight):
        assert isinstance(with_bf16_linears(enc).blocks[0].mlp.fc, FusedLinear)
    serving = IncrementalEncoder(enc, index, budget_bytes=1 << 20, dtype=torch.bfloat16, bf16=True).encoder
    assert serving.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in enc.parameters())   # the model itself is not touched
    assert serving.item_emb.weight is enc.item_emb.weight            # the embeddings are not copied


def test_a_steps_attention_is_fused_where_the_cpu_has_amx_and_both_forms_agree():
    """With AMX tiles torch's fused bf16 attention beats float32 products at every pass size;
    without them products win from a few queries. Either way a step gives the same vectors."""
    from model.artifact import cpu_has_amx_bf16

    assert cpu_has_amx_bf16({"amx_tile": True, "amx_bf16": True, "avx512_bf16": True})
    assert not cpu_has_amx_bf16({"avx512_f": True, "avx512_bf16": True})
    enc, index = make_encoder()
    rng = np.random.default_rng(8)
    users = {f"u{n}": history(rng, 10) for n in range(12)}   # 12 queries a pass: past PRODUCTS_MIN_QUERIES
    got = {}
    for products in (True, False):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20, dtype=torch.bfloat16, bf16=True)
        assert inc.attend_products == (inc.device.type == "cpu" and not cpu_has_amx_bf16())
        inc.attend_products = products
        inc.encode([EncodeRequest(u, h[:9], new=9, tail_after="8") for u, h in users.items()])
        got[products] = inc.encode([EncodeRequest(u, h, new=1, tail_before="8", tail_after="9")
                                    for u, h in users.items()])
        assert inc.stats.hits == len(users)
    np.testing.assert_allclose(got[True], got[False], atol=5e-2)


def test_serving_takes_bf16_products_only_from_a_cpu_with_bf16_instructions():
    """oneDNN "supports" bf16 on any AVX512 CPU by emulating it, which is slower than float32:
    serving and training use bf16 only where the CPU has AVX512-BF16 or AMX-BF16."""
    from model.artifact import bf16_is_fast, cpu_has_native_bf16
    from model.incremental import for_serving

    assert cpu_has_native_bf16({"avx512_f": True, "avx512_bf16": True})
    assert cpu_has_native_bf16({"amx_tile": True, "amx_bf16": True})
    assert not cpu_has_native_bf16({"avx512_f": True, "avx512_bw": True, "avx512_vnni": True})
    assert not cpu_has_native_bf16({"architecture": "aarch64"})
    native = cpu_has_native_bf16()
    assert bf16_is_fast(torch.device("cpu")) == native
    enc, index = make_encoder()
    lane = for_serving(enc, index, budget_bytes=1 << 20)
    assert lane.dtype == torch.bfloat16   # the cache stays bf16 (bytes per user) either way
    assert lane.encoder.blocks[0].attn.qkv.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert lane.attend_dtype == (torch.bfloat16 if native else torch.float32)


def test_fused_linear_rounds_rows_to_few_shapes_and_gives_the_same_products():
    """oneDNN compiles a kernel per new shape: rows are padded to one of 160 sizes up to 8,192
    (at most 1/16 more), and the padding leaves the products alone."""
    from model.incremental import FusedLinear, bucket_rows

    assert [bucket_rows(m) for m in (1, 32, 33, 65, 1000)] == [1, 32, 34, 68, 1024]
    assert len({bucket_rows(m) for m in range(1, 8193)}) == 160
    assert all(m <= bucket_rows(m) <= m * 17 / 16 for m in range(1, 5000))
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24).to(torch.bfloat16)
    if not FusedLinear.available(linear.weight):
        pytest.skip("oneDNN takes no bf16 linear layer here")
    fused = FusedLinear(linear, gelu=True)
    x = torch.randn(3, 37, 16).to(torch.bfloat16)   # 111 rows, padded to 112
    with torch.inference_mode():
        got = fused(x)
        want = torch.nn.functional.gelu(linear(x).float())
        alone = fused(x[1, 4:5])                  # one row: not padded
    assert got.shape == (3, 37, 24) and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(alone.float(), got[1, 4:5].float(), atol=2e-2, rtol=2e-2)


def test_serving_builds_the_linear_kernels_of_each_shape_and_row_count_at_load(monkeypatch):
    """Each layer shape's kernels for every padded row count up to a bound are built when the
    model loads (a shape shared by several layers once), not by the first batches of traffic."""
    from model import incremental
    from model.incremental import FusedLinear, bucket_rows, with_bf16_linears

    enc, index = make_encoder()
    serving = with_bf16_linears(enc)
    if not isinstance(serving.blocks[0].attn.qkv, FusedLinear):
        pytest.skip("oneDNN takes no bf16 linear layer here")
    called: list[tuple] = []
    forward = FusedLinear.forward
    monkeypatch.setattr(FusedLinear, "forward", lambda self, x: called.append((self, x.shape)) or forward(self, x))
    built = FusedLinear.build_kernels(serving.blocks, 100)
    sizes = {bucket_rows(m) for m in range(1, 101)}
    # qkv, proj, fc + GELU, out, and the last block's keys and values apart (its query's part is
    # proj's shape)
    assert len(serving.blocks) == 2 and built == 5 * len(sizes) == len(called)
    parts = serving.blocks[-1].attn.qkv.parts.values()
    assert {layer for layer, _ in called} <= set(serving.blocks[0].modules()) | set(parts)
    assert {shape[0] for _, shape in called} == sizes
    called.clear()
    monkeypatch.setattr("model.artifact.bf16_is_fast", lambda device: True)   # serving in bf16 on any CPU
    incremental.for_serving(enc, index, budget_bytes=1 << 20)
    assert len({shape[0] for _, shape in called}) == len({bucket_rows(m) for m in range(1, incremental.KERNEL_ROWS + 1)})


def test_serving_on_a_gpu_keeps_attention_off_kernels_compiled_per_shape(monkeypatch, tmp_path):
    """On CUDA, a loaded model (serving, the naive baseline, eval) turns cuDNN's attention off
    (it compiles a kernel for every new batch shape); on the CPU it leaves the setting alone."""
    from model import artifact

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    artifact.keep_attention_precompiled(torch.device("cpu"))
    assert calls == []
    artifact.keep_attention_precompiled(torch.device("cuda"))
    assert calls == [False]
    placed = []
    monkeypatch.setattr(artifact, "keep_attention_precompiled", placed.append)
    enc, index = make_encoder()
    items = sorted(index, key=index.get)
    artifact.ModelArtifact(enc, items, device="cpu").save(tmp_path / "model")
    artifact.ModelArtifact.load(tmp_path / "model", device="cpu")
    assert placed == [torch.device("cpu")]


def test_serving_claims_its_cache_at_start_and_refuses_more_than_the_memory_left():
    """A budget is faulted in (zeroed) when the model loads, not slot by slot under traffic,
    and one the machine cannot hold fails then, with its size."""
    from model.incremental import available_memory_bytes, check_cache_fits, for_serving

    with pytest.raises(MemoryError, match=r"budget \(2,048 MiB, --cache-mb\) is more than the memory available "
                                          r"\(1,024 MiB\)"):
        check_cache_fits(2 << 30, available=1 << 30)
    check_cache_fits(1 << 20, available=1 << 30)
    free = available_memory_bytes()
    assert free is None or free > 1 << 20
    enc, index = make_encoder()
    inc = for_serving(enc, index, budget_bytes=1 << 20, lanes=2)
    assert all(bool((t == 0).all()) for t in (*inc.keys, *inc.values, inc.out))
    with pytest.raises(MemoryError):
        for_serving(enc, index, budget_bytes=1 << 50)


@pytest.mark.parametrize("lanes, threaded", [(1, False), (2, False), (2, True)])
def test_recommender_lists_from_the_cache_equal_full_recomputation(tiny_model, tiny_shop, lanes, threaded,
                                                                   monkeypatch):
    """Event by event, the lists made with the incremental encoder (float32) are the lists a
    full recompute of each user's stored history gives; with two lanes too (each user's
    entry in its own lane), the lanes in the same passes or on two threads."""
    from model.incremental import IncrementalEncoder
    from stream import recommender
    from stream.events import ShopEvent
    from stream.recommender import Recommender
    from stream.state import UserState

    monkeypatch.setattr(recommender, "PARALLEL_MIN_USERS", 1 if threaded else 1000)
    cached = Recommender(tiny_model, lanes=lanes)
    enc = cached.model.artifact.encoder
    cached.model.incremental = IncrementalEncoder(enc, cached.model.artifact.token_index,
                                                  budget_bytes=lanes << 24, lanes=lanes)
    full = Recommender(tiny_model, cache_bytes=0)
    assert full.model.incremental is None
    chosen = {f"user-{n:05d}" for n in (3, 10, 42, 7, 19, 25)}
    events = [e for e in tiny_shop[0] if e["user_id"] in chosen]
    states: dict[str, UserState] = {}
    compared = 0
    for start in range(0, len(events), 6):   # batches of 6 events
        batch = events[start:start + 6]
        users, new, tails = [], [], []
        for e in batch:
            state = states.setdefault(e["user_id"], UserState())
            if e["user_id"] not in users:
                users.append(e["user_id"]); tails.append(state.last_event_id); new.append(0)
            new[users.index(e["user_id"])] += state.apply([ShopEvent(e["event_id"], e["user_id"], e["item_id"],
                                                                     e["type"], e["ts"])])
        batch_states = [states[u] for u in users]
        got, _ = cached.recommend(batch_states, users, new, tails)
        want, _ = full.recommend(batch_states)
        assert [[i["item_id"] for i in lst] for lst in got] == [[i["item_id"] for i in lst] for lst in want]
        compared += len(users)
    assert compared > 40
    assert all(lane.stats.hits > 0 for lane in cached.model.incremental.lanes)
    for user in chosen:   # each user's entry is in its lane only
        lane = int(cached.model.incremental.lane_of([user])[0])
        assert [user in inc.slot_of for inc in cached.model.incremental.lanes] == [n == lane for n in range(lanes)]
    assert cached.cache_counters()["cache_users"] == len(chosen)


def test_lanes_route_each_user_to_one_share_of_the_cache_and_sum_their_counters():
    """Each user lives in its lane's slots, whether the lanes are encoded one call each (their
    threads) or all in one call (the same passes): the same vectors, the same entries."""
    enc, index = make_encoder()
    rng = np.random.default_rng(3)
    lanes = IncrementalEncoder(enc, index, budget_bytes=3 << 22, lanes=3)
    together = IncrementalEncoder(enc, index, budget_bytes=3 << 22, lanes=3)
    users = [f"u{n}" for n in range(30)]
    where = lanes.lane_of(users)
    assert set(where.tolist()) == {0, 1, 2} and (lanes.lane_of(users) == where).all()   # stable
    stored = {u: [] for u in users}
    for step, added in enumerate((4, 1, 3)):   # a first visit, then steps of one and three events
        reqs = []
        for u in users:
            stored[u] = stored[u] + history(rng, added)
            reqs.append(EncodeRequest(u, stored[u], new=added, tail_before=f"t{step - 1}" if step else None,
                                      tail_after=f"t{step}"))
        each = np.zeros((len(users), enc.cfg.dim), dtype=np.float32)
        for lane in range(3):
            mine = np.flatnonzero(where == lane)
            each[mine] = lanes.encode([reqs[n] for n in mine], lane)
        np.testing.assert_allclose(together.encode(reqs), each, atol=1e-5)
    for inc in (lanes, together):
        assert inc.stats.misses == inc.stats.users == 30 and inc.stats.hits == 60
        assert [lane.stats.hits for lane in inc.lanes] == [2 * int((where == n).sum()) for n in range(3)]
        for n, lane in enumerate(inc.lanes):
            assert all(n * inc.lane_capacity <= slot < (n + 1) * inc.lane_capacity for slot in lane.slot_of.values())
    assert lanes.stats.bytes == 30 * lanes.stats.slot_bytes
    lanes.forget("u7")
    assert "u7" not in lanes.lanes[int(where[7])].slot_of and lanes.stats.users == 29
    lanes.clear()
    assert all(not lane.slot_of for lane in lanes.lanes) and lanes.stats.users == lanes.stats.bytes == 0


def test_a_batch_larger_than_the_budget_still_encodes_everyone():
    enc, index = make_encoder()
    rng = np.random.default_rng(7)
    inc = IncrementalEncoder(enc, index, budget_bytes=1)
    inc = IncrementalEncoder(enc, index, budget_bytes=2 * inc.stats.slot_bytes)   # two users
    hists = [history(rng, 5) for _ in range(5)]
    got = inc.encode([EncodeRequest(f"u{n}", h, new=5, tail_after=f"t{n}") for n, h in enumerate(hists)])
    for n, h in enumerate(hists):
        np.testing.assert_allclose(got[n], full(enc, index, h, 12), atol=TOLERANCE)
    assert len(inc.slot_of) == inc.capacity == 2 and list(inc.slot_of) == ["u3", "u4"]
    step = inc.encode([EncodeRequest("u4", hists[4] + history(rng, 1), new=1, tail_before="t4", tail_after="x")])
    assert inc.stats.hits == 1 and np.isfinite(step).all()


def test_full_recomputes_in_passes_of_a_few_users_equal_one_pass(monkeypatch):
    """Misses are recomputed FULL_CHUNK users at a time on the CPU (on a GPU, GPU_FULL_CHUNK):
    the vectors and the cached keys each user's next step attends to are those of one pass over
    everyone."""
    from model import incremental

    assert incremental.GPU_FULL_CHUNK >= 4096 > incremental.FULL_CHUNK   # a GPU pass takes a whole batch
    enc, index = make_encoder()
    rng = np.random.default_rng(8)
    hists = [history(rng, length) for length in (12, 10, 11, 12, 9)]   # more new events than MAX_STEPS
    nxt = [history(rng, 1) for _ in hists]

    def run(chunk):
        monkeypatch.setattr(incremental, "FULL_CHUNK", chunk)
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
        first = inc.encode([EncodeRequest(f"u{n}", h, new=len(h), tail_after="a") for n, h in enumerate(hists)])
        assert inc.stats.misses == len(hists) and inc.stats.hits == 0
        then = inc.encode([EncodeRequest(f"u{n}", h + e, new=1, tail_before="a", tail_after="b")
                           for n, (h, e) in enumerate(zip(hists, nxt))])
        assert inc.stats.hits == len(hists)
        return first, then

    (first, then), (one_first, one_then) = run(2), run(128)
    np.testing.assert_allclose(first, one_first, atol=1e-6)
    np.testing.assert_allclose(then, one_then, atol=1e-6)


@pytest.mark.parametrize("pack", [True, False])
def test_windows_recomputed_several_to_a_row_step_on_as_full_recomputation(monkeypatch, pack):
    """A full recompute packs short windows together (model/encoder.py) where that saves
    enough: each user's cached keys, at its own columns of the shared row, are what its next
    steps attend to -- as when the same windows are left-padded."""
    from model import encoder, incremental

    monkeypatch.setattr(incremental, "PACK_MIN_SAVED_POSITIONS", 1 if pack else 10 ** 9)
    packed = []

    def counted(*args, **kwargs):
        packed.append(1)
        return encoder.encode_packed(*args, **kwargs)

    monkeypatch.setattr(incremental, "encode_packed", counted)
    enc, index = make_encoder()
    rng = np.random.default_rng(9)
    hists = [history(rng, length) for length in (9, 2, 8, 1, 3, 6)]   # within the window after 3 more
    later = [history(rng, 3) for _ in hists]
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 20)
    inc.encode([EncodeRequest(f"u{n}", h, new=len(h) + 99, tail_after="0") for n, h in enumerate(hists)])
    for step in range(1, 4):
        got = inc.encode([EncodeRequest(f"u{n}", h + e[:step], new=1, tail_before=str(step - 1), tail_after=str(step))
                          for n, (h, e) in enumerate(zip(hists, later))])
        for n, (h, e) in enumerate(zip(hists, later)):
            np.testing.assert_allclose(got[n], full(enc, index, h + e[:step], 12), atol=TOLERANCE)
    assert inc.stats.misses == len(hists) and inc.stats.hits == 3 * len(hists)
    assert len(packed) == pack


def test_cache_counters_are_running_totals_across_a_hot_swap(tiny_model):
    from stream.recommender import Recommender, ServingModel
    from stream.state import UserState

    rec = Recommender(tiny_model)
    state = UserState()
    state.items, state.types, state.ts = ["1", "2"], ["view", "view"], [1.0, 2.0]
    rec.recommend([state], ["u"], [2], [None])
    before = rec.cache_counters()
    assert before["cache_misses"] == 1
    rec._pending = ServingModel.load(tiny_model, rec.catalogue, rec.config)   # the same version, reloaded
    rec.swap_if_pending()
    rec.recommend([state], ["u"], [2], [None])
    after = rec.cache_counters()
    assert after["cache_misses"] == 2 and after["cache_hits"] == before["cache_hits"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_copied_through_numpy_equal_torch_index_copies(dtype):
    """On the CPU the cache's slots are written and gathered through numpy views; the torch
    operators (the GPU's path) give the same vectors and the same cache contents: misses with
    windows shorter than the ring, one-event and several-event steps, first visits, evictions."""
    enc, index = make_encoder()
    rng = np.random.default_rng(9)
    hists = {f"u{n}": history(rng, 30) for n in range(8)}
    runs = []
    for host in (True, False):
        inc = IncrementalEncoder(enc, index, budget_bytes=6 * IncrementalEncoder(enc, index).stats.slot_bytes,
                                 dtype=dtype, round_cost=0)
        inc.host_copies = host
        outs, seen = [], {u: 0 for u in hists}
        for t, (users, new) in enumerate([(["u0", "u1", "u2"], 7), (["u0", "u1", "u3"], 1), (["u0", "u2", "u4"], 3),
                                          (["u5", "u6", "u7", "u1"], 1), (["u0", "u6"], 14), (["u3", "u7"], 2)]):
            requests = []
            for u in users:
                before, seen[u] = seen[u], seen[u] + new
                requests.append(EncodeRequest(u, hists[u][:seen[u]][-12:], new=min(new, 12),
                                              tail_before=f"{u}{before}" if before else None,
                                              tail_after=f"{u}{seen[u]}"))
            outs.append(inc.encode(requests))
        runs.append((outs, inc))
    (host_outs, host), (torch_outs, torch_inc) = runs
    for got, expected in zip(host_outs, torch_outs):
        np.testing.assert_array_equal(got, expected)
    assert host.stats.hits == torch_inc.stats.hits > 0 and host.stats.misses == torch_inc.stats.misses
    for a, b in zip([*host.keys, *host.values, host.recent], [*torch_inc.keys, *torch_inc.values, torch_inc.recent]):
        used = sorted(host.slot_of.values())
        assert torch.equal(a[used], b[used])


def test_fused_linear_is_the_linear_layer_and_its_gelu():
    """oneDNN's fused bf16 product: the linear layer's numbers (bias included), and with
    ``gelu`` the GELU of them, rounded once; any batch shape, strided rows too."""
    from model.incremental import FusedLinear

    torch.manual_seed(3)
    linear = torch.nn.Linear(32, 64).to(torch.bfloat16)
    if not FusedLinear.available(linear.weight):
        pytest.skip("oneDNN's fused linear is not available on this CPU build")
    x = torch.randn(5, 7, 32).to(torch.bfloat16)
    with torch.inference_mode():
        for rows in (x, x[:, -1:], x[0]):
            expected = torch.nn.functional.linear(rows, linear.weight, linear.bias).float()
            torch.testing.assert_close(FusedLinear(linear)(rows).float(), expected, atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(FusedLinear(linear, gelu=True)(rows).float(),
                                       torch.nn.functional.gelu(expected), atol=2e-2, rtol=1e-2)
        assert FusedLinear(linear)(x.float()).dtype == torch.bfloat16   # float32 rows are cast first
    assert not FusedLinear.available(linear.weight.float())


def test_a_fused_layers_part_gives_its_outputs_alone_and_serving_projects_the_last_query_apart():
    """``FusedLinear.part(lo, hi)``: the layer's outputs lo:hi, packed once and kept. The serving
    encoder's last block projects a last-only pass's newest query apart from every position's
    keys and values, and gives the full pass's last position and keys."""
    from model.incremental import FusedLinear, with_bf16_linears

    torch.manual_seed(5)
    linear = torch.nn.Linear(32, 96).to(torch.bfloat16)
    if not FusedLinear.available(linear.weight):
        pytest.skip("oneDNN's fused linear is not available on this CPU build")
    fused = FusedLinear(linear)
    x = torch.randn(4, 9, 32).to(torch.bfloat16)
    with torch.inference_mode():
        whole = fused(x)
        for lo, hi in [(0, 32), (32, 96)]:
            assert fused.part(lo, hi) is fused.part(lo, hi)
            # the same products; another kernel (its own output width) may round a sum apart
            torch.testing.assert_close(fused.part(lo, hi)(x).float(), whole[..., lo:hi].float(), atol=1e-2, rtol=1e-2)
    enc, _ = make_encoder()
    serving = with_bf16_linears(enc)
    dim = enc.cfg.dim
    assert set(serving.blocks[-1].attn.qkv.parts) == {(0, dim), (dim, 3 * dim)}   # packed at load
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    kv_all, kv_last = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = serving(items, kv_out=kv_all)
        last = serving(items, kv_out=kv_last, last_only=True)
    torch.testing.assert_close(last[:, 0].float(), full[:, -1].float(), atol=2e-2, rtol=2e-2)
    for (k, v), (k2, v2) in zip(kv_all, kv_last):
        torch.testing.assert_close(k2.float(), k.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(v2.float(), v.float(), atol=2e-2, rtol=2e-2)
