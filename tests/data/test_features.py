"""Context features (sex, field strength, regional volumes) and the training-split scaler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medrobust.data.features import FeatureScaler, context_feature_names, context_features
from medrobust.data.index import SubjectError, SubjectRecord
from medrobust.models import create_model


def _record(**kwargs) -> SubjectRecord:
    return SubjectRecord(**{"subject_id": "sub-1", "age": 30.0, "t1_path": Path("t1.nii.gz"), **kwargs})


def test_feature_names_follow_label_ids_and_names():
    names = context_feature_names({2: "shell", 1: "core"}, [2, 1])
    assert names == ["sex", "field_strength", "vol_core", "vol_shell"]
    assert context_feature_names({}, [17, 3]) == ["sex", "field_strength", "vol_3", "vol_17"]
    assert context_feature_names({1: "x", 2: "x"}, [1, 2])[2:] == ["vol_x", "vol_x_2"]


def test_covariates_and_volumes_in_raw_units():
    record = _record(sex="M", field_strength=3.0, dseg_path=Path("d.nii.gz"))
    values = context_features(record, {1: 1.5, 3: 0.25}, [1, 2, 3])
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, [1.0, 3.0, 1.5, 0.0, 0.25])
    female = context_features(_record(sex="F", dseg_path=Path("d")), {1: 2.0}, [1])
    assert female[0] == 0.0 and np.isnan(female[1])


def test_unknowns_are_nan():
    values = context_features(_record(), {}, [1, 2])
    assert np.isnan(values).all()  # no sex, no field strength, no label map


def test_precomputed_features_are_read_and_checked(tmp_path):
    good = tmp_path / "f.tsv"
    good.write_text("vol_shell\tvol_core\tsex\n2,5\t1.0\t1\n")
    record = _record(features_path=good, sex="F", field_strength=1.5)
    values = context_features(record, {}, [1, 2], label_names={1: "core", 2: "shell"})
    # Reordered to the expected names; field strength, absent from the file, comes from the record.
    np.testing.assert_array_equal(values, [1.0, 1.5, 1.0, 2.5])

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sex,field_strength,vol_other\n0,3,1\n")
    with pytest.raises(SubjectError, match=r"wrong\.csv.*vol_core"):
        context_features(_record(features_path=wrong), {}, [1, 2], label_names={1: "core", 2: "shell"})
    two_rows = tmp_path / "two.csv"
    two_rows.write_text("sex,field_strength\n0,3\n1,3\n")
    with pytest.raises(SubjectError, match="one data row"):
        context_features(_record(features_path=two_rows), {}, [])
    text = tmp_path / "text.csv"
    text.write_text("sex,field_strength\nabc,3\n")
    with pytest.raises(SubjectError, match="abc"):
        context_features(_record(features_path=text), {}, [])


def _standardize(scaler: FeatureScaler, features) -> torch.Tensor:
    """Standardize as a model does with this scaler (models hold the scaler; see BrainAgeModel)."""
    model = create_model("features_mlp", feature_names=[f"f{i}" for i in range(len(scaler.mean))])
    model.set_feature_scaling(scaler.mean, scaler.std)
    return model.standardize_features(torch.as_tensor(np.asarray(features), dtype=torch.float32))


def test_scaler_standardizes_and_imputes_with_training_mean():
    train = np.array([[0.0, 5.0, 1.0], [2.0, 5.0, np.nan], [4.0, 5.0, 3.0]], dtype=np.float32)
    scaler = FeatureScaler.fit(train)
    np.testing.assert_allclose(scaler.mean, [2.0, 5.0, 2.0])
    np.testing.assert_allclose(scaler.std, [np.sqrt(8 / 3), 1.0, 1.0])  # constant feature -> std 1
    scaled = _standardize(scaler, train)
    torch.testing.assert_close(scaled[:, 0].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert scaled[1, 2] == 0.0  # NaN imputed with the training mean
    torch.testing.assert_close(_standardize(scaler, [[2.0, 7.0, float("nan")]]), torch.tensor([[0.0, 2.0, 0.0]]))


def test_scaler_is_fitted_on_training_rows_only():
    train = np.array([[10.0], [12.0]])
    test = np.array([[100.0], [11.0]])
    scaler = FeatureScaler.fit(train)
    torch.testing.assert_close(_standardize(scaler, test)[:, 0], torch.tensor([89.0, 0.0]))  # mean 11, std 1
    assert not np.allclose(FeatureScaler.fit(np.vstack([train, test])).mean, scaler.mean)


def test_scaler_handles_an_all_unknown_feature():
    scaler = FeatureScaler.fit(np.array([[np.nan, 1.0], [np.nan, 3.0]]))
    assert scaler.mean[0] == 0.0 and scaler.std[0] == 1.0
    assert _standardize(scaler, [[np.nan, 2.0]])[0, 0] == 0.0
