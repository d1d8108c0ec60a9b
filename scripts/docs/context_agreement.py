"""How well the differentiable soft volumes (threat model `recomputed`) agree with the label-map volumes.

    python scripts/docs/context_agreement.py --data runs/demo/cohort [--n 200]

For each regional-volume feature, the Pearson correlation over subjects between the raw soft volume of the clean
image (tissue probability summed over the region's voxels on the model grid, times the voxel volume, in mL) and
the feature itself (the region's volume counted on the native label map). Prints a markdown summary.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from medrobust.attacks.extractors import SoftVolumes
from medrobust.data import load_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/demo/cohort")
    parser.add_argument("--n", type=int, default=200, help="subjects (the first n in id order)")
    args = parser.parse_args()
    _, preprocessing, data = load_prepared(args.data, progress=False)
    data = data.subset(data.subject_ids[: args.n])
    if data.labels is None:
        raise SystemExit(f"{args.data}: some subjects have no label map")
    voxel_ml = math.prod(preprocessing.voxel_size) / 1000
    soft = torch.cat([
        SoftVolumes(data.labels[i:i + 25], data.feature_labels, data.feature_names, data.images[i:i + 25],
                    data.features[i:i + 25]).clean_soft
        for i in range(0, len(data.subject_ids), 25)]).double() * voxel_ml
    rows = []
    for column, (name, label) in enumerate(zip(data.feature_names, data.feature_labels, strict=True)):
        if label is None or label >= soft.shape[1]:
            continue
        measured, counted = soft[:, label].numpy(), data.features[:, column].double().numpy()
        if np.std(measured) == 0 or np.std(counted) == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):  # a region absent in a subject: left out of the ratio
            ratio = float(np.nanmedian(np.where(counted > 0, measured / counted, np.nan)))
        rows.append((name, float(np.corrcoef(measured, counted)[0, 1]), ratio))
    r = np.array([row[1] for row in rows])
    print(f"{len(data.subject_ids)} subjects of {args.data}, grid {preprocessing.shape} at {preprocessing.voxel_size} "
          f"mm, {len(rows)} regions")
    print(f"Pearson r over subjects, soft volume vs label-map volume: median {np.median(r):.3f}, "
          f"10th percentile {np.percentile(r, 10):.3f}, minimum {r.min():.3f}; r >= 0.9 for {np.mean(r >= 0.9):.0%}"
          f" of regions, r >= 0.7 for {np.mean(r >= 0.7):.0%}")
    for name, value, ratio in sorted(rows, key=lambda row: row[1])[:5]:
        print(f"  lowest: {name}: r = {value:.3f} (soft / counted volume, median {ratio:.2f})")
    for name in ("vol_Lateral_Ventricles", "vol_White_Matter", "vol_Extracerebral_CSF"):
        match = [row for row in rows if row[0] == name]
        if match:
            print(f"  {name}: r = {match[0][1]:.3f} (soft / counted, median {match[0][2]:.2f})")


if __name__ == "__main__":
    main()
