"""The brain of an image: where a lesion may lie (see docs/architecture.md, Anatomy).

The brain mask is derived from an image, never read from a file, so a dataset needs nothing
beyond its images and lesion masks. :func:`brain_mask` works on one preprocessed axial slice in
[0, 1] (any T1, T2/FLAIR-like contrast with a darker skull between the brain and the scalp):

1. the head is every pixel above :data:`HEAD_INTENSITY`;
2. tissue is every pixel above :data:`OTSU_FRACTION` x the Otsu threshold of the head's pixels;
3. one erosion (4-neighbourhood) cuts the thin bridges between brain and scalp; the connected
   pieces of at least :data:`KEEP_FRACTION` of the largest are kept, except rings (a piece whose
   filled outline is more than twice its area: the scalp around the head);
4. the kept pieces grow back by two pixels within the head (taking in the dark rim of a lesion at
   the brain's surface), two closings join them across sulci, and holes (ventricles, necrotic
   lesion cores) are filled.

On the phantoms (whose true brain is known) it matches the true brain with a mean slice Dice of
0.87-0.93 for the four contrasts at 64 and 128 px (slices with brain on a tenth of the image;
tests/unit/test_brain.py checks >= 0.88 on bravo), and holds every phantom lesion pixel. The slice cache stores it as the channel ``brain`` (:data:`BRAIN_KEY`) and adds the
lesion mask to it (a lesion is part of the brain by definition), so on training data every
lesion pixel lies inside the brain. On generated images it measures where the lesions ended up
(:func:`inside_fraction`).

The heuristic was tuned on phantoms; on real heads it keeps the scalp and misses the vertex.
:func:`brain_of` also runs two whole-volume methods (``data.brain_method``, docs/brain.md):
``deepbet`` (:mod:`medgen.data.brain_deepbet`) and ``bet`` (:mod:`medgen.data.brain_bet`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medgen.data.masks import is_lesion

__all__ = ["BRAIN_METHODS", "HEAD_INTENSITY", "OTSU_FRACTION", "KEEP_FRACTION", "brain_mask", "brain_of",
           "brain_source", "convex_hull", "inside_counts", "inside_fraction", "otsu_threshold"]

#: how a brain mask is derived (``data.brain_method``; docs/brain.md): ``heuristic`` (:func:`brain_mask`,
#: slice by slice), ``deepbet`` (a 3D network on the whole volume, :mod:`medgen.data.brain_deepbet`) or
#: ``bet`` (BET's surface model on the whole volume, :mod:`medgen.data.brain_bet`)
BRAIN_METHODS: tuple[str, ...] = ("heuristic", "deepbet", "bet")

#: a pixel brighter than this (after percentile scaling to [0, 1]) belongs to the head
HEAD_INTENSITY: float = 0.1
#: tissue is brighter than this fraction of the Otsu threshold of the head's pixels
OTSU_FRACTION: float = 0.6
#: pieces of tissue at least this fraction of the largest one are brain (both temporal lobes and
#: the cerebellum at the skull base are separate pieces of one slice)
KEEP_FRACTION: float = 0.25
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu, 1979)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or values.max() - values.min() < 1e-6:  # one level: nothing to split
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _slice_brain(image: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    head = image > HEAD_INTENSITY
    if head.sum() < 16:
        return np.zeros(image.shape, dtype=bool)
    tissue = image > OTSU_FRACTION * otsu_threshold(image[head])
    labels, n = ndimage.label(ndimage.binary_erosion(tissue, _CROSS))
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.zeros(image.shape, dtype=bool)
    for label in np.flatnonzero(sizes >= KEEP_FRACTION * sizes.max()) + 1:
        piece = labels == label
        filled = ndimage.binary_fill_holes(piece)
        if filled.sum() <= 2 * piece.sum():  # a ring is the scalp
            kept |= filled
    brain = ndimage.binary_dilation(kept, _CROSS, iterations=2) & head
    brain = ndimage.binary_closing(brain, _CROSS, iterations=2)
    return ndimage.binary_fill_holes(brain)


def brain_mask(images: np.ndarray) -> np.ndarray:
    """The brain of each axial slice ``[..., H, W]`` (values in [0, 1]) as booleans of the same shape."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 2:
        raise ValueError(f"brain_mask needs [..., H, W] slices, got shape {images.shape}")
    flat = images.reshape(-1, *images.shape[-2:])
    return np.stack([_slice_brain(s) for s in flat]).reshape(images.shape)


def brain_of(image: np.ndarray, method: str = "heuristic", spacing: Sequence[float] | None = None) -> np.ndarray:
    """The brain of one RAS slice ``[X, Y]`` or volume ``[X, Y, Z]`` as booleans of its shape, by
    ``method`` (:data:`BRAIN_METHODS`): ``heuristic`` axial slice by axial slice (:func:`brain_mask`,
    ``image`` in [0, 1]); ``deepbet`` or ``bet`` on the whole volume (voxel size ``spacing`` in mm,
    default 1 mm). A single slice has no volume to run them on: it always takes the heuristic. This
    is the one function training caches and generated samples derive their brain with."""
    if method not in BRAIN_METHODS:
        raise ValueError(f"unknown brain method {method!r} (one of {', '.join(BRAIN_METHODS)})")
    image = np.asarray(image)
    if method != "heuristic" and image.ndim == 3:
        from medgen.data import brain_bet, brain_deepbet

        run = brain_bet.bet_brain if method == "bet" else brain_deepbet.deepbet_brain
        return run(image, (1.0, 1.0, 1.0) if spacing is None else spacing)
    planes = np.moveaxis(image, (0, 1), (-2, -1))  # [X, Y, *rest] -> [*rest, X, Y]
    return np.moveaxis(brain_mask(planes), (-2, -1), (0, 1))


def inside_counts(masks: np.ndarray, brains: np.ndarray) -> tuple[int, int]:
    """``(lesion pixels of masks inside brains, lesion pixels)`` (same shapes)."""
    lesion = is_lesion(masks)
    return int((lesion & np.asarray(brains, dtype=bool)).sum()), int(lesion.sum())


def inside_fraction(masks: np.ndarray, brains: np.ndarray) -> float:
    """The fraction of lesion pixels of ``masks`` that lie inside ``brains`` (same shape); NaN
    when the masks hold no lesion pixel."""
    inside, total = inside_counts(masks, brains)
    return inside / total if total else float("nan")


def brain_source(image_keys: Sequence[str], brain_from: str) -> str:
    """The image of ``image_keys`` a generated sample's brain is derived from: ``brain_from`` (what
    the training data used) when it is one of them, else the first."""
    return brain_from if brain_from in image_keys else image_keys[0]


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask [H, W]`` and every pixel whose centre lies in the convex hull of its
    pixels (taken as unit squares), as booleans; an empty mask stays empty. A volume ``[X, Y, Z]``:
    the hull of each axial slice (the brain is drawn slice by slice, as it is derived)."""
    from scipy.spatial import ConvexHull, QhullError

    if np.ndim(mask) == 3:
        return np.stack([convex_hull(mask[..., z]) for z in range(mask.shape[-1])], axis=-1)
    pts = np.argwhere(np.asarray(mask) > 0)
    out = np.asarray(mask) > 0
    if len(pts) == 0:
        return out
    corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])[None]).reshape(-1, 2)
    try:
        hull = ConvexHull(corners)
    except QhullError:  # all corners on a line cannot happen for unit squares; keep the mask as it is
        return out
    grid = np.indices(out.shape).reshape(2, -1).T.astype(np.float64)  # pixel centres [H*W, 2]
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    return out | inside.reshape(out.shape)
