"""Generation speed of the built-in lifespan cohort.

Measures, in one process: the one-off anatomy template build (`load_template`, cold), steady-state rendering
(`CohortGenerator.subjects`, after one warm-up batch) and the whole `synthesize` call including the NIfTI
writing, each for --n subjects at the demo grid unless told otherwise.

Usage: python scripts/speed/cohort.py [--n 200] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

import torch

from medrobust.data.cohort import CohortGenerator, draw_subject, load_template, synthesize
from medrobust.settings import CohortSpec


def _triple(text: str, kind: type) -> tuple:
    parts = [kind(p) for p in text.lower().split("x")]
    return tuple(parts * 3 if len(parts) == 1 else parts)


def measure(spec: CohortSpec) -> dict:
    """Seconds and subjects/s of the template build, steady-state rendering and `synthesize` for `spec`."""
    start = time.perf_counter()
    load_template()
    template_s = time.perf_counter() - start

    generator = CohortGenerator(spec)
    with torch.no_grad():  # warm-up: first-call allocations and thread-pool start-up
        generator.render([draw_subject(spec, i) for i in range(min(spec.batch_size, spec.n))])
    start = time.perf_counter()
    for _ in generator.subjects():
        pass
    render_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        synthesize(os.path.join(folder, "cohort"), spec, progress=False)
        synthesize_s = time.perf_counter() - start

    return {
        "n": spec.n,
        "shape": list(spec.shape),
        "voxel_size_mm": list(spec.voxel_size),
        "batch_size": spec.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "template_build_s": template_s,
        "render_s": render_s,
        "render_subjects_per_s": spec.n / render_s,
        "synthesize_s": synthesize_s,
        "synthesize_subjects_per_s": spec.n / synthesize_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="subjects per measurement")
    parser.add_argument("--shape", default="48x56x48", help="output grid in voxels")
    parser.add_argument("--voxel-size", default="3.5", help="voxel size in mm")
    parser.add_argument("--batch-size", type=int, default=CohortSpec.batch_size)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args()
    spec = dataclasses.replace(CohortSpec(), n=args.n, shape=_triple(args.shape, int),
                               voxel_size=_triple(args.voxel_size, float), batch_size=args.batch_size)
    result = measure(spec)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    grid = "x".join(map(str, spec.shape)) + " @ " + "x".join(f"{v:g}" for v in spec.voxel_size) + " mm"
    print(f"cohort generation, n={spec.n}, {grid}, batch {spec.batch_size}, "
          f"{result['torch_threads']} torch threads, {result['cpus']} CPUs")
    print(f"{'step':<34}{'seconds':>10}{'subjects/s':>12}")
    print(f"{'template build (once per process)':<34}{result['template_build_s']:>10.1f}{'':>12}")
    print(f"{'rendering (steady state)':<34}{result['render_s']:>10.1f}{result['render_subjects_per_s']:>12.1f}")
    print(f"{'synthesize (incl. NIfTI writing)':<34}{result['synthesize_s']:>10.1f}"
          f"{result['synthesize_subjects_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
