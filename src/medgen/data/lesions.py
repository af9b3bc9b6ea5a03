"""Lesion sizes in millimetres: the Feret diameter of each lesion and the size bins it falls in.

A lesion is a connected component of a mask's lesion pixels (:func:`medgen.data.masks.lesion_labels`:
8-connected in 2D, 26-connected in 3D). Its **Feret diameter** is the longest distance between two
points of the lesion, the lesion taken as the union of its voxels as boxes of the voxel spacing
(so one 1 mm pixel measures √2 mm, its diagonal, and an ``a × b`` rectangle of pixels of spacing
``(sx, sy)`` measures ``√((a·sx)² + (b·sy)²)``). The maximum distance between two points of a
union of boxes is reached at two box corners on the convex hull, which is what is computed.

Size bins are half-open intervals ``[lower, upper)`` of the diameter in mm. The default is the
RANO-BM binning of brain-metastasis reports (tiny < 10 mm, small 10–20, medium 20–30,
large ≥ 30); any increasing list of edges makes a finer one, e.g. ``SizeBins.from_edges([3, 6, 10,
15, 20, 30])``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.data.masks import lesion_labels


@dataclass(frozen=True)
class SizeBins:
    """Named diameter bins: bin ``i`` holds diameters in ``[edges[i-1], edges[i])`` mm (the first
    from 0, the last without an upper end)."""

    edges: tuple[float, ...]  #: increasing inner edges in mm; len(names) - 1 of them
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges make {len(self.edges) + 1} bins, got {len(self.names)} names")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"bin names must differ, got {list(self.names)}")
        if any(not np.isfinite(e) or e <= 0 for e in self.edges) or any(
                b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"bin edges must be positive, finite and increasing, got {list(self.edges)} mm")

    @classmethod
    def from_edges(cls, edges: Sequence[float]) -> SizeBins:
        """Bins named by their bounds: ``[3, 6]`` → ``"<3mm"``, ``"3-6mm"``, ``">=6mm"``; no edge:
        one bin, ``"any"``."""
        edges = tuple(float(e) for e in edges)
        fmt = [f"{e:g}" for e in edges]
        names = ([f"<{fmt[0]}mm"] if edges else ["any"]) + [f"{a}-{b}mm" for a, b in zip(fmt, fmt[1:])]
        return cls(edges, tuple(names + ([f">={fmt[-1]}mm"] if edges else [])))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, diameters_mm: np.ndarray | Sequence[float] | float) -> np.ndarray:
        """The bin index of each diameter (int64, same shape)."""
        return np.searchsorted(np.asarray(self.edges), np.asarray(diameters_mm, dtype=np.float64), side="right")

    def name(self, diameter_mm: float) -> str:
        return self.names[int(self.index(diameter_mm))]

    def counts(self, diameters_mm: np.ndarray | Sequence[float]) -> np.ndarray:
        """How many diameters fall in each bin (int64 ``[len(self)]``)."""
        return np.bincount(self.index(np.asarray(diameters_mm, dtype=np.float64).ravel()), minlength=len(self))


#: RANO-BM's size classes of brain metastases.
RANO_BM = SizeBins(edges=(10.0, 20.0, 30.0), names=("tiny", "small", "medium", "large"))
#: the binnings a config may name instead of giving edges
NAMED_BINS: dict[str, SizeBins] = {"rano_bm": RANO_BM}


def parse_bins(value: str | Sequence[float]) -> SizeBins:
    """The bins a config names (a key of :data:`NAMED_BINS`) or gives (increasing diameters in mm);
    a ``ValueError`` saying why otherwise (callers add the key)."""
    if isinstance(value, str):
        if value in NAMED_BINS:
            return NAMED_BINS[value]
        raise ValueError(f"unknown binning {value!r}; use one of {sorted(NAMED_BINS)} or a list of increasing "
                         "diameters in mm, e.g. [3, 6, 10, 20, 30]")
    try:
        edges = [float(b) for b in value]
    except (TypeError, ValueError):
        raise ValueError(f"must be a binning's name ({sorted(NAMED_BINS)}) or a list of diameters in mm, "
                         f"got {value!r}") from None
    return SizeBins.from_edges(edges)


def parse_count_classes(value: Sequence[int]) -> SizeBins:
    """Lesion-count classes from the smallest count of each, the last open-ended: ``[1, 2, 3, 4]`` →
    ``1, 2, 3, 4+``; ``[1, 2, 4]`` → ``1, 2-3, 4+`` (bins over the count, ``index(n)`` its class); a
    ``ValueError`` saying why otherwise (callers add the key)."""
    try:
        if isinstance(value, str) or any(float(v) != int(v) for v in value):
            raise ValueError
        lowers = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"must be a list of lesion counts, e.g. [1, 2, 3, 4], got {value!r}") from None
    if not lowers or lowers[0] != 1 or any(b <= a for a, b in zip(lowers, lowers[1:])):
        raise ValueError(f"must start at 1 and increase, e.g. [1, 2, 3, 4] for the classes 1, 2, 3, 4+, got {lowers}")
    names = [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(lowers, lowers[1:])] + [f"{lowers[-1]}+"]
    return SizeBins(tuple(float(v) for v in lowers[1:]), tuple(names))


def _corners(points: np.ndarray) -> np.ndarray:
    """The ``2**D`` corners of the voxel boxes centred on ``points`` ``[N, D]`` (voxel units)."""
    offsets = np.array(list(itertools.product((-0.5, 0.5), repeat=points.shape[1])))
    return (points[:, None, :] + offsets[None]).reshape(-1, points.shape[1])


def _max_distance(points: np.ndarray) -> float:
    """The largest distance between two of ``points`` ``[N, D]`` (N ≥ 1), through their convex hull."""
    if len(points) > 64:
        from scipy.spatial import ConvexHull  # box corners are never flat, so the hull always exists

        points = points[ConvexHull(points).vertices]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff ** 2).sum(-1).max()))


def feret_diameters(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The Feret diameter in mm of each lesion of ``mask`` (``[H, W]`` or ``[H, W, D]``), in the
    label order of :func:`~medgen.data.masks.lesion_labels`; ``spacing`` is the voxel size in mm per
    axis of ``mask``. float64 ``[n_lesions]`` (no lesion: ``[]``)."""
    return component_diameters(*lesion_labels(mask), spacing)


def component_diameters(labels: np.ndarray, count: int, spacing: Sequence[float]) -> np.ndarray:
    """:func:`feret_diameters` of the components ``1 .. count`` of a label image that
    :func:`~medgen.data.masks.lesion_labels` made (for a caller that has the labels already)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (labels.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must give one positive size per mask axis ({labels.ndim}), got {spacing.tolist()}")
    out = np.zeros(count, np.float64)
    if count == 0:
        return out
    from scipy import ndimage

    for i, box in enumerate(ndimage.find_objects(labels)):
        inside = labels[box] == i + 1
        # only boundary voxels can hold an extreme corner: drop the ones whose 2·D face neighbours are all inside
        interior = ndimage.binary_erosion(inside, border_value=0)
        points = np.argwhere(inside & ~interior).astype(np.float64)
        out[i] = _max_distance(_corners(points) * spacing)
    return out


def largest_diameter(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """The Feret diameter (mm) of the largest lesion of ``mask`` at ``spacing``; 0 without lesion."""
    return float(max(feret_diameters(mask, spacing), default=0.0))


def largest_lesions(masks: Sequence[np.ndarray], spacing: Sequence[float]) -> list[float]:
    """The Feret diameter (mm) of the largest lesion of each mask ``[S, S]`` with a lesion, at the
    pixel size ``spacing`` (x, y mm); masks without lesion are left out."""
    return [d for d in (largest_diameter(mask, spacing) for mask in masks) if d > 0]


def lesion_census(patients: Sequence[Path], bins: SizeBins = RANO_BM) -> dict:
    """How many lesions of each size a dataset holds: over the ``seg`` volumes of ``patients``,
    the lesions of each axial slice binned by their 2D Feret diameter (``slices``: what a 2D
    model and the lesion-wise evaluation see) and the 3D lesions by their 3D diameter
    (``volumes``), with the slice counts. Spacings come from each file's affine."""
    from medgen.core.constants import MASK_KEY
    from medgen.data.nifti_dataset import load_volume, modality_path

    per_slice = np.zeros(len(bins), np.int64)
    per_volume = np.zeros(len(bins), np.int64)
    slices = lesion_items = 0
    for patient in patients:
        seg, affine = load_volume(modality_path(patient, MASK_KEY))
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        per_volume += bins.counts(feret_diameters(seg, spacing))
        for z in range(seg.shape[2]):
            d = feret_diameters(seg[:, :, z], spacing[:2])
            per_slice += bins.counts(d)
            lesion_items += bool(len(d))
        slices += seg.shape[2]
    return {"bins": list(bins.names), "edges_mm": list(bins.edges), "patients": len(patients), "slices": slices,
            "lesion_items": lesion_items, "slice_lesions": dict(zip(bins.names, per_slice.tolist())),
            "volume_lesions": dict(zip(bins.names, per_volume.tolist()))}


def census_line(census: dict) -> str:
    """:func:`lesion_census` in one line, for a console."""
    def counts(key: str) -> str:
        return ", ".join(f"{name} {n}" for name, n in census[key].items())

    return (f"lesions by size ({'/'.join(census['bins'])}, Feret diameter): on axial slices {counts('slice_lesions')} "
            f"({census['lesion_items']} of {census['slices']} slices hold a lesion); as 3D lesions "
            f"{counts('volume_lesions')}")
