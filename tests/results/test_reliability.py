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


# ---------------------------------------------------------------- the checks on deliberately broken models, end to end

BROKEN_GRID = (16, 16, 16)


class Linear(torch.nn.Module):
    """age = 40 + w . x on the fixture's 16^3 grid: a healthy model (its gradient is the whole story)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(1, 1, *BROKEN_GRID, generator=generator) / 64)

    def read(self, x, w=None):
        return (x * (self.w if w is None else w)).flatten(1).sum(dim=1)

    def forward(self, x):
        return 40.0 + self.read(x)


class Rounded(Linear):
    """Fully masked: the read-out rounded to whole years, a zero gradient everywhere."""

    def forward(self, x):
        return 40.0 + torch.round(self.read(x))


class Detached(Linear):
    """A detach inside: the output has no autograd graph from the image."""

    def forward(self, x):
        return 40.0 + self.read(x).detach()


class PartlyMasked(Linear):
    """Partly masked: a faint linear path the gradient sees, beside a strong path along other weights quantized to
    steps of 0.01 y, which the gradient does not see (zero almost everywhere) and a search over the outputs does."""

    def __init__(self) -> None:
        super().__init__()
        self.v = torch.nn.Parameter(torch.randn(1, 1, *BROKEN_GRID, generator=torch.Generator().manual_seed(9)) / 64)

    def forward(self, x):
        return 40.0 + 0.005 * self.read(x) + torch.floor(100 * self.read(x, self.v)) / 100


def flags_of(model, root, tmp_path) -> dict[str, list[str]]:
    """The reliability reasons per attack of one evaluate() of ``model`` on the fixture's dataset."""
    import medrobust

    members = [{"name": "apgd", "steps": 20}, {"name": "square", "queries": 200}]
    attacks = ["noise", "fgsm", {"name": "pgd", "steps": 10}, {"name": "square", "queries": 200},
               {"name": "ensemble", "members": members}]
    result = medrobust.evaluate(model, root, input_shape=BROKEN_GRID, voxel_size=(1, 1, 1), split="train", count=3,
                                attacks=attacks, budgets=[{"norm": "linf", "epsilon": 0.05}], batch_size=3,
                                out=tmp_path / type(model).__name__, progress=False, report=False)
    assert not result.failed, result.failed  # a broken model is flagged, never a crash
    return {row["attack"]: list(row["reliability"]) for _, row in result.cells.iterrows()}


def checks_fired(reasons: list[str]) -> set[str]:
    return {reason.split(":", 1)[0] for reason in reasons}


def test_each_broken_model_is_flagged_by_the_check_that_should_catch_it_and_a_healthy_one_is_not(tmp_path) -> None:
    import shutil
    from pathlib import Path

    root = tmp_path / "dataset"
    shutil.copytree(Path(__file__).resolve().parents[1] / "runner" / "fixtures" / "pre_redesign" / "dataset", root)
    healthy = flags_of(Linear(), root, tmp_path)
    assert healthy == {name: [] for name in healthy}, healthy
    for broken in (Rounded(), Detached()):
        flags = flags_of(broken, root, tmp_path)
        for attack in ("fgsm", "pgd", "ensemble"):
            assert "gradient" in checks_fired(flags[attack]), (type(broken).__name__, attack, flags[attack])
        assert "unbounded" in checks_fired(flags["ensemble"]), flags["ensemble"]
        assert any("suggests" in reason for reason in flags["pgd"])
    partly = flags_of(PartlyMasked(), root, tmp_path)
    # Its gradient is finite and non-zero: what catches it is the black-box attack beating the gradient attacks,
    # and the ensemble's unbounded probe falling far short.
    for attack in ("fgsm", "pgd"):
        assert "black-box" in checks_fired(partly[attack]), (attack, partly[attack])
        assert "gradient" not in checks_fired(partly[attack])
    assert "unbounded" in checks_fired(partly["ensemble"]), partly["ensemble"]


def test_a_short_attack_that_cannot_reach_its_budget_is_told_so_not_called_masked() -> None:
    cells = pd.DataFrame([cell("f1", "fgsm", 1e-3, 3.0),
                          cell("p1", "pgd", 1e-3, 1.5, params={"steps": 2, "step_size": 0.25, "budget": {}})])
    (reason,) = reliability_flags(cells)["p1"]
    assert reason.startswith("one-step: weaker than fgsm") and "steps x step_size < 1" in reason
    assert "masked" not in reason


def test_an_ensemble_weaker_than_another_attack_and_recorded_gradient_faults_are_flagged() -> None:
    cells = pd.DataFrame([cell("p1", "pgd", 1e-3, 3.0), cell("e1", "ensemble", 1e-3, 2.0),
                          cell("s1", "square", 1e-3, 0.5, **{"zero_gradient_subjects": 2, "n": 5})])
    flags = reliability_flags(cells)
    assert checks_fired(flags["e1"]) == {"ensemble"} and "add it to the ensemble's members" in flags["e1"][0]
    assert checks_fired(flags["s1"]) == {"gradient"} and "2 of 5 subjects had a zero input gradient" in flags["s1"][0]
    assert "p1" not in flags


def test_a_beaten_certificate_is_flagged_and_a_kept_one_is_not():
    kept = cell("s1", "pgd", 0.5, 1.0, certified_n=20, certificate_beaten=0)
    beaten = cell("s2", "pgd", 1.0, 2.0, certified_n=20, certificate_beaten=2)
    flags = reliability_flags(pd.DataFrame([kept, beaten]))
    assert list(flags) == ["s2"] and flags["s2"][0].startswith("certificate: 2 of 20 certified subjects")
