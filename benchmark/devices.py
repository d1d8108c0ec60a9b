"""Devices: which device a run or a training uses, and what fp32 means on CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from medrobust.errors import MedrobustError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MedrobustError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedrobustError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_devices(name: str) -> list[torch.device]:
    """The devices a run uses: with ``auto`` or ``cuda`` and several visible GPUs, all of them (one cell per GPU);
    otherwise the one device named (``auto``: CUDA when present)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [resolve_device(name)]


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` for the block (None: left as torch picked it), then restored.
    On a CPU another process also uses, fewer threads than cores avoid the oversubscription that slows every
    convolution down (docs/speed.md measures it)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise MedrobustError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def deterministic_cuda() -> None:
    """fp32 means fp32, and a re-run repeats, on CUDA."""
    # fp32 means fp32, and a re-run repeats: no TF32 in convolutions or matrix products (it moves predictions
    # by hundredths of a year), and deterministic cuDNN algorithms (the default 3D convolution backward is not).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
