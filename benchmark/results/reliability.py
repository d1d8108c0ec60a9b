"""Reliability checks over a run's finished cells, after RobustBench's habit of flagging unreliable evaluations.

Each attack declares its role (``Attack.role``: baseline, one-step, iterative) and scope (``Attack.scope``), and
the checks read those declarations, not lists of names. A real attack must beat the baseline (random noise) of
the same norm and budget; an iterative attack on each batch must reach at least what a one-step attack reaches;
and an attack's effect must not shrink as its budget grows. A cell
that breaks one of these is marked "possibly unreliable" (masked gradients or a broken attack), with the reason.
A cell run in reduced precision (bf16, fp16) is also marked when its first batch, attacked again in fp32, moved
the model by a clearly different amount: low precision can round gradients away and so mask them.
"""

from __future__ import annotations

import json
import math

import pandas as pd

# Tolerance of every comparison, in years: absolute, plus a fraction of the larger value.
ABS_TOLERANCE = 0.05
REL_TOLERANCE = 0.02
# Reduced precision vs fp32 on a cell's first batch: flagged beyond this many years plus this fraction of the
# larger mean |deviation|.
PARITY_ABS_TOLERANCE = 0.25
PARITY_REL_TOLERANCE = 0.10
# What a cell achieved for its objective, in years, larger = stronger attack (the objective `target` has no
# stored summary of its own and is left unchecked).
_STRENGTH = {
    "older": lambda cell: cell["mean_deviation"],
    "younger": lambda cell: -cell["mean_deviation"],
    "deviation": lambda cell: cell["mean_abs_deviation"],
    "error": lambda cell: cell["adversarial_mae"],
}
# What must match for two cells to be compared: the same model, data, objective and threat model.
_SETTING = ("model", "checkpoint_sha256", "data_fingerprint", "subjects_sha256", "objective", "threat_model")
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
    """Cells whose reduced-precision attack strayed from the same attack in fp32 on their first batch."""
    if "parity_mean_abs_deviation" not in cells:
        return
    for _, cell in cells[cells["status"] == "done"].iterrows():
        reduced, full = cell["parity_mean_abs_deviation"], cell.get("parity_fp32_mean_abs_deviation")
        if reduced is None or full is None or math.isnan(reduced) or math.isnan(full):
            continue
        if abs(reduced - full) > PARITY_ABS_TOLERANCE + PARITY_REL_TOLERANCE * max(abs(reduced), abs(full)):
            flag(cell["id"], f"{cell.get('precision', 'reduced precision')} differs from fp32 on the first batch "
                             f"(mean |deviation| {reduced:.2f} y vs {full:.2f} y): reduced precision may mask "
                             f"gradients")


def declared_roles(names) -> dict[str, tuple[str, str]]:
    """(role, scope) of each registered attack among ``names``, as the attack declares them; attacks that are not
    registered here (a plugin not loaded) are left out, and only the baseline check applies to them."""
    from medrobust.attacks import attack_entrypoint, list_attacks

    known = set(list_attacks())
    return {name: (attack_entrypoint(name).role, attack_entrypoint(name).scope) for name in names if name in known}


def reliability_flags(cells: pd.DataFrame, roles: dict[str, tuple[str, str]] | None = None) -> dict[str, list[str]]:
    """Reasons per cell id for the cells of ``cells`` (a store's ``cells()`` frame) that fail a check. ``roles``:
    (role, scope) per attack name (default: as the registered attacks declare them)."""
    if cells.empty or "status" not in cells:
        return {}
    if roles is None:
        roles = declared_roles(set(cells["attack"]))
    role = {name: declared[0] for name, declared in roles.items()}
    held_to_one_step = {name for name, (declared, scope) in roles.items()
                        if declared == "iterative" and scope == "batch"}
    flags: dict[str, list[str]] = {}

    def flag(cell_id: str, reason: str) -> None:
        flags.setdefault(cell_id, []).append(reason)

    _parity_flags(cells, flag)
    done = cells[(cells["status"] == "done") & cells["objective"].isin(list(_STRENGTH))].copy()
    if done.empty:
        return flags
    done["strength"] = [_STRENGTH[row["objective"]](row) for _, row in done.iterrows()]
    done["attack_config"] = done["params"].map(_attack_config)

    done["role"] = done["attack"].map(role)
    for _, group in done.groupby(list(_SETTING + _BUDGET), dropna=False):
        baseline = group[group["role"] == "baseline"]
        one_step = group[group["role"] == "one-step"]
        strongest = one_step.loc[one_step["strength"].idxmax()] if len(one_step) else None
        for _, cell in group.iterrows():
            # Beating noise needs no margin beyond rounding: a model that barely reacts to its image (a small
            # deviation) is not an unreliable evaluation; an attack no better than noise is.
            if cell["role"] != "baseline" and len(baseline) and cell["strength"] <= baseline["strength"].max() + 1e-3:
                flag(cell["id"], f"does not beat random {_names(baseline)} of the same budget "
                                 f"({cell['strength']:.2f} y vs {baseline['strength'].max():.2f} y)")
            if (cell["attack"] in held_to_one_step and strongest is not None
                    and _below(cell["strength"], strongest["strength"])):
                flag(cell["id"], f"weaker than {strongest['attack']} at the same budget ({cell['strength']:.2f} y "
                                 f"vs {strongest['strength']:.2f} y)")
    # Growth with epsilon is asked of attacks, not of the noise baseline: its draws differ from cell to cell (each
    # cell has its own seed), and under "perturbed" its random volume changes can outweigh the image's.
    attacks = done[done["role"] != "baseline"]
    for _, group in attacks.groupby(list(_SETTING + ("attack", "attack_config", "norm", "unit")), dropna=False):
        best_so_far, best_epsilon = -math.inf, None
        for _, cell in group.sort_values("epsilon").iterrows():
            if best_epsilon is not None and cell["epsilon"] > best_epsilon and _below(cell["strength"], best_so_far):
                flag(cell["id"], f"weaker than the same attack at the smaller epsilon {best_epsilon:g} "
                                 f"({cell['strength']:.2f} y vs {best_so_far:.2f} y)")
            if cell["strength"] > best_so_far:
                best_so_far, best_epsilon = cell["strength"], cell["epsilon"]
    return flags
