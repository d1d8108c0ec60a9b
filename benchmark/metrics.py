"""Per-cell summary metrics from per-subject results (design.md section 6)."""

from __future__ import annotations

import math

import numpy as np

# The paper's true-age bins (Li et al. 2020 binned by predicted age; we bin by the TRUE age): <15, 15-25, 25-50,
# 50-65, >65 years, each bin closed on the left.
AGE_BIN_EDGES = (15.0, 25.0, 50.0, 65.0)
AGE_BIN_KEYS = ("lt15", "15_25", "25_50", "50_65", "ge65")
AGE_BIN_LABELS = ("<15", "15-25", "25-50", "50-65", ">65")
# Success: the attack moved the prediction by at least tau years.
SUCCESS_THRESHOLDS = (1, 2, 5, 10)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def cell_metrics(true_age, clean_prediction, adversarial_prediction, linf, l2, linf_rel, l2_rel) -> dict[str, float]:
    """Summary of one cell from its per-subject arrays (ages and predictions in years, norms abs and relative).

    Keys: n, clean_mae, adversarial_mae, mean_abs_deviation, mean_deviation, abs_mean_deviation_<bin> (the paper's
    |mean(adv - clean)| per true-age bin; NaN for an empty bin), n_<bin>, success_<tau>y (fraction with
    |deviation| >= tau), mean_linf, mean_l2, mean_linf_rel, mean_l2_rel.
    """
    true_age, clean, adversarial = (np.asarray(a, dtype=np.float64) for a in (true_age, clean_prediction,
                                                                                adversarial_prediction))
    deviation = adversarial - clean
    metrics: dict[str, float] = {
        "n": int(true_age.size),
        "clean_mae": _mean(np.abs(clean - true_age)),
        "adversarial_mae": _mean(np.abs(adversarial - true_age)),
        "mean_abs_deviation": _mean(np.abs(deviation)),
        "mean_deviation": _mean(deviation),
    }
    bins = np.digitize(true_age, AGE_BIN_EDGES)
    for index, key in enumerate(AGE_BIN_KEYS):
        in_bin = deviation[bins == index]
        metrics[f"abs_mean_deviation_{key}"] = abs(_mean(in_bin))
        metrics[f"n_{key}"] = int(in_bin.size)
    for tau in SUCCESS_THRESHOLDS:
        metrics[f"success_{tau}y"] = _mean((np.abs(deviation) >= tau).astype(np.float64))
    for name, values in (("linf", linf), ("l2", l2), ("linf_rel", linf_rel), ("l2_rel", l2_rel)):
        metrics[f"mean_{name}"] = _mean(np.asarray(values, dtype=np.float64))
    return metrics
