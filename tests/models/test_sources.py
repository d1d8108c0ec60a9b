"""Models of one's own: a factory with a state dict (.pt or .safetensors), a TorchScript file, outputs of shape
[B], [B, 1], standardized or binned; the declared contract checked at load; bad inputs one clear line; a
disguised pickle never runs; and their cells' identity follows the model's code."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from medrobust.cli import main
from medrobust.errors import MedrobustError
from medrobust.models.adapter import InputContract
from medrobust.models.sources import ModelSource, read_state_dict
from medrobust.plugins import import_plugin
from medrobust.results.store import ResultStore

FIXTURE = Path(__file__).resolve().parents[1] / "runner" / "fixtures" / "pre_redesign"
GRID = (16, 16, 16)
# A lab's own network, as a researcher writes it: plain PyTorch, forward(x), one age per image as [B, 1].
NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width=4, bins=0):
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.head = nn.Linear(width, bins or 1)
        self.bins = bins

    def forward(self, x):
        out = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return out if self.bins else 40.0 + 10.0 * out  # [B, K] logits, or [B, 1] years


class WithFeatures(TinyNet):
    def forward(self, x, features):
        return super().forward(x).squeeze(1) + features[:, 2:].sum(1)  # [B]


def net(width=4, bins=0):
    torch.manual_seed(0)
    return TinyNet(width, bins)


def with_features():
    torch.manual_seed(0)
    return WithFeatures()
'''


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A folder with the fixture's tiny dataset, the lab's net.py, and its weights as .pt and .safetensors."""
    shutil.copytree(FIXTURE / "dataset", tmp_path / "dataset")
    (tmp_path / "net.py").write_text(NET)
    net = import_plugin(str(tmp_path / "net.py")).net
    state = net().state_dict()
    torch.save(state, tmp_path / "net.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pth")  # DataParallel keys
    save_file(state, str(tmp_path / "net.safetensors"))
    torch.jit.save(torch.jit.trace(net(), torch.zeros(1, 1, *GRID)), str(tmp_path / "net.ts"))
    return tmp_path


def _config(root: Path, model: str, name: str = "run", attacks: str = '[[attacks]]\nname = "fgsm"\n') -> Path:
    path = root / f"{name}.toml"
    path.write_text(f'out = "{root / name}"\nbatch_size = 2\n\n[dataset]\npath = "{root / "dataset"}"\n'
                    f'split = "train"\ncount = 3\n\n[[models]]\n{model}\n\n[[budgets]]\nnorm = "linf"\n'
                    f'epsilon = [1e-3]\n\n{attacks}')
    return path


GRID_KEYS = 'input_shape = [16, 16, 16]\nvoxel_size = [1, 1, 1]'


def _run(config: Path):
    return CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])


@pytest.mark.parametrize("model", [
    f'factory = "{{lab}}/net.py:net"\nweights = "{{lab}}/net.pt"\n{GRID_KEYS}',
    f'factory = "{{lab}}/net.py:net"\nweights = "{{lab}}/net.safetensors"\n{GRID_KEYS}',
    f'factory = "{{lab}}/net.py:net"\nweights = "{{lab}}/parallel.pth"\n{GRID_KEYS}',
    f'torchscript = "{{lab}}/net.ts"\n{GRID_KEYS}',
], ids=["state-dict-pt", "safetensors", "dataparallel-prefix", "torchscript"])
def test_a_model_of_ones_own_is_benchmarked_through_a_config(lab: Path, model: str) -> None:
    result = _run(_config(lab, model.replace("{lab}", str(lab))))
    assert result.exit_code == 0, result.output
    assert "1 cells run, 0 already finished, 0 failed" in result.output
    with ResultStore(lab / "run", create=False) as store:
        cells, samples = store.cells(), store.samples()
    assert len(samples) == 3 and (samples["adversarial_prediction"] != samples["clean_prediction"]).all()
    # The same weights, whichever file they came in: the same clean predictions (40 + 10 x head).
    assert samples["clean_prediction"].between(20, 60).all()
    source = cells.iloc[0]["model_source"]
    assert source["contract"]["input_shape"] == [16, 16, 16] and len(source["code_sha256"]) == 64


def test_the_factory_module_is_read_as_weights_give_it(lab: Path) -> None:
    contract = InputContract(input_shape=GRID, voxel_size=(1.0, 1.0, 1.0))
    loaded = [ModelSource(factory=f"{lab}/net.py:net", weights=lab / name, contract=contract).load()[0]
              for name in ("net.pt", "net.safetensors", "parallel.pth")]
    scripted = ModelSource(torchscript=lab / "net.ts", contract=contract).load()[0]
    image = torch.randn(3, 1, *GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictions = [model(image) for model in (*loaded, scripted)]
    for prediction in predictions[1:]:
        assert torch.allclose(prediction, predictions[0], atol=1e-5)
    assert predictions[0].shape == (3,)


def test_outputs_standardized_and_binned_are_read_into_years(lab: Path) -> None:
    image = torch.randn(2, 1, *GRID, generator=torch.Generator().manual_seed(0))
    grid = {"input_shape": GRID, "voxel_size": (1.0, 1.0, 1.0)}
    years = ModelSource(factory=f"{lab}/net.py:net", contract=InputContract(**grid)).load()[0]
    standardized = ModelSource(factory=f"{lab}/net.py:net", contract=InputContract(
        **grid, output="standardized", age_mean=50.0, age_std=2.0)).load()[0]
    with torch.no_grad():
        assert torch.allclose(standardized(image), years(image) * 2.0 + 50.0)
    centres = (10.0, 30.0, 50.0, 70.0)
    binned = ModelSource(factory=f"{lab}/net.py:net", kwargs_json='{"bins": 4}', contract=InputContract(
        **grid, output="bins", bin_centres=centres)).load()[0]
    image.requires_grad_(True)
    age = binned(image)
    logits = binned.module(image)
    assert torch.allclose(age, torch.softmax(logits, 1) @ torch.tensor(centres))
    age.sum().backward()  # attacks differentiate through the soft-label read-out
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_a_model_that_takes_features_gets_them_in_its_declared_order(lab: Path) -> None:
    names = ("sex", "field_strength", "vol_core", "vol_shell")
    model = ModelSource(factory=f"{lab}/net.py:with_features", contract=InputContract(
        input_shape=GRID, voxel_size=(1.0, 1.0, 1.0), inputs="image+features", features=names)).load()[0]
    assert model.meta.uses_features and model.meta.feature_names == list(names)
    image, features = torch.zeros(2, 1, *GRID), torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 1.5, 0.0, 0.0]])
    with torch.no_grad():
        difference = model(image, features) - model(image, torch.zeros_like(features))
    assert torch.allclose(difference, torch.tensor([3.0, 0.0]))


class _Marker:
    """A pickle that would write a file when loaded: what a disguised checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "the pickle ran"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_a_pickle_disguised_as_weights_never_runs(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "ran.txt"
    disguised = tmp_path / f"weights{suffix}"
    disguised.write_bytes(pickle.dumps({"conv.weight": _Marker(marker)}))
    with pytest.raises(MedrobustError, match="weights"):
        read_state_dict(disguised)
    assert not marker.exists()


@pytest.mark.parametrize(("model", "message"), [
    # forward(x) declared as taking features
    (f'factory = "{{lab}}/net.py:net"\n{GRID_KEYS}\ninputs = "image+features"\nfeatures = ["sex"]',
     "calling the module as forward(image, features) failed"),
    # [B, K] without output = "bins"
    (f'factory = "{{lab}}/net.py:net"\nkwargs = {{ bins = 3 }}\n{GRID_KEYS}', "returned shape [2, 3]"),
    # weights of another width: one error listing the keys that do not fit
    (f'factory = "{{lab}}/net.py:net"\nkwargs = {{ width = 8 }}\nweights = "{{lab}}/net.pt"\n{GRID_KEYS}',
     "does not fit the module"),
    (f'factory = "{{lab}}/net.py:net"\nweights = "{{lab}}/extra.pt"\n{GRID_KEYS}', "unexpected keys: extra"),
    (f'factory = "{{lab}}/net.py:nowhere"\n{GRID_KEYS}', "has no 'nowhere'"),
    ('factory = "{lab}/net.py:net"', "models[0].input_shape is required"),
    (f'factory = "{{lab}}/net.py:net"\n{GRID_KEYS}\noutput = "standardized"', "age_std"),
    (f'factory = "{{lab}}/net.py:net"\n{GRID_KEYS}\nnormalization = "sqrt"', "models[0].normalization must be"),
    (f'factory = "{{lab}}/net.py:net"\nname = "cnn3d"\n{GRID_KEYS}', "exactly one source"),
    (f'torchscript = "{{lab}}/net.py"\n{GRID_KEYS}', "is not a TorchScript file"),
    ('name = "cnn3d"\ncheckpoint = "{lab}/net.safetensors"', "is not a medrobust checkpoint"),
    (f'factory = "{{lab}}/net.py:net"\n{GRID_KEYS}\nstrict = "yes"', "models[0].strict must be true or false"),
])
def test_bad_models_are_one_line_and_exit_2(lab: Path, model: str, message: str) -> None:
    state = torch.load(lab / "net.pt", weights_only=True)
    torch.save({**state, "extra": torch.zeros(1)}, lab / "extra.pt")
    result = _run(_config(lab, model.replace("{lab}", str(lab))))
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    with ResultStore(lab / "run", create=True) as store:  # a refused model never reaches a cell
        assert store.statuses() == {}


def test_changing_the_models_code_reruns_its_cells(lab: Path) -> None:
    model = f'factory = "{lab}/net.py:net"\nweights = "{lab}/net.pt"\n{GRID_KEYS}'
    assert _run(_config(lab, model)).exit_code == 0
    again = _run(_config(lab, model))
    assert "0 cells run, 1 already finished" in again.output
    # The forward now always says 42: the same weights, another model, so its cell is computed again.
    (lab / "net.py").write_text(NET.replace("return out if self.bins else 40.0 + 10.0 * out",
                                            "return 0 * out + 42.0"))
    changed = _run(_config(lab, model))
    assert changed.exit_code == 0, changed.output
    assert "1 cells run, 0 already finished" in changed.output
    with ResultStore(lab / "run", create=False) as store:
        cells, samples = store.cells(), store.samples()
    assert len(cells) == 2 and set(samples[samples["cell_id"] == cells.iloc[1]["id"]]["clean_prediction"]) == {42.0}


CHECKED = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, kind="healthy"):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)
        self.kind = kind

    def forward(self, x):
        hidden = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        if self.kind == "batch":  # a statistic over the batch: subjects leak into each other
            hidden = hidden - hidden.mean(0, keepdim=True)
        if self.kind == "masked":  # quantized input: the gradient is zero almost everywhere
            hidden = torch.relu(self.conv(torch.round(x * 0.5) / 0.5 + 0 * x)).mean(dim=(2, 3, 4))
            hidden = hidden.detach()
        return 40.0 + 10.0 * self.head(hidden).squeeze(1)
'''


def _checked(lab: Path, kind: str) -> Path:
    """A config of the model ``kind`` of CHECKED (healthy, batch, masked) under the noise baseline."""
    (lab / "checked.py").write_text(CHECKED)
    return _config(lab, f'factory = "{lab}/checked.py:Net"\nkwargs = {{ kind = "{kind}" }}\n{GRID_KEYS}', kind,
                   attacks='[[attacks]]\nname = "noise"\n')


def test_check_model_passes_a_healthy_model_and_catches_a_masked_and_a_batch_dependent_one(lab: Path) -> None:
    healthy = CliRunner().invoke(main, ["check-model", str(_checked(lab, "healthy"))])
    assert healthy.exit_code == 0, healthy.output
    lines = healthy.output.splitlines()
    assert all(line.startswith("PASS ") for line in lines) and len(lines) == 6, healthy.output
    masked = CliRunner().invoke(main, ["check-model", str(_checked(lab, "masked"))])
    assert masked.exit_code == 1 and "WARN Net: gradient: the output has no autograd graph" in masked.output
    batch = CliRunner().invoke(main, ["check-model", str(_checked(lab, "batch"))])
    assert batch.exit_code == 1 and "FAIL Net: batch-independent" in batch.output, batch.output


def test_run_refuses_a_batch_dependent_model_before_any_cell_and_warns_of_a_masked_one(lab: Path) -> None:
    refused = _run(_checked(lab, "batch"))
    assert refused.exit_code == 2 and "fails its check 'batch-independent'" in refused.stderr, refused.output
    assert refused.stderr.strip().count("\n") == 0
    # Attacked one subject at a time, the same model is sound to benchmark.
    one = _checked(lab, "batch")
    one.write_text(one.read_text().replace("batch_size = 2", "batch_size = 1"))
    assert _run(one).exit_code == 0
    masked = _run(_checked(lab, "masked"))
    assert masked.exit_code in (0, 1) and "warning: model 'Net': gradient" in masked.output, masked.output


def test_check_model_from_the_command_line_without_a_config(lab: Path) -> None:
    before = sorted(str(p.relative_to(lab)) for p in (lab / "dataset").rglob("*"))
    result = CliRunner().invoke(main, ["check-model", "--factory", f"{lab}/net.py:net", "--weights",
                                       str(lab / "net.safetensors"), "--input-shape", "16x16x16", "--voxel-size",
                                       "1", "--data", str(lab / "dataset")])
    assert result.exit_code == 0, result.output
    assert "PASS net: output: shape [4]" in result.output
    # split = "all", caches under the run folder: the dataset folder is left as it was.
    assert sorted(str(p.relative_to(lab)) for p in (lab / "dataset").rglob("*")) == before


def test_split_all_attacks_every_usable_subject_and_writes_nothing_into_the_dataset(lab: Path) -> None:
    (lab / "dataset" / "splits-seed0.json").unlink()  # the fixture's, written by the runner of its day
    before = sorted(str(p.relative_to(lab)) for p in (lab / "dataset").rglob("*"))
    config = _config(lab, f'factory = "{lab}/net.py:net"\nweights = "{lab}/net.pt"\n{GRID_KEYS}')
    config.write_text(config.read_text().replace('split = "train"\ncount = 3', 'split = "all"'))
    result = _run(config)
    assert result.exit_code == 0, result.output
    with ResultStore(lab / "run", create=False) as store:
        assert len(store.samples()) == 12  # every subject of the fixture
    assert sorted(str(p.relative_to(lab)) for p in (lab / "dataset").rglob("*")) == before
    assert (lab / "run" / "cache").is_dir()


def test_evaluate_benchmarks_an_in_memory_module_as_the_cli_does_a_config(lab: Path) -> None:
    import medrobust

    model = import_plugin(str(lab / "net.py")).net()
    model.load_state_dict(torch.load(lab / "net.pt", weights_only=True))
    result = medrobust.evaluate(model, lab / "dataset", input_shape=GRID, voxel_size=(1, 1, 1), split="train",
                                count=3, attacks=["fgsm"], budgets=[{"norm": "linf", "epsilon": 1e-3}],
                                batch_size=2, out=lab / "notebook", progress=False)
    assert len(result.cells) == 1 and len(result.samples) == 3 and result.page.is_file()
    assert result.cells.iloc[0]["model"] == "TinyNet" and not result.failed
    # The same weights through a config and the command line: the same rows.
    cli = _run(_config(lab, f'factory = "{lab}/net.py:net"\nweights = "{lab}/net.pt"\n{GRID_KEYS}'))
    assert cli.exit_code == 0, cli.output
    with ResultStore(lab / "run", create=False) as store:
        rows = store.samples()
    columns = ["subject", "clean_prediction", "adversarial_prediction", "linf", "l2"]
    pd.testing.assert_frame_equal(result.samples[columns].reset_index(drop=True), rows[columns], check_exact=True)
    # Called again, it finds its cell finished.
    again = medrobust.evaluate(model, lab / "dataset", input_shape=GRID, voxel_size=(1, 1, 1), split="train",
                               count=3, attacks=["fgsm"], budgets=[{"norm": "linf", "epsilon": 1e-3}],
                               batch_size=2, out=lab / "notebook", progress=False, report=False)
    assert list(again.cells["id"]) == list(result.cells["id"])
    with pytest.raises(MedrobustError, match="evaluate: output must be one of"):
        medrobust.evaluate(model, lab / "dataset", input_shape=GRID, voxel_size=(1, 1, 1), output="decades")


FEATURED = '''
import torch
from torch import nn


class Net(nn.Module):
    """Image and two context features, in its own order (the fixture's field strength is missing, NaN: a model of
    one's own is given the raw values, and the checks before a run would refuse its NaN ages)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 + 2, 1)

    def forward(self, x, features):
        hidden = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return 40.0 + self.head(torch.cat([hidden, features / 100.0], dim=1)).squeeze(1)
'''


@pytest.mark.parametrize(("features", "cells"), [('["vol_shell", "sex"]', 2), ('["sex", "sex"]', 1)])
def test_a_model_takes_its_declared_features_from_the_data_and_perturbed_needs_a_volume(lab: Path, features: str,
                                                                                          cells: int) -> None:
    (lab / "featured.py").write_text(FEATURED)
    config = _config(lab, f'factory = "{lab}/featured.py:Net"\n{GRID_KEYS}\ninputs = "image+features"\n'
                          f'features = {features}')
    config.write_text('threat_model = ["fixed", "perturbed"]\n' + config.read_text())
    result = _run(config)
    assert result.exit_code == 0, result.output
    assert f"{cells} cells run" in result.output
    with ResultStore(lab / "run", create=False) as store:
        stored = store.cells()
    assert set(stored["threat_model"]) == ({"fixed", "perturbed"} if cells == 2 else {"fixed"})
    if cells == 1:  # no regional volume among its features: perturbed would repeat fixed, and is not run
        assert "takes no regional volume" in result.output


@pytest.mark.parametrize("threat_models", [["fixed", "perturbed"], ["fixed", "recomputed"]])
def test_a_model_takes_volumes_a_freesurfer_run_measured(lab: Path, threat_models: list[str]) -> None:
    # Real data come with FreeSurfer's stats, not with our label maps: the model names what it takes from them.
    for number in range(12):
        stats = lab / "freesurfer" / f"sub-{number:02d}" / "stats"
        stats.mkdir(parents=True)
        (stats / "aseg.stats").write_text(
            f"# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated Total Intracranial Volume, {1.5e6 + number}, "
            f"mm^3\n# ColHeaders  Index SegId NVoxels Volume_mm3 StructName\n"
            f"  1  17  {4000 + number}  {4000 + number}.0  Left-Hippocampus\n")
    (lab / "featured.py").write_text(FEATURED)
    config = _config(lab, f'factory = "{lab}/featured.py:Net"\n{GRID_KEYS}\ninputs = "image+features"\n'
                          f'features = ["vol_Left-Hippocampus", "vol_eTIV"]')
    config.write_text(f"threat_model = {threat_models}\n" + config.read_text().replace(
        'count = 3\n', f'count = 3\n\n[dataset.features]\nformat = "freesurfer"\npath = "{lab / "freesurfer"}"\n'))
    result = _run(config)
    if "recomputed" in threat_models:  # no label-map region behind these volumes: nothing to recompute them from
        assert result.exit_code == 2 and "the volumes of dataset.features are read from freesurfer" in result.stderr
        return
    assert result.exit_code == 0, result.output
    assert "2 cells run" in result.output
    with ResultStore(lab / "run", create=False) as store:
        stored = store.cells()
    assert set(stored["threat_model"]) == {"fixed", "perturbed"}
    assert (stored["status"] == "done").all()


@pytest.mark.parametrize(("grid", "ok"), [("[16, 16, 16]", True), ("[16, 16, 18]", False)])
def test_data_already_in_the_models_space_are_taken_as_stored(lab: Path, grid: str, ok: bool) -> None:
    config = _config(lab, f'factory = "{lab}/net.py:net"\nweights = "{lab}/net.pt"\ninput_shape = {grid}\n'
                          f'voxel_size = [1, 1, 1]\nspace = "preprocessed"')
    result = _run(config)
    if ok:
        assert result.exit_code == 0, result.output
        assert "1 cells run" in result.output
    else:  # nothing is resampled: every subject is refused with its grid, and the run says so in one line
        assert result.exit_code == 2 and "space = 'preprocessed' resamples nothing" in result.stderr


def test_declared_features_the_data_lack_are_one_line(lab: Path) -> None:
    (lab / "featured.py").write_text(FEATURED)
    result = _run(_config(lab, f'factory = "{lab}/featured.py:Net"\n{GRID_KEYS}\ninputs = "image+features"\n'
                               f'features = ["sex", "vol_hippocampus"]'))
    assert result.exit_code == 2 and "models[0].features: the data have no 'vol_hippocampus'" in result.stderr


@pytest.mark.parametrize("kind", ["torchscript", "monai"])
def test_evaluate_takes_a_torchscript_or_a_monai_module_as_it_is(lab: Path, kind: str) -> None:
    import medrobust

    if kind == "monai":
        nets = pytest.importorskip("monai.networks.nets")
        torch.manual_seed(0)
        model, grid, voxels = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1), (32, 32, 32), 0.5
        output = {"output": "standardized", "age_mean": 45.0, "age_std": 15.0}
    else:
        model, grid, voxels, output = torch.jit.load(str(lab / "net.ts")), GRID, 1.0, {}
    result = medrobust.evaluate(model, lab / "dataset", input_shape=grid, voxel_size=(voxels,) * 3, split="train",
                                count=2, attacks=["fgsm"], budgets=[{"norm": "linf", "epsilon": 1e-3}],
                                batch_size=2, out=lab / kind, progress=False, report=False, **output)
    assert len(result.cells) == 1 and len(result.samples) == 2 and not result.failed
    assert (result.samples["adversarial_prediction"] != result.samples["clean_prediction"]).all()
