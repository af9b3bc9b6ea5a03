"""Tiny valid datasets for tests: random-but-plausible volumes in medgen's layout (see docs/architecture.md, Data).

    from datagen import write_dataset
    patients = write_dataset(tmp_path / "data")            # 3 patients 32x32x8 in train/
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, MODALITIES
from medgen.data.nifti_dataset import modality_path, save_volume

#: rough relative brightness of (background, brain, lesion) per modality
_CONTRAST: dict[str, tuple[float, float, float]] = {
    "bravo": (0.0, 0.45, 0.95),
    "t1_pre": (0.0, 0.5, 0.45),
    "t1_gd": (0.0, 0.5, 0.9),
    "flair": (0.0, 0.4, 0.8),
}


def make_patient(
    shape: tuple[int, int, int] = (32, 32, 8),
    seed: int = 0,
    lesion_radius: float = 3.0,
    keys: Sequence[str] = MODALITIES,
) -> dict[str, np.ndarray]:
    """Volumes ``{key: [H, W, D] float32}``: an ellipsoidal "brain" with noise per image
    modality and one spherical lesion (``seg`` in {0, 1}) inside it; ``lesion_radius=0``: no lesion."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    radii = [max(n * 0.42, 1.0) for n in shape]
    brain = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    lesion_centre = [c + rng.uniform(-0.2, 0.2) * n for c, n in zip(centre, shape)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, lesion_centre))
    lesion = (dist2 <= lesion_radius**2) & brain if lesion_radius > 0 else np.zeros(shape, bool)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        if key == MASK_KEY:
            out[key] = lesion.astype(np.float32)
            continue
        if key not in IMAGE_MODALITIES:
            raise ValueError(f"unknown modality {key!r}")
        bg, tissue, les = _CONTRAST[key]
        vol = np.where(brain, tissue, bg) + np.where(lesion, les - tissue, 0.0)
        vol = 1000.0 * (vol + rng.normal(0.0, 0.03, size=shape) * brain)
        out[key] = np.clip(vol, 0.0, None).astype(np.float32)
    return out


def write_dataset(
    root: str | Path,
    n_patients: int = 3,
    shape: tuple[int, int, int] = (32, 32, 8),
    splits: Sequence[str] = ("train",),
    keys: Sequence[str] = MODALITIES,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    seed: int = 0,
) -> list[Path]:
    """Write ``n_patients`` valid patients (``patient_000`` ...) under ``root/<split>/``,
    split names taken round-robin from ``splits``; returns the patient folders."""
    root = Path(root)
    affine = np.diag([*spacing, 1.0])
    folders: list[Path] = []
    for i in range(n_patients):
        folder = root / splits[i % len(splits)] / f"patient_{i:03d}"
        for key, volume in make_patient(shape, seed=seed + i, keys=keys).items():
            save_volume(modality_path(folder, key), volume, affine, is_mask=key == MASK_KEY)
        folders.append(folder)
    return folders
