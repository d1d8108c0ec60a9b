"""The driver of a run (``run``): holds the store's writer lock, provisions data and models, plans the grid (or
answers from the cached plan), hands the pending cells to an executor, writes each outcome as it arrives, and
redoes the reliability checks over the whole store."""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medrobust.devices import cpu_threads, deterministic_cuda, resolve_devices
from medrobust.environment import describe_environment
from medrobust.errors import MedrobustError
from medrobust.faults import fault_point
from medrobust.results.examples import write_examples
from medrobust.results.reliability import reliability_flags
from medrobust.results.store import ResultStore
from medrobust.runner.cells import sharing_groups
from medrobust.runner.config import RunConfig
from medrobust.runner.execute import CellTask
from medrobust.runner.executors import check_executor, make_executor
from medrobust.runner.inputs import LoadedInputs
from medrobust.runner.plan import PLAN_CACHE, cached_plan, plan_cells, plan_key
from medrobust.runner.provision import ensure_dataset, ensure_models


@dataclass
class RunSummary:
    """What one `medrobust run` did."""

    out: Path
    store: Path
    cells: int
    skipped: int
    done: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell description, error)
    failed_before: int = 0  # cells that failed in an earlier run and were skipped (not retried)
    unreliable: int = 0  # cells the reliability checks flag
    seconds: float = 0.0


def _finished_already(config: RunConfig, store: ResultStore, key: str, retry_failed: bool,
                      echo) -> RunSummary | None:
    """When the cached plan's cells are all in the store (failed ones counting unless ``retry_failed``), the run's
    summary without loading anything; else None."""
    ids = cached_plan(config, key)
    if ids is None:
        return None
    statuses = store.statuses()
    if any(statuses.get(i) is None or (retry_failed and statuses[i] == "failed") for i in ids):
        return None
    failed = sum(1 for i in ids if statuses[i] == "failed")
    cells = store.cells()
    flagged = set(cells[cells["reliability"].map(bool)]["id"]) & set(ids)
    return _skipping(RunSummary(out=config.out, store=store.path, cells=len(ids), skipped=len(ids), done=0,
                                failed_before=failed, unreliable=len(flagged)), echo)


def _skipping(summary: RunSummary, echo) -> RunSummary:
    """Say what a run skips: the finished cells, and those that failed before (unless retried)."""
    finished = summary.skipped - summary.failed_before
    if finished:
        echo(f"{finished} of {summary.cells} cells already finished in {summary.store}; skipping them")
    if summary.failed_before:
        echo(f"{summary.failed_before} cells failed in an earlier run; skipping them (--retry-failed reruns them)")
    return summary


def run(config: RunConfig, progress: bool = True, echo=tqdm.write, retry_failed: bool = False,
        executor: str = "local", ray_address: str | None = None, force: bool = False,
        only: str | None = None, retrain: bool = False) -> RunSummary:
    """Run every pending cell of `config` and record it in `<out>/results.sqlite`.

    Pending: not in the store yet; cells recorded as failed only with ``retry_failed``; every cell with ``force``
    (computed again on purpose, replacing its stored result). ``only``: a shell pattern; the run is then the cells
    whose description (``cnn3d pgd linf eps=0.001 range older fixed``) matches it. ``executor``: ``local``
    (in this process; one cell per GPU when several are visible) or ``ray`` (a Ray cluster at ``ray_address``, or a
    local one): either way only this process writes the store, one transaction per finished cell, so a killed run
    loses at most the cells in flight and the same command resumes it. ``retrain``: train a missing checkpoint
    even where the config's ``models_from`` holds one trained on this dataset with these settings."""
    began = time.perf_counter()
    check_executor(executor, ray_address)  # before anything is generated or trained
    devices = resolve_devices(config.device)
    if devices[0].type == "cuda":
        deterministic_cuda()
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # inside a regular file, on a read-only file system, an existing file's name
        raise MedrobustError(f"{config.source}: out = {str(config.out)!r} cannot be made a run folder "
                             f"({err.strerror or err}); choose another out") from None
    # The store's writer lock first: a second run on this folder is refused before it generates or trains anything.
    with cpu_threads(config.threads), ResultStore(config.out, writer=True) as store:
        summary = _run(config, store, devices, progress, echo, retry_failed, executor, ray_address, force, only,
                       retrain)
    summary.seconds = time.perf_counter() - began
    return summary


def _run(config: RunConfig, store: ResultStore, devices: list[torch.device], progress: bool, echo,
         retry_failed: bool, executor: str, ray_address: str | None, force: bool, only: str | None,
         retrain: bool) -> RunSummary:

    root = ensure_dataset(config, progress)
    sources = ensure_models(config, str(devices[0]), progress, echo, retrain)
    key = plan_key(config, root, sources, devices[0])
    finished = None if force or only else _finished_already(config, store, key, retry_failed, echo)
    if finished is not None:  # nothing to run: no models or subjects loaded, no run recorded
        return finished
    loaded = LoadedInputs(config, root, devices[0], progress)
    cells = plan_cells(config, root, sources, loaded, echo)
    (config.out / PLAN_CACHE).write_text(json.dumps({"key": key, "cells": [cell.id for cell in cells]}))
    fault_point("planned")
    if only is not None:
        cells = [cell for cell in cells if fnmatch.fnmatchcase(cell.describe(), only)]
        if not cells:
            raise MedrobustError(f"--only {only!r} matches no cell of {config.source} (cells read e.g. "
                                 f"'cnn3d pgd linf eps=0.001 range older fixed')")
    relabelled = store.relabel({cell.id: cell.model for cell in cells})
    if relabelled:  # a model renamed in the config: its cells keep their results under the new label
        echo(f"{relabelled} stored cells take their model's label in {config.source}")
    statuses = store.statuses()
    pending = cells if force else [c for c in cells if statuses.get(c.id) != "done"
                                   and (retry_failed or statuses.get(c.id) is None)]
    summary = _skipping(RunSummary(
        out=config.out, store=store.path, cells=len(cells), skipped=len(cells) - len(pending), done=0,
        failed_before=0 if retry_failed or force else sum(1 for c in cells if statuses.get(c.id) == "failed")),
        echo)
    tasks = [CellTask(group, config, root, sources[group[0].model])
             for group in sharing_groups(pending, config.share_clean_passes)]
    names = {cell.id: cell.describe() for cell in cells}
    specs = {cell.id: cell.spec for cell in pending}
    bar = tqdm(total=len(pending), unit="cell", disable=not progress or not pending)

    def on_batch(state: dict) -> None:  # the cell in progress: what it is, how far, its deviation so far
        bar.set_postfix_str(f"{state['cell']}: {state['done']}/{state['of']} subjects, mean |deviation| so far "
                            f"{state['mean_abs_deviation']:.2f} y")

    # The run is recorded once its executor stands: a run that could not start is no run that died.
    with make_executor(executor, loaded, devices, ray_address) as pool:
        run_id = store.start_run(config.raw, describe_environment(devices[0]))
        for outcome in pool.map(tasks, on_batch if progress else None):
            fault_point("attacked")
            store.write_cell(outcome.cell_id, run_id, specs[outcome.cell_id], outcome.metrics, outcome.rows,
                             outcome.seconds, outcome.status, outcome.error)
            fault_point("written")
            write_examples(config.out, outcome.cell_id, outcome.examples)
            name = names[outcome.cell_id]
            if outcome.status == "failed":
                summary.failed.append((name, outcome.error))
                echo(f"FAILED {name}: {outcome.error}")
            else:
                summary.done += 1
                metrics = outcome.metrics
                echo(f"{name}: mean |deviation| {metrics['mean_abs_deviation']:.2f} y, adversarial MAE "
                     f"{metrics['adversarial_mae']:.2f} y (clean {metrics['clean_mae']:.2f} y), "
                     f"{outcome.seconds:.1f} s")
            bar.update(1)
    bar.close()
    # The checks compare cells with each other, so they are redone over the whole store each time.
    flags = reliability_flags(store.cells())
    store.write_reliability(flags)
    summary.unreliable = len(flags)
    for cell_id, reasons in sorted(flags.items()):
        echo(f"possibly unreliable: {names.get(cell_id, 'cell ' + cell_id)}: {'; '.join(reasons)}")
    store.finish_run(run_id)
    return summary
