"""The worst case per subject over a set of attacks at one budget (in the spirit of AutoAttack, for regression):
the number a robustness claim should rest on."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import attack_entrypoint, list_attacks, register_attack
from medrobust.attacks.arguments import check_flag
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import Budget
from medrobust.attacks.pgd import PGD
from medrobust.errors import MedrobustError
from medrobust.vocabulary import THREAT_MODELS

# Objectives with two directions (|p - p_clean|, |p - age|): each gradient member runs once per direction, so that
# the far end of the age range on either side is tried (the kink of |.| at the start gives no direction).
TWO_SIDED = ("deviation", "error")
# The default members per norm: gradient attacks with strong defaults (each at the ensemble's objective, or once
# per direction for a two-sided one), for l-inf and l2 the black-box square attack, and for l0 the greedy walk
# under both rankings: ranked by gain it reaches a linear model's optimum, ranked by |gradient| (the paper's) it
# was the stronger on the trained models of configs/li2020-cpu.toml (README).
DEFAULT_MEMBERS = {
    "linf": ({"name": "apgd"}, {"name": "square"}),
    "l2": ({"name": "apgd"}, {"name": "square"}),
    "l0": ({"name": "l0"}, {"name": "l0", "ranking": "gradient"}),
}
# The ensemble's own settings, which every member shares: a member may not set them.
SHARED = ("budget", "threat_model", "clip", "keep_best", "seed", "feature_budget")
# The unbounded probe: pgd at an l-inf budget of the whole intensity range, this many steps per direction.
PROBE_STEPS = 10


@register_attack
class Ensemble(Attack):
    """For each subject, the worst result over ``members`` at the same budget, threat model, clip and seed, under
    the ensemble's objective: every member attacks the whole batch, and each subject keeps the member image that
    scores highest for the ensemble's objective (with ``keep_best``, its clean image if none beats it; members
    share ``keep_best``).

    ``members``: a list of ``{"name": attack, **arguments}`` (a member may set its own ``objective``, e.g.
    ``{"name": "apgd", "objective": "older"}``, but not the shared budget, threat model, clip, keep_best, seed or
    feature budget). By default, per norm: l-inf and l2, ``apgd`` (100 steps, random start) and the black-box
    ``square`` (1000 queries); l0, the greedy ``l0`` ranked by gain and ranked by |gradient| (the paper's). For the
    two-sided objectives (``deviation``, ``error``) each gradient member runs twice, with objective ``older`` and
    ``younger``: the worst case is at one end of the age range or the other, and each direction is pushed to its
    end. Members that do not support the budget's norm or the threat model are left out (``square`` under
    ``perturbed``), so one list serves a grid of several norms; the members are resolved when the ensemble is built,
    so a cell's identity lists them. Member i draws its random numbers from seed + i.

    ``probe`` (on by default) also runs the unbounded check of the reliability checks: ``pgd`` at an l-inf
    budget of the whole intensity range (``PROBE_STEPS`` steps, objectives older and younger, the same threat
    model), which a working gradient attack uses to move any healthy model's prediction far; per subject the
    larger of the two shifts is reported (``diagnostics["unbounded_shift"]``), and it never enters the result.
    ``diagnostics`` also say per subject which member gave the worst case (``won:<member>``, 1 or 0).

    Costs the sum of its members' passes (each member's clean and final predictions included), the probe's, and
    the ensemble's own clean and final prediction (two forward passes); all are counted.
    """

    name = "ensemble"
    role = "ensemble"
    norms = ("linf", "l2", "l0")
    threat_models = THREAT_MODELS
    quick = {"members": [{"name": "pgd", "steps": 3}, {"name": "square", "queries": 5},
                         {"name": "l0", "max_failures": 4}], "probe": False}

    def __init__(self, model: nn.Module, *args, members: list | None = None, probe: bool = True,
                 **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.probe = check_flag("probe", probe)
        self.members = self._resolve(members)
        self._built = [self._member(index, spec) for index, spec in enumerate(self.members)]

    def _resolve(self, members: list | None) -> list[dict]:
        """The members as explicit ``{"name", **arguments}`` dicts: the defaults of the norm (each gradient member
        once per direction for a two-sided objective), or the given ones checked; those that do not support the
        budget's norm or the threat model left out (one list of members can serve a grid of several norms)."""
        if members is None:
            resolved = []
            for spec in DEFAULT_MEMBERS[self.budget.norm]:
                entry = attack_entrypoint(spec["name"])
                if self.objective in TWO_SIDED and entry.role != "black-box":
                    resolved += [{**spec, "objective": "older"}, {**spec, "objective": "younger"}]
                else:
                    resolved.append(dict(spec))
        else:
            if not isinstance(members, (list, tuple)) or not members:
                raise MedrobustError(f"members must be a non-empty list of {{name = attack, ...}} tables, got "
                                     f"{members!r}")
            resolved = []
            for spec in members:
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    raise MedrobustError(f"each member must be a table with the attack's name, e.g. "
                                         f"{{name = \"apgd\", steps = 50}}, got {spec!r}")
                if spec["name"] not in list_attacks() or spec["name"] == self.name:
                    known = ", ".join(name for name in list_attacks() if name != self.name)
                    raise MedrobustError(f"ensemble member {spec['name']!r} is not a registered attack; known: "
                                         f"{known}")
                shared = sorted(set(spec) & set(SHARED))
                if shared:
                    raise MedrobustError(f"ensemble member {spec['name']!r} sets {', '.join(shared)}, which the "
                                         f"ensemble shares with every member; set it on the ensemble")
                resolved.append(copy.deepcopy(dict(spec)))
        usable = [spec for spec in resolved if self.threat_model in attack_entrypoint(spec["name"]).threat_models
                  and self.budget.norm in attack_entrypoint(spec["name"]).norms]
        if not usable:
            raise MedrobustError(f"no ensemble member supports budget norm {self.budget.norm!r} under threat model "
                                 f"{self.threat_model!r}: {', '.join(spec['name'] for spec in resolved)}")
        return usable

    def _member(self, index: int, spec: dict) -> Attack:
        arguments = {key: value for key, value in spec.items() if key != "name"}
        objective = arguments.pop("objective", self.objective)
        target_age = arguments.pop("target_age", self.target_age if objective == "target" else None)
        try:
            return attack_entrypoint(spec["name"])(
                self.model, budget=self.budget, objective=objective, target_age=target_age,
                threat_model=self.threat_model, clip=self.clip, keep_best=self.keep_best, seed=self.seed + index,
                feature_budget=self.feature_budget, **arguments)
        except TypeError as err:
            raise MedrobustError(f"ensemble member {spec['name']!r}: {err}") from None

    def member_labels(self) -> list[str]:
        """One label per member: its name, the arguments it sets (``l0 ranking=gradient``) and its objective where
        it is not the ensemble's (``apgd/older``); a repeated label gets its position (``#2``)."""
        labels = []
        for spec in self.members:
            arguments = "".join(f" {key}={value}" for key, value in spec.items() if key not in ("name", "objective"))
            objective = spec.get("objective", self.objective)
            label = spec["name"] + arguments + (f"/{objective}" if objective != self.objective else "")
            labels.append(label if label not in labels else f"{label} #{len(labels) + 1}")
        return labels

    def perturb(self, state: AttackState) -> Tensor:
        # Per subject the best member result so far; with keep_best the clean image is the first candidate.
        images, features = state.images, state.clean_features
        score = state.score(state.clean_prediction)
        if not self.keep_best:
            score = torch.full_like(score, -torch.inf)
        winner = torch.full_like(score, -1, dtype=torch.long)
        for index, member in enumerate(self._built):
            result = member(state.images, state.clean_features, state.ages, state.mask, state.extractor,
                            state.sample_seeds)
            state.forward += result.forward
            state.backward += result.backward
            state.steps += result.steps
            state.merge_gradient_faults(result)
            member_score = state.score(result.adversarial_prediction)
            better = member_score > score
            winner = torch.where(better, index, winner)
            score = torch.where(better, member_score, score)
            images = torch.where(better.view(state.ball.view), result.images, images)
            if result.features is not None:
                features = torch.where(better.view(-1, 1), result.features, features)
        diagnostics = {f"won:{label}": (winner == index).to(state.images.dtype)
                       for index, label in enumerate(self.member_labels())}
        if self.probe:
            diagnostics["unbounded_shift"] = self._probe(state)
        state.diagnostics.update(diagnostics)
        state.features = features  # finish() predicts the chosen images with them (recomputed: measures them)
        return images

    def _probe(self, state: AttackState) -> Tensor:
        """Per subject, the larger shift of the prediction (years) that ``pgd`` reaches up and down at an l-inf
        budget of the whole intensity range; its passes are counted, its images discarded."""
        shifts = []
        for objective in ("older", "younger"):
            probe = PGD(self.model, budget=Budget("linf", 1.0, "range"), objective=objective,
                        threat_model=self.threat_model, clip=self.clip, steps=PROBE_STEPS, random_start=False,
                        feature_budget=self.feature_budget)
            result = probe(state.images, state.clean_features, state.ages, state.mask, state.extractor)
            state.forward += result.forward
            state.backward += result.backward
            state.steps += result.steps
            shifts.append((result.adversarial_prediction - result.clean_prediction).abs())
        return torch.maximum(*shifts)
