"""3D synthetic sets in ``medgen-evaluate``: the parts that differ when the samples are volumes.

A synthetic set whose samples hold more than one axial slice (``[X, Y, Z]``, ``Z > 1``) is
evaluated in 3D (``spatial_dims: null``, the default, decides by the first sample; ``spatial_dims=2``
compares its axial slices instead; :func:`space_of` makes the evaluation's one
:class:`~medgen.data.space.SampleSpace`). Both sets are then volume caches
(:class:`medgen.data.volumes.VolumeSpec`) at the synthetic set's shape: every synthetic volume, and
the volumes of the real splits, of which those with a lesion are the reference (as lesion slices
are in 2D) and the lesion-free ones join the lesion-wise test. Everything downstream of the caches
is the 2D pipeline on arrays with one more axis; what needs its own code is here:

* the sample space of the evaluation, and whether the downstream network can take its shape
  (:func:`space_of`, :func:`check_volume_shape`);
* the brain of each volume, axial slice by axial slice as for training data (:func:`item_brains`);
* the 2.5D feature slices of FID/KID (:func:`plane_slices`): from each volume a fixed number of
  slices per plane (axial, coronal, sagittal), evenly spaced through the middle part of the axis
  across the plane, each resampled to square pixels of its spacing and padded to a square.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medgen.core.constants import MASK_KEY
from medgen.data.brain import brain_mask, brain_of
from medgen.data.nifti_dataset import modality_path
from medgen.data.slices import ItemCache, open_or_build_cache
from medgen.data.space import SampleSpace
from medgen.data.volumes import VolumeSpec
from medgen.evaluation import EvaluationError
from medgen.evaluation.downstream import STRIDES
from medgen.evaluation.requests import SetsRequest

log = logging.getLogger("medgen.evaluate")

#: the planes of the 2.5D feature metrics, and the volume axis each one is cut across
PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}


# ============================================================================ the sets
def sample_shape(patient: Path) -> tuple[int, ...]:
    """The array shape of a sample's ``seg`` file (read from its header)."""
    import nibabel as nib

    return tuple(int(n) for n in nib.load(str(modality_path(patient, MASK_KEY))).shape)


def space_of(requested: int | None, shape: Sequence[int], root: Path) -> SampleSpace:
    """The :class:`~medgen.data.space.SampleSpace` of an evaluation whose first synthetic sample has
    the array ``shape``: as the file reads (:meth:`SampleSpace.of_file`: volumes for more than one
    axial slice), or the axial slices of volumes with ``requested=2`` (``spatial_dims``); an
    :class:`EvaluationError` for a 3D evaluation of single slices."""
    found = SampleSpace.of_file(shape)
    if requested == 3 and not found.volumetric:
        raise EvaluationError(f"spatial_dims=3 but the samples in {root} are single slices {list(shape)}: "
                              "evaluate them with spatial_dims=2 (or null)")
    space = SampleSpace.of_file(shape, dims=requested)
    if space.volumetric:
        log.info("the samples in %s are volumes %s: evaluating in 3D (volume metrics, 2.5D FID/KID, a 3D "
                 "downstream segmenter)", root, space.tag)
    elif found.volumetric:
        log.info("spatial_dims=2: evaluating the axial slices of the volumes in %s", root)
    return space


def check_volume_shape(space: SampleSpace, root: Path) -> None:
    """The 3D downstream segmenter halves every axis ``len(STRIDES) - 1`` times: refuse a volume
    shape it cannot take, in one line naming the folder."""
    factor = int(np.prod(STRIDES))
    if any(n % factor for n in space.shape):
        fits = "x".join(str(-(-n // factor) * factor) for n in space.shape)
        raise EvaluationError(f"synthetic_dir={root}: its volumes are {space.tag}, but the 3D "
                              f"downstream segmenter needs every axis a multiple of {factor} (e.g. {fits})")


class CacheSubset:
    """Some items of a :class:`~medgen.data.item_cache.ItemCache` (``indices``), with its ``keys``,
    ``spacing`` and ``patient_ids``; ``data`` ``[n, C, ...]`` float16, read on first use."""

    def __init__(self, cache: ItemCache, indices: np.ndarray):
        self.cache, self.indices = cache, np.asarray(indices, np.int64)
        self.keys, self.spacing, self.patient_ids = cache.keys, cache.spacing, cache.patient_ids
        self.patient_index = cache.patient_index[self.indices]
        self.slice_index = cache.slice_index[self.indices]
        self.lesion_pixels = cache.lesion_pixels[self.indices]
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.asarray(self.cache.data[self.indices])
        return self._data


def with_lesion(cache: ItemCache | None) -> CacheSubset | None:
    """The volumes of ``cache`` that hold at least one lesion voxel (None for no cache)."""
    return None if cache is None else CacheSubset(cache, np.flatnonzero(cache.lesion_pixels > 0))


def volume_caches(patients: dict[str, list[Path]], keys: Sequence[str], space: SampleSpace, request: SetsRequest,
                  test_split: str, progress: bool) -> dict[str, ItemCache | CacheSubset | None]:
    """The volume caches of a 3D evaluation at the shape of ``space``: ``synthetic`` (every volume of
    ``patients["synthetic"]``), ``test``/``train``/``val`` (the real volumes with a lesion; ``val``
    only beside a test split), ``test_brain`` (every volume of the reference split, for the
    lesion-wise test; only with ``request.downstream``)."""
    spec = VolumeSpec(keys=tuple(keys), volume_shape=space.shape, head_intensity=request.brain_intensity)

    def build(group: str, desc: str) -> ItemCache | None:
        return open_or_build_cache(patients[group], spec, request.cache_dir, progress=progress, desc=desc,
                                   workers=request.num_workers) if patients[group] else None

    test = build(test_split, f"real {test_split} volumes")
    return {"synthetic": build("synthetic", "synthetic volumes"), "test": with_lesion(test),
            "train": with_lesion(build("train", "real train volumes")),
            "val": with_lesion(build("val", "real val volumes")) if test_split == "test" else None,
            "test_brain": test if request.downstream else None}


def item_brains(images: np.ndarray, space: SampleSpace) -> np.ndarray:
    """The brain (booleans, same shape) of each slice ``[N, S, S]`` or volume ``[N, X, Y, Z]``, a
    volume's axial slice by axial slice (:func:`medgen.data.brain.brain_of`, as for training data)."""
    if space.volumetric:
        return np.stack([brain_of(volume) for volume in images]) if len(images) else np.zeros(np.shape(images), bool)
    return brain_mask(images)


# ============================================================================ 2.5D features
def plane_positions(n: int, count: int, fraction: float) -> np.ndarray:
    """``count`` positions (int64, increasing, no repeats) evenly spaced through the middle
    ``fraction`` of an axis of ``n`` voxels."""
    low = (n - 1) * (1 - fraction) / 2
    return np.unique(np.round(np.linspace(low, n - 1 - low, count)).astype(np.int64))


def square_planes(planes: torch.Tensor, spacing: Sequence[float], side: int) -> torch.Tensor:
    """Planes ``[M, a, b]`` with pixels of ``spacing`` (mm per axis) -> ``[M, 1, side, side]``:
    resampled (bilinear) so that the longer physical extent spans ``side`` pixels of equal size,
    then centred on a zero square."""
    a, b = planes.shape[1:]
    mm = max(a * spacing[0], b * spacing[1]) / side
    size = (min(side, max(1, round(a * spacing[0] / mm))), min(side, max(1, round(b * spacing[1] / mm))))
    x = F.interpolate(planes[:, None].float(), size=size, mode="bilinear", align_corners=False)
    rows, cols = side - size[0], side - size[1]
    return F.pad(x, (cols // 2, cols - cols // 2, rows // 2, rows - rows // 2))


def plane_slices(volumes: np.ndarray, spacing: Sequence[float], per_plane: int,
                 fraction: float) -> dict[str, torch.Tensor]:
    """The 2.5D slices of volumes ``[N, X, Y, Z]`` (voxels of ``spacing`` mm): per plane of
    :data:`PLANES`, ``[N * k, 1, S, S]`` with ``S`` the longest axis and ``k`` the
    :func:`plane_positions` of that axis (volume by volume)."""
    v = torch.from_numpy(np.asarray(volumes, np.float32))
    side = max(v.shape[1:])
    out = {}
    for plane, axis in PLANES.items():
        picks = torch.from_numpy(plane_positions(v.shape[axis + 1], per_plane, fraction))
        cut = v.index_select(axis + 1, picks).movedim(axis + 1, 1).flatten(0, 1)  # [N * k, a, b]
        kept = [s for i, s in enumerate(spacing) if i != axis]
        out[plane] = square_planes(cut, kept, side)
    return out


def mean_over_planes(per_plane: dict[str, dict]) -> dict:
    """The 2.5D entry of one modality: each figure of the per-plane entries (``fid``, ``kid_mean``,
    ...) averaged over the planes as ``<figure>_2.5d``, and the per-plane entries under ``planes``."""
    first = next(iter(per_plane.values()))
    out = {f"{k}_2.5d": float(np.mean([e[k] for e in per_plane.values()])) for k in first if not k.startswith("n_")}
    out.update({k: v for k, v in first.items() if k.startswith("n_")})  # slices per plane (the same in each)
    return {**out, "planes": per_plane}
