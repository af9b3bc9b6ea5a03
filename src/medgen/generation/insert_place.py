"""Insertion's geometry: the lesion shapes it paints (:class:`ShapeBank`), their sizes, and where they go.

A new lesion is a **shape** (the voxels of one real lesion of the source split, or of one lesion a
seg model drew) resized so that its Feret diameter falls in the size class asked, and a
**region** around it: the shape grown by one voxel in every direction (26-neighbourhood) and then
by ``margin - 1`` more (a ball), where the painter may change the scan. A region lies wholly in
the brain and overlaps neither an existing lesion nor another new region, so no new lesion
touches an existing one or another new one.

**Placement** is uniform in the brain: every position where the region fits (found at once by
two FFT correlations of the region's footprint with the brain's outside and with what is taken)
is equally likely. Everything is numpy; positions are voxel indices of the scan's array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medgen.data.lesions import SizeBins, feret_diameters
from medgen.data.masks import lesion_labels

__all__ = ["ShapeBank", "Shape", "Placed", "grow", "region_of", "place", "resize_to_class", "bank_from_masks"]

#: attempts at a zoom factor that lands a shape's diameter in its class
_ZOOM_TRIES = 8


@dataclass(frozen=True)
class Shape:
    """One lesion shape: ``mask`` bool (a tight box), where it came from (``source``, as the manifest
    names it), its Feret diameter (mm), and with a copy painter the images around it (``images``
    ``[C, *box]`` over the box grown by ``pad`` voxels each side; ``pad``: that growth)."""

    mask: np.ndarray
    source: str
    diameter: float
    images: np.ndarray | None = None
    pad: int = 0
    #: the patient it came from (None for a seg model's)
    patient: str | None = None


@dataclass
class ShapeBank:
    """The shapes new lesions are drawn from, with their diameters (mm)."""

    shapes: list[Shape]

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def diameters(self) -> np.ndarray:
        return np.asarray([s.diameter for s in self.shapes], dtype=np.float64)

    def pick(self, bins: SizeBins, cls: int, rng: np.random.Generator, avoid: str | None = None) -> Shape:
        """A shape for class ``cls`` of ``bins``: one of that class when the bank has any (a copy
        keeps its size), else the one nearest in diameter to the class; from another patient than
        ``avoid`` (a shape's ``patient``) where the bank has any."""
        shapes = [s for s in self.shapes if s.patient != avoid] if avoid is not None else self.shapes
        shapes = shapes or self.shapes
        d = np.asarray([s.diameter for s in shapes], dtype=np.float64)
        inside = np.flatnonzero(bins.index(d) == cls)
        if len(inside):
            return shapes[int(rng.choice(inside))]
        lo, hi = class_range(bins, cls, d)
        gap = np.maximum(lo - d, d - hi)
        best = np.flatnonzero(gap <= gap.min() + 1e-9)
        return shapes[int(rng.choice(best))]


def class_range(bins: SizeBins, cls: int, known: np.ndarray | None = None) -> tuple[float, float]:
    """The diameters (mm) of class ``cls``: ``[lower edge, upper edge)``; the open last class up to
    1.5 times its lower edge (or the largest ``known`` diameter)."""
    edges = (0.0, *bins.edges)
    lo = edges[cls]
    if cls + 1 < len(edges):
        return lo, edges[cls + 1]
    top = max([1.5 * lo, *([] if known is None or not len(known) else [float(np.max(known))])])
    return lo, top


def bank_from_masks(masks: np.ndarray, sources: Sequence[str], spacing: Sequence[float],
                    images: np.ndarray | None = None, pad: int = 0, patients: Sequence[str] | None = None) -> ShapeBank:
    """The lesions of ``masks [N, *S]`` (each a connected component, 26-connected in 3D), named
    ``<source>#<k>``, from ``patients[n]``; with ``images [N, C, *S]``, each shape keeps the images of
    its box grown by ``pad``."""
    from scipy import ndimage

    shapes = []
    for n, mask in enumerate(masks):
        labels, count = lesion_labels(mask)
        if not count:
            continue
        diameters = feret_diameters(mask, spacing)
        for k, box in enumerate(ndimage.find_objects(labels)):
            lesion = labels[box] == k + 1
            crop = None
            if images is not None:
                grown = tuple(slice(b.start - pad, b.stop + pad) for b in box)
                crop = _crop_padded(images[n], grown)
            shapes.append(Shape(lesion, f"{sources[n]}#{k + 1}", float(diameters[k]), crop, pad,
                                None if patients is None else patients[n]))
    return ShapeBank(shapes)


def _crop_padded(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``array[:, box]`` where ``box`` may reach outside the array (edge values repeated there)."""
    spatial = array.shape[1:]
    before = [max(0, -b.start) for b in box]
    after = [max(0, b.stop - n) for b, n in zip(box, spatial)]
    inner = tuple(slice(max(0, b.start), min(n, b.stop)) for b, n in zip(box, spatial))
    out = array[(slice(None), *inner)]
    return np.pad(out, [(0, 0), *zip(before, after)], mode="edge")


def resize_to_class(shape: Shape, bins: SizeBins, cls: int, spacing: Sequence[float], rng: np.random.Generator,
                    known: np.ndarray | None = None) -> Shape | None:
    """``shape`` as it is when its diameter lies in class ``cls``; else zoomed (linear, then
    thresholded at one half, its largest component kept) to a diameter drawn uniformly in the class
    (``known``: diameters that bound the open last class). None if no zoom lands in the class."""
    if bins.index(np.asarray([shape.diameter]))[0] == cls:
        return shape
    from scipy import ndimage

    lo, hi = class_range(bins, cls, known)
    target = float(rng.uniform(lo, hi)) if hi > lo else lo
    zoom = max(target, 1e-3) / max(shape.diameter, 1e-3)
    for _ in range(_ZOOM_TRIES):
        grown = np.pad(shape.mask, 1).astype(np.float32)
        factors = _zoom_factors(grown.shape, zoom)
        mask = ndimage.zoom(grown, factors, order=1) > 0.5
        if not mask.any():
            mask = np.zeros((1,) * shape.mask.ndim, dtype=bool)
            mask[...] = True
        labels, count = lesion_labels(mask)
        if count > 1:
            mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(mask))
        mask = mask[box]
        d = float(feret_diameters(mask, spacing)[0])
        if bins.index(np.asarray([d]))[0] == cls:
            images = None
            if shape.images is not None:
                images = _zoom_images(shape.images, shape.pad, mask.shape, factors, box)
            return Shape(mask, shape.source, d, images, shape.pad, shape.patient)
        zoom *= (target if d <= 0 else np.clip(target / d, 0.5, 2.0) * d) / max(d, 1e-3)
    return None


def _zoom_factors(shape: Sequence[int], zoom: float) -> list[float]:
    """Per-axis factors for ``scipy.ndimage.zoom`` of an array of ``shape`` by about ``zoom`` that keep
    every axis at least one element long (a shape of a few voxels zoomed far down has an empty axis)."""
    return [max(1, round(n * zoom)) / n for n in shape]


def _zoom_images(images: np.ndarray, pad: int, box_shape: tuple[int, ...], factors: Sequence[float],
                 box: tuple[slice, ...]) -> np.ndarray:
    """The images of a zoomed shape: ``images`` zoomed like its mask (``factors``, per axis), cut to the
    zoomed mask's box (``box`` in the zoomed padded mask) grown by ``pad``."""
    from scipy import ndimage

    inner = images[(slice(None), *(slice(pad, n - pad) for n in images.shape[1:]))]
    zoomed = np.stack([ndimage.zoom(np.pad(c, 1, mode="edge"), factors, order=1) for c in inner])
    grown = tuple(slice(b.start - pad, b.start + n + pad) for b, n in zip(box, box_shape))
    return _crop_padded(zoomed, grown)


def region_of(mask: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The footprint a lesion ``mask`` (bool box) may be painted in (:func:`grow`), in a box of odd
    sides whose centre voxel is the lesion's box centre. Returns ``(region, lesion)`` in that frame."""
    pad = margin + 1
    size = [n + 2 * pad + (1 - (n % 2)) for n in mask.shape]  # odd sides
    lesion = np.zeros(size, dtype=bool)
    lesion[tuple(slice(pad, pad + n) for n in mask.shape)] = mask
    return grow(lesion, margin), lesion


def grow(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` (bool) grown by one voxel in every direction (the 3^D cube) and then by a ball of
    radius ``margin - 1``: a lesion's region."""
    from scipy import ndimage

    region = ndimage.binary_dilation(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if margin > 1:
        r = margin - 1
        grid = np.indices((2 * r + 1,) * mask.ndim) - r
        region = ndimage.binary_dilation(region, structure=(grid ** 2).sum(0) <= r * r)
    return region


@dataclass(frozen=True)
class Placed:
    """A placed footprint: ``centre`` (voxel index of the footprint's centre voxel in the scan) and the
    box of the scan it covers (``box``, slices) with the footprint cut to the scan (``region``, ``lesion``)."""

    centre: tuple[int, ...]
    box: tuple[slice, ...]
    region: np.ndarray
    lesion: np.ndarray


def place(region: np.ndarray, lesion: np.ndarray, brain: np.ndarray, taken: np.ndarray,
          rng: np.random.Generator) -> Placed | None:
    """A position, uniform among all where ``region`` (odd-sided footprint) lies wholly inside
    ``brain`` and overlaps nothing ``taken`` (bool arrays of the scan's shape); None if there is none."""
    from scipy.signal import fftconvolve

    kernel = region[tuple(slice(None, None, -1) for _ in region.shape)].astype(np.float32)
    half = [n // 2 for n in region.shape]
    outside = fftconvolve((~brain).astype(np.float32), kernel, mode="same") < 0.5
    free = fftconvolve(taken.astype(np.float32), kernel, mode="same") < 0.5 if taken.any() else True
    ok = outside & free & brain
    interior = np.zeros_like(ok)
    inner = tuple(slice(h, n - h) for h, n in zip(half, brain.shape))
    if any(s.start >= s.stop for s in inner):
        return None
    interior[inner] = True
    candidates = np.argwhere(ok & interior)
    if not len(candidates):
        return None
    centre = tuple(int(v) for v in candidates[int(rng.integers(len(candidates)))])
    box = tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))
    if (brain[box] < region).any() or (taken[box] & region).any():  # the FFT's rounding, checked exactly
        return None
    return Placed(centre, box, region, lesion)
