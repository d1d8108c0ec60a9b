"""Runner overhead: a grid's total wall time against the sum of its cells' attack times, and the time of
re-running a finished grid.

    python scripts/speed/runner.py [--config configs/demo.toml] [--out runs/speed-runner] [--no-ssim]

The config's models must exist already (run `make demo` once): the grid runs into a fresh folder ``--out`` with
the config's checkpoints, so only attacking, metrics and store writes are timed. It reports (1) the wall time of
``medrobust.runner.run`` from the call to its return, which includes loading the models and the subjects, (2) the
sum of the cells' ``attack_seconds`` (the attack calls alone), their ratio, and (3) the wall time of a second
``medrobust run CONFIG --no-report`` as a new process (Python start-up and imports included), which finds every
cell finished. Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medrobust.results.store import ResultStore
from medrobust.runner import run
from medrobust.runner.config import load_config


def fresh_grid(config: str | Path, out: Path, top: str = "") -> Path:
    """The grid of ``config`` into the fresh (emptied) folder ``out``, with the config's own checkpoints (nothing
    is trained), and the top-level keys ``top`` added: the config file written there."""
    original = load_config(config)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = out / "config.toml"
    lines, top_level = [], True
    for line in Path(config).read_text().splitlines():
        top_level = top_level and not line.lstrip().startswith("[")
        if not (top_level and line.split("=")[0].strip() in ("out", "models_dir")):  # set here instead
            lines.append(line)
    path.write_text(f'out = "{out}"\nmodels_dir = "{original.models_dir}"\n{top}' + "\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--out", default="runs/speed-runner")
    parser.add_argument("--no-ssim", action="store_true", help="run the grid with ssim = false")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    out = Path(args.out)
    path = fresh_grid(args.config, out, "ssim = false\n" if args.no_ssim else "")
    config = load_config(path)
    began = time.perf_counter()
    summary = run(config, progress=False, echo=lambda *_: None)
    wall = time.perf_counter() - began
    if summary.failed:
        sys.exit(f"{len(summary.failed)} cells failed: {summary.failed[0]}")
    with ResultStore(out, writer=False) as store:
        cells = store.cells()
    attack = float(cells["attack_seconds"].sum())
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medrobust.cli", "run", str(path), "--quiet", "--no-report"],
                   check=True, capture_output=True)
    rerun = time.perf_counter() - began
    figures = {"config": args.config, "ssim": not args.no_ssim, "cells": summary.cells, "wall_seconds": wall,
               "attack_seconds": attack, "overhead_ratio": wall / attack, "rerun_seconds": rerun}
    print("| ssim | cells | run wall time | sum of attack times | ratio | finished grid re-run (new process) |")
    print("|---|---|---|---|---|---|")
    print(f"| {'no' if args.no_ssim else 'yes'} | {summary.cells} | {wall:.1f} s | {attack:.1f} s | "
          f"{wall / attack:.3f} | {rerun:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
