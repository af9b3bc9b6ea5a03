"""NIfTI volume loading for medgen's dataset layout (see docs/architecture.md, Data).

A dataset root holds ``train/``, ``val/``, ``test/``; each holds one folder per patient
with ``bravo.nii.gz``, ``t1_pre.nii.gz``, ``t1_gd.nii.gz``, ``flair.nii.gz``, ``seg.nii.gz``
(an uncompressed ``<key>.nii`` is read as well: :func:`modality_path`).
Volumes are reoriented to RAS, so axial slices are along the last array axis. The volumes of
one patient must share shape and affine: :func:`geometry_mismatches` is the one comparison
(``medgen-data check``, training, the importers and the phantom template use it), and
:class:`PatientReader` the one way to read a patient's files and compare them
(``medgen-data check`` and the slice cache, :class:`NiFTIDataset`, the nnU-Net importer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from torch.utils.data import Dataset

from medgen.core.constants import AFFINE_ATOL, MASK_KEY, MODALITIES, NIFTI_SUFFIX
from medgen.data.masks import binarize_mask
from medgen.data.nifti_files import image_problem, open_image, read_failure, squeeze_trailing


class DataError(ValueError):
    """The data on disk cannot be used; the message names the file and the problem."""


#: the endings a modality file may have, in the order they are looked for; new files get the first
MODALITY_SUFFIXES: tuple[str, ...] = (NIFTI_SUFFIX, ".nii")


def modality_path(patient_dir: str | Path, key: str) -> Path:
    """The file of modality ``key`` in a patient folder: ``<key>.nii.gz``, or ``<key>.nii`` when only
    that one exists. A file to be written (neither exists yet) is ``<key>.nii.gz``."""
    folder = Path(patient_dir)
    for suffix in MODALITY_SUFFIXES:
        path = folder / f"{key}{suffix}"
        if path.is_file():
            return path
    return folder / f"{key}{NIFTI_SUFFIX}"


def modality_files(patient_dir: str | Path, key: str) -> list[Path]:
    """Every file of modality ``key`` in a patient folder (more than one is ambiguous)."""
    return [p for p in (Path(patient_dir) / f"{key}{s}" for s in MODALITY_SUFFIXES) if p.is_file()]


#: the files of an Analyze/NIfTI ``.hdr``/``.img`` pair, which the layout does not read
PAIR_SUFFIXES: tuple[str, ...] = (".hdr", ".img", ".hdr.gz", ".img.gz")


def missing_modality_message(key: str, folder: str | Path | None = None) -> str:
    """The one wording of a missing modality file (``medgen-data check``, training, the readers);
    with the patient ``folder``, a ``.hdr``/``.img`` pair of that modality there is named too (the
    layout holds one single-file NIfTI per modality, :func:`modality_path`)."""
    message = f"missing modality {key!r} (no {' or '.join(key + s for s in MODALITY_SUFFIXES)})"
    pair = [f"{key}{s}" for s in PAIR_SUFFIXES if folder is not None and (Path(folder) / f"{key}{s}").exists()]
    if pair:
        message += (f": {' and '.join(pair)} is an Analyze/NIfTI .hdr/.img pair, which is not read; "
                    f"convert it to {key}{NIFTI_SUFFIX}")
    return message


def folder_problem(path: str | Path, what: str = "folder") -> str | None:
    """Why ``path`` cannot be read as a ``what`` (``"dataset folder"``, ...): ``"<what> does not
    exist"`` or ``"is a file, not a <what>"``; None for a folder."""
    path = Path(path)
    if path.is_dir():
        return None
    if path.is_file():
        return f"is a file, not a {what}"
    if path.exists():
        return f"is not a {what}"
    return f"{what} does not exist"


def volume_shape_problem(shape: Sequence[int]) -> str | None:
    """Why a volume of ``shape`` (as :func:`load_volume` returns it) cannot be sliced for training,
    or None: only 3D volumes ``[x, y, slices]`` can (a single slice is ``[x, y, 1]``)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and min(shape) >= 1:
        return None
    if len(shape) == 2:
        return (f"volume is 2D {shape}; expected a 3D volume [x, y, slices] (save a single slice "
                f"as {shape + (1,)})")
    if len(shape) == 4:
        return f"volume has shape {shape}: {shape[3]} volumes in one file; expected one 3D volume"
    return f"volume has shape {shape}; expected a 3D volume [x, y, slices]"


def present_modalities(patients: Sequence[Path], keys: Sequence[str] = MODALITIES) -> list[str]:
    """The ``keys`` (in their order) that at least one of ``patients`` has a file for."""
    return [k for k in keys if any(modality_path(p, k).is_file() for p in patients)]


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read a NIfTI file, reorient to RAS; returns (array, 4x4 RAS affine, note). The array is
    float32 with its trailing singleton dimensions dropped (``(x, y, z, 1)`` -> ``(x, y, z)``),
    the note says so (None when nothing was dropped; :func:`medgen.data.nifti_files.squeeze_trailing`).

    Raises:
        DataError: a file that holds no grayscale volume (CIFTI-2, a pair header without its
            ``.img``, complex or RGB voxels: :func:`medgen.data.nifti_files.image_problem`).
        Exception: whatever nibabel, gzip or zlib raise for an unreadable or truncated file
            (:func:`medgen.data.nifti_files.read_failure` names its cause).
    """
    img = open_image(path)
    problem = image_problem(path, img)
    if problem:
        raise DataError(f"{path}: {problem}")
    img = nib.as_closest_canonical(img)
    data, note = squeeze_trailing(np.asarray(img.dataobj, dtype=np.float32))
    return data, np.asarray(img.affine, dtype=np.float64), note


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file, reorient to RAS; returns (``[H, W, D]`` float32 array, 4x4 RAS affine)
    as :func:`read_volume` does, without its note."""
    data, affine, _ = read_volume(path)
    return data, affine


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


@dataclass(frozen=True, eq=False)
class GeometryMismatch:
    """A volume whose shape or affine differs from the reference volume of its patient."""

    path: str | Path  #: the odd one out
    reference: str | Path  #: the volume it was compared with
    kind: str  #: ``"shape"`` or ``"affine"``
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_difference: float = 0.0  #: affine: largest absolute difference to the reference affine

    @property
    def message(self) -> str:
        """The wording of ``medgen-data check`` (without the path of the odd file)."""
        ref = Path(self.reference).name
        if self.kind == "shape":
            return f"shape {self.shape} differs from {ref} {self.reference_shape}"
        return f"affine differs from {ref}'s (max difference {self.max_difference:.4g})"


def geometry_mismatches(volumes: Sequence[tuple[str | Path, tuple[int, ...], np.ndarray]],
                        atol: float = AFFINE_ATOL) -> list[GeometryMismatch]:
    """Compare the ``(path, shape, affine)`` of one patient's volumes and blame the odd ones out.

    The reference shape is the most common one, ties going to the earlier volume; among the
    volumes of that shape, the reference affine is the one that agrees (``np.allclose`` with
    ``atol`` mm) with the most others, ties going to the earlier volume. Returns the shape
    mismatches, then the affine mismatches, each in input order; empty when all agree.
    """
    if len(volumes) < 2:
        return []
    shapes = [tuple(shape) for _, shape, _ in volumes]
    ref_shape = max(shapes, key=lambda s: (shapes.count(s), -shapes.index(s)))
    ref_path = next(path for (path, _, _), shape in zip(volumes, shapes) if shape == ref_shape)
    out = [GeometryMismatch(path, ref_path, "shape", shape, ref_shape)
           for (path, _, _), shape in zip(volumes, shapes) if shape != ref_shape]
    same_shape = [(path, np.asarray(affine)) for (path, _, affine), shape in zip(volumes, shapes) if shape == ref_shape]
    agree = [sum(np.allclose(a, b, atol=atol) for _, b in same_shape) for _, a in same_shape]
    best = max(range(len(same_shape)), key=lambda i: (agree[i], -i))
    ref_path, ref_affine = same_shape[best]
    for path, affine in same_shape:
        if not np.allclose(affine, ref_affine, atol=atol):
            diff = float(np.abs(affine - ref_affine).max())
            out.append(GeometryMismatch(path, ref_path, "affine", ref_shape, ref_shape, diff))
    return out


@dataclass
class VolumeRead:
    """One file as :meth:`PatientReader.read` read it."""

    path: Path
    data: np.ndarray | None  #: RAS ``[H, W, D]`` float32 (:func:`load_volume`); None when unreadable
    affine: np.ndarray | None
    #: why the volume cannot be used for training (unreadable, not grayscale, not 3D), without the path
    problem: str | None = None
    #: what was corrected while reading (trailing singleton dimensions dropped), without the path
    note: str | None = None


class PatientReader:
    """Reads the files of one patient one at a time and then compares their geometry: what
    ``medgen-data check``, the slice cache, :class:`NiFTIDataset` and the importers share, so
    they find the same problems and blame the same file."""

    def __init__(self) -> None:
        self._geometry: list[tuple[Path, tuple[int, ...], np.ndarray]] = []

    def read(self, path: str | Path) -> VolumeRead:
        """Read ``path`` fully (:func:`load_volume`) and say what makes it unusable, if anything.
        A volume that could be read takes part in :meth:`mismatches`, whatever its shape."""
        path = Path(path)
        try:
            data, affine, note = read_volume(path)  # decompresses every voxel
        except DataError as exc:  # no grayscale volume in it
            return VolumeRead(path, None, None, str(exc).removeprefix(f"{path}: "))
        except Exception as exc:  # noqa: BLE001 - nibabel/gzip/zlib raise many types; name the file and the cause
            return VolumeRead(path, None, None, read_failure(path, exc))
        self._geometry.append((path, data.shape, affine))
        return VolumeRead(path, data, affine, volume_shape_problem(data.shape), note)

    def mismatches(self) -> list[GeometryMismatch]:
        """The shape and affine mismatches among the volumes read so far (:func:`geometry_mismatches`)."""
        return geometry_mismatches(self._geometry)


@dataclass
class PatientVolumes:
    patient_id: str
    volumes: dict[str, np.ndarray]  # key -> [H, W, D]; seg binarised
    affine: np.ndarray | None  # the first key's (all agree within AFFINE_ATOL)


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

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> PatientVolumes:
        folder = self.patients[index]
        volumes: dict[str, np.ndarray] = {}
        affine: np.ndarray | None = None
        reader = PatientReader()
        for key in self.keys:
            path = modality_path(folder, key)
            if not path.is_file():
                raise DataError(f"{path}: {missing_modality_message(key, folder)}")
            read = reader.read(path)
            if read.problem:
                raise DataError(f"{path}: {read.problem}")
            volumes[key] = binarize_mask(read.data) if key == MASK_KEY else read.data
            affine = read.affine if affine is None else affine
        mismatches = reader.mismatches()
        if mismatches:
            raise DataError("\n".join(f"{m.path}: {m.message}" for m in mismatches))
        return PatientVolumes(folder.name, volumes, affine)
