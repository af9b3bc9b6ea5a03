"""The brain of a whole head volume by deepbet's convolutional network (see docs/brain.md).

deepbet (Fisch et al., 2024; ``pip install deepbet``, MIT) segments the brain of a T1-weighted head
with two 3D U-Nets whose TorchScript weights ship inside its wheel (nothing is downloaded): one
finds the brain's bounding box at 128^3, the other the brain inside it at 256^3; the largest piece
is kept and its holes filled. :func:`deepbet_brain` runs it on the CPU on one volume; the networks
are loaded once per process.

Like BET it needs the whole volume: the cache runs it once per patient volume and every slice
takes its slice of that brain.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import numpy as np

__all__ = ["deepbet_available", "deepbet_brain"]


def deepbet_available() -> bool:
    """Whether deepbet can be imported here."""
    return importlib.util.find_spec("deepbet") is not None


@functools.lru_cache(maxsize=1)
def _extractor():
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def deepbet_brain(volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The brain of one head ``volume [X, Y, Z]`` (RAS, any intensity scale, voxel size ``spacing``
    in mm) as booleans of its shape. Raises ``ImportError`` naming the package when it is not installed."""
    if not deepbet_available():
        raise ImportError("data.brain_method=deepbet needs the package 'deepbet' (pip install deepbet)")
    import nibabel as nib
    import torch

    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"deepbet needs a volume [X, Y, Z], got shape {volume.shape}")
    if float(volume.max()) <= float(volume.min()):
        return np.zeros(volume.shape, dtype=bool)
    affine = np.diag([*(float(s) for s in spacing), 1.0])  # RAS: nibabel's canonical orientation, left as is
    try:
        with torch.inference_mode():
            _, mask, _ = _extractor().run(nib.Nifti1Image(volume, affine))
    except AssertionError as exc:  # deepbet asserts when its first network finds no brain at all
        if "foreground" not in str(exc):
            raise
        return np.zeros(volume.shape, dtype=bool)
    return np.asarray(mask.dataobj) > 0
