"""What sharing the passes at the clean images saves: a grid run with ``share_clean_passes = false`` (every cell
alone) and ``true`` (cells that differ only in their budget computed together), alternately, side by side.

    python scripts/speed/shared_passes.py [--config configs/demo.toml] [--out runs/speed-shared] [--rounds 1]

The config's models must exist already (run `make demo` once); each run goes into a fresh folder with them, so only
attacking, metrics and store writes are timed. Per round and setting: the run's wall time and the sum of its cells'
``attack_seconds``, per attack and in all. It checks that both settings stored the same cells and rows bit for
bit (what depends on the run aside) and fails otherwise. Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from medrobust.results.store import ResultStore, comparable_store
from medrobust.runner import run
from medrobust.runner.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from runner import fresh_grid  # noqa: E402  (the folder of this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--out", default="runs/speed-shared")
    parser.add_argument("--rounds", type=int, default=1, help="alternating pairs of runs (alone, shared)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    figures, stores = [], {}
    for round_ in range(args.rounds):
        for share in (False, True):
            out = Path(args.out) / ("shared" if share else "alone")
            config = load_config(fresh_grid(args.config, out, f"share_clean_passes = {str(share).lower()}\n"))
            began = time.perf_counter()
            summary = run(config, progress=False, echo=lambda *_: None)
            wall = time.perf_counter() - began
            if summary.failed:
                sys.exit(f"{len(summary.failed)} cells failed: {summary.failed[0]}")
            with ResultStore(out, writer=False) as store:
                cells = store.cells()
            stores[share] = comparable_store(out)
            per_attack = cells.groupby("attack")["attack_seconds"].sum()
            figures.append({"round": round_, "share_clean_passes": share, "cells": summary.cells,
                            "wall_seconds": wall, "attack_seconds": float(cells["attack_seconds"].sum()),
                            "attack_seconds_by_attack": {k: float(v) for k, v in per_attack.items()}})
        pd.testing.assert_frame_equal(stores[True][0], stores[False][0], check_exact=True)
        pd.testing.assert_frame_equal(stores[True][1], stores[False][1], check_exact=True)
    attacks = sorted(figures[0]["attack_seconds_by_attack"])
    print(f"| round | cells computed | run wall time | attack time | {' | '.join(attacks)} |")
    print("|---|---|---|---|" + "---|" * len(attacks))
    for row in figures:
        label = "together (shared)" if row["share_clean_passes"] else "alone"
        by = " | ".join(f"{row['attack_seconds_by_attack'][a]:.1f} s" for a in attacks)
        print(f"| {row['round'] + 1} | {label} | {row['wall_seconds']:.1f} s | {row['attack_seconds']:.1f} s | {by} |")
    print("The two settings stored the same cells and rows, bit for bit.")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
