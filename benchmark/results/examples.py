"""Adversarial examples to look at: for each cell, the subject of median |deviation| and the worst one, as three
orthogonal mid-slices of the clean and the attacked image, kept beside the store as ``<out>/examples/<cell>.npz``
(a few tens of kB per cell), so that the page can show that "imperceptible" is true."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from medrobust.files import atomic_write
from medrobust.results.store import EXAMPLES_FOLDER

VIEWS = ("axial", "coronal", "sagittal")


def mid_slices(images: Tensor) -> list[np.ndarray] | None:
    """Per image of a batch [B, 1, X, Y, Z], its three orthogonal slices through the volume's centre, float32 on
    the host as [B, ...] arrays (one per view); None for images that are not 3D."""
    if images.dim() != 5:
        return None
    volume = images[:, 0].detach().float().cpu()
    x, y, z = (size // 2 for size in volume.shape[1:])
    return [volume[:, :, :, z].numpy(), volume[:, :, y, :].numpy(), volume[:, x, :, :].numpy()]


class ExampleCollector:
    """Collects every subject's mid-slices over a cell's batches and keeps the median and the worst."""

    def __init__(self) -> None:
        self.subjects: list[dict] = []

    def add(self, rows: Sequence[dict], clean: Tensor, adversarial: Tensor) -> None:
        clean_views, adversarial_views = mid_slices(clean), mid_slices(adversarial)
        if clean_views is None:
            return
        for i, row in enumerate(rows):
            self.subjects.append({"row": row, "clean": [view[i] for view in clean_views],
                                  "adversarial": [view[i] for view in adversarial_views]})

    def chosen(self) -> list[dict]:
        """The subject of median |deviation| and the one of the largest (one subject: itself once)."""
        if not self.subjects:
            return []
        ranked = sorted(self.subjects, key=lambda subject: abs(subject["row"]["deviation"]))
        picks = {"median": ranked[(len(ranked) - 1) // 2], "worst": ranked[-1]}
        return [{"which": which, **subject} for which, subject in picks.items()
                if which == "median" or subject is not picks["median"]]


def write_examples(out: Path, cell_id: str, examples: list[dict]) -> Path | None:
    """``examples`` (from ``ExampleCollector.chosen``) as ``<out>/examples/<cell_id>.npz``, written atomically."""
    if not examples:
        return None
    folder = Path(out) / EXAMPLES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, []
    keys = ("subject", "true_age", "clean_prediction", "adversarial_prediction", "deviation", "linf", "psnr", "ssim")
    for number, example in enumerate(examples):
        meta.append({"which": example["which"], **{key: example["row"].get(key) for key in keys}})
        for view, clean, adversarial in zip(VIEWS, example["clean"], example["adversarial"], strict=True):
            arrays[f"{number}_{view}_clean"] = clean
            arrays[f"{number}_{view}_adversarial"] = adversarial
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps(meta, default=float)), **arrays)
    return atomic_write(folder / f"{cell_id}.npz", lambda path: path.write_bytes(buffer.getvalue()))


def read_examples(out: Path, cell_id: str) -> list[dict]:
    """The examples of a cell as ``write_examples`` wrote them: per subject its facts and, per view, the clean and
    the attacked slice; [] where the cell has none (2D images, an older run)."""
    path = Path(out) / EXAMPLES_FOLDER / f"{cell_id}.npz"
    if not path.is_file():
        return []
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return [{**facts, "views": {view: (data[f"{number}_{view}_clean"], data[f"{number}_{view}_adversarial"])
                                    for view in VIEWS}} for number, facts in enumerate(meta)]
