"""Phantom anatomy: the MNI152 template warped into one subject's head (see :mod:`medgen.data.phantom`).

:func:`warp_anatomy` maps the template's grey matter, white matter and CSF onto the output grid
through a random affine and a smooth elastic field, and models the rest of the head (CSF, dura,
skull, marrow, muscle, fat, skin) as layers at a signed distance from the brain envelope.
:func:`smooth_noise` and :func:`ramp` are the random fields and partial-volume edges the lesions
use too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from medgen.data.nifti_dataset import geometry_mismatches

#: field of view in mm (left-right, posterior-anterior, inferior-superior); spacing = FOV / grid
FOV_MM: tuple[float, float, float] = (216.0, 216.0, 160.0)
#: MNI coordinate (mm) that lands at the centre of the output grid: the middle of the head
HEAD_CENTRE_MNI: tuple[float, float, float] = (0.0, -18.0, 11.0)
#: MNI152 is larger than a native adult brain (affine registrations to it scale up by 5-10 %),
#: so subjects are the template shrunk by this factor before the random per-subject scale
NATIVE_SCALE: float = 0.94
# Tissue classes of the intensity model; each image is sum_t fraction_t * intensity_t.
TISSUES: tuple[str, ...] = ("wm", "gm", "csf", "dura", "bone", "marrow", "muscle", "fat", "skin")
# Head layers outside the brain, from the envelope surface outward: (tissue, thickness range mm).
# Typical adult values: subarachnoid space 1-3 mm, dura ~1 mm, calvarium 5-8 mm as
# inner table / diploe / outer table, galea or temporalis 1-2 mm (thicker at the temples),
# subcutaneous fat 3-5 mm, skin ~1.5 mm.
_HEAD_LAYERS: tuple[tuple[str, tuple[float, float], float], ...] = (
    # tissue, mean thickness range (mm), relative smooth variation over the head
    ("csf", (1.0, 2.5), 0.3),
    ("dura", (0.8, 1.2), 0.1),
    ("bone", (1.2, 2.0), 0.2),
    ("marrow", (1.5, 3.5), 0.6),  # diploe: patchy, nearly absent in places
    ("bone", (1.2, 2.0), 0.2),
    ("muscle", (1.0, 2.0), 0.3),
    ("fat", (2.5, 4.5), 0.3),
    ("skin", (1.2, 2.0), 0.15),
)


# --------------------------------------------------------------------------- template


@dataclass(frozen=True)
class _Template:
    gm: np.ndarray  # [197, 233, 189] float32 grey-matter fraction
    wm: np.ndarray  # white-matter fraction
    csf: np.ndarray  # intracranial CSF fraction = brain mask - GM - WM
    dist: np.ndarray  # signed distance (mm = template voxels) to the smoothed brain envelope, < 0 inside
    vox_from_mni: np.ndarray  # 4x4: MNI mm -> template voxel


@functools.lru_cache(maxsize=1)
def load_template() -> _Template:
    """Load nilearn's MNI152 2009 T1, GM and WM templates (local files, no download) once per
    process and derive the maps the phantom samples from."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    grids = [(f"MNI152 {name} template", img.shape, img.affine)
             for name, img in (("T1", t1_img), ("GM", gm_img), ("WM", wm_img))]
    mismatches = geometry_mismatches(grids)
    if mismatches:
        raise RuntimeError("nilearn's MNI152 T1/GM/WM templates are not on one grid: "
                           + "; ".join(f"{m.path}: {m.message}" for m in mismatches))
    brain = np.asarray(t1_img.dataobj, dtype=np.float32) > 0  # skull-stripped: non-zero = brain
    gm = np.clip(np.asarray(gm_img.dataobj, dtype=np.float32), 0.0, 1.0)
    wm = np.clip(np.asarray(wm_img.dataobj, dtype=np.float32), 0.0, 1.0)
    excess = np.maximum(gm + wm, 1.0)  # the two probability maps may sum past 1 by rounding
    gm, wm = gm / excess, wm / excess
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    # The skull follows the smooth outline of the brain, not its gyri: close the sulci by
    # thresholding a 4 mm Gaussian of the mask, then take the signed Euclidean distance
    # (half-voxel offsets put the zero level between inside and outside voxels).
    envelope = ndimage.gaussian_filter(brain.astype(np.float32), sigma=4.0) > 0.35
    dist = np.where(envelope,
                    0.5 - ndimage.distance_transform_edt(envelope),
                    ndimage.distance_transform_edt(~envelope) - 0.5).astype(np.float32)
    return _Template(gm=gm, wm=wm, csf=csf, dist=dist,
                     vox_from_mni=np.linalg.inv(np.asarray(t1_img.affine, dtype=np.float64)))


# --------------------------------------------------------------------------- helpers


def grid_affine(size: int, slices: int) -> np.ndarray:
    """4x4 RAS affine of the ``[size, size, slices]`` output grid: spacing ``FOV_MM / shape``,
    world origin (0, 0, 0) at the grid centre."""
    shape = np.array([size, size, slices], dtype=np.float64)
    spacing = np.asarray(FOV_MM) / shape
    affine = np.diag(np.append(spacing, 1.0))
    affine[:3, 3] = -(shape - 1.0) / 2.0 * spacing
    return affine


def _axis_basis(n: int, n_ctrl: int) -> np.ndarray:
    """``[n, n_ctrl]`` Gaussian interpolation weights from ``n_ctrl`` evenly spaced control
    points to ``n`` samples, rows normalised to sum 1 (a partition of unity)."""
    x = np.linspace(0.0, 1.0, n, dtype=np.float64)[:, None]
    c = np.linspace(0.0, 1.0, n_ctrl, dtype=np.float64)[None, :]
    width = 1.0 / max(n_ctrl - 1, 1)
    w = np.exp(-0.5 * ((x - c) / width) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], n_ctrl: Sequence[int],
                 channels: int = 1) -> np.ndarray:
    """Smooth random field ``[channels, *shape]`` float32 with unit variance at every voxel:
    i.i.d. N(0, 1) control values on a coarse ``n_ctrl`` lattice, interpolated separably with
    Gaussian weights (a low-resolution random field upsampled)."""
    coeff = rng.standard_normal((channels, *n_ctrl))
    bases = [_axis_basis(n, m) for n, m in zip(shape, n_ctrl)]
    norm = 1.0
    field_ = coeff
    for axis, basis in enumerate(bases):
        # contract control axis (axis + 1) with the basis, putting the sample axis back in place
        field_ = np.moveaxis(np.tensordot(field_, basis, axes=([axis + 1], [1])), -1, axis + 1)
        norm = norm * np.sqrt((basis ** 2).sum(axis=1))[(...,) + (None,) * (len(shape) - axis - 1)]
    return (field_ / norm).astype(np.float32)


def ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume step: 0 for x <= -width/2, 1 for x >= width/2, linear between."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


# --------------------------------------------------------------------------- the subject's head


def _warp_coordinates(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int],
                      vox_from_mni: np.ndarray) -> tuple[np.ndarray, float]:
    """Template-voxel coordinates ``[3, X, Y, Z]`` float32 of every output voxel and the
    subject's mean scale: q = c + R diag(1/s) p + t + u(p), with rotation R (±5 deg per axis),
    scale s = NATIVE_SCALE * (1 ± 5 %), translation t (±4 mm) and a smooth elastic
    displacement u (control points every ~40 mm, 1.5-3 mm standard deviation)."""
    ax, ay, az = np.deg2rad(rng.uniform(-5.0, 5.0, 3))
    Rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    Ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    Rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scale = NATIVE_SCALE * rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    translation = rng.uniform(-4.0, 4.0, 3)
    mni_from_world = Rz @ Ry @ Rx @ np.diag(1.0 / scale)
    # output voxel -> template voxel, linear part L and offset b
    L = vox_from_mni[:3, :3] @ mni_from_world @ affine[:3, :3]
    b = vox_from_mni[:3, :3] @ (mni_from_world @ affine[:3, 3] + np.asarray(HEAD_CENTRE_MNI) + translation) \
        + vox_from_mni[:3, 3]
    n_ctrl = tuple(max(3, int(round(n * s / 40.0)) + 1) for n, s in zip(shape, np.diag(affine)[:3]))
    u_mm = smooth_noise(rng, shape, n_ctrl, channels=3) * np.float32(rng.uniform(1.5, 3.0))
    u_vox = np.tensordot(vox_from_mni[:3, :3].astype(np.float32), u_mm, axes=1)
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    coords = u_vox
    for a in range(3):
        coords[a] += (np.float32(L[a, 0]) * i[:, None, None] + np.float32(L[a, 1]) * j[None, :, None]
                      + np.float32(L[a, 2]) * k[None, None, :] + np.float32(b[a]))
    return coords, float(scale.mean())


def _head_layers(rng: np.random.Generator, dist_mm: np.ndarray, mni_x: np.ndarray, mni_z: np.ndarray,
                 pv_width: float) -> dict[str, np.ndarray]:
    """Fractions ``[X, Y, Z]`` of the extra-cerebral layers from the signed distance to the
    brain envelope (mm, ``[X, Y, Z]``); each layer's thickness varies per subject and smoothly
    over the head, and the muscle layer thickens over the temporal fossae (temporalis)."""
    variation = smooth_noise(rng, dist_mm.shape, (5, 5, 4), channels=len(_HEAD_LAYERS))
    temporal = (np.clip((np.abs(mni_x) - 45.0) / 20.0, 0.0, 1.0)
                * np.clip((40.0 - mni_z) / 30.0, 0.0, 1.0))
    layers: dict[str, np.ndarray] = {}
    boundary = np.zeros_like(dist_mm)
    inside_prev = np.zeros_like(dist_mm)  # fraction of the voxel inside the previous boundary
    for n, (name, (t_lo, t_hi), spread) in enumerate(_HEAD_LAYERS):
        thickness = np.float32(rng.uniform(t_lo, t_hi)) * np.maximum(1.0 + np.float32(spread) * variation[n], 0.0)
        if name == "muscle":
            thickness += np.float32(rng.uniform(4.0, 8.0)) * temporal
        boundary += thickness
        inside = ramp(boundary - dist_mm, pv_width)
        frac = inside - inside_prev
        layers[name] = layers[name] + frac if name in layers else frac
        inside_prev = inside
    return layers


@dataclass
class Anatomy:
    """One subject's brain on the output grid, each map ``[X, Y, Z]`` float32."""

    gm: np.ndarray  #: grey-matter fraction
    wm: np.ndarray  #: white-matter fraction
    csf: np.ndarray  #: intracranial CSF fraction
    dist_mm: np.ndarray  #: signed distance to the brain envelope in subject mm, < 0 inside


def warp_anatomy(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int],
                 pv_width: float) -> tuple[Anatomy, dict[str, np.ndarray]]:
    """The subject's brain maps and the fraction of every tissue of :data:`TISSUES` per voxel,
    drawn from ``rng`` (the warp, then the head layers): one trilinear ``map_coordinates`` pass
    per template map."""
    tpl = load_template()
    coords, mean_scale = _warp_coordinates(rng, affine, shape, tpl.vox_from_mni)

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="nearest", output=np.float32)

    gm, wm, csf = sample(tpl.gm), sample(tpl.wm), sample(tpl.csf)
    # Beyond the template box the nearest-edge distance is extended by the distance to the box
    # (left, right, posterior, anterior, superior; template voxels are 1 mm); below it the
    # head continues (neck).
    dist_tpl = sample(tpl.dist)
    beyond_sq = np.zeros(shape, np.float32)
    for a in range(3):
        top = np.float32(tpl.dist.shape[a] - 1)
        beyond = np.maximum(coords[a] - top, 0.0) if a == 2 else \
            np.maximum(coords[a] - top, 0.0) + np.maximum(-coords[a], 0.0)
        beyond_sq += beyond * beyond
    dist_mm = (dist_tpl + np.sqrt(beyond_sq)) * np.float32(mean_scale)  # template mm -> subject mm
    del dist_tpl, beyond_sq
    mni_from_vox = np.linalg.inv(tpl.vox_from_mni)
    mni_x = np.float32(mni_from_vox[0, 0]) * coords[0] + np.float32(mni_from_vox[0, 3])
    mni_z = np.float32(mni_from_vox[2, 2]) * coords[2] + np.float32(mni_from_vox[2, 3])
    del coords
    non_brain = np.clip(1.0 - gm - wm - csf, 0.0, 1.0)
    layers = _head_layers(rng, dist_mm, mni_x, mni_z, pv_width)
    fractions = {"wm": wm, "gm": gm, "csf": csf + non_brain * layers.pop("csf")}
    for name, frac in layers.items():
        fractions[name] = non_brain * frac
    return Anatomy(gm, wm, csf, dist_mm), fractions
