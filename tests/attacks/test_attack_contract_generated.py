"""The attack contract over generated inputs: every registered attack, on 2D and 3D images of generated shapes,
batch sizes, intensity ranges, masks, budgets, objectives and threat models (Hypothesis).

The hand-written contract suite (test_attacks.py) runs each attack on fixed inputs; here Hypothesis draws the
inputs and shrinks any failure to a small one. What must hold for every draw: the output's shape, dtype and
device; the clean inputs untouched; the realized perturbation inside the budget (measured in float64); inside
the clean image's range under ``clip="image"``; zero outside the mask; the context features as the threat model
allows; predictions that are the model's; an objective no worse than the clean image's under ``keep_best``;
consistent counters; and a bit-identical repeat for the same seed. The universal attack is run both ways: fitted
on the batch it attacks, and fitted on one batch then applied to another.

Examples are derandomized (the same draws on every run, so the suite cannot flake) and kept few and tiny so the
file runs in seconds; a failure prints the draw that reproduces it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from medrobust.attacks import OBJECTIVES, UNITS, AttackResult, attack_entrypoint, perturbation_norms
from medrobust.attacks.checks import LinearModel, TinyConv2d, quick_kwargs
from medrobust.attacks.fgsm import FGSM
from medrobust.attacks.objectives import objective_score

EXAMPLES = 15  # per attack: the file runs in about 15 s on the 2-core development machine
TARGET_AGE = 30.0
FEATURE_NAMES = ["sex", "vol_a", "vol_b"]  # under "perturbed" only the regional volumes (vol_*) may move
FEATURE_BUDGET = 0.05
# Where a GPU is present the draws also run there (output device, determinism with deterministic kernels).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def deterministic_kernels():
    """Bit-identical repeats on CUDA need deterministic cuDNN kernels (conv3d's default backward is not)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class TinyConv3d(nn.Module):
    """TinyConv2d's 3D twin: a convolution, a ReLU and a global mean, so any shape goes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.relu(self.conv(image)).mean(dim=(2, 3, 4))
        return 40.0 + 20.0 * self.head(hidden).squeeze(1)


class WithContext(nn.Module):
    """An image model plus a linear term in three context features, with the ``meta`` the attacks read."""

    def __init__(self, image_model: nn.Module) -> None:
        super().__init__()
        self.image_model = image_model
        self.weight = nn.Parameter(torch.tensor([2.0, -0.5, 0.3]))
        self.meta = SimpleNamespace(name="with_context", uses_image=True, uses_features=True,
                                    feature_names=FEATURE_NAMES)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.image_model(image, None) + (features.to(image.dtype) * self.weight.to(image.dtype)).sum(dim=1)


def extractor(images: torch.Tensor) -> torch.Tensor:
    """Context features measured on images, differentiably (the ``recomputed`` threat model): a constant 'sex'
    and two 'volumes' that follow the mean intensity of the whole image and of its first half."""
    flat = images.flatten(1)
    half = flat[:, : max(1, flat.shape[1] // 2)]
    return torch.stack((torch.ones_like(flat[:, 0]), 50.0 + 0.1 * flat.mean(dim=1), 20.0 + 0.1 * half.mean(dim=1)),
                       dim=1)


@st.composite
def cases(draw, name: str) -> dict:
    """One attack call: the attack's arguments and its inputs."""
    entry = attack_entrypoint(name)
    spatial = draw(st.one_of(st.tuples(*[st.integers(3, 10)] * 2), st.tuples(*[st.integers(2, 6)] * 3)))
    batch = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = 10 ** draw(st.floats(-2, 2))
    offset = draw(st.floats(-1000, 1000))
    seed = draw(st.integers(0, 2**16))
    norm = draw(st.sampled_from(entry.norms))
    unit = "abs" if norm == "l0" else draw(st.sampled_from(UNITS))
    if norm == "l0":
        epsilon = float(draw(st.integers(0, math.prod(spatial))))
    else:
        # A fraction of the range (or std) up to 0.2 for l-inf, up to 2 for l2; in unit abs the same times the
        # intensity scale, so every unit gives budgets that bind. One draw in six is the empty budget.
        fraction = draw(st.floats(1e-4, 0.2 if norm == "linf" else 2.0))
        empty = draw(st.integers(0, 5)) == 5
        epsilon = 0.0 if empty else fraction * (9 * scale if unit == "abs" else 1)
    uses_features = draw(st.booleans())
    threat_models = [t for t in entry.threat_models if uses_features or t == "fixed"]
    objective = draw(st.sampled_from(OBJECTIVES))
    kwargs = {"budget": {"norm": norm, "epsilon": epsilon, "unit": unit}, "objective": objective,
              "threat_model": draw(st.sampled_from(threat_models)), "clip": draw(st.sampled_from(["image", "none"])),
              "keep_best": draw(st.booleans()), "seed": draw(st.integers(0, 1000)), "feature_budget": FEATURE_BUDGET}
    if objective == "target":
        kwargs["target_age"] = TARGET_AGE
    return {
        "name": name, "spatial": spatial, "batch": batch, "dtype": dtype, "scale": scale, "offset": offset,
        "seed": seed, "kwargs": kwargs, "uses_features": uses_features, "device": draw(st.sampled_from(DEVICES)),
        "model": draw(st.sampled_from(["linear", "conv"])),
        "mask": draw(st.sampled_from(["none", "shared", "per_image", "spatial_float"])),
        "density": draw(st.floats(0.0, 1.0)),
        "held_out": name == "universal" and draw(st.booleans()),
    }


def build_model(case: dict) -> nn.Module:
    torch.manual_seed(case["seed"])
    spatial = case["spatial"]
    if case["model"] == "linear":
        model = LinearModel((1, *spatial), seed=case["seed"])
    else:
        model = TinyConv2d() if len(spatial) == 2 else TinyConv3d()
    if case["uses_features"]:
        model = WithContext(model)
    return model.to(dtype=case["dtype"], device=case.get("device", "cpu"))


def batch_inputs(case: dict, seed: int) -> dict:
    """Images [B, 1, *spatial] of the case's intensity range, with features, ages and mask as the case says."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case["batch"], 1, *case["spatial"])
    images = (1.0 + 1.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(-2.0, 7.0)
    images = (case["offset"] + case["scale"] * images).to(case["dtype"])
    mask = None
    if case["mask"] != "none":
        mask_shape = {"shared": (1, 1, *case["spatial"]), "per_image": shape,
                      "spatial_float": case["spatial"]}[case["mask"]]
        mask = torch.rand(mask_shape, generator=generator) < case["density"]
        if case["mask"] == "spatial_float":
            mask = mask.to(case["dtype"])
    device = case.get("device", "cpu")
    inputs = {"images": images.to(device), "features": None, "mask": None if mask is None else mask.to(device),
              "ages": (5 + 85 * torch.rand(case["batch"], generator=generator, dtype=case["dtype"])).to(device)}
    if case["uses_features"]:
        inputs["features"] = extractor(inputs["images"]).detach()
        if case["kwargs"]["threat_model"] == "recomputed":
            inputs["extractor"] = extractor
    return inputs


def make_attack(case: dict, model: nn.Module):
    """The registered attack ``case["name"]`` (or the class ``case["attack_class"]``) with the case's arguments
    and quick settings."""
    attack_class = case.get("attack_class") or attack_entrypoint(case["name"])
    return attack_class(model, **case["kwargs"], **quick_kwargs(attack_class, steps=2))


def run(case: dict, model: nn.Module, inputs: dict) -> tuple[AttackResult, object]:
    """A fresh attack called on ``inputs``; a held-out universal attack is fitted on another batch first."""
    attack = make_attack(case, model)
    if not case["held_out"]:
        return attack(**inputs), attack
    fitting = batch_inputs(case, case["seed"] + 1)
    attack.fit([tuple(fitting[key] for key in ("images", "features", "ages", "mask"))
                + ((fitting["extractor"],) if "extractor" in fitting else ())])
    return attack.apply(**inputs), attack


def check_case(case: dict) -> None:
    model = build_model(case)
    inputs = batch_inputs(case, case["seed"])
    images, features, mask = inputs["images"], inputs["features"], inputs["mask"]
    clean = {key: value.clone() for key, value in inputs.items() if isinstance(value, torch.Tensor)}

    result, attack = run(case, model, inputs)

    assert isinstance(result, AttackResult)
    assert result.images.shape == images.shape
    assert result.images.dtype == images.dtype and result.images.device == images.device
    assert not result.images.requires_grad
    assert all(torch.equal(inputs[key], value) for key, value in clean.items()), "the attack changed its inputs"
    # The realized perturbation, exactly (float64 holds the difference of two float32 or float64 values better).
    delta = result.images.double() - images.double()
    radius = attack.budget.radius(images).double()
    realized = perturbation_norms(delta)[attack.budget.norm]
    assert (realized <= radius * (1 + 1e-6)).all(), f"the perturbation exceeds the budget: {realized} > {radius}"
    if attack.clip == "image":
        flat, adversarial = images.flatten(1), result.images.flatten(1)
        assert (adversarial.amin(dim=1) >= flat.amin(dim=1)).all()
        assert (adversarial.amax(dim=1) <= flat.amax(dim=1)).all()
    if mask is not None:
        outside = (mask == 0).expand(images.shape)
        assert not delta[outside].any(), "the perturbation is not zero outside the mask"
    check_features(case, result, features)
    # The predictions are the model's, at the clean and at the returned inputs.
    with torch.no_grad():
        model.eval()
        clean_prediction = model(images, features)
        adversarial_prediction = model(result.images, result.features)
    tolerance = {"rtol": 1e-4, "atol": 1e-3}
    assert torch.allclose(result.clean_prediction, clean_prediction, **tolerance)
    assert torch.allclose(result.adversarial_prediction, adversarial_prediction, **tolerance)
    if attack.keep_best:  # the clean image is a candidate: the objective can only improve
        score = objective_score(attack.objective, result.adversarial_prediction, result.clean_prediction,
                                inputs["ages"], attack.target_age)
        clean_score = objective_score(attack.objective, result.clean_prediction, result.clean_prediction,
                                      inputs["ages"], attack.target_age)
        assert (score >= clean_score - 1e-6 * clean_score.abs().clamp_min(1)).all()
    check_counters(case, result, attack)
    # Bit-identical for the same seed, from a fresh attack.
    again, _ = run(case, model, inputs)
    assert torch.equal(again.images, result.images), "a repeat with the same seed gave other images"
    assert torch.equal(again.adversarial_prediction, result.adversarial_prediction)
    assert (again.forward, again.backward, again.steps) == (result.forward, result.backward, result.steps)


def check_features(case: dict, result: AttackResult, features: torch.Tensor | None) -> None:
    """The features the adversarial prediction used, as the threat model allows."""
    threat_model = case["kwargs"]["threat_model"]
    if features is None:
        assert result.features is None
    elif threat_model == "fixed":
        assert torch.equal(result.features, features)
    elif threat_model == "perturbed":
        moved = (result.features.double() - features.double()).abs()
        assert not moved[:, 0].any(), "a feature that is no regional volume moved"
        # Within the relative budget, up to the rounding of the feature's own value (half an ulp of it).
        volumes = features[:, 1:].double().abs()
        assert (moved[:, 1:] <= FEATURE_BUDGET * volumes + torch.finfo(features.dtype).eps * volumes).all()
    else:  # recomputed: measured on the returned images
        assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)


def check_counters(case: dict, result: AttackResult, attack) -> None:
    counts = (result.forward, result.backward, result.steps)
    assert all(type(count) is int and count >= 0 for count in counts), f"counters {counts} are not ints >= 0"
    # At least the clean and the final prediction; every backward pass follows a forward pass.
    assert result.forward >= 2 and result.backward <= result.forward, f"inconsistent counters {counts}"
    if case["name"] == "universal":
        # Applying costs the clean and the adversarial prediction; a call on the batch adds its fit's passes.
        fit = (0, 0, 0) if case["held_out"] else attack.fit_counters
        assert counts == (2 + fit[0], fit[1], fit[2]), (counts, attack.fit_counters)


# ART's l2 projection divides 0 by 0 for a zero gradient (and handles it); its NumPy warning is no finding here.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_contract_holds_for_generated_inputs(attack_name: str, data) -> None:
    check_case(data.draw(cases(attack_name), label="case"))


# ---------------------------------------------------------------- the checks catch a broken attack


class Overshoots(FGSM):
    """FGSM whose step lands 0.1 % beyond the budget."""

    def perturb(self, state):
        adversarial = super().perturb(state)
        return adversarial + 1e-3 * (adversarial - state.images)


class IgnoresTheMask(FGSM):
    """FGSM without the projection: it moves voxels outside the mask (and past the range)."""

    def perturb(self, state):
        radius = state.radius.view((-1,) + (1,) * (state.images.dim() - 1))
        return state.images + radius * state.gradient(state.images).sign()


class Unseeded(FGSM):
    """Random noise inside the budget from the global generator instead of the attack's seed."""

    def perturb(self, state):
        radius = state.radius.view((-1,) + (1,) * (state.images.dim() - 1))
        noise = 2 * torch.rand(state.images.shape, dtype=state.images.dtype) - 1
        return state.project(state.images + radius * noise)


class Miscounts(FGSM):
    """FGSM that forgets the passes it spent before its step."""

    def perturb(self, state):
        adversarial = super().perturb(state)
        state.forward = 0
        return adversarial


@pytest.mark.parametrize(("attack_class", "message"), [
    (Overshoots, "exceeds the budget"), (IgnoresTheMask, "outside the mask"), (Unseeded, "same seed gave other images"),
    (Miscounts, "inconsistent counters"),
])
def test_the_checks_catch_a_broken_attack(attack_class, message: str) -> None:
    case = {"name": "fgsm", "attack_class": attack_class, "spatial": (5, 4, 6), "batch": 2, "dtype": torch.float32,
            "scale": 3.0, "offset": -10.0, "seed": 1, "uses_features": False, "model": "conv", "mask": "shared",
            "density": 0.5, "held_out": False,
            "kwargs": {"budget": {"norm": "linf", "epsilon": 0.05, "unit": "range"}, "objective": "older",
                       "threat_model": "fixed", "clip": "none", "keep_best": False, "seed": 0}}
    with pytest.raises(AssertionError, match=message):
        check_case(case)
    check_case({**case, "attack_class": FGSM})  # the same case passes with the real attack
