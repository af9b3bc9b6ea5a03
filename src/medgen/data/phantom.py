"""Synthetic brain-MRI phantoms with metastases (see docs/architecture.md, Data).

Each subject is the MNI152 2009 (nonlinear symmetric, 1 mm) template that nilearn ships,
warped by a random affine and a smooth elastic field, rendered in four contrasts with
per-subject tissue intensities, a multiplicative bias field and Rician noise, and seeded
with metastases whose count, size and position are drawn from distributions:

* ``t1_pre``  T1 spin echo before contrast: WM > GM > CSF, lesions and oedema slightly dark.
* ``t1_gd``   the same sequence after gadolinium: lesions enhance above WM; lesions wider
  than ``RING_DIAMETER_MM`` are ring-enhancing around a dark necrotic core; the dura enhances.
* ``bravo``   3D inversion-prepared T1 gradient echo after gadolinium (GE BRAVO): stronger
  GM/WM contrast than spin echo, near-black CSF, enhancing lesions (rings for large ones).
* ``flair``   T2 FLAIR: CSF suppressed, GM slightly above WM, bright peritumoral oedema.
* ``seg``     binary mask of every enhancing lesion including its necrotic core.

nilearn's T1 template is skull-stripped (its non-zero voxels are the intracranial brain with
sulcal and ventricular CSF), so the rest of the head is modelled from the signed distance to
a smoothed brain envelope: subarachnoid CSF, dura, the skull's inner table, diploe (marrow
fat), outer table, temporalis/galea, subcutaneous fat and skin, each layer with a randomly
varying thickness.

Arrays are ``[X, Y, Z]`` in RAS orientation: the last axis runs inferior -> superior, so
``volume[..., k]`` is an axial slice. Everything is float32 and seeded through
``np.random.default_rng``: the same seed gives bit-identical volumes.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from medgen.core.constants import DEFAULT_SPLIT, IMAGE_MODALITIES, MASK_KEY, NIFTI_SUFFIX, SPLITS
from medgen.core.signals import default_signals
from medgen.data.nifti_dataset import geometry_mismatches, list_patients, save_volume
from medgen.data.splits import parse_split, split_indices

#: field of view in mm (left-right, posterior-anterior, inferior-superior); spacing = FOV / grid
FOV_MM: tuple[float, float, float] = (216.0, 216.0, 160.0)
#: MNI coordinate (mm) that lands at the centre of the output grid: the middle of the head
HEAD_CENTRE_MNI: tuple[float, float, float] = (0.0, -18.0, 11.0)
#: MNI152 is larger than a native adult brain (affine registrations to it scale up by 5-10 %),
#: so subjects are the template shrunk by this factor before the random per-subject scale
NATIVE_SCALE: float = 0.94
#: metastases wider than this are rendered ring-enhancing with a necrotic core
RING_DIAMETER_MM: float = 10.0
MAX_LESIONS: int = 15
DIAMETER_RANGE_MM: tuple[float, float] = (2.0, 30.0)

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
# Relative signal per tissue and contrast (order of IMAGE_MODALITIES: bravo, t1_pre, t1_gd,
# flair). Grounded in the usual appearance at 1.5-3 T: on T1 WM > GM > CSF and fat bright,
# cortical bone dark everywhere; IR-prepared gradient echo (BRAVO/MPRAGE) widens the GM/WM gap
# and nulls CSF; FLAIR nulls CSF with GM above WM; dura enhances after gadolinium.
_INTENSITY: dict[str, tuple[float, float, float, float]] = {
    #          bravo  t1_pre t1_gd  flair
    "wm":     (0.85, 0.80, 0.80, 0.46),
    "gm":     (0.50, 0.58, 0.58, 0.55),
    "csf":    (0.05, 0.18, 0.18, 0.05),
    "dura":   (0.55, 0.25, 0.70, 0.25),
    "bone":   (0.03, 0.04, 0.04, 0.03),
    "marrow": (0.50, 0.66, 0.66, 0.42),
    "muscle": (0.30, 0.42, 0.45, 0.30),
    "fat":    (0.75, 0.95, 0.95, 0.60),
    "skin":   (0.45, 0.55, 0.58, 0.40),
}
# Metastasis signal: enhancing tumour, necrotic core, and oedema (multiplicative darkening on
# T1-weighted contrasts, target signal on FLAIR).
_ENHANCING = (1.05, 0.52, 1.05, 0.62)
_NECROSIS = (0.15, 0.32, 0.30, 0.50)
_OEDEMA_T1_DARKENING = (0.20, 0.15, 0.15, 0.0)
_OEDEMA_FLAIR = 0.85
_FLAIR = IMAGE_MODALITIES.index("flair")
_SPLIT_STREAM = 0x5EED  # tags the split permutation's seed apart from the subjects' seeds


@dataclass(frozen=True)
class Lesion:
    """One metastasis. ``centre_mm`` is in the subject's world (affine) space; ``None`` while
    only the parameters are drawn (:func:`sample_lesions`)."""

    diameter_mm: float
    core_fraction: float  # radius of the necrotic core / lesion radius; 0 for solid lesions
    oedema_extent: float  # oedema radius / lesion radius (1.5-3)
    oedema_strength: float  # 0..1, peak oedema fraction
    irregularity: float  # relative amplitude of the smooth radius modulation
    centre_mm: tuple[float, float, float] | None = None

    @property
    def ring(self) -> bool:
        return self.core_fraction > 0.0


@dataclass
class PhantomSubject:
    """One phantom: ``volumes[key]`` is ``[X, Y, Z]`` float32 for ``bravo``, ``t1_pre``,
    ``t1_gd``, ``flair`` and ``seg`` ({0, 1}); ``affine`` is the 4x4 RAS voxel -> mm map;
    ``tissue`` (only with ``return_tissue=True``) holds the warped ``gm``, ``wm``, ``csf``
    fractions and the ``lesion`` (enhancing + core), ``core`` (necrosis) and ``oedema``
    fractions, each ``[X, Y, Z]`` float32 in [0, 1]."""

    volumes: dict[str, np.ndarray]
    affine: np.ndarray
    lesions: list[Lesion]
    seed: int
    tissue: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


# --------------------------------------------------------------------------- template


@dataclass(frozen=True)
class _Template:
    gm: np.ndarray  # [197, 233, 189] float32 grey-matter fraction
    wm: np.ndarray  # white-matter fraction
    csf: np.ndarray  # intracranial CSF fraction = brain mask - GM - WM
    dist: np.ndarray  # signed distance (mm = template voxels) to the smoothed brain envelope, < 0 inside
    vox_from_mni: np.ndarray  # 4x4: MNI mm -> template voxel


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
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


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators per part of the model, so drawing one part (e.g. only the
    lesion parameters) never shifts the others."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    names = ("lesions", "anatomy", "contrast", "placement", "shape", "bias", "noise")
    children = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a dataset drawn with ``seed`` (deterministic, 63-bit)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


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


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume step: 0 for x <= -width/2, 1 for x >= width/2, linear between."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


# --------------------------------------------------------------------------- lesions


def _draw_lesions(rng: np.random.Generator) -> list[Lesion]:
    # Count: 10 % of subjects without metastases, otherwise geometric (p = 0.33) capped at 15,
    # so 1-5 lesions in ~87 % of positive subjects with a tail of multiple metastases.
    count = 0 if rng.random() < 0.10 else min(int(rng.geometric(0.33)), MAX_LESIONS)
    # Diameter: log-normal, median 7 mm, sigma 0.65 (most brain metastases at detection are
    # small; a few exceed 2 cm), clipped to 2-30 mm.
    diameters = np.clip(np.exp(rng.normal(math.log(7.0), 0.65, count)), *DIAMETER_RANGE_MM)
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


def sample_lesions(seed: int) -> list[Lesion]:
    """Only the lesion parameters (count, diameters, ring/core, oedema) that
    :func:`make_subject` with the same seed uses; centres are ``None``. Cheap."""
    return _draw_lesions(_streams(seed)["lesions"])


def _place_lesions(rng: np.random.Generator, lesions: list[Lesion], gm: np.ndarray, wm: np.ndarray,
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


def _render_lesions(rng: np.random.Generator, lesions: list[Lesion], affine: np.ndarray,
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
        lesion = _ramp((1.0 - rho) * r, pv_width)
        inside = rho <= 1.0
        core = np.zeros_like(lesion)
        if les.ring:
            # rim at least 2 mm (and one voxel) thick, so the ring survives sampling
            c = min(les.core_fraction, 1.0 - max(2.0, float(spacing.max())) / r)
            if c > 0:
                rho_core = rho * (1.0 + 0.1 * noise[1])
                core = np.minimum(_ramp((c - rho_core) * r, pv_width), lesion)
        rho_oed = radius / (r * les.oedema_extent) * (1.0 + 0.3 * noise[2] + 0.2 * noise[3])
        oedema = les.oedema_strength * np.clip((1.0 - rho_oed) / 0.4, 0.0, 1.0) ** 0.7
        oedema *= np.clip(wm[box] + 0.35 * gm[box], 0.0, 1.0)
        # never paint the skull: lesions stay within the envelope (+1 voxel of partial volume)
        within = _ramp(brain_depth[box] + pv_width, pv_width)
        L[box] = np.maximum(L[box], lesion * within)
        K[box] = np.maximum(K[box], core * within)
        E[box] = np.maximum(E[box], oedema)
        seg[box] |= inside & (within >= 0.5)
        centre_idx = tuple(int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(c_vox, shape))
        seg[centre_idx] = True
        L[centre_idx] = max(L[centre_idx], 0.5)
    E *= 1.0 - L
    return L, np.minimum(K, L), E, seg.astype(np.float32)


# --------------------------------------------------------------------------- subject


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
        inside = _ramp(boundary - dist_mm, pv_width)
        frac = inside - inside_prev
        layers[name] = layers[name] + frac if name in layers else frac
        inside_prev = inside
    return layers


def make_subject(seed: int, size: int = 128, slices: int = 64, return_tissue: bool = False) -> PhantomSubject:
    """One phantom subject on a ``[size, size, slices]`` grid (spacing ``FOV_MM / shape``).

    Returns volumes ``bravo``, ``t1_pre``, ``t1_gd``, ``flair`` (float32, >= 0, WM ~0.8 on
    T1) and ``seg`` (float32 {0, 1}), the RAS affine, the placed lesions and, with
    ``return_tissue``, the warped tissue and lesion fractions (see :class:`PhantomSubject`)."""
    if size < 8 or slices < 4:
        raise ValueError(f"phantom grid too small: size={size}, slices={slices} (need >= 8 and >= 4)")
    rngs = _streams(seed)
    lesions = _draw_lesions(rngs["lesions"])
    tpl = _template()
    shape = (int(size), int(size), int(slices))
    affine = grid_affine(size, slices)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pv_width = float(np.prod(spacing) ** (1.0 / 3.0))

    # ---- anatomy: one trilinear map_coordinates pass per template map
    coords, mean_scale = _warp_coordinates(rngs["anatomy"], affine, shape, tpl.vox_from_mni)

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
    layers = _head_layers(rngs["anatomy"], dist_mm, mni_x, mni_z, pv_width)
    fractions = {"wm": wm, "gm": gm, "csf": csf + non_brain * layers.pop("csf")}
    for name, frac in layers.items():
        fractions[name] = non_brain * frac

    # ---- contrast: per-subject tissue signal (±5 %) and scanner gain (±10 %) per sequence
    crng = rngs["contrast"]
    intensity = np.array([_INTENSITY[t] for t in TISSUES], dtype=np.float64).T  # [4, T]
    intensity *= np.exp(crng.normal(0.0, 0.05, intensity.shape).clip(-0.1, 0.1))
    gain = crng.uniform(0.9, 1.1, len(IMAGE_MODALITIES))
    enhancing = np.asarray(_ENHANCING) * np.exp(crng.normal(0.0, 0.05, 4).clip(-0.1, 0.1))
    necrosis = np.asarray(_NECROSIS) * np.exp(crng.normal(0.0, 0.05, 4).clip(-0.1, 0.1))
    oedema_flair = _OEDEMA_FLAIR * float(np.exp(crng.normal(0.0, 0.05)))
    F = np.stack([fractions[t] for t in TISSUES]).reshape(len(TISSUES), -1)  # [T, N]
    images = (intensity.astype(np.float32) @ F).reshape(len(IMAGE_MODALITIES), *shape)  # [4, X, Y, Z]
    del F, fractions

    # ---- metastases
    lesions = _place_lesions(rngs["placement"], lesions, gm, wm, -dist_mm, affine)
    if lesions:
        L, K, E, seg = _render_lesions(rngs["shape"], lesions, affine, shape, gm, wm, -dist_mm)
        for c in range(len(IMAGE_MODALITIES)):
            img = images[c]
            if c == _FLAIR:
                img += E * (np.float32(oedema_flair) - img)  # vasogenic oedema: long T2, not nulled
            else:
                img *= 1.0 - np.float32(_OEDEMA_T1_DARKENING[c]) * E  # oedema: longer T1, darker
            img *= 1.0 - L
            img += (L - K) * np.float32(enhancing[c]) + K * np.float32(necrosis[c])
    else:
        L, K, E, seg = (np.zeros(shape, np.float32) for _ in range(4))

    # ---- acquisition: smooth multiplicative bias field (coil sensitivity), then Rician noise:
    # magnitude of the complex signal with i.i.d. Gaussian noise on both channels
    bias = smooth_noise(rngs["bias"], shape, (4, 4, 3), channels=len(IMAGE_MODALITIES))
    bias_strength = rngs["bias"].uniform(0.05, 0.15, len(IMAGE_MODALITIES))
    # noise relative to each contrast's parenchyma signal (SNR ~ 30-65 in white matter)
    sigma = rngs["noise"].uniform(0.015, 0.033, len(IMAGE_MODALITIES)) * intensity[:, :2].max(axis=1)
    volumes: dict[str, np.ndarray] = {}
    for c, key in enumerate(IMAGE_MODALITIES):
        img = images[c] * np.exp(np.float32(bias_strength[c]) * bias[c]) * np.float32(gain[c])
        noise = rngs["noise"].standard_normal((2, *shape), dtype=np.float32) * np.float32(sigma[c] * gain[c])
        volumes[key] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    volumes[MASK_KEY] = seg
    tissue = {"gm": gm, "wm": wm, "csf": csf, "lesion": L, "core": K, "oedema": E} if return_tissue else None
    return PhantomSubject(volumes=volumes, affine=affine, lesions=lesions, seed=int(seed), tissue=tissue)


# --------------------------------------------------------------------------- dataset


def _check_empty(out: Path) -> None:
    """Raise if ``out`` already holds a dataset: any folder in one of its split folders, or a
    folder with NIfTI files directly under it."""
    for folder in [out] + [out / name for name in SPLITS]:
        taken = [p.name for p in list_patients(folder)
                 if folder != out or (p.name not in SPLITS and any(p.glob(f"*{NIFTI_SUFFIX}")))]
        if taken:
            raise ValueError(f"{folder} already holds patient folders ({', '.join(taken[:3])}"
                             f"{', ...' if len(taken) > 3 else ''}); write phantoms to an empty "
                             "--out instead of mixing datasets")


def _write_subject(job: tuple[Path, int, int, int]) -> Path:
    """Render one subject and write its five volumes into ``job[0]`` (a patient folder)."""
    patient_dir, seed, size, slices = job
    subject = make_subject(seed, size=size, slices=slices)
    patient_dir.mkdir(parents=True, exist_ok=True)
    for key, volume in subject.volumes.items():
        save_volume(patient_dir / f"{key}{NIFTI_SUFFIX}", volume, subject.affine, is_mask=key == MASK_KEY)
    return patient_dir


def generate_dataset(out: str | Path, subjects: int, size: int = 128, slices: int = 64, seed: int = 0,
                     split: Sequence[float] = DEFAULT_SPLIT, workers: int = 1) -> list[Path]:
    """Write ``subjects`` phantoms as ``out/{train,val,test}/phantom_XXXX/<key>.nii.gz``.

    Subject ``i`` is ``make_subject(subject_seed(seed, i))``; subjects are assigned to splits
    by :func:`medgen.data.splits.split_indices` (``split`` fractions, seeded by ``seed`` and
    ``subjects``); a split that gets no subject has no folder. ``workers > 1``
    renders in a process pool with identical output. Refuses an ``out`` that already holds
    patient folders. Returns the patient folders sorted by id."""
    out = Path(out)
    if subjects < 0:
        raise ValueError(f"subjects must be >= 0, got {subjects}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    fractions = parse_split(split)  # split and seed are checked before anything is written
    _streams(seed)
    split_of = split_indices(subjects, fractions, np.random.SeedSequence([int(seed), subjects, _SPLIT_STREAM]))
    _check_empty(out)
    out.mkdir(parents=True, exist_ok=True)  # split folders appear with their first subject: an empty
    # val/ would be refused by medgen-data check and training (without it, train/ is split by patient)
    jobs = [(out / SPLITS[split_of[i]] / f"phantom_{i:04d}", subject_seed(seed, i), int(size), int(slices))
            for i in range(subjects)]
    written: list[Path] = []
    if workers == 1 or subjects <= 1:
        with tqdm(total=subjects, desc="phantoms", unit="subject") as progress:
            for job in jobs:
                written.append(_write_subject(job))
                progress.update()
        return sorted(written, key=lambda p: p.name)
    # Fork (where the OS has it) after loading the template, so workers share it copy-on-write
    # instead of each re-importing medgen and re-deriving the maps; the pool is created before
    # tqdm starts its monitor thread. Elsewhere: spawn, each worker loads the template once.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods:
        _template()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, subjects), initializer=default_signals) as pool:
        with tqdm(total=subjects, desc="phantoms", unit="subject") as progress:
            for path in pool.imap_unordered(_write_subject, jobs):
                written.append(path)
                progress.update()
    return sorted(written, key=lambda p: p.name)
