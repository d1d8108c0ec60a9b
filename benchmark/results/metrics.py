"""Per-sample image metrics and per-cell summary metrics from per-subject results (docs/running.md, "Metrics of
a cell", lists them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from medrobust.attacks.budget import perturbation_norms
from medrobust.errors import MedrobustError
from medrobust.vocabulary import AGE_BIN_EDGES, AGE_BIN_KEYS

# Success: the attack moved the prediction by at least tau years.
SUCCESS_THRESHOLDS = (1, 2, 5, 10)

# SSIM as Wang et al. 2004 and scikit-image's ``gaussian_weights=True``: a Gaussian window of sigma 1.5 truncated
# at 3.5 sigma (11 taps), the constants K1 and K2 times the data range.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03

# Percentile bootstrap of the cell's means: resamples of the subjects, with a fixed seed so that a re-run of the
# metrics is bit-identical. The intervals are 95 %.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
# The cell metrics (means over subjects) that get a bootstrap interval.
INTERVAL_METRICS = ("adversarial_mae", "mean_abs_deviation")
# What a cell achieved for its objective: the cell metric and its sign, so that sign x metric is larger for a
# stronger attack (years). The objective `target` has no stored summary of its own. The reliability checks compare
# attacks by it, the page ranks models by it.
OBJECTIVE_STRENGTH = {"older": ("mean_deviation", 1), "younger": ("mean_deviation", -1),
                      "deviation": ("mean_abs_deviation", 1), "error": ("adversarial_mae", 1)}
# Optional per-subject image metrics (``image_metrics``) summarized by their mean and median when given.
IMAGE_METRICS = ("l0", "psnr", "ssim")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else math.nan


# ---------------------------------------------------------------- per sample: l0, PSNR, SSIM


def sample_rows(subjects: Sequence[str], true_ages: Tensor, images: Tensor, features: Tensor | None,
                mask: Tensor | None, result, ssim: bool = True) -> tuple[list[dict], Tensor | None]:
    """The per-subject rows of one attacked batch: predictions, deviation, the
    perturbation's l-inf, l2 (absolute and relative to each image's range) and ``image_metrics``, with one host
    transfer; and how far the threat model moved each subject's context features (the largest relative change
    of any feature, [B] on the host; 0 under ``fixed``), or None for a model without features. ``result`` is the
    attack's ``AttackResult`` for ``images``."""
    norms = perturbation_norms(result.images - images)
    image_range = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).clamp_min(1e-12)
    moved = None
    if features is not None:
        change = ((result.features - features).abs() / features.abs().clamp_min(1e-12)).nan_to_num(0.0)
        moved = change.amax(dim=1).detach().double().cpu()
    host = {k: v.detach().double().cpu() for k, v in {
        "clean_prediction": result.clean_prediction, "adversarial_prediction": result.adversarial_prediction,
        "linf": norms["linf"], "l2": norms["l2"], "linf_rel": norms["linf"] / image_range,
        "l2_rel": norms["l2"] / image_range,
        **image_metrics(images, result.images.to(images.dtype), mask, ssim)}.items()}
    rows = []
    for i, subject in enumerate(subjects):
        row = {"subject": subject, "true_age": float(true_ages[i]), **{k: float(v[i]) for k, v in host.items()}}
        row["l0"] = int(row["l0"])
        row["deviation"] = row["adversarial_prediction"] - row["clean_prediction"]
        rows.append(row)
    return rows, moved


def image_metrics(clean: Tensor, adversarial: Tensor, mask: Tensor | None = None,
                  ssim: bool = True) -> dict[str, Tensor]:
    """How much an attack changed each image of a batch [B, C, H, W] or [B, C, D, H, W]; each value [B], computed
    on the tensors' device in one batched pass (no host synchronisation).

    - ``l0`` (int64): the number of voxels that changed, over the whole image (mask or not).
    - ``psnr`` (float64, dB): 10 log10(R^2 / MSE) with R the clean image's own range (max - min), the MSE over
      the voxels inside ``mask`` (all voxels without one). An unchanged image has MSE 0 and PSNR **+inf**: the
      value is kept as it is (SQLite REAL columns store and return +inf exactly); ``cell_metrics`` leaves such
      images out of its PSNR mean and median and counts them in ``n_unchanged``, so no summary holds an inf.
    - ``ssim`` (float64): SSIM (Wang et al. 2004) over 2D or 3D windows with a Gaussian window of sigma 1.5
      (truncated at 3.5 sigma: 11 voxels per side), K1 = 0.01, K2 = 0.03 and R as above; the map is averaged over
      the window centres whose window lies inside the image (as scikit-image's ``structural_similarity`` with
      ``gaussian_weights=True, use_sample_covariance=False``) and, with ``mask``, whose centre is inside it.
      Channels are averaged. 1 for an unchanged image.

    A constant clean image (R = 0) has no PSNR or SSIM: NaN; so has an image whose mask selects nothing, and an
    image smaller than the SSIM window (11 voxels) along an axis has no SSIM (NaN; its l0 and PSNR are measured).
    ``mask``: bool or 0/1, broadcastable to the images (a brain mask [1, 1, ...] or [B, 1, ...]). ``ssim=False``
    leaves SSIM out (no ``ssim`` key): its Gaussian filtering is the one costly part.

    The local statistics are taken of the clean image x and of the perturbation d = x' - x rather than of x'
    itself, so that 1 - SSIM keeps its precision for the tiny perturbations of this benchmark (float32 would
    otherwise lose most of its digits to cancellation at x's scale).
    """
    if not isinstance(clean, Tensor) or not isinstance(adversarial, Tensor):
        raise MedrobustError("image_metrics needs the clean and adversarial images as tensors")
    if clean.shape != adversarial.shape:
        raise MedrobustError(f"clean images {list(clean.shape)} and adversarial images {list(adversarial.shape)} "
                             f"must have the same shape")
    if clean.dim() not in (4, 5):
        raise MedrobustError(f"image_metrics takes 2D or 3D image batches [B, C, H, W] or [B, C, D, H, W], got "
                             f"shape {list(clean.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask, device=clean.device)
        try:
            mask = (mask != 0).expand(clean.shape)
        except RuntimeError:
            raise MedrobustError(f"mask of shape {list(mask.shape)} does not broadcast to the images' shape "
                                 f"{list(clean.shape)}") from None
    # Metrics are measurements: never in an autocast's reduced precision, at least float32.
    dtype = torch.promote_types(clean.dtype, torch.float32)
    with torch.autocast(clean.device.type, enabled=False), torch.no_grad():
        x = clean.detach().to(dtype)
        delta = adversarial.detach().to(dtype) - x
        flat = x.flatten(1)
        data_range = (flat.amax(dim=1) - flat.amin(dim=1)).double()
        defined = data_range > 0
        l0 = (adversarial.detach() != clean.detach()).flatten(1).sum(dim=1)
        inside = delta if mask is None else torch.where(mask, delta, torch.zeros_like(delta))
        count = (torch.full_like(data_range, flat.shape[1]) if mask is None
                 else mask.flatten(1).sum(dim=1).double())
        squared = torch.linalg.vector_norm(inside.flatten(1), ord=2, dim=1, dtype=torch.float64) ** 2
        mse = squared / count
        psnr = torch.where(mse == 0, math.inf, 10 * torch.log10(data_range ** 2 / mse))
        psnr = torch.where(defined & (count > 0), psnr, math.nan)
        measured = {"l0": l0, "psnr": psnr}
        if ssim:
            measured["ssim"] = torch.where(defined, _ssim(x, delta, data_range, mask), math.nan)
    return measured


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    return (window / window.sum()).to(dtype=dtype, device=device)


def _local_means(maps: Tensor, window: Tensor) -> Tensor:
    """The Gaussian-weighted mean around every voxel whose window lies inside the image ("valid" positions): a
    separable filter along each spatial axis of ``maps`` [N, *spatial], each a product with a banded matrix
    (on a CPU four times faster than the same filter as 1D convolutions)."""
    taps = window.numel()
    for axis in range(1, maps.dim()):
        size = maps.shape[axis]
        rows = torch.arange(size - taps + 1, device=maps.device)
        band = torch.zeros(size - taps + 1, size, dtype=maps.dtype, device=maps.device)
        band.scatter_(1, rows[:, None] + torch.arange(taps, device=maps.device), window.expand(rows.numel(), taps))
        maps = torch.movedim(torch.movedim(maps, axis, -1) @ band.T, -1, axis)
    return maps


def _ssim(x: Tensor, delta: Tensor, data_range: Tensor, mask: Tensor | None) -> Tensor:
    """Mean SSIM [B] (float64) between x and x + delta; see ``image_metrics``."""
    batch, channels = x.shape[:2]
    spatial = x.shape[2:]
    if min(spatial) < 2 * SSIM_RADIUS + 1:  # no window fits inside the image
        return torch.full((batch,), math.nan, dtype=torch.float64, device=x.device)
    # Five maps per image and channel, filtered at once: x, d, x^2, d^2, x d.
    maps = torch.stack((x, delta, x * x, delta * delta, x * delta), dim=2).reshape(-1, *spatial)
    means = _local_means(maps, _gaussian_window(x.dtype, x.device))
    means = means.reshape(batch, channels, 5, *means.shape[1:])
    mean_x, mean_d, mean_xx, mean_dd, mean_xd = means.unbind(dim=2)
    var_x = mean_xx - mean_x * mean_x
    var_d = (mean_dd - mean_d * mean_d).clamp_min(0)
    cov_xd = mean_xd - mean_x * mean_d
    mean_y = mean_x + mean_d
    view = (-1,) + (1,) * (x.dim() - 1)
    c1 = ((SSIM_K1 * data_range) ** 2).to(x.dtype).view(view)
    c2 = ((SSIM_K2 * data_range) ** 2).to(x.dtype).view(view)
    # SSIM = l * cs with l = 1 - a and cs = 1 - b, where (y = x + d)
    #   a = (mu_y - mu_x)^2 / (mu_x^2 + mu_y^2 + C1) = mu_d^2 / (...)
    #   b = (var_x + var_y - 2 cov_xy) / (var_x + var_y + C2) = var_d / (2 var_x + 2 cov_xd + var_d + C2),
    # so 1 - SSIM = a + b - a b is computed from the perturbation's own statistics.
    a = mean_d * mean_d / (mean_x * mean_x + mean_y * mean_y + c1)
    b = var_d / (2 * var_x + 2 * cov_xd + var_d + c2)
    loss = (a + b - a * b).double()
    if mask is None:
        return 1 - loss.flatten(1).mean(dim=1)
    centre = tuple(slice(SSIM_RADIUS, size - SSIM_RADIUS) for size in spatial)
    weight = mask[(slice(None), slice(None), *centre)].flatten(1).double()
    return 1 - (loss.flatten(1) * weight).sum(dim=1) / weight.sum(dim=1)


# ---------------------------------------------------------------- per cell: bootstrap intervals


def bootstrap_mean_intervals(samples, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                             level: float = BOOTSTRAP_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of the mean of each row of ``samples`` [k, n] (k quantities measured on the
    same n subjects): (low [k], high [k]). One set of resampled subjects serves every row (a paired bootstrap),
    drawn from a generator seeded with ``seed``, so equal inputs give bit-identical intervals. With one subject
    the interval is that value; with none, NaN.

    Vectorized: the resampled means of a block of resamples are one gather and one mean (blocks bound the memory
    to about 4 M values whatever n)."""
    samples = np.atleast_2d(np.asarray(samples, dtype=np.float64))
    count = samples.shape[1]
    if not isinstance(resamples, int) or resamples < 1:
        raise MedrobustError(f"bootstrap resamples must be an integer >= 1, got {resamples!r}")
    if not 0 < level < 1:
        raise MedrobustError(f"bootstrap level must be between 0 and 1, got {level!r}")
    if count == 0:
        nan = np.full(samples.shape[0], math.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // (count * samples.shape[0]))
    means = np.empty((samples.shape[0], resamples))
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        index = rng.integers(0, count, size=(stop - start, count))
        means[:, start:stop] = samples[:, index].mean(axis=2)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=1)
    return low, high


# ---------------------------------------------------------------- per cell: the summary


def cell_metrics(true_age, clean_prediction, adversarial_prediction, linf, l2, linf_rel, l2_rel,
                 l0=None, psnr=None, ssim=None) -> dict[str, float]:
    """Summary of one cell from its per-subject arrays (ages and predictions in years, norms abs and relative;
    optionally the per-subject ``image_metrics``).

    Keys: n, clean_mae, adversarial_mae, mean_abs_deviation, mean_deviation, adversarial_mae_ci_low/_ci_high and
    mean_abs_deviation_ci_low/_ci_high (95 % percentile bootstrap intervals of those two means over subjects,
    ``bootstrap_mean_intervals``), abs_mean_deviation_<bin> (the paper's |mean(adv - clean)| per true-age bin;
    NaN for an empty bin), n_<bin>, success_<tau>y (fraction with |deviation| >= tau), mean_linf, mean_l2,
    mean_linf_rel, mean_l2_rel. With ``l0``, ``psnr`` and ``ssim`` (each optional): mean_<name> and
    median_<name>; the PSNR summary is over the images the attack changed (finite PSNR), and n_unchanged counts
    those it left unchanged (PSNR +inf). A NaN PSNR or SSIM (a constant image) is left out of the summaries.
    """
    true_age, clean, adversarial = (np.asarray(a, dtype=np.float64) for a in (true_age, clean_prediction,
                                                                                adversarial_prediction))
    deviation = adversarial - clean
    adversarial_error = np.abs(adversarial - true_age)
    metrics: dict[str, float] = {
        "n": int(true_age.size),
        "clean_mae": _mean(np.abs(clean - true_age)),
        "adversarial_mae": _mean(adversarial_error),
        "mean_abs_deviation": _mean(np.abs(deviation)),
        "mean_deviation": _mean(deviation),
    }
    low, high = bootstrap_mean_intervals(np.stack((adversarial_error, np.abs(deviation))))
    for index, key in enumerate(INTERVAL_METRICS):
        metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = float(low[index]), float(high[index])
    bins = np.digitize(true_age, AGE_BIN_EDGES)
    for index, key in enumerate(AGE_BIN_KEYS):
        in_bin = deviation[bins == index]
        metrics[f"abs_mean_deviation_{key}"] = abs(_mean(in_bin))
        metrics[f"n_{key}"] = int(in_bin.size)
    for tau in SUCCESS_THRESHOLDS:
        metrics[f"success_{tau}y"] = _mean((np.abs(deviation) >= tau).astype(np.float64))
    for name, values in (("linf", linf), ("l2", l2), ("linf_rel", linf_rel), ("l2_rel", l2_rel)):
        metrics[f"mean_{name}"] = _mean(np.asarray(values, dtype=np.float64))
    for name, values in (("l0", l0), ("psnr", psnr), ("ssim", ssim)):
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.shape != true_age.shape:
            raise MedrobustError(f"cell_metrics: {name} has {values.size} values for {true_age.size} subjects")
        if name == "psnr":
            metrics["n_unchanged"] = int(np.isposinf(values).sum())
        values = values[np.isfinite(values)]
        metrics[f"mean_{name}"], metrics[f"median_{name}"] = _mean(values), _median(values)
    return metrics


# The per-subject row keys ``cell_metrics`` reads, in its argument order; the image metrics are optional.
ROW_KEYS = ("true_age", "clean_prediction", "adversarial_prediction", "linf", "l2", "linf_rel", "l2_rel")


def rows_metrics(rows: Sequence[Mapping]) -> dict[str, float]:
    """``cell_metrics`` of a cell's per-subject rows (dicts with the ``ROW_KEYS``, and ``l0``, ``psnr`` and
    ``ssim`` where every row has them)."""
    images = {name: [row[name] for row in rows] for name in IMAGE_METRICS if rows and all(name in r for r in rows)}
    return cell_metrics(*([row[key] for row in rows] for key in ROW_KEYS), **images)


# Per-subject values of a median-smoothed model's certificate (medrobust.models.smoothing), in the store's samples.
CERTIFICATE_KEYS = ("certified_lower", "certified_upper", "smoothed_adversarial")


def certificate_metrics(rows: Sequence[Mapping]) -> dict[str, float]:
    """What a cell's certificates say (rows with the ``CERTIFICATE_KEYS``; NaN bounds where a certificate
    abstained): ``certified_n`` and ``abstained`` subjects; ``certified_max_deviation``, the mean over certified
    subjects of the certified worst case max(upper - clean, clean - lower); ``certified_within_<k>y``, the fraction
    of all subjects certified to move by at most k years; ``certificate_beaten``, the certified subjects whose
    attacked image's smoothed prediction (from fresh draws) lies outside their interval (a bug where it is not 0)."""
    lower, upper, attacked, clean = (np.array([float(row[key]) for row in rows], dtype=float)
                                     for key in (*CERTIFICATE_KEYS, "clean_prediction"))
    certified = np.isfinite(lower) & np.isfinite(upper)
    bound = np.where(certified, np.maximum(upper - clean, clean - lower), np.inf)
    metrics = {"certified_n": int(certified.sum()), "abstained": int((~certified).sum()),
               "certified_max_deviation": _mean(bound[certified]),
               "certificate_beaten": int((certified & ((attacked < lower) | (attacked > upper))).sum())}
    metrics.update({f"certified_within_{k}y": float((bound <= k).mean()) if len(rows) else math.nan
                    for k in SUCCESS_THRESHOLDS})
    return metrics
