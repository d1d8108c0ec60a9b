"""Reliability checks over a run's finished cells, after RobustBench's habit of flagging unreliable evaluations.

Each attack declares its role (``Attack.role``: baseline, one-step, iterative, black-box, ensemble) and scope
(``Attack.scope``), and the checks read those declarations, not lists of names. Each flag names the check that
fired, what it saw and what it suggests (``CHECKS``):

- ``beats-noise``: a real attack must beat the baseline (random noise) of the same norm and budget;
- ``one-step``: an iterative attack on each batch must reach at least what a one-step attack reaches;
- ``grows-with-epsilon``: an attack's effect must not shrink as its budget grows;
- ``black-box``: a gradient attack that a black-box attack (which sees only outputs) beats at the same budget is
  misled by its gradients;
- ``ensemble``: the ensemble is the worst case: no other attack of the same setting and budget may beat it;
- ``gradient``: subjects whose input gradient was zero or not finite (the attacks record it);
- ``unbounded``: at a budget of the whole intensity range a working gradient attack moves a healthy model's
  prediction far (the ensemble's probe); one that cannot is masked or broken;
- ``precision``: a cell run in reduced precision (bf16, fp16) whose first batch, attacked again in fp32, moved the
  model by a clearly different amount (low precision can round gradients away);
- ``certificate``: a median-smoothed model's subject whose attacked image's smoothed prediction left its certified
  interval (the certificate is wrong, or too few draws estimated the smoothed prediction).
"""

from __future__ import annotations

import json
import math

import pandas as pd

from medrobust.results.metrics import OBJECTIVE_STRENGTH

# Tolerance of every comparison, in years: absolute, plus a fraction of the larger value.
ABS_TOLERANCE = 0.05
REL_TOLERANCE = 0.02
# Reduced precision vs fp32 on a cell's first batch: flagged beyond this many years plus this fraction of the
# larger mean |deviation|.
PARITY_ABS_TOLERANCE = 0.25
PARITY_REL_TOLERANCE = 0.10
# The unbounded probe must move predictions at least this far (years, the larger of the up and down shift, mean
# over subjects): a healthy model's prediction goes to the edge of the age range and beyond, a cohort spans
# decades, and a masked model's stays within a few years.
UNBOUNDED_YEARS = 25.0
# What each check suggests when it fires.
CHECKS = {
    "beats-noise": "masked gradients or a broken attack",
    "one-step": "too few steps or too large a step; masked gradients if more steps do not help",
    "grows-with-epsilon": "the attack has not converged: more steps or restarts",
    "black-box": "its gradients mislead it (masked gradients): trust the black-box number, or attack adaptively",
    "ensemble": "an attack outside the ensemble is stronger: add it to the ensemble's members",
    "gradient": "the output does not depend differentiably on the image (a detach, quantization, saturation): "
                "gradient attacks are blind, use black-box attacks",
    "unbounded": "masked gradients or a broken attack (or an output bounded to a narrow range)",
    "precision": "reduced precision may round gradients away (mask them): compare with fp32",
    "certificate": "a bug in the certificate, or a smoothed prediction estimated from too few draws (certify_n)",
}
# Gradient attacks: the ones the black-box check holds to a black-box attack's result.
GRADIENT_ROLES = ("one-step", "iterative")
# What must match for two cells to be compared: the same model, data, objective and threat model (with the same
# extractor and segmenter under `recomputed`).
_SETTING = ("model", "checkpoint_sha256", "data_fingerprint", "subjects_sha256", "objective", "threat_model",
            "extractor", "segmenter_sha256")
_BUDGET = ("norm", "unit", "epsilon")


def _below(value: float, reference: float) -> bool:
    """``value`` falls short of ``reference`` by more than the tolerance."""
    return value < reference - ABS_TOLERANCE - REL_TOLERANCE * max(abs(value), abs(reference))


def _names(cells: pd.DataFrame) -> str:
    return ", ".join(sorted(set(cells["attack"])))


def _attack_config(params: object) -> str:
    """An attack's arguments without its budget: cells of one attack configuration at several budgets."""
    params = dict(params) if isinstance(params, dict) else {}
    params.pop("budget", None)
    return json.dumps(params, sort_keys=True)


def _parity_flags(cells: pd.DataFrame, flag) -> None:
    """``precision``: cells whose reduced-precision attack strayed from the same attack in fp32 on their first
    batch."""
    if "parity_mean_abs_deviation" not in cells:
        return
    for _, cell in cells[cells["status"] == "done"].iterrows():
        reduced, full = cell["parity_mean_abs_deviation"], cell.get("parity_fp32_mean_abs_deviation")
        if reduced is None or full is None or math.isnan(reduced) or math.isnan(full):
            continue
        if abs(reduced - full) > PARITY_ABS_TOLERANCE + PARITY_REL_TOLERANCE * max(abs(reduced), abs(full)):
            flag(cell["id"], "precision", f"{cell.get('precision', 'reduced precision')} differs from fp32 on the "
                                          f"first batch (mean |deviation| {reduced:.2f} y vs {full:.2f} y)")


def declared_roles(names) -> dict[str, tuple[str, str]]:
    """(role, scope) of each registered attack among ``names``, as the attack declares them; attacks that are not
    registered here (a plugin not loaded) are left out, and only the baseline check applies to them."""
    from medrobust.attacks import attack_entrypoint, list_attacks

    known = set(list_attacks())
    return {name: (attack_entrypoint(name).role, attack_entrypoint(name).scope) for name in names if name in known}


def _steps_note(params: object) -> str:
    """For the one-step check: where an attack's steps cannot add up to its budget (steps x step_size < 1), say so:
    that, not masking, is then why it falls short."""
    params = params if isinstance(params, dict) else {}
    steps, step_size = params.get("steps"), params.get("step_size")
    if isinstance(steps, int) and isinstance(step_size, (int, float)) and steps * step_size < 1:
        return f"its {steps} steps of {step_size:g} cannot reach the budget (steps x step_size < 1): raise steps"
    return CHECKS["one-step"]


def _metric(cell: pd.Series, key: str) -> float:
    """A cell's metric as a float, NaN where the cell has none (an older store, or another attack)."""
    value = cell.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _gradient_flags(done: pd.DataFrame, flag) -> None:
    """``gradient`` and ``unbounded``: what the attacks recorded of the gradients they saw; ``certificate``: what
    the smoothed models' certificates recorded."""
    for _, cell in done.iterrows():
        count = _metric(cell, "n")
        for key, what in (("zero_gradient_subjects", "a zero"), ("nonfinite_gradient_subjects", "a NaN or inf")):
            faulty = _metric(cell, key)
            if faulty > 0:
                flag(cell["id"], "gradient", f"{int(faulty)} of {int(count) if count == count else '?'} subjects had "
                                             f"{what} input gradient")
        beaten = _metric(cell, "certificate_beaten")
        if beaten > 0:
            flag(cell["id"], "certificate", f"{int(beaten)} of {int(_metric(cell, 'certified_n'))} certified subjects' "
                                            f"attacked smoothed prediction left the certified interval")
        shift = _metric(cell, "diag:unbounded_shift")
        if shift == shift and shift < UNBOUNDED_YEARS:
            # The probe is the attack's own (the ensemble's): its diagnostic, whatever attack reports it.
            flag(cell["id"], "unbounded", f"its unbounded probe (the whole intensity range as budget) moved "
                                          f"predictions only {shift:.1f} y (a working attack moves them over "
                                          f"{UNBOUNDED_YEARS:g} y)")


def reliability_flags(cells: pd.DataFrame, roles: dict[str, tuple[str, str]] | None = None) -> dict[str, list[str]]:
    """Reasons per cell id for the cells of ``cells`` (a store's ``cells()`` frame) that fail a check, each
    "<check>: <what it saw>; suggests <what may be wrong>". ``roles``: (role, scope) per attack name (default: as
    the registered attacks declare them)."""
    if cells.empty or "status" not in cells:
        return {}
    if roles is None:
        roles = declared_roles(set(cells["attack"]))
    role = {name: declared[0] for name, declared in roles.items()}
    held_to_one_step = {name for name, (declared, scope) in roles.items()
                        if declared == "iterative" and scope == "batch"}
    flags: dict[str, list[str]] = {}

    def flag(cell_id: str, check: str, finding: str, suggestion: str | None = None) -> None:
        flags.setdefault(cell_id, []).append(f"{check}: {finding}; suggests {suggestion or CHECKS[check]}")

    _parity_flags(cells, flag)
    _gradient_flags(cells[cells["status"] == "done"], flag)
    # What each cell achieved for its objective (the objective `target` has no summary and is left unchecked).
    done = cells[(cells["status"] == "done") & cells["objective"].isin(list(OBJECTIVE_STRENGTH))].copy()
    if done.empty:
        return flags
    done["strength"] = [OBJECTIVE_STRENGTH[row["objective"]][1] * row[OBJECTIVE_STRENGTH[row["objective"]][0]]
                        for _, row in done.iterrows()]
    done["attack_config"] = done["params"].map(_attack_config)
    for key in _SETTING:  # a store whose cells never set a key (no `recomputed` cell: no extractor) groups as one
        if key not in done:
            done[key] = None

    done["role"] = done["attack"].map(role)
    for _, group in done.groupby(list(_SETTING + _BUDGET), dropna=False):
        baseline = group[group["role"] == "baseline"]
        one_step = group[group["role"] == "one-step"]
        black_box = group[group["role"] == "black-box"]
        strongest = one_step.loc[one_step["strength"].idxmax()] if len(one_step) else None
        strongest_black_box = black_box.loc[black_box["strength"].idxmax()] if len(black_box) else None
        others = group[group["role"] != "ensemble"]
        strongest_other = others.loc[others["strength"].idxmax()] if len(others) else None
        for _, cell in group.iterrows():
            # Beating noise needs no margin beyond rounding: a model that barely reacts to its image (a small
            # deviation) is not an unreliable evaluation; an attack no better than noise is.
            if cell["role"] != "baseline" and len(baseline) and cell["strength"] <= baseline["strength"].max() + 1e-3:
                flag(cell["id"], "beats-noise", f"no better than random {_names(baseline)} of the same budget "
                                                f"({cell['strength']:.2f} y vs {baseline['strength'].max():.2f} y)")
            if (cell["attack"] in held_to_one_step and strongest is not None
                    and _below(cell["strength"], strongest["strength"])):
                flag(cell["id"], "one-step", f"weaker than {strongest['attack']} at the same budget "
                                             f"({cell['strength']:.2f} y vs {strongest['strength']:.2f} y)",
                     _steps_note(cell["params"]))
            if (cell["role"] in GRADIENT_ROLES and strongest_black_box is not None
                    and _below(cell["strength"], strongest_black_box["strength"])):
                flag(cell["id"], "black-box", f"weaker than the black-box {strongest_black_box['attack']} at the "
                                              f"same budget ({cell['strength']:.2f} y vs "
                                              f"{strongest_black_box['strength']:.2f} y)")
            if (cell["role"] == "ensemble" and strongest_other is not None
                    and _below(cell["strength"], strongest_other["strength"])):
                flag(cell["id"], "ensemble", f"weaker than {strongest_other['attack']} at the same budget "
                                             f"({cell['strength']:.2f} y vs {strongest_other['strength']:.2f} y)")
    # Growth with epsilon is asked of attacks, not of the noise baseline: its draws differ from cell to cell (each
    # cell has its own seed), and under "perturbed" its random volume changes can outweigh the image's.
    attacks = done[done["role"] != "baseline"]
    for _, group in attacks.groupby(list(_SETTING + ("attack", "attack_config", "norm", "unit")), dropna=False):
        best_so_far, best_epsilon = -math.inf, None
        for _, cell in group.sort_values("epsilon").iterrows():
            if best_epsilon is not None and cell["epsilon"] > best_epsilon and _below(cell["strength"], best_so_far):
                flag(cell["id"], "grows-with-epsilon", f"weaker than the same attack at the smaller epsilon "
                                                       f"{best_epsilon:g} ({cell['strength']:.2f} y vs "
                                                       f"{best_so_far:.2f} y)")
            if cell["strength"] > best_so_far:
                best_so_far, best_epsilon = cell["strength"], cell["epsilon"]
    return flags
