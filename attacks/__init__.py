"""Attack registry, budgets, objectives, threat models and the attacks.

Importing this package registers every built-in attack: each module of this folder that is not part of the
plumbing holds one attack class (``fgsm.py``, ``pgd.py``, ...) and is imported here, so adding an attack is
adding its file.
"""

import importlib
import pkgutil

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

# Plumbing modules; every other module of the package is one attack and is imported to register it.
_PLUMBING = {"base", "budget", "objectives"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _PLUMBING:
        importlib.import_module(f"{__name__}.{_module.name}")
