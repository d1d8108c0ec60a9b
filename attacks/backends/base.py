"""Plumbing of the attacks that run another library's implementation (ART, torchattacks): the optional import,
and the attacked model as the image-only regressor those libraries call."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import ClassVar

import torch
from torch import Tensor, nn

from medrobust.attacks.base import Attack, AttackState
from medrobust.errors import MedrobustError


class ExternalAttack(Attack):
    """Base of an attack whose steps another library computes. ``package`` is the library's import name and
    ``install`` how to install it; the library is optional, so it is imported only when such an attack is built
    or run, and a missing one is a ``MedrobustError`` that says how to install it."""

    package: ClassVar[str] = ""
    install: ClassVar[str] = ""

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        # Importing here makes a missing library fail when a config is checked, not an hour into a run.
        self.backend()

    def backend(self) -> ModuleType:
        """The library's top-level module."""
        try:
            return importlib.import_module(self.package)
        except ImportError as err:
            raise MedrobustError(
                f"attack '{self.name}' needs the optional package {self.package!r}, which cannot be imported "
                f"({err}); install it with: {self.install}"
            ) from None


class ImageOnlyModel(nn.Module):
    """The attacked model as the regressor ART and torchattacks call: ``forward(images) -> prediction [B]``.

    It binds the call's context features (the batch's clean ones, under the ``fixed`` threat model), so they stay
    fixed whatever the library does. It evaluates the model at the projection of the library's iterate into the
    mask, budget and range (``AttackState.project``: at most a few ulps from an iterate the library already
    projected and clipped), with the gradient passed straight through inside the mask and zero outside it, so a
    library that knows no mask never moves a voxel outside it. Each call is counted (a forward pass, and a backward
    pass when its output carries a gradient: the libraries differentiate every such call) and its iterate is
    scored for ``keep_best``, exactly as ``AttackState.gradient`` does for our own attacks. A model whose output
    has no graph from the image gets a zero gradient (``zero_gradient`` set), as in ``AttackState.evaluate``.
    """

    def __init__(self, state: AttackState) -> None:
        super().__init__()
        self.model = state.attack.model
        self.state = state
        # torchattacks puts a model that was in training mode back into it after the attack.
        self.train(False)

    def forward(self, images: Tensor) -> Tensor:
        state = self.state
        images = images.to(state.images.dtype)
        passthrough = images - images.detach()  # zero valued, identity gradient
        if state.mask is not None:
            passthrough = torch.where(state.mask, passthrough, torch.zeros_like(passthrough))
        attacked = state.project(images.detach()) + passthrough
        prediction = self.model(attacked, state.features)
        state.forward += 1
        if images.requires_grad and not prediction.requires_grad:
            # A model with no graph from its input (a detach inside): a zero gradient for the library, not its
            # crash, recorded as our own attacks record it.
            prediction = prediction + 0 * passthrough.flatten(1).sum(dim=1)
            if state.zero_gradient is None:
                state.zero_gradient = torch.ones_like(prediction, dtype=torch.bool)
        if prediction.requires_grad:
            state.backward += 1
            state.steps += 1
        detached = prediction.detach()
        state.record(attacked.detach(), detached, state.score(detached))
        return prediction
