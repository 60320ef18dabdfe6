"""Recommendation quality of the default recipe on the public S3-Rec datasets, next to
published figures. Trains each dataset once per seed (the default TrainConfig, nothing
tuned per dataset), evaluates the test split (full ranking, leave-one-out, history masked).

    python benchmarks/quality.py [--datasets Beauty Sports_and_Outdoors] [--seeds 0 1 2]
                                 [--data-dir ../shared/data] [--out runs/quality]

Not part of CI: it takes up to the recipe's max_minutes per dataset and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

from model.data import load_log
from model.evaluate import evaluate_popularity
from model.train import TrainConfig, train
from shared_data import SHARED_DATA

# (HR@10, NDCG@10) on the same files, full ranking; README of the data and the papers it cites.
PUBLISHED = {
    "Beauty": {"SASRec (CE)": (0.0977, 0.0591), "best published": (0.1008, 0.0611)},
    "Sports_and_Outdoors": {"best published": (0.0612, 0.0335)},
}
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["Beauty", "Sports_and_Outdoors"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--popularity", action="store_true", help="also evaluate the most-popular baseline")
    p.add_argument("--threads", type=int, default=TrainConfig.threads,
                   help="torch threads per run (0: one per core); 1 lets two runs share a 2-core box")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    rows = []
    for ds in args.datasets:
        path = args.data_dir / f"{ds}.txt"
        if args.popularity:
            pop = evaluate_popularity(load_log(path), "test")
            rows.append({"dataset": ds, "seed": "popularity", **pop, "train_seconds": 0.0})
        for seed in args.seeds:
            out = args.out / ds / f"seed{seed}"
            t0 = time.time()
            artifact = train(path, dataclasses.replace(TrainConfig(), seed=seed, threads=args.threads), out, progress=True)
            test = artifact.metadata["metrics"]["test"]
            rows.append({"dataset": ds, "seed": seed, **test, "train_seconds": artifact.metadata["train_seconds"],
                         "best_epoch": artifact.metadata["best_epoch"], "weights": artifact.metadata["weights"],
                         "epochs": artifact.metadata["epochs_run"],
                         "wall_seconds": round(time.time() - t0, 1), "model": str(out)})
            print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print_table(rows, summary=True)


def print_table(rows: list[dict], summary: bool = False) -> None:
    print(f"\n{'dataset':<22}{'seed':>11}" + "".join(f"{m:>10}" for m in METRICS) + f"{'train s':>10}")
    for r in rows:
        print(f"{r['dataset']:<22}{r['seed']!s:>11}" + "".join(f"{r[m]:>10.4f}" for m in METRICS)
              + f"{r['train_seconds']:>10.0f}")
    if not summary:
        return
    print(f"\n{'dataset (mean ± std)':<22}" + "".join(f"{m:>17}" for m in METRICS) + f"{'train s':>10}")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        runs = [r for r in rows if r["dataset"] == ds and r["seed"] != "popularity"]
        if not runs:
            continue
        cells = []
        for m in METRICS + ("train_seconds",):
            xs = [r[m] for r in runs]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            mean = statistics.mean(xs)
            cells.append(f"{mean:.0f}" if m == "train_seconds" else f"{mean:.4f} ± {sd:.4f}")
        print(f"{ds:<22}" + "".join(f"{c:>17}" for c in cells[:-1]) + f"{cells[-1]:>10}")
        for name, (hr, ndcg) in PUBLISHED.get(ds, {}).items():
            print(f"{'  ' + name:<22}{hr:>17.4f}{ndcg:>17.4f}")


if __name__ == "__main__":
    main()
