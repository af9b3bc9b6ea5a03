"""The brain of a whole head volume by BET's surface model (see docs/brain.md).

FSL's Brain Extraction Tool (Smith, 2002) grows a tessellated sphere from the head's centre of
gravity until it rests on the brain's surface; :func:`bet_brain` runs the Python port on PyPI
(``brainextractor``, MIT) on one volume. The surface model is written in millimetres and assumes
cubic voxels, so the volume is first resampled to cubic voxels of its finest spacing (linear), and
the mask comes back to the volume's own grid (linear, then > 0.5). A scan that reaches far down the
neck pulls BET's starting sphere (the head's centre of gravity) below the brain, and the surface
then takes in the neck; like FSL's ``robustfov``, only the top :data:`HEAD_HEIGHT_MM` of the head
(RAS: the last axis points up) is given to BET.

Unlike the slice heuristic of :mod:`medgen.data.brain`, it needs the whole volume: the cache runs it
once per patient volume and every slice takes its slice of that brain.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Sequence

import numpy as np

__all__ = ["bet_brain", "bet_available"]

#: the surface's deformation steps (BET's default)
ITERATIONS: int = 1000
#: BET's fractional intensity threshold (its default: smaller gives a larger brain)
FRACTIONAL_THRESHOLD: float = 0.5
#: the height (mm) below the top of the head that BET sees (the brain and cerebellum are about 130 mm high)
HEAD_HEIGHT_MM: float = 180.0


def bet_available() -> bool:
    """Whether the BET port (``brainextractor``) can be imported here."""
    import importlib.util

    return importlib.util.find_spec("brainextractor") is not None


def _resample(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    from scipy import ndimage

    zoom = np.asarray(shape, dtype=np.float64) / np.asarray(volume.shape, dtype=np.float64)
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # rounding: pad or cut the last voxel
        fixed = np.zeros(tuple(shape), out.dtype)
        common = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
        fixed[common] = out[common]
        out = fixed
    return out


def _top_of_head(volume: np.ndarray, spacing: np.ndarray) -> int:
    """The lowest axial level BET sees: :data:`HEAD_HEIGHT_MM` below the highest level with head
    (voxels above a tenth of the 99.5th percentile)."""
    levels = np.flatnonzero((volume > 0.1 * np.percentile(volume, 99.5)).any(axis=(0, 1)))
    if levels.size == 0:
        return 0
    return max(0, int(levels[-1]) + 1 - int(np.ceil(HEAD_HEIGHT_MM / float(spacing[2]))))


def bet_brain(volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The brain of one head ``volume [X, Y, Z]`` (any intensity scale, voxel size ``spacing`` in
    mm) as booleans of its shape. Raises ``ImportError`` naming the package when BET is not installed."""
    if not bet_available():
        raise ImportError("data.brain_method=bet needs the package 'brainextractor' (pip install "
                          "brainextractor; Python >= 3.11)")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"BET needs a volume [X, Y, Z], got shape {volume.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    out = np.zeros(volume.shape, dtype=bool)
    if float(volume.max()) <= float(volume.min()):
        return out
    low = _top_of_head(volume, spacing)
    out[..., low:] = _bet_cubic(volume[..., low:], spacing)
    return out


def _bet_cubic(volume: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """BET on ``volume`` resampled to cubic voxels, its mask back on the volume's grid."""
    import nibabel as nib
    from brainextractor import BrainExtractor

    step = float(spacing.min())
    cubic = tuple(max(2, int(round(n * s / step))) for n, s in zip(volume.shape, spacing))
    resampled = _resample(volume, cubic, order=1) if cubic != volume.shape else volume
    resampled = np.clip(resampled - float(volume.min()), 0.0, None)
    image = nib.Nifti1Image(resampled, np.diag([step, step, step, 1.0]))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = BrainExtractor(image, bt=FRACTIONAL_THRESHOLD)
        extractor.run(iterations=ITERATIONS)
        mask = np.asarray(extractor.compute_mask()) > 0
    if cubic == volume.shape:
        return mask
    return _resample(mask.astype(np.float32), volume.shape, order=1) > 0.5
