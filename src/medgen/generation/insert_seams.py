"""How well a painter hides its work: the seam at a region's border and the contrast of its lesions.

* **Seam**: the mean intensity gradient magnitude (``|∇I|``, central differences, per voxel) on the
  **border ring** of the painted regions (the voxels within one voxel of the border, on both sides),
  after painting, divided by the same before painting. 1: the border is as smooth as the scan was
  there; above 1: an edge the painter drew (a visible seam). Beside it, the ring's gradient around
  the scan's **real** lesions (rings built by the same region rule) over the scan's own gradient
  on the new rings, the level real anatomy has there.
* **Lesion contrast**: the mean intensity inside the new lesions over the mean of their region's
  rim outside them (the ring just inside the region's border), against the same ratio around the
  real lesions: a painter whose lesions are as bright as real ones scores near the real figure.

Both over the first image channel of a sample, summed over samples before dividing.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["SeamTally", "border_ring"]


def border_ring(region: np.ndarray) -> np.ndarray:
    """The voxels within one voxel (26-neighbourhood) of the border of ``region`` (bool), both sides."""
    from scipy import ndimage

    cube = np.ones((3,) * region.ndim, dtype=bool)
    return ndimage.binary_dilation(region, cube) & ~ndimage.binary_erosion(region, cube, border_value=1)


def _gradient(image: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(g ** 2 for g in np.gradient(image.astype(np.float64))))


class SeamTally:
    """Sums over samples (:meth:`add`), then :meth:`summary`."""

    def __init__(self) -> None:
        self.sums = np.zeros(8)  # after, before (new rings); real rings; n new, n real; lesion, rim (new); lesion, rim (real)
        self.counts = np.zeros(8)

    def add(self, before: np.ndarray, after: np.ndarray, region: np.ndarray, new: np.ndarray,
            real_regions: Iterable[np.ndarray], real: np.ndarray) -> None:
        """One sample: the image ``before`` and ``after`` painting, the painted ``region``, the new
        lesions ``new``, the regions around its real lesions and the real lesions ``real`` (bool)."""
        ring = border_ring(region)
        g_before, g_after = _gradient(before), _gradient(after)
        self._add(0, g_after[ring]), self._add(1, g_before[ring])
        real_region = np.zeros_like(region)
        for r in real_regions:
            real_region |= r
        if real_region.any():
            self._add(2, g_before[border_ring(real_region)])
            self._add(6, before[real]), self._add(7, before[_rim(real_region) & ~real])
        self._add(4, after[new]), self._add(5, after[_rim(region) & ~new])

    def _add(self, i: int, values: np.ndarray) -> None:
        self.sums[i] += float(values.sum())
        self.counts[i] += values.size

    def _mean(self, i: int) -> float | None:
        return self.sums[i] / self.counts[i] if self.counts[i] else None

    def summary(self) -> dict[str, float | None]:
        """``seam`` (after / before on the new rings), ``real_seam`` (the real lesions' rings / the new
        rings before painting), ``lesion_contrast`` and ``real_lesion_contrast`` (lesion / rim)."""
        after, before, real = self._mean(0), self._mean(1), self._mean(2)
        ratio = lambda a, b: None if a is None or not b else round(float(a / b), 4)  # noqa: E731
        return {"seam": ratio(after, before), "real_seam": ratio(real, before),
                "lesion_contrast": ratio(self._mean(4), self._mean(5)),
                "real_lesion_contrast": ratio(self._mean(6), self._mean(7))}


def _rim(region: np.ndarray) -> np.ndarray:
    """The voxels of ``region`` on its border (inside it)."""
    from scipy import ndimage

    return region & ~ndimage.binary_erosion(region, np.ones((3,) * region.ndim, dtype=bool), border_value=1)
