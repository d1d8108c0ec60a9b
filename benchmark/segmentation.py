"""Training and judging segmenters (``medrobust.models.segmenter``) on a dataset's label maps, and the regional
volumes they measure.

A segmenter learns the regions of a dataset's volume features that have a label id (``vol_<region>`` from the
label maps, ``PreparedDataset.feature_labels``), grouped into its classes; voxels of any other label are
background. The loss is cross-entropy plus the soft Dice loss (Milletari et al. 2016), which keeps the small
nuclei from vanishing under the large tissue classes; ``medrobust.training.train_segmenter`` trains on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from medrobust.data import load_prepared
from medrobust.data.preprocess import PreparedDataset
from medrobust.devices import resolve_device
from medrobust.errors import MedrobustError
from medrobust.files import atomic_write
from medrobust.models.checkpoint import load_checkpoint
from medrobust.models.segmenter import Segmenter
from medrobust.vocabulary import VOLUME_PREFIX, is_volume


def labelled_regions(data: PreparedDataset) -> list[str]:
    """The regions a segmenter can learn from ``data``: its volume features measured from the label maps (with a
    label id), named without the ``vol_`` prefix, in feature order."""
    if data.labels is None:
        raise MedrobustError("training a segmenter needs label maps (derivatives/.../*_dseg) for every subject")
    regions = [name.removeprefix(VOLUME_PREFIX) for name, label in zip(data.feature_names, data.feature_labels,
                                                                        strict=True)
               if label is not None and is_volume(name)]
    if not regions:
        raise MedrobustError("the dataset's features name no region of its label maps, so a segmenter has nothing to "
                             "learn; give the subjects label maps with named regions")
    return regions


def class_lookup(segmenter: Segmenter, data: PreparedDataset) -> Tensor:
    """Label id -> the segmenter's class (0 the background, 1 + c the class ``segmenter.class_names[c]``, which
    holds the regions ``segmenter.members[...]``) for ``data``'s label maps; a label no class holds is
    background."""
    by_name = {name.removeprefix(VOLUME_PREFIX): label for name, label in zip(data.feature_names, data.feature_labels,
                                                                              strict=True) if label is not None}
    size = max([int(data.labels.max()) if data.labels is not None and data.labels.numel() else 0,
                *by_name.values()]) + 1
    lookup = torch.zeros(size, dtype=torch.long)
    for index, regions in enumerate(segmenter.members.values()):
        for region in regions:
            if region in by_name:
                lookup[by_name[region]] = index + 1
    return lookup


def targets(data: PreparedDataset, rows: Tensor | slice, lookup: Tensor) -> Tensor:
    """The class of every voxel [B, X, Y, Z] of the subjects ``rows``."""
    return lookup[data.labels[rows, 0].long()]


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy plus the soft Dice loss: 1 - the mean soft Dice over the regions present in the batch (the
    background aside), from one log-softmax. The Dice overlaps are gathered at each voxel's true class, not taken
    against a one-hot copy of the target (a tensor as large as the logits, which cost more than the network)."""
    log_probability = torch.log_softmax(logits.float(), 1)
    cross_entropy = F.nll_loss(log_probability, target)
    probability = log_probability.exp()
    n_classes, flat = logits.shape[1], target.flatten()
    at_truth = probability.gather(1, target.unsqueeze(1)).flatten()
    overlap = torch.zeros(n_classes, dtype=probability.dtype, device=logits.device).scatter_add_(0, flat, at_truth)
    counts = torch.bincount(flat, minlength=n_classes).to(probability.dtype)
    total = probability.transpose(0, 1).flatten(1).sum(1) + counts
    present = counts[1:] > 0
    dice = (2 * overlap[1:] + 1) / (total[1:] + 1)
    return cross_entropy + (1 - dice[present].mean() if present.any() else logits.sum() * 0)


def confusion_counts(predicted: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """Per class [C, 3]: voxels predicted and true (overlap), predicted, true; over the whole batch."""
    predicted, target = predicted.flatten(), target.flatten()
    overlap = torch.bincount(target[predicted == target], minlength=n_classes)
    return torch.stack([overlap, torch.bincount(predicted, minlength=n_classes),
                        torch.bincount(target, minlength=n_classes)], 1)


def dice_from_counts(counts: Tensor) -> Tensor:
    """Dice per class from ``confusion_counts`` (NaN where a class is neither predicted nor true)."""
    counts = counts.double()
    total = counts[:, 1] + counts[:, 2]
    return torch.where(total > 0, 2 * counts[:, 0] / total.clamp_min(1), torch.full_like(total, math.nan))


def row_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """The indices 0..n-1 in batches of ``batch_size``, shuffled by ``generator`` where given (every trainer's
    batch order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def segment(segmenter: Segmenter, data: PreparedDataset, device: torch.device, batch_size: int = 4,
            progress: bool = False) -> tuple[Tensor, Tensor]:
    """(soft volumes [N, R] in mL, predicted classes [N, X, Y, Z] as uint8 or int16) of every subject of ``data``."""
    segmenter.eval().to(device)
    volumes, labels = [], []
    with torch.no_grad():
        for rows in tqdm(row_batches(len(data.subject_ids), batch_size), desc=f"segmenting with {segmenter.meta.name}",
                         unit="batch", disable=not progress):
            logits = segmenter(data.images[rows].to(device)).float()
            volumes.append((torch.softmax(logits, 1)[:, 1:].flatten(2).sum(2) * segmenter.voxel_ml).cpu())
            labels.append(logits.argmax(1).to(torch.int16).cpu())
    return torch.cat(volumes), torch.cat(labels)


def evaluate_segmenter(segmenter: Segmenter, data: PreparedDataset, device: torch.device,
                       batch_size: int = 4) -> dict:
    """How well ``segmenter`` segments ``data``: per class its Dice over the subjects pooled, the Pearson r of
    its soft volume with the label map's volume of its regions on the model grid, and their median relative
    difference; the mean Dice over the classes; n."""
    lookup = class_lookup(segmenter, data)
    n_classes = 1 + len(segmenter.class_names)
    volumes, predicted = segment(segmenter, data, device, batch_size)
    counts = torch.zeros(n_classes, 3, dtype=torch.long)
    true_volumes = []
    for start in range(0, len(data.subject_ids), batch_size):
        rows = slice(start, start + batch_size)
        target = targets(data, rows, lookup)
        counts += confusion_counts(predicted[rows].long(), target, n_classes)
        true_volumes.append(torch.stack([torch.bincount(t.flatten(), minlength=n_classes) for t in target])[:, 1:]
                            * segmenter.voxel_ml)
    truth = torch.cat(true_volumes).double()
    dice = dice_from_counts(counts)[1:]
    regions = {}
    for r, name in enumerate(segmenter.class_names):
        seg, true = volumes[:, r].double().numpy(), truth[:, r].numpy()
        correlation = float(np.corrcoef(seg, true)[0, 1]) if len(seg) > 1 and seg.std() > 0 and true.std() > 0 \
            else math.nan
        relative = np.abs(seg - true) / np.where(true > 0, true, np.nan)
        regions[name] = {"dice": float(dice[r]), "volume_r": correlation,
                         "volume_relative_difference": float(np.nanmedian(relative)) if np.isfinite(relative).any()
                         else math.nan, "true_ml": float(true.mean())}
    finite = [v["dice"] for v in regions.values() if math.isfinite(v["dice"])]
    return {"dice_mean": float(np.mean(finite)) if finite else math.nan, "n": len(data.subject_ids),
            "regions": regions}


def write_regions(path: Path, metrics: dict) -> None:
    """The per-class test metrics of a segmenter as a TSV next to its checkpoint."""
    rows = [f"{name}\t{m['dice']:.4f}\t{m['volume_r']:.4f}\t{m['volume_relative_difference']:.4f}\t{m['true_ml']:.3f}"
            for name, m in metrics["regions"].items()]
    path.write_text("class\tdice\tvolume_r\tvolume_relative_difference\ttrue_ml\n" + "\n".join(rows) + "\n")


def write_volumes(segmenter_path: Path, data: Path, out: Path, device: str = "auto", cache_dir: Path | None = None,
                  progress: bool = True) -> tuple[int, float | None]:
    """Segment every usable subject of the dataset ``data`` with the segmenter of ``segmenter_path`` (on its grid)
    and write ``out``: ``participant_id`` and ``vol_<class>`` in mL per subject and class (a features table).
    Returns the number of subjects and, where they all have label maps, the segmenter's mean Dice on them (else
    None)."""
    segmenter, _ = load_checkpoint(segmenter_path, kind="segmenter")
    target = resolve_device(device)
    meta = segmenter.meta
    _, _, prepared = load_prepared(data, meta.input_shape, meta.voxel_size, cache_dir, progress=progress,
                                   normalization=meta.normalization, space=meta.space)
    volumes, _ = segment(segmenter, prepared, target, progress=progress)
    columns = [f"{VOLUME_PREFIX}{name}" for name in segmenter.class_names]
    table = pd.DataFrame(volumes.double().numpy(), columns=columns)
    table.insert(0, "participant_id", prepared.subject_ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: table.to_csv(path, index=False, float_format="%.6f"))  # quoted where needed
    dice = None
    if prepared.labels is not None and any(label is not None for label in prepared.feature_labels):
        dice = evaluate_segmenter(segmenter, prepared, target)["dice_mean"]
    return len(prepared.subject_ids), dice
