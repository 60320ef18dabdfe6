"""Encoder and index speed: user vectors/s for one new event on a warm user, incremental
(one position against the cache) vs full recompute of the window, at history lengths 10 and
50; warm users with a burst of new events (``--bursts``) in one pass vs one event per batch;
and candidate queries/s of the item index. On the GPU when there is one (``--device cuda``;
the index then runs on faiss-gpu if installed, else as torch's exact search).

    python benchmarks/encoder.py                       # CPU: fp32 and bf16, batch 512
    python benchmarks/encoder.py --device cuda --batch 4096 --index-items 50000 1000000
    python benchmarks/encoder.py --convs none input   # what the input convolution costs
    python benchmarks/encoder.py --pass-users 1 8 64 --lengths --bursts --index-items   # a small pass's cost
    python benchmarks/encoder.py --full-chunks 64 128 512 --lengths --bursts --index-items   # misses' pass size
    python benchmarks/encoder.py --serving-ops 7 --lengths --bursts --index-items --threads 1   # vs torch's ops
    python benchmarks/encoder.py --dtypes 5 --lengths --bursts --index-items --threads 1   # bf16 vs float32 here
    python benchmarks/encoder.py --attention 50 --lengths --bursts --index-items --threads 1   # a step's attention
    python benchmarks/encoder.py --linear-rows 3 --lengths --bursts --index-items --threads 1   # padded rows
    python benchmarks/encoder.py --packing 20 --lengths --bursts --index-items --threads 1   # misses packed

Weights are random (speed does not depend on them); the width and depth are the recipe's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.artifact import bf16_is_fast, cpu_has_amx_bf16, keep_attention_precompiled, keep_freed_memory
from model.data import featurize
from model.encoder import EncoderConfig, Packing, SequenceEncoder, encode_packed
from model.incremental import EncodeRequest, FusedLinear, IncrementalEncoder, with_bf16_linears


CONVS = {"none": {"conv_kernel": 0}, "input": {}}
RECIPE_CONVS = "none" if EncoderConfig.conv_kernel <= 1 else "input"


def histories(rng, users: int, length: int, n_items: int):
    out = []
    for _ in range(users):
        ts = np.cumsum(rng.exponential(600, length + 1)) + 1.7e9
        items = rng.integers(1, n_items + 1, length + 1)
        out.append([(f"i{i}", "view", float(t)) for i, t in zip(items, ts)])
    return out


def random_encoder(cfg: EncoderConfig, device: torch.device):
    """The recipe's encoder with seeded random weights, and its item -> token index."""
    torch.manual_seed(0)
    return SequenceEncoder(cfg).to(device).eval(), {f"i{n}": n for n in range(1, cfg.n_items + 1)}


def timed(fn, repeat: int) -> float:
    fn()  # warm up (allocations, kernels)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat


def bench_encoder(cfg: EncoderConfig, device: torch.device, batch: int, length: int, bf16: bool, repeat: int):
    enc, index = random_encoder(cfg, device)
    rng = np.random.default_rng(0)
    hist = histories(rng, batch, length, cfg.n_items)
    dtype = torch.bfloat16 if bf16 else torch.float32
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, device=device, dtype=dtype, bf16=bf16)
    users = [f"u{n}" for n in range(batch)]
    full_s = timed(lambda: inc.encode([EncodeRequest(u, h, new=length + 1, tail_after="0")
                                       for u, h in zip(users, hist)]), repeat)
    step = [0]

    def incremental():  # one new event per (warm) user, the tails chained from call to call
        step[0] += 1
        inc.encode([EncodeRequest(u, h, new=1, tail_before=str(step[0] - 1), tail_after=str(step[0]))
                    for u, h in zip(users, hist)])

    step_s = timed(incremental, repeat)
    assert inc.stats.hits >= batch * repeat, inc.stats.as_dict()
    return batch / step_s, batch / full_s


def bench_burst(cfg: EncoderConfig, device: torch.device, batch: int, length: int, burst: int, repeat: int):
    """Users/s for warm users with ``burst`` new events each (bf16 where fast): all in one
    pass, against the same events as ``burst`` one-event batches in a row."""
    enc, index = random_encoder(cfg, device)
    hist = histories(np.random.default_rng(0), batch, length + burst, cfg.n_items)
    bf16 = bf16_is_fast(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    users = [f"u{n}" for n in range(batch)]

    def run(together: bool):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, device=device, dtype=dtype, bf16=bf16)
        inc.encode([EncodeRequest(u, h[:length], new=length, tail_after="0") for u, h in zip(users, hist)])
        slots = np.array(list(inc.slot_of.values()))
        counts = inc.count[slots].copy()

        def once():   # back to the warm state (positions and tails), then the burst
            inc.count[slots] = counts
            for slot in slots:
                inc.tail[slot] = "0"
            if together:
                inc.encode([EncodeRequest(u, h, new=burst, tail_before="0", tail_after="b")
                            for u, h in zip(users, hist)])
            else:
                for n in range(burst):
                    inc.encode([EncodeRequest(u, h[:length + n + 1], new=1, tail_before="0" if n == 0 else f"b{n - 1}",
                                              tail_after=f"b{n}") for u, h in zip(users, hist)])
        return batch / timed(once, repeat), inc.stats

    (one_pass, stats), (one_by_one, _) = run(True), run(False)
    assert stats.misses == batch, stats.as_dict()   # every burst was stepped, none recomputed
    return one_pass, one_by_one


def bench_pass(cfg: EncoderConfig, device: torch.device, users: int, repeat: int):
    """Microseconds per one-event pass of ``users`` warm users (L 30), bf16: the serving
    encoder's linear weights cast to bf16 once (and fused, on the CPU), against autocast casting
    them on every pass."""
    enc, index = random_encoder(cfg, device)
    hist = histories(np.random.default_rng(0), users, 30, cfg.n_items)
    names = [f"u{n}" for n in range(users)]
    out = []
    for cast_once in (True, False):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 30, device=device, dtype=torch.bfloat16, bf16=True)
        if not cast_once:
            inc.encoder = enc   # the float32 weights: autocast casts them in each pass
        inc.encode([EncodeRequest(u, h[:30], new=30, tail_after="0") for u, h in zip(names, hist)])
        step = [0]

        def one():
            step[0] += 1
            inc.encode([EncodeRequest(u, h[:30], new=1, tail_before=str(step[0] - 1), tail_after=str(step[0]))
                        for u, h in zip(names, hist)])
        out.append(timed(one, repeat) * 1e6)
    return out


def bench_serving_ops(cfg: EncoderConfig, users: int, rounds: int):
    """Medians over ``rounds`` alternating rounds, in one process, on the CPU in bf16: per user
    of a full recompute (L 50, ``users`` users new to the cache) and per one-event pass of 1, 8
    and 64 warm users, for the serving encoder's operators (oneDNN linear layers with packed
    weights and fused bias and GELU; cache slots copied through numpy) against torch's
    (``torch.nn.Linear``, ``index_copy_`` / ``index_select``), each change alone and both."""
    enc, index = random_encoder(cfg, torch.device("cpu"))
    hist = histories(np.random.default_rng(0), users, 50 + 3 * 8, cfg.n_items)
    variants = {}
    for name, fuse, host in (("torch's operators", False, False), ("fused linear layers", True, False),
                             ("numpy slot copies", False, True), ("both (serving)", True, True)):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, dtype=torch.bfloat16, bf16=True)   # pages: as used
        inc.encoder, inc.host_copies = with_bf16_linears(enc, fuse=fuse), host
        variants[name] = inc
    return alternating_rounds(variants, hist, users, rounds)


def bench_dtypes(cfg: EncoderConfig, users: int, rounds: int):
    """Medians over ``rounds`` alternating rounds, in one process, on the CPU: the serving
    encoder with bf16 products against float32 ones (what `bf16_is_fast` chooses between), the
    float32 encoder's step attention in float32 over the bf16 cache (upcast, the default) or in
    bf16, and a float32 cache (twice the bytes per user)."""
    enc, index = random_encoder(cfg, torch.device("cpu"))
    hist = histories(np.random.default_rng(0), users, 50 + 3 * 8, cfg.n_items)
    variants = {}
    for name, bf16, cache, attend in (("bf16 products", True, torch.bfloat16, torch.bfloat16),
                                      ("float32 products", False, torch.bfloat16, torch.float32),
                                      ("... attention in bf16", False, torch.bfloat16, torch.bfloat16),
                                      ("... float32 cache", False, torch.float32, torch.float32)):
        inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, dtype=cache, bf16=bf16)   # pages: as used
        inc.attend_dtype = attend
        variants[name] = inc
    return alternating_rounds(variants, hist, users, rounds)


def bench_attention(cfg: EncoderConfig, passes: int, sizes=(1, 8, 64, 512)) -> tuple[str, dict]:
    """Medians of ``passes`` one-event passes of 1, 8, 64 and 512 warm users (L 50) per variant,
    on the CPU (bf16 where fast): a step's attention over the cache as float32 products from
    PRODUCTS_MIN_QUERIES queries (`attend_by_products`: serving's choice on a CPU without AMX)
    against torch's fused operator always (serving's choice with AMX); returns serving's choice
    here and the medians by size. One encoder, the variant switched pass by pass: two encoders'
    caches sit at different addresses, and that alone moved a pass by up to ~15% (an A/A run)."""
    bf16 = bf16_is_fast(torch.device("cpu"))
    enc, index = random_encoder(cfg, torch.device("cpu"))
    warm_up = 10   # untimed passes per size first (kernels compiled, pages touched)
    hist = histories(np.random.default_rng(0), max(sizes), 50 + 2 * (passes + warm_up), cfg.n_items)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, dtype=torch.bfloat16, bf16=bf16)
    out = {}
    for size in sizes:
        inc.clear()
        inc.encode([EncodeRequest(f"u{n}", h[:50], new=50, tail_after="50") for n, h in enumerate(hist[:size])])
        spent = {True: [], False: []}
        at = 50
        for round_ in range(warm_up + passes):
            for products in (True, False):
                inc.attend_products = products
                requests = [EncodeRequest(f"u{n}", hist[n][at - 49:at + 1], new=1, tail_before=str(at),
                                          tail_after=str(at + 1)) for n in range(size)]
                at += 1
                started = time.perf_counter()
                inc.encode(requests)
                if round_ >= warm_up:
                    spent[products].append(time.perf_counter() - started)
        assert inc.stats.hits >= 2 * (warm_up + passes) * size, inc.stats.as_dict()
        out[size] = {mode: float(np.median(t)) * 1e6 for mode, t in spent.items()}
    return ("products" if inc.attend_products else "fused operator"), out


def bench_linear_rows(rounds: int):
    """A [rows, 256] x [256, 1024] + GELU oneDNN product (`FusedLinear`) over 1,800 row counts
    of 1-6,400 (the range of a pass's users x positions): rows padded by `bucket_rows` against
    the exact counts. Seconds of the first pass over them (kernels compiled; padded first, so
    that the counts up to 32 both use are compiled on its time) and medians of ``rounds``
    alternating passes once compiled. None where oneDNN takes no bf16 layer."""
    linear = torch.nn.Linear(256, 1024).to(torch.bfloat16)
    if not FusedLinear.available(linear.weight):
        return None
    fused = FusedLinear(linear, gelu=True)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(1, 400, 1500), rng.integers(400, 6400, 300)]).tolist()
    rng.shuffle(rows)
    x = torch.randn(6400, 256).to(torch.bfloat16)
    variants = {"padded": lambda m: fused(x[:m]),
                "exact": lambda m: torch.ops.mkldnn._linear_pointwise(x[:m], fused.packed, fused.bias, fused.attr,
                                                                      [], fused.algorithm)}

    def seconds(product) -> float:
        started = time.perf_counter()
        for m in rows:
            product(m)
        return time.perf_counter() - started

    with torch.inference_mode():
        first = {name: seconds(product) for name, product in variants.items()}
        again = {name: [] for name in variants}
        for _ in range(rounds):
            for name, product in variants.items():
                again[name].append(seconds(product))
    return len(set(rows)), first, {name: float(np.median(t)) for name, t in again.items()}


def bench_packing(cfg: EncoderConfig, rounds: int, pass_users=(16, 128)):
    """A full-recompute pass's forward (bf16 where fast) over windows packed whole into rows
    (`Packing`, serving) against the same windows left-padded to the longest (the encoder's
    own forward, newest position only): µs per user, medians of ``rounds`` alternating rounds,
    for passes of ``pass_users`` users with windows of 1-50 events (uniform) and of 50 each."""
    device = torch.device("cpu")
    bf16 = bf16_is_fast(device)
    enc, index = random_encoder(cfg, device)
    if bf16:
        enc = with_bf16_linears(enc)
    rng = np.random.default_rng(0)
    out = {}
    for users in pass_users:
        for mix, lengths in (("1-50 events", rng.integers(1, 51, users)), ("50 events", np.full(users, 50))):
            hist = [h[:n] for h, n in zip(histories(rng, users, 50, cfg.n_items), lengths)]
            *columns, known = featurize(hist, index, cfg.max_len)
            padded = [torch.from_numpy(c) for c in columns]

            def packed():
                packing = Packing.of(known)
                encode_packed(enc, *(torch.from_numpy(packing.lay_out(c)) for c in columns), packing)

            variants = {"packed": packed, "padded": lambda: enc(*padded, last_only=True)}
            spent = {name: [] for name in variants}
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for round_ in range(rounds + 1):   # round 0 warms up
                    for name, run in variants.items():
                        started = time.perf_counter()
                        run()
                        if round_:
                            spent[name].append(time.perf_counter() - started)
            rows = Packing.of(known).owner.shape[0]
            out[(users, mix)] = ({name: float(np.median(t)) / users * 1e6 for name, t in spent.items()}, rows)
    return out


def alternating_rounds(variants: dict[str, IncrementalEncoder], hist, users: int, rounds: int):
    """Per variant, medians over ``rounds`` rounds (variants alternating within each): µs per
    user of a full recompute (L 50, ``users`` users new to the cache) and µs per one-event pass
    of 1, 8 and 64 warm users."""
    times = {name: {"full": [], 1: [], 8: [], 64: []} for name in variants}
    for round_ in range(rounds + 1):   # round 0 warms up
        for name, inc in variants.items():
            inc.clear()
            started = time.perf_counter()
            inc.encode([EncodeRequest(f"u{n}", h[:50], new=50, tail_after="50") for n, h in enumerate(hist)])
            full = (time.perf_counter() - started) / users * 1e6
            at, passes = 50, {}
            for size in (1, 8, 64):
                spent = []
                for _ in range(3):
                    requests = [EncodeRequest(f"u{n}", hist[n][at - 49:at + 1], new=1, tail_before=str(at),
                                              tail_after=str(at + 1)) for n in range(min(size, users))]
                    at += 1
                    started = time.perf_counter()
                    inc.encode(requests)
                    spent.append(time.perf_counter() - started)
                passes[size] = float(np.median(spent)) * 1e6
            if round_:
                times[name]["full"].append(full)
                for size, us in passes.items():
                    times[name][size].append(us)
    return {name: {key: float(np.median(v)) for key, v in t.items()} for name, t in times.items()}


def bench_full_chunks(cfg: EncoderConfig, device: torch.device, users: int, chunks: list[int], repeat: int):
    """Microseconds per user of full recomputes (L 50, bf16 where fast) of ``users`` users new to
    the cache, in passes of each of ``chunks`` users (``IncrementalEncoder.full_chunk``); best of
    ``repeat`` rounds, the chunk sizes alternating within each round."""
    enc, index = random_encoder(cfg, device)
    hist = histories(np.random.default_rng(0), users, 50, cfg.n_items)
    bf16 = bf16_is_fast(device)
    inc = IncrementalEncoder(enc, index, budget_bytes=1 << 34, device=device,
                             dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16)
    requests = [EncodeRequest(f"u{n}", h, new=len(h), tail_after="0") for n, h in enumerate(hist)]
    best = dict.fromkeys(chunks, float("inf"))
    for round_ in range(repeat + 1):   # round 0 warms up
        for chunk in chunks:
            inc.full_chunk = chunk
            inc.clear()
            started = time.perf_counter()
            inc.encode(requests)
            if round_:
                best[chunk] = min(best[chunk], time.perf_counter() - started)
    return {chunk: seconds / users * 1e6 for chunk, seconds in best.items()}


def bench_index(dim: int, n_items: int, batch: int, device: torch.device, repeat: int, k: int = 100):
    """Candidate queries/s of the index "auto" builds for `n_items` (on the GPU when `device` is
    CUDA: faiss-gpu if installed, else torch's exact search), and of exact search; exact search
    on the CPU (torch) beside faiss-cpu's own flat index, which it replaced."""
    from index.item_index import ItemIndex, TorchExactIP

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(64, dim)).astype(np.float32)
    items = centers[rng.integers(0, 64, n_items)] + 0.3 * rng.normal(size=(n_items, dim)).astype(np.float32)
    queries = items[rng.integers(0, n_items, batch)] + 0.3 * rng.normal(size=(batch, dim)).astype(np.float32)
    out = []
    for kind in ("auto", "flat"):
        if out and out[0][0] == "flat":
            break   # "auto" already chose exact search
        index = ItemIndex.build(items, kind=kind, use_gpu=device.type == "cuda")
        seconds = timed(lambda: index.search(queries, k), repeat)
        out.append((index.info.kind, index.backend, batch / seconds))
        if isinstance(index._index, TorchExactIP) and index._index.device.type == "cpu":
            seconds = timed(lambda: index._index.flat.search(queries, k), repeat)
            out.append(("flat", "faiss-cpu", batch / seconds))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--index-items", type=int, nargs="*", default=None,
                   help="catalogue sizes for the index queries/s (default: --items; none: skip)")
    p.add_argument("--dim", type=int, default=EncoderConfig.dim)
    p.add_argument("--convs", nargs="+", choices=list(CONVS), default=[RECIPE_CONVS],
                   help="with and without the recipe's input convolution, to compare its serving cost")
    p.add_argument("--lengths", type=int, nargs="*", default=[10, 50])
    p.add_argument("--bursts", type=int, nargs="*", default=[4],
                   help="new events per warm user in one batch (at L = 30), one pass vs one batch per event")
    p.add_argument("--pass-users", type=int, nargs="*", default=[],
                   help="warm users in one one-event pass: its microseconds, linear weights cast to bf16 once "
                        "(and fused, on the CPU) vs by autocast in every pass (where bf16 is fast)")
    p.add_argument("--serving-ops", type=int, default=0, metavar="ROUNDS",
                   help="CPU, bf16: the serving encoder's operators against torch's, alternating rounds "
                        "(full recomputes of --batch users, one-event passes of 1, 8, 64 users)")
    p.add_argument("--dtypes", type=int, default=0, metavar="ROUNDS",
                   help="CPU: bf16 against float32 products (and the float32 encoder's attention and cache "
                        "dtypes), alternating rounds (full recomputes of --batch users, one-event passes)")
    p.add_argument("--attention", type=int, default=0, metavar="PASSES",
                   help="CPU: a step's attention as float32 products against torch's fused operator, "
                        "one-event passes of 1, 8, 64 and 512 warm users alternating on one encoder")
    p.add_argument("--linear-rows", type=int, default=0, metavar="ROUNDS",
                   help="CPU, bf16: oneDNN products over 1,800 row counts, padded to few sizes against exact")
    p.add_argument("--packing", type=int, default=0, metavar="ROUNDS",
                   help="CPU: a full recompute's windows packed into rows against left-padded, mixed lengths")
    p.add_argument("--full-chunks", type=int, nargs="*", default=[],
                   help="users per full-recompute pass: microseconds per user of --batch users new to the cache")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave malloc's defaults (the worker keeps freed memory: model.artifact.keep_freed_memory)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keep_attention_precompiled(device)   # as a loaded model does (on CUDA)
    kept = False if args.glibc_defaults else keep_freed_memory()
    print(f"device {device}, batch {args.batch}, {args.items:,} items, dim {args.dim}, "
          f"torch threads {torch.get_num_threads()}, malloc {'keeps freed memory' if kept else 'defaults'}")
    if args.lengths:
        print(f"{'L':>4} {'convs':>6} {'dtype':>6} {'incremental vec/s':>18} {'full vec/s':>12} {'ratio':>7}")
    for length in args.lengths:
        for convs in args.convs:
            cfg = EncoderConfig(n_items=args.items, dim=args.dim, max_len=max(50, length + 1), **CONVS[convs])
            for bf16 in (False, True):
                inc, full = bench_encoder(cfg, device, args.batch, length, bf16, args.repeat)
                print(f"{length:>4} {convs:>6} {'bf16' if bf16 else 'fp32':>6} {inc:>18,.0f} {full:>12,.0f} "
                      f"{inc / full:>6.1f}x")
    for burst in args.bursts:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        one_pass, one_by_one = bench_burst(cfg, device, args.batch, 30, burst, args.repeat)
        print(f"burst of {burst} events per warm user (L 30): one pass {one_pass:,.0f} users/s, "
              f"one batch per event {one_by_one:,.0f} users/s ({one_pass / one_by_one:.1f}x)")
    if args.pass_users and not bf16_is_fast(device):
        print("--pass-users: bf16 is not fast here (the encoder serves in float32); skipped")
    else:
        for users in args.pass_users:
            cfg = EncoderConfig(n_items=args.items, dim=args.dim)
            once, each = bench_pass(cfg, device, users, max(args.repeat, 200 // users))
            print(f"one-event pass of {users} warm users (L 30, bf16): {once:,.0f} us with the weights cast "
                  f"once (fused on the CPU), {each:,.0f} us cast in every pass")
    if args.serving_ops and (device.type != "cpu" or not bf16_is_fast(device)):
        print("--serving-ops: for a CPU that runs bf16 fast; skipped")
    elif args.serving_ops:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        for name, t in bench_serving_ops(cfg, args.batch, args.serving_ops).items():
            print(f"{name:>20}: full recompute {t['full']:,.0f} us/user (L 50, {args.batch} users); one-event pass "
                  f"of 1 / 8 / 64 warm users {t[1]:,.0f} / {t[8]:,.0f} / {t[64]:,.0f} us "
                  f"(medians of {args.serving_ops} alternating rounds)")
    if args.dtypes:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        native = bf16_is_fast(torch.device("cpu"))
        print(f"native bf16 instructions: {native} (the worker serves in {'bf16' if native else 'float32'} "
              f"on this CPU)")
        for name, t in bench_dtypes(cfg, args.batch, args.dtypes).items():
            print(f"{name:>22}: full recompute {t['full']:,.0f} us/user (L 50, {args.batch} users); one-event pass "
                  f"of 1 / 8 / 64 warm users {t[1]:,.0f} / {t[8]:,.0f} / {t[64]:,.0f} us "
                  f"(medians of {args.dtypes} alternating rounds)")
    if args.attention:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        serving, times = bench_attention(cfg, args.attention)
        print(f"serving here: {serving} (AMX-BF16: {cpu_has_amx_bf16()})")
        for size, t in times.items():
            print(f"one-event pass of {size} warm users (L 50): products {t[True]:,.0f} us, fused operator "
                  f"{t[False]:,.0f} us (medians of {args.attention} passes each, alternating)")
    if args.linear_rows:
        got = bench_linear_rows(args.linear_rows)
        if got is None:
            print("linear rows: oneDNN takes no bf16 linear layer here")
        else:
            sizes, first, again = got
            for name in first:
                print(f"{name:>7} rows: 1,800 products of 1-6,400 rows ({sizes} counts) {first[name]:.2f} s compiling, "
                      f"{again[name]:.2f} s compiled (median of {args.linear_rows} alternating passes)")
    if args.packing:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        for (users, mix), (t, rows) in bench_packing(cfg, args.packing).items():
            print(f"full-recompute pass of {users} users of {mix}: packed into {rows} rows {t['packed']:,.0f} us/user, "
                  f"left-padded {t['padded']:,.0f} (medians of {args.packing} alternating rounds)")
    if args.full_chunks:
        cfg = EncoderConfig(n_items=args.items, dim=args.dim)
        per_user = bench_full_chunks(cfg, device, args.batch, args.full_chunks, args.repeat)
        print(f"full recompute of {args.batch} users (L 50), passes of " + ", ".join(
            f"{chunk}: {us:,.0f} us/user" for chunk, us in per_user.items()))
    for n_items in [args.items] if args.index_items is None else args.index_items:
        for kind, backend, qps in bench_index(args.dim, n_items, args.batch, device, args.repeat):
            print(f"index {n_items:>9,} items, {kind:>4} on {backend:>10}: {qps:>10,.0f} queries/s "
                  f"(k=100, batch {args.batch})")


if __name__ == "__main__":
    main()
