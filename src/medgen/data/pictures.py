"""RGB pictures of slices, and PNG files: what generation previews, contact sheets, the evaluation
report and the training sample grids are made of.

A tile is one RAS plane ``[X, Y]`` in [0, 1] shown in radiological display (as ``medgen-data
preview``), grey, optionally with a mask outlined in :data:`OUTLINE_RGB`, enlarged by whole
pixels. Tiles are laid out side by side (:func:`side_by_side`) or in rows on a sheet
(:func:`contact_sheet`), both on white. Pictures are ``[H, W, 3]`` uint8 arrays until
:func:`save_png` writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medgen.core.fs import atomic_write
from medgen.data.masks import is_lesion
from medgen.data.transforms import ras_to_display

#: the red of the mask outline in every picture
OUTLINE_RGB = (255, 42, 42)
WHITE = 255


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a mask ``[H, W]`` (its lesion pixels minus their erosion), as booleans."""
    from scipy import ndimage

    m = is_lesion(mask)
    return m & ~ndimage.binary_erosion(m)


def render_tile(image: np.ndarray, mask: np.ndarray | None, scale: int | tuple[int, int] = 2) -> np.ndarray:
    """One picture ``[H', W', 3]`` uint8: a RAS plane ``[X, Y]`` in [0, 1] in radiological display
    (as ``medgen-data preview`` and the training sample grids), the mask outlined in red, each
    pixel enlarged to ``scale`` x ``scale`` (or ``(rows, columns)`` for non-square voxels)."""
    gray = (np.clip(ras_to_display(image), 0, 1) * 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if mask is not None:
        rgb[outline(ras_to_display(mask))] = OUTLINE_RGB
    rows, cols = (scale, scale) if isinstance(scale, int) else scale
    return np.repeat(np.repeat(rgb, rows, axis=0), cols, axis=1) if rows * cols > 1 else rgb


def plane_centre(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, ...]:
    """The voxel the three planes of :func:`render_planes` cross: the centre of mass of the
    largest lesion of ``mask`` (26-connected), or the volume's centre without lesion."""
    if mask is not None and is_lesion(mask).any():
        from medgen.data.masks import lesion_labels

        labels, _ = lesion_labels(mask)
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        return tuple(int(round(float(c))) for c in np.argwhere(labels == largest).mean(axis=0))
    return tuple(int(n) // 2 for n in shape)


def render_planes(volume: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  scale: int = 2, centre: Sequence[int] | None = None) -> np.ndarray:
    """A RAS volume ``[X, Y, Z]`` in [0, 1] as three tiles side by side: the axial, coronal and
    sagittal planes through ``centre`` (default :func:`plane_centre`: the largest lesion), each in
    radiological display (superior at the top of the coronal and sagittal planes), the mask
    outlined, voxels drawn in proportion to ``spacing`` (mm; the finest axis ``scale`` pixels)."""
    x, y, z = plane_centre(mask, volume.shape) if centre is None else centre
    finest = min(float(s) for s in spacing)
    factor = [max(1, round(scale * float(s) / finest)) for s in spacing]
    planes = ((np.s_[:, :, z], (1, 0)), (np.s_[:, y, :], (2, 0)), (np.s_[x, :, :], (2, 1)))
    tiles = [render_tile(volume[index], None if mask is None else mask[index], (factor[r], factor[c]))
             for index, (r, c) in planes]
    return side_by_side(tiles, gap=2)


def side_by_side(pictures: Sequence[np.ndarray], gap: int) -> np.ndarray:
    """Pictures ``[H_i, W_i, 3]`` in one row, top-aligned, ``gap`` white columns between them; the
    shorter ones are filled up with white to the tallest."""
    h = max(p.shape[0] for p in pictures)
    space = np.full((h, gap, 3), WHITE, dtype=np.uint8)
    row = [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=WHITE) for p in pictures]
    return np.concatenate([q for p in row for q in (p, space)][:-1], axis=1)


def contact_sheet(tiles: Sequence[np.ndarray], columns: int = 8, pad: int = 4) -> np.ndarray:
    """Tiles ``[H, W, 3]`` (one size) on a white sheet, ``columns`` per row, ``pad`` pixels apart
    and from the edges."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), WHITE, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return sheet


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """``array`` (uint8 ``[H, W, 3]`` RGB or ``[H, W]`` grey) as a PNG file, written atomically;
    missing parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
