"""What a defence costs in training, side by side: epochs of standard training against epochs of adversarial
training (PGD of the regression error, 3 steps) of the same model on the demo cohort, interleaved, in one
process, one torch thread; the ratio of the medians is the defence's cost as a multiple of standard training.

    python scripts/speed/defence_cost.py --data runs/demo/cohort --model cnn3d --rounds 2

The attack's passes per batch are exact (the sidecar of a defended checkpoint records them); this measures what
they cost in time on this machine, the training step's weight gradients included.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from medrobust.data import load_prepared
from medrobust.data.splits import load_or_create_splits
from medrobust.models import create_model, model_entrypoint
from medrobust.settings import TrainingConfig
from medrobust.training import architecture, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/cohort"))
    parser.add_argument("--model", default="cnn3d")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    index, preprocessing, data = load_prepared(args.data, progress=False)
    splits = load_or_create_splits(index.root, [s.subject_id for s in index.subjects], 0)
    train, val = data.subset(splits["train"]), data.subset(splits["val"])
    settings = {"standard": TrainingConfig(epochs=1),
                "adversarial": TrainingConfig(epochs=1, adversarial="pgd", adversarial_epsilon=0.002,
                                              adversarial_steps=args.steps)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, config in settings.items():
            torch.manual_seed(0)
            model = create_model(args.model, **architecture(model_entrypoint(args.model), preprocessing,
                                                             feature_names=data.feature_names))
            began = time.perf_counter()
            train_model(model, train, val, config, torch.device("cpu"), progress=False)
            seconds[name].append(time.perf_counter() - began)
    standard, adversarial = (statistics.median(seconds[name]) for name in settings)
    print(f"{args.model}: one epoch ({len(train.subject_ids)} subjects, validation included), median of "
          f"{args.rounds}: standard {standard:.1f} s, adversarial (pgd, {args.steps} steps) {adversarial:.1f} s, "
          f"{adversarial / standard:.2f}x")


if __name__ == "__main__":
    main()
