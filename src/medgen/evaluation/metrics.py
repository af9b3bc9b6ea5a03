"""Metrics that need no downloaded weights: mask statistics, lesion contrast, intensities,
diversity, paired fidelity.

Inputs are slice sets as arrays: masks ``[N, S, S]`` in {0, 1}, images ``[N, S, S]`` in [0, 1]
(one modality), or volume sets: ``[N, X, Y, Z]`` each (a 3D synthetic set), where the mask
statistics are those of :func:`volume_mask_statistics` and MS-SSIM is 3D. Distances between a real and a synthetic distribution are the Wasserstein-1
distance (earth mover's, in the quantity's own units) and the two-sample Kolmogorov-Smirnov
statistic (0 = same distribution, 1 = disjoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from scipy import ndimage, stats

from medgen.data.lesions import component_diameters
from medgen.data.masks import is_lesion, lesion_labels, lesion_sizes
from medgen.data.space import SampleSpace

#: intensity histograms: bins over [0, 1]
HISTOGRAM_BINS = 50


def distribution_distance(real: np.ndarray, synthetic: np.ndarray) -> dict[str, float]:
    """``{"wasserstein": W1, "ks": KS statistic}`` between two 1-D samples (NaN when one is empty)."""
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    if real.size == 0 or synthetic.size == 0:
        return {"wasserstein": math.nan, "ks": math.nan}
    return {"wasserstein": float(stats.wasserstein_distance(real, synthetic)),
            "ks": float(stats.ks_2samp(real, synthetic).statistic)}


# ============================================================================ masks
def mask_statistics(masks: np.ndarray, space: SampleSpace) -> dict[str, np.ndarray]:
    """Per slice: ``lesions`` (8-connected components), ``area`` (lesion fraction of the image);
    over all lesions: ``component_size`` (fraction of the image). Volumes ``[N, X, Y, Z]``: the
    :func:`volume_mask_statistics` at the space's voxel size (mm, x y z; 1 mm when not known)."""
    if space.volumetric:
        return volume_mask_statistics(masks, space.mm)
    masks = is_lesion(masks)
    pixels = masks.shape[1] * masks.shape[2]
    lesions, sizes = [], []
    for m in masks:
        lesion_pixels = lesion_sizes(m)
        lesions.append(len(lesion_pixels))
        sizes.extend((lesion_pixels / pixels).tolist())
    return {"lesions": np.asarray(lesions, np.int64), "area": masks.reshape(len(masks), -1).mean(1),
            "component_size": np.asarray(sizes, np.float64)}


def volume_mask_statistics(masks: np.ndarray, spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """Per volume ``[X, Y, Z]`` of ``masks [N, X, Y, Z]``: ``lesions`` (26-connected components) and
    ``volume_fraction`` (lesion voxels over all voxels); per volume with a lesion:
    ``largest_diameter_mm`` (the Feret diameter of its largest lesion, voxels of ``spacing`` mm);
    over all lesions: ``lesion_volume_mm3`` (voxels times the voxel volume)."""
    masks = is_lesion(masks)
    voxel = float(np.prod(np.asarray(spacing, np.float64)))
    lesions, largest, volumes = [], [], []
    for m in masks:
        labels, count = lesion_labels(m)
        lesions.append(count)
        if count:
            largest.append(float(component_diameters(labels, count, spacing).max()))
            volumes.extend((np.bincount(labels.ravel())[1:] * voxel).tolist())
    return {"lesions": np.asarray(lesions, np.int64), "volume_fraction": masks.reshape(len(masks), -1).mean(1),
            "largest_diameter_mm": np.asarray(largest, np.float64), "lesion_volume_mm3": np.asarray(volumes, np.float64)}


def compare_masks(real: np.ndarray, synthetic: np.ndarray, real_space: SampleSpace,
                  synthetic_space: SampleSpace | None = None) -> dict:
    """Mask statistics of both sets (means, empty fraction) and the distances between them (each
    statistic of :func:`mask_statistics`; volumes measured at their set's spacing, the synthetic
    set's space the real one's when not given)."""
    r, s = mask_statistics(real, real_space), mask_statistics(synthetic, synthetic_space or real_space)
    out: dict = {}
    for key in r:
        out[key] = {"real_mean": float(np.mean(r[key])) if r[key].size else math.nan,
                    "synthetic_mean": float(np.mean(s[key])) if s[key].size else math.nan,
                    **distribution_distance(r[key], s[key])}
    out["empty_fraction"] = {"real": float(np.mean(r["lesions"] == 0)), "synthetic": float(np.mean(s["lesions"] == 0))}
    return out


def lesion_contrast(image: np.ndarray, mask: np.ndarray, ring: int = 3) -> float:
    """Mean intensity inside the mask minus the mean in a ``ring``-pixel band around it: > 0 when
    the image shows a bright (enhancing) lesion where the mask has one."""
    m = is_lesion(mask)
    band = ndimage.binary_dilation(m, iterations=ring) & ~m
    return float(image[m].mean() - image[band].mean())


# ============================================================================ intensities
def brain_intensities(images: np.ndarray, threshold: float) -> np.ndarray:
    """Intensities of the pixels above ``threshold`` (the brain, as the slice selection sees it)."""
    images = np.asarray(images, np.float32)
    return images[images > threshold]


def compare_intensities(real: np.ndarray, synthetic: np.ndarray, threshold: float) -> dict:
    """Brain-intensity histograms (``HISTOGRAM_BINS`` bins over [0, 1], densities) and distances."""
    r, s = brain_intensities(real, threshold), brain_intensities(synthetic, threshold)
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    return {"real_mean": float(r.mean()) if r.size else math.nan,
            "synthetic_mean": float(s.mean()) if s.size else math.nan, **distribution_distance(r, s),
            "histogram_edges": edges.tolist(),
            "real_histogram": np.histogram(r, edges, density=True)[0].tolist(),
            "synthetic_histogram": np.histogram(s, edges, density=True)[0].tolist()}


# ============================================================================ diversity
def _ms_ssim(size: int, space: SampleSpace) -> MultiScaleSSIMMetric:
    """MONAI's MS-SSIM with as many of the 5 standard scales as ``size`` allows at kernel 7."""
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    levels = max(1, min(5, int(math.log2(size / 7)) + 1))
    w = weights[:levels]
    return MultiScaleSSIMMetric(spatial_dims=space.dims, data_range=1.0, kernel_size=7,
                                weights=tuple(x / sum(w) for x in w))


def pairwise_ms_ssim(images: np.ndarray, space: SampleSpace, pairs: int, seed: int) -> float:
    """Mean MS-SSIM between ``pairs`` random pairs of distinct images ``[N, S, S]`` (lower = more
    diverse; NaN for fewer than 2 images); volumes ``[N, X, Y, Z]``: 3D MS-SSIM, its scales set by
    the shortest axis, 8 pairs at a time."""
    images = np.asarray(images, np.float32)
    if len(images) < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(images), pairs)
    b = (a + rng.integers(1, len(images), pairs)) % len(images)
    if not space.volumetric:
        x, y = (torch.from_numpy(images[i])[:, None] for i in (a, b))
        return float(_ms_ssim(images.shape[-1], space)(x, y).mean())
    metric = _ms_ssim(min(images.shape[1:]), space)
    values = [metric(torch.from_numpy(images[a[i:i + 8]])[:, None], torch.from_numpy(images[b[i:i + 8]])[:, None])
              for i in range(0, pairs, 8)]
    return float(torch.cat(values).mean())


# ============================================================================ paired
def paired_fidelity(real: np.ndarray, synthetic: np.ndarray, space: SampleSpace) -> dict[str, float]:
    """PSNR and SSIM (MONAI, data range 1) of synthetic images against the real images of the same
    masks, ``[N, S, S]`` each (volumes ``[N, X, Y, Z]``: 3D SSIM), in the same order. The SSIM window
    is MONAI's 11 pixels, or the largest odd size that fits the shortest axis."""
    x, y = (torch.from_numpy(np.asarray(a, np.float32))[:, None] for a in (synthetic, real))
    shortest = min(x.shape[2:])
    kernel = min(11, shortest if shortest % 2 else shortest - 1)
    return {"psnr": float(PSNRMetric(max_val=1.0)(x, y).mean()),
            "ssim": float(SSIMMetric(spatial_dims=space.dims, data_range=1.0, win_size=kernel)(x, y).mean()),
            "pairs": int(len(real))}
