"""model/: reading logs, the causal encoder, the artifact round trip, a tiny training run."""

import json
import platform
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from model.artifact import ModelArtifact
from model.data import EVENT_TYPES, TYPE_ID, History, featurize, gap_bucket, leave_one_out, load_log
from model.encoder import EncoderConfig, SequenceEncoder
from model.evaluate import evaluate, evaluate_popularity
from model.train import TailAverage, TrainConfig, train


def events(n_users=3, per_user=4):
    out = []
    for u in range(n_users):
        for k in range(per_user):
            out.append({"v": 1, "event_id": f"e{u}-{k}", "user_id": f"u{u}", "item_id": f"i{k}",
                        "type": EVENT_TYPES[k % 4], "ts": 1000.0 - k, "extra": "ignored"})
    return out


# ----------------------------------------------------------------------------- load_log

def test_load_txt(tmp_path):
    p = tmp_path / "shop.txt"
    p.write_text("1 10 11 12\n2 11 13\n\n")
    log = load_log(p)
    assert log == {"1": [("10", None, None), ("11", None, None), ("12", None, None)],
                   "2": [("11", None, None), ("13", None, None)]}


def test_load_jsonl_sorts_by_ts_stably(tmp_path):
    evs = events()
    evs.append({"v": 1, "event_id": "tie", "user_id": "u0", "item_id": "tie", "type": "view", "ts": 997.0})
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in evs) + "\n")
    log = load_log(p)
    assert [i for i, _, _ in log["u0"]] == ["i3", "tie", "i2", "i1", "i0"]  # ts ascending, ties in file order
    assert log["u1"][0] == ("i3", "purchase", 997.0)


def test_load_msgpack(tmp_path):
    p = tmp_path / "log.msgpack"
    p.write_bytes(b"".join(msgpack.packb(e) for e in events()))
    assert load_log(p) == load_log(_jsonl(tmp_path, events()))


def test_load_sniffs_unknown_extension(tmp_path):
    (tmp_path / "a.log").write_text("\n".join(json.dumps(e) for e in events()))
    (tmp_path / "b.bin").write_bytes(b"".join(msgpack.packb(e) for e in events()))
    (tmp_path / "c.dat").write_text("7 1 2 3\n")
    assert load_log(tmp_path / "a.log") == load_log(tmp_path / "b.bin") == load_log(_jsonl(tmp_path, events()))
    assert load_log(tmp_path / "c.dat") == {"7": [("1", None, None), ("2", None, None), ("3", None, None)]}


def _jsonl(tmp_path, evs):
    p = tmp_path / "same.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in evs))
    return p


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"v": 1, "user_id": "u", "item_id": "i", "type": "view"}', "lacks ts"),
    ('{"v": 1, "user_id": "u", "item_id": "i", "type": "like", "ts": 1}', "unknown event type"),
    ('{"v": 1, "user_id": "u", "item_id": "i", "type": "view", "ts": "soon"}', "ts must be"),
    ('[1, 2]', "expected an event map"),
])
def test_load_jsonl_malformed(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(events(1, 1)[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        load_log(p)


def test_load_txt_malformed(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1 10 11\n2\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_log(p)


def test_load_msgpack_malformed(tmp_path):
    p = tmp_path / "bad.mpk"
    good = b"".join(msgpack.packb(e) for e in events(1, 2))
    p.write_bytes(good + msgpack.packb(events(1, 1)[0])[:-3])  # truncated third object
    with pytest.raises(ValueError, match="bad.mpk:3"):
        load_log(p)
    p.write_bytes(good + msgpack.packb({"user_id": "u"}))
    with pytest.raises(ValueError, match="bad.mpk:3: event lacks"):
        load_log(p)


def test_leave_one_out():
    log = {"a": [(str(i), None, None) for i in range(5)]}
    assert [i for i, _, _ in leave_one_out(log, "train")[0][1]] == ["0", "1", "2"]
    _, hist, target = leave_one_out(log, "valid")[0]
    assert len(hist) == 3 and target[0] == "3"
    _, hist, target = leave_one_out(log, "test")[0]
    assert len(hist) == 4 and target[0] == "4"


def test_featurize_matches_a_per_event_reading():
    """The batch featurizer against the rule read one event at a time: unknown items skipped
    (their times still count), gaps from the last timed event, the last max_len known ones."""
    rng = random.Random(0)
    index = {f"i{n}": n for n in range(1, 30)}
    histories, ts = [], 1000.0
    for _ in range(40):
        history = []
        for _ in range(rng.randint(0, 14)):
            ts += rng.choice([0.2, 3.0, 700.0, 1e6, -50.0])   # out of order too: a gap of 0
            history.append((rng.choice(["never-seen", *index]), rng.choice([None, "odd", *EVENT_TYPES]),
                            None if rng.random() < 0.2 else ts))
        histories.append(history)

    def one(history, max_len):
        items, types, gaps, prev = [], [], [], None
        for item, etype, t in history:
            gap = 0 if t is None or prev is None else gap_bucket(max(0.0, t - prev))
            prev = prev if t is None else t
            if item in index:
                items.append(index[item]), types.append(TYPE_ID.get(etype, 0)), gaps.append(gap)
        return items[-max_len:], types[-max_len:], gaps[-max_len:]

    items, types, gaps, lengths = featurize(histories, index, max_len=6, width=2)
    assert items.shape == (40, 6) and items.dtype == np.int64
    for r, history in enumerate(histories):
        expected = one(history, 6)
        assert lengths[r] == len(expected[0])
        for got, want in zip((items[r], types[r], gaps[r]), expected):
            assert list(got[6 - len(want):]) == want and not got[:6 - len(want)].any()
    assert featurize([], index, 6)[0].shape == (0, 0)
    assert featurize([[]], index, 6, width=1)[0].tolist() == [[0]]
    # the state's columns (History) read as the same events, without a tuple per event
    columns = [History(*(list(c) for c in zip(*h))) if h else History([], [], []) for h in histories]
    assert columns == histories and [columns[3][1], columns[3][-2:]] == [histories[3][1], histories[3][-2:]]
    for got, want in zip(featurize(columns, index, max_len=6, width=2), (items, types, gaps, lengths)):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- encoder

def test_encoder_is_causal():
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=20, max_len=8, dim=16, n_heads=2)).eval()
    torch.nn.init.normal_(enc.conv)   # the input convolution must not look ahead either
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    types = torch.tensor([[0, 0, 1, 2, 3, 4, 1, 2]])
    gaps = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]])
    h = enc(items, types, gaps)
    items2, types2, gaps2 = items.clone(), types.clone(), gaps.clone()
    items2[0, 6], types2[0, 6], gaps2[0, 6] = 19, 4, 9  # change a later event
    h2 = enc(items2, types2, gaps2)
    assert torch.allclose(h[0, :6], h2[0, :6], atol=1e-6)
    assert not torch.allclose(h[0, 6:], h2[0, 6:])


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_last_only_gives_the_last_position_and_the_same_keys(positions):
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=20, max_len=8, dim=16, n_heads=2, positions=positions)).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    kv_all, kv_last = [], []
    with torch.no_grad():
        full = enc(items, kv_out=kv_all)
        last = enc(items, kv_out=kv_last, last_only=True)
    assert last.shape == (2, 1, 16)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    for (k, v), (k2, v2) in zip(kv_all, kv_last):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)


def test_rotary_keys_rotate_each_coordinate_pair_by_its_angle():
    """``rotate`` turns pair (i, i + head_dim/2) by angle i; queries and keys rotated together
    score as if each was rotated alone, and only their distance matters."""
    from model.encoder import rotate, rotation_tables

    torch.manual_seed(0)
    x, angles = torch.randn(3, 5, 2, 4, 8), torch.rand(5, 4) * 6
    table = rotation_tables(angles)
    got = rotate(x, table[:, :, None, None])
    x1, x2 = x[..., :4], x[..., 4:]
    cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
    torch.testing.assert_close(got, torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1))
    torch.testing.assert_close(got[:, :, 0], rotate(x[:, :, 0], table[:, :, None]))
    q, k = torch.randn(8), torch.randn(8)
    freqs = torch.rand(4)
    score = (rotate(q, rotation_tables(7 * freqs)) * rotate(k, rotation_tables(3 * freqs))).sum()
    torch.testing.assert_close(score, (rotate(q, rotation_tables(4 * freqs)) * k).sum())


def test_inference_computes_the_training_forms_sums_by_cheaper_means(monkeypatch):
    """Without autograd the input convolution is one depthwise convolution, the (type, gap)
    embeddings one gather of their sums, and bf16 rotations batched products: the encoder's
    outputs stay those of the training forms (float32), padding and full windows alike (full
    windows attend by the attention's causal form instead of a mask)."""
    from model import encoder
    from model.encoder import rotate, rotate_positions, rotation_tables

    monkeypatch.setattr(encoder, "BATCHED_FORMS_MIN_POSITIONS", 0)   # passes this small take them too
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=30, max_len=10, dim=16, n_heads=2, conv_kernel=3)).eval()
    for table in (enc.conv, enc.type_emb.weight, enc.gap_emb.weight):   # row 0 too: padding is not zero
        torch.nn.init.normal_(table)
    items = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 9, 2, 2]])
    types = torch.randint(0, enc.cfg.n_types, items.shape)
    gaps = torch.randint(0, enc.cfg.n_gaps, items.shape)
    trained = enc(items, types, gaps)   # autograd on: the training forms
    with torch.inference_mode():
        served, served_full = enc(items, types, gaps), enc(items[1:], types[1:], gaps[1:])
    known = items > 0
    torch.testing.assert_close(served[known], trained[known], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served_full[0], trained[1], atol=1e-5, rtol=1e-5)

    x, angles = torch.randn(3, 5, 2, 4, 8), torch.rand(5, 4) * 6
    table = rotation_tables(angles)
    torch.testing.assert_close(rotate_positions(x, table), rotate(x, table[:, :, None, None]))
    by_products = rotate_positions(x.bfloat16(), table)
    assert by_products.shape == x.shape and by_products.dtype == torch.bfloat16
    torch.testing.assert_close(by_products.float(), rotate(x, table[:, :, None, None]), atol=0.05, rtol=0.02)


def test_packing_puts_each_window_whole_into_one_row_without_overlap():
    from model.encoder import Packing

    lengths = np.array([5, 1, 8, 3, 2, 8, 4])
    packing = Packing.of(lengths)
    rows, width = packing.owner.shape
    assert width == 8 and rows < len(lengths)   # several short windows share a row
    for user, n in enumerate(lengths):
        row, column = packing.row[user], packing.column[user]
        assert (packing.owner[row, column:column + n] == user).all()
        assert packing.place[row, column:column + n].tolist() == list(range(n))
    assert (packing.owner >= 0).sum() == lengths.sum()   # nothing overlaps
    for row in range(rows):   # the windows of a row are ranked 0, 1, ... from its start
        mine = np.flatnonzero(packing.row == row)
        assert sorted(packing.rank[mine]) == list(range(len(mine)))
        assert (np.argsort(packing.column[mine]) == np.argsort(packing.rank[mine])).all()
    flat = np.arange(1, lengths.sum() + 1)
    padded = np.zeros((len(lengths), 8), dtype=np.int64)   # featurize's layout: windows at the end
    for user, values in enumerate(np.split(flat, np.cumsum(lengths)[:-1])):
        padded[user, 8 - len(values):] = values
    laid = packing.lay_out(padded)
    assert sorted(laid[laid > 0].tolist()) == flat.tolist()
    assert (laid[packing.row, packing.column + lengths - 1] == np.cumsum(lengths)).all()   # each newest event
    visible = packing.visible()
    row, column = packing.row[2], packing.column[2]   # user 2 sees its own earlier events only
    assert visible[row, column + 3].tolist() == [c in range(column, column + 4) for c in range(width)]


@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_packed_windows_encode_as_the_left_padded_batch(conv_kernel):
    """Windows packed several to a row (serving's full recompute) give each user the vector
    the padded batch gives it: attention and the input convolution stay inside each window."""
    from model.encoder import Packing, encode_packed

    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=30, max_len=10, dim=16, n_heads=2, conv_kernel=conv_kernel)).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rng = np.random.default_rng(0)
    lengths = np.array([10, 3, 1, 6, 4, 2, 7, 1])
    padded = [np.zeros((len(lengths), 10), dtype=np.int64) for _ in range(3)]
    for user, n in enumerate(lengths):
        for values, high in zip(padded, (31, 5, 8)):
            values[user, 10 - n:] = rng.integers(1, high, n)
    packing = Packing.of(lengths)
    with torch.no_grad():
        want = enc(*(torch.from_numpy(v) for v in padded))[:, -1]
        kvs = []
        got = encode_packed(enc, *(torch.from_numpy(packing.lay_out(v)) for v in padded), packing, kv_out=kvs)
    assert packing.owner.shape[0] < len(lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(kvs) == 2 and kvs[0][0].shape == (packing.owner.shape[0], 2, packing.owner.shape[1], 8)


def test_keep_freed_memory_sets_malloc_where_glibc_is():
    from model.artifact import keep_freed_memory

    assert keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


ARENAS_AFTER_THREADS = """
import ctypes, ctypes.util, re, sys, tempfile, threading
import numpy as np
from model.artifact import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
def allocate():
    held = [np.ones(1 << 18) for _ in range(8)]   # 2 MiB each, from this thread's arena
    done.wait()
done = threading.Event()
threads = [threading.Thread(target=allocate) for _ in range(3)]
for thread in threads:
    thread.start()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(len(re.findall(r"<heap nr=", open(out.name).read())))
done.set()
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_threads_allocate_from_one_heap_once_freed_memory_is_kept():
    """Lanes' threads share the main heap (whose freed memory stays mapped) instead of each
    getting an arena of its own, which glibc unmaps heap by heap as it empties."""
    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS_AFTER_THREADS, mode], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert arenas("kept") == 1
    assert arenas("defaults") > 1


def test_bf16_read_through_numpy_widens_to_torchs_float32_bit_for_bit():
    from model.artifact import as_float32, host_view

    values = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-40, 38, (1000,)),
                        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40])]).bfloat16()
    widened = as_float32(host_view(values)[::-1])   # a strided view widens too
    assert widened.dtype == np.float32
    assert (widened.view(np.int32) == values.float().numpy()[::-1].view(np.int32)).all()
    assert np.isnan(as_float32(host_view(torch.tensor([float("nan")]).bfloat16()))).all()
    plain = np.arange(3, dtype=np.float32)
    assert as_float32(plain) is plain


def test_width_must_split_into_heads():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        EncoderConfig(dim=50, n_heads=4)


def test_user_vector_does_not_depend_on_left_padding():
    enc = SequenceEncoder(EncoderConfig(n_items=20, max_len=8, dim=16)).eval()
    a = enc(torch.tensor([[3, 4, 5]]))[:, -1]
    b = enc(torch.tensor([[0, 0, 0, 0, 3, 4, 5]]))[:, -1]
    assert torch.allclose(a, b, atol=1e-5)


def test_item_vector_adds_the_mean_of_its_attribute_vectors():
    enc = SequenceEncoder(EncoderConfig(n_items=4, n_attributes=5, max_attrs=3, dim=8))
    enc.item_attrs.copy_(torch.tensor([[0, 0, 0], [1, 2, 3], [4, 0, 0], [0, 0, 0], [5, 5, 0]]))
    v, item, attr = enc.item_vectors(), enc.item_emb.weight, enc.attr_emb.weight
    assert torch.allclose(v[1], item[1] + attr[[1, 2, 3]].mean(0), atol=1e-6)
    assert torch.allclose(v[2], item[2] + attr[4], atol=1e-6)
    assert torch.allclose(v[3], item[3])  # no attributes: the item's own vector
    assert torch.allclose(v[4], item[4] + attr[5], atol=1e-6)
    v[1].sum().backward()  # attributes learn through the items that carry them
    assert enc.attr_emb.weight.grad[[1, 2, 3]].abs().sum() > 0
    assert enc.attr_emb.weight.grad[[4, 5]].abs().sum() == 0


def test_serving_reads_the_inputs_from_a_table_with_the_same_floats():
    """`input_table` (item vectors with their attributes, then the (type, gap) sums) read by
    `embed` gives the first block exactly the embeddings' floats, so serving's passes do too."""
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_items=30, n_attributes=6, max_attrs=3, max_len=10, dim=16,
                                        n_heads=2)).eval()
    enc.item_attrs.copy_(torch.randint(0, 7, (31, 3)))
    enc.item_attrs[0] = 0
    for table in (enc.type_emb.weight, enc.gap_emb.weight):
        torch.nn.init.normal_(table)
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 30], [1, 2, 3, 4, 5, 6, 7, 9, 2, 2]])
    types = torch.randint(0, enc.cfg.n_types, items.shape)
    gaps = torch.randint(0, enc.cfg.n_gaps, items.shape)
    with torch.inference_mode():
        inputs = enc.input_table()
        assert inputs.shape == (31 + enc.cfg.n_types * enc.cfg.n_gaps, 16)
        assert torch.equal(enc.embed(items, types, gaps, inputs=inputs), enc.embed(items, types, gaps))
        assert torch.equal(enc(items, types, gaps, inputs=inputs), enc(items, types, gaps))


# ----------------------------------------------------------------------------- training

def chain_log(n_users=300, n_items=60, seed=0):
    """Each user walks item i -> i+1 (mod n_items) from a random start, with types and ts."""
    rng = random.Random(seed)
    log = {}
    for u in range(n_users):
        start, length, ts = rng.randrange(n_items), rng.randrange(5, 12), 1_000_000.0 + rng.random() * 1e5
        seq = []
        for k in range(length):
            ts += rng.choice([5.0, 60.0, 3600.0])
            seq.append((f"item{(start + k) % n_items}", rng.choice(EVENT_TYPES), ts))
        log[f"user{u}"] = seq
    return log


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    log = chain_log()
    out = tmp_path_factory.mktemp("model")
    cfg = TrainConfig(encoder=EncoderConfig(dim=32, n_layers=1, max_len=20, dropout=0.1, emb_dropout=0.1),
                      epochs=20, batch_size=64, lr=3e-3, warmup_steps=10, patience=20, max_minutes=1.0)
    artifact = train(log, cfg, out, progress=False)
    return log, out, artifact


def test_training_learns_the_sequence(trained):
    log, out, artifact = trained
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"] * 0.7
    model = evaluate(artifact, log, "test")
    popular = evaluate_popularity(log, "test")
    assert model["users"] == popular["users"] == len(log)
    assert model["HR@10"] > popular["HR@10"] + 0.3, (model, popular)
    assert artifact.metadata["metrics"]["test"]["HR@10"] == pytest.approx(model["HR@10"])


def test_artifact_round_trip(trained):
    log, out, artifact = trained
    for name in ("model.safetensors", "config.json", "vocab.json", "metadata.json",
                 "metrics.json", "training_curve.png"):
        assert (out / name).exists(), name
    loaded = ModelArtifact.load(out)
    assert loaded.version == artifact.version and loaded.items == artifact.items
    assert all(loaded.item_index[item] == row for row, item in enumerate(loaded.items))
    histories = [seq[:-1] for seq in log.values()][:50]
    histories += [[], [("never-seen", "view", 1.0)], [("never-seen", None, None), ("item3", "click", 5.0)]]
    a, b = artifact.encode(histories), loaded.encode(histories)
    assert a.dtype == np.float32 and a.shape == (len(histories), artifact.dim)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.item_embeddings(), artifact.item_embeddings())
    assert not a[-3:-1].any()  # no known item: zero row
    np.testing.assert_allclose(a[-1], loaded.encode([[("item3", "click", 5.0)]])[0], atol=1e-6)
    # The score is an inner product with item_embeddings(): the next item of the chain ranks top.
    scores = loaded.encode([[("item7", None, None), ("item8", None, None)]]) @ loaded.item_embeddings().T
    top = [loaded.items[i] for i in np.argsort(-scores[0])[:3]]
    assert "item9" in top


def test_the_served_weights_are_the_mean_of_the_schedules_tail(trained):
    _, _, artifact = trained
    assert artifact.metadata["weights"].startswith("mean of the last")
    steps = int(artifact.metadata["weights"].split()[4])
    # 300 users in batches of 64 for 20 epochs: the last 30% of the 100 steps
    assert steps == pytest.approx(30, abs=2)


def test_tail_average_is_the_mean_of_the_weights_it_saw():
    layer = torch.nn.Linear(3, 2)
    tail = TailAverage(layer)
    seen = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        seen.append(layer.weight.detach().clone())
        tail.update()
    state = tail.state_dict()
    torch.testing.assert_close(state["weight"], torch.stack(seen).mean(0))
    assert torch.equal(layer.weight, seen[-1])   # the module keeps its own weights
    assert state["bias"].shape == layer.bias.shape


def test_max_minutes_stops_cleanly(tmp_path):
    cfg = TrainConfig(encoder=EncoderConfig(dim=16, n_layers=1, max_len=10), epochs=1000, patience=1000,
                      max_minutes=0.02)
    artifact = train(chain_log(100, 30), cfg, tmp_path, progress=False)
    assert artifact.metadata["stopped"] == "max_minutes"
    assert artifact.metadata["epochs_run"] < 1000
    assert (tmp_path / "metadata.json").exists()


def test_a_model_saved_before_the_input_convolution_loads_without_it(trained, tmp_path):
    _, out, _ = trained
    legacy = tmp_path / "legacy"
    enc = SequenceEncoder(EncoderConfig(dim=32, n_layers=1, max_len=20, n_items=20, conv_kernel=0))
    ModelArtifact(enc, [f"item{n}" for n in range(20)]).save(legacy)
    assert "conv_kernel" not in json.loads((legacy / "config.json").read_text())   # the older format
    loaded = ModelArtifact.load(legacy)
    assert loaded.config.conv_kernel == 0 and not hasattr(loaded.encoder, "conv")
    assert ModelArtifact.load(out).config.conv_kernel == EncoderConfig.conv_kernel   # the recipe's

