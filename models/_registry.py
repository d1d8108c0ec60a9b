"""Model registry in timm's shape: factories registered by function name, built by name.

A factory may declare what it is built from: ``requires`` names the registered models that must be trained
first, and ``from_trained(trained, **kwargs)`` builds the model from those trained models (the two-stage hybrid
takes a trained cnn3d's trunk). Training and the runner read these declarations; they name no model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from torch import nn

from medrobust.errors import MedrobustError
from medrobust.registry import Registry

F = TypeVar("F", bound=Callable)

_models = Registry("model")


def register_model(factory: F | None = None, *, requires: Sequence[str] = (),
                   from_trained: Callable[..., nn.Module] | None = None):
    """Record ``factory`` under its function name, which becomes the model's public identifier. Bare
    (``@register_model``) or with the models it is built from: ``@register_model(requires=("cnn3d",),
    from_trained=build)``, where ``build(trained: dict[name, model], **kwargs)`` makes it from them."""
    if requires and from_trained is None:
        raise MedrobustError("a model that requires trained models needs from_trained, the function that builds it "
                             "from them")

    def record(function: F) -> F:
        function.requires = tuple(requires)
        function.from_trained = from_trained
        return _models.register(function)

    return record if factory is None else record(factory)


def variant(cls: type, name: str, doc: str, **overrides) -> Callable[..., nn.Module]:
    """A factory of ``cls`` named ``name`` that is only its overrides of the class's defaults (timm's shape): its
    signature is the class's, with the overridden defaults, so that its arguments can be listed and checked."""
    signature = inspect.signature(cls.__init__)
    parameters = [p.replace(default=overrides.get(p.name, p.default)) for p in signature.parameters.values()
                  if p.name not in ("self", "name")]

    def factory(**kwargs) -> nn.Module:
        return cls(**{**overrides, **kwargs}, name=name)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = cls.__module__
    factory.__wrapped__ = cls  # where its source is (the signature is its own: __signature__ below)
    factory.__doc__ = doc
    factory.__signature__ = signature.replace(parameters=parameters, return_annotation=cls.__name__)
    return factory


def unregister_model(name: str) -> None:
    """Forget the registered model ``name`` (to register it again, as a notebook cell re-run does)."""
    _models.unregister(name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return _models.names(pattern)


def model_entrypoint(name: str) -> Callable:
    """The factory registered as ``name`` (to inspect its arguments)."""
    return _models.entrypoint(name)


def create_model(name: str, **kwargs):
    """Build the registered model ``name`` with constructor ``kwargs``."""
    return _models.create(name, **kwargs)


def model_requires(name: str) -> tuple[str, ...]:
    """The registered models that ``name`` is built from (trained before it), as its factory declares."""
    return getattr(model_entrypoint(name), "requires", ())


def create_from_trained(name: str, trained: Mapping[str, nn.Module], **kwargs) -> nn.Module:
    """Build ``name`` from the trained models it requires (``trained``: name -> model), or from scratch when it
    requires none; ``kwargs`` as for ``create_model``."""
    requires = model_requires(name)
    if not requires:
        return create_model(name, **kwargs)
    missing = [r for r in requires if r not in trained]
    if missing:
        raise MedrobustError(f"model {name!r} is built from a trained {', '.join(missing)}; train it first or "
                             f"give its checkpoint")
    return model_entrypoint(name).from_trained({r: trained[r] for r in requires}, **kwargs)


def training_order(names: Sequence[str]) -> list[str]:
    """``names`` (each once) in an order where every model comes after the models it requires that are also
    being trained; otherwise in the given order."""
    order: list[str] = []
    visiting: set[str] = set()
    wanted = list(dict.fromkeys(names))

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise MedrobustError(f"model {name!r} requires itself through {', '.join(sorted(visiting))}")
        visiting.add(name)
        for required in model_requires(name):
            if required in wanted:
                visit(required)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
