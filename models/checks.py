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
    non-trivial scaling (ages in tens of years, features in their own units)."""
    params = inspect.signature(model_entrypoint(name)).parameters
    kwargs = {"input_shape": GRID}
    if "feature_names" in params:
        kwargs["feature_names"] = FEATURE_NAMES
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    model.set_target_scaling(40.0, 20.0)
    if model.meta.uses_features:
        model.set_feature_scaling(FEATURE_MEAN, FEATURE_STD)
    return model


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
    assert torch.allclose(together, alone, rtol=0, atol=1e-4), f"{name}: predictions depend on the batch"


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
