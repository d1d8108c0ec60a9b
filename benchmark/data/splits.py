"""Train/val/test splits by subject: seeded, saved next to the dataset, never silently redrawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medrobust.errors import MedrobustError
from medrobust.files import atomic_write_text
from medrobust.vocabulary import SPLIT_NAMES


def _check_fractions(fractions) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise MedrobustError(f"split fractions {fractions!r}: need three numbers (train val test)") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise MedrobustError(f"split fractions {fractions!r}: need three non-negative numbers that sum to 1")
    return values


def make_splits(subject_ids: list[str], seed: int, fractions=(0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    """Split subjects into "train", "val", "test" (sorted lists), deterministically for a seed.

    The splits are disjoint and cover every subject; with at least 3 subjects none is empty.
    """
    fractions = _check_fractions(fractions)
    ids = sorted(set(subject_ids))
    if len(ids) != len(subject_ids):
        raise MedrobustError("subject ids: each subject must appear once; remove the duplicates")
    n = len(ids)
    counts = [int(round(n * f)) for f in fractions[:2]]
    counts.append(n - sum(counts))
    # Rounding can overshoot or leave a split empty: move subjects from the largest split.
    while counts[2] < 0:
        counts[int(np.argmax(counts[:2]))] -= 1
        counts[2] += 1
    if n >= 3:
        for i in range(3):
            while counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    # Sorting first makes the draw independent of the order the caller lists subjects in.
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    bounds = np.cumsum([0, *counts])
    return {name: sorted(shuffled[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}


def load_or_create_splits(
    root: Path, subject_ids: list[str], seed: int, fractions=(0.7, 0.1, 0.2), create_in: Path | None = None
) -> dict[str, list[str]]:
    """The splits saved as `<root>/splits-seed<seed>.json` (as training saves them), created on first use; with
    ``create_in``, splits not saved in ``root`` are read from, or created in, that folder instead (so a dataset
    folder of one's own is never written into).

    A saved file is reused only when it covers exactly `subject_ids` with the same fractions; otherwise
    MedrobustError asks to delete it, because redrawing could move a subject between splits.
    """
    fractions = _check_fractions(fractions)
    path = Path(root) / f"splits-seed{seed}.json"
    if create_in is not None and not path.is_file():
        path = Path(create_in) / path.name
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            splits = {name: [str(s) for s in saved["splits"][name]] for name in SPLIT_NAMES}
            saved_fractions = tuple(float(f) for f in saved["fractions"])
        except (OSError, ValueError, KeyError, TypeError):
            raise MedrobustError(f"{path}: unreadable splits file; delete it to draw new splits") from None
        listed = [s for name in SPLIT_NAMES for s in splits[name]]
        if len(listed) != len(set(listed)):
            raise MedrobustError(f"{path}: a subject appears in two splits; delete the file to redraw")
        if set(listed) != set(subject_ids):
            added = sorted(set(subject_ids) - set(listed))
            removed = sorted(set(listed) - set(subject_ids))
            raise MedrobustError(
                f"{path}: saved splits were drawn for another subject set (added {added[:5]}, removed "
                f"{removed[:5]}); delete the file to draw new splits (old results are then not comparable)"
            )
        if not np.allclose(saved_fractions, fractions):
            raise MedrobustError(
                f"{path}: saved with fractions {saved_fractions}, asked for {fractions}; "
                "pass the saved fractions or delete the file"
            )
        return splits

    splits = make_splits(subject_ids, seed, fractions)
    payload = json.dumps({"seed": seed, "fractions": list(fractions), "splits": splits}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, payload)
    except OSError as error:
        raise MedrobustError(f"{path}: cannot save the splits ({error}); make the folder writable") from None
    return splits
