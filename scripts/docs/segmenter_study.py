"""How far an attack through the segmenter moves the segmented volumes, and how well the segmenter still segments.

    python scripts/docs/segmenter_study.py --config configs/threat_models.toml --models hybrid_e2e \
        --out runs/segmenter-study

For each model and l-inf budget of the config: PGD (the config's pgd settings) under `recomputed` with the
config's segmenter, on the config's subjects; per segmenter class, the relative change of its soft volume
(|attacked - clean| / clean) over the subjects, its median and maximum; the segmenter's mean Dice against the label
maps on the clean and on the attacked images, and the agreement (Dice) of its attacked segmentation with its clean
one. Writes `study.json` and `study.md` (a markdown table) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medrobust.attacks import Budget, create_attack
from medrobust.attacks.extractors import make_extractor
from medrobust.runner.config import load_config
from medrobust.runner.inputs import LoadedInputs, model_grid
from medrobust.runner.provision import model_sources
from medrobust.segmentation import class_lookup, confusion_counts, dice_from_counts, targets


def mean_dice(predicted: torch.Tensor, truth: torch.Tensor, n_classes: int) -> float:
    dice = dice_from_counts(confusion_counts(predicted.long(), truth.long(), n_classes))[1:]
    return float(dice[torch.isfinite(dice)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/threat_models.toml")
    parser.add_argument("--models", nargs="+", default=None, help="model labels (default: those with features)")
    parser.add_argument("--out", default="runs/segmenter-study")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    device = torch.device("cpu")
    loaded = LoadedInputs(config, config.dataset.path, device)
    segmenter, record = loaded.segmenter()
    n_classes = 1 + len(segmenter.class_names)
    pgd = next(spec for spec in config.attacks if spec.name == "pgd")
    budgets = [b for b in config.budgets if b.norm == "linf"]
    sources = model_sources(config)
    rows = []
    for spec in config.models:
        if args.models and spec.label not in args.models:
            continue
        model, _ = loaded.model(sources[spec.label])
        if not model.meta.uses_features:
            continue
        data = loaded.subjects(model_grid(model))
        truth = targets(data, slice(None), class_lookup(segmenter, data)) if data.labels is not None else None
        with torch.no_grad():
            parts = [data.images[i:i + 4] for i in range(0, len(data.ages), 4)]
            clean_volumes = torch.cat([segmenter.soft_volumes(part) for part in parts])
            clean_labels = torch.cat([segmenter.labels(part) for part in parts])
        for budget in budgets:
            began = time.perf_counter()
            attack = create_attack("pgd", model, budget=Budget(budget.norm, budget.epsilon, budget.unit),
                                   objective=config.objectives[0], threat_model="recomputed", seed=config.seed,
                                   **pgd.params)
            attacked_volumes, attacked_labels, shifts = [], [], []
            for start in range(0, len(data.ages), config.batch_size):
                rows_ = slice(start, start + config.batch_size)
                images, features = data.images[rows_], data.features[rows_]
                extractor = make_extractor("segmenter", None, data.feature_labels, data.feature_names, images,
                                           features, segmenter=segmenter)
                result = attack(images, features, data.ages[rows_], extractor=extractor)
                with torch.no_grad():
                    attacked_volumes.append(segmenter.soft_volumes(result.images))
                    attacked_labels.append(segmenter.labels(result.images))
                shifts.append(result.adversarial_prediction - result.clean_prediction)
            volumes, labels = torch.cat(attacked_volumes), torch.cat(attacked_labels)
            relative = ((volumes - clean_volumes).abs() / clean_volumes.clamp_min(1e-9)).double().numpy()
            present = clean_volumes.numpy().mean(0) > 0.5  # classes of at least half a mL on average
            per_class = {name: {"median": float(np.median(relative[:, c])), "max": float(relative[:, c].max())}
                         for c, name in enumerate(segmenter.class_names) if present[c]}
            row = {"model": spec.label, "epsilon": budget.epsilon, "unit": budget.unit, "n": len(data.ages),
                   "mean_shift_y": float(torch.cat(shifts).mean()),
                   "relative_change_median": float(np.median([v["median"] for v in per_class.values()])),
                   "relative_change_max": float(max(v["max"] for v in per_class.values())),
                   "largest_class": max(per_class, key=lambda name: per_class[name]["median"]),
                   "largest_class_median": max(v["median"] for v in per_class.values()),
                   "agreement_dice": mean_dice(labels, clean_labels, n_classes),
                   "seconds": round(time.perf_counter() - began, 1), "classes": per_class}
            if truth is not None:
                row["dice_clean"] = mean_dice(clean_labels, truth, n_classes)
                row["dice_attacked"] = mean_dice(labels, truth, n_classes)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "classes"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "config": str(args.config),
            "segmenter": str(config.segmenter), "segmenter_sha256": record.get("weights_sha256")}
    (out / "study.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| model | l-inf ε (of range) | mean shift (y) | volume change, median class | largest median (class) "
             "| max over subjects, classes | Dice vs label maps clean → attacked | Dice attacked vs clean |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        dice = (f"{row['dice_clean']:.3f} → {row['dice_attacked']:.3f}" if "dice_clean" in row else "–")
        lines.append(f"| {row['model']} | {row['epsilon']:g} | {row['mean_shift_y']:+.2f} | "
                     f"{100 * row['relative_change_median']:.2f} % | {100 * row['largest_class_median']:.2f} % "
                     f"({row['largest_class']}) | {100 * row['relative_change_max']:.1f} % | {dice} | "
                     f"{row['agreement_dice']:.3f} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(math.isnan(row["agreement_dice"]) for row in rows):
        raise SystemExit("a Dice is NaN: no class present")


if __name__ == "__main__":
    main()
