"""Preprocessing of volumes into model-ready slices (MONAI transforms).

Images: robust per-volume intensity scaling (percentiles -> [0, 1], clipped), centred
padding to a square, then area (downsampling) or bilinear (upsampling) resize in-plane.
Masks: the same padding, nearest-neighbour resize, then :func:`binarize_mask` (from
:mod:`medgen.data.masks`, the one binarisation of every mask in medgen; importable from here
too). The results are bit-identical to MONAI's ``ScaleIntensityRangePercentiles`` /
``SpatialPad`` / ``Resize`` pipeline on a C-ordered copy of the volume (the slice cache depends
on it; ``tests/unit/test_slices.py`` checks it), computed with fewer passes over the voxels.
MONAI is imported when a volume is first preprocessed, so reading and checking data
(``medgen-data check``) does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from medgen.data.masks import binarize_mask, is_lesion

if TYPE_CHECKING:
    from monai.transforms import Compose

__all__ = ["binarize_mask", "from_model_space", "image_resize_mode", "preprocess_image", "preprocess_mask",
           "ras_to_display", "scale_percentiles", "spatial_pipeline", "to_model_space"]


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


def spatial_pipeline(in_hw: tuple[int, int], image_size: int, mode: str) -> Compose:
    """MONAI pipeline ``[1, H, W, D]`` -> ``[1, S, S, D]``: centred zero padding to a square, then
    an in-plane resize with interpolation ``mode`` (``area``, ``bilinear`` or ``nearest``)."""
    from monai.transforms import Compose, Resize, SpatialPad

    side = _square_size(in_hw)
    return Compose(
        [
            SpatialPad(spatial_size=(side, side, -1), mode="constant"),
            Resize(spatial_size=(image_size, image_size, -1), mode=mode,
                   **({"align_corners": False} if mode == "bilinear" else {})),
        ]
    )


def image_resize_mode(in_hw: tuple[int, int], image_size: int) -> str:
    """``area`` when downsampling (or keeping the size), ``bilinear`` when upsampling."""
    return "area" if image_size <= _square_size(in_hw) else "bilinear"


def _as_tensor(volume: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``volume``'s memory (any layout; copied only for negative strides)."""
    if any(stride < 0 for stride in volume.strides):
        volume = np.ascontiguousarray(volume)
    return torch.from_numpy(volume)


#: MONAI's ``percentile`` uses ``np.percentile`` above this many voxels, ``torch.quantile`` below
_MONAI_NUMPY_PERCENTILE_ABOVE = 1_000_000
_SAMPLE_STRIDE = 64


def _order_statistics(x: np.ndarray, ranks: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """The values of rank ``ranks`` (0-based, ascending; fast when near either end) of the 1D
    array ``x`` without NaN, found in the tail of ``x`` beyond a threshold read off the sorted
    ``sample`` of ``x``; exact (the tail is checked to hold the ranks, else wider margins, else
    a partition of all of ``x``)."""
    n, m = x.size, sample.size
    for margin in (32, 512):
        if ranks[-1] < n / 2:  # the smallest values: x <= t holds ranks 0 .. tail.size - 1
            expected = ranks[-1] * m / n
            t = sample[min(m - 1, int(expected + margin + 4 * np.sqrt(expected)))]
            tail = x[x <= t]
            if tail.size > ranks[-1]:
                return np.partition(tail, ranks)[ranks]
        else:  # the largest values: x >= t holds ranks n - tail.size .. n - 1
            expected = (n - 1 - ranks[0]) * m / n
            t = sample[max(0, m - 1 - int(expected + margin + 4 * np.sqrt(expected)))]
            tail = x[x >= t]
            base = n - tail.size
            if base <= ranks[0]:
                return np.partition(tail, ranks - base)[ranks - base]
    return np.partition(x, ranks)[ranks]


def _percentiles(voxels: np.ndarray, lower: float, upper: float) -> torch.Tensor:
    """``[lower, upper]`` percentiles of the 1D float32 ``voxels`` as MONAI's ``percentile`` returns
    them (float32 tensor), bit for bit. Above MONAI's numpy switch (and without NaN) the two
    pairs of order statistics that ``np.percentile``'s linear method interpolates between are
    found in the tails of the data instead of partitioning all voxels, and numpy itself
    interpolates between them (``np.quantile`` of the pair at the same fractional index)."""
    if not (0.0 <= lower <= 100.0 and 0.0 <= upper <= 100.0):
        raise ValueError(f"Percentiles must be in the range [0, 100], got {lower} and {upper}")
    n = voxels.size
    if n <= _MONAI_NUMPY_PERCENTILE_ABOVE or np.isnan(voxels.min()):
        from monai.transforms.utils_pytorch_numpy_unification import percentile

        return percentile(_as_tensor(voxels), [lower, upper])
    virtual = (n - 1) * np.true_divide(np.asarray([lower, upper], dtype=np.float64), 100)  # as np.percentile
    previous = np.floor(virtual)
    sample = np.sort(voxels[::_SAMPLE_STRIDE])
    out = np.empty(2, dtype=np.float64)
    for i in range(2):
        below = int(previous[i]) if virtual[i] < n - 1 else n - 1
        pair = _order_statistics(voxels, np.array([below, min(below + 1, n - 1)]), sample)
        out[i] = np.quantile(pair.astype(np.float32), np.array([virtual[i] - previous[i]]))[0]
    return torch.as_tensor(out, dtype=torch.float32)


def scale_percentiles(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """``[H, W, D]`` -> C-contiguous ``[1, H, W, D]`` float32 tensor: MONAI's
    ``ScaleIntensityRangePercentiles(lower, upper, b_min=0, b_max=1, clip=True)``, bit for bit,
    with both percentiles found at once (:func:`_percentiles`) and the same arithmetic done in
    place. The voxels may be in any memory order (NIfTI volumes come Fortran-ordered): the first
    operation writes them out in C order."""
    v = np.asarray(volume, dtype=np.float32)
    q = _percentiles(v.ravel(order="K"), lower, upper)  # the voxels in memory order
    a_min, a_max = q[0], q[1]  # 0-d float32 tensors, as ScaleIntensityRangePercentiles computes them
    x = torch.empty((1, *v.shape), dtype=torch.float32)
    torch.sub(_as_tensor(v)[None], a_min, out=x)
    if bool(a_max - a_min == 0.0):  # MONAI's constant-image branch: shifted, not scaled or clipped
        return x.add_(0.0)
    return x.div_(a_max - a_min).mul_(1.0).add_(0.0).clamp_(0.0, 1.0)


def preprocess_image(volume: np.ndarray, image_size: int, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """``[H, W, D]`` image volume -> ``[S, S, D]`` float32 in [0, 1]: :func:`scale_percentiles`,
    then :func:`spatial_pipeline` (area when downsampling, bilinear when upsampling)."""
    scaled = scale_percentiles(volume, lower, upper)
    out = spatial_pipeline(volume.shape[:2], image_size, image_resize_mode(volume.shape[:2], image_size))(scaled)
    return np.asarray(out[0], dtype=np.float32).clip(0.0, 1.0)


def preprocess_mask(volume: np.ndarray, image_size: int) -> np.ndarray:
    """``[H, W, D]`` mask volume (any values) -> ``[S, S, D]`` float32 in {0, 1}: binarised with
    :func:`binarize_mask`, then :func:`spatial_pipeline` with nearest-neighbour resizing.

    Nearest-neighbour resizing only picks voxels, so the pipeline runs once on the pixel numbers
    of one ``[H, W]`` plane, and the voxels it picks are gathered from the binarised volume in
    whatever memory order it has: bit-identical to running the pipeline on the whole volume.
    """
    v = np.asarray(volume)
    h, w = v.shape[:2]
    if v.ndim != 3 or h * w >= 2**24:  # pixel numbers must stay exact in float32
        binary = torch.from_numpy(np.ascontiguousarray(binarize_mask(v)))[None]
        return binarize_mask(np.asarray(spatial_pipeline((h, w), image_size, "nearest")(binary)[0]))
    # plane pixel (i, j) is numbered 1 + i + h * j (0 is the padding), the volume's Fortran order
    numbers = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(w, h).T.reshape(1, h, w, 1)
    picked = np.asarray(spatial_pipeline((h, w), image_size, "nearest")(numbers)[0, ..., 0]).astype(np.int64)
    columns = is_lesion(v).reshape(h * w, v.shape[2], order="F")  # a view for a Fortran-ordered volume
    out = columns[np.maximum(picked - 1, 0)]  # [S, S, D]
    out[picked == 0] = False
    return out.astype(np.float32)
