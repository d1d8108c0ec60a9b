"""Pass counts as regression checks that cannot flake: every registered attack, at fixed settings on a toy model,
makes exactly the model forward passes, backward passes and whole-volume kernels (ATen operators whose output is
as large as the batch of images: a projection, a step, a copy) that `pass_counts.json` records. An algorithmic
slowdown (an extra pass, an extra volume-sized operation per step) changes a count and fails here, on any machine,
loaded or not; timing stays with the benchmarks (tests/speed).

After a deliberate change, refresh the table with ``MEDROBUST_UPDATE_PASS_COUNTS=1 pytest
tests/attacks/test_pass_counts.py`` and say in the commit why the counts moved. The counts are those of the
pinned torch (CI installs torch 2.13.0): another torch may decompose an operator differently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medrobust.attacks import attack_entrypoint, create_attack
from medrobust.attacks.checks import BUDGETS, quick_kwargs, toy_inputs, toy_model

TABLE = Path(__file__).with_name("pass_counts.json")
UPDATE = os.environ.get("MEDROBUST_UPDATE_PASS_COUNTS") == "1"


class _VolumeKernels(TorchDispatchMode):
    """Counts the ATen operators whose output holds at least ``size`` elements (views and aliases left out)."""

    VIEWS = ("view", "detach", "unsqueeze", "expand", "alias", "profiler", "scalar_tensor", "_to_copy", "t.default")

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if not any(word in str(func) for word in self.VIEWS) and any(
                isinstance(t, torch.Tensor) and t.numel() >= self.size for t in outputs):
            self.count += 1
        return out


def measure(name: str, norm: str) -> dict:
    """The model's forward and backward passes and the whole-volume kernels of one call of the attack ``name`` at
    the contract's budget of ``norm`` and its quick settings, on the toy cnn3d's batch of four 12^3 images."""
    torch.manual_seed(0)
    model = toy_model("cnn3d")
    images, _, ages, mask = toy_inputs("cnn3d")
    passes = {"forward": 0, "backward": 0}

    def count_backward(_):
        passes["backward"] += 1

    def count(module, args, output):
        passes["forward"] += 1
        if output.requires_grad:
            output.register_hook(count_backward)

    kwargs = {"budget": BUDGETS[norm], "objective": "older", "seed": 0, **quick_kwargs(name)}
    attack = create_attack(name, model, **kwargs)
    handle = model.register_forward_hook(count)
    try:
        with _VolumeKernels(images.numel()) as kernels:
            attack(images, None, ages, mask)
    finally:
        handle.remove()
    return {**passes, "volume_kernels": kernels.count}


def _cases() -> list:
    from medrobust.attacks import list_attacks
    from medrobust.attacks.checks import missing_package

    cases = []
    for name in list_attacks():
        reason = missing_package(name)
        for norm in attack_entrypoint(name).norms:
            cases.append(pytest.param(name, norm, id=f"{name}-{norm}",
                                      marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return cases


def test_the_table_covers_every_registered_attack_and_norm() -> None:
    if UPDATE:
        pytest.skip("the table is being rewritten")
    expected = {f"{param.values[0]}/{param.values[1]}" for param in _cases()}
    assert set(json.loads(TABLE.read_text())) == expected


@pytest.mark.parametrize(("name", "norm"), _cases())
def test_an_attack_makes_exactly_its_recorded_passes(name: str, norm: str) -> None:
    counts = measure(name, norm)
    assert counts["forward"] > 0
    key = f"{name}/{norm}"
    if UPDATE:
        table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
        table[key] = counts
        TABLE.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
        return
    assert counts == json.loads(TABLE.read_text())[key], (
        f"{key}: passes and kernels moved (see this module's docstring to refresh the table on purpose)")
    assert measure(name, norm) == counts  # the same call twice: the counts are exact, not a sample
