"""Fixtures of the runner tests: the tables of a tiny run, and tiny run configs written into a folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TABLES = Path(__file__).parent / "fixtures" / "tiny_run.toml"


@pytest.fixture(scope="session")
def tiny_run_tables() -> Callable[[str | Path, int], str]:
    """Factory: ``tiny_run_tables(cohort, count)`` -> the ``[dataset]`` and ``[training]`` tables of a tiny run
    (fixtures/tiny_run.toml) with the built-in cohort at ``cohort`` and ``count`` subjects attacked."""
    text = TABLES.read_text()
    return lambda cohort, count: text.replace("{cohort}", str(cohort)).replace("{count}", str(count))


@pytest.fixture(scope="session")
def tiny_config(tiny_run_tables) -> Callable[[Path, str, str, str], Path]:
    """Factory: ``tiny_config(root, name, top, grid)`` writes ``<root>/<name>.toml``, a tiny run into
    ``<root>/<name>`` of one cnn3d (the cohort in ``<root>/cohort`` and the checkpoints in ``<root>/models``,
    shared by the runs of one folder), with the top-level keys ``top`` and the budgets and attacks ``grid``."""

    def write(root: Path, name: str, top: str, grid: str) -> Path:
        path = root / f"{name}.toml"
        path.write_text(f'out = "{root / name}"\nmodels_dir = "{root / "models"}"\n{top}\n'
                        + tiny_run_tables(root / "cohort", 3) + '\n[[models]]\nname = "cnn3d"\n' + grid)
        return path

    return write

