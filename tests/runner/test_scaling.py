"""The runner at scale: devices, reduced precision and its parity check, out-of-memory backoff, determinism,
planning without running, and the executors (local with several workers, Ray) giving the same store."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from medrobust.devices import resolve_devices
from medrobust.errors import MedrobustError
from medrobust.results.store import RUN_DEPENDENT_CELL_FIELDS, ResultStore
from medrobust.runner import plan, run
from medrobust.runner.cells import subject_seeds
from medrobust.runner.config import load_config

CONFIG = """
out = "{out}"
models_dir = "{models}"
batch_size = 4
seed = 5
threat_model = ["fixed", "perturbed"]
precision = "{precision}"

{tables}
[[models]]
name = "cnn3d"

[[models]]
name = "hybrid"

[[budgets]]
norm = "linf"
epsilon = [2e-3]

[[attacks]]
name = "pgd"
steps = 2
random_start = true

[[attacks]]
name = "noise"
"""
# Keys of a cell that depend on the run or the machine's load, not on the result.
TIMING = RUN_DEPENDENT_CELL_FIELDS + ("attack_seconds",)


@pytest.fixture(scope="module")
def write_config(tiny_run_tables):
    """Factory: ``write_config(folder, name, precision, **replace)`` -> the tiny run config ``<folder>/<name>``
    (the text ``old`` replaced by ``new`` for each ``old=new``), loaded."""

    def write(folder, name, precision="fp32", **replace) -> object:
        text = CONFIG.format(out=folder / name, models=folder / "models", precision=precision,
                             tables=tiny_run_tables(folder / "cohort", 5))
        for old, new in replace.items():
            text = text.replace(old, new)
        path = folder / f"{name}.toml"
        path.write_text(text)
        return load_config(path)

    return write


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_config):
    """A folder with the tiny cohort and trained models, and one finished reference run ("reference")."""
    folder = tmp_path_factory.mktemp("scaling")
    summary = run(write_config(folder, "reference"), progress=False, echo=lambda *_: None)
    # cnn3d: pgd and noise under fixed; hybrid: pgd and noise under fixed and perturbed
    assert summary.done == summary.cells == 6
    return folder


def stored(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    with ResultStore(out, create=False) as store:
        cells, samples = store.cells(), store.samples()
    cells = cells.drop(columns=[c for c in TIMING if c in cells]).sort_values("id").reset_index(drop=True)
    return cells, samples.sort_values(["cell_id", "subject"]).reset_index(drop=True)


def test_a_rerun_into_a_new_store_gives_bit_identical_rows(trained, capsys, write_config):
    run(write_config(trained, "again"), progress=True, echo=lambda *_: None)
    # The progress bar counts cells and names the one in progress with its deviation so far.
    bar = capsys.readouterr().err
    assert "/6 [" in bar and "cnn3d pgd linf eps=0.002 range older fixed: 4/5 subjects" in bar
    assert "mean |deviation| so far" in bar
    cells, samples = stored(trained / "again")
    reference_cells, reference_samples = stored(trained / "reference")
    pd.testing.assert_frame_equal(samples, reference_samples, check_exact=True)
    assert list(cells["id"]) == list(reference_cells["id"])
    for column in ("mean_abs_deviation", "adversarial_mae", "forward", "backward", "cell_seed"):
        assert list(cells[column]) == list(reference_cells[column])


def test_cells_draw_from_their_own_seeds(trained):
    cells, samples = stored(trained / "reference")
    assert cells["cell_seed"].is_unique  # derived from each cell's id
    seeds = subject_seeds(7, ["sub-1", "sub-2"])
    assert seeds == subject_seeds(7, ["sub-1", "sub-2"]) and seeds != subject_seeds(8, ["sub-1", "sub-2"])
    assert subject_seeds(7, ["sub-2"]) == seeds[1:]  # a subject's seed does not depend on its batch


def test_out_of_memory_halves_the_batch_and_gives_the_same_results(trained, monkeypatch, write_config):
    import medrobust.runner.execute as execute

    original = execute.build_attack
    sizes = []

    class Tight:
        """An attack on a device that only fits batches of 1 subject."""

        def __init__(self, attack):
            self.attack = attack

        def params(self):
            return self.attack.params()

        def __call__(self, images, features=None, ages=None, mask=None, sample_seeds=None):
            sizes.append(images.shape[0])
            if images.shape[0] > 1:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
            return self.attack(images, features, ages, mask, sample_seeds=sample_seeds)

    monkeypatch.setattr(execute, "build_attack", lambda *args, **kwargs: Tight(original(*args, **kwargs)))
    summary = run(write_config(trained, "tight"), progress=False, echo=lambda *_: None)
    assert summary.done == summary.cells and not summary.failed
    # Each cell: its first batch of 4 halved twice, then every later batch kept at 1 subject.
    assert sizes == [4, 2, 1, 1, 1, 1, 1] * summary.cells
    cells, samples = stored(trained / "tight")
    _, reference_samples = stored(trained / "reference")
    assert set(cells["batch_size_used"]) == {1}
    # The same random starts, the same steps: equal up to the float rounding of convolutions over another batch
    # size (which can flip the sign of a near-zero gradient voxel), far below a hundredth of a year.
    columns = ["clean_prediction", "adversarial_prediction", "linf", "l2"]
    pd.testing.assert_frame_equal(samples[columns], reference_samples[columns], rtol=0, atol=1e-3)
    assert (samples["clean_prediction"] - reference_samples["clean_prediction"]).abs().max() < 1e-4


def test_out_of_memory_at_one_subject_fails_the_cell_only(trained, monkeypatch, write_config):
    import medrobust.runner.execute as execute

    original = execute.build_attack

    def broken(cell, *args, **kwargs):
        attack = original(cell, *args, **kwargs)
        if cell.attack.name != "pgd":
            return attack

        def call(images, features=None, ages=None, mask=None):
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

        call.params = attack.params
        return call

    monkeypatch.setattr(execute, "build_attack", broken)
    summary = run(write_config(trained, "no-memory"), progress=False, echo=lambda *_: None)
    assert len(summary.failed) == 3 and summary.done == 3  # pgd's cells fail, noise's do not
    assert all("OutOfMemoryError" in error for _, error in summary.failed)


def test_reduced_precision_is_checked_against_fp32(trained, write_config):
    run(write_config(trained, "bf16", precision="bf16"), progress=False, echo=lambda *_: None)
    cells, _ = stored(trained / "bf16")
    assert set(cells["precision"]) == {"bf16"}
    assert cells["parity_mean_abs_deviation"].notna().all()
    assert cells["parity_fp32_mean_abs_deviation"].notna().all()
    reference, _ = stored(trained / "reference")
    assert set(cells["id"]).isdisjoint(reference["id"])  # precision is part of a cell's identity


def test_a_precision_gap_marks_the_cell(trained):
    from medrobust.results.reliability import reliability_flags

    cells = pd.DataFrame([
        {"id": "a", "status": "done", "objective": "older", "precision": "bf16", "parity_mean_abs_deviation": 0.4,
         "parity_fp32_mean_abs_deviation": 6.0, "mean_deviation": 0.4, "mean_abs_deviation": 0.4,
         "attack": "pgd", "params": {}, "model": "m", "checkpoint_sha256": "c", "data_fingerprint": "d",
         "subjects_sha256": "s", "threat_model": "fixed", "norm": "linf", "unit": "range", "epsilon": 1e-3},
        {"id": "b", "status": "done", "objective": "older", "precision": "bf16", "parity_mean_abs_deviation": 5.9,
         "parity_fp32_mean_abs_deviation": 6.0, "mean_deviation": 5.9, "mean_abs_deviation": 5.9,
         "attack": "pgd", "params": {"x": 1}, "model": "m", "checkpoint_sha256": "c", "data_fingerprint": "d",
         "subjects_sha256": "s", "threat_model": "fixed", "norm": "linf", "unit": "range", "epsilon": 2e-3}])
    flags = reliability_flags(cells)
    assert list(flags) == ["a"] and "bf16 differs from fp32" in flags["a"][0]


def test_plan_names_the_cells_a_run_stores_without_running(trained, write_config):
    config = write_config(trained, "reference")
    cells, _ = stored(trained / "reference")
    assert sorted(cell.id for cell in plan(config)) == sorted(cells["id"])
    with pytest.raises(MedrobustError, match="no checkpoint yet"):
        plan(write_config(trained, "elsewhere", **{str(trained / "models"): str(trained / "none")}))


def test_device_resolution():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == [torch.device("cpu")]
        with pytest.raises(MedrobustError, match="CUDA is not available"):
            resolve_devices("cuda:0")
    with pytest.raises(MedrobustError, match="not a device"):
        resolve_devices("gpu7")


def test_local_executor_with_two_workers_fills_the_same_store(trained, monkeypatch, write_config):
    import medrobust.runner.driver as driver

    # Two workers on the CPU stand in for two GPUs: the same threads-and-queue path runs.
    monkeypatch.setattr(driver, "resolve_devices", lambda name: [torch.device("cpu"), torch.device("cpu")])
    summary = run(write_config(trained, "two-workers"), progress=False, echo=lambda *_: None)
    assert summary.done == summary.cells
    cells, samples = stored(trained / "two-workers")
    reference_cells, reference_samples = stored(trained / "reference")
    assert list(cells["id"]) == list(reference_cells["id"])
    columns = ["subject", "clean_prediction", "adversarial_prediction", "deviation", "linf", "l2"]
    pd.testing.assert_frame_equal(samples[columns], reference_samples[columns], rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="session")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra (pip install 'medrobust[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_fills_the_same_store_as_the_local_one(trained, local_ray, write_config):
    summary = run(write_config(trained, "ray"), progress=False, echo=lambda *_: None, executor="ray")
    assert summary.done == summary.cells and not summary.failed
    cells, samples = stored(trained / "ray")
    reference_cells, reference_samples = stored(trained / "reference")
    pd.testing.assert_frame_equal(samples, reference_samples, check_exact=True)
    assert list(cells["id"]) == list(reference_cells["id"])
    assert list(cells["mean_abs_deviation"]) == list(reference_cells["mean_abs_deviation"])
    # A re-run on Ray finds everything done.
    again = run(write_config(trained, "ray"), progress=False, echo=lambda *_: None, executor="ray")
    assert again.done == 0 and again.skipped == again.cells


def test_unknown_executor_and_a_stray_ray_address_are_refused(trained, write_config):
    with pytest.raises(MedrobustError, match="executor must be one of local, ray"):
        run(write_config(trained, "x"), progress=False, echo=lambda *_: None, executor="dask")
    with pytest.raises(MedrobustError, match="--ray-address goes with --executor ray"):
        run(write_config(trained, "x"), progress=False, echo=lambda *_: None, ray_address="127.0.0.1:6379")
    shutil.rmtree(trained / "x", ignore_errors=True)


def test_a_finished_grid_reruns_without_loading_models_or_subjects(trained, monkeypatch, write_config):
    import os

    import medrobust.runner.driver as driver

    config = write_config(trained, "reference")
    with ResultStore(trained / "reference", create=False) as store:
        runs_before = len(store.runs())

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished grid must not load models or subjects")

    monkeypatch.setattr(driver, "LoadedInputs", no_loading)
    summary = run(config, progress=False, echo=lambda *_: None)
    assert summary.done == 0 and summary.skipped == summary.cells == 6
    with ResultStore(trained / "reference", create=False) as store:
        assert len(store.runs()) == runs_before  # nothing ran, nothing recorded
    # A changed checkpoint file invalidates the cached plan: the grid is planned again from the files.
    weights = trained / "models" / "hybrid-seed0.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="must not load"):
        run(config, progress=False, echo=lambda *_: None)


def test_ssim_can_be_switched_off_and_is_then_not_stored(trained, write_config):
    run(write_config(trained, "no-ssim", **{"seed = 5": "seed = 5\nssim = false"}), progress=False,
        echo=lambda *_: None)
    cells, samples = stored(trained / "no-ssim")
    reference_cells, reference_samples = stored(trained / "reference")
    assert samples["ssim"].isna().all() and reference_samples["ssim"].notna().all()
    # The same attacks (other cell ids, so another row order): the same voxel counts and PSNR values.
    assert samples["psnr"].notna().all() and sorted(samples["l0"]) == sorted(reference_samples["l0"])
    assert sorted(samples["psnr"]) == sorted(reference_samples["psnr"])
    assert "mean_ssim" not in cells or cells["mean_ssim"].isna().all()
    assert set(cells["id"]).isdisjoint(reference_cells["id"])  # the measurements taken belong to the identity
