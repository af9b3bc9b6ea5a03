"""The sample space: what one sample of a model is, for slices and volumes alike.

A :class:`SampleSpace` is made once (from a training config, a checkpoint, or the files of a
dataset) and passed down. It knows the sample's ``shape`` (``(S, S)`` for an axial slice,
``(X, Y, Z)`` for a volume), its ``spacing`` (mm per axis, when known) and its number of spatial
dimensions, and it answers every question whose answer differs between slices and volumes: the
words for a sample and its elements, the memory format of a batch, the
picture of a sample, and any pair of defaults (:meth:`SampleSpace.either`). Code below it asks the
space, never the shape of an array, whether it holds a volume; the network builder is the only
other place that needs the number of dimensions (MONAI's ``spatial_dims``).

An item of a cache, a batch element without its batch axis, is ``[C, *shape]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np

__all__ = ["SampleSpace"]

T = TypeVar("T")


@dataclass(frozen=True)
class SampleSpace:
    """One sample's grid: ``shape`` (``(S, S)`` or ``(X, Y, Z)``) and ``spacing`` (mm, RAS x y z; for
    a slice, z is its thickness; None when not known yet, e.g. before a cache recorded it)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"a sample is a slice (2 sizes) or a volume (3 sizes), got {list(self.shape)}")
        object.__setattr__(self, "shape", shape)
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) not in (len(shape), 3):
                raise ValueError(f"spacing {list(self.spacing)} does not give one size per axis of {list(shape)}")
            object.__setattr__(self, "spacing", spacing)

    # ------------------------------------------------------------------ made from
    @classmethod
    def from_config(cls, cfg: Any, spacing: Sequence[float] | None = None) -> "SampleSpace":
        """The space of a training config: ``model.image_size`` S (a slice ``(S, S)``) or ``[X, Y, Z]``
        (a volume)."""
        size = cfg.model.image_size
        shape = (int(size), int(size)) if isinstance(size, int) else tuple(int(n) for n in size)
        return cls(shape, None if spacing is None else tuple(spacing))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "SampleSpace":
        """The space a checkpoint recorded (:meth:`state_dict`)."""
        spacing = state.get("spacing")
        return cls(tuple(state["shape"]), None if spacing is None else tuple(spacing))

    @classmethod
    def of_file(cls, shape: Sequence[int], spacing: Sequence[float] | None = None,
                dims: int | None = None) -> "SampleSpace":
        """The space of a sample read from a NIfTI file of ``shape``: ``[S, S, 1]`` (or ``[S, S]``) is a
        slice, ``[X, Y, Z]`` with ``Z > 1`` a volume; ``dims=2`` reads a volume's axial slices instead."""
        shape = [int(n) for n in shape][:3]
        volume = len(shape) == 3 and shape[2] > 1 and dims != 2
        grid = tuple(shape) if volume else tuple(shape[:2])
        return cls(grid, None if spacing is None else tuple(spacing))

    def with_spacing(self, spacing: Sequence[float] | None) -> "SampleSpace":
        return SampleSpace(self.shape, None if spacing is None else tuple(spacing))

    def state_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "spacing": None if self.spacing is None else list(self.spacing)}

    # ------------------------------------------------------------------ the one question
    @property
    def dims(self) -> int:
        """Spatial dimensions: 2 for slices, 3 for volumes."""
        return len(self.shape)

    @property
    def volumetric(self) -> bool:
        return self.dims == 3

    def either(self, slices: T, volumes: T) -> T:
        """``slices`` or ``volumes``, whichever this space holds: the one place that picks a default
        (size bins, gate rules, panels) by kind of sample."""
        return volumes if self.volumetric else slices

    # ------------------------------------------------------------------ answers
    @property
    def unit(self) -> str:
        """What one sample is called: ``slice`` or ``volume``."""
        return self.either("slice", "volume")

    @property
    def element(self) -> str:
        """What one grid point is called: ``pixel`` or ``voxel``."""
        return self.either("pixel", "voxel")

    @property
    def size(self) -> int:
        """The in-plane size of a square slice, the first axis of a volume."""
        return self.shape[0]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def tag(self) -> str:
        """The size in a name: ``128`` (a slice's side), ``64x64x32`` (a volume)."""
        return self.either(str(self.shape[0]), "x".join(map(str, self.shape)))

    def describe(self) -> str:
        """``64 px slices`` or ``64x64x32 volumes``, for messages."""
        return self.either(f"{self.shape[0]} px slices", "x".join(map(str, self.shape)) + " volumes")

    def describe_spacing(self) -> str:
        """``32 px of 1 x 1 mm`` or ``64x64x32 voxels of 2 x 2 x 3 mm``."""
        mm = " x ".join(f"{float(s):g}" for s in self.mm)
        return self.either(f"{self.shape[0]} px of {mm} mm", "x".join(map(str, self.shape)) + f" voxels of {mm} mm")

    @property
    def mm(self) -> tuple[float, ...]:
        """The size (mm) of the grid's steps, one per axis of ``shape`` (a slice's pixel, a volume's
        voxel); 1 mm per axis where no spacing is recorded."""
        return self.spacing[: self.dims] if self.spacing is not None else (1.0,) * self.dims

    @property
    def element_mm3(self) -> float:
        """The area (mm²) of a pixel or the volume (mm³) of a voxel."""
        return float(np.prod(np.asarray(self.mm, np.float64)))

    @property
    def memory_format(self):
        """``torch.channels_last`` for a batch of slices, ``torch.channels_last_3d`` for volumes."""
        import torch

        return self.either(torch.channels_last, torch.channels_last_3d)

    def picture(self, image: np.ndarray, mask: np.ndarray | None, scale: int = 2) -> np.ndarray:
        """An RGB picture of one sample (``image`` in [0, 1], ``mask`` outlined): a slice as one tile, a
        volume as its three planes through the largest lesion, voxels in proportion to the spacing."""
        from medgen.data.pictures import render_planes, render_tile

        if self.volumetric:
            return render_planes(image, mask, self.mm, scale=scale)
        return render_tile(image, mask, scale)

    @property
    def sheet_columns(self) -> int:
        """Pictures per row of a contact sheet: 8 slices, 2 volumes (three planes each)."""
        return self.either(8, 2)

    def axial(self, array: np.ndarray) -> np.ndarray:
        """The axial slice to show of a sample ``[*shape]``: the slice itself, a volume's middle slice."""
        return self.either(array, array[..., array.shape[-1] // 2])
