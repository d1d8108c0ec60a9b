"""Computing a cell: its attack over the subjects batch by batch (out-of-memory backoff, reduced precision and
its fp32 parity check, timing), a universal perturbation's fit on its own subjects, and the per-subject rows.

An executor hands ``compute_cell`` a ``CellTask`` (a cell and the paths of its model and data) and gets a
``CellOutcome`` back, which only the driver writes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from medrobust.attacks.base import CleanPasses
from medrobust.attacks.budget import Budget
from medrobust.attacks.result import GRADIENT_FAULTS
from medrobust.data.preprocess import PreparedDataset
from medrobust.faults import fault_point
from medrobust.models import BrainAgeModel
from medrobust.models.segmenter import Segmenter
from medrobust.models.smoothing import SmoothedModel, certificate_draws, certify, smoothed_estimate
from medrobust.models.sources import ModelSource
from medrobust.results.examples import ExampleCollector
from medrobust.results.metrics import certificate_metrics, rows_metrics, sample_rows
from medrobust.runner.cells import Cell, build_attack, describe_group, is_set_level, subject_seeds
from medrobust.runner.config import RunConfig
from medrobust.runner.inputs import LoadedInputs, attack_inputs, batches, model_grid
from medrobust.settings import TrainingConfig
from medrobust.vocabulary import SEGMENTER_EXTRACTORS

# The autocast dtype of each reduced precision (fp32: no autocast).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The context the model's passes run in: nothing for fp32, torch.autocast in bfloat16 or float16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def _takes(call: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


class _Timer:
    """Attack time: CUDA events on a GPU (device time, no host stall inside the attack), wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        if not self.cuda:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        self.seconds += start.elapsed_time(end) / 1000


@dataclass
class CellCall:
    """One cell's attack over the subjects (``call``: an attack, or a fitted universal perturbation's ``apply``)
    and what it gathers batch by batch: its per-subject rows, pass counters, gradient faults, diagnostics and
    time. ``seed`` seeds a call that takes ``sample_seeds`` (one seed per subject); ``certify_at``: the budget
    its rows are certified at (``certified_budget``); ``examples`` collects its subjects' mid-slices."""

    call: Callable
    seed: int = 0
    certify_at: Budget | None = None
    examples: ExampleCollector | None = None
    timer: _Timer | None = None
    rows: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "steps": 0})
    gradient_faults: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    feature_change: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    error: Exception | None = None  # what failed it: the other calls of its group go on
    _pending: tuple | None = None  # the batch it has attacked, kept until every call of the batch has

    @functools.cached_property
    def accepts(self) -> tuple[bool, bool]:
        """Whether ``call`` takes ``sample_seeds`` and ``shared``: read from its signature once, not per batch."""
        return _takes(self.call, "sample_seeds"), _takes(self.call, "shared")

    def attack(self, inputs: dict, subjects: list[str], config: RunConfig, device: torch.device, parity: bool,
               shared: CleanPasses | None) -> None:
        """Attack one batch (``inputs``: ``attack_inputs``'), keeping its rows pending until ``keep``."""
        call = self.call
        inputs = dict(inputs)
        takes_seeds, takes_shared = self.accepts
        if takes_seeds:
            inputs["sample_seeds"] = subject_seeds(self.seed, subjects)
        if shared is not None and takes_shared:
            inputs["shared"] = shared
        with self.timer.measure(), autocast(device, config.precision):
            result = call(**inputs)
        if parity and config.precision != "fp32" and "parity_mean_abs_deviation" not in self.extra:
            inputs.pop("shared", None)
            reference = call(**inputs)  # the same first batch in fp32, alone, outside the attack's time
            self.extra["parity_mean_abs_deviation"] = _mean_abs_deviation(result)
            self.extra["parity_fp32_mean_abs_deviation"] = _mean_abs_deviation(reference)
        self._pending = inputs, subjects, result

    def keep(self, data: PreparedDataset, batch: slice, model: nn.Module, config: RunConfig,
             certificates: dict) -> None:
        """Take the pending batch's rows and counts in; ``certificates`` holds the batch's certificate draws once
        a call of the batch has made them (they serve every radius)."""
        inputs, subjects, result = self._pending
        self._pending = None
        batch_rows, moved = sample_rows(subjects, data.ages[batch], inputs["images"], inputs["features"],
                                        inputs["mask"], result, config.ssim)
        if self.certify_at is not None:
            _certify_rows(batch_rows, model, inputs, result, self.certify_at, subjects, certificates)
        self.rows.extend(batch_rows)
        if self.examples is not None:
            self.examples.add(batch_rows, inputs["images"], result.images)
        if moved is not None:
            self.feature_change.append(moved)
        for key in self.counters:
            self.counters[key] += getattr(result, key)
        for key in GRADIENT_FAULTS:  # subjects whose gradient was zero or non-finite (reliability checks)
            fault = getattr(result, key, None)
            if fault is not None:
                self.gradient_faults[key] = self.gradient_faults.get(key, 0) + int(fault.sum())
        for key, values in result.diagnostics.items():
            self.diagnostics.setdefault(key, []).append(values.detach().double().cpu())

    def metrics(self, batch_size_used: int) -> dict:
        """The cell's metrics over every subject."""
        metrics = rows_metrics(self.rows)
        metrics.update(self.counters, attack_seconds=self.timer.seconds, batch_size_used=batch_size_used,
                       **self.extra)
        metrics.update({f"{key}_subjects": count for key, count in self.gradient_faults.items()})
        # An attack's per-subject diagnostics (the ensemble's winners and unbounded probe), averaged over subjects.
        metrics.update({f"diag:{key}": float(torch.cat(values).mean()) for key, values in self.diagnostics.items()})
        if self.feature_change:  # the largest relative change of any context feature, averaged over subjects
            metrics["mean_feature_change_rel"] = float(torch.cat(self.feature_change).mean())
        if self.certify_at is not None:
            metrics.update(certificate_metrics(self.rows))
        return metrics


def _attack_subjects(calls: list[CellCall], data: PreparedDataset, model: BrainAgeModel, config: RunConfig,
                     device: torch.device, on_batch: Callable[[dict], None] | None = None,
                     extractor: str | None = None, segmenter: Segmenter | None = None, parity: bool = True
                     ) -> list[tuple[dict, list[dict]] | Exception]:
    """Run every call of ``calls`` over every subject of `data`, batch by batch; per call, (metrics, per-subject
    rows), or the exception that failed it (the others go on). With ``extractor`` (threat model ``recomputed``)
    each batch comes with that feature extractor (by ``segmenter`` for the segmenter extractors).

    The calls of one batch share its inputs and, where there are several (cells that differ only in their budget),
    the model passes at the clean images (``CleanPasses``): the clean prediction, and the gradient pass of an
    attack that starts at the clean images. Their rows are what each call alone gives, bit for bit; the
    batch's attack time is then split evenly between them (``shared_clean_passes`` says by how many).

    Batches have ``config.batch_size`` subjects until the device runs out of memory: the batch is then halved and
    retried (down to one subject), and later batches keep the smaller size; ``batch_size_used`` records it. In
    reduced precision (``config.precision``), the first batch is attacked in fp32 too and both mean |deviation|
    are kept (``parity_*``) for the reliability checks (with ``parity``)."""
    for call in calls:
        call.timer = _Timer(device)
    size, count, start = config.batch_size, len(data.subject_ids), 0
    shares = False  # whether the calls took passes from each other
    while start < count:
        batch = slice(start, min(start + size, count))
        subjects = data.subject_ids[batch]
        live = [call for call in calls if call.error is None]
        if not live:
            break
        before = [call.timer.seconds for call in live]
        shared = CleanPasses() if len(live) > 1 else None
        try:
            inputs = attack_inputs(data, batch, model, config, device, extractor, segmenter)
            for call in live:
                try:
                    call.attack(inputs, subjects, config, device, parity, shared)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # this cell fails, the others of its group go on
                    call.error, call._pending = err, None
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            inputs = None
            for call, seconds in zip(live, before, strict=True):
                call._pending, call.timer.seconds = None, seconds
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        done = [(call, seconds) for call, seconds in zip(live, before, strict=True) if call.error is None]
        if shared is not None and shared.taken and done:
            shares = True
            each = sum(call.timer.seconds - seconds for call, seconds in done) / len(done)
            for call, seconds in done:
                call.timer.seconds = seconds + each
        certificates: dict = {}
        for call, _ in done:
            try:
                call.keep(data, batch, model, config, certificates)
            except Exception as err:  # its metrics or certificate failed: this cell fails, the others go on
                call.error = err
        start = batch.stop
        done = [(call, seconds) for call, seconds in done if call.error is None]
        if on_batch is not None and done:
            rows = done[0][0].rows
            on_batch({"done": len(rows), "of": count,
                      "mean_abs_deviation": sum(abs(r["deviation"]) for r in rows) / len(rows)})
    outcomes: list[tuple[dict, list[dict]] | Exception] = []
    for call in calls:
        if call.error is not None:
            outcomes.append(call.error)
            continue
        metrics = call.metrics(size)
        if shares:
            metrics["shared_clean_passes"] = len(calls)
        outcomes.append((metrics, call.rows))
    return outcomes


def certified_budget(cell: Cell, model: nn.Module) -> Budget | None:
    """The budget a cell's subjects are certified at: an l2 budget of a median-smoothed model whose context
    features stay clean (the certificate covers image perturbations); None for every other cell."""
    if isinstance(model, SmoothedModel) and cell.budget.norm == "l2" and cell.threat_model == "fixed":
        return cell.budget
    return None


def _certify_rows(rows: list[dict], model: SmoothedModel, inputs: dict, result, budget: Budget,
                  subjects: list[str], certificates: dict) -> None:
    """Add each subject's certificate at the budget's radius (its own, in the model's input units) to its row, and
    the smoothed prediction of its attacked image from fresh draws. The draws are seeded from the smoothing's seed
    and the subject alone: a subject's certificate at a radius is the same in every cell, and the draws made for
    one cell of a batch (kept in ``certificates``) serve the others."""
    images, features = inputs["images"], inputs["features"]
    seeds = subject_seeds(model.smoothing.seed, subjects)
    if "draws" not in certificates:
        certificates["draws"] = certificate_draws(model, images, features, seeds)
    certificate = certify(model, images, features, budget.radius(images)[:, None], seeds, certificates["draws"])
    attacked = smoothed_estimate(model, result.images.to(images.dtype), result.features, seeds)
    for i, row in enumerate(rows):
        row.update(certified_lower=float(certificate.lower[i, 0]), certified_upper=float(certificate.upper[i, 0]),
                   smoothed_adversarial=float(attacked[i]))


def _mean_abs_deviation(result) -> float:
    return float((result.adversarial_prediction.double() - result.clean_prediction.double()).abs().mean())


# Metrics of a universal perturbation on the subjects it was fitted on, reported beside the held-out ones.
FIT_METRICS = ("n", "clean_mae", "adversarial_mae", "mean_abs_deviation", "mean_deviation", "success_5y")


def run_cells(cells: list[Cell], model: BrainAgeModel, data: PreparedDataset, config: RunConfig,
              device: torch.device, on_batch: Callable[[dict], None] | None = None,
              fit_data: PreparedDataset | None = None, examples: list[ExampleCollector] | None = None,
              segmenter: Segmenter | None = None) -> list[tuple[dict, list[dict]] | Exception]:
    """Attack every subject of `data` in batches, for each cell of ``cells`` (one model's cells that differ only in
    their budget: they share the passes at the clean images, see ``_attack_subjects``); per cell, (metrics,
    per-subject rows), or the exception that failed it. A universal perturbation (a single cell) is fitted once
    on `fit_data` (its batches stay in host memory until used), then applied to `data` (the held-out subjects
    whose rows are stored); its effect on the fitting subjects is in `fit_*`. Each cell's random draws are seeded
    from its ``cell_seed`` (default: the run's seed); ``examples`` collect each cell's (held-out) subjects'
    mid-slices for the page; ``segmenter``: the segmenter of a segmenter extractor's cells."""
    first = cells[0]
    extractor = first.spec.get("extractor") if first.threat_model == "recomputed" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calls = []
    for i, cell in enumerate(cells):
        seed = cell.spec.get("cell_seed", config.seed)
        call = CellCall(None, seed, certified_budget(cell, model), None if examples is None else examples[i])
        try:
            fault_point("attacking")
            call.call = build_attack(cell, model, config, seed)
        except Exception as err:  # a cell whose attack cannot be built fails alone
            call.error = err
        calls.append(call)
    if fit_data is None or not is_set_level(first.attack.name):
        outcomes = _attack_subjects(calls, data, model, config, device, on_batch, extractor, segmenter)
    else:
        if len(cells) != 1:
            raise ValueError("a universal perturbation's cell is computed on its own")
        call, attack = calls[0], calls[0].call
        if call.error is not None:
            return [call.error]
        began = time.perf_counter()
        with autocast(device, config.precision):
            # a segmenter's clean volumes are measured on its device, so those fitting batches live there
            attack.fit(batches(fit_data, model, config, device if segmenter is not None else None, extractor,
                               segmenter))
        fit_seconds = time.perf_counter() - began
        call.call = attack.apply
        outcomes = _attack_subjects([call], data, model, config, device, on_batch, extractor, segmenter)
        on_fit = _attack_subjects([CellCall(attack.apply, call.seed)], fit_data, model, config, device, None,
                                  extractor, segmenter, parity=False)[0]
        for outcome in (*outcomes, on_fit):
            if isinstance(outcome, Exception):
                return [outcome]
        metrics = outcomes[0][0]
        for key, count in zip(("forward", "backward", "steps"), attack.fit_counters, strict=True):
            metrics[key] += count
        for key, count in attack.fit_gradient_faults.items():
            metrics[f"{key}_subjects"] = metrics.get(f"{key}_subjects", 0) + count
        metrics["attack_seconds"] += fit_seconds
        metrics.update({f"fit_{key}": on_fit[0][key] for key in FIT_METRICS})
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    for outcome in outcomes:
        if not isinstance(outcome, Exception):
            outcome[0].update(timing="cuda-events" if device.type == "cuda" else "wall-clock",
                              peak_memory_bytes=peak)
    return outcomes


@dataclass
class CellTask:
    """What an executor runs: one model's cells that are computed together (``medrobust.runner.cells.
    sharing_groups``: a single cell, or cells that differ only in their budget) and where its model and data live
    (paths, no tensors: it pickles small)."""

    cells: list[Cell]
    config: RunConfig
    root: Path
    model: ModelSource


@dataclass
class CellOutcome:
    """A finished cell as the driver writes it: status ``done`` with metrics and rows, or ``failed`` and why."""

    cell_id: str
    status: str
    metrics: dict
    rows: list[dict]
    seconds: float
    error: str | None = None
    # The median and the worst subject's mid-slices (medrobust.results.examples), for the page.
    examples: list[dict] = field(default_factory=list)


def model_card(model: BrainAgeModel, record: dict) -> dict:
    """What the page's model card says of a model: its parameters, input contract and, from a checkpoint's sidecar,
    how it was trained and its clean test metrics (None where it has none: a model of one's own)."""
    meta, extra = model.meta, record.get("extra") or {}
    training = extra.get("training") or {}
    return {"parameters": int(sum(parameter.numel() for parameter in model.parameters())),
            "input_shape": list(meta.input_shape), "voxel_size": list(meta.voxel_size),
            "normalization": meta.normalization, "features": len(meta.feature_names) if meta.uses_features else 0,
            "uses_image": bool(getattr(meta, "uses_image", True)),
            "training": {key: training.get(key) for key in ("epochs", "best_epoch", "seed", "loss", "best_val_mae")}
            | {"defence": TrainingConfig(**{f.name: training[f.name] for f in fields(TrainingConfig)
                                            if f.name in training}).defence()}
            if training else None,
            "test_metrics": extra.get("test_metrics")}


def compute_cells(task: CellTask, loaded: LoadedInputs, on_batch: Callable[[dict], None] | None = None
                  ) -> list[CellOutcome]:
    """Run a task's cells with the models and subjects of ``loaded``, one outcome per cell; an exception becomes
    a ``failed`` outcome with its reason (the grid goes on): of the whole task where it hit them all (its model
    or subjects could not be loaded), of one cell where it hit that cell's attack."""
    cells, started = task.cells, time.perf_counter()
    collectors = [ExampleCollector() for _ in cells]
    try:
        model, record = loaded.model(task.model)
        grid = model_grid(model)
        first = cells[0]
        fit_data = loaded.subjects(grid, fitting=True) if is_set_level(first.attack.name) else None
        name = describe_group(cells)
        report = None if on_batch is None else (lambda state: on_batch({**state, "cell": name}))
        segmenter = loaded.segmenter()[0] if first.spec.get("extractor") in SEGMENTER_EXTRACTORS else None
        outcomes = run_cells(cells, model, loaded.subjects(grid), task.config, loaded.device, report, fit_data,
                             collectors, segmenter)
        card = model_card(model, record)
    except Exception as err:  # a broken task: each of its cells is recorded with the reason
        outcomes, card = [err] * len(cells), None
    seconds = (time.perf_counter() - started) / len(cells)  # the task's wall time, split evenly
    finished = []
    for cell, outcome, collector in zip(cells, outcomes, collectors, strict=True):
        if isinstance(outcome, Exception):
            finished.append(CellOutcome(cell.id, "failed", {}, [], seconds, f"{type(outcome).__name__}: {outcome}"))
            continue
        metrics, rows = outcome
        metrics["model_card"] = card
        finished.append(CellOutcome(cell.id, "done", metrics, rows, seconds, examples=collector.chosen()))
    return finished
