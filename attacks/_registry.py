"""Attack registry in the shape of the model registry: classes registered by their ``name``, built by name.

``register_attack`` (class decorator), ``unregister_attack``, ``list_attacks(pattern="*")`` and
``attack_entrypoint(name)`` are the shared ``Registry``'s own methods; only ``create_attack`` adds something: the
model every attack is built on.
"""

from __future__ import annotations

from torch import nn

from medrobust.registry import Registry

_attacks = Registry("attack")

register_attack = _attacks.register
unregister_attack = _attacks.unregister
list_attacks = _attacks.names
attack_entrypoint = _attacks.entrypoint


def create_attack(name: str, model: nn.Module, **kwargs):
    """Build the registered attack ``name`` on ``model`` with constructor ``kwargs`` (all defaulted)."""
    return _attacks.create(name, model, **kwargs)
