"""NIfTI volume loading for the dataset layout of DESIGN.md section 2.

A dataset root holds ``train/``, ``val/``, ``test/``; each holds one folder per patient
with ``bravo.nii.gz``, ``t1_pre.nii.gz``, ``t1_gd.nii.gz``, ``flair.nii.gz``, ``seg.nii.gz``.
Volumes are reoriented to RAS, so axial slices are along the last array axis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from torch.utils.data import Dataset

from medgen.core.constants import MASK_KEY, MODALITIES, NIFTI_SUFFIX, SPLITS
from medgen.data.transforms import binarize_mask


class DataError(ValueError):
    """The data on disk cannot be used; the message names the file and the problem."""


def modality_path(patient_dir: Path, key: str) -> Path:
    return Path(patient_dir) / f"{key}{NIFTI_SUFFIX}"


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file, reorient to RAS; returns (``[H, W, D]`` float32 array, 4x4 RAS affine)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, np.asarray(img.affine, dtype=np.float64)


def save_volume(path: str | Path, array: np.ndarray, affine: np.ndarray, is_mask: bool = False) -> Path:
    """Write ``array`` (2D or 3D) as NIfTI; masks as uint8 {0, 1}, images as float32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = binarize_mask(array).astype(np.uint8) if is_mask else np.asarray(array, dtype=np.float32)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def list_patients(split_dir: str | Path) -> list[Path]:
    """Patient folders of one split, sorted by name (hidden folders ignored)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _in_val(patient_id: str, fraction: float) -> bool:
    digest = hashlib.sha1(patient_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_patients(root: str | Path, split: str, val_fraction: float = 0.15) -> list[Path]:
    """Patient folders of ``split``. Without ``val/``, a deterministic patient-level split of
    ``train/`` is used (by a hash of the patient id, so adding patients does not move others);
    at least one patient goes to each side when train/ has two or more."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "test" or (root / "val").is_dir():
        return list_patients(root / split)
    train = list_patients(root / "train")
    val = [p for p in train if _in_val(p.name, val_fraction)]
    if len(train) >= 2 and not val:
        val = [min(train, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())]
    if len(train) >= 2 and len(val) == len(train):
        val = val[:-1]
    val_set = set(val)
    return val if split == "val" else [p for p in train if p not in val_set]


@dataclass
class PatientVolumes:
    patient_id: str
    volumes: dict[str, np.ndarray]  # key -> [H, W, D]; seg binarised
    affine: np.ndarray


class NiFTIDataset(Dataset):
    """One item per patient: the requested modalities as RAS ``[H, W, D]`` float32 arrays.

    All modalities of a patient must share shape and affine (checked here, too);
    ``seg`` is binarised with :func:`binarize_mask`.
    """

    def __init__(self, patients: Sequence[str | Path], keys: Sequence[str]):
        unknown = [k for k in keys if k not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality keys {unknown}; known: {MODALITIES}")
        self.patients = [Path(p) for p in patients]
        self.keys = list(keys)

    @classmethod
    def from_split(cls, root: str | Path, split: str, keys: Sequence[str], val_fraction: float = 0.15) -> "NiFTIDataset":
        return cls(split_patients(root, split, val_fraction), keys)

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> PatientVolumes:
        folder = self.patients[index]
        volumes: dict[str, np.ndarray] = {}
        ref_affine = None
        ref_shape = None
        for key in self.keys:
            path = modality_path(folder, key)
            if not path.is_file():
                raise DataError(f"{path}: missing modality {key!r}")
            data, affine = load_volume(path)
            if ref_shape is None:
                ref_shape, ref_affine = data.shape, affine
            elif data.shape != ref_shape:
                raise DataError(f"{path}: shape {data.shape} differs from {self.keys[0]} {ref_shape}")
            elif not np.allclose(affine, ref_affine, atol=1e-3):
                raise DataError(f"{path}: affine differs from {self.keys[0]}'s")
            volumes[key] = binarize_mask(data) if key == MASK_KEY else data
        return PatientVolumes(folder.name, volumes, ref_affine)
