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

The anatomy lives in :mod:`medgen.data.phantom_anatomy`, the metastases in
:mod:`medgen.data.phantom_lesions`; this module draws the contrasts, puts a subject together
(:func:`make_subject`) and writes datasets (:func:`generate_dataset`).

Arrays are ``[X, Y, Z]`` in RAS orientation: the last axis runs inferior -> superior, so
``volume[..., k]`` is an axial slice. Everything is float32 and seeded through
``np.random.default_rng``: the same seed gives bit-identical volumes.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medgen.core.constants import DEFAULT_SPLIT, IMAGE_MODALITIES, MASK_KEY, NIFTI_SUFFIX, SPLITS
from medgen.core.signals import default_signals
from medgen.data.nifti_dataset import list_patients, save_volume
from medgen.data.phantom_anatomy import (FOV_MM, HEAD_CENTRE_MNI, NATIVE_SCALE, TISSUES, grid_affine,
                                         load_template, smooth_noise, warp_anatomy)
from medgen.data.phantom_lesions import (DIAMETER_RANGE_MM, LESION_SIZES, MAX_LESIONS, RING_DIAMETER_MM, Lesion,
                                         draw_lesions, place_lesions, render_lesions)
from medgen.data.splits import parse_split, split_indices

__all__ = ["DIAMETER_RANGE_MM", "FOV_MM", "HEAD_CENTRE_MNI", "LESION_SIZES", "MAX_LESIONS", "NATIVE_SCALE",
           "RING_DIAMETER_MM", "TISSUES", "Lesion", "PhantomSubject", "generate_dataset", "grid_affine", "make_subject",
           "sample_lesions", "smooth_noise", "subject_seed"]

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


def sample_lesions(seed: int, lesion_sizes: str = "clinical", max_lesions: int = MAX_LESIONS) -> list[Lesion]:
    """Only the lesion parameters (count, diameters, ring/core, oedema) that
    :func:`make_subject` with the same arguments uses; centres are ``None``. Cheap."""
    return draw_lesions(_streams(seed)["lesions"], lesion_sizes, max_lesions)


# --------------------------------------------------------------------------- contrast and acquisition


@dataclass(frozen=True)
class _Contrast:
    """One subject's signal model: per tissue and sequence, per lesion part, and the scanner gain."""

    intensity: np.ndarray  # [4, T] float64: sequence x tissue (order of TISSUES)
    gain: np.ndarray  # [4]
    enhancing: np.ndarray  # [4] enhancing tumour
    necrosis: np.ndarray  # [4] necrotic core
    oedema_flair: float


def _draw_contrast(rng: np.random.Generator) -> _Contrast:
    """Per-subject tissue signal (±5 %) and scanner gain (±10 %) per sequence."""
    intensity = np.array([_INTENSITY[t] for t in TISSUES], dtype=np.float64).T  # [4, T]
    intensity *= np.exp(rng.normal(0.0, 0.05, intensity.shape).clip(-0.1, 0.1))
    gain = rng.uniform(0.9, 1.1, len(IMAGE_MODALITIES))
    enhancing = np.asarray(_ENHANCING) * np.exp(rng.normal(0.0, 0.05, 4).clip(-0.1, 0.1))
    necrosis = np.asarray(_NECROSIS) * np.exp(rng.normal(0.0, 0.05, 4).clip(-0.1, 0.1))
    oedema_flair = _OEDEMA_FLAIR * float(np.exp(rng.normal(0.0, 0.05)))
    return _Contrast(intensity, gain, enhancing, necrosis, oedema_flair)


def _paint_lesions(images: np.ndarray, L: np.ndarray, K: np.ndarray, E: np.ndarray, contrast: _Contrast) -> None:
    """Lesion (``L``), necrotic-core (``K``) and oedema (``E``) fractions into ``images`` ``[4, X, Y, Z]``, in place."""
    for c in range(len(IMAGE_MODALITIES)):
        img = images[c]
        if c == _FLAIR:
            img += E * (np.float32(contrast.oedema_flair) - img)  # vasogenic oedema: long T2, not nulled
        else:
            img *= 1.0 - np.float32(_OEDEMA_T1_DARKENING[c]) * E  # oedema: longer T1, darker
        img *= 1.0 - L
        img += (L - K) * np.float32(contrast.enhancing[c]) + K * np.float32(contrast.necrosis[c])


def _acquire(images: np.ndarray, contrast: _Contrast, rngs: dict[str, np.random.Generator],
             shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The images as the scanner records them: a smooth multiplicative bias field (coil
    sensitivity), then Rician noise (magnitude of the complex signal with i.i.d. Gaussian noise
    on both channels)."""
    bias = smooth_noise(rngs["bias"], shape, (4, 4, 3), channels=len(IMAGE_MODALITIES))
    bias_strength = rngs["bias"].uniform(0.05, 0.15, len(IMAGE_MODALITIES))
    # noise relative to each contrast's parenchyma signal (SNR ~ 30-65 in white matter)
    sigma = rngs["noise"].uniform(0.015, 0.033, len(IMAGE_MODALITIES)) * contrast.intensity[:, :2].max(axis=1)
    volumes: dict[str, np.ndarray] = {}
    for c, key in enumerate(IMAGE_MODALITIES):
        img = images[c] * np.exp(np.float32(bias_strength[c]) * bias[c]) * np.float32(contrast.gain[c])
        noise = rngs["noise"].standard_normal((2, *shape), dtype=np.float32) * np.float32(sigma[c] * contrast.gain[c])
        volumes[key] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    return volumes


# --------------------------------------------------------------------------- subject


def make_subject(seed: int, size: int = 128, slices: int = 64, return_tissue: bool = False,
                 lesion_sizes: str = "clinical", max_lesions: int = MAX_LESIONS) -> PhantomSubject:
    """One phantom subject on a ``[size, size, slices]`` grid (spacing ``FOV_MM / shape``), its
    lesions drawn by :func:`~medgen.data.phantom_lesions.draw_lesions` (``lesion_sizes``, ``max_lesions``).

    Returns volumes ``bravo``, ``t1_pre``, ``t1_gd``, ``flair`` (float32, >= 0, WM ~0.8 on
    T1) and ``seg`` (float32 {0, 1}), the RAS affine, the placed lesions and, with
    ``return_tissue``, the warped tissue and lesion fractions (see :class:`PhantomSubject`)."""
    if size < 8 or slices < 4:
        raise ValueError(f"phantom grid too small: size={size}, slices={slices} (need >= 8 and >= 4)")
    rngs = _streams(seed)
    lesions = draw_lesions(rngs["lesions"], lesion_sizes, max_lesions)
    shape = (int(size), int(size), int(slices))
    affine = grid_affine(size, slices)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pv_width = float(np.prod(spacing) ** (1.0 / 3.0))

    anatomy, fractions = warp_anatomy(rngs["anatomy"], affine, shape, pv_width)
    contrast = _draw_contrast(rngs["contrast"])
    F = np.stack([fractions[t] for t in TISSUES]).reshape(len(TISSUES), -1)  # [T, N]
    images = (contrast.intensity.astype(np.float32) @ F).reshape(len(IMAGE_MODALITIES), *shape)  # [4, X, Y, Z]
    del F, fractions

    gm, wm, depth = anatomy.gm, anatomy.wm, -anatomy.dist_mm
    lesions = place_lesions(rngs["placement"], lesions, gm, wm, depth, affine)
    if lesions:
        L, K, E, seg = render_lesions(rngs["shape"], lesions, affine, shape, gm, wm, depth)
        _paint_lesions(images, L, K, E, contrast)
    else:
        L, K, E, seg = (np.zeros(shape, np.float32) for _ in range(4))

    volumes = _acquire(images, contrast, rngs, shape)
    volumes[MASK_KEY] = seg
    tissue = {"gm": gm, "wm": wm, "csf": anatomy.csf, "lesion": L, "core": K, "oedema": E} if return_tissue else None
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


def _write_subject(job: tuple[Path, int, int, int, str, int]) -> Path:
    """Render one subject and write its five volumes into ``job[0]`` (a patient folder)."""
    patient_dir, seed, size, slices, lesion_sizes, max_lesions = job
    subject = make_subject(seed, size=size, slices=slices, lesion_sizes=lesion_sizes, max_lesions=max_lesions)
    patient_dir.mkdir(parents=True, exist_ok=True)
    for key, volume in subject.volumes.items():
        save_volume(patient_dir / f"{key}{NIFTI_SUFFIX}", volume, subject.affine, is_mask=key == MASK_KEY)
    return patient_dir


def generate_dataset(out: str | Path, subjects: int, size: int = 128, slices: int = 64, seed: int = 0,
                     split: Sequence[float] = DEFAULT_SPLIT, workers: int = 1, lesion_sizes: str = "clinical",
                     max_lesions: int = MAX_LESIONS) -> list[Path]:
    """Write ``subjects`` phantoms as ``out/{train,val,test}/phantom_XXXX/<key>.nii.gz``.

    Subject ``i`` is ``make_subject(subject_seed(seed, i), lesion_sizes=..., max_lesions=...)``;
    subjects are assigned to splits by :func:`medgen.data.splits.split_indices` (``split`` fractions, seeded by ``seed`` and
    ``subjects``); a split that gets no subject has no folder. ``workers > 1``
    renders in a process pool with identical output. Refuses an ``out`` that already holds
    patient folders. Returns the patient folders sorted by id."""
    out = Path(out)
    if subjects < 0:
        raise ValueError(f"subjects must be >= 0, got {subjects}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    fractions = parse_split(split)  # split, seed and lesion sizes are checked before anything is written
    draw_lesions(_streams(seed)["lesions"], lesion_sizes, max_lesions)
    split_of = split_indices(subjects, fractions, np.random.SeedSequence([int(seed), subjects, _SPLIT_STREAM]))
    _check_empty(out)
    out.mkdir(parents=True, exist_ok=True)  # split folders appear with their first subject: an empty
    # val/ would be refused by medgen-data check and training (without it, train/ is split by patient)
    jobs = [(out / SPLITS[split_of[i]] / f"phantom_{i:04d}", subject_seed(seed, i), int(size), int(slices),
             lesion_sizes, int(max_lesions)) for i in range(subjects)]
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
        load_template()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, subjects), initializer=default_signals) as pool:
        with tqdm(total=subjects, desc="phantoms", unit="subject") as progress:
            for path in pool.imap_unordered(_write_subject, jobs):
                written.append(path)
                progress.update()
    return sorted(written, key=lambda p: p.name)
