"""Wall time of training the four built-in models together on the demo cohort (500 subjects, default grid).

    python scripts/speed/training.py --out runs/speed-training

Generates the cohort if needed, warms the preprocessing cache, then times one `medrobust train` call with
cnn3d, hybrid, hybrid_e2e and features_mlp at the default settings, and prints each model's time and MAE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medrobust.data import load_prepared
from medrobust.data.cohort import synthesize
from medrobust.models import list_models, training_order
from medrobust.settings import CohortSpec
from medrobust.training import TrainRequest, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/speed-training"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    spec = CohortSpec(n=args.n)
    start = time.perf_counter()
    cohort = synthesize(args.out / f"cohort-n{args.n}", spec, progress=False)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    load_prepared(cohort, progress=False)
    preprocessed = time.perf_counter() - start

    start = time.perf_counter()
    results = train(TrainRequest(data=cohort, models=training_order(list_models()), out=args.out / "models",
                                 device=args.device, progress=False))
    total = time.perf_counter() - start
    rows = {r.name: {"seconds": round(r.seconds, 1), "best_epoch": r.best_epoch, **r.test_metrics} for r in results}
    report = {"n": args.n, "generate_s": round(generated, 1), "preprocess_s": round(preprocessed, 1),
              "train_all_s": round(total, 1), "threads": torch.get_num_threads(), "models": rows}
    print(f"cohort of {args.n}: generated in {generated:.1f} s (0 if reused), first preprocessing {preprocessed:.1f} s")
    print(f"four models trained in {total:.1f} s ({total / 60:.1f} min) with {torch.get_num_threads()} threads")
    for name, row in rows.items():
        print(f"  {name:14s} {row['seconds']:7.1f} s  best epoch {row['best_epoch']:3d}  test MAE {row['mae']:.2f}")
    (args.out / "bench_training.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
