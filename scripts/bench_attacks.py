"""Cost of the attacks against their floor: one forward + backward pass w.r.t. the input on the same batch.

    python scripts/bench_attacks.py [--device auto] [--batch 8] [--shape 48x56x48] [--rounds 5]

For cnn3d and hybrid_e2e (random init: speed does not depend on the weights) at the demo grid, it times, interleaved
in rounds on the same batch, (a) the floor: one forward and one backward pass with respect to the image only,
parameters frozen, and (b) each attack call; it reports medians and the attack's time per model pass pair,
i.e. (attack time) / (floor time x backward passes the attack made). On CUDA it synchronizes around each timing.
Prints a markdown table; --json writes the raw figures.

The pytest-benchmark benchmarks in tests/benchmarks (``make bench-attacks``; ``benchmarks/gpu.sh`` on a GPU) cover
more attacks and report, besides this whole-call ratio, the marginal cost of one more step, which excludes the
fixed clean and final passes (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from medrobust.attacks import Budget, create_attack
from medrobust.devices import resolve_device
from medrobust.environment import describe_environment
from medrobust.models import create_model

N_FEATURES = 173  # the built-in cohort's context features


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", default="48x56x48")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    shape = tuple(int(s) for s in args.shape.split("x"))
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, *shape, device=device)
    features = torch.rand(args.batch, N_FEATURES, device=device) * 10
    names = [f"f{i}" for i in range(N_FEATURES)]
    attacks = {
        "fgsm linf": ("fgsm", {}),
        "pgd linf, paper (4 x eps/4)": ("pgd", {"steps": 4, "step_size": 0.25, "random_start": False}),
        "pgd linf, 10 steps": ("pgd", {"steps": 10}),
        "pgd l2, 10 steps": ("pgd", {"steps": 10, "budget": Budget("l2", 0.5, "range")}),
    }
    rows = []
    for model_name in ("cnn3d", "hybrid_e2e"):
        kwargs = {"input_shape": shape, "voxel_size": (3.5, 3.5, 3.5)}
        if model_name != "cnn3d":
            kwargs["feature_names"] = names
        model = create_model(model_name, **kwargs).to(device).eval()
        model.requires_grad_(False)
        inputs = features if model_name != "cnn3d" else None

        def floor(model=model, inputs=inputs):
            x = images.clone().requires_grad_(True)
            torch.autograd.grad(model(x, inputs).sum(), x)

        built = {label: create_attack(name, model, **params) for label, (name, params) in attacks.items()}
        backward = {label: attack(images, inputs).backward for label, attack in built.items()}  # warm-up
        floor()
        times: dict[str, list[float]] = {"floor": [], **{label: [] for label in built}}
        for _ in range(args.rounds):
            times["floor"].append(_timed(floor, device))
            for label, attack in built.items():
                times[label].append(_timed(lambda attack=attack, inputs=inputs: attack(images, inputs), device))
        floor_s = statistics.median(times["floor"])
        for label in built:
            seconds = statistics.median(times[label])
            rows.append({"model": model_name, "attack": label, "batch": args.batch, "seconds": seconds,
                         "floor_seconds": floor_s, "backward": backward[label],
                         "ratio_per_backward": seconds / (floor_s * backward[label])})
    environment = describe_environment(device)
    print(f"device: {environment['device_name']} ({device}), torch {environment['torch']}, grid {args.shape}, "
          f"batch {args.batch}, median of {args.rounds} interleaved rounds")
    print("| model | attack | backward passes | attack time / (floor x passes) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['attack']} | {row['backward']} | {row['ratio_per_backward']:.2f} |")
    print("floor (one forward + backward w.r.t. the input): "
          + ", ".join(f"{m} {statistics.median([r['floor_seconds'] for r in rows if r['model'] == m]) * 1e3:.1f} ms"
                      for m in ("cnn3d", "hybrid_e2e")))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
