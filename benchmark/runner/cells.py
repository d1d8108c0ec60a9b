"""Cells: one model under one attack, budget, objective and threat model; their ids, seeds and the grid.

A cell's id is a hash of everything that decides its result (its spec, less the keys that only locate or name it:
``medrobust.results.store.NOT_IDENTITY``, the model's label among them), so re-running a config skips the cells
already in the store and renaming a model only relabels its cells. Its seed comes from its attack setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from medrobust.attacks import Attack, Budget, attack_entrypoint, create_attack
from medrobust.models import BrainAgeModel
from medrobust.results.store import NOT_IDENTITY, cell_id, describe_spec
from medrobust.runner.config import AttackSpec, RunConfig

# Spec keys that decide what is measured, not what the attack does: part of a cell's id, not of its seed.
_MEASUREMENT_ONLY = ("ssim",)
# How a cell's random draws are seeded (part of its id, so cells computed under another scheme are redone):
# 2 = the attack's seed derived from the cell's attack setting, and one random stream per subject.
SEEDING = 2


@dataclass
class Cell:
    """One unit of work and of results: a model under one attack, budget, objective and threat model."""

    model: str  # the model's label
    attack: AttackSpec
    budget: Budget
    objective: str
    threat_model: str
    extractor: str | None = None  # how `recomputed` measures the features (medrobust.attacks.extractors)
    spec: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return cell_id(self.spec)

    @property
    def seed(self) -> int:
        """The seed of the cell's random draws, from everything that decides what its attack does (not what is
        measured of it): two cells draw differently, a re-run repeats, and switching a measurement off or on
        leaves the attacked images as they were."""
        return int(cell_id(self.spec, NOT_IDENTITY + _MEASUREMENT_ONLY)[:8], 16)

    def describe(self) -> str:
        return describe_spec({"model": self.model, "attack": self.attack.name, **self.budget.as_dict(),
                              "objective": self.objective, "threat_model": self.threat_model,
                              "extractor": self.extractor})


def is_set_level(attack_name: str) -> bool:
    """Whether the attack fits one perturbation on a set of subjects (its declared ``scope`` is ``set``, as a
    universal perturbation's) rather than attacking each batch."""
    return attack_entrypoint(attack_name).scope == "set"


def expand_cells(config: RunConfig, base_spec: dict[str, dict], uses_features: dict[str, bool] | None = None
                 ) -> list[Cell]:
    """Every (model, attack, budget, objective, threat model) of the config, with its spec. An attack meets only
    the budgets and threat models it supports; a model without context features (``uses_features`` False) only
    the threat model ``fixed``, the others being the same for it."""
    cells = []
    for spec in config.models:
        for attack in config.attacks:
            entry = attack_entrypoint(attack.name)
            budgets = [b for b in (attack.budgets or config.budgets) if b.norm in entry.norms]
            threat_models = [t for t in config.threat_models if t in entry.threat_models
                             and (t == "fixed" or (uses_features or {}).get(spec.label, True))]
            for budget in budgets:
                for objective in config.objectives:
                    for threat_model in threat_models:
                        # how the features are measured on the attacked image: one cell per extractor
                        for extractor in config.extractors if threat_model == "recomputed" else [None]:
                            cell = Cell(spec.label, attack, budget, objective, threat_model, extractor)
                            cell.spec = {**base_spec[spec.label], "attack": attack.name, **budget.as_dict(),
                                         "objective": objective, "threat_model": threat_model}
                            if extractor is not None:
                                cell.spec["extractor"] = extractor
                            cells.append(cell)
    return cells


def sharing_groups(cells: list[Cell], share: bool = True) -> list[list[Cell]]:
    """``cells`` cut into the groups that are computed together, in the order of their first cells: with ``share``,
    cells of one model that differ only in their budget (norm and epsilon), whose calls on a batch then share the
    passes at the clean images (``medrobust.attacks.CleanPasses``: the clean prediction, the gradient pass of an
    attack that starts at the clean images), each cell's result the same as alone; every other cell alone (a
    universal perturbation's too: it is fitted per budget)."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        key = cell.id if not share or is_set_level(cell.attack.name) else _all_but_the_budget(cell)
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def _all_but_the_budget(cell: Cell) -> str:
    """What decides a cell's result but its budget (and the seed drawn from it)."""
    budget = tuple(cell.budget.as_dict())
    spec = {key: value for key, value in cell.spec.items() if key not in (*budget, "cell_seed")}
    spec["params"] = {key: value for key, value in spec.get("params", {}).items() if key not in ("budget", "seed")}
    return json.dumps(spec, sort_keys=True, default=str)


def describe_group(cells: list[Cell]) -> str:
    """Cells computed together as one line, the first one named (its progress is the one shown):
    ``cnn3d fgsm linf eps=0.0005 range older fixed (and 5 more budgets)``."""
    more = len(cells) - 1
    return cells[0].describe() + (f" (and {more} more budget{'s' * (more > 1)})" if more else "")


def subject_seeds(seed: int, subjects: list[str]) -> list[int]:
    """One seed per subject (its own random stream), so that a result does not depend on how the subjects are cut
    into batches: a batch halved after an out-of-memory error gives the same images."""
    return [int(hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()[:8], 16) for subject in subjects]


def build_attack(cell: Cell, model: BrainAgeModel, config: RunConfig, seed: int | None = None) -> Attack:
    """The cell's attack on ``model``, seeded with ``seed`` (default: the run's seed)."""
    return create_attack(cell.attack.name, model, budget=cell.budget, objective=cell.objective,
                         target_age=config.target_age, threat_model=cell.threat_model,
                         seed=config.seed if seed is None else seed, **cell.attack.params)
