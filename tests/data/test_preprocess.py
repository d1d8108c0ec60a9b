"""Preprocessing: reorientation, resampling, masks, normalization, volumes, bad inputs and the cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medrobust.data import preprocess
from medrobust.data.index import SubjectRecord, load_dataset_index
from medrobust.data.preprocess import (
    Preprocessing,
    SubjectError,
    prepare_dataset,
    prepare_subject,
    resample_to_grid,
    subject_cache_key,
)
from medrobust.errors import MedrobustError

SHAPE = (12, 14, 10)
NATIVE = Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0))


def _record(t1: Path, dseg: Path | None = None, subject_id: str = "sub-1") -> SubjectRecord:
    return SubjectRecord(subject_id=subject_id, age=40.0, t1_path=t1, dseg_path=dseg)


def _index(bids_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_dataset_index(bids_dataset)


def test_preprocessing_validates_and_keys_its_parameters():
    assert Preprocessing(shape=[12, 14, 10], voxel_size=[1, 1, 1]) == NATIVE
    assert Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0)).key() == NATIVE.key()
    variants = [
        Preprocessing(shape=(12, 14, 11), voxel_size=(1.0, 1.0, 1.0)),
        Preprocessing(shape=SHAPE, voxel_size=(2.0, 1.0, 1.0)),
        Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0), normalization="minmax"),
        Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0), use_mask=False),
    ]
    assert len({NATIVE.key(), *(v.key() for v in variants)}) == 5
    with pytest.raises(MedrobustError, match="normalization"):
        Preprocessing(shape=SHAPE, voxel_size=(1, 1, 1), normalization="histogram")
    with pytest.raises(MedrobustError, match="voxel_size"):
        Preprocessing(shape=SHAPE, voxel_size=(1, 0, 1))
    with pytest.raises(MedrobustError, match="shape"):
        Preprocessing(shape=(12, 14), voxel_size=(1, 1, 1))


def test_resample_fast_path_returns_the_data_unchanged(synthetic_brain):
    image, _ = synthetic_brain()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-11.0, -13.0, -9.0]
    out = resample_to_grid(nib.Nifti1Image(image, affine), SHAPE, (2.0, 2.0, 2.0), order=1)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out, image)


def test_resample_to_coarser_grid_keeps_the_centre_of_mass():
    shape = (40, 36, 32)
    grid = np.indices(shape).astype(float)
    blob = np.exp(-((grid[0] - 12) ** 2 + (grid[1] - 20) ** 2 + (grid[2] - 17) ** 2) / (2 * 3.0**2))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -30.0, -20.0]
    img = nib.Nifti1Image(blob.astype(np.float32), affine)
    out = resample_to_grid(img, (20, 18, 16), (4.0, 4.0, 4.0), order=1)
    assert out.shape == (20, 18, 16)

    def world_centre(data, data_affine):
        centre = np.array(ndimage.center_of_mass(data))
        return data_affine[:3, :3] @ centre + data_affine[:3, 3]

    target = preprocess.target_affine(img, (20, 18, 16), (4.0, 4.0, 4.0))
    np.testing.assert_allclose(world_centre(out, target), world_centre(blob, affine), atol=0.5)
    labels = (blob > 0.5).astype(np.int16) * 7
    label_out = resample_to_grid(nib.Nifti1Image(labels, affine), (20, 18, 16), (4.0, 4.0, 4.0), order=0)
    assert set(np.unique(label_out)) == {0, 7}  # nearest-neighbour never invents labels


def test_resample_is_fast_enough():
    img = nib.Nifti1Image(np.random.default_rng(0).random((48, 56, 48), dtype=np.float32), np.eye(4))
    start = time.perf_counter()
    resample_to_grid(img, (48, 56, 48), (1.1, 1.1, 1.1), order=1)
    assert time.perf_counter() - start < 0.5


def test_las_image_preprocesses_like_its_ras_twin(tmp_path, write_nifti, synthetic_brain):
    image, dseg = synthetic_brain()
    ras_affine = np.eye(4)
    # The same voxels stored with the first axis flipped (radiological order) and the affine to match.
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[0, 3] = SHAPE[0] - 1
    ras_t1 = write_nifti(tmp_path / "ras.nii.gz", image, ras_affine)
    ras = prepare_subject(_record(ras_t1, write_nifti(tmp_path / "rd.nii", dseg)), NATIVE)
    las = prepare_subject(
        _record(
            write_nifti(tmp_path / "las.nii.gz", image[::-1], las_affine),
            write_nifti(tmp_path / "ld.nii", dseg[::-1], las_affine),
        ),
        NATIVE,
    )
    torch.testing.assert_close(las.image, ras.image)
    assert torch.equal(las.mask, ras.mask)
    assert las.volumes == ras.volumes


def test_volumes_are_millilitres_on_the_native_label_map(tmp_path, write_nifti):
    image = np.random.default_rng(0).normal(50, 10, (20, 20, 20)).astype(np.float32)
    dseg = np.zeros((20, 20, 20), dtype=np.uint8)
    dseg[2:12, 2:12, 2:12] = 1  # 1000 voxels
    dseg[15:17, 15:17, 15:17] = 4  # 8 voxels
    one_mm = prepare_subject(
        _record(write_nifti(tmp_path / "t1.nii", image), write_nifti(tmp_path / "d.nii", dseg)), NATIVE
    )
    assert one_mm.volumes == pytest.approx({1: 1.0, 4: 0.008})
    two_mm = np.diag([2.0, 2.0, 2.0, 1.0])
    t1_coarse = write_nifti(tmp_path / "t2.nii", image, two_mm)
    coarse = prepare_subject(_record(t1_coarse, write_nifti(tmp_path / "d2.nii", dseg, two_mm)), NATIVE)
    assert coarse.volumes == pytest.approx({1: 8.0, 4: 0.064})


def test_zscore_in_brain_and_mask_from_the_label_map(tmp_path, write_nifti, synthetic_brain):
    image, dseg = synthetic_brain()
    record = _record(write_nifti(tmp_path / "t1.nii.gz", image), write_nifti(tmp_path / "d.nii.gz", dseg))
    subject = prepare_subject(record, NATIVE)
    assert subject.image.shape == (1, *SHAPE) and subject.image.dtype == torch.float32
    assert subject.mask.dtype == torch.bool
    assert torch.equal(subject.mask[0], torch.from_numpy(dseg > 0))
    inside = subject.image[subject.mask]
    assert abs(inside.mean().item()) < 1e-4 and abs(inside.std(unbiased=False).item() - 1) < 1e-4
    assert (subject.image[~subject.mask] == 0).all()

    unmasked = prepare_subject(record, Preprocessing(SHAPE, (1.0, 1.0, 1.0), use_mask=False))
    assert (unmasked.image[~unmasked.mask] != 0).any()
    torch.testing.assert_close(unmasked.image[unmasked.mask], inside)

    minmax = prepare_subject(record, Preprocessing(SHAPE, (1.0, 1.0, 1.0), "minmax", use_mask=False))
    assert minmax.image.min().item() == pytest.approx(0.0) and minmax.image.max().item() == pytest.approx(1.0)
    whole = prepare_subject(record, Preprocessing(SHAPE, (1.0, 1.0, 1.0), "zscore", use_mask=False))
    assert abs(whole.image.mean().item()) < 1e-4
    raw = prepare_subject(record, Preprocessing(SHAPE, (1.0, 1.0, 1.0), "none", use_mask=False))
    np.testing.assert_allclose(raw.image[0].numpy(), image, rtol=1e-6)


def test_threshold_mask_without_a_label_map(tmp_path, write_nifti, synthetic_brain):
    image, dseg = synthetic_brain()
    image[dseg == 1] = 5.0  # a dark 'ventricle' inside the brain: filled as a hole
    subject = prepare_subject(_record(write_nifti(tmp_path / "t1.nii.gz", image)), NATIVE)
    assert subject.volumes == {}
    mask = subject.mask[0].numpy()
    assert mask[6, 7, 5] and not mask[0, 0, 0]
    assert (mask == (dseg > 0)).mean() > 0.95


def _corrupt(path: Path, image: np.ndarray, write_nifti) -> None:
    path.write_bytes(b"this is not a NIfTI file" * 20)


def _truncated(path: Path, image: np.ndarray, write_nifti) -> None:
    write_nifti(path, image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_T1 = {
    "corrupt.nii": (_corrupt, "not a readable NIfTI"),
    "truncated.nii.gz": (_truncated, "not a readable NIfTI"),
    "flat.nii": (lambda p, im, w: w(p, im[:, :, 0]), "3D volume"),
    "series.nii": (lambda p, im, w: w(p, np.stack([im, im], axis=-1)), "3D volume"),
    "nan.nii": (lambda p, im, w: w(p, np.where(im > 100, np.nan, im).astype(np.float32)), "NaN/Inf"),
    "inf.nii": (lambda p, im, w: w(p, np.where(im > 100, np.inf, im).astype(np.float32)), "NaN/Inf"),
}


@pytest.mark.parametrize("name", sorted(BAD_T1))
def test_bad_t1_raises_subject_error(name, tmp_path, write_nifti, synthetic_brain):
    make, reason = BAD_T1[name]
    image, _ = synthetic_brain()
    make(tmp_path / name, image, write_nifti)
    with pytest.raises(SubjectError, match=reason) as error:
        prepare_subject(_record(tmp_path / name), NATIVE)
    assert name in str(error.value)


def test_missing_file_raises_subject_error(tmp_path):
    with pytest.raises(SubjectError, match="not found"):
        prepare_subject(_record(tmp_path / "gone.nii.gz"), NATIVE)


def test_singleton_fourth_dimension_is_squeezed(tmp_path, write_nifti, synthetic_brain):
    image, _ = synthetic_brain()
    subject = prepare_subject(_record(write_nifti(tmp_path / "t1.nii", image[..., None])), NATIVE)
    assert subject.image.shape == (1, *SHAPE)


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_label_map_on_another_grid_is_rejected(mismatch, tmp_path, write_nifti, synthetic_brain):
    image, dseg = synthetic_brain()
    t1 = write_nifti(tmp_path / "t1.nii", image)
    if mismatch == "shape":
        bad = write_nifti(tmp_path / "d.nii", dseg[:-1])
    else:
        shifted = np.eye(4)
        shifted[0, 3] = 0.01  # beyond the 1e-3 tolerance
        bad = write_nifti(tmp_path / "d.nii", dseg, shifted)
    with pytest.raises(SubjectError, match="differs from its T1w"):
        prepare_subject(_record(t1, bad), NATIVE)
    nudged = np.eye(4)
    nudged[0, 3] = 1e-4  # within tolerance: accepted
    assert prepare_subject(_record(t1, write_nifti(tmp_path / "ok.nii", dseg, nudged)), NATIVE).volumes


def test_prepare_dataset_assembles_tensors_and_features(bids_dataset, tmp_path):
    index = _index(bids_dataset)
    data = prepare_dataset(index, NATIVE, cache_dir=tmp_path / "cache", progress=False)
    assert data.subject_ids == ["sub-01", "sub-02", "sub-04", "sub-06"]
    assert data.images.shape == (4, 1, *SHAPE) and data.images.dtype == torch.float32
    assert data.masks.shape == (4, 1, *SHAPE) and data.masks.dtype == torch.bool
    torch.testing.assert_close(data.ages, torch.tensor([34.5, 89.0, 40.0, 61.5]))
    assert data.feature_names == ["sex", "field_strength", "vol_core", "vol_shell"]
    assert data.features.shape == (4, 4)
    assert data.features[:, 0].tolist()[:3] == [0.0, 1.0, 1.0] and torch.isnan(data.features[3, 0])
    assert torch.isnan(data.features[:, 1]).all()
    dseg = nib.load(str(index.subjects[0].dseg_path)).get_fdata()
    assert data.features[0, 2].item() == pytest.approx((dseg == 1).sum() / 1000.0)
    assert {s.subject_id for s in data.skipped} == {"sub-03", "sub-05"}

    part = data.subset(["sub-04", "sub-01"])
    assert part.subject_ids == ["sub-04", "sub-01"]
    assert torch.equal(part.images[1], data.images[0]) and part.ages.tolist() == [40.0, 34.5]
    with pytest.raises(MedrobustError, match="sub-99"):
        data.subset(["sub-99"])


def test_bad_subjects_are_skipped_or_strict_raises(bids_dataset, tmp_path):
    broken = bids_dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    broken.write_bytes(gzip.compress(b"garbage" * 100))
    index = _index(bids_dataset)
    data = prepare_dataset(index, NATIVE, cache_dir=None, progress=False)
    assert "sub-02" not in data.subject_ids and len(data.subject_ids) == 3
    reason = {s.subject_id: s.reason for s in data.skipped}["sub-02"]
    assert "sub-02_T1w.nii.gz" in reason and "not a readable NIfTI" in reason
    with pytest.raises(MedrobustError, match="sub-02_T1w"):
        prepare_dataset(index, NATIVE, cache_dir=None, strict=True, progress=False)


def test_no_usable_subject_names_the_dataset_folder(bids_dataset, tmp_path):
    index = _index(bids_dataset)
    for record in index.subjects:
        record.t1_path.write_bytes(b"broken")
    with pytest.raises(MedrobustError, match="no usable subject") as error:
        prepare_dataset(index, NATIVE, cache_dir=tmp_path / "cache", progress=False)
    assert str(bids_dataset) in str(error.value)


def test_cache_hit_does_not_open_any_nifti(bids_dataset, tmp_path, monkeypatch):
    bad = bids_dataset / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    bad.write_bytes(b"broken")
    index = _index(bids_dataset)
    cache = tmp_path / "cache"
    first = prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 3 and len(list(cache.glob("*.failed.json"))) == 1
    assert not list(cache.glob("*.tmp"))

    def no_load(*args, **kwargs):
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nib, "load", no_load)
    second = prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)
    assert second.subject_ids == first.subject_ids
    assert torch.equal(second.images, first.images) and torch.equal(second.masks, first.masks)
    torch.testing.assert_close(second.features, first.features, equal_nan=True)
    assert {s.subject_id: s.reason for s in second.skipped} == {s.subject_id: s.reason for s in first.skipped}


def test_cache_key_follows_preprocessing_and_file_content(
    bids_dataset, tmp_path, write_nifti, synthetic_brain, monkeypatch
):
    index = _index(bids_dataset)
    record = index.subjects[0]
    key = subject_cache_key(record, NATIVE)
    assert subject_cache_key(record, Preprocessing(SHAPE, (1.0, 1.0, 1.0), "zscore")) != key
    cache = tmp_path / "cache"
    prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)

    image, _ = synthetic_brain(seed=99)
    write_nifti(record.t1_path, image)
    assert subject_cache_key(record, NATIVE) != key
    opened = []
    real_load = nib.load
    def counting_load(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)
    # Only the changed subject is read again.
    assert sorted(opened) == ["sub-01_T1w.nii.gz", "sub-01_dseg.nii.gz"]


def test_damaged_cache_entry_is_a_miss(bids_dataset, tmp_path):
    index = _index(bids_dataset)
    cache = tmp_path / "cache"
    first = prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)
    for entry in cache.glob("*.safetensors"):
        entry.write_bytes(b"junk")
    second = prepare_dataset(index, NATIVE, cache_dir=cache, progress=False)
    assert torch.equal(second.images, first.images)


def test_resampled_dataset_on_a_coarser_grid(bids_dataset, tmp_path):
    coarse = Preprocessing(shape=(6, 7, 5), voxel_size=(2.0, 2.0, 2.0))
    data = prepare_dataset(_index(bids_dataset), coarse, cache_dir=None, progress=False)
    assert data.images.shape == (4, 1, 6, 7, 5)
    assert data.masks.any() and (data.images[~data.masks] == 0).all()


def test_manifest_with_precomputed_features(tmp_path, write_nifti, synthetic_brain):
    folder = tmp_path / "study"
    rows = ["image,age,features,sex"]
    for number in range(3):
        image, _ = synthetic_brain(seed=number)
        write_nifti(folder / f"s{number}_T1w.nii.gz", image)
        (folder / f"s{number}_features.csv").write_text(f"field_strength,vol_7,vol_3\n3,{number}.5,1.25\n")
        rows.append(f"s{number}_T1w.nii.gz,{20 + number},s{number}_features.csv,{'F' if number else 'M'}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    index = load_dataset_index(folder / "manifest.csv")
    data = prepare_dataset(index, NATIVE, cache_dir=None, progress=False)
    # Without a dseg.tsv the volume labels come from the `vol_<id>` headers, in label-id order.
    assert data.feature_names == ["sex", "field_strength", "vol_3", "vol_7"]
    torch.testing.assert_close(data.features[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(data.features[:, 3], torch.tensor([0.5, 1.5, 2.5]))
    assert (data.features[:, 1] == 3.0).all() and (data.features[:, 2] == 1.25).all()
    assert data.masks.any()  # threshold mask, as there is no label map


def test_preprocessed_space_takes_the_image_as_stored_and_checks_its_grid(tmp_path, write_nifti, synthetic_brain):
    image, dseg = synthetic_brain()
    # Stored in radiological order (an MNI crop as FSL writes it) and off-centre: `resample` would reorient and
    # re-centre it; `preprocessed` hands the model the array as it is stored.
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [40.0, -20.0, 5.0]
    record = _record(write_nifti(tmp_path / "t1.nii.gz", image, affine), write_nifti(tmp_path / "d.nii", dseg, affine))
    stored = Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0), space="preprocessed")
    subject = prepare_subject(record, stored)
    mask = dseg > 0
    expected = np.where(mask, (image - image[mask].mean()) / image[mask].std(), 0.0)
    torch.testing.assert_close(subject.image[0], torch.from_numpy(expected.astype(np.float32)), atol=1e-5, rtol=1e-5)
    assert torch.equal(subject.labels[0], torch.from_numpy(dseg.astype(np.int16)))
    assert not torch.equal(prepare_subject(record, NATIVE).image, subject.image)  # resample flips the first axis
    # Another grid is the subject's reason to be skipped, not a silent resampling.
    for shape, voxels in ((SHAPE[::-1], (1.0, 1.0, 1.0)), (SHAPE, (2.0, 1.0, 1.0))):
        with pytest.raises(SubjectError, match=r"space = 'preprocessed' resamples nothing"):
            prepare_subject(record, Preprocessing(shape=shape, voxel_size=voxels, space="preprocessed"))
    # The default space keeps the cache keys written before it existed; the other is another key.
    before = {"version": preprocess._ALGORITHM_VERSION, "shape": list(SHAPE), "voxel_size": [1.0, 1.0, 1.0],
              "normalization": "zscore_brain", "use_mask": True}
    assert NATIVE.key() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest() != stored.key()
    with pytest.raises(MedrobustError, match="preprocessing.space: 'mni' is unknown"):
        Preprocessing(shape=SHAPE, voxel_size=(1.0, 1.0, 1.0), space="mni")
