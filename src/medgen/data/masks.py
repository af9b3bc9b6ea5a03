"""Binary masks: the one binarisation every mask in medgen goes through, and its lesions.

A pixel is lesion when its value is strictly greater than :data:`MASK_THRESHOLD` (0.5): a value
of exactly 0.5 is background. The same rule binarises ``seg`` volumes when they are read, masks
after resizing, generated masks, the masks a metric or a picture reads from the slice cache,
and a segmentation network's sigmoid output. Numpy arrays (and anything ``np.asarray`` takes)
come back as numpy arrays, torch tensors as tensors on the same device.

Lesions are the fully connected components of a mask's lesion pixels (8-connected in 2D, 26 in
3D: diagonal neighbours belong to the same lesion), as the quality gate and the mask statistics
count them.
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.core.constants import MASK_THRESHOLD

ArrayLike = np.ndarray | torch.Tensor

def is_lesion(mask: ArrayLike, threshold: float = MASK_THRESHOLD) -> ArrayLike:
    """``mask > threshold`` as booleans; numpy in -> numpy out, tensor in -> tensor out."""
    if isinstance(mask, torch.Tensor):
        return mask > threshold
    return np.asarray(mask) > threshold


def binarize_mask(mask: ArrayLike, threshold: float = MASK_THRESHOLD) -> ArrayLike:
    """:func:`is_lesion` as float32 {0, 1}; numpy in -> numpy out, tensor in -> tensor out.

    Used on data loading (``seg`` volumes), after resizing, and on generated masks
    (model space [-1, 1] must first be mapped back to [0, 1] with ``from_model_space``).
    """
    if isinstance(mask, torch.Tensor):
        return is_lesion(mask, threshold).to(torch.float32)
    return is_lesion(mask, threshold).astype(np.float32)


def lesion_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(labels, count)`` of one mask ``[H, W]`` (or volume ``[H, W, D]``): each lesion (fully
    connected component of :func:`is_lesion` pixels) numbered ``1 .. count`` in ``labels`` (int32),
    background 0."""
    from scipy import ndimage  # imported here: reading and checking data never needs it

    lesion = is_lesion(mask)
    return ndimage.label(lesion, structure=np.ones((3,) * lesion.ndim, dtype=bool))


def lesion_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixels of each lesion of one mask ``[H, W]`` (or ``[H, W, D]``), in label order (int64; no lesion: ``[]``)."""
    labels, _ = lesion_labels(mask)
    return np.bincount(labels.ravel())[1:]
