"""Figures of the built-in lifespan cohort for docs/cohort.md.

- cohort_ages.png: one subject draw rendered at ages 10-90 (mid-slices), at a fine grid and at the demo grid.
- cohort_volumes.png: compartment volumes read from the label maps of a generated cohort against the lifespan
  target curves the generator aims at.

Usage: python scripts/docs/cohort_figures.py --out docs/images
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medrobust.data.cohort import (  # noqa: E402
    CSF_LABEL,
    VENTRICLE_LABEL,
    WHITE_MATTER_LABEL,
    CohortGenerator,
    CohortSpec,
    draw_subject,
    lifespan_curve,
    load_template,
)

AGES = (10, 30, 50, 70, 90)
FINE = CohortSpec(n=1, shape=(96, 112, 96), voxel_size=(1.75, 1.75, 1.75))
DEMO = CohortSpec(n=1)
# AAL3 grey-matter parcels are numbered 1-170; 200-202 are the tissue labels the generator adds.
GREY_LABELS = (1, 170)


def _slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Mid-slices of a RAS [X, Y, Z] volume, oriented for display with origin='lower'."""
    x, y, z = (n // 2 for n in volume.shape)
    return {"axial": volume[:, :, z].T, "coronal": volume[:, y, :].T, "sagittal": volume[x, :, :].T}


def _window(volume: np.ndarray) -> tuple[float, float]:
    """Robust display window of one image: from the background's median to the 99.5th percentile."""
    return float(np.percentile(volume, 50)), float(np.percentile(volume, 99.5))


def _render_ages(spec: CohortSpec, subject: int) -> list[np.ndarray]:
    """One subject draw rendered at each of AGES (chronological, anatomical and intensity age all set)."""
    generator = CohortGenerator(spec)
    draw = draw_subject(spec, subject)
    images = []
    for age in AGES:
        aged = dataclasses.replace(draw, age=float(age), anatomy_age=float(age), intensity_age=float(age))
        with torch.no_grad():
            image, _ = generator.render([aged])
        images.append(image[0].numpy())
    return images


def figure_ages(out: Path, subject: int) -> Path:
    """cohort_ages.png: rows axial, coronal, sagittal at the fine grid, then coronal at the demo grid."""
    fine = _render_ages(FINE, subject)
    demo = _render_ages(DEMO, subject)
    rows = [("axial", fine, FINE), ("coronal", fine, FINE), ("sagittal", fine, FINE), ("coronal", demo, DEMO)]
    fig, axes = plt.subplots(len(rows), len(AGES), figsize=(2.3 * len(AGES), 2.5 * len(rows)),
                             gridspec_kw={"height_ratios": [1.0, 1.0, 1.0, 1.0]})
    for r, (view, images, spec) in enumerate(rows):
        grid = "x".join(map(str, spec.shape)) + f" @ {spec.voxel_size[0]:g} mm"
        for c, (age, image) in enumerate(zip(AGES, images, strict=True)):
            low, high = _window(image)
            ax = axes[r, c]
            ax.imshow(_slices(image)[view], cmap="gray", origin="lower", vmin=low, vmax=high,
                      interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"age {age}", fontsize=12)
            if c == 0:
                ax.set_ylabel(f"{view}\n{grid}", fontsize=9)
    fig.suptitle(f"One subject draw (sub-{subject + 1:04d}, seed 0) rendered at five ages", fontsize=12)
    fig.tight_layout()
    path = out / "cohort_ages.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _realised_volumes(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Ages, label-map compartment volumes (mL) and head-volume scale of a cohort at the demo grid."""
    spec = dataclasses.replace(DEMO, n=n, seed=seed)
    generator = CohortGenerator(spec)
    voxel_ml = float(np.prod(spec.voxel_size)) / 1e3
    ages, head, volumes = [], [], {"grey": [], "white": [], "ventricles": [], "csf": []}
    for draw, _, labels in generator.subjects():
        counts = np.bincount(labels.ravel(), minlength=256) * voxel_ml
        ages.append(draw.age)
        head.append(float(np.prod(draw.head_scale)))
        volumes["grey"].append(counts[GREY_LABELS[0]:GREY_LABELS[1] + 1].sum())
        volumes["white"].append(counts[WHITE_MATTER_LABEL])
        volumes["ventricles"].append(counts[VENTRICLE_LABEL])
        volumes["csf"].append(counts[CSF_LABEL])
    return np.array(ages), {k: np.array(v) for k, v in volumes.items()}, np.array(head)


def _target_volumes(ages: np.ndarray) -> dict[str, np.ndarray]:
    """The generator's targets (mL, template head size): lifespan curves times the template's volumes."""
    template = load_template()
    v = template.volumes_ml
    fields = template.fields[0]
    intracranial = float(torch.maximum(fields[4], (fields[0] > 0).float()).sum()) / 1e3
    cortex = (v["brain"] - v["white"]) * lifespan_curve("cortical_grey", ages)
    deep = v["deep_grey"] * lifespan_curve("subcortical_grey", ages)
    ventricles = v["ventricles"] * lifespan_curve("ventricles", ages)
    white = (v["white"] - v["ventricles"] - v["deep_grey"]) * lifespan_curve("white_matter", ages)
    return {"grey": cortex + deep, "white": white, "ventricles": ventricles,
            "csf": intracranial - (cortex + deep + white + ventricles)}


def figure_volumes(out: Path, n: int, seed: int) -> Path:
    """cohort_volumes.png: realised volumes per subject (dots) and the target curves (lines)."""
    ages, realised, head = _realised_volumes(n, seed)
    curve_ages = np.linspace(DEMO.age_range[0], DEMO.age_range[1], 200)
    targets = _target_volumes(curve_ages)
    # Targets are at the template's head size; subjects' heads are scaled, on average by this factor.
    scale = float(head.mean())
    titles = {"grey": "Total grey matter (AAL3 labels 1-170)", "white": "White matter (label 200)",
              "ventricles": "Lateral ventricles (label 201)", "csf": "Extracerebral CSF (label 202)"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        ax.scatter(ages, realised[name], s=9, alpha=0.55, color="tab:blue", label="label map (realised)")
        ax.plot(curve_ages, targets[name] * scale, color="tab:red", lw=2, label="target (lifespan curve)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("age (years)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("volume (mL)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Compartment volumes of {n} generated subjects (seed {seed}, "
                 f"{'x'.join(map(str, DEMO.shape))} @ {DEMO.voxel_size[0]:g} mm) against the generator's targets "
                 f"(template volumes x lifespan curve x mean head-volume scale {scale:.3f})", fontsize=10)
    fig.tight_layout()
    path = out / "cohort_volumes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder for the PNG files")
    parser.add_argument("--n", type=int, default=300, help="subjects in the volume figure")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort in the volume figure")
    parser.add_argument("--subject", type=int, default=0, help="index of the subject draw in the age figure")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in (figure_ages(args.out, args.subject), figure_volumes(args.out, args.n, args.seed)):
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
