"""The inpainting painter (``mode=inpaint``): paints the images inside a hidden region of a real scan.

The network sees ``[x_t (out), known (out), region (1), seg, brain]``: ``x_t`` of the images, the
scan's own images with the region hidden (-1 in model space inside it), the region (+1 inside, -1
outside), the lesion mask and the brain; it predicts the images (the loss covers the whole window,
so it also learns to reproduce what it is shown). Generation paints new lesions into real scans,
window by window, with :meth:`InpaintMode.inpaint_condition`.

Training regions (:meth:`InpaintMode.split`), per item: with probability ``mode.lesion_fraction``
and if the item has a lesion, its lesion mask dilated by ``mode.margin`` voxels (a cube of
``2 * margin + 1`` voxels, within the item); otherwise a ball of radius uniform in
``[1, mode.max_radius]`` voxels at a brain voxel drawn uniformly (the item's centre when it shows no
brain). Then a window of ``mode.window`` (null: the whole item) is cut around the region: at a random
offset that keeps the region's bounding box inside the window when it fits (else a window inside the
box), within the item. ``x0`` and the condition are the window's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.data.transforms import from_model_space
from medgen.diffusion.modes import _NDIMS, _MaskConditionedMode, register_mode

__all__ = ["InpaintMode", "FIXED_REGION_SEED"]

#: the seed of the regions drawn without a generator (validation loss, sample grids): each item draws
#: from a CPU generator of its own, seeded with this plus its numbers of brain and lesion voxels, so its
#: region depends on the item alone (not on its batch, nor the number of processes) and differs between items
FIXED_REGION_SEED = 0x1A9A
#: uniforms drawn per item before the window offsets (one per axis): at a lesion?, radius, brain voxel
_DRAWS = 3


@register_mode
class InpaintMode(_MaskConditionedMode):
    """``[x_t, known, region, seg, brain] -> images`` (``bravo``, or ``t1_pre`` + ``t1_gd``) inside the region.

    Attributes:
        window: ``mode.window``: None (the whole item), an int W (W x W slice windows) or ``(X, Y, Z)``.
        lesion_fraction: probability that a training region is the item's lesions (dilated).
        margin: voxels a lesion region extends around the lesion.
        max_radius: largest radius (voxels) of a random ball region.
    """

    name = "inpaint"
    num_image_keys = (1, 2)
    # num_cond_keys (1, 2) is inherited so that cond_keys=[seg] is refused saying that it needs 'brain'
    required_cond_keys = (MASK_KEY, BRAIN_KEY)
    paints_into_scans: ClassVar[bool] = True

    def __init__(self, cfg_mode: Any):
        super().__init__(cfg_mode)
        window = cfg_mode["window"]
        self.window: int | tuple[int, ...] | None = \
            window if window is None or isinstance(window, int) else tuple(int(w) for w in window)
        self.lesion_fraction = float(cfg_mode["lesion_fraction"])
        self.margin = int(cfg_mode["margin"])
        self.max_radius = float(cfg_mode["max_radius"])

    @property
    def cond_channels(self) -> int:
        """``known (out) + region (1) + seg + brain``."""
        return self.out_channels + 1 + len(self.cond_keys)

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The window's shape for items of ``shape`` (``shape`` itself when ``mode.window`` is null)."""
        if self.window is None:
            return tuple(shape)
        window = (self.window,) * 2 if isinstance(self.window, int) else self.window
        if len(window) != len(shape) or isinstance(self.window, int) != (len(shape) == 2):
            raise ValueError(f"mode.window={self.window} does not fit items of shape {tuple(shape)} (an int W for "
                             "slices, [X, Y, Z] for volumes)")
        if any(w > s for w, s in zip(window, shape)):
            raise ValueError(f"mode.window={self.window} is larger than the items {tuple(shape)}")
        return window

    # ---------------------------------------------------------------- the condition
    def inpaint_condition(self, known: Tensor, region: Tensor, cond: Tensor) -> Tensor:
        """The condition ``[B, cond_channels, *S]``: ``known`` with the region hidden (-1), the region
        (+1 inside, -1 outside), then ``cond``.

        Args:
            known: ``[B, out_channels, *S]`` the scan's images, model space.
            region: ``[B, 1, *S]`` in {0, 1} (bool or float): where to paint.
            cond: ``[B, 2, *S]`` model space: the lesion mask and the brain (``cond_keys`` order).
        """
        if known.ndim not in _NDIMS or known.shape[1] != self.out_channels:
            raise ValueError(f"known must be [B, {self.out_channels}, *S], got {tuple(known.shape)}")
        spatial = (known.shape[0], *known.shape[2:])
        for what, x, c in (("region", region, 1), ("cond", cond, len(self.cond_keys))):
            if x.ndim != known.ndim or x.shape[1] != c or (x.shape[0], *x.shape[2:]) != spatial:
                raise ValueError(f"{what} must be [B, {c}, *S] like known {tuple(known.shape)}, got {tuple(x.shape)}")
        inside = region.to(known.device) > 0.5
        hidden = torch.where(inside, torch.full_like(known, -1.0), known)
        return torch.cat([hidden, 2 * inside.to(known.dtype) - 1, cond.to(known)], dim=1)

    def null_cond(self, cond: Tensor | None) -> Tensor:
        """Guidance's "no lesion given": the lesion mask and the brain background (-1); the scan
        (known, region) is kept, so guidance strengthens the lesion, never the scan."""
        cond = self._check_cond(cond)
        null = cond.clone()
        null[:, self.out_channels + 1:] = -1.0
        return null

    # ---------------------------------------------------------------- training regions
    def split(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``batch`` -> ``(x0 [B, out, *W], cond [B, cond_channels, *W])`` of each item's training
        window ``W`` (:meth:`sample_shape`), its region drawn from ``generator`` (None: each item from
        a CPU generator of its own, :data:`FIXED_REGION_SEED`: deterministic)."""
        x0, cond = super().split(batch)  # [B, out, *S], [B, 2, *S]
        spatial = tuple(x0.shape[2:])
        window = self.sample_shape(spatial)
        seg = cond[:, self.cond_keys.index(MASK_KEY)][:, None] > 0
        brain = cond[:, self.cond_keys.index(BRAIN_KEY)][:, None] > 0
        u = _uniforms(seg, brain, generator)
        region = self.training_regions(seg, brain, u)
        starts = _window_starts(region, window, u[:, _DRAWS:])
        x0, cond, region = (_crop(t, starts, window) for t in (x0, cond, region))
        return x0, self.inpaint_condition(x0, region, cond)

    def training_regions(self, seg: Tensor, brain: Tensor, u: Tensor) -> Tensor:
        """Each item's region ``[B, 1, *S]`` (bool) from its lesion mask and brain (``[B, 1, *S]`` bool)
        and its uniforms ``u [B, >= 3]`` (:func:`_uniforms`): its dilated lesions (``u[:, 0] <
        lesion_fraction`` and a lesion), else a ball in the brain."""
        spatial = tuple(seg.shape[2:])
        dilated = seg
        if self.margin > 0:
            pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
            dilated = pool(seg.float(), 2 * self.margin + 1, stride=1, padding=self.margin) > 0
        at_lesion = (u[:, 0] < self.lesion_fraction) & seg.flatten(1).any(1).cpu()
        regions = []
        for i in range(seg.shape[0]):
            if at_lesion[i]:
                regions.append(dilated[i])
                continue
            voxels = brain[i, 0].nonzero()
            centre = voxels[min(int(u[i, 2] * len(voxels)), len(voxels) - 1)].tolist() if len(voxels) else \
                [s // 2 for s in spatial]
            radius = 1.0 + float(u[i, 1]) * (self.max_radius - 1.0)
            regions.append(_ball(spatial, centre, radius, seg.device)[None])
        return torch.stack(regions)

    def grid_columns(self, batch: Mapping[str, Tensor], cond: Tensor | None) -> list[tuple[str, Tensor]]:
        """The sample grid's condition columns: each known image of the window, the region and the
        window's lesion mask, ``[B, 1, *W]`` in [0, 1]."""
        out = self.out_channels
        columns = [(f"{k} known", from_model_space(cond[:, i : i + 1])) for i, k in enumerate(self.image_keys)]
        columns.append(("region", from_model_space(cond[:, out : out + 1])))
        seg = out + 1 + self.cond_keys.index(MASK_KEY)
        return columns + [(MASK_KEY, from_model_space(cond[:, seg : seg + 1]))]


def _uniforms(seg: Tensor, brain: Tensor, generator: torch.Generator | None) -> Tensor:
    """``[B, 3 + ndim]`` float64 uniforms on the CPU for items with lesion masks and brains ``seg``,
    ``brain`` (``[B, 1, *S]`` bool): per item, whether at a lesion, the radius, the brain voxel, then one
    window offset per axis; from ``generator``, or without one from :data:`FIXED_REGION_SEED`."""
    k = _DRAWS + seg.ndim - 2
    if generator is not None:
        return torch.rand(seg.shape[0], k, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    counts = torch.stack([brain.flatten(1).sum(1), seg.flatten(1).sum(1)], 1).tolist()
    return torch.stack([torch.rand(k, dtype=torch.float64, generator=torch.Generator().manual_seed(
        FIXED_REGION_SEED + n_brain + 1_000_003 * n_lesion)) for n_brain, n_lesion in counts])


def _ball(spatial: tuple[int, ...], centre: list[int], radius: float, device: torch.device) -> Tensor:
    """``[*spatial]`` bool: the voxels within ``radius`` of ``centre``."""
    d2 = torch.zeros(spatial, device=device)
    for axis, (n, c) in enumerate(zip(spatial, centre)):
        shape = [1] * len(spatial)
        shape[axis] = n
        d2 = d2 + ((torch.arange(n, device=device) - c) ** 2).view(shape).float()
    return d2 <= radius**2


def _window_starts(region: Tensor, window: tuple[int, ...], u: Tensor) -> list[tuple[int, ...]]:
    """Per item, the window's first voxel: uniform (``u [B, ndim]``) among the offsets that keep the
    region's bounding box inside the window (a box larger than the window: the window inside the box),
    within the item."""
    spatial = region.shape[2:]
    coords = region[:, 0].nonzero().cpu()  # [N, 1 + ndim]
    starts = []
    for i in range(region.shape[0]):
        mine = coords[coords[:, 0] == i, 1:]
        item = []
        for axis, (w, s) in enumerate(zip(window, spatial)):
            lo, hi = (int(mine[:, axis].min()), int(mine[:, axis].max()) + 1) if len(mine) else (0, s)
            first, last = (max(0, hi - w), min(lo, s - w)) if hi - lo <= w else (lo, min(hi - w, s - w))
            item.append(min(first + int(float(u[i, axis]) * (last - first + 1)), last))
        starts.append(tuple(item))
    return starts


def _crop(x: Tensor, starts: list[tuple[int, ...]], window: tuple[int, ...]) -> Tensor:
    """``[B, C, *window]``: each item's window from ``x [B, C, *S]``."""
    if tuple(x.shape[2:]) == tuple(window):
        return x
    return torch.stack([x[(i, slice(None), *(slice(a, a + w) for a, w in zip(start, window)))]
                        for i, start in enumerate(starts)])
