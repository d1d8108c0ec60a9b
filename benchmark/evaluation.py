"""``medrobust.evaluate``: benchmark an in-memory PyTorch module in one call, for people who live in notebooks.

It builds the same run a config describes (the module behind the declared input contract, the attacks, budgets,
objectives and threat models), runs it with the same runner into the same store, reliability checks and page,
and returns the cells and the per-subject rows as pandas DataFrames. A re-run with the same module, weights and
settings finds its cells finished.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn
from tqdm import tqdm

from medrobust.errors import FieldError, MedrobustError
from medrobust.models.adapter import contract_from
from medrobust.models.sources import ModelSource, in_memory
from medrobust.runner.config import ModelSpec, parse_config

# The paper's l-inf budgets (fractions of each image's intensity range).
DEFAULT_BUDGETS = ({"norm": "linf", "unit": "range", "epsilon": [5e-4, 1e-3, 2e-3]},)


@dataclass
class Evaluation:
    """What ``evaluate`` produced: the run's cells and per-subject rows, its folder, store and page."""

    cells: pd.DataFrame
    samples: pd.DataFrame
    out: Path
    store: Path
    page: Path | None
    failed: list[tuple[str, str]]


def evaluate(model: nn.Module, data: str | Path, *, input_shape: Sequence[int], voxel_size: Sequence[float],
             normalization: str = "zscore_brain", inputs: str = "image", features: Sequence[str] | None = None,
             output: str = "years", age_mean: float | None = None, age_std: float | None = None,
             bin_centres: Sequence[float] | None = None, space: str = "resample",
             attacks: Sequence[str | dict] = ("fgsm", "pgd"),
             budgets: Sequence[dict] = DEFAULT_BUDGETS, objectives: str | Sequence[str] = "older",
             threat_models: str | Sequence[str] = "fixed", split: str = "all", count: int | None = None,
             label: str | None = None, out: str | Path = "runs/evaluate", batch_size: int = 8, device: str = "auto",
             precision: str = "fp32", seed: int = 0, report: bool = True, progress: bool = True) -> Evaluation:
    """Benchmark ``model`` (any ``nn.Module``: ``forward(image)`` or, with ``inputs="image+features"``,
    ``forward(image, features)``) on the dataset at ``data`` (a BIDS folder or a CSV manifest).

    The input contract is declared as for a config's model of one's own: ``input_shape`` and ``voxel_size`` (the
    grid it was trained on; the data are resampled to it, or, with ``space="preprocessed"``, taken as stored and
    checked against it), ``normalization``, ``inputs`` and ``features``,
    ``output`` (``years``, ``standardized`` with ``age_mean``/``age_std``, or ``bins`` with ``bin_centres``).
    ``attacks``: registered names, or dicts of a name and its arguments (``{"name": "pgd", "steps": 10}``);
    ``budgets``: budget tables as in a config (norm, epsilon or a list, unit). Everything else is a config key of
    the same name (docs/running.md). Results go to ``<out>/results.sqlite`` (and the page, with ``report``)."""
    try:
        contract = contract_from({"input_shape": list(input_shape), "voxel_size": list(voxel_size),
                                  "normalization": normalization, "inputs": inputs, "output": output,
                                  "age_mean": age_mean, "age_std": age_std,
                                  "bin_centres": list(bin_centres) if bin_centres is not None else None,
                                  "space": space},
                                 features)
    except FieldError as error:
        raise MedrobustError(f"evaluate: {error.field} {error.problem}") from None
    if not isinstance(model, nn.Module):
        raise MedrobustError(f"evaluate: model must be a torch.nn.Module, got {type(model).__name__}")
    dataset = {"path": str(data), "split": split}
    if count is not None:
        dataset["count"] = count
    table = {"out": str(out), "seed": seed, "batch_size": batch_size, "device": device, "precision": precision,
             "objective": list([objectives] if isinstance(objectives, str) else objectives),
             "threat_model": list([threat_models] if isinstance(threat_models, str) else threat_models),
             "dataset": dataset, "attacks": [{"name": a} if isinstance(a, str) else dict(a) for a in attacks],
             "budgets": [dict(b) for b in budgets]}
    name = label or type(model).__name__
    source = ModelSource(memory=in_memory(model), contract=contract, name=name, where="evaluate")
    spec = ModelSpec(name=f"module:{type(model).__module__}.{type(model).__qualname__}", label=name,
                     train_if_missing=False, source=source)
    config = parse_config(table, "evaluate", models=[spec])

    from medrobust.results.store import ResultStore
    from medrobust.runner import run
    from medrobust.runner.plan import PLAN_CACHE

    summary = run(config, progress=progress, echo=tqdm.write if progress else (lambda line: None))
    page = None
    if report:
        from medrobust.reports import write_report

        page = write_report(summary.out)
    ids = json.loads((summary.out / PLAN_CACHE).read_text())["cells"]
    with ResultStore(summary.out, create=False) as store:
        cells, samples = store.cells(), store.samples()
    cells = cells[cells["id"].isin(ids)].reset_index(drop=True)
    samples = samples[samples["cell_id"].isin(ids)].reset_index(drop=True)
    return Evaluation(cells, samples, summary.out, summary.store, page, summary.failed)
