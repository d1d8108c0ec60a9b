"""Shared model contract suite (every registered model), registry, paper architecture and checkpoint tests."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from medrobust.errors import MedrobustError
from medrobust.models import (
    BrainAgeModel,
    create_model,
    list_models,
    load_checkpoint,
    model_entrypoint,
    register_model,
    save_checkpoint,
)
from medrobust.models.cnn3d import trunk_output_shape
from medrobust.models.hybrid import HybridModel

# Five pools take 32 to 1 per side: the smallest grid the default trunk accepts, so each test stays fast.
GRID = (32, 32, 32)
FEATURE_NAMES = ["sex", "field_strength", "vol_hippocampus_l", "vol_ventricles"]
# Raw context features in their own units (mL for volumes): the model standardizes them itself.
FEATURE_MEAN = [0.5, 2.0, 4.0, 30.0]
FEATURE_STD = [0.5, 0.8, 0.5, 12.0]
BATCH = 3
ALL_MODELS = list_models()


def build(name: str, seed: int = 0) -> BrainAgeModel:
    """A model on the small grid, with feature names where its factory takes them, and non-trivial scaling."""
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


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 1, *GRID, generator=generator)
    z = torch.randn(BATCH, len(FEATURE_NAMES), generator=generator)
    features = z * torch.tensor(FEATURE_STD) + torch.tensor(FEATURE_MEAN)
    return image, features


def test_builtins_are_registered() -> None:
    assert {"cnn3d", "hybrid", "hybrid_e2e", "features_mlp"} <= set(ALL_MODELS)


# ---------------------------------------------------------------- contract suite: every registered model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_is_age_per_sample(name: str) -> None:
    model = build(name)
    image, features = batch()
    out = model(image, features)
    assert out.shape == (BATCH,)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert isinstance(model, BrainAgeModel)
    assert model.meta.name == name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_deterministic_under_seed(name: str) -> None:
    first, second, other = build(name, seed=0), build(name, seed=0), build(name, seed=1)
    image, features = batch()
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), key
    assert torch.equal(first(image, features), second(image, features))
    assert not torch.equal(first(image, features), other(image, features))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradient_reaches_every_input_used(name: str) -> None:
    model = build(name)
    image, features = batch()
    image.requires_grad_(True)
    features.requires_grad_(True)
    model(image, features).sum().backward()
    for used, tensor in ((model.meta.uses_image, image), (model.meta.uses_features, features)):
        if used:
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0
            assert torch.isfinite(tensor.grad).all()
        else:
            assert tensor.grad is None or not tensor.grad.any()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unused_inputs_are_ignored(name: str) -> None:
    model = build(name)
    image, features = batch()
    out = model(image, features)
    if not model.meta.uses_image:
        assert torch.equal(out, model(None, features))
        assert torch.equal(out, model(torch.zeros(BATCH, 1, 8, 8, 8), features))
    if not model.meta.uses_features:
        assert model.meta.feature_names == []
        assert torch.equal(out, model(image, None))
        assert torch.equal(out, model(image, torch.randn(BATCH, 7)))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_nan_features_are_imputed_with_training_mean(name: str) -> None:
    model = build(name)
    image, features = batch()
    missing = features.clone()
    missing[0, 2] = math.nan
    missing.requires_grad_(True)
    out = model(image, missing)
    assert torch.isfinite(out).all()
    out.sum().backward()
    # Attacks take gradients through the features: a missing value must not poison them with NaN.
    assert missing.grad is None or torch.isfinite(missing.grad).all()
    missing = missing.detach()
    if model.meta.uses_features:
        imputed = features.clone()
        imputed[0, 2] = FEATURE_MEAN[2]
        assert torch.allclose(out, model(image, imputed))


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if build(n).meta.uses_features])
def test_feature_scaling_is_applied_to_raw_features(name: str) -> None:
    scaled = build(name)
    identity = build(name)
    identity.set_feature_scaling([0.0] * len(FEATURE_NAMES), [1.0] * len(FEATURE_NAMES))
    image, features = batch()
    standardized = (features - torch.tensor(FEATURE_MEAN)) / torch.tensor(FEATURE_STD)
    assert torch.allclose(scaled(image, features), identity(image, standardized), atol=1e-5)
    assert not torch.allclose(scaled(image, features), identity(image, features))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_wrong_inputs_raise_clear_errors(name: str) -> None:
    model = build(name)
    image, features = batch()
    if model.meta.uses_image:
        with pytest.raises(MedrobustError, match=r"\(32, 32, 32\)"):
            model(torch.zeros(BATCH, 1, 32, 32, 30), features)
        with pytest.raises(MedrobustError, match="image"):
            model(None, features)
    if model.meta.uses_features:
        with pytest.raises(MedrobustError, match=rf"\[B, {len(FEATURE_NAMES)}\]"):
            model(image, features[:, :2])
        with pytest.raises(MedrobustError, match="features"):
            model(image, None)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_meta_kwargs_rebuild_the_architecture_after_json(name: str) -> None:
    model = build(name)
    kwargs = json.loads(json.dumps(model.meta.kwargs))
    assert kwargs == model.meta.kwargs
    rebuilt = create_model(name, **kwargs)
    assert rebuilt.meta == model.meta
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("name", ALL_MODELS)
def test_checkpoint_round_trip_is_bit_exact(name: str, tmp_path) -> None:
    model = build(name)
    if isinstance(model, HybridModel):
        trunk = torch.rand(10, model.conv_trunk.out_features)
        model.set_trunk_scaling(trunk.min(0).values, trunk.max(0).values + 0.5, trunk.mean(0))
    image, features = batch()
    expected = model(image, features)
    written = save_checkpoint(model, tmp_path / f"{name}.seed0", extra={"fingerprint": "abc"})
    assert written == tmp_path / f"{name}.seed0.safetensors"
    for path in (tmp_path / f"{name}.seed0", written, tmp_path / f"{name}.seed0.json"):
        loaded, sidecar = load_checkpoint(path)
        assert type(loaded) is type(model)
        assert loaded.meta == model.meta
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        for key, tensor in state.items():
            assert tensor.dtype == loaded_state[key].dtype and torch.equal(tensor, loaded_state[key]), key
        assert torch.equal(loaded(image, features), expected)
        assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
        assert sidecar["extra"] == {"fingerprint": "abc"}
        assert sidecar["model"] == {"name": name, "kwargs": model.meta.kwargs}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_MODELS)
def test_cuda_matches_cpu_and_loads_onto_cuda(name: str, tmp_path) -> None:
    model = build(name)
    image, features = batch()
    expected = model(image, features)
    on_gpu = model.to("cuda")(image.cuda(), features.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), expected, rtol=1e-3, atol=1e-3)
    save_checkpoint(model, tmp_path / name)
    loaded, _ = load_checkpoint(tmp_path / name, device="cuda")
    assert all(t.device.type == "cuda" for t in loaded.state_dict().values())


# ---------------------------------------------------------------- registry


def test_unknown_model_lists_the_known_names() -> None:
    with pytest.raises(MedrobustError) as info:
        create_model("resnet_nonexistent")
    for name in ALL_MODELS:
        assert name in str(info.value)


def test_list_models_filters_with_a_pattern_and_sorts() -> None:
    assert list_models("hybrid*") == ["hybrid", "hybrid_e2e"]
    assert list_models() == sorted(list_models())
    assert list_models("no_such_*") == []


def test_registering_a_taken_name_is_refused() -> None:
    def cnn3d() -> None:  # same function name as the built-in
        return None

    with pytest.raises(MedrobustError, match="cnn3d"):
        register_model(cnn3d)
    assert isinstance(create_model("cnn3d", input_shape=GRID), BrainAgeModel)


def test_feature_models_require_feature_names() -> None:
    for name in ("hybrid", "hybrid_e2e", "features_mlp"):
        with pytest.raises(MedrobustError, match="feature_names"):
            create_model(name)


# ---------------------------------------------------------------- the paper's architecture


def test_paper_grid_flattens_to_15360() -> None:
    assert trunk_output_shape((172, 220, 156), (8, 16, 32, 64, 128)) == (128, 5, 6, 4)
    # The meta device runs shapes only: the full-size forward costs nothing.
    with torch.device("meta"):
        model = create_model("cnn3d", input_shape=(172, 220, 156), voxel_size=(1, 1, 1))
        trunk = model.trunk(torch.empty(2, 1, 172, 220, 156))
    assert trunk.shape == (2, 15360)
    assert model.head[0].in_features == 15360
    convs = [m for m in model.conv_trunk.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 128]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in convs)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [128, 128, 1]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_grid_too_small_for_the_trunk_is_refused() -> None:
    with pytest.raises(MedrobustError, match="too small"):
        create_model("cnn3d", input_shape=(16, 32, 32))


def test_conv_and_linear_layers_use_he_init_with_zero_bias() -> None:
    model = build("cnn3d")
    first = model.conv_trunk.layers[0]
    assert not first.bias.any()
    # Kaiming normal, fan_in = 27 for the first conv: std sqrt(2/27) ~ 0.27 (PyTorch's default is ~0.11).
    assert 0.2 < first.weight.std().item() < 0.35


# ---------------------------------------------------------------- hybrid recipes


def test_two_stage_hybrid_copies_and_freezes_the_cnn_trunk() -> None:
    cnn = build("cnn3d", seed=0)
    torch.manual_seed(5)
    model = HybridModel.from_cnn3d(cnn, FEATURE_NAMES)
    model.set_feature_scaling(FEATURE_MEAN, FEATURE_STD)
    assert model.meta.name == "hybrid" and model.meta.kwargs["trunk_frozen"] is True
    cnn_trunk, hybrid_trunk = cnn.conv_trunk.state_dict(), model.conv_trunk.state_dict()
    for key, tensor in cnn_trunk.items():
        assert torch.equal(tensor, hybrid_trunk[key]), key
        assert tensor.data_ptr() != hybrid_trunk[key].data_ptr()  # a copy, not shared storage
    assert (model.age_mean.item(), model.age_std.item()) == (40.0, 20.0)

    trainable = {id(p) for p in model.parameters_to_train()}
    assert trainable == {id(p) for p in model.head.parameters()}
    assert not trainable & {id(p) for p in model.conv_trunk.parameters()}

    image, features = batch()
    image.requires_grad_(True)
    model(image, features).sum().backward()
    assert all(p.grad is None for p in model.conv_trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert image.grad.abs().sum() > 0  # frozen is not detached: attacks still reach the image
    assert torch.equal(model.trunk(image), cnn.trunk(image))


def test_two_stage_hybrid_refuses_a_mismatched_cnn() -> None:
    cnn = create_model("cnn3d", input_shape=GRID, filters=(4, 8, 16, 32, 64))
    model = create_model("hybrid", feature_names=FEATURE_NAMES, input_shape=GRID)
    with pytest.raises(MedrobustError, match="does not match"):
        model.load_trunk_from(cnn)


def test_end_to_end_hybrid_trains_everything_with_identity_trunk_scaling() -> None:
    model = build("hybrid_e2e")
    assert model.meta.kwargs["trunk_frozen"] is False
    assert len(model.parameters_to_train()) == len(list(model.parameters()))
    trunk = torch.rand(4, model.conv_trunk.out_features) * 3
    assert torch.equal(model.scale_trunk(trunk), trunk)
    image, features = batch()
    model(image, features).sum().backward()
    assert all(p.grad is not None for p in model.conv_trunk.parameters())


def test_trunk_scaling_maps_training_features_to_unit_range_with_zero_mean() -> None:
    model = build("hybrid_e2e")
    trunk = torch.rand(50, model.conv_trunk.out_features) * 7 + 2
    trunk[:, 0] = 3.0  # a unit constant over training (dead ReLU) must not divide by zero
    model.set_trunk_scaling(trunk.min(0).values, trunk.max(0).values, trunk.mean(0))
    scaled = model.scale_trunk(trunk)
    assert torch.isfinite(scaled).all()
    assert torch.allclose(scaled.mean(0), torch.zeros(scaled.shape[1]), atol=1e-5)
    spread = scaled.max(0).values - scaled.min(0).values
    assert torch.allclose(spread[1:], torch.full_like(spread[1:], 2.0), atol=1e-5)
    with pytest.raises(MedrobustError, match="trunk scaling"):
        model.set_trunk_scaling(trunk.max(0).values, trunk.min(0).values - 1, trunk.mean(0))


# ---------------------------------------------------------------- checkpoint failure modes


def test_missing_checkpoint_file_is_named(tmp_path) -> None:
    save_checkpoint(build("cnn3d"), tmp_path / "model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MedrobustError, match="model.safetensors"):
        load_checkpoint(tmp_path / "model.json")


def test_corrupt_sidecar_is_named(tmp_path) -> None:
    save_checkpoint(build("cnn3d"), tmp_path / "model")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(MedrobustError, match="model.json"):
        load_checkpoint(tmp_path / "model")


def test_corrupt_or_swapped_weights_are_named(tmp_path) -> None:
    save_checkpoint(build("cnn3d"), tmp_path / "model")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MedrobustError, match="model.safetensors"):
        load_checkpoint(tmp_path / "model")
    # Without the checksum the safetensors reader itself must be caught and reported.
    sidecar = json.loads((tmp_path / "model.json").read_text())
    del sidecar["weights_sha256"]
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(MedrobustError, match="model.safetensors"):
        load_checkpoint(tmp_path / "model")


def test_sidecar_naming_an_unknown_model_is_refused(tmp_path) -> None:
    save_checkpoint(build("cnn3d"), tmp_path / "model")
    sidecar = json.loads((tmp_path / "model.json").read_text())
    sidecar["model"]["name"] = "vit_giant"
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(MedrobustError, match=r"model\.json.*vit_giant.*cnn3d"):
        load_checkpoint(tmp_path / "model")


def test_sidecar_records_what_a_report_needs(tmp_path) -> None:
    model = build("hybrid")
    save_checkpoint(model, tmp_path / "model", extra={"clean_mae": 4.1})
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["input_shape"] == list(GRID)
    assert sidecar["voxel_size"] == [3.5, 3.5, 3.5]
    assert sidecar["normalization"] == "zscore_brain"
    assert sidecar["feature_names"] == FEATURE_NAMES
    assert sidecar["feature_scaling"]["mean"] == pytest.approx(FEATURE_MEAN)
    assert sidecar["feature_scaling"]["std"] == pytest.approx(FEATURE_STD)
    assert sidecar["target_scaling"] == {"mean": 40.0, "std": 20.0}
    assert set(sidecar["versions"]) >= {"medrobust", "torch", "python"}
    assert sidecar["extra"] == {"clean_mae": 4.1}


def test_extra_that_is_not_json_is_refused(tmp_path) -> None:
    with pytest.raises(MedrobustError, match="extra"):
        save_checkpoint(build("cnn3d"), tmp_path / "model", extra={"bad": object()})
    assert not (tmp_path / "model.safetensors").exists()


def test_loading_never_unpickles_nor_moves_the_callers_rng(tmp_path, monkeypatch) -> None:
    save_checkpoint(build("hybrid"), tmp_path / "model")

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint must not call torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)
