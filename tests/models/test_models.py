"""Shared model contract suite (every registered model), registry, paper architecture and checkpoint tests."""

from __future__ import annotations

import importlib.util
import json

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
    unregister_model,
)
from medrobust.models.checks import (
    FEATURE_MEAN,
    FEATURE_NAMES,
    FEATURE_STD,
    GRID,
    MODEL_CHECKS,
    check_batch_independence,
    check_output_is_age_per_sample,
    tiny_model,
    toy_batch,
)
from medrobust.models.cnn3d import trunk_output_shape
from medrobust.models.hybrid import HybridModel


def _registered(name: str):
    """The model's name, skipped where it needs an optional package that is missing (MONAI's networks)."""
    package = getattr(model_entrypoint(name), "package", "")
    missing = bool(package) and importlib.util.find_spec(package) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"needs {package}"))


ALL_MODELS = [_registered(name) for name in list_models()]


def test_builtins_are_registered() -> None:
    assert {"cnn3d", "hybrid", "hybrid_e2e", "features_mlp", "sfcn", "densenet121"} <= set(list_models())


# ---------------------------------------------------------------- contract suite: every registered model


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract(name: str, check) -> None:
    # The shipped checks of medrobust.models.checks, which anyone registering a model can run too.
    check(name)


def test_a_broken_model_fails_the_shipped_checks() -> None:
    # A model whose prediction depends on the batch (a batch mean inside): the shipped check catches it, and the
    # checks of what it does right still pass.
    @register_model
    def leaky_cnn(input_shape=(48, 56, 48), voxel_size=(3.5, 3.5, 3.5), normalization="zscore_brain"):
        return _Leaky(input_shape)

    try:
        with pytest.raises(AssertionError, match="depend on the batch"):
            check_batch_independence("leaky_cnn")
        check_output_is_age_per_sample("leaky_cnn")  # what it does right still passes
    finally:
        unregister_model("leaky_cnn")


class _Leaky(BrainAgeModel):
    def __init__(self, input_shape) -> None:
        from medrobust.models.base import ModelMeta

        kwargs = {"input_shape": list(input_shape), "voxel_size": [3.5] * 3, "normalization": "zscore_brain"}
        super().__init__(ModelMeta.from_kwargs("leaky_cnn", kwargs, uses_image=True, uses_features=False))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def predict_standardized(self, image, features):
        flat = image.flatten(1)
        return self.scale * (flat.mean(1) - flat.mean())  # the batch mean: samples leak into each other


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_MODELS)
def test_cuda_matches_cpu_and_loads_onto_cuda(name: str, tmp_path) -> None:
    model = tiny_model(name)
    image, features = toy_batch()
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
    for name in list_models():
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
    model = tiny_model("cnn3d")
    first = model.conv_trunk.layers[0]
    assert not first.bias.any()
    # Kaiming normal, fan_in = 27 for the first conv: std sqrt(2/27) ~ 0.27 (PyTorch's default is ~0.11).
    assert 0.2 < first.weight.std().item() < 0.35


# ---------------------------------------------------------------- hybrid recipes


def test_two_stage_hybrid_copies_and_freezes_the_cnn_trunk() -> None:
    cnn = tiny_model("cnn3d", seed=0)
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

    image, features = toy_batch()
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
    model = tiny_model("hybrid_e2e")
    assert model.meta.kwargs["trunk_frozen"] is False
    assert len(model.parameters_to_train()) == len(list(model.parameters()))
    trunk = torch.rand(4, model.conv_trunk.out_features) * 3
    assert torch.equal(model.scale_trunk(trunk), trunk)
    image, features = toy_batch()
    model(image, features).sum().backward()
    assert all(p.grad is not None for p in model.conv_trunk.parameters())


def test_trunk_scaling_maps_training_features_to_unit_range_with_zero_mean() -> None:
    model = tiny_model("hybrid_e2e")
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
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MedrobustError, match="model.safetensors"):
        load_checkpoint(tmp_path / "model.json")


def test_corrupt_sidecar_is_named(tmp_path) -> None:
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "model")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(MedrobustError, match="model.json"):
        load_checkpoint(tmp_path / "model")


def test_corrupt_or_swapped_weights_are_named(tmp_path) -> None:
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "model")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MedrobustError, match="model.safetensors"):
        load_checkpoint(tmp_path / "model")
    # Without the checksum the tamper check would be off: a sidecar that lost it is refused, not trusted.
    sidecar = json.loads((tmp_path / "model.json").read_text())
    del sidecar["weights_sha256"]
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(MedrobustError, match=r"model\.json records no weights_sha256"):
        load_checkpoint(tmp_path / "model")


@pytest.mark.parametrize("version", [2, 1])
def test_an_edited_sidecar_is_refused(tmp_path, version: int) -> None:
    # An edited voxel size would resample the data to a grid the model never saw: a silent wrong result.
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "model")
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["format_version"] == 2 and len(sidecar["sidecar_sha256"]) == 64
    load_checkpoint(tmp_path / "model")  # as written: loads
    sidecar["voxel_size"] = [1.0, 1.0, 1.0]
    if version == 1:  # a sidecar written before sidecars hashed themselves: its grid checked against the model's
        sidecar["format_version"] = 1
        del sidecar["sidecar_sha256"]
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    message = "was changed after it was written" if version == 2 else r"voxel_size \[1.0, 1.0, 1.0\] is not the model's"
    with pytest.raises(MedrobustError, match=message):
        load_checkpoint(tmp_path / "model")


def test_sidecar_naming_an_unknown_model_is_refused(tmp_path) -> None:
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "model")
    sidecar = json.loads((tmp_path / "model.json").read_text())
    sidecar["model"]["name"] = "vit_giant"
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(MedrobustError, match=r"model\.json.*vit_giant.*cnn3d"):
        load_checkpoint(tmp_path / "model")


def test_sidecar_records_what_a_report_needs(tmp_path) -> None:
    model = tiny_model("hybrid")
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
        save_checkpoint(tiny_model("cnn3d"), tmp_path / "model", extra={"bad": object()})
    assert not (tmp_path / "model.safetensors").exists()


def test_loading_never_unpickles_nor_moves_the_callers_rng(tmp_path, monkeypatch) -> None:
    save_checkpoint(tiny_model("hybrid"), tmp_path / "model")

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint must not call torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)
