"""Where a benchmarked model comes from: a registered model's checkpoint (trained here), any importable factory
with weights, or a TorchScript file; each with what identifies it (the code and the weights, by content).

``ModelSource`` is small and hashable, so the runner ships it to workers and loads each model once per process.
User weights never unpickle: ``.safetensors`` through safetensors, ``.pt``/``.pth`` through
``torch.load(weights_only=True)`` (a state dict of tensors, nothing else).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medrobust.errors import MedrobustError
from medrobust.files import file_sha256
from medrobust.models.adapter import AdaptedModel, InputContract
from medrobust.models.base import BrainAgeModel
from medrobust.models.checkpoint import checkpoint_paths, load_checkpoint
from medrobust.models.smoothing import CERTIFICATE_SEEDING, SmoothedModel, Smoothing

# Modules given in memory (``medrobust.evaluate``), by the key their ModelSource holds: they live in this process.
_IN_MEMORY: dict[str, nn.Module] = {}


def in_memory(module: nn.Module) -> str:
    """Keep ``module`` for ``ModelSource(memory=key)`` in this process; returns the key."""
    key = f"{type(module).__qualname__}-{id(module):x}"
    _IN_MEMORY[key] = module
    return key
# What a DataParallel / DistributedDataParallel state dict prefixes every key with.
_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class ModelSource:
    """One model to benchmark: ``checkpoint`` (our .safetensors + .json pair of a registered model), or
    ``factory`` ("package.module:callable" or "path/to/file.py:callable", called with ``kwargs``, then given
    ``weights``), or ``torchscript`` (a file from ``torch.jit.save``); a factory's or TorchScript module's
    input contract is declared in ``contract``. ``where`` names the source in errors (e.g. a config field)."""

    checkpoint: Path | None = None
    factory: str | None = None
    kwargs_json: str = "{}"
    torchscript: Path | None = None
    weights: Path | None = None
    strict: bool = True
    contract: InputContract | None = None
    name: str = ""
    where: str = "model"
    memory: str | None = None  # a module in this process's memory (``in_memory``)
    smoothing: Smoothing | None = None  # its prediction median-smoothed (``SmoothedModel``), part of its identity

    @property
    def kind(self) -> str:
        if self.memory is not None:
            return "memory"
        return "checkpoint" if self.checkpoint is not None else "factory" if self.factory else "torchscript"

    def describe(self) -> str:
        """Where the model is, for people (not part of a cell's identity)."""
        if self.kind == "checkpoint":
            return str(self.checkpoint)
        if self.kind == "factory":
            return f"{self.factory}" + (f" + {self.weights}" if self.weights else "")
        if self.kind == "memory":
            return f"{self.memory} (in memory)"
        return str(self.torchscript)

    def files(self) -> list[Path]:
        """The files the model is made of (a changed one means a new plan)."""
        if self.kind == "checkpoint":
            return list(checkpoint_paths(self.checkpoint))
        if self.kind == "memory":
            return [f for f in [_class_file(_IN_MEMORY[self.memory])] if f is not None]
        files = [self.torchscript] if self.kind == "torchscript" else [_factory_file(self)]
        return [f for f in [*files, self.weights] if f is not None]

    def load(self, device: str | torch.device = "cpu") -> tuple[BrainAgeModel, dict]:
        """(model in eval mode on ``device``, record): the record of a checkpoint is its sidecar; of a factory or
        TorchScript model, its ``weights_sha256`` and its ``identity`` (the source, the declared contract and
        the code's hash), which become part of its cells' ids. With ``smoothing``, the model is median-smoothed
        and its settings join the identity."""
        model, record = self._load(device)
        if self.smoothing is None:
            return model, record
        identity = {**record.get("identity", {}),
                    "smoothing": {**self.smoothing.as_dict(), "certificate_seeding": CERTIFICATE_SEEDING}}
        return SmoothedModel(model, self.smoothing).eval(), {**record, "identity": identity}

    def _load(self, device: str | torch.device) -> tuple[BrainAgeModel, dict]:
        if self.kind == "checkpoint":
            return load_checkpoint(self.checkpoint, device)
        if self.kind == "memory":
            module = _IN_MEMORY[self.memory]
            file = _class_file(module)
            # A class without a source file (typed at a bare interpreter) is known by its structure only.
            code = file_sha256(file) if file else hashlib.sha256(repr(module).encode()).hexdigest()
            source = {"module": f"{type(module).__module__}.{type(module).__qualname__}",
                      "state_sha256": state_sha256(module)}
        elif self.kind == "torchscript":
            module, code = _load_torchscript(self), file_sha256(self.torchscript)
            source = {"torchscript": self.torchscript.name}
        else:
            module, code = _build_factory(self), file_sha256(_factory_file(self))
            source = {"factory": self.factory, "kwargs": json.loads(self.kwargs_json)}
        weights = None
        if self.weights is not None:
            _load_weights(module, self)
            weights = file_sha256(self.weights)
        model = AdaptedModel(module, self.contract, self.name or self.describe(), source)
        model = model.to(device).eval()
        check_output(model, self.where)
        identity = {"model_source": {**source, "code_sha256": code, "contract": self.contract.as_dict()}}
        return model, {"weights_sha256": weights or source.get("state_sha256") or code, "identity": identity}


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (every parameter's and buffer's name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _class_file(module: nn.Module) -> Path | None:
    """The source file of the module's class, or None where there is none."""
    try:
        source = inspect.getsourcefile(type(module))
    except TypeError:
        return None
    return Path(source).resolve() if source and Path(source).is_file() else None


def _resolve_callable(source: ModelSource):
    spec = source.factory
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise MedrobustError(f"{source.where}.factory must be 'package.module:callable' or 'file.py:callable', "
                             f"got {spec!r}")
    from medrobust.plugins import import_plugin

    module = import_plugin(module_name, f"{source.where}.factory")
    target = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise MedrobustError(f"{source.where}.factory: {module_name} has no {attribute!r}")
    if not callable(target):
        raise MedrobustError(f"{source.where}.factory: {spec} is not callable")
    return target


def _factory_file(source: ModelSource) -> Path:
    """The source file of the factory's code: its content is part of the model's identity."""
    target = _resolve_callable(source)
    try:
        return Path(inspect.getsourcefile(target)).resolve()
    except TypeError:
        raise MedrobustError(f"{source.where}.factory: {source.factory} has no Python source file to identify "
                             f"it by") from None


def _build_factory(source: ModelSource) -> nn.Module:
    factory = _resolve_callable(source)
    kwargs = json.loads(source.kwargs_json)
    try:
        module = factory(**kwargs)
    except Exception as error:
        raise MedrobustError(f"{source.where}: {source.factory}(**kwargs) failed: {type(error).__name__}: "
                             f"{error}") from None
    if not isinstance(module, nn.Module):
        raise MedrobustError(f"{source.where}: {source.factory} returned {type(module).__name__}, not a "
                             f"torch.nn.Module")
    return module


def _load_torchscript(source: ModelSource) -> nn.Module:
    try:
        return torch.jit.load(str(source.torchscript), map_location="cpu")
    except Exception as error:
        raise MedrobustError(f"{source.where}.torchscript: {source.torchscript} is not a TorchScript file "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def read_state_dict(path: Path, where: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` state dict read with
    ``weights_only=True`` (a dict under "state_dict" or "model" is taken too); DataParallel's ``module.``
    prefix stripped. Never unpickles an object: anything else is refused."""
    if not path.is_file():
        raise MedrobustError(f"{where}: no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise MedrobustError(f"{where}: {path} is not a readable safetensors file ({error})") from None
    elif path.suffix in (".pt", ".pth"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # a pickled object (weights_only refuses it), a corrupt or foreign file
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MedrobustError(f"{where}: {path} is not a state dict of tensors that loads without "
                                 f"unpickling code ({first[:200]}); save model.state_dict(), or use "
                                 f".safetensors") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict) and not isinstance(state.get(key),
                                                                                                 torch.Tensor):
                state = state[key]
                break
    else:
        raise MedrobustError(f"{where}: {path} must be a .safetensors, .pt or .pth file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MedrobustError(f"{where}: {path} does not hold a state dict (names -> tensors)")
    if state and all(key.startswith(_PARALLEL_PREFIX) for key in state):
        state = {key[len(_PARALLEL_PREFIX):]: value for key, value in state.items()}
    return state


def _load_weights(module: nn.Module, source: ModelSource) -> None:
    state = read_state_dict(source.weights, f"{source.where}.weights")

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        raise MedrobustError(f"{source.where}.weights: {source.weights} does not fit the module (other shapes: "
                             f"{listed(mismatched)}); build the module with the arguments it was trained with")
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if source.strict and (missing or unexpected):
        parts = ([f"missing keys: {listed(missing)}"] if missing else []) + (
            [f"unexpected keys: {listed(unexpected)}"] if unexpected else [])
        raise MedrobustError(f"{source.where}.weights: {source.weights} does not fit the module ("
                             f"{'; '.join(parts)}); set strict = false to load what fits")


def check_output(model: AdaptedModel, where: str = "model") -> None:
    """One forward pass on a blank batch of two: the module takes what the contract says it takes and returns
    what it says it returns, or one MedrobustError saying which."""
    grid = tuple(model.meta.input_shape)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    image = torch.zeros(2, 1, *grid, device=device)
    features = torch.zeros(2, len(model.meta.feature_names), device=device) if model.meta.uses_features else None
    call = "forward(image, features)" if model.meta.uses_features else "forward(image)"
    try:
        with torch.no_grad():
            model(image, features)
    except MedrobustError as error:
        raise MedrobustError(f"{where}: {error}") from None
    except TypeError as error:
        other = "inputs = 'image'" if model.meta.uses_features else "inputs = 'image+features' and features"
        raise MedrobustError(f"{where}: calling the module as {call} failed ({error}); if its forward takes "
                             f"other arguments, declare {other}") from None
    except Exception as error:
        raise MedrobustError(f"{where}: the module failed on a blank batch [2, 1, {', '.join(map(str, grid))}] "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                             f"check input_shape") from None
