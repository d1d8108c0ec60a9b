"""Attack cost against its floor, measured side by side: the helpers of the attack-speed benchmarks.

The floor is one forward and one backward pass with respect to the input only (parameters frozen) on the same
batch; for a black-box attack (``square``), which takes no backward pass, it is one forward pass, and its passes
are its forward passes. Every benchmark round times, back to back, the floor, the attack at a short step count
and the attack at its nominal step count (the one pytest-benchmark reports), and the ratios are taken within the
round before the median over rounds, so a load that changes between rounds cancels. Two ratios per attack:

- ``whole``: the whole call divided by (its backward passes x the floor). It includes the fixed passes of the
  call (the clean prediction, where the attack does not take it from its first step, and the final prediction),
  so it depends on the step count; its floor is 1.
- ``marginal``: (nominal call - short call) / ((their difference in backward passes) x the floor): the cost
  of one more step, fixed passes excluded; its floor is 1 as well.

Both are also given from the fastest round of each timing (``*_min``): other work on the machine only ever adds
time, so on a shared CPU the minima are the least disturbed estimate.

Settings come from the environment, so that one benchmark file serves the CPU, a GPU, the demo grid and the
paper's full grid: ``MEDROBUST_BENCH_DEVICE`` (default ``cpu``), ``MEDROBUST_BENCH_GRID`` (``48x56x48``),
``MEDROBUST_BENCH_BATCH`` (8), ``MEDROBUST_BENCH_PRECISION`` (``fp32``, or ``bf16``/``fp16`` under
torch.autocast), ``MEDROBUST_BENCH_ROUNDS`` (5), ``MEDROBUST_BENCH_MODELS`` (``cnn3d,hybrid_e2e``),
``MEDROBUST_BENCH_ATTACKS`` (all; a comma-separated subset of the case labels), ``MEDROBUST_BENCH_THREADS``
(torch's CPU threads; unset: torch's default. On a CPU that other work shares, 1 thread keeps OpenMP's
spin-waiting from swamping the timings) and ``MEDROBUST_BENCH_TABLE`` (a path: the ratio table is also written
there as markdown).

**Against a baseline** (``make speed-compare``): ``MEDROBUST_BENCH_BASELINE`` names the JSON of an earlier run
on the same kind of machine (``machine_kind``: the device's model and the thread count; one committed per kind
in ``tests/speed/baselines``, written by ``make speed-baseline``). A benchmark whose settings match its
baseline's fails when its whole-call ratio (median over rounds) exceeds the baseline's by more than
``MEDROBUST_BENCH_MARGIN`` (default 0.15, i.e. 15 %). Ratios, not times: a host of the same kind that is slower
or faster overall moves the floor and the call alike.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medrobust.errors import MedrobustError
from medrobust.runner.execute import autocast
from medrobust.vocabulary import PRECISIONS

N_FEATURES = 173  # the built-in cohort's context features
# How far a whole-call ratio may grow over its baseline's before the benchmark fails (MEDROBUST_BENCH_MARGIN).
DEFAULT_MARGIN = 0.15
# Every ratio measured in this session, in order: what the terminal summary and the markdown table show.
RESULTS: list[dict] = []


@dataclass(frozen=True)
class Settings:
    device: torch.device
    grid: tuple[int, int, int]
    batch: int
    precision: str
    rounds: int
    models: tuple[str, ...]
    attacks: tuple[str, ...] | None
    threads: int | None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        grid = tuple(int(n) for n in env("MEDROBUST_BENCH_GRID", "48x56x48").lower().split("x"))
        if len(grid) != 3 or min(grid) < 1:
            raise MedrobustError(f"MEDROBUST_BENCH_GRID must be three sizes like 48x56x48, got {grid!r}")
        precision = env("MEDROBUST_BENCH_PRECISION", "fp32")
        if precision not in PRECISIONS:
            raise MedrobustError(f"MEDROBUST_BENCH_PRECISION must be fp32, bf16 or fp16, got {precision!r}")
        attacks, threads = env("MEDROBUST_BENCH_ATTACKS"), env("MEDROBUST_BENCH_THREADS")
        return cls(device=torch.device(env("MEDROBUST_BENCH_DEVICE", "cpu")), grid=grid,
                   batch=int(env("MEDROBUST_BENCH_BATCH", "8")), precision=precision,
                   rounds=int(env("MEDROBUST_BENCH_ROUNDS", "5")),
                   models=tuple(env("MEDROBUST_BENCH_MODELS", "cnn3d,hybrid_e2e").split(",")),
                   attacks=None if not attacks else tuple(attacks.split(",")),
                   threads=None if not threads else int(threads))

    def autocast(self):
        """The context every timed call runs in: the runner's own (nothing for fp32, torch.autocast otherwise)."""
        return autocast(self.device, self.precision)

    def label(self) -> str:
        threads = "" if self.threads is None else f" {self.threads} thread{'s' * (self.threads > 1)}"
        return f"{self.device.type}{threads} {'x'.join(map(str, self.grid))} batch {self.batch} {self.precision}"


def machine_kind(settings: Settings) -> str:
    """The kind of machine a ratio baseline holds for, as a file name: the CPU's model name and its widest vector
    extension (AVX-512 and AVX2 machines differ), or the GPU's name; and the torch threads."""
    if settings.device.type == "cuda":
        model = torch.cuda.get_device_name(settings.device)
    else:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
        flags = set(flags.group(1).split()) if flags else set()
        vector = next((flag for flag in ("avx512f", "avx2") if flag in flags), "")
        model = f"{name.group(1) if name else platform.processor() or platform.machine()} {vector}"
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", model.lower())).strip("-")
    threads = f"{settings.threads}thread" if settings.threads is not None else "default-threads"
    return f"{settings.device.type}-{slug}-{threads}"


def baseline() -> tuple[dict[str, dict], float] | None:
    """The baseline of ``MEDROBUST_BENCH_BASELINE`` (each benchmark's extra_info by its full name) and the margin;
    None when no baseline is asked for."""
    path = os.environ.get("MEDROBUST_BENCH_BASELINE")
    if not path:
        return None
    if not Path(path).is_file():
        raise MedrobustError(f"MEDROBUST_BENCH_BASELINE: no baseline file {path} (make speed-baseline writes the one "
                             f"of this machine kind)")
    benchmarks = json.loads(Path(path).read_text())["benchmarks"]
    margin = float(os.environ.get("MEDROBUST_BENCH_MARGIN", DEFAULT_MARGIN))
    return {bench["fullname"]: bench["extra_info"] for bench in benchmarks}, margin


def check_baseline(fullname: str, row: dict) -> None:
    """Fail when the row's whole-call ratio grew past the baseline's by more than the margin (see the module's
    docstring); record the baseline's ratio in the row. No baseline, or one of other settings: nothing to check."""
    loaded = baseline()
    if loaded is None:
        return
    references, margin = loaded
    reference = references.get(fullname)
    if reference is None or reference.get("settings") != row["settings"] or reference.get("whole_ratio") is None:
        row["baseline_whole_ratio"] = None
        return
    row["baseline_whole_ratio"] = reference["whole_ratio"]
    allowed = reference["whole_ratio"] * (1 + margin)
    assert row["whole_ratio"] <= allowed, (
        f"{row['model']} {row['attack']}: whole call / (passes x floor) {row['whole_ratio']:.3f} against the "
        f"baseline's {reference['whole_ratio']:.3f} (at most {allowed:.3f} with the margin {margin:.0%})")


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_pass(model: torch.nn.Module, images: torch.Tensor, features: torch.Tensor | None) -> Callable[[], None]:
    """One forward and one backward pass with respect to the input only (the model's parameters frozen)."""
    def floor() -> None:
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf, features).sum(), leaf)
    return floor


def forward_pass(model: torch.nn.Module, images: torch.Tensor, features: torch.Tensor | None) -> Callable[[], None]:
    """One forward pass without gradient: the floor of a black-box attack, whose every query is one."""
    def floor() -> None:
        with torch.no_grad():
            model(images, features)
    return floor


def measure(benchmark, settings: Settings, label: str, model_name: str, nominal: Callable[[], int],
            short: Callable[[], int] | None, floor: Callable[[], None]) -> dict:
    """Benchmark ``nominal`` (a call returning the backward passes it made) with the floor and ``short`` (the same
    attack at a smaller step count, or None) timed in the same rounds, just before it; record the ratios in
    ``benchmark.extra_info`` and in RESULTS."""
    device = settings.device
    with settings.autocast():  # warm-up, and the passes each call makes
        floor()
        passes = nominal()
        short_passes = short() if short is not None else None
    floors: list[float] = []
    shorts: list[float] = []

    def setup() -> None:
        with settings.autocast():
            floors.append(timed(floor, device))
            if short is not None:
                shorts.append(timed(short, device))

    def target() -> None:
        with settings.autocast():
            nominal()
        synchronize(device)

    benchmark.pedantic(target, setup=setup, rounds=settings.rounds, iterations=1, warmup_rounds=0)
    calls = list(benchmark.stats.stats.data)
    whole = statistics.median(call / (passes * f) for call, f in zip(calls, floors, strict=True))
    row = {"model": model_name, "attack": label, "settings": settings.label(), "backward_passes": passes,
           "floor_ms": 1e3 * statistics.median(floors), "call_ms": 1e3 * statistics.median(calls),
           "whole_ratio": whole, "marginal_ratio": None, "short_backward_passes": short_passes,
           "rounds": settings.rounds}
    row["whole_ratio_min"] = min(calls) / (passes * min(floors))
    row["marginal_ratio_min"] = None
    if short is not None and passes > short_passes:
        row["marginal_ratio"] = statistics.median((call - s) / ((passes - short_passes) * f)
                                                  for call, s, f in zip(calls, shorts, floors, strict=True))
        row["marginal_ratio_min"] = (min(calls) - min(shorts)) / ((passes - short_passes) * min(floors))
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    check_baseline(benchmark.fullname, row)
    return row


def markdown(rows: list[dict]) -> str:
    """The ratio table: one row per benchmark, ratios to the floor measured in the same rounds."""
    lines = ["| settings | model | attack | passes (backward; forward for a black-box attack) | whole call / (passes "
             "x floor): median, min "
             "| marginal step / floor: median, min (passes) | floor (ms) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        whole = marginal = ""
        if row["whole_ratio"] is not None:
            whole = f"{row['whole_ratio']:.3f}, {row['whole_ratio_min']:.3f}"
            if row.get("baseline_whole_ratio") is not None:
                whole += f" (baseline {row['baseline_whole_ratio']:.3f})"
        if row["marginal_ratio"] is not None:
            marginal = (f"{row['marginal_ratio']:.3f}, {row['marginal_ratio_min']:.3f} "
                        f"({row['short_backward_passes']} -> {row['backward_passes']})")
        lines.append(f"| {row['settings']} | {row['model']} | {row['attack']} | {row['backward_passes']} | "
                     f"{whole} | {marginal} | {row['floor_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the machine kind of these settings: the baseline's file name (make speed-compare)
    print(machine_kind(Settings.from_env()))
