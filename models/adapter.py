"""Any PyTorch module as a brain-age model: the input contract a user declares, and the adapter that makes the
module meet ours (``forward(image, features) -> predicted age [B] in years``) without subclassing anything.

The contract is declared, not guessed: the grid and voxel size the module was trained on, the intensity
normalization its images had, whether it takes context features (and which), and what its output means:

- ``years``: the predicted age, shaped [B] or [B, 1];
- ``standardized``: (age - age_mean) / age_std, shaped [B] or [B, 1];
- ``bins``: one logit per age bin [B, K] (SFCN's soft-label output, Peng et al. 2021): predicted age =
  softmax(logits) . bin_centres, differentiable, so attacks go through it.

A module whose forward takes one argument is called ``module(image)``; with ``inputs = "image+features"`` it is
called ``module(image, features)``. Anything else it returns is refused when it is loaded, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from medrobust.errors import FieldError, MedrobustError
from medrobust.models.base import BrainAgeModel, ModelMeta
from medrobust.vocabulary import NORMALIZATIONS, SPACES

INPUTS = ("image", "image+features")
OUTPUTS = ("years", "standardized", "bins")


@dataclass(frozen=True)
class InputContract:
    """What a module of one's own takes and returns (see the module's docstring). Immutable and hashable: it is
    part of a model source's identity."""

    input_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    normalization: str = "zscore_brain"
    inputs: str = "image"
    features: tuple[str, ...] = ()
    output: str = "years"
    age_mean: float | None = None
    age_std: float | None = None
    bin_centres: tuple[float, ...] = ()
    space: str = "resample"

    def validate(self) -> InputContract:
        """This contract, or a FieldError naming the first bad field."""
        if len(self.input_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in self.input_shape):
            raise FieldError("input_shape", f"must be three voxel counts > 0, got {list(self.input_shape)}")
        if len(self.voxel_size) != 3 or not all(v > 0 and math.isfinite(v) for v in self.voxel_size):
            raise FieldError("voxel_size", f"must be three sizes in mm > 0, got {list(self.voxel_size)}")
        if self.normalization not in NORMALIZATIONS:
            raise FieldError("normalization", f"must be one of {', '.join(NORMALIZATIONS)}, got "
                                              f"{self.normalization!r}")
        if self.space not in SPACES:
            raise FieldError("space", f"must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.inputs not in INPUTS:
            raise FieldError("inputs", f"must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if self.inputs == "image+features" and not self.features:
            raise FieldError("features", "must name the context features (in the order the module takes them) "
                                         "when inputs = 'image+features'")
        if self.inputs == "image" and self.features:
            raise FieldError("features", "are given but inputs = 'image'; set inputs = 'image+features'")
        if self.output not in OUTPUTS:
            raise FieldError("output", f"must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.output == "standardized" and not (
                self.age_mean is not None and self.age_std is not None and math.isfinite(self.age_mean)
                and math.isfinite(self.age_std) and self.age_std > 0):
            raise FieldError("age_std", "and age_mean are needed by output = 'standardized': finite, age_std > 0")
        if self.output != "standardized" and (self.age_mean is not None or self.age_std is not None):
            raise FieldError("age_mean", f"and age_std are used only by output = 'standardized', not "
                                         f"{self.output!r}")
        if self.output == "bins" and (len(self.bin_centres) < 2 or not all(map(math.isfinite, self.bin_centres))):
            raise FieldError("bin_centres", "must list at least two finite ages (one per output bin) for "
                                            "output = 'bins'")
        if self.output != "bins" and self.bin_centres:
            raise FieldError("bin_centres", f"are used only by output = 'bins', not {self.output!r}")
        return self

    def as_dict(self) -> dict:
        """JSON-native (lists), for a cell's spec."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if values["space"] == "resample":  # the default, left out so that the ids of earlier cells stay
            del values["space"]
        return values


class AdaptedModel(BrainAgeModel):
    """A user's ``module`` behind our model contract, as its ``contract`` declares. The module is frozen into
    eval mode by the attacks like any model; its parameters are its own."""

    def __init__(self, module: nn.Module, contract: InputContract, name: str, source: dict | None = None) -> None:
        contract.validate()
        meta = ModelMeta(name=name, kwargs={"source": source or {}, "contract": contract.as_dict()},
                         input_shape=tuple(contract.input_shape), voxel_size=tuple(contract.voxel_size),
                         normalization=contract.normalization, feature_names=list(contract.features),
                         uses_image=True, uses_features=contract.inputs == "image+features", space=contract.space)
        nn.Module.__init__(self)  # BrainAgeModel's own scaling buffers belong to our architectures, not to this
        self.meta = meta
        self.module = module
        self.contract = contract
        self.register_buffer("bin_centres", torch.tensor(contract.bin_centres, dtype=torch.float32))
        self.register_buffer("columns", torch.arange(len(contract.features)))

    def take_features_from(self, names: Sequence[str], where: str = "model") -> None:
        """Take the declared features out of a dataset's feature columns ``names`` (in any order, with others
        beside them): the model is then given the dataset's features, ``meta.feature_names`` become ``names``,
        and the module still receives exactly its own columns, in its own order."""
        names = list(names)
        missing = [name for name in self.contract.features if name not in names]
        if missing:
            raise MedrobustError(f"{where}.features: the data have no {', '.join(map(repr, missing))} (they have "
                                 f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''})")
        self.columns = torch.tensor([names.index(name) for name in self.contract.features],
                                    device=self.columns.device)
        self.meta.feature_names = names

    def forward(self, image: Tensor | None, features: Tensor | None = None) -> Tensor:
        """Predicted age [B] in years: the module called on the image (and the raw features, where it takes them),
        its output read as the contract says."""
        image = self.check_image(image)
        if self.meta.uses_features:
            n = len(self.meta.feature_names)
            if features is None or features.dim() != 2 or features.shape[1] != n:
                got = None if features is None else list(features.shape)
                raise MedrobustError(f"model '{self.meta.name}' expects context features [B, {n}] in the order "
                                     f"{list(self.meta.feature_names)}, got {got}")
            output = self.module(image, features.index_select(1, self.columns))
        else:
            output = self.module(image)
        return self.read_output(output, image.shape[0])

    def read_output(self, output: object, batch: int) -> Tensor:
        """The module's output as ages [batch] in years, or a MedrobustError saying what it returned instead."""
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise MedrobustError(f"model '{self.meta.name}' returned {type(output).__name__}"
                                 f"{'' if not isinstance(output, Tensor) else ' of dtype ' + str(output.dtype)}; "
                                 f"it must return a float tensor")
        shape = list(output.shape)
        contract = self.contract
        if contract.output == "bins":
            bins = len(contract.bin_centres)
            if shape != [batch, bins]:
                raise MedrobustError(f"model '{self.meta.name}' returned shape {shape}; output = 'bins' with "
                                     f"{bins} bin_centres needs [B, {bins}] (one logit per bin)")
            return torch.softmax(output, dim=1) @ self.bin_centres.to(output.dtype)
        if shape not in ([batch], [batch, 1]):
            raise MedrobustError(f"model '{self.meta.name}' returned shape {shape} for a batch of {batch}; it must "
                                 f"return one age per image, [B] or [B, 1] (or declare output = 'bins')")
        ages = output.reshape(batch)
        if contract.output == "standardized":
            return ages * contract.age_std + contract.age_mean
        return ages

    @property
    def used_feature_names(self) -> list[str]:
        return list(self.contract.features)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.module.parameters())


def contract_from(values: dict, features: Sequence[str] | None = None) -> InputContract:
    """An InputContract from plain values (a config table's, or keyword arguments), validated."""
    values = dict(values)
    for key in ("input_shape", "voxel_size", "features", "bin_centres"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    if features is not None:
        values["features"] = tuple(features)
    values = {k: v for k, v in values.items() if v is not None}
    values["input_shape"] = tuple(int(n) for n in values["input_shape"])
    values["voxel_size"] = tuple(float(v) for v in values["voxel_size"])
    for key in ("age_mean", "age_std"):
        if key in values:
            values[key] = float(values[key])
    if "bin_centres" in values:
        values["bin_centres"] = tuple(float(v) for v in values["bin_centres"])
    return InputContract(**values).validate()


__all__ = ["INPUTS", "OUTPUTS", "AdaptedModel", "InputContract", "contract_from"]
