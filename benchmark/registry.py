"""One registry shape for models and attacks, after timm: factories recorded by name, built by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TypeVar

from medrobust.errors import MedrobustError

F = TypeVar("F", bound=Callable)


class Registry:
    """Named factories of one kind ("model", "attack"). A factory's public identifier is its ``name`` attribute
    when it has one (attack classes), else its function name (model factories)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable] = {}

    def register(self, factory: F) -> F:
        """Record ``factory`` under its name; registering a taken name is an error."""
        name = getattr(factory, "name", None) if isinstance(factory, type) else None
        name = name or factory.__name__
        if name in self._factories:
            # A silent overwrite would let a plugin replace a built-in without anyone noticing.
            raise MedrobustError(f"{self.kind} name '{name}' is already registered; pick another name")
        self._factories[name] = factory
        return factory

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a notebook cell that registers a model again, a test's temporary entry)."""
        self.entrypoint(name)
        del self._factories[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the shell-style ``pattern``, sorted."""
        return sorted(name for name in self._factories if fnmatch.fnmatchcase(name, pattern))

    def entrypoint(self, name: str) -> Callable:
        """The factory registered as ``name`` (to inspect its arguments)."""
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise MedrobustError(f"unknown {self.kind} '{name}': choose one of {known}") from None

    def create(self, name: str, *args, **kwargs):
        """Build the registered ``name`` with the given arguments."""
        return self.entrypoint(name)(*args, **kwargs)

