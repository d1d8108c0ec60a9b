"""Attack speed: each attack's time per backward pass over the floor, one forward and one backward pass with
respect to the input on the same batch, measured in the same rounds (``ratios.py`` defines both ratios).

Skipped in the normal run (``--benchmark-skip``); ``make speed-attacks`` runs them with ``--benchmark-only`` and
writes the JSON (the ratios are in each benchmark's ``extra_info``) and a markdown table. Models have random
weights: speed does not depend on them.
"""

from __future__ import annotations

import pytest
import torch
from ratios import N_FEATURES, RESULTS, Settings, floor_pass, forward_pass, measure

from medrobust.attacks import Budget, attack_entrypoint, create_attack
from medrobust.attacks.extractors import SegmenterVolumes
from medrobust.models import create_model
from medrobust.models.segmenter import create_segmenter

L2 = Budget("l2", 1.0, "range")
# label: (registry name, arguments, the argument that counts steps, nominal and short counts, fit on a set).
CASES: dict[str, tuple[str, dict, str | None, int, int, bool]] = {
    "fgsm": ("fgsm", {}, None, 1, 0, False),
    "pgd-linf": ("pgd", {}, "steps", 10, 5, False),
    "pgd-l2": ("pgd", {"budget": L2}, "steps", 10, 5, False),
    "bim-paper": ("bim", {}, "steps", 4, 2, False),
    "apgd-linf": ("apgd", {}, "steps", 20, 10, False),
    # The paper's universal attack (sign vote, 0.005 of the range, unclipped, strict) and the summed-gradient
    # one, fitted over a set of two mini-batches: one step is one epoch, two backward passes.
    "universal-sign": ("universal", {"algorithm": "sign", "budget": Budget("linf", 0.005, "range"), "clip": "none",
                                     "keep_best": False}, "steps", 8, 4, True),
    "universal-pgd": ("universal", {"algorithm": "pgd", "budget": Budget("linf", 0.005, "range"), "clip": "none",
                                    "keep_best": False}, "steps", 8, 4, True),
    "cw": ("cw", {"budget": L2, "search_steps": 1}, "iterations", 10, 5, False),
    # Black-box: every query is one forward pass; measured against a forward pass.
    "square": ("square", {}, "queries", 100, 50, False),
    # The peers at equal work, side by side with ours: the same steps of the same size, no random start, and
    # each call includes the forward pass that gives the adversarial prediction (the peers' callers pay for it
    # too: a benchmark needs it). ART's regressor attacks (art-*) and torchattacks' PGD run behind our wrappers,
    # which add the clean and final predictions as ours make them; `test_plain_loop` is the hand-written floor.
    "peers: ours pgd-linf": ("pgd", {"random_start": False}, "steps", 10, 5, False),
    "peers: ours pgd-l2": ("pgd", {"budget": L2, "random_start": False}, "steps", 10, 5, False),
    "peers: art-fgsm": ("art-fgsm", {}, None, 1, 0, False),
    "peers: art-pgd-linf": ("art-pgd", {}, "steps", 10, 5, False),
    "peers: art-pgd-l2": ("art-pgd", {"budget": L2}, "steps", 10, 5, False),
    "peers: torchattacks-pgd-linf": ("torchattacks-pgd", {"random_start": False}, "steps", 10, 5, False),
}
# The hybrid where it adds something: the attacks every grid runs.
HYBRID_CASES = ("pgd-linf", "bim-paper", "peers: ours pgd-linf", "peers: art-pgd-linf", "peers: torchattacks-pgd-linf")
SETTINGS = Settings.from_env()


def _cases() -> list[tuple[str, str]]:
    chosen = [case for case in CASES if SETTINGS.attacks is None or case in SETTINGS.attacks]
    return [(model, case) for model in SETTINGS.models for case in chosen
            if model == "cnn3d" or case in HYBRID_CASES]


@pytest.fixture(scope="module")
def workload(request, bench_settings: Settings):
    """One model (random weights, parameters frozen) at the grid, a batch and a second batch (a universal set)."""
    name, settings = request.param, bench_settings
    kwargs = {"input_shape": settings.grid, "voxel_size": (3.5, 3.5, 3.5)}
    if name != "cnn3d":
        kwargs["feature_names"] = [f"vol_{i}" for i in range(N_FEATURES)]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(settings.device).eval()
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        images = torch.randn(settings.batch, 1, *settings.grid, generator=generator).to(settings.device)
        features = None
        if name != "cnn3d":
            features = (torch.rand(settings.batch, N_FEATURES, generator=generator) * 10).to(settings.device)
        batches.append((images, features))
    return name, model, batches


@pytest.mark.parametrize("workload", SETTINGS.models, indirect=True)
def test_floor(benchmark, bench_settings: Settings, workload) -> None:
    name, model, batches = workload
    images, features = batches[0]
    floor = floor_pass(model, images, features)
    with bench_settings.autocast():
        floor()
        benchmark.pedantic(lambda: _synchronized(floor, bench_settings), rounds=bench_settings.rounds,
                           iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    row = {"model": name, "attack": "floor: forward + backward w.r.t. the input", "settings": bench_settings.label(),
           "backward_passes": 1, "floor_ms": 1e3 * seconds, "call_ms": 1e3 * seconds, "whole_ratio": None,
           "whole_ratio_min": None, "marginal_ratio": None, "marginal_ratio_min": None,
           "short_backward_passes": None, "rounds": bench_settings.rounds}
    benchmark.extra_info.update(row)
    RESULTS.append(row)


@pytest.mark.parametrize(("workload", "case"), _cases(), indirect=["workload"])
def test_attack(benchmark, bench_settings: Settings, workload, case: str) -> None:
    name, model, batches = workload
    attack_name, arguments, counter, nominal, short, fits = CASES[case]
    images, features = batches[0]
    black_box = attack_entrypoint(attack_name).role == "black-box"

    def call(count: int):
        attack = create_attack(attack_name, model, **arguments, **({counter: count} if counter else {}))
        if fits:
            def run() -> int:
                attack.fit([(images_, features_, None, None) for images_, features_ in batches])
                return attack.fit_counters[1]
        else:
            def run() -> int:
                result = attack(images, features)
                return result.forward if black_box else result.backward
        return run

    floor = (forward_pass if black_box else floor_pass)(model, images, features)
    row = measure(benchmark, bench_settings, case, name, call(nominal), call(short) if counter else None, floor)
    assert row["whole_ratio"] > 0


@pytest.mark.parametrize("workload", SETTINGS.models, indirect=True)
def test_plain_loop(benchmark, bench_settings: Settings, workload) -> None:
    """A hand-written l-inf PGD loop (10 steps of epsilon/4 from the clean image, sign step, clamp to the ball)
    plus the forward pass of its result: what any implementation must at least spend."""
    name, model, batches = workload
    images, features = batches[0]
    radius = 0.002 * (images.amax() - images.amin())

    def loop(steps: int):
        def run() -> int:
            adversarial = images.clone()
            for _ in range(steps):
                leaf = adversarial.requires_grad_(True)
                grad, = torch.autograd.grad(model(leaf, features).sum(), leaf)
                step = adversarial.detach() + 0.25 * radius * grad.sign()
                adversarial = (images + (step - images).clamp(-radius, radius)).detach()
            with torch.no_grad():
                model(adversarial, features)
            return steps
        return run

    row = measure(benchmark, bench_settings, "peers: plain loop pgd-linf", name, loop(10), loop(5),
                  floor_pass(model, images, features))
    assert row["whole_ratio"] > 0


# Under `recomputed` with a segmenter in the loop: the floor is one forward and backward pass through the segmenter
# and the model (image -> segmenter -> volumes -> model), and an attack step must stay near it as elsewhere.
SEGMENTER_CASES = ("pgd-linf", "bim-paper")


@pytest.fixture(scope="module")
def segmenter_workload(bench_settings: Settings):
    """hybrid_e2e and a seg_unet of the built-in cohort's size (21 classes) at the grid (random weights, frozen),
    a batch, and the segmenter extractor of that batch."""
    settings = bench_settings
    torch.manual_seed(0)
    names = [f"vol_{i}" for i in range(N_FEATURES)]
    model = create_model("hybrid_e2e", input_shape=settings.grid, voxel_size=(3.5, 3.5, 3.5), feature_names=names)
    segmenter = create_segmenter("seg_unet", input_shape=settings.grid, voxel_size=(3.5, 3.5, 3.5),
                                 region_names=[str(i) for i in range(21)])
    for network in (model, segmenter):
        network.to(settings.device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(settings.batch, 1, *settings.grid, generator=generator).to(settings.device)
    features = (torch.rand(settings.batch, N_FEATURES, generator=generator) * 10 + 1).to(settings.device)
    return model, images, features, SegmenterVolumes(segmenter, names, images, features)


@pytest.mark.parametrize("case", SEGMENTER_CASES)
def test_recomputed_through_a_segmenter(benchmark, bench_settings: Settings, segmenter_workload, case: str) -> None:
    model, images, features, extractor = segmenter_workload
    attack_name, arguments, counter, nominal, short, _ = CASES[case]

    def call(count: int):
        attack = create_attack(attack_name, model, threat_model="recomputed", **arguments, **{counter: count})
        return lambda: attack(images, features, extractor=extractor).backward

    def floor() -> None:
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf, extractor(leaf)).sum(), leaf)

    row = measure(benchmark, bench_settings, f"recomputed (segmenter): {case}", "hybrid_e2e", call(nominal),
                  call(short), floor)
    assert row["whole_ratio"] > 0


def _synchronized(call, settings: Settings) -> None:
    call()
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
