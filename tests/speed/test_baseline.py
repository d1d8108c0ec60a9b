"""The timing ratios' regression check against a baseline (``ratios.check_baseline``, ``make speed-compare``): no
timing here, the check's own logic on made-up figures, so it runs in the normal suite."""

from __future__ import annotations

import json

import pytest
import torch
from ratios import Settings, check_baseline, machine_kind

from medrobust.errors import MedrobustError

SETTINGS = "cpu 1 thread 48x56x48 batch 8 fp32"
NAME = "tests/speed/test_attack_speed.py::test_attack[cnn3d-pgd-linf]"


def _row(ratio: float, settings: str = SETTINGS) -> dict:
    return {"model": "cnn3d", "attack": "pgd-linf", "settings": settings, "whole_ratio": ratio}


@pytest.fixture
def baseline(tmp_path, monkeypatch):
    path = tmp_path / "kind.json"
    path.write_text(json.dumps({"benchmarks": [{"fullname": NAME, "extra_info": _row(1.10)}]}))
    monkeypatch.setenv("MEDROBUST_BENCH_BASELINE", str(path))
    monkeypatch.setenv("MEDROBUST_BENCH_MARGIN", "0.15")
    return path


def test_a_ratio_within_the_margin_passes_and_one_beyond_it_fails(baseline) -> None:
    row = _row(1.10 * 1.15 - 1e-9)
    check_baseline(NAME, row)
    assert row["baseline_whole_ratio"] == 1.10
    with pytest.raises(AssertionError, match="1.300 against the baseline's 1.100"):
        check_baseline(NAME, _row(1.30))


def test_benchmarks_the_baseline_does_not_hold_are_not_compared(baseline) -> None:
    other_settings = _row(9.0, settings="cpu 2 threads 48x56x48 batch 8 fp32")
    check_baseline(NAME, other_settings)
    assert other_settings["baseline_whole_ratio"] is None
    unknown = _row(9.0)
    check_baseline(NAME.replace("pgd-linf", "cw"), unknown)
    assert unknown["baseline_whole_ratio"] is None


def test_without_a_baseline_nothing_is_checked_and_a_missing_file_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MEDROBUST_BENCH_BASELINE", raising=False)
    row = _row(9.0)
    check_baseline(NAME, row)
    assert "baseline_whole_ratio" not in row
    monkeypatch.setenv("MEDROBUST_BENCH_BASELINE", str(tmp_path / "none.json"))
    with pytest.raises(MedrobustError, match="none.json"):
        check_baseline(NAME, row)


def test_the_machine_kind_names_the_device_and_the_threads() -> None:
    settings = Settings(torch.device("cpu"), (48, 56, 48), 8, "fp32", 5, ("cnn3d",), None, 1)
    kind = machine_kind(settings)
    assert kind.startswith("cpu-") and kind.endswith("-1thread")
    assert kind == kind.lower() and " " not in kind and "(" not in kind
