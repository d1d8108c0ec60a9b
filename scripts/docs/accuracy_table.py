"""Clean accuracy of registered models on the built-in cohort, over several training seeds.

    python scripts/docs/accuracy_table.py --n 1000 --seeds 0 1 2 --out runs/accuracy --markdown docs/accuracy.md
    python scripts/docs/accuracy_table.py --models sfcn densenet121 --seeds 0 --epochs 10 --threads 1 \
        --section zoo --markdown docs/accuracy.md

Generates the cohort (or reuses it), trains the models (default: the four of the paper, cnn3d, hybrid,
hybrid_e2e and features_mlp) once per training seed on the same subject-level split (split seed 0: 70 % train,
10 % validation, 20 % test), and writes a table of clean test MAE (mean and sd over the training seeds), Pearson r
and n. The table replaces its own section of the markdown file (between `<!-- accuracy:NAME -->` and
`<!-- /accuracy:NAME -->`), so that tables measured by different invocations share one page.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from medrobust.data.cohort import synthesize
from medrobust.models import list_models, training_order
from medrobust.settings import CohortSpec, TrainingConfig
from medrobust.training import TrainRequest, train

# The four models of Li et al. 2020's comparison: the default set.
PAPER_MODELS = ("cnn3d", "hybrid", "hybrid_e2e", "features_mlp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="cohort size")
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), help="registered models to train")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--section", default="builtin", help="the markdown section the table replaces")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(list_models()))
    if unknown:
        parser.error(f"not registered: {', '.join(unknown)} (registered: {', '.join(list_models())})")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    spec = CohortSpec(n=args.n, seed=args.cohort_seed)
    cohort = synthesize(args.out / f"cohort-n{args.n}-seed{args.cohort_seed}", spec)
    models = training_order(args.models)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for seed in args.seeds:
        request = TrainRequest(data=cohort, models=models, out=args.out / "models",
                               config=TrainingConfig(epochs=args.epochs, seed=seed), device=args.device)
        for result in train(request):
            runs[result.name].append({"seed": seed, **result.test_metrics, "best_epoch": result.best_epoch,
                                      "seconds": round(result.seconds, 1)})
            print(f"seed {seed} {result.name}: MAE {result.test_metrics['mae']:.2f}", flush=True)
    minutes = (time.perf_counter() - started) / 60

    lines = [
        f"Built-in cohort: {args.n} subjects (cohort seed {args.cohort_seed}, grid {'x'.join(map(str, spec.shape))} "
        f"at {spec.voxel_size[0]:g} mm, ages {spec.age_range[0]:g}-{spec.age_range[1]:g}), split seed 0 "
        f"(train/val/test 70/10/20 %), training seeds {', '.join(map(str, args.seeds))}; default training settings "
        f"but {args.epochs} epochs at most, early stopping on validation MAE. Measured {date.today().isoformat()} "
        f"on {platform.machine()} CPU "
        f"({torch.get_num_threads()} torch threads), {minutes:.0f} min in all.",
        "",
        "| model | test MAE (years), mean ± sd over seeds | per seed | Pearson r (mean) | n test |",
        "|---|---|---|---|---|",
    ]
    ranked = sorted(models, key=lambda name: statistics.mean(r["mae"] for r in runs[name]))
    for name in ranked:
        maes = [r["mae"] for r in runs[name]]
        spread = f" ± {statistics.stdev(maes):.2f}" if len(maes) > 1 else " (one seed)"
        lines.append(f"| `{name}` | {statistics.mean(maes):.2f}{spread} | "
                     f"{', '.join(f'{m:.2f}' for m in maes)} | "
                     f"{statistics.mean(r['r'] for r in runs[name]):.3f} | {runs[name][0]['n']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (args.out / f"accuracy-{args.section}.json").write_text(json.dumps(runs, indent=2) + "\n")
    if args.markdown:
        command = (f"python scripts/docs/accuracy_table.py {' '.join(sys.argv[1:])}")
        write_section(args.markdown, args.section, f"Measured by `{command}`.\n\n{table}")


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the section ``name`` of the markdown file at ``path`` with ``text`` (appended when absent)."""
    start, end = f"<!-- accuracy:{name} -->", f"<!-- /accuracy:{name} -->"
    page = path.read_text() if path.is_file() else "# Clean accuracy on the built-in cohort\n"
    block = f"{start}\n{text}{end}"
    pattern = re.escape(start) + r".*?" + re.escape(end)
    page = re.sub(pattern, lambda _: block, page, flags=re.S) if start in page else f"{page.rstrip()}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)


if __name__ == "__main__":
    main()
