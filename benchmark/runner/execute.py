"""Computing a cell: its attack over the subjects batch by batch (out-of-memory backoff, reduced precision and
its fp32 parity check, timing), a universal perturbation's fit on its own subjects, and the per-subject rows.

An executor hands ``compute_cell`` a ``CellTask`` (a cell and the paths of its model and data) and gets a
``CellOutcome`` back, which only the driver writes.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from medrobust.attacks.budget import Budget
from medrobust.attacks.result import GRADIENT_FAULTS
from medrobust.data.preprocess import PreparedDataset
from medrobust.faults import fault_point
from medrobust.models import BrainAgeModel
from medrobust.models.segmenter import Segmenter
from medrobust.models.smoothing import SmoothedModel, certify, smoothed_estimate
from medrobust.models.sources import ModelSource
from medrobust.results.examples import ExampleCollector
from medrobust.results.metrics import certificate_metrics, rows_metrics, sample_rows
from medrobust.runner.cells import Cell, build_attack, is_set_level, subject_seeds
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


def _attack_subjects(call, data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device,
                     on_batch: Callable[[dict], None] | None = None, extractor: str | None = None,
                     segmenter: Segmenter | None = None, seed: int = 0, parity: bool = True,
                     examples: ExampleCollector | None = None, certify_at: Budget | None = None
                     ) -> tuple[dict, list[dict]]:
    """Run ``call`` (an attack, or a fitted universal perturbation's ``apply``) over every subject of `data`;
    returns (metrics, per-subject rows). With ``extractor`` (threat model ``recomputed``) each batch comes with
    that feature extractor (by ``segmenter`` for the segmenter extractors). A callable that takes ``sample_seeds``
    gets one seed per subject.

    Batches have ``config.batch_size`` subjects until the device runs out of memory: the batch is then halved and
    retried (down to one subject), and later batches keep the smaller size; ``batch_size_used`` records it. In
    reduced precision (``config.precision``), the first batch is attacked in fp32 too and both mean |deviation|
    are kept (``parity_*``) for the reliability checks (with ``parity``). ``examples`` collects every subject's
    mid-slices, clean and attacked, for the page's adversarial examples. With ``certify_at`` (an l2 budget of a
    median-smoothed model under ``fixed``), each subject's row gets its certificate at that radius."""
    rows: list[dict] = []
    counters = {"forward": 0, "backward": 0, "steps": 0}
    gradient_faults: dict[str, int] = {}
    diagnostics: dict[str, list[torch.Tensor]] = {}
    timer = _Timer(device)
    feature_change: list[torch.Tensor] = []
    extra: dict = {}
    size, count, start = config.batch_size, len(data.subject_ids), 0
    seeded = _takes(call, "sample_seeds")
    while start < count:
        batch = slice(start, min(start + size, count))
        subjects = data.subject_ids[batch]
        try:
            inputs = attack_inputs(data, batch, model, config, device, extractor, segmenter)
            if seeded:
                inputs["sample_seeds"] = subject_seeds(seed, subjects)
            with timer.measure(), autocast(device, config.precision):
                result = call(**inputs)
            if parity and config.precision != "fp32" and "parity_mean_abs_deviation" not in extra:
                reference = call(**inputs)  # the same first batch in fp32, outside the attack's time
                extra["parity_mean_abs_deviation"] = _mean_abs_deviation(result)
                extra["parity_fp32_mean_abs_deviation"] = _mean_abs_deviation(reference)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            inputs = result = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        batch_rows, moved = sample_rows(subjects, data.ages[batch], inputs["images"], inputs["features"],
                                        inputs["mask"], result, config.ssim)
        if certify_at is not None:
            _certify_rows(batch_rows, model, inputs, result, certify_at, subject_seeds(seed, subjects))
        rows.extend(batch_rows)
        if examples is not None:
            examples.add(batch_rows, inputs["images"], result.images)
        if moved is not None:
            feature_change.append(moved)
        for key in counters:
            counters[key] += getattr(result, key)
        for key in GRADIENT_FAULTS:  # subjects whose gradient was zero or non-finite (reliability checks)
            fault = getattr(result, key, None)
            if fault is not None:
                gradient_faults[key] = gradient_faults.get(key, 0) + int(fault.sum())
        for key, values in result.diagnostics.items():
            diagnostics.setdefault(key, []).append(values.detach().double().cpu())
        start = batch.stop
        if on_batch is not None:
            on_batch({"done": len(rows), "of": count,
                      "mean_abs_deviation": sum(abs(r["deviation"]) for r in rows) / len(rows)})
    metrics = rows_metrics(rows)
    metrics.update(counters, attack_seconds=timer.seconds, batch_size_used=size, **extra)
    metrics.update({f"{key}_subjects": count for key, count in gradient_faults.items()})
    # An attack's per-subject diagnostics (the ensemble's winners and unbounded probe), averaged over subjects.
    metrics.update({f"diag:{key}": float(torch.cat(values).mean()) for key, values in diagnostics.items()})
    if feature_change:  # the largest relative change of any context feature, averaged over subjects
        metrics["mean_feature_change_rel"] = float(torch.cat(feature_change).mean())
    if certify_at is not None:
        metrics.update(certificate_metrics(rows))
    return metrics, rows


def certified_budget(cell: Cell, model: nn.Module) -> Budget | None:
    """The budget a cell's subjects are certified at: an l2 budget of a median-smoothed model whose context
    features stay clean (the certificate covers image perturbations); None for every other cell."""
    if isinstance(model, SmoothedModel) and cell.budget.norm == "l2" and cell.threat_model == "fixed":
        return cell.budget
    return None


def _certify_rows(rows: list[dict], model: SmoothedModel, inputs: dict, result, budget: Budget,
                  seeds: list[int]) -> None:
    """Add each subject's certificate at the budget's radius (its own, in the model's input units) to its row, and
    the smoothed prediction of its attacked image from fresh draws."""
    images, features = inputs["images"], inputs["features"]
    certificate = certify(model, images, features, budget.radius(images)[:, None], seeds)
    attacked = smoothed_estimate(model, result.images.to(images.dtype), result.features, seeds)
    for i, row in enumerate(rows):
        row.update(certified_lower=float(certificate.lower[i, 0]), certified_upper=float(certificate.upper[i, 0]),
                   smoothed_adversarial=float(attacked[i]))


def _mean_abs_deviation(result) -> float:
    return float((result.adversarial_prediction.double() - result.clean_prediction.double()).abs().mean())


# Metrics of a universal perturbation on the subjects it was fitted on, reported beside the held-out ones.
FIT_METRICS = ("n", "clean_mae", "adversarial_mae", "mean_abs_deviation", "mean_deviation", "success_5y")


def run_cell(cell: Cell, model: BrainAgeModel, data: PreparedDataset, config: RunConfig, device: torch.device,
             on_batch: Callable[[dict], None] | None = None, fit_data: PreparedDataset | None = None,
             seed: int | None = None, examples: ExampleCollector | None = None,
             segmenter: Segmenter | None = None) -> tuple[dict, list[dict]]:
    """Attack every subject of `data` in batches; returns (cell metrics, per-subject rows). A universal
    perturbation is fitted once on `fit_data` (its batches stay in host memory until used), then applied to
    `data` (the held-out subjects whose rows are stored); its effect on the fitting subjects is in `fit_*`.
    ``seed``: of the attack's random draws (default: the run's seed); ``examples`` collects the (held-out)
    subjects' mid-slices for the page; ``segmenter``: the segmenter of a segmenter extractor's cell."""
    seed = config.seed if seed is None else seed
    attack = build_attack(cell, model, config, seed)
    extractor = cell.spec.get("extractor") if cell.threat_model == "recomputed" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if fit_data is None or not is_set_level(cell.attack.name):
        metrics, rows = _attack_subjects(attack, data, model, config, device, on_batch, extractor, segmenter,
                                         seed, examples=examples, certify_at=certified_budget(cell, model))
    else:
        began = time.perf_counter()
        with autocast(device, config.precision):
            # a segmenter's clean volumes are measured on its device, so those fitting batches live there
            attack.fit(batches(fit_data, model, config, device if segmenter is not None else None, extractor,
                               segmenter))
        fit_seconds = time.perf_counter() - began
        metrics, rows = _attack_subjects(attack.apply, data, model, config, device, on_batch, extractor,
                                         segmenter, seed, examples=examples, certify_at=certified_budget(cell, model))
        on_fit, _ = _attack_subjects(attack.apply, fit_data, model, config, device, None, extractor, segmenter,
                                     seed, parity=False)
        for key, count in zip(("forward", "backward", "steps"), attack.fit_counters, strict=True):
            metrics[key] += count
        for key, count in attack.fit_gradient_faults.items():
            metrics[f"{key}_subjects"] = metrics.get(f"{key}_subjects", 0) + count
        metrics["attack_seconds"] += fit_seconds
        metrics.update({f"fit_{key}": on_fit[key] for key in FIT_METRICS})
    metrics["timing"] = "cuda-events" if device.type == "cuda" else "wall-clock"
    metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return metrics, rows


@dataclass
class CellTask:
    """What an executor runs: one cell and where its model and data live (paths, no tensors: it pickles small)."""

    cell: Cell
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


def compute_cell(task: CellTask, loaded: LoadedInputs, on_batch: Callable[[dict], None] | None = None) -> CellOutcome:
    """Run one cell with the models and subjects of ``loaded``; an exception becomes a ``failed`` outcome with its
    reason (the grid goes on)."""
    cell, started = task.cell, time.perf_counter()
    try:
        model, record = loaded.model(task.model)
        grid = model_grid(model)
        fit_data = loaded.subjects(grid, fitting=True) if is_set_level(cell.attack.name) else None
        report = None if on_batch is None else (lambda state: on_batch({**state, "cell": cell.describe()}))
        collector = ExampleCollector()
        fault_point("attacking")
        segmenter = loaded.segmenter()[0] if cell.spec.get("extractor") in SEGMENTER_EXTRACTORS else None
        metrics, rows = run_cell(cell, model, loaded.subjects(grid), task.config, loaded.device, report,
                                 fit_data, cell.spec.get("cell_seed"), collector, segmenter)
        metrics["model_card"] = model_card(model, record)
        fault_point("attacked")
    except Exception as err:  # a broken cell is recorded with its reason
        return CellOutcome(cell.id, "failed", {}, [], time.perf_counter() - started, f"{type(err).__name__}: {err}")
    return CellOutcome(cell.id, "done", metrics, rows, time.perf_counter() - started, examples=collector.chosen())
