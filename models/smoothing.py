"""Median smoothing of a brain-age model, and the certified interval of its prediction under l2 perturbations.

The smoothed model predicts the median of the base model's predictions under Gaussian noise of scale ``sigma`` (in
the model's input units: intensities after its normalization). For any perturbation of l2 norm at most ``r``,
percentile smoothing (Chiang, Curry, Abdelkader, Kumar, Dickerson, Goldstein, "Detection as Regression: Certified
Object Detection by Median Smoothing", NeurIPS 2020) bounds the smoothed prediction of the perturbed image between
the base predictions' percentiles at Phi(-r / sigma) and Phi(r / sigma) of the clean image's noise distribution.
Those percentiles are estimated from ``n`` noise draws by order statistics, each bound at confidence
1 - alpha / 2 (binomial tail of the draws below the true percentile), so that both hold at 1 - alpha; where too few
draws lie beyond a percentile the bound abstains (NaN).

``SmoothedModel`` draws its prediction noise once (``n`` draws from ``seed``) and reuses it, so that it is a
deterministic function an attack can differentiate (the median passes the gradient of the draw it selects:
expectation over a fixed set of draws); ``certify`` draws its own, independent noise per subject.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom, norm
from torch import Tensor, nn

from medrobust.arguments import check_count, check_positive, check_probability, check_seed
from medrobust.errors import MedrobustError


@dataclass(frozen=True)
class Smoothing:
    """Settings of median smoothing: ``sigma`` (noise scale in the model's input units), ``n`` (draws of the
    prediction), ``certify_n`` (draws of each subject's certificate), ``alpha`` (the certificate holds with
    probability at least 1 - alpha), ``seed`` (of every draw)."""

    sigma: float = 0.25
    n: int = 32
    certify_n: int = 200
    alpha: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("smoothing sigma", self.sigma, "model input units")
        check_count("smoothing n", self.n)
        check_count("smoothing certify_n", self.certify_n)
        check_probability("smoothing alpha", self.alpha, "the certificate's error rate")
        check_seed("smoothing seed", self.seed)

    def as_dict(self) -> dict:
        return {"sigma": float(self.sigma), "n": self.n, "certify_n": self.certify_n, "alpha": float(self.alpha),
                "seed": self.seed}


# How a certificate's draws are seeded (part of a smoothed model's identity, so that cells certified under another
# scheme are redone): 2 = from the smoothing's seed and the subject alone, so that a subject's certificate at a
# radius is the same in every cell and one set of draws serves every radius; 1 = from each cell's seed.
CERTIFICATE_SEEDING = 2


class SmoothedModel(nn.Module):
    """``base`` under median smoothing: forward(image, features) is the median over ``smoothing.n`` fixed noise
    draws of base(image + sigma * noise, features). It carries the base model's ``meta``."""

    def __init__(self, base: nn.Module, smoothing: Smoothing) -> None:
        super().__init__()
        meta = getattr(base, "meta", None)
        if meta is not None and not meta.uses_image:
            raise MedrobustError(f"model '{meta.name}' does not use the image: smoothing its image changes nothing")
        self.base = base
        self.smoothing = smoothing
        self.meta = meta
        self._bank: Tensor | None = None

    @property
    def used_feature_names(self) -> list[str]:
        return self.base.used_feature_names

    def noise(self, image: Tensor) -> Tensor:
        """The fixed noise draws [n, *image.shape[1:]] (standard normal) on the image's device and dtype."""
        shape = (self.smoothing.n, *image.shape[1:])
        bank = self._bank
        if bank is None or bank.shape != shape or bank.device != image.device or bank.dtype != image.dtype:
            generator = torch.Generator().manual_seed(self.smoothing.seed)
            bank = torch.randn(shape, generator=generator).to(image.device, image.dtype)
            self._bank = bank
        return bank

    def forward(self, image: Tensor, features: Tensor | None = None) -> Tensor:
        bank = self.noise(image)
        draws = torch.stack([self.base(image + self.smoothing.sigma * bank[i], features)
                             for i in range(bank.shape[0])], dim=1)
        return draws.median(dim=1).values


@dataclass
class Certificate:
    """Per subject, ``lower``/``upper`` [B, R]: the certified bounds of the smoothed prediction of any image within
    each l2 radius (NaN where the certificate abstains)."""

    lower: Tensor
    upper: Tensor


def order_statistics(n: int, alpha: float, radii_over_sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks (k_lower, k_upper) of the sorted draws that bound the Phi(-r/sigma) and Phi(r/sigma)
    percentiles from below and above, each at confidence 1 - alpha/2; 0 (lower) or n + 1 (upper) where no draw
    does (abstain). The k-th smallest of n draws lies at or below the p-percentile with probability
    P(Binomial(n, p) >= k), and at or above it with probability P(Binomial(n, p) <= k - 1)."""
    ks = np.arange(1, n + 1)
    lower, upper = [], []
    for ratio in np.atleast_1d(radii_over_sigma):
        p_low, p_high = norm.cdf(-ratio), norm.cdf(ratio)
        below = binom.sf(ks - 1, n, p_low) >= 1 - alpha / 2  # P(Bin >= k): holds for k up to some k_lower
        lower.append(int(ks[below].max()) if below.any() else 0)
        above = binom.cdf(ks - 1, n, p_high) >= 1 - alpha / 2  # P(Bin <= k - 1): holds from some k_upper on
        upper.append(int(ks[above].min()) if above.any() else n + 1)
    return np.array(lower), np.array(upper)


def base_draws(model: SmoothedModel, images: Tensor, features: Tensor | None, n: int,
               sample_seeds: Sequence[int], stream: int, chunk: int = 16) -> Tensor:
    """The base model's predictions [B, n] under ``n`` fresh noise draws per image, each image's from its own
    stream (seeded from the smoothing's seed, its sample seed and ``stream``), without gradients."""
    sigma = model.smoothing.sigma
    draws = []
    with torch.no_grad():
        for i, seed in enumerate(sample_seeds):
            mixed = (model.smoothing.seed * 1_000_003 + int(seed)) * 4 + stream
            generator = torch.Generator().manual_seed(mixed % 2**63)
            feats = None if features is None else features[i:i + 1]
            values = []
            for start in range(0, n, chunk):
                size = min(chunk, n - start)
                noise = torch.randn((size, *images.shape[1:]), generator=generator).to(images.device, images.dtype)
                batch_features = None if feats is None else feats.expand(size, -1)
                values.append(model.base(images[i:i + 1] + sigma * noise, batch_features))
            draws.append(torch.cat(values))
    return torch.stack(draws)


def certificate_draws(model: SmoothedModel, images: Tensor, features: Tensor | None,
                      sample_seeds: Sequence[int]) -> Tensor:
    """The base model's predictions [B, certify_n] under the certificate's fresh draws, sorted per image (float64,
    on the host): what ``certify`` bounds at every radius, so that one set serves several radii."""
    draws = base_draws(model, images, features, model.smoothing.certify_n, sample_seeds, stream=1)
    return draws.double().cpu().sort(dim=1).values


def certify(model: SmoothedModel, images: Tensor, features: Tensor | None, radii: Tensor,
            sample_seeds: Sequence[int], draws: Tensor | None = None) -> Certificate:
    """The certificate of each image [B, ...] at each l2 radius ``radii`` [B, R] (in the model's input units):
    ``model.smoothing.certify_n`` fresh draws per image, bounds at confidence 1 - ``alpha``. ``draws``: the
    images' ``certificate_draws`` when they are made already (for other radii)."""
    settings = model.smoothing
    ordered = certificate_draws(model, images, features, sample_seeds) if draws is None else draws
    padded = torch.cat([torch.full((len(ordered), 1), math.nan, dtype=torch.float64), ordered,
                        torch.full((len(ordered), 1), math.nan, dtype=torch.float64)], dim=1)
    radii = radii.detach().double().cpu()
    lower = torch.empty_like(radii)
    upper = torch.empty_like(radii)
    for i in range(len(radii)):
        k_lower, k_upper = order_statistics(settings.certify_n, settings.alpha,
                                            (radii[i] / settings.sigma).numpy())
        lower[i] = padded[i, torch.as_tensor(k_lower)]  # rank 0 and n + 1 are the NaN pads: abstain
        upper[i] = padded[i, torch.as_tensor(k_upper)]
    return Certificate(lower=lower, upper=upper)


def smoothed_estimate(model: SmoothedModel, images: Tensor, features: Tensor | None,
                      sample_seeds: Sequence[int]) -> Tensor:
    """The smoothed prediction [B] estimated from ``certify_n`` fresh draws (independent of the fixed draws an
    attack saw): what the certificate bounds, measured on an attacked image."""
    draws = base_draws(model, images, features, model.smoothing.certify_n, sample_seeds, stream=2)
    return draws.double().cpu().median(dim=1).values
