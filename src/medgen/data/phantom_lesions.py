"""Phantom metastases: how many, how large, where, and their shapes (see :mod:`medgen.data.phantom`).

:func:`draw_lesions` draws the parameters, :func:`place_lesions` the centres in the subject's
parenchyma, :func:`render_lesions` the lesion, necrotic-core and oedema fractions and the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from medgen.data.phantom_anatomy import ramp, smooth_noise

#: metastases wider than this are rendered ring-enhancing with a necrotic core
RING_DIAMETER_MM: float = 10.0
MAX_LESIONS: int = 15
DIAMETER_RANGE_MM: tuple[float, float] = (2.0, 30.0)
#: ``cover``'s diameter ranges: one per RANO-BM size class (tiny, small, medium, large), drawn alike
COVER_RANGES_MM: tuple[tuple[float, float], ...] = ((3.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 40.0))
#: the lesion size distributions :func:`draw_lesions` knows
LESION_SIZES: tuple[str, ...] = ("clinical", "cover")


@dataclass(frozen=True)
class Lesion:
    """One metastasis. ``centre_mm`` is in the subject's world (affine) space; ``None`` while
    only the parameters are drawn (:func:`medgen.data.phantom.sample_lesions`)."""

    diameter_mm: float
    core_fraction: float  # radius of the necrotic core / lesion radius; 0 for solid lesions
    oedema_extent: float  # oedema radius / lesion radius (1.5-3)
    oedema_strength: float  # 0..1, peak oedema fraction
    irregularity: float  # relative amplitude of the smooth radius modulation
    centre_mm: tuple[float, float, float] | None = None

    @property
    def ring(self) -> bool:
        return self.core_fraction > 0.0


def draw_lesions(rng: np.random.Generator, sizes: str = "clinical", max_lesions: int = MAX_LESIONS) -> list[Lesion]:
    """The lesions of one subject: count, diameters, ring/core, oedema and margin irregularity
    (centres ``None``).

    ``sizes="clinical"``: 10 % of subjects without metastases, otherwise a geometric count
    (p = 0.33) capped at ``max_lesions``, so 1-5 lesions in ~87 % of positive subjects with a tail
    of multiple metastases; log-normal diameters, median 7 mm, sigma 0.65 (most brain metastases
    at detection are small; a few exceed 2 cm), clipped to 2-30 mm.
    ``sizes="cover"`` (a benchmark with lesions of every size): 1 to ``max_lesions`` lesions
    (uniform), each in one of the four RANO-BM size classes with equal probability and uniform
    within its range (:data:`COVER_RANGES_MM`: 3-10, 10-20, 20-30, 30-40 mm)."""
    if sizes not in LESION_SIZES:
        raise ValueError(f"unknown lesion sizes {sizes!r}; choose one of {', '.join(LESION_SIZES)}")
    if max_lesions < 1:
        raise ValueError(f"max_lesions must be >= 1, got {max_lesions}")
    if sizes == "clinical":
        count = 0 if rng.random() < 0.10 else min(int(rng.geometric(0.33)), max_lesions)
        diameters = np.clip(np.exp(rng.normal(math.log(7.0), 0.65, count)), *DIAMETER_RANGE_MM)
    else:
        count = int(rng.integers(1, max_lesions + 1))
        ranges = np.asarray(COVER_RANGES_MM)[rng.integers(0, len(COVER_RANGES_MM), count)]
        diameters = rng.uniform(ranges[:, 0], ranges[:, 1])
    lesions = []
    for d in diameters:
        d = float(d)
        core = float(rng.uniform(0.35, 0.7)) if d > RING_DIAMETER_MM else 0.0
        lesions.append(Lesion(
            diameter_mm=d,
            core_fraction=core,
            oedema_extent=float(rng.uniform(1.5, 3.0)),
            oedema_strength=float(rng.uniform(0.6, 1.0) * min(1.0, 0.3 + d / 10.0)),
            irregularity=float(rng.uniform(0.1, 0.3)),
        ))
    return lesions


def place_lesions(rng: np.random.Generator, lesions: list[Lesion], gm: np.ndarray, wm: np.ndarray,
                   depth_mm: np.ndarray, affine: np.ndarray, tries: int = 256) -> list[Lesion]:
    """Centres for ``lesions`` inside parenchyma (GM + WM > 0.5, maps ``[X, Y, Z]``), at least
    0.8 radius deep inside the brain envelope (``depth_mm``), weighted towards the grey/white
    junction (haematogenous metastases lodge where arterioles narrow at the junction: weight
    GM * WM), not overlapping earlier lesions. Rejection sampling from the weighted candidate
    voxels; if no draw satisfies the constraints, the deepest candidates are used."""
    if not lesions:
        return []
    idx = np.flatnonzero((gm + wm).ravel() > 0.5)
    if idx.size == 0:
        raise ValueError("no brain parenchyma on the phantom grid to place lesions in")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    cdf = np.cumsum(gm.ravel()[idx].astype(np.float64) * wm.ravel()[idx] + 0.02)
    depth = depth_mm.ravel()[idx]

    def position(k: np.ndarray) -> np.ndarray:  # candidate index -> world mm, [n, 3]
        vox = np.stack(np.unravel_index(idx[k], gm.shape), axis=-1).astype(np.float64)
        return vox @ affine[:3, :3].T + affine[:3, 3]

    placed: list[Lesion] = []
    centres = np.zeros((0, 3))
    radii = np.zeros(0)
    for les in lesions:
        r = les.diameter_mm / 2.0
        k = np.searchsorted(cdf, rng.uniform(0.0, cdf[-1], tries), side="right").clip(max=idx.size - 1)
        pos = position(k)
        clear = (np.linalg.norm(pos[:, None, :] - centres[None], axis=-1) > r + radii).all(axis=1)
        ok = (depth[k] >= 0.8 * r) & clear
        if not ok.any():
            ok = depth[k] >= 0.8 * r
        if ok.any():
            centre = pos[np.argmax(ok)]
        else:
            deepest = np.flatnonzero(depth >= depth.max() - 1e-3)
            centre = position(deepest[rng.integers(deepest.size)][None])[0]
        centre = centre + rng.uniform(-0.5, 0.5, 3) * spacing
        centres = np.vstack([centres, centre])
        radii = np.append(radii, r)
        placed.append(replace(les, centre_mm=tuple(float(v) for v in centre)))
    return placed


def render_lesions(rng: np.random.Generator, lesions: list[Lesion], affine: np.ndarray,
                    shape: tuple[int, int, int], gm: np.ndarray, wm: np.ndarray,
                    brain_depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lesion fraction ``L``, necrotic-core fraction ``K <= L``, oedema fraction ``E`` and the
    binary mask ``seg``, all ``[X, Y, Z]`` float32. ``seg`` holds every voxel whose centre lies
    inside a lesion (within the brain envelope) and each lesion's centre voxel, so every voxel
    with ``L >= 0.5`` is in it, and ``L > 0`` on all of it.

    Each lesion is an ellipsoid-perturbed sphere whose radius is modulated by smooth noise
    (irregular margins); the core is a concentric irregular sphere; oedema (vasogenic, spreads
    along white matter, spares cortex and CSF) reaches ``oedema_extent`` radii. Everything is
    computed only in the lesion's bounding box."""
    L = np.zeros(shape, np.float32)
    K = np.zeros(shape, np.float32)
    E = np.zeros(shape, np.float32)
    seg = np.zeros(shape, bool)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pv_width = float(np.prod(spacing) ** (1.0 / 3.0))  # partial-volume width of one voxel
    vox_from_world = np.linalg.inv(affine)
    for les in lesions:
        r = les.diameter_mm / 2.0
        centre = np.asarray(les.centre_mm)
        c_vox = vox_from_world[:3, :3] @ centre + vox_from_world[:3, 3]
        # farthest reach of the oedema: extent / (1 - 0.5) (noise) / 0.75 (smallest ellipsoid axis)
        reach = r * max(les.oedema_extent, 1.0) * 2.7 + pv_width
        lo = np.maximum(np.floor(c_vox - reach / spacing), 0).astype(int)
        hi = np.minimum(np.ceil(c_vox + reach / spacing) + 1, shape).astype(int)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
        axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, c_vox, spacing)]
        # random ellipsoid: symmetric matrix near identity, eigenvalues (inverse axis ratios)
        # kept within 0.75-1.25
        sym = rng.normal(0.0, 0.08, (3, 3))
        eigval, eigvec = np.linalg.eigh((sym + sym.T) / 2.0)
        A = eigvec @ np.diag(1.0 + np.clip(eigval, -0.25, 0.25)) @ eigvec.T
        dx, dy, dz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        radius = np.sqrt(sum((A[i, 0] * dx + A[i, 1] * dy + A[i, 2] * dz) ** 2 for i in range(3)))
        # bounded smooth noise in [-1, 1] (std ~0.4): channels 0-2 at the lesion's scale
        # (margin, core, oedema), channel 3 twice as fine (finger-like oedema margin)
        n_ctrl = tuple(max(3, min(6, int(np.ceil(n * s / max(r, 2.0))) + 1)) for n, s in zip(box_shape, spacing))
        noise = np.concatenate([smooth_noise(rng, box_shape, n_ctrl, channels=3),
                                smooth_noise(rng, box_shape, tuple(2 * m for m in n_ctrl))])
        noise = np.clip(noise, -2.5, 2.5) / np.float32(2.5)
        rho = radius / r * (1.0 + les.irregularity * noise[0])  # normalised radius, 1 at the margin
        lesion = ramp((1.0 - rho) * r, pv_width)
        inside = rho <= 1.0
        core = np.zeros_like(lesion)
        if les.ring:
            # rim at least 2 mm (and one voxel) thick, so the ring survives sampling
            c = min(les.core_fraction, 1.0 - max(2.0, float(spacing.max())) / r)
            if c > 0:
                rho_core = rho * (1.0 + 0.1 * noise[1])
                core = np.minimum(ramp((c - rho_core) * r, pv_width), lesion)
        rho_oed = radius / (r * les.oedema_extent) * (1.0 + 0.3 * noise[2] + 0.2 * noise[3])
        oedema = les.oedema_strength * np.clip((1.0 - rho_oed) / 0.4, 0.0, 1.0) ** 0.7
        oedema *= np.clip(wm[box] + 0.35 * gm[box], 0.0, 1.0)
        # never paint the skull: lesions stay within the envelope (+1 voxel of partial volume)
        within = ramp(brain_depth[box] + pv_width, pv_width)
        L[box] = np.maximum(L[box], lesion * within)
        K[box] = np.maximum(K[box], core * within)
        E[box] = np.maximum(E[box], oedema)
        seg[box] |= inside & (within >= 0.5)
        centre_idx = tuple(int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(c_vox, shape))
        seg[centre_idx] = True
        L[centre_idx] = max(L[centre_idx], 0.5)
    E *= 1.0 - L
    return L, np.minimum(K, L), E, seg.astype(np.float32)
