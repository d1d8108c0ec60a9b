"""The model contract as functions, as scikit-learn ships ``check_estimator``: each ``check_*`` tests one property
of a registered model on a tiny grid, and ``check_model(name)`` runs every one. The package's own test suite runs
them on every registered model; whoever registers a model (in a plugin, say) can run the same:

    from medrobust.models.checks import check_model
    check_model("my_net")          # raises AssertionError naming the check that failed

A check builds the model with ``tiny_model`` (the factory's own defaults but a 32^3 grid, feature names where the
factory takes them, a non-trivial target and feature scaling) and feeds it ``toy_batch``.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from medrobust.errors import MedrobustError
from medrobust.models._registry import create_model, model_entrypoint
from medrobust.models.base import BrainAgeModel
from medrobust.models.checkpoint import load_checkpoint, save_checkpoint

# Five pools take 32 to 1 per side: the smallest grid the default trunk accepts, so each check stays fast.
GRID = (32, 32, 32)
FEATURE_NAMES = ["sex", "field_strength", "vol_hippocampus_l", "vol_ventricles"]
# Raw context features in their own units (mL for volumes): the model standardizes them itself.
FEATURE_MEAN = [0.5, 2.0, 4.0, 30.0]
FEATURE_STD = [0.5, 0.8, 0.5, 12.0]
BATCH = 3


def tiny_model(name: str, seed: int = 0) -> BrainAgeModel:
    """The registered model ``name`` on the small grid, with feature names where its factory takes them, and
    non-trivial scaling (ages in tens of years, features in their own units), in eval mode."""
    params = inspect.signature(model_entrypoint(name)).parameters
    kwargs = {"input_shape": GRID}
    if "feature_names" in params:
        kwargs["feature_names"] = FEATURE_NAMES
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    model.set_target_scaling(40.0, 20.0)
    if model.meta.uses_features:
        model.set_feature_scaling(FEATURE_MEAN, FEATURE_STD)
    return model.eval()  # as it is attacked: batch norm and dropout in eval mode


def toy_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [3, 1, 32, 32, 32] and raw context features [3, 4] (``FEATURE_NAMES``)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 1, *GRID, generator=generator)
    z = torch.randn(BATCH, len(FEATURE_NAMES), generator=generator)
    features = z * torch.tensor(FEATURE_STD) + torch.tensor(FEATURE_MEAN)
    return image, features


def check_output_is_age_per_sample(name: str) -> None:
    """forward(image, features) gives one finite float32 age per sample, from a BrainAgeModel named ``name``."""
    model = tiny_model(name)
    image, features = toy_batch()
    out = model(image, features)
    assert out.shape == (BATCH,), f"{name}: output shape {tuple(out.shape)}, expected ({BATCH},)"
    assert out.dtype == torch.float32, f"{name}: output dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite ages"
    assert isinstance(model, BrainAgeModel), f"{name}: not a BrainAgeModel"
    assert model.meta.name == name, f"{name}: meta.name is {model.meta.name!r}"


def check_deterministic_under_seed(name: str) -> None:
    """The same seed builds the same weights and predictions; another seed others."""
    first, second, other = tiny_model(name, seed=0), tiny_model(name, seed=0), tiny_model(name, seed=1)
    image, features = toy_batch()
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), f"{name}: {key} differs under the same seed"
    assert torch.equal(first(image, features), second(image, features)), f"{name}: predictions differ"
    assert not torch.equal(first(image, features), other(image, features)), f"{name}: the seed changes nothing"


def check_batch_independence(name: str) -> None:
    """In eval mode each sample's prediction depends on that sample only (a batch-norm layer in training mode or
    a cross-sample operation would let an attack on one subject move another)."""
    model = tiny_model(name).eval()
    image, features = toy_batch()
    with torch.no_grad():
        together = model(image, features)
        alone = torch.cat([model(image[i:i + 1], features[i:i + 1]) for i in range(BATCH)])
    # float32 kernels sum in another order for another batch size: a few ulps of the age (1.5e-5 y at 190 y) move,
    # and CPU kinds differ in how many; a sample that leaks into another moves it by far more
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-3), f"{name}: predictions depend on the batch"


def check_gradient_reaches_every_input_used(name: str) -> None:
    """A finite, non-zero gradient reaches the image and the features where the model uses them; none reaches an
    input it ignores."""
    model = tiny_model(name)
    image, features = toy_batch()
    image.requires_grad_(True)
    features.requires_grad_(True)
    model(image, features).sum().backward()
    for label, used, tensor in (("image", model.meta.uses_image, image),
                                ("features", model.meta.uses_features, features)):
        if used:
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"{name}: no gradient reaches the {label}"
            assert torch.isfinite(tensor.grad).all(), f"{name}: non-finite gradient of the {label}"
        else:
            assert tensor.grad is None or not tensor.grad.any(), f"{name}: a gradient reaches the unused {label}"


def check_unused_inputs_are_ignored(name: str) -> None:
    """An input the model does not use may be None or anything, with the same prediction."""
    model = tiny_model(name)
    image, features = toy_batch()
    out = model(image, features)
    if not model.meta.uses_image:
        assert torch.equal(out, model(None, features)), f"{name}: the unused image matters"
        assert torch.equal(out, model(torch.zeros(BATCH, 1, 8, 8, 8), features)), f"{name}: the unused image matters"
    if not model.meta.uses_features:
        assert model.meta.feature_names == [], f"{name}: names features it does not use"
        assert torch.equal(out, model(image, None)), f"{name}: the unused features matter"
        assert torch.equal(out, model(image, torch.randn(BATCH, 7))), f"{name}: the unused features matter"


def check_nan_features_are_imputed_with_the_training_mean(name: str) -> None:
    """A missing feature (NaN) counts as its training mean, and its gradient stays finite."""
    model = tiny_model(name)
    image, features = toy_batch()
    missing = features.clone()
    missing[0, 2] = math.nan
    missing.requires_grad_(True)
    out = model(image, missing)
    assert torch.isfinite(out).all(), f"{name}: a missing feature gives a non-finite age"
    out.sum().backward()
    # Attacks take gradients through the features: a missing value must not poison them with NaN.
    assert missing.grad is None or torch.isfinite(missing.grad).all(), f"{name}: NaN gradient of a missing feature"
    if model.meta.uses_features:
        imputed = features.clone()
        imputed[0, 2] = FEATURE_MEAN[2]
        assert torch.allclose(out, model(image, imputed)), f"{name}: a missing feature is not its training mean"


def check_feature_scaling_is_applied_to_raw_features(name: str) -> None:
    """The model standardizes raw features with its own scaling (so attacks move them in their own units)."""
    scaled, identity = tiny_model(name), tiny_model(name)
    if not scaled.meta.uses_features:
        return
    identity.set_feature_scaling([0.0] * len(FEATURE_NAMES), [1.0] * len(FEATURE_NAMES))
    image, features = toy_batch()
    standardized = (features - torch.tensor(FEATURE_MEAN)) / torch.tensor(FEATURE_STD)
    assert torch.allclose(scaled(image, features), identity(image, standardized), atol=1e-5), name
    assert not torch.allclose(scaled(image, features), identity(image, features)), name


def check_wrong_inputs_raise_clear_errors(name: str) -> None:
    """An image off the grid, a missing image, features of the wrong width or missing features: a
    MedrobustError saying what is expected."""
    model = tiny_model(name)
    image, features = toy_batch()
    cases = []
    if model.meta.uses_image:
        cases += [((torch.zeros(BATCH, 1, 32, 32, 30), features), r"(32, 32, 32)"), ((None, features), "image")]
    if model.meta.uses_features:
        cases += [((image, features[:, :2]), f"[B, {len(FEATURE_NAMES)}]"), ((image, None), "features")]
    for args, expected in cases:
        try:
            model(*args)
        except MedrobustError as error:
            assert expected in str(error), f"{name}: {error!s} does not say {expected!r}"
        else:
            raise AssertionError(f"{name}: bad input accepted (expected an error saying {expected!r})")


def check_meta_kwargs_rebuild_the_architecture(name: str) -> None:
    """``meta.kwargs`` survive JSON and rebuild the same architecture through the registry (what a checkpoint
    relies on)."""
    model = tiny_model(name)
    kwargs = json.loads(json.dumps(model.meta.kwargs))
    assert kwargs == model.meta.kwargs, f"{name}: meta.kwargs are not JSON-native"
    rebuilt = create_model(name, **kwargs)
    assert rebuilt.meta == model.meta, f"{name}: rebuilt meta differs"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes, f"{name}: rebuilt tensors differ"


def check_checkpoint_round_trip_is_bit_exact(name: str, folder: Path | None = None) -> None:
    """save_checkpoint then load_checkpoint (by stem or by either file) gives the same model, bit for bit."""
    if folder is None:
        with tempfile.TemporaryDirectory() as temporary:
            return check_checkpoint_round_trip_is_bit_exact(name, Path(temporary))
    model = tiny_model(name)
    image, features = toy_batch()
    cache = model.cache_frozen(image) if model.meta.uses_image else None
    if cache is not None:  # a frozen part's scaling, set as training would
        model.fit_cache_scaling(torch.rand(10, *cache.shape[1:]))
    expected = model(image, features)
    written = save_checkpoint(model, folder / f"{name}.seed0", extra={"fingerprint": "abc"})
    assert written == folder / f"{name}.seed0.safetensors", f"{name}: weights written to {written}"
    for path in (folder / f"{name}.seed0", written, folder / f"{name}.seed0.json"):
        loaded, sidecar = load_checkpoint(path)
        assert type(loaded) is type(model) and loaded.meta == model.meta, f"{name}: {path} loads another model"
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys(), f"{name}: {path} has other tensors"
        for key, tensor in state.items():
            assert tensor.dtype == loaded_state[key].dtype and torch.equal(tensor, loaded_state[key]), f"{name}: {key}"
        assert torch.equal(loaded(image, features), expected), f"{name}: {path} predicts otherwise"
        flags = [p.requires_grad for p in model.parameters()]
        assert [p.requires_grad for p in loaded.parameters()] == flags, f"{name}: trainable flags not restored"
        assert sidecar["extra"] == {"fingerprint": "abc"}, f"{name}: extra not kept"
        assert sidecar["model"] == {"name": name, "kwargs": model.meta.kwargs}, f"{name}: sidecar model entry"


MODEL_CHECKS: tuple[Callable[[str], None], ...] = (
    check_output_is_age_per_sample,
    check_deterministic_under_seed,
    check_batch_independence,
    check_gradient_reaches_every_input_used,
    check_unused_inputs_are_ignored,
    check_nan_features_are_imputed_with_the_training_mean,
    check_feature_scaling_is_applied_to_raw_features,
    check_wrong_inputs_raise_clear_errors,
    check_meta_kwargs_rebuild_the_architecture,
    check_checkpoint_round_trip_is_bit_exact,
)


def model_checks(name: str) -> Iterator[Callable[[], None]]:
    """Every check of the registered model ``name``, as argument-free callables named after the check."""
    for check in MODEL_CHECKS:
        def bound(check: Callable[[str], None] = check) -> None:
            check(name)
        bound.__name__ = check.__name__
        yield bound


def check_model(name: str) -> None:
    """Run every check on the registered model ``name``; the first failure raises AssertionError."""
    for check in model_checks(name):
        check()


# ---------------------------------------------------------------- a loaded model on real subjects
#
# What `medrobust check-model` prints and `medrobust run` asks of every model before a cell starts: the model as
# configured (a registered checkpoint, a factory with weights, a TorchScript file), on a few subjects of the
# data it will be attacked on.

PLAUSIBLE_AGES = (-10.0, 130.0)


@dataclass
class Finding:
    """One check of a loaded model: its name, whether it passed, what it saw; ``blocking`` findings stop a run
    (the others are warnings: a model with masked gradients can still be benchmarked, and is flagged)."""

    name: str
    passed: bool
    detail: str
    blocking: bool = True


def inspect_model(model: BrainAgeModel, images: torch.Tensor, features: torch.Tensor | None,
                  probe: bool = True) -> list[Finding]:
    """The checks of a loaded model on ``images`` [N, 1, *grid] (N >= 2; ``features`` [N, F] where it takes
    them): output shape and dtype, finite plausible ages, eval-mode determinism, batch independence, a finite
    non-zero gradient for every input it takes, and (``probe``) a finite-difference probe of that gradient."""
    model = model.eval()
    features = features if model.meta.uses_features else None
    findings: list[Finding] = []
    n = images.shape[0]
    with torch.no_grad():
        first, second = model(images, features), model(images, features)
    shape_ok = isinstance(first, torch.Tensor) and first.shape == (n,) and first.is_floating_point()
    findings.append(Finding("output", shape_ok, f"shape {list(first.shape)}, {first.dtype}" if shape_ok else
                            f"returned {list(getattr(first, 'shape', []))}; need one float age per image [B]"))
    if not shape_ok:
        return findings
    finite = bool(torch.isfinite(first).all())
    plausible = finite and bool(((first >= PLAUSIBLE_AGES[0]) & (first <= PLAUSIBLE_AGES[1])).all())
    ages = ", ".join(f"{float(a):.1f}" for a in first[:4])
    findings.append(Finding("ages", plausible, f"{ages} y" + ("" if plausible else
                            f": not finite ages within {PLAUSIBLE_AGES[0]:g} to {PLAUSIBLE_AGES[1]:g} y; check "
                            f"output (years, standardized or bins) and normalization")))
    findings.append(Finding("deterministic", torch.equal(first, second),
                            "two passes in eval mode agree" if torch.equal(first, second) else
                            "two passes in eval mode differ (dropout or randomness in eval mode?)"))
    with torch.no_grad():
        alone = torch.cat([model(images[i:i + 1], None if features is None else features[i:i + 1])
                           for i in range(n)])
    gap = float((alone - first).abs().max())
    findings.append(Finding("batch-independent", gap <= 1e-3, f"alone vs in a batch: {gap:.2g} y" + (
        "" if gap <= 1e-3 else "; a batch-norm layer in training mode or a cross-sample operation lets an "
        "attack on one subject move another (set batch_size = 1, or fix the model)")))
    findings.extend(_gradient_findings(model, images, features, probe))
    return findings


def _gradient_findings(model, images, features, probe: bool) -> list[Finding]:
    # As an attack sees it: the parameters frozen, so a gradient is the inputs' or none at all.
    flags = [parameter.requires_grad for parameter in model.parameters()]
    model.requires_grad_(False)
    try:
        return _input_gradients(model, images, features, probe)
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def _input_gradients(model, images, features, probe: bool) -> list[Finding]:
    leaf = images.detach().clone().requires_grad_(True)
    feature_leaf = None if features is None else features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output = model(leaf, feature_leaf)
    if not output.requires_grad:
        return [Finding("gradient", False, "the output has no autograd graph (a detach() or no_grad inside?): "
                        "gradient attacks see nothing; only black-box and noise attacks apply", blocking=False)]
    inputs = [leaf] + ([feature_leaf] if feature_leaf is not None else [])
    with torch.enable_grad():
        grads = torch.autograd.grad(output.sum(), inputs, allow_unused=True)
    findings = []
    for label, grad in zip(("image", "features"), grads, strict=False):
        if grad is None or not torch.isfinite(grad).all() or not grad.any():
            what = "none" if grad is None else "non-finite" if not torch.isfinite(grad).all() else "zero"
            findings.append(Finding(f"gradient ({label})", False, f"{what}: gradient attacks on the {label} are "
                                    f"blind here (possibly masked gradients)", blocking=False))
        else:
            findings.append(Finding(f"gradient ({label})", True, f"finite, mean |grad| {float(grad.abs().mean()):.3g}"))
    if probe and grads[0] is not None and torch.isfinite(grads[0]).all() and grads[0].any():
        findings.append(_probe(model, images, features, grads[0]))
    return findings


def _probe(model, images, features, grad) -> Finding:
    """The change a small step along the gradient makes, against what the gradient predicts for it: where they
    disagree by an order of magnitude, the gradient does not describe the model (a quantized or
    non-differentiable path on the input: masked gradients)."""
    direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    scale = images.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, *([1] * (grad.dim() - 1)))
    step = 1e-3 * scale * images[0].numel() ** 0.5
    with torch.no_grad():
        change = model(images + step * direction, features) - model(images - step * direction, features)
    predicted = 2 * step.flatten() * grad.flatten(1).norm(dim=1)
    ratio = float((change / predicted.clamp_min(1e-12)).median())
    ok = 0.1 <= ratio <= 10
    return Finding("gradient probe", ok, f"finite difference / gradient = {ratio:.2f}" + (
        "" if ok else ": the gradient does not predict the model's change (possibly masked gradients)"),
        blocking=False)
