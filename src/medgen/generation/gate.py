"""The stage-1 quality gate: which generated masks are plausible enough to paint.

A mask passes when its lesion area (a fraction of the image) lies in ``[min_area, max_area]``,
it has at most ``max_components`` lesions (8-connected components, as :mod:`medgen.data.masks`
counts them; 26-connected in volumes), none of them is a speck of fewer than
``min_component_pixels`` pixels (:func:`speck_pixels`) and, with
``inside_brain`` and a mask model that generates the brain with the lesions, no lesion pixel lies
outside that brain. Nothing is corrected: a mask passes or is replaced by a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from medgen.data.masks import is_lesion, lesion_sizes
from medgen.data.space import SampleSpace
from medgen.generation.requests import GateRules


#: ``gate.min_component_pixels=null``: a slice's speck is under 4 pixels (a disc about 4 mm across at the
#: 1.9 mm pixels of 128 px slices); a volume's is under the voxels a ball this many mm across fills
SLICE_SPECK_PIXELS = 4
SPECK_BALL_MM = 4.0
#: ``gate.min_area=null``: a slice's lesion pixels must be at least this fraction of it (8 pixels of 128 px,
#: which drops the slices that only graze a lesion); a volume holds its lesions whole, so the speck rule
#: alone bounds them from below (0.0005 of a volume is a ball 19-21 mm across at 32 x 32 x 16 and at
#: 128 x 128 x 64 alike)
SLICE_MIN_AREA = 0.0005


def with_defaults(gate: GateRules, space: SampleSpace) -> GateRules:
    """``gate`` with its null rules set for masks of ``space``: ``min_area`` (:data:`SLICE_MIN_AREA`,
    0 for volumes) and ``min_component_pixels`` (:func:`speck_pixels`)."""
    min_area = space.either(SLICE_MIN_AREA, 0.0) if gate.min_area is None else gate.min_area
    return replace(gate, min_area=min_area, min_component_pixels=speck_pixels(gate, space))


def speck_pixels(gate: GateRules, space: SampleSpace) -> int:
    """``gate.min_component_pixels``, or for null the default for masks of ``space``:
    :data:`SLICE_SPECK_PIXELS`, or the voxels a ball :data:`SPECK_BALL_MM` across fills, at least 1.
    A fixed voxel count would be a different lesion at every voxel size: 4 voxels of 6.75 x 6.75 x
    10 mm make a lesion 15 mm across, and most real masks at that size would be rejected as specks."""
    if gate.min_component_pixels is not None:
        return int(gate.min_component_pixels)
    ball = max(1, math.ceil(math.pi / 6 * SPECK_BALL_MM ** 3 / space.element_mm3 - 1e-9))
    return space.either(SLICE_SPECK_PIXELS, ball)


@dataclass(frozen=True)
class MaskStats:
    """Per-mask measurements, ``[N]`` each (:func:`measure`), or one mask's as plain numbers
    (``stats[i]``)."""

    area: np.ndarray | float  # float64, lesion pixels / image pixels
    components: np.ndarray | int  # int64, connected lesions
    smallest: np.ndarray | int  # int64, pixels of the smallest lesion (0 for an empty mask)
    outside: np.ndarray | int  # int64, lesion pixels outside the brain (0 when no brain was generated)

    def __getitem__(self, i: int) -> "MaskStats":
        """Mask ``i``'s measurements."""
        return MaskStats(area=float(self.area[i]), components=int(self.components[i]),
                         smallest=int(self.smallest[i]), outside=int(self.outside[i]))


def measure(masks: np.ndarray, brains: np.ndarray | None = None) -> MaskStats:
    """Area fraction, lesion count, smallest lesion and lesion pixels outside ``brains`` (if
    given) of each mask ``[N, H, W]`` in {0, 1}."""
    masks = is_lesion(masks)
    outside = np.zeros(masks.shape[0], dtype=np.int64)
    if brains is not None:
        outside = (masks & ~is_lesion(brains)).reshape(masks.shape[0], -1).sum(axis=1).astype(np.int64)
    n = masks.shape[0]
    components = np.zeros(n, dtype=np.int64)
    smallest = np.zeros(n, dtype=np.int64)
    for i, m in enumerate(masks):
        sizes = lesion_sizes(m)
        components[i] = len(sizes)
        if len(sizes):
            smallest[i] = int(sizes.min())
    area = masks.reshape(n, -1).mean(axis=1)
    return MaskStats(area=area, components=components, smallest=smallest, outside=outside)


def failures(stats: MaskStats, gate) -> dict[str, np.ndarray]:
    """The rules of ``gate`` (the ``gate`` config: min_area, max_area, max_components,
    min_component_pixels, inside_brain), each as ``[N]`` bool: which masks break it, under a name a
    user reads. A mask without lesion breaks only ``no lesion``; others may break several."""
    lesion = stats.components >= 1
    rules = {"no lesion": ~lesion,
             f"lesion area < gate.min_area={gate.min_area}": lesion & (stats.area < gate.min_area),
             f"lesion area > gate.max_area={gate.max_area}": stats.area > gate.max_area,
             f"lesions > gate.max_components={gate.max_components}": stats.components > gate.max_components,
             f"a lesion < gate.min_component_pixels={gate.min_component_pixels}":
                 lesion & (stats.smallest < gate.min_component_pixels)}
    if gate.inside_brain:
        rules["lesion outside the brain (gate.inside_brain)"] = stats.outside > 0
    return rules


def passes(stats: MaskStats, gate) -> np.ndarray:
    """``[N]`` bool: which masks pass ``gate``: those that break none of its :func:`failures`.
    A disabled gate passes every mask."""
    if not gate.enabled:
        return np.ones(stats.area.shape, dtype=bool)
    return ~np.any(list(failures(stats, gate).values()), axis=0)
