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


def describe(kind: str) -> list[dict]:
    """The registered ``models`` or ``attacks`` (plugins included) as JSON-native records: name, the first
    paragraph of the docstring, the parameters with their defaults; a model's ``requires``, an attack's norms,
    threat models, role and scope (``medrobust list``)."""
    import inspect

    if kind == "models":
        from medrobust.models import list_models, model_entrypoint, model_requires

        entries = {name: model_entrypoint(name) for name in list_models()}
    elif kind == "attacks":
        from medrobust.attacks import attack_entrypoint, list_attacks

        entries = {name: attack_entrypoint(name) for name in list_attacks()}
    else:
        raise MedrobustError(f"kind must be models or attacks, got {kind!r}")
    described = []
    for name, entry in entries.items():
        doc = inspect.getdoc(entry) or ""
        item = {"name": name, "description": " ".join(doc.split("\n\n")[0].split())}
        if kind == "models":
            parameters = list(inspect.signature(entry).parameters.values())
            item["requires"] = list(model_requires(name))
        else:
            parameters = [p for klass in reversed(entry.__mro__) if "__init__" in klass.__dict__ and klass is not object
                          for p in inspect.signature(klass.__init__).parameters.values()]
            item.update(norms=list(entry.norms), threat_models=list(entry.threat_models), role=entry.role,
                        scope=entry.scope)
        item["parameters"] = {p.name: _jsonable(p.default) for p in parameters
                              if p.name not in ("self", "model") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        described.append(item)
    return described


def _jsonable(value):
    """A parameter's default as JSON holds it (a Budget as its dict, no default as null)."""
    import inspect

    if value is inspect.Parameter.empty:
        return None
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
