"""The benchmark's shared words, torch-free: what config, command line and report validate and label with, and
what the data and attack layers both follow (the name rule of the regional volumes). Each is defined here once."""

from __future__ import annotations

# Budget norms; l0 counts the voxels that change: its epsilon is a number of voxels, in unit abs.
NORMS = ("linf", "l2", "l0")
# Budget units. abs: intensity units; range: a fraction of each image's max - min (the paper's unit); std: of each
# image's standard deviation.
UNITS = ("abs", "range", "std")
# What an attack maximizes per sample. older/younger: push the predicted age up/down (the paper); deviation:
# |p - p_clean|; target: reach an age; error: |p - true age|.
OBJECTIVES = ("older", "younger", "deviation", "target", "error")
# What happens to a model's context features under attack. fixed: they keep their clean values (the paper's
# setting). perturbed: the attacker also moves each regional volume within its own relative budget, jointly with
# the image. recomputed: the features follow from the attacked image through a feature extractor.
THREAT_MODELS = ("fixed", "perturbed", "recomputed")
# How the threat model `recomputed` measures the regional volumes of an attacked image (medrobust.attacks.extractors):
# over each subject's label map (soft, hard, hard-bpda), or by a trained segmenter that segments the attacked image
# afresh (segmenter, segmenter-hard, segmenter-hard-bpda; the run's `segmenter` checkpoint).
LABEL_MAP_EXTRACTORS = ("soft", "hard", "hard-bpda")
SEGMENTER_EXTRACTORS = ("segmenter", "segmenter-hard", "segmenter-hard-bpda")
EXTRACTORS = LABEL_MAP_EXTRACTORS + SEGMENTER_EXTRACTORS
DEFAULT_EXTRACTOR = "soft"
# fp32; or the model's passes under torch.autocast in bfloat16 or float16 (the attack's iterates stay fp32).
PRECISIONS = ("fp32", "bf16", "fp16")
# Where a run's cells are computed (medrobust.runner.executors).
EXECUTORS = ("local", "ray")
# Intensity normalizations of a prepared image: z-score inside the brain mask, z-score over the volume, min-max
# to [0, 1], or none.
NORMALIZATIONS = ("zscore_brain", "zscore", "minmax", "none")
# How an image reaches a model's grid: `resample` (reoriented to RAS, resampled and centred onto it) or
# `preprocessed` (already in the model's space, e.g. MNI crops: taken as stored, its grid checked).
SPACES = ("resample", "preprocessed")
# Subject-level splits of a dataset; a run attacks one of them, or `all` the usable subjects (a model trained
# elsewhere needs no split).
SPLIT_NAMES = ("train", "val", "test")
SPLITS = (*SPLIT_NAMES, "all")

# A regional volume's feature name is this prefix and its region's name: `vol_hippocampus_l`. The data layer names
# the columns so, and the threat model `perturbed` moves exactly these features (a segmentation's output), never
# the subject's sex or the scanner's field strength.
VOLUME_PREFIX = "vol_"
# How a table says that a value is missing (compared in lower case).
MISSING_VALUES = frozenset({"", "n/a", "na", "nan", "none", "null"})
# The covariates beside the regional volumes.
COVARIATE_NAMES = ("sex", "field_strength")


def is_volume(feature_name: str) -> bool:
    """Whether a context feature is a regional volume (which the threat model ``perturbed`` may move)."""
    return str(feature_name).startswith(VOLUME_PREFIX)


# The paper's true-age bins (Li et al. 2020 binned by predicted age; we bin by the TRUE age): <15, 15-25, 25-50,
# 50-65, >65 years, each bin closed on the left.
AGE_BIN_EDGES = (15.0, 25.0, 50.0, 65.0)
AGE_BIN_KEYS = ("lt15", "15_25", "25_50", "50_65", "ge65")
AGE_BIN_LABELS = ("<15", "15-25", "25-50", "50-65", ">65")

# An attack's role, declared by the attack (``Attack.role``), read by the reliability checks. baseline: a
# reference no real attack may fall below (random noise); one-step: a single gradient step (FGSM), the least a
# many-step attack must reach; iterative: many steps, held to at least the one-step attack's result; black-box: it
# queries only the model's output (no gradient), so where it beats the gradient attacks of the same budget their
# gradients are not to be trusted; ensemble: the worst case per subject over member attacks (medrobust's headline).
ROLES = ("baseline", "one-step", "iterative", "black-box", "ensemble")
# An attack's scope (``Attack.scope``). batch: it attacks each batch of subjects on its own; set: it fits one
# perturbation on a set of subjects and applies it to others (a universal perturbation).
SCOPES = ("batch", "set")
