"""Sanity checks over finished cells: beats noise, many-step attacks at least FGSM, effect grows with epsilon."""

from __future__ import annotations

import pandas as pd
import torch

from medrobust.attacks import create_attack
from medrobust.results.metrics import cell_metrics
from medrobust.results.reliability import reliability_flags
from medrobust.results.store import ResultStore

SETTING = {"model": "cnn3d", "checkpoint_sha256": "w", "data_fingerprint": "d", "subjects_sha256": "s",
           "objective": "older", "threat_model": "fixed", "status": "done", "norm": "linf", "unit": "range"}


def cell(cell_id: str, attack: str, epsilon: float, deviation: float, **extra) -> dict:
    params = {"steps": 4, "budget": {"epsilon": epsilon}} if attack != "fgsm" else {"budget": {"epsilon": epsilon}}
    return {**SETTING, "id": cell_id, "attack": attack, "epsilon": epsilon, "params": params,
            "mean_deviation": deviation, "mean_abs_deviation": abs(deviation), "adversarial_mae": 5 + deviation,
            **extra}


def test_consistent_cells_pass():
    cells = pd.DataFrame([cell("n1", "noise", 1e-3, 0.01), cell("f1", "fgsm", 1e-3, 3.0),
                          cell("p1", "pgd", 1e-3, 3.5), cell("p2", "pgd", 2e-3, 7.0), cell("f2", "fgsm", 2e-3, 6.0)])
    assert reliability_flags(cells) == {}


def test_an_attack_no_better_than_noise_is_flagged():
    cells = pd.DataFrame([cell("n1", "noise", 1e-3, 0.5), cell("p1", "pgd", 1e-3, 0.4)])
    flags = reliability_flags(cells)
    assert list(flags) == ["p1"] and "random noise" in flags["p1"][0]


def test_a_many_step_attack_weaker_than_fgsm_is_flagged_within_tolerance():
    cells = pd.DataFrame([cell("f1", "fgsm", 1e-3, 3.0), cell("p1", "pgd", 1e-3, 2.0),
                          cell("f2", "fgsm", 2e-3, 6.0), cell("p2", "pgd", 2e-3, 5.99)])  # 0.01 y: within tolerance
    flags = reliability_flags(cells)
    assert list(flags) == ["p1"] and "weaker than fgsm" in flags["p1"][0]


def test_an_effect_that_shrinks_with_epsilon_is_flagged():
    cells = pd.DataFrame([cell("p1", "pgd", 1e-3, 4.0), cell("p2", "pgd", 2e-3, 3.0), cell("p3", "pgd", 5e-3, 9.0)])
    flags = reliability_flags(cells)
    assert list(flags) == ["p2"] and "smaller epsilon 0.001" in flags["p2"][0]
    # The noise baseline is not an attack: its effect may wander with epsilon.
    noise = pd.DataFrame([cell("n1", "noise", 1e-3, 0.4), cell("n2", "noise", 2e-3, 0.2)])
    assert reliability_flags(noise) == {}


def test_only_comparable_cells_are_compared():
    other_model = {"model": "hybrid", "checkpoint_sha256": "v"}
    younger = {"objective": "younger"}
    cells = pd.DataFrame([cell("f1", "fgsm", 1e-3, 3.0), cell("p1", "pgd", 1e-3, 1.0, **other_model),
                          cell("p2", "pgd", 2e-3, -2.0, **younger), cell("p3", "pgd", 1e-3, -1.0, **younger),
                          cell("x1", "pgd", 2e-3, 0.5, params={"steps": 10, "budget": {}}),
                          cell("t1", "pgd", 1e-3, 0.0, objective="target")])
    # Another model, another objective (younger: -2 y at 2e-3 is stronger than -1 y), another attack
    # configuration and an unchecked objective: nothing to compare, nothing flagged.
    assert reliability_flags(cells) == {}


def test_failed_cells_and_an_empty_store_are_ignored():
    assert reliability_flags(pd.DataFrame()) == {}
    failed = {**cell("p1", "pgd", 1e-3, 0.0), "status": "failed"}
    assert reliability_flags(pd.DataFrame([cell("n1", "noise", 1e-3, 1.0), failed])) == {}


def test_the_store_keeps_the_latest_verdicts(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        store.write_cell("a", run_id, {"model": "m"}, {}, [], 1.0)
        store.write_cell("b", run_id, {"model": "m"}, {}, [], 1.0)
        store.write_reliability({"a": ["does not beat random noise"]})
        assert dict(zip(store.cells()["id"], store.cells()["reliability"], strict=True)) == {
            "a": ["does not beat random noise"], "b": []}
        store.write_reliability({})
        assert list(store.cells()["reliability"]) == [[], []]


class MaskedGradients(torch.nn.Module):
    """A model whose input gradient is zero almost everywhere: it quantizes the image before a linear read-out,
    the textbook case of gradient masking."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, image, features=None):
        quantized = torch.round(image * 4) / 4  # zero gradient, but a real change of output under noise
        return 40 + (quantized * self.weights).flatten(1).sum(1)


def test_a_model_with_masked_gradients_is_flagged():
    model = MaskedGradients()
    images = torch.randn(6, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    ages = torch.full((6,), 40.0)
    budget = {"norm": "linf", "epsilon": 0.05, "unit": "range"}
    rows = []
    for name in ("noise", "fgsm", "pgd"):
        kwargs = {"draws": 8} if name == "noise" else {}
        result = create_attack(name, model, budget=budget, **kwargs)(images, ages=ages)
        metrics = cell_metrics(ages, result.clean_prediction, result.adversarial_prediction, [0.0] * 6, [0.0] * 6,
                               [0.0] * 6, [0.0] * 6)
        rows.append({**cell(name, name, 0.05, 0.0), **metrics, "params": {"budget": budget}})
    flags = reliability_flags(pd.DataFrame(rows))
    # The gradient attacks cannot move a model that hides its gradient; noise can: both are flagged.
    assert set(flags) == {"fgsm", "pgd"}
    assert all("random noise" in reasons[0] for reasons in flags.values())


def test_the_checks_read_each_attacks_declared_role_not_a_list_of_names():
    # An attack of another name that declares itself iterative is held to the one-step attack; a set-level one
    # (a universal perturbation) and one declared a baseline are not; a declared baseline is what others must beat.
    roles = {"fgsm": ("one-step", "batch"), "my-attack": ("iterative", "batch"), "my-universal": ("iterative", "set"),
             "my-noise": ("baseline", "batch")}
    cells = pd.DataFrame([cell("f1", "fgsm", 1e-3, 3.0), cell("m1", "my-attack", 1e-3, 2.0),
                          cell("u1", "my-universal", 1e-3, 1.0), cell("n1", "my-noise", 1e-3, 1.5)])
    flags = reliability_flags(cells, roles)
    assert sorted(flags) == ["m1", "u1"]
    assert "weaker than fgsm" in flags["m1"][0] and "random my-noise" in flags["u1"][0]
    # By default the roles are those the registered attacks declare: the ART and torchattacks PGD backends are
    # iterative, so they are held to fgsm too.
    registered = pd.DataFrame([cell("f1", "fgsm", 1e-3, 3.0), cell("a1", "art-pgd", 1e-3, 2.0),
                               cell("t1", "torchattacks-pgd", 1e-3, 2.0), cell("u1", "universal", 1e-3, 1.0)])
    assert sorted(reliability_flags(registered)) == ["a1", "t1"]
