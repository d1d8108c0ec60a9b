"""Model registry in timm's shape: factories registered by function name, built by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from medrobust.registry import Registry

F = TypeVar("F", bound=Callable)

_models = Registry("model")


def register_model(factory: F) -> F:
    """Record ``factory`` under its function name, which becomes the model's public identifier."""
    return _models.register(factory)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return _models.names(pattern)


def model_entrypoint(name: str) -> Callable:
    """The factory registered as ``name`` (to inspect its arguments)."""
    return _models.entrypoint(name)


def create_model(name: str, **kwargs):
    """Build the registered model ``name`` with constructor ``kwargs``."""
    return _models.create(name, **kwargs)
