"""Whole volumes for 3D models: the volume cache beside the slice cache (docs/architecture.md, Data).

A volume cache holds one item per patient, ``[N, C, X, Y, Z]`` ``float16``, built, stored,
fingerprinted and checked by the same machinery as the slice cache
(:func:`medgen.data.slices.open_or_build_cache` with a :class:`VolumeSpec`; the folder is
``<cache_dir>/volumes/<fingerprint>/``, opened as a :class:`~medgen.data.item_cache.ItemCache`
whose ``data`` is 5D). Each patient is read once and preprocessed:

1. images scaled to [0, 1] by their robust percentiles, as for slices; the mask binarised;
2. the volume cropped to the **head's bounding box**: the voxels of the reference image (the
   first image stored, or ``brain_from`` with a ``brain`` channel) above ``head_intensity`` after
   scaling, with ``margin`` voxels on each side;
3. the crop padded (centred, zeros) to a square in-plane, as for slices, so that an axial plane
   keeps its aspect, then **resampled** to ``volume_shape`` (``X x Y`` in-plane, ``Z`` axial):
   images with ``area`` when every axis shrinks and trilinear otherwise, masks nearest-neighbour
   and binary again. A volume smaller than ``volume_shape`` is so enlarged, a larger one reduced;
   no head voxel is cut off. Voxel spacing in the cache is therefore the head's extent over
   ``volume_shape`` (anisotropic sources and targets alike: each axis keeps its own spacing, which
   is recorded);
4. a ``brain`` channel, when asked for, derived axial slice by axial slice from the resampled
   reference image (:mod:`medgen.data.brain`) and the lesion mask, as for slices.

``meta.json`` records the median voxel spacing (mm, x y z) over patients; ``index.npz``'s
``lesion_pixels`` is each volume's lesion voxel count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.data.brain import brain_of
from medgen.data.masks import binarize_mask, is_lesion
from medgen.data.item_cache import CACHE_DTYPE
from medgen.data.slices import file_keys, image_keys
from medgen.data.transforms import scale_percentiles

__all__ = ["VolumeSpec", "head_box", "preprocess_patient_volume"]


@dataclass(frozen=True)
class VolumeSpec:
    """What goes into one volume cache: channels ``keys`` (images first, then ``seg`` and
    ``brain``), each patient's head resampled to ``volume_shape`` ``(X, Y, Z)``."""

    keys: tuple[str, ...]
    volume_shape: tuple[int, int, int]
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    #: a voxel of the scaled reference image above this is head (the crop's bounding box)
    head_intensity: float = 0.1
    #: voxels kept around the head's bounding box on each side
    margin: int = 2
    #: the image the head box and a ``brain`` channel are derived from
    brain_from: str = "bravo"
    #: how a ``brain`` channel is derived (:data:`medgen.data.brain.BRAIN_METHODS`)
    brain_method: str = "heuristic"
    #: the folder under ``cache_dir`` its caches live in
    folder: ClassVar[str] = "volumes"
    #: every patient's volume is kept (no slice selection)
    selection: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.volume_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume_shape must be three positive sizes (X, Y, Z), got {list(self.volume_shape)}")
        object.__setattr__(self, "volume_shape", shape)

    @classmethod
    def for_mode(cls, mode_cfg, data_cfg, space, selection: str = "all") -> "VolumeSpec":
        """The volumes of ``space`` (a :class:`~medgen.data.space.SampleSpace`) of a mode's keys
        (``cfg.mode``): whole volumes, no ``selection``; the head is the reference image above
        ``data.brain_intensity``, a ``brain`` key derived from ``data.brain_from`` by ``data.brain_method``."""
        return cls(keys=tuple(dict.fromkeys([*mode_cfg.image_keys, *mode_cfg.cond_keys])),
                   volume_shape=space.shape,
                   lower_percentile=float(data_cfg.lower_percentile), upper_percentile=float(data_cfg.upper_percentile),
                   head_intensity=float(data_cfg.brain_intensity), brain_from=str(data_cfg.brain_from),
                   brain_method=str(data_cfg.brain_method))

    @property
    def image_keys(self) -> tuple[str, ...]:
        return image_keys(self.keys)

    @property
    def reference(self) -> str:
        """The image the head box is found in: ``brain_from`` with a ``brain`` channel or without
        any image, else the first image stored."""
        return self.image_keys[0] if self.image_keys and BRAIN_KEY not in self.keys else self.brain_from

    @property
    def file_keys(self) -> tuple[str, ...]:
        """The modalities read from each patient folder: the stored ones, ``brain_from`` for a
        ``brain`` channel, and the :attr:`reference`."""
        return tuple(dict.fromkeys(file_keys(self.keys, self.brain_from) + (self.reference,)))

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.volume_shape

    def patient_items(self, volumes: dict[str, np.ndarray],
                      affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
        """One patient's RAS volumes -> (its volume ``[1, C, X, Y, Z]`` float16, ``[0]``, its
        lesion voxels ``[1]``, the voxel size in mm)."""
        block, spacing = preprocess_patient_volume(volumes, affine, self)
        lesion = int(block[0, self.keys.index(MASK_KEY)].astype(np.float32).sum()) if MASK_KEY in self.keys else 0
        return block, np.zeros(1, np.int32), np.asarray([lesion], np.int32), spacing

    def preprocess_file(self, key: str, volume: np.ndarray) -> None:
        """Preprocess one file alone (to find the file a failing patient fails on)."""
        if key == MASK_KEY:
            _resample(torch.from_numpy(binarize_mask(np.asarray(volume, np.float32))), self.volume_shape, "nearest")
        else:
            _resample(scale_percentiles(volume, self.lower_percentile, self.upper_percentile)[0], self.volume_shape,
                      "area")


def head_box(image: np.ndarray, threshold: float, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of the voxels of ``image`` (``[H, W, D]``, scaled to [0, 1]) above
    ``threshold``, grown by ``margin`` voxels per side within the volume (the whole volume when
    none is above it)."""
    inside = np.asarray(image) > threshold
    if not inside.any():
        return tuple(slice(0, n) for n in inside.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - margin), min(inside.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)  # type: ignore[return-value]


def preprocess_patient_volume(volumes: dict[str, np.ndarray], affine: np.ndarray,
                              spec: VolumeSpec) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One patient's RAS volumes (``key -> [H, W, D]``) -> (``[1, C, X, Y, Z]`` float16 in [0, 1],
    masks in {0, 1}; the voxel size in mm), by the steps of the module docstring."""
    scaled = {k: scale_percentiles(volumes[k], spec.lower_percentile, spec.upper_percentile)[0]
              for k in spec.file_keys if k != MASK_KEY}
    box = head_box(scaled[spec.reference].numpy(), spec.head_intensity, spec.margin)
    crop = [b.stop - b.start for b in box]
    side = max(crop[:2])
    shape = spec.volume_shape
    mode = "area" if all(n <= c for n, c in zip(shape, (side, side, crop[2]))) else "trilinear"
    planes = {k: _resample(_square(v[box]), shape, mode).clamp_(0.0, 1.0) for k, v in scaled.items()}
    if MASK_KEY in spec.keys:
        mask = torch.from_numpy(binarize_mask(np.asarray(volumes[MASK_KEY])[box]))
        planes[MASK_KEY] = binarize_mask(_resample(_square(mask), shape, "nearest"))
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if BRAIN_KEY in spec.keys and spec.brain_method != "heuristic":  # on the whole volume as read, cropped as the mask
        found = torch.from_numpy(brain_of(np.asarray(volumes[spec.brain_from]), spec.brain_method, zooms)[box])
        brain = is_lesion(_resample(_square(found.float()), shape, "nearest").numpy())
    elif BRAIN_KEY in spec.keys:
        brain = brain_of(planes[spec.brain_from].numpy())
    if BRAIN_KEY in spec.keys:
        if MASK_KEY in planes:  # a lesion is part of the brain
            brain |= is_lesion(planes[MASK_KEY].numpy())
        planes[BRAIN_KEY] = torch.from_numpy(brain.astype(np.float32))
    block = np.stack([np.asarray(planes[k], dtype=np.float32) for k in spec.keys])[None].astype(CACHE_DTYPE)
    spacing = (float(zooms[0] * side / shape[0]), float(zooms[1] * side / shape[1]), float(zooms[2] * crop[2] / shape[2]))
    return np.ascontiguousarray(block), spacing


def _square(volume: torch.Tensor) -> torch.Tensor:
    """``[h, w, d]`` -> ``[s, s, d]``, ``s = max(h, w)``: centred zero padding in-plane, MONAI's
    ``SpatialPad`` as the slice path pads (:func:`medgen.data.transforms.spatial_pipeline`)."""
    from monai.transforms import SpatialPad

    side = max(volume.shape[:2])
    return torch.as_tensor(SpatialPad(spatial_size=(side, side, -1), mode="constant")(volume[None])[0])


def _resample(volume: torch.Tensor, shape: tuple[int, int, int], mode: str) -> torch.Tensor:
    """``[h, w, d]`` -> ``shape`` with ``torch.nn.functional.interpolate`` (``area``, ``trilinear``
    without corner alignment, or ``nearest``)."""
    x = volume.to(torch.float32)[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, **kwargs)[0, 0]
