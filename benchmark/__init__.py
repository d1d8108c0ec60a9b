"""medrobust: adversarial-robustness benchmark suite for deep models on 3D medical images.

The public API, imported on first use (``import medrobust`` itself loads nothing heavy):
``create_model`` / ``list_models`` (``medrobust.models``), ``create_attack`` / ``list_attacks``
(``medrobust.attacks``), ``load_config`` (``medrobust.runner.config``), ``run`` and ``plan``
(``medrobust.runner``), ``ResultStore`` (``medrobust.results.store``), ``write_report``
(``medrobust.reports``) and ``evaluate`` (an in-memory module benchmarked in one call: ``medrobust.evaluation``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "create_model": "medrobust.models", "list_models": "medrobust.models",
    "create_attack": "medrobust.attacks", "list_attacks": "medrobust.attacks",
    "load_config": "medrobust.runner.config", "run": "medrobust.runner", "plan": "medrobust.runner",
    "ResultStore": "medrobust.results.store", "write_report": "medrobust.reports",
    "evaluate": "medrobust.evaluation",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medrobust' has no attribute {name!r}")
