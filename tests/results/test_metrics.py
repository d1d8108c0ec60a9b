"""Metrics: per-sample l0, PSNR and SSIM against hand-computed values (and scikit-image where installed), the
bootstrap intervals, and the cell summary with and without the image metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrobust.errors import MedrobustError
from medrobust.results.metrics import (
    SSIM_RADIUS,
    bootstrap_mean_intervals,
    cell_metrics,
    image_metrics,
    rows_metrics,
)
from medrobust.results.store import ResultStore


def _images(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- l0 and PSNR


def test_psnr_of_a_constant_offset_is_its_closed_form() -> None:
    clean = _images((2, 1, 12, 13, 14))
    offset = torch.tensor([0.5, 0.01], dtype=torch.float64).view(-1, 1, 1, 1, 1)
    metrics = image_metrics(clean, clean + offset)
    data_range = clean.flatten(1).amax(1) - clean.flatten(1).amin(1)
    # MSE = offset^2 exactly (up to the rounding of clean + offset).
    expected = 20 * torch.log10(data_range / offset.flatten())
    assert torch.allclose(metrics["psnr"], expected, rtol=0, atol=1e-9)
    assert metrics["psnr"].dtype == torch.float64
    assert torch.equal(metrics["l0"], torch.tensor([12 * 13 * 14] * 2))


def test_psnr_and_ssim_inside_a_mask_ignore_what_lies_outside_but_l0_counts_it() -> None:
    clean = _images((1, 1, 16, 16))
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:12, 4:12] = True
    adversarial = clean + torch.where(mask, 0.25, 0.0)
    adversarial[0, 0, 0, 0] += 5.0  # outside the mask
    metrics = image_metrics(clean, adversarial, mask)
    data_range = float(clean.max() - clean.min())
    assert metrics["psnr"].item() == pytest.approx(20 * math.log10(data_range / 0.25), abs=1e-9)
    assert metrics["l0"].item() == 64 + 1
    # A float 0/1 mask of shape [H, W] is the same mask.
    again = image_metrics(clean, adversarial, mask[0, 0].double())
    assert torch.equal(again["psnr"], metrics["psnr"]) and torch.equal(again["ssim"], metrics["ssim"])


def test_an_unchanged_image_has_l0_zero_infinite_psnr_and_ssim_one() -> None:
    clean = _images((3, 1, 11, 11, 11), dtype=torch.float32)
    adversarial = clean.clone()
    adversarial[1, 0, 5, 5, 5] += 1.0
    metrics = image_metrics(clean, adversarial)
    assert metrics["l0"].tolist() == [0, 1, 0]
    assert metrics["psnr"][0] == math.inf and metrics["psnr"][2] == math.inf
    assert math.isfinite(metrics["psnr"][1])
    assert metrics["ssim"][0] == 1.0 and metrics["ssim"][2] == 1.0 and metrics["ssim"][1] < 1.0


def test_an_image_smaller_than_the_ssim_window_has_l0_and_psnr_but_no_ssim() -> None:
    clean = _images((2, 1, 12, 10))
    adversarial = clean + 0.5
    metrics = image_metrics(clean, adversarial)
    assert metrics["l0"].tolist() == [120, 120]
    data_range = clean.flatten(1).amax(1) - clean.flatten(1).amin(1)
    assert torch.allclose(metrics["psnr"], 20 * torch.log10(data_range / 0.5), rtol=0, atol=1e-9)
    assert torch.isnan(metrics["ssim"]).all()


def test_a_constant_clean_image_has_no_psnr_or_ssim() -> None:
    clean = torch.full((2, 1, 12, 12), 4.0)
    adversarial = clean.clone()
    adversarial[0, 0, 3, 3] = 4.5
    metrics = image_metrics(clean, adversarial)
    assert metrics["l0"].tolist() == [1, 0]
    assert torch.isnan(metrics["psnr"]).all() and torch.isnan(metrics["ssim"]).all()


# ---------------------------------------------------------------- SSIM


def test_ssim_of_an_offset_ramp_by_hand() -> None:
    # On a linear ramp the Gaussian window's mean is the centre value, and an offset c adds no variance: SSIM's
    # structure term is 1 and its luminance term 1 - c^2 / (mu^2 + (mu + c)^2 + C1) at each valid centre.
    height, width, slope, base, offset = 20, 15, 0.3, 1.0, 0.2
    ramp = (base + slope * torch.arange(height, dtype=torch.float64)).view(1, 1, height, 1).expand(1, 1, height, width)
    metrics = image_metrics(ramp, ramp + offset)
    data_range = slope * (height - 1)
    c1 = (0.01 * data_range) ** 2
    centres = base + slope * np.arange(SSIM_RADIUS, height - SSIM_RADIUS)
    expected = np.mean(1 - offset**2 / (centres**2 + (centres + offset) ** 2 + c1))
    assert metrics["ssim"].item() == pytest.approx(expected, rel=0, abs=1e-12)


def test_ssim_is_symmetric_in_its_inputs_and_below_one_for_noise() -> None:
    # SSIM is symmetric when both images have the same data range: give both the same extreme voxels. The
    # computation (from x and d = y - x) is not, so this checks the rewriting of the formula.
    clean = _images((2, 1, 14, 12, 13))
    noisy = clean + 0.5 * _images((2, 1, 14, 12, 13), seed=1)
    for image in (clean, noisy):
        image[:, 0, 0, 0, 0], image[:, 0, -1, -1, -1] = -20.0, 20.0
    forward, backward = image_metrics(clean, noisy)["ssim"], image_metrics(noisy, clean)["ssim"]
    assert ((forward < 1) & (forward > 0)).all()
    assert torch.allclose(forward, backward, rtol=0, atol=1e-12)


def test_each_sample_is_measured_on_its_own() -> None:
    clean = _images((3, 1, 12, 12, 12))
    adversarial = clean + 0.1 * _images((3, 1, 12, 12, 12), seed=2)
    batched = image_metrics(clean, adversarial)
    for index in range(3):
        alone = image_metrics(clean[index:index + 1], adversarial[index:index + 1])
        for key in ("l0", "psnr", "ssim"):
            assert torch.allclose(batched[key][index:index + 1].double(), alone[key].double(), rtol=1e-12, atol=0)


def test_ssim_can_be_left_out_and_the_rest_is_unchanged() -> None:
    clean = _images((2, 1, 12, 12, 12))
    adversarial = clean + 0.1 * _images((2, 1, 12, 12, 12), seed=3)
    full, lean = image_metrics(clean, adversarial), image_metrics(clean, adversarial, ssim=False)
    assert set(lean) == {"l0", "psnr"} and "ssim" in full
    assert torch.equal(lean["l0"], full["l0"]) and torch.equal(lean["psnr"], full["psnr"])


def test_float32_keeps_the_precision_of_one_minus_ssim_for_tiny_perturbations() -> None:
    # At the paper's l-inf epsilon (5e-4 of the range) 1 - SSIM is about 1e-5: computed from the perturbation's
    # own statistics, float32 still agrees with float64 to a small fraction of it.
    clean = _images((2, 1, 24, 24, 24))
    sign = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).sign()
    data_range = float((clean.flatten(1).amax(1) - clean.flatten(1).amin(1)).min())
    adversarial = clean + 5e-4 * data_range * sign
    exact = image_metrics(clean, adversarial)
    single = image_metrics(clean.float(), adversarial.float())
    assert ((1 - exact["ssim"]) > 1e-7).all()
    assert torch.allclose(1 - single["ssim"], 1 - exact["ssim"], rtol=1e-3, atol=0)
    assert torch.allclose(single["psnr"], exact["psnr"], rtol=0, atol=1e-3)


def test_metrics_ignore_an_enclosing_autocast() -> None:
    clean = _images((2, 1, 12, 12, 12), dtype=torch.float32)
    adversarial = clean + 0.01
    plain = image_metrics(clean, adversarial)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = image_metrics(clean, adversarial)
    for key in plain:
        assert torch.equal(plain[key], cast[key])


def test_a_mask_selects_the_ssim_windows_by_their_centre() -> None:
    clean = _images((1, 1, 16, 18))
    adversarial = clean + 0.3 * _images((1, 1, 16, 18), seed=3)
    full = image_metrics(clean, adversarial)["ssim"]
    assert torch.equal(image_metrics(clean, adversarial, torch.ones(16, 18))["ssim"], full)
    # Two masks that split the valid centres: their SSIMs, weighted by their centre counts, average to the whole.
    top = torch.zeros(1, 1, 16, 18, dtype=torch.bool)
    top[..., :8, :] = True
    upper, lower = image_metrics(clean, adversarial, top)["ssim"], image_metrics(clean, adversarial, ~top)["ssim"]
    rows = 16 - 2 * SSIM_RADIUS
    upper_rows = 8 - SSIM_RADIUS
    assert torch.allclose((upper * upper_rows + lower * (rows - upper_rows)) / rows, full, rtol=0, atol=1e-12)
    # A mask with no valid centre leaves nothing to average.
    corner = torch.zeros(16, 18, dtype=torch.bool)
    corner[0, 0] = True
    assert torch.isnan(image_metrics(clean, adversarial, corner)["ssim"]).all()


@pytest.mark.parametrize("spatial", [(21, 17), (13, 14, 15)])
def test_ssim_and_psnr_match_scikit_image(spatial: tuple[int, ...]) -> None:
    skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed (optional)")
    clean = _images((2, 2, *spatial))
    adversarial = clean + 0.4 * _images((2, 2, *spatial), seed=4)
    adversarial[1] = clean[1] + 0.01 * adversarial[1]
    ours = image_metrics(clean, adversarial)
    for index in range(2):
        x, y = clean[index].numpy(), adversarial[index].numpy()
        data_range = float(x.max() - x.min())
        ssim = skimage_metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                     use_sample_covariance=False, data_range=data_range,
                                                     channel_axis=0)
        psnr = skimage_metrics.peak_signal_noise_ratio(x, y, data_range=data_range)
        assert ours["ssim"][index].item() == pytest.approx(ssim, rel=0, abs=1e-12)
        assert ours["psnr"][index].item() == pytest.approx(psnr, rel=1e-12)


@pytest.mark.parametrize(
    ("clean", "adversarial", "mask", "match"),
    [
        (torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 13), None, "same shape"),
        (torch.zeros(1, 12, 12), torch.zeros(1, 12, 12), None, r"\[B, C, H, W\]"),
        (torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 12), torch.ones(3, 3), "mask of shape"),
    ],
)
def test_bad_inputs_say_what_is_wrong(clean, adversarial, mask, match) -> None:
    with pytest.raises(MedrobustError, match=match):
        image_metrics(clean, adversarial, mask)


# ---------------------------------------------------------------- bootstrap intervals


def test_bootstrap_interval_contains_the_mean_and_is_about_the_normal_one() -> None:
    rng = np.random.default_rng(1)
    for size in (5, 30, 400):
        values = rng.gamma(2.0, 3.0, size)
        (low,), (high,) = bootstrap_mean_intervals(values)
        assert low < values.mean() < high
    # For a large sample the percentile interval approaches mean -/+ 1.96 standard errors.
    values = rng.normal(10.0, 2.0, 2000)
    (low,), (high,) = bootstrap_mean_intervals(values)
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.2 * half)


def test_bootstrap_interval_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for size in (10, 100, 1000):
        (low,), (high,) = bootstrap_mean_intervals(rng.normal(0.0, 1.0, size))
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_bootstrap_is_deterministic_and_paired() -> None:
    values = np.random.default_rng(3).exponential(4.0, (2, 57))
    low, high = bootstrap_mean_intervals(values)
    again_low, again_high = bootstrap_mean_intervals(values.copy())
    assert np.array_equal(low, again_low) and np.array_equal(high, again_high)
    # Each row alone gets the same interval as within the pair (the same resampled subjects serve every row).
    for row in range(2):
        (alone_low,), (alone_high,) = bootstrap_mean_intervals(values[row])
        assert alone_low == pytest.approx(low[row], rel=1e-14)
        assert alone_high == pytest.approx(high[row], rel=1e-14)
    # Another seed draws other resamples.
    other_low, _ = bootstrap_mean_intervals(values, seed=1)
    assert not np.array_equal(other_low, low)


def test_bootstrap_of_one_subject_is_its_value_and_of_none_nan() -> None:
    low, high = bootstrap_mean_intervals([[7.25], [0.5]])
    assert low.tolist() == [7.25, 0.5] and high.tolist() == [7.25, 0.5]
    low, high = bootstrap_mean_intervals(np.empty((2, 0)))
    assert np.isnan(low).all() and np.isnan(high).all()


def test_bootstrap_blocks_cover_every_resample_whatever_the_size() -> None:
    # Large n: the resamples are drawn in several blocks; every resampled mean must be filled (none left empty).
    values = np.random.default_rng(4).normal(5.0, 1.0, (2, 5000))
    low, high = bootstrap_mean_intervals(values)
    assert np.isfinite(low).all() and np.isfinite(high).all() and (low < values.mean(1)).all()
    assert (values.mean(1) < high).all()


def test_bad_bootstrap_arguments_name_themselves() -> None:
    with pytest.raises(MedrobustError, match="resamples"):
        bootstrap_mean_intervals([1.0, 2.0], resamples=0)
    with pytest.raises(MedrobustError, match="level"):
        bootstrap_mean_intervals([1.0, 2.0], level=95)


# ---------------------------------------------------------------- the cell summary


def _cell_arrays(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_age = rng.uniform(5, 90, size)
    clean = true_age + rng.normal(0, 4, size)
    adversarial = clean + rng.gamma(2.0, 2.0, size)
    norms = rng.uniform(0, 1, size)
    return {"true_age": true_age, "clean_prediction": clean, "adversarial_prediction": adversarial,
            "linf": norms, "l2": 10 * norms, "linf_rel": norms / 9, "l2_rel": 10 * norms / 9}


def _same(first: dict, second: dict) -> bool:
    """Equal keys and bit-identical values, NaN equal to NaN (an empty age bin)."""
    return first.keys() == second.keys() and all(
        first[key] == second[key] or (math.isnan(first[key]) and math.isnan(second[key])) for key in first)


def test_cell_metrics_carry_bootstrap_intervals_around_their_means() -> None:
    arrays = _cell_arrays(40)
    metrics = cell_metrics(*arrays.values())
    for key in ("adversarial_mae", "mean_abs_deviation"):
        assert metrics[f"{key}_ci_low"] < metrics[key] < metrics[f"{key}_ci_high"]
    assert _same(metrics, cell_metrics(*arrays.values()))  # bit-identical on a re-run
    assert "mean_psnr" not in metrics and "n_unchanged" not in metrics  # no image metrics given
    one = cell_metrics(*(values[:1] for values in arrays.values()))
    assert one["mean_abs_deviation_ci_low"] == one["mean_abs_deviation"] == one["mean_abs_deviation_ci_high"]
    empty = cell_metrics(*([] for _ in arrays))
    assert empty["n"] == 0 and math.isnan(empty["adversarial_mae_ci_low"])


def test_cell_metrics_summarize_the_image_metrics() -> None:
    arrays = _cell_arrays(5)
    l0 = [0, 10, 20, 30, 1000]
    psnr = [math.inf, 40.0, 50.0, 60.0, math.nan]
    ssim = [1.0, 0.9, 0.99, 0.999, math.nan]
    metrics = cell_metrics(*arrays.values(), l0=l0, psnr=psnr, ssim=ssim)
    assert metrics["mean_l0"] == 212.0 and metrics["median_l0"] == 20.0
    # PSNR over the changed images only; the unchanged one is counted apart and the undefined one left out.
    assert metrics["mean_psnr"] == 50.0 and metrics["median_psnr"] == 50.0 and metrics["n_unchanged"] == 1
    assert metrics["mean_ssim"] == pytest.approx((1.0 + 0.9 + 0.99 + 0.999) / 4)
    assert metrics["median_ssim"] == pytest.approx((0.99 + 0.999) / 2)
    assert all(math.isfinite(metrics[f"{stat}_{name}"]) for stat in ("mean", "median") for name in ("psnr", "ssim"))
    everything_unchanged = cell_metrics(*arrays.values(), psnr=[math.inf] * 5)
    assert everything_unchanged["n_unchanged"] == 5 and math.isnan(everything_unchanged["mean_psnr"])
    with pytest.raises(MedrobustError, match="ssim has 4 values for 5 subjects"):
        cell_metrics(*arrays.values(), ssim=ssim[:4])


def test_rows_metrics_reads_the_runner_rows_with_or_without_image_metrics() -> None:
    arrays = _cell_arrays(6, seed=1)
    rows = [dict(zip(arrays, values, strict=True)) for values in zip(*arrays.values(), strict=True)]
    assert _same(rows_metrics(rows), cell_metrics(*arrays.values()))
    clean = _images((6, 1, 12, 12, 12), dtype=torch.float32)
    adversarial = clean + 0.05 * _images((6, 1, 12, 12, 12), seed=9, dtype=torch.float32)
    adversarial[0] = clean[0]
    measured = image_metrics(clean, adversarial)
    for index, row in enumerate(rows):
        row.update({key: float(values[index]) for key, values in measured.items()})
    metrics = rows_metrics(rows)
    assert metrics["n_unchanged"] == 1 and metrics["mean_l0"] == pytest.approx(5 * 12**3 / 6)
    assert metrics["mean_psnr"] == pytest.approx(float(measured["psnr"][1:].mean()))
    assert metrics["median_ssim"] == pytest.approx(float(np.median(measured["ssim"].numpy())), rel=1e-15)



def test_an_infinite_psnr_round_trips_through_the_results_store(tmp_path) -> None:
    # The documented storage of an unchanged image's PSNR: +inf in the samples table, and no inf in the cell's
    # metrics (JSON).
    arrays = _cell_arrays(2, seed=2)
    rows = [{"subject": f"sub-{index}", **{key: float(values[index]) for key, values in arrays.items()},
             "deviation": float(arrays["adversarial_prediction"][index] - arrays["clean_prediction"][index]),
             "l0": l0, "psnr": psnr, "ssim": ssim}
            for index, (l0, psnr, ssim) in enumerate(((0, math.inf, 1.0), (12, 48.5, 0.999)))]
    metrics = rows_metrics(rows)
    with ResultStore(tmp_path) as store:
        store.write_cell("cell", store.start_run({}, {}), {"model": "m"}, metrics, rows, seconds=1.0)
        samples = store.samples("cell")
        cells = store.cells()
    assert samples["psnr"].tolist() == [math.inf, 48.5] and samples["l0"].tolist() == [0, 12]
    assert cells.loc[0, "mean_psnr"] == 48.5 and cells.loc[0, "n_unchanged"] == 1
    assert all(not (isinstance(value, float) and math.isinf(value)) for value in metrics.values())
