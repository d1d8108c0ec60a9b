"""Attack registry, budgets, objectives, threat models and the attacks.

Importing this package registers every built-in attack: ``fgsm``, ``pgd``.
"""

from medrobust.attacks import fgsm, pgd  # noqa: F401  (registers the built-ins)
from medrobust.attacks._registry import attack_entrypoint, create_attack, list_attacks, register_attack
from medrobust.attacks.base import THREAT_MODELS, Attack, AttackResult
from medrobust.attacks.budget import NORMS, UNITS, Budget, perturbation_norms
from medrobust.attacks.objectives import OBJECTIVES

__all__ = [
    "NORMS",
    "OBJECTIVES",
    "THREAT_MODELS",
    "UNITS",
    "Attack",
    "AttackResult",
    "Budget",
    "attack_entrypoint",
    "create_attack",
    "list_attacks",
    "perturbation_norms",
    "register_attack",
]
