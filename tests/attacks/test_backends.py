"""The ART and torchattacks backends: the same adversarial batch as our own attacks, and clear errors without them.

The backends' libraries are optional: a test that needs one is skipped, with the install line, where it cannot
be imported. CI installs both (``make venv``), so there these tests run.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from medrobust.attacks import OBJECTIVES, attack_entrypoint, create_attack
from medrobust.attacks.checks import (
    BUDGETS,
    MODEL_CASES,
    TARGET_AGE,
    toy_inputs,
    toy_model,
)
from medrobust.errors import MedrobustError

# (our attack, the backend, budget norm, settings of both): deterministic, no random start. ART's PGD clips to the
# range before projecting onto the ball and ours after; under l2 the two differ where both bind (2e-3 of the range
# here at 8 steps), so the l2 PGD pair, whose 8 steps reach the ball, runs without the range clip.
PAIRS = [
    ("fgsm", "art-fgsm", "linf", {}),
    ("fgsm", "art-fgsm", "l2", {}),
    ("pgd", "art-pgd", "linf", {"steps": 4, "random_start": False}),
    ("pgd", "art-pgd", "l2", {"steps": 8, "random_start": False, "clip": "none"}),
    ("pgd", "torchattacks-pgd", "linf", {"steps": 4, "random_start": False}),
]


def needs(name: str) -> None:
    """Skip the test, saying how to install it, where the backend's library cannot be imported."""
    attack = attack_entrypoint(name)
    try:
        importlib.import_module(attack.package)
    except ImportError as err:
        pytest.skip(f"backend {name} needs {attack.package!r}, which cannot be imported here ({err}); "
                    f"install it with: {attack.install}")


def attack_both(ours: str, backend: str, case: str, norm: str, objective: str, settings: dict):
    model = toy_model(case)
    images, features, ages, mask = toy_inputs(case)
    kwargs = {"budget": BUDGETS[norm], "objective": objective, **settings}
    if objective == "target":
        kwargs["target_age"] = TARGET_AGE
    reference = create_attack(ours, model, **kwargs)(images, features, ages, mask)
    if backend == "art-pgd":
        kwargs.pop("random_start", None)
    result = create_attack(backend, model, **kwargs)(images, features, ages, mask)
    return images, reference, result


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize(("ours", "backend", "norm", "settings"), PAIRS)
def test_a_backend_gives_our_adversarial_batch(ours: str, backend: str, norm: str, settings: dict, case: str,
                                               objective: str) -> None:
    needs(backend)
    images, reference, result = attack_both(ours, backend, case, norm, objective, settings)
    flat = images.flatten(1)
    image_range = (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, *[1] * (images.dim() - 1))
    difference = (result.images - reference.images).abs() / image_range
    assert difference.max() <= 1e-5, f"max difference {difference.max():.2e} of the range"
    assert (reference.images != images).any()
    assert torch.allclose(result.adversarial_prediction, reference.adversarial_prediction, rtol=0, atol=1e-3)
    # The backends make the same passes but one: ART and torchattacks need the clean prediction up front (as the
    # labels they attack), where ours takes it from the first gradient pass at the clean image.
    assert (result.forward, result.backward, result.steps) == (reference.forward + 1, reference.backward,
                                                               reference.steps)


@pytest.mark.parametrize("backend", ["art-fgsm", "art-pgd", "torchattacks-pgd"])
def test_the_range_clip_binds_where_the_equivalence_is_checked(backend: str) -> None:
    # Per-image bounds, not ART's one global clip range nor torchattacks' [0, 1], make the batches equal: some
    # voxels stop at their image's max or min before moving the full radius.
    needs(backend)
    ours, settings = ("fgsm", {}) if backend == "art-fgsm" else ("pgd", {"steps": 4, "random_start": False})
    images, _, result = attack_both(ours, backend, "cnn3d", "linf", "older", settings)
    flat = images.flatten(1)
    top, bottom = (flat.amax(dim=1).view(-1, 1, 1, 1, 1), flat.amin(dim=1).view(-1, 1, 1, 1, 1))
    radius = 0.02 * (top - bottom)
    short = (result.images - images).abs() < radius * 0.999
    assert (short & ((result.images == top) | (result.images == bottom)) & (result.images != images)).any()


def test_torchattacks_pgd_draws_the_random_start_of_pgd() -> None:
    needs("torchattacks-pgd")
    images, reference, result = attack_both("pgd", "torchattacks-pgd", "conv2d", "linf", "deviation",
                                            {"steps": 2, "random_start": True, "seed": 7})
    assert (result.images - reference.images).abs().max() <= 1e-5 * 9.0
    again = create_attack("torchattacks-pgd", toy_model("conv2d"), steps=2, seed=8, budget=BUDGETS["linf"])(images)
    assert not torch.equal(again.images, result.images)


@pytest.mark.parametrize(("objective", "expected"), [
    ("older", "ages"), ("error", "ages"), ("deviation", "clean"), ("target", "target"),
])
def test_art_gets_float_labels_of_shape_n(objective: str, expected: str, monkeypatch) -> None:
    # (N, 1) or None would make ART's regressor loss broadcast to N x N with only a warning.
    needs("art-fgsm")
    from medrobust.attacks.backends import art as _art

    seen = []
    forward = _art.ObjectiveLoss.forward

    def spy(self, prediction, reference):
        seen.append((prediction.shape, reference.detach().clone()))
        return forward(self, prediction, reference)

    monkeypatch.setattr(_art.ObjectiveLoss, "forward", spy)
    model = toy_model("cnn3d")
    images, _, ages, mask = toy_inputs("cnn3d")
    target = TARGET_AGE if objective == "target" else None
    result = create_attack("art-fgsm", model, objective=objective, target_age=target)(images, ages=ages, mask=mask)
    assert len(seen) == 1
    shape, reference = seen[0]
    assert shape == reference.shape == (len(images),) and reference.dtype == torch.float32
    values = {"ages": ages, "clean": result.clean_prediction, "target": torch.full((2,), TARGET_AGE)}[expected]
    assert torch.equal(reference, values.to(reference.dtype))


@pytest.mark.parametrize(("name", "install"), [
    ("art-fgsm", "medrobust[art]"), ("art-pgd", "medrobust[art]"), ("torchattacks-pgd", "--no-deps torchattacks"),
])
def test_a_missing_library_is_an_error_that_says_how_to_install_it(name: str, install: str, monkeypatch) -> None:
    package = attack_entrypoint(name).package
    monkeypatch.setitem(sys.modules, package, None)  # import then raises ImportError
    with pytest.raises(MedrobustError, match=f"attack '{name}' needs the optional package '{package}'") as info:
        create_attack(name, toy_model("conv2d"))
    assert install in str(info.value)


@pytest.mark.parametrize(("name", "kwargs", "word"), [
    ("art-pgd", {"steps": 0}, "steps"),
    ("art-pgd", {"step_size": -1.0}, "step_size"),
    ("art-pgd", {"random_start": True}, "random_start"),
    ("torchattacks-pgd", {"steps": 2.5}, "steps"),
    ("torchattacks-pgd", {"random_start": 1}, "random_start"),
    ("torchattacks-pgd", {"budget": {"norm": "l2"}}, "norms linf"),
])
def test_bad_backend_arguments_name_the_parameter(name: str, kwargs: dict, word: str) -> None:
    needs(name)
    with pytest.raises((MedrobustError, TypeError), match=word):
        create_attack(name, toy_model("conv2d"), **kwargs)
