"""Insertion's painters: what fills the region around each new lesion (``insert.painter``).

* ``inpaint``: a ``mode=inpaint`` model (:mod:`medgen.diffusion.inpaint`) paints the region given the
  scan around it (the region hidden), the region, the lesion mask and the brain; it was trained to
  do exactly that on real scans.
* ``repaint``: a bravo/dual image model (mask -> image) paints the whole window while the scan
  outside the region is put back at every step (RePaint's replacement,
  :meth:`medgen.generation.models.Stage.sample` with ``known``); no new training.
* ``copy``: the images around a real lesion (its shape's box) blended in with a feathered edge:
  weight 1 on the lesion, falling linearly to 0 at the region's border. The yardstick.

A diffusion painter works on **windows** of its model's sample shape (a ``mode.window`` of an
inpaint model, the whole sample of a bravo model) centred on each region and cut to the scan, so a
painter trained on windows paints lesions into scans larger than them. Outside its region a
painted scan equals the scan (every painter composites ``where(region, painted, scan)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.data.transforms import from_model_space, to_model_space
from medgen.generation.insert_place import Placed, Shape
from medgen.generation.models import GenerationError, Stage

__all__ = ["Window", "window_box", "painter_window", "paint_windows", "copy_into", "PAINT_STREAM"]

PAINT_STREAM = 14


@dataclass(frozen=True)
class Window:
    """One window to paint: of scan ``sample`` (its index in the batch), the box the painter sees
    (``box``), the region inside it (bool, the box's shape), and the seed of its noise."""

    sample: int
    box: tuple[slice, ...]
    region: np.ndarray
    seed: int


def painter_window(stage: Stage) -> tuple[int, ...]:
    """The shape a painter model paints at once: its mode's sample shape (an inpaint model's
    window, else its whole sample)."""
    shape = tuple(stage.space.shape)
    sample_shape = getattr(stage.mode, "sample_shape", None)
    return tuple(sample_shape(shape)) if sample_shape is not None else shape


def window_box(placed: Placed, scan_shape: Sequence[int], window: Sequence[int]) -> tuple[slice, ...] | None:
    """The box of ``window``'s shape centred on a placed region and moved inside the scan; None if the
    region does not fit in it."""
    box = []
    for c, n, w, r in zip(placed.centre, scan_shape, window, placed.box):
        start = int(np.clip(c - w // 2, 0, n - w))
        if r.start < start or r.stop > start + w:
            return None
        box.append(slice(start, start + w))
    return tuple(box)


def paint_windows(stage: Stage, painter: str, images: list[np.ndarray], masks: list[np.ndarray],
                  brains: list[np.ndarray], windows: list[Window], steps: int, sampler: str,
                  guidance: float, batch_size: int) -> list[np.ndarray]:
    """The painted images ``[C, *window]`` in [0, 1] of each window, ``batch_size`` windows at a time.
    ``images[k] [C, *scan]``, ``masks[k]``, ``brains[k]`` (bool ``[*scan]``): sample ``k``'s scan, its
    lesion mask with the new lesions, its brain (``windows[i].sample`` indexes them)."""
    out: list[np.ndarray] = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        known = torch.from_numpy(np.stack([images[w.sample][(slice(None), *w.box)] for w in chunk])).float()
        region = torch.from_numpy(np.stack([w.region for w in chunk]))[:, None]
        planes = {MASK_KEY: [masks[w.sample][w.box] for w in chunk], BRAIN_KEY: [brains[w.sample][w.box] for w in chunk]}
        cond = torch.from_numpy(np.stack([np.stack(planes[k]) for k in _cond_keys(stage)], 1).astype(np.float32))
        gens = [torch.Generator(device=stage.device).manual_seed(w.seed) for w in chunk]
        known_m, cond_m = to_model_space(known).to(stage.device), to_model_space(cond).to(stage.device)
        region = region.to(stage.device)
        if painter == "inpaint":
            x0 = stage.sample(stage.mode.inpaint_condition(known_m, region, cond_m), gens, steps=steps,
                              sampler=sampler, guidance_scale=guidance, batch_size=batch_size)
        else:
            x0 = stage.sample(cond_m, gens, steps=steps, sampler=sampler, guidance_scale=guidance,
                              batch_size=batch_size, known=known_m, region=region.bool())
        painted = from_model_space(x0.float()).clamp(0, 1).cpu()
        painted = torch.where(region.cpu().bool(), painted, known)
        out.extend(p.numpy() for p in painted)
    return out


def _cond_keys(stage: Stage) -> tuple[str, ...]:
    keys = tuple(stage.mode.cond_keys)
    if MASK_KEY not in keys:
        raise GenerationError(f"image_checkpoint={stage.path}: a painter is conditioned on the lesion mask "
                              f"(mode.cond_keys has {MASK_KEY!r}); this model's are {list(keys)}")
    return keys


def copy_into(images: np.ndarray, shape: Shape, placed: Placed, margin: int) -> None:
    """Blend the images around a real lesion (``shape.images``) into ``images [C, *scan]`` at
    ``placed``, in place: weight 1 on the lesion, falling linearly to 0 over ``margin + 1`` voxels,
    0 outside the region."""
    from scipy import ndimage

    grow = margin + 1
    frame = placed.region.shape
    offset = shape.pad - grow
    donor = shape.images[(slice(None), *(slice(offset, offset + n) for n in frame))]
    if donor.shape[1:] != frame:  # the frame's odd side may reach one voxel past the shape's images
        donor = np.pad(donor, [(0, 0), *((0, n - d) for n, d in zip(frame, donor.shape[1:]))], mode="edge")
    distance = ndimage.distance_transform_edt(~placed.lesion)
    weight = np.clip(1.0 - distance / (grow + 1), 0.0, 1.0) * placed.region
    target = images[(slice(None), *placed.box)]
    images[(slice(None), *placed.box)] = (1 - weight) * target + weight * donor
