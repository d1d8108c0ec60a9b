"""The tables every tiny end-to-end run config shares (test data for the runner, scaling and resume tests)."""

from __future__ import annotations

from pathlib import Path


def tiny_run_tables(cohort: str | Path, count: int) -> str:
    """The ``[dataset]`` and ``[training]`` tables of a tiny run config: the built-in cohort (24 subjects on a 32^3
    grid at 6 mm) generated at ``cohort`` (a path, or a ``{cohort}`` placeholder filled in later), ``count`` test
    subjects attacked, models trained for one epoch."""
    return f"""
[dataset]
builtin = true
path = "{cohort}"
subjects = 24
shape = [32, 32, 32]
voxel_size = [6, 6, 6]
count = {count}

[training]
epochs = 1
batch_size = 4
"""
