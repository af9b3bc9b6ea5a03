"""Preprocessing of volumes into model-ready slices (MONAI transform pipelines).

Images: robust per-volume intensity scaling (percentiles -> [0, 1], clipped), centred
padding to a square, then area (downsampling) or bilinear (upsampling) resize in-plane.
Masks: the same padding, nearest-neighbour resize, then :func:`binarize_mask` — the one
binarisation function that training and generation share.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles, SpatialPad

from medgen.core.constants import MASK_THRESHOLD

ArrayLike = np.ndarray | torch.Tensor


def binarize_mask(mask: ArrayLike, threshold: float = MASK_THRESHOLD) -> ArrayLike:
    """``mask > threshold`` as float32 {0, 1}; numpy in -> numpy out, tensor in -> tensor out.

    Used on data loading (``seg`` volumes), after resizing, and on generated masks
    (model space [-1, 1] must first be mapped back to [0, 1] with :func:`from_model_space`).
    """
    if isinstance(mask, torch.Tensor):
        return (mask > threshold).to(torch.float32)
    return (np.asarray(mask) > threshold).astype(np.float32)


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (images and masks inside the model)."""
    return x * 2.0 - 1.0


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (everything written to disk)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def ras_to_display(plane: np.ndarray) -> np.ndarray:
    """RAS axial plane ``[X, Y]`` -> radiological display ``[rows, cols]`` (anterior at the top,
    patient right on the left), as in ``medgen-data preview`` and the training sample grids."""
    return np.asarray(plane)[::-1, ::-1].T


def _square_size(shape_hw: tuple[int, int]) -> int:
    return int(max(shape_hw))


def image_pipeline(in_hw: tuple[int, int], image_size: int, lower: float = 0.5, upper: float = 99.5) -> Compose:
    """MONAI pipeline for one image volume ``[1, H, W, D]`` -> ``[1, S, S, D]`` in [0, 1]."""
    side = _square_size(in_hw)
    mode = "area" if image_size <= side else "bilinear"
    return Compose(
        [
            ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, relative=False),
            SpatialPad(spatial_size=(side, side, -1), mode="constant"),
            Resize(spatial_size=(image_size, image_size, -1), mode=mode, **({} if mode == "area" else {"align_corners": False})),
        ]
    )


def mask_pipeline(in_hw: tuple[int, int], image_size: int) -> Compose:
    """MONAI pipeline for one mask volume ``[1, H, W, D]`` -> ``[1, S, S, D]`` in {0, 1}."""
    side = _square_size(in_hw)
    return Compose(
        [
            SpatialPad(spatial_size=(side, side, -1), mode="constant"),
            Resize(spatial_size=(image_size, image_size, -1), mode="nearest"),
        ]
    )


def preprocess_image(volume: np.ndarray, image_size: int, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """``[H, W, D]`` image volume -> ``[S, S, D]`` float32 in [0, 1]."""
    pipe = image_pipeline(volume.shape[:2], image_size, lower, upper)
    out = pipe(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None])
    return np.asarray(out[0], dtype=np.float32).clip(0.0, 1.0)


def preprocess_mask(volume: np.ndarray, image_size: int) -> np.ndarray:
    """``[H, W, D]`` mask volume (any values) -> ``[S, S, D]`` float32 in {0, 1}."""
    binary = binarize_mask(volume)
    pipe = mask_pipeline(volume.shape[:2], image_size)
    out = pipe(torch.from_numpy(np.ascontiguousarray(binary))[None])
    return binarize_mask(np.asarray(out[0]))
