"""Model registry in timm's shape: factories registered by function name, built by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TypeVar

from medrobust.errors import MedrobustError

_model_factories: dict[str, Callable] = {}

F = TypeVar("F", bound=Callable)


def register_model(factory: F) -> F:
    """Record ``factory`` under its function name, which becomes the model's public identifier."""
    name = factory.__name__
    if name in _model_factories:
        # A silent overwrite would let a plugin replace a built-in without anyone noticing.
        raise MedrobustError(f"model name '{name}' is already registered; pick another function name")
    _model_factories[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(name for name in _model_factories if fnmatch.fnmatchcase(name, pattern))


def model_entrypoint(name: str) -> Callable:
    """The factory registered as ``name`` (to inspect its arguments)."""
    try:
        return _model_factories[name]
    except KeyError:
        known = ", ".join(list_models()) or "(none)"
        raise MedrobustError(f"unknown model '{name}': choose one of {known}") from None


def create_model(name: str, **kwargs):
    """Build the registered model ``name`` with constructor ``kwargs``."""
    return model_entrypoint(name)(**kwargs)
