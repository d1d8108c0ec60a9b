"""The universal perturbation against the size of its fitting set (after Li et al. 2020's figure): the mean shift on
the subjects it was fitted on and on held-out subjects, side by side, clipped to each image's range and not.

    python scripts/docs/universal_fit_size.py [--sizes 10,25,50,100,200,350] [--held-out 100] [--out runs/universal-fit]

One grid per fitting-set size, run by the runner like any config (so every number is a stored, content-addressed
cell): the demo's checkpoints (`make demo` first) on the built-in cohort, the paper's universal attack (the sign
vote, 8 steps, l-inf 0.005 of the range, the same perturbation for every subject: keep_best = false) with clip
"none" (the paper's) and "image", fitted on the first N training subjects and applied to the first --held-out
test subjects. Writes a markdown table and the figure to --out (and the figure to --figure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from medrobust.results.store import ResultStore
from medrobust.runner import run
from medrobust.runner.config import parse_config


def grid(size: int, held_out: int, out: Path, models: list[str]) -> dict:
    attack = {"name": "universal", "algorithm": "sign", "steps": 8, "keep_best": False,
              "budgets": [{"norm": "linf", "unit": "range", "epsilon": [0.005]}]}
    return {"out": str(out / f"fit-{size}"), "models_dir": "runs/demo/models", "seed": 0, "batch_size": 10,
            "objective": "older", "threat_model": "fixed",
            "dataset": {"builtin": True, "path": "runs/demo/cohort", "subjects": 500, "split": "test",
                        "count": held_out, "fit_split": "train", "fit_count": size},
            "models": [{"name": name, "train_if_missing": False} for name in models],
            "attacks": [{**attack, "clip": "none"}, {**attack, "clip": "image"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,50,100,200,350")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--models", default="cnn3d,hybrid")
    parser.add_argument("--out", default="runs/universal-fit")
    parser.add_argument("--figure", default="docs/images/universal_fit_size.png")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        config = parse_config(grid(size, args.held_out, out, args.models.split(",")), f"fit size {size}")
        run(config, progress=True)
        with ResultStore(config.out, create=False) as store:
            cells = store.cells()
        for _, cell in cells[cells["status"] == "done"].iterrows():
            for subjects, prefix in (("fitting set", "fit_"), ("held out", "")):
                rows.append({"model": cell["model"], "clip": cell["params"]["clip"], "fit size": size,
                             "subjects": subjects, "mean shift (y)": cell[f"{prefix}mean_deviation"]})
    table = pd.DataFrame(rows)
    pivot = table.pivot_table(index=["model", "clip", "fit size"], columns="subjects", values="mean shift (y)")
    lines = ["| model | clip | fit size | fitting set (y) | held out (y) |", "|---|---|---|---|---|"]
    lines += [f"| {model} | {clip} | {size} | {row['fitting set']:.2f} | {row['held out']:.2f} |"
              for (model, clip, size), row in pivot.iterrows()]
    (out / "universal_fit_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(table, Path(args.figure), out / "universal_fit_size.png")


def figure(table: pd.DataFrame, *paths: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    grid = sns.relplot(data=table, x="fit size", y="mean shift (y)", hue="subjects", style="clip", col="model",
                       kind="line", marker="o", palette="colorblind", height=3.2, aspect=1.2)
    grid.set(xscale="log")
    grid.set_titles("{col_name}")
    grid.figure.suptitle("Universal perturbation (l-inf 0.005 of range): shift vs fitting-set size", y=1.03)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.figure.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
