"""Attack registry, budgets, objectives, threat models and the attacks.

Importing this package registers every built-in attack. The imports below are its table of contents: adding an
attack is adding its file and one line here.
"""

from medrobust.attacks._registry import (
    attack_entrypoint,
    create_attack,
    list_attacks,
    register_attack,
    unregister_attack,
)
from medrobust.attacks.apgd import APGD

# Cross-checks through other libraries (ART, torchattacks)
from medrobust.attacks.backends import ARTFGSM, ARTPGD, TorchattacksPGD
from medrobust.attacks.base import Attack, AttackResult, CleanPasses
from medrobust.attacks.bim import BIM
from medrobust.attacks.budget import NORMS, UNITS, Budget, perturbation_norms
from medrobust.attacks.cw import CW

# The worst case per subject over a set of attacks
from medrobust.attacks.ensemble import Ensemble

# Gradient attacks on each batch: one step, then many steps
from medrobust.attacks.fgsm import FGSM  # noqa: I001  (grouped by kind, not sorted)
from medrobust.attacks.greedy_l0 import GreedyL0

# Baselines
from medrobust.attacks.noise import Noise
from medrobust.attacks.objectives import OBJECTIVES
from medrobust.attacks.pgd import PGD

# Black-box: the model's output only
from medrobust.attacks.square import Square
from medrobust.attacks.threats import THREAT_MODELS

# One perturbation fitted on a set of subjects
from medrobust.attacks.universal import Universal

__all__ = [
    "APGD",
    "ARTFGSM",
    "ARTPGD",
    "BIM",
    "CW",
    "Ensemble",
    "FGSM",
    "NORMS",
    "OBJECTIVES",
    "PGD",
    "Square",
    "THREAT_MODELS",
    "UNITS",
    "Attack",
    "AttackResult",
    "Budget",
    "CleanPasses",
    "GreedyL0",
    "Noise",
    "TorchattacksPGD",
    "Universal",
    "attack_entrypoint",
    "create_attack",
    "list_attacks",
    "perturbation_norms",
    "register_attack",
    "unregister_attack",
]
