"""The stage-1 quality gate: which generated masks are plausible enough to paint.

A mask passes when its lesion area (a fraction of the image) lies in ``[min_area, max_area]``,
it has at most ``max_components`` lesions (8-connected components, as :mod:`medgen.data.masks`
counts them), none of them is a speck of fewer than ``min_component_pixels`` pixels and, with
``inside_brain`` and a mask model that generates the brain with the lesions, no lesion pixel lies
outside that brain. Nothing is corrected: a mask passes or is replaced by a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medgen.data.masks import is_lesion, lesion_sizes


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
