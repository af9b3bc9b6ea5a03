"""Check a dataset against medgen's data contract (see docs/architecture.md, Data) and report
every problem.

Every file is read fully (all voxel data decompressed, so a truncated ``.nii.gz`` is caught)
through :func:`load_volume`, the same reader training uses, so shapes and affines are compared
in RAS exactly as training will see them. :func:`read_patient` is the one per-patient reader:
``medgen-data check`` keeps only its problems, the slice-cache build also keeps the volumes it
read, so a cold build reads every file once.

Errors (``Report.ok`` is False): a missing or unreadable modality file (``<key>.nii.gz`` or
``<key>.nii``; both at once is an error too; a ``.hdr``/``.img`` pair in its place is named), a
file that is truncated, empty, CIFTI-2 or only a header (each named by its cause:
:mod:`medgen.data.nifti_files`), a shape or affine that differs between a patient's
files, NaN/Inf voxels, a mask with values other than 0/1, a volume that is not 3D (a 2D image, a 4D
series), complex or RGB voxels, an empty patient folder, no split folder, an empty split or a file
in its place (:func:`medgen.data.splits.split_folder_problem`, which training applies too), no
patients, a patient id in two splits, a dataset path that is a file. Warnings: an empty mask, a
constant image, stray files in a patient folder or at split level, trailing singleton dimensions
dropped (``(x, y, z, 1)`` read as ``(x, y, z)``).

    report = check_dataset("data/brainmetshare")
    print(report.format()); assert report.ok
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from medgen.core.constants import AFFINE_ATOL, MASK_KEY, MODALITIES, SPLITS
from medgen.data.nifti_dataset import (MODALITY_SUFFIXES, PatientReader, folder_problem, list_patients,
                                       missing_modality_message, modality_files, modality_path, present_modalities)
from medgen.data.parallel import ordered_map
from medgen.data.splits import split_folder_problem

__all__ = ["AFFINE_ATOL", "PatientRead", "Problem", "Report", "check_dataset", "check_patient", "check_patients",
           "read_patient"]

Severity = Literal["error", "warning"]

#: file names a patient folder may hold
#: what a patient folder may hold: the modalities, and what an insertion run writes beside them (where its
#: painter worked, the scan as it was: medgen.generation.insert)
_SAMPLE_EXTRAS = ("region", *(f"source_{k}" for k in MODALITIES))
_KNOWN_FILES: frozenset[str] = frozenset(f"{k}{s}" for k in (*MODALITIES, *_SAMPLE_EXTRAS) for s in MODALITY_SUFFIXES)
_MAX_VALUES_SHOWN = 6
_MAX_NAMES_SHOWN = 8


@dataclass(frozen=True)
class Problem:
    """One finding: the file or folder it concerns, what is wrong, and how bad it is."""

    path: str
    message: str
    severity: Severity = "error"

    def format(self) -> str:
        return f"{self.severity.upper()} {self.path}: {self.message}"


@dataclass
class Report:
    """All problems found in a set of patients; ``ok`` iff there is no error."""

    problems: list[Problem] = field(default_factory=list)
    patients_checked: int = 0
    root: str | None = None
    #: the modalities every patient was required to have
    keys: list[str] | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        where = f" in {self.root}" if self.root else ""
        what = f" ({', '.join(self.keys)})" if self.keys else ""
        return (f"{verdict}: checked {self.patients_checked} patient(s){where}{what}: "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")

    def format(self) -> str:
        """One line per problem (``ERROR <path>: <message>`` / ``WARNING ...``), then a summary line."""
        return "\n".join([p.format() for p in self.problems] + [self.summary()])

    def to_dict(self) -> dict:
        """JSON-serialisable form: ok, root, counts and the list of problems."""
        return {
            "ok": self.ok,
            "root": self.root,
            "patients_checked": self.patients_checked,
            "modalities": self.keys,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
        }


def _values_sample(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_VALUES_SHOWN])
    return f"[{shown}{', ...' if values.size > _MAX_VALUES_SHOWN else ''}]"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f" and {len(names) - _MAX_NAMES_SHOWN} more" if len(names) > _MAX_NAMES_SHOWN else "")


def _check_values(path: Path, key: str, data: np.ndarray) -> list[Problem]:
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    finite_range = np.isfinite(lo) and np.isfinite(hi)  # min/max propagate NaN and reach +-Inf
    if finite_range and key != MASK_KEY:  # the common case in two passes over the data
        if data.size and lo == hi:
            return [Problem(str(path), f"image is constant (every voxel {lo:g})", "warning")]
        return []
    if finite_range and lo >= 0 and hi <= 1 and not ((data != 0) & (data != 1)).any():
        return [] if hi == 1 else [Problem(str(path), "empty mask: no lesion voxels", "warning")]
    problems: list[Problem] = []
    n_nan = int(np.isnan(data).sum())
    n_inf = int(np.isinf(data).sum())
    if n_nan or n_inf:
        parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        problems.append(Problem(str(path), f"{' and '.join(parts)} voxel(s) of {data.size}"))
    finite = data[np.isfinite(data)] if (n_nan or n_inf) else data
    if key == MASK_KEY:
        bad = (finite != 0) & (finite != 1)
        if bad.any():
            values = np.unique(finite)
            problems.append(Problem(
                str(path),
                f"mask is not binary: {int(bad.sum())} voxel(s) are neither 0 nor 1; "
                f"{values.size} distinct values {_values_sample(values)}",
            ))
        elif not (finite == 1).any():
            problems.append(Problem(str(path), "empty mask: no lesion voxels", "warning"))
    elif finite.size and float(finite.min()) == float(finite.max()):
        problems.append(Problem(str(path), f"image is constant (every voxel {float(finite.min()):g})", "warning"))
    return problems


@dataclass
class PatientRead:
    """One patient folder read once: its problems and (with ``keep``) the volumes it could read."""

    problems: list[Problem]
    #: key -> RAS ``[H, W, D]`` float32 as :func:`load_volume` returns it (``seg`` not binarised)
    volumes: dict[str, np.ndarray] = field(default_factory=dict)
    affines: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def read_patient(folder: str | Path, keys: Sequence[str] = MODALITIES, validate: bool = True,
                 keep: bool = True) -> PatientRead:
    """Read each modality ``keys`` of one patient folder once and collect its problems.

    With ``validate`` the problems are exactly :func:`check_patient`'s (folder, file and value
    checks, then shape/affine agreement); without it only what makes the volumes unusable is
    reported (a missing, ambiguous or unreadable file, a volume that is not 3D, shapes or affines
    that differ). With ``keep`` the volumes read are returned too.
    """
    folder = Path(folder)
    unknown = [k for k in keys if k not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality keys {unknown}; known: {MODALITIES}")
    if not folder.is_dir():
        return PatientRead([Problem(str(folder), "patient folder does not exist")])
    problems: list[Problem] = []
    if validate:
        entries = sorted(folder.iterdir())
        if not entries:
            return PatientRead([Problem(str(folder), "patient folder is empty (no files)")])
        stray = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in _KNOWN_FILES]
        if stray:
            problems.append(Problem(str(folder), f"stray file(s) in patient folder: {_names(stray)}", "warning"))

    read = PatientRead(problems)
    reader = PatientReader()
    for key in keys:
        path = modality_path(folder, key)
        if not path.is_file():
            message = missing_modality_message(key, folder)
            if path.exists():  # e.g. a folder named bravo.nii.gz
                message += f": {path.name} is {'a folder' if path.is_dir() else 'not a regular file'}"
            problems.append(Problem(str(path), message))
            continue
        found = modality_files(folder, key)
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.append(Problem(str(folder), f"modality {key!r} is there twice ({names}); keep one"))
            continue
        volume = reader.read(path)
        if volume.problem:  # unreadable, not grayscale, or not slicable for training
            problems.append(Problem(str(path), volume.problem))
        if validate and volume.note:  # read, but corrected (trailing singleton dimensions dropped)
            problems.append(Problem(str(path), volume.note, "warning"))
        if volume.data is None:
            continue
        if validate:
            problems.extend(_check_values(path, key, volume.data))
        if keep:
            read.volumes[key], read.affines[key] = volume.data, volume.affine
    problems.extend(Problem(str(m.path), m.message) for m in reader.mismatches())
    return read


def check_patient(folder: str | Path, keys: Sequence[str] = MODALITIES) -> list[Problem]:
    """Every problem of one patient folder for the modalities ``keys`` (each file read fully)."""
    return read_patient(folder, keys, validate=True, keep=False).problems


def check_patients(folders: Iterable[str | Path], keys: Sequence[str] = MODALITIES, progress: bool = True,
                   workers: int = 0) -> Report:
    """Check exactly these patient folders for the modalities ``keys`` (what training will read),
    in ``workers`` processes (0: this one)."""
    folders = [Path(f) for f in folders]
    report = Report()
    if not folders:
        report.problems.append(Problem("<patients>", "no patient folders to check"))
        return report
    for problems in ordered_map(partial(check_patient, keys=tuple(keys)), folders, workers, desc="check",
                                progress=progress):
        report.problems.extend(problems)
    report.patients_checked = len(folders)
    return report


def check_dataset(root: str | Path, keys: Sequence[str] | None = None, progress: bool = True,
                  workers: int = 0) -> Report:
    """Check a dataset root (``train/``, ``val/``, ``test/`` of patient folders) and report
    every problem; ``keys`` are the modalities every patient must have (None: every modality
    that any patient has, e.g. ``bravo`` and ``seg`` for a synthetic bravo set)."""
    root = Path(root)
    report = Report(root=str(root))
    problem = folder_problem(root, "dataset folder")
    if problem:
        report.problems.append(Problem(str(root), problem))
        return report
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    for split in SPLITS:  # a file in place of a split folder (an empty one is reported below)
        problem = split_folder_problem(root, split)
        if problem and not (root / split).is_dir():
            report.problems.append(Problem(str(root / split), problem))
    if not split_dirs:
        hint = ""
        if list_patients(root):
            hint = " (it holds other folders: is this a split or patient folder? point at the dataset root)"
        report.problems.append(Problem(str(root), f"no split folders ({', '.join(s + '/' for s in SPLITS)}){hint}"))
        return report

    patients: list[Path] = []
    seen: dict[str, str] = {}
    for split_dir in split_dirs:
        split_patients = list_patients(split_dir)
        stray = sorted(p.name for p in split_dir.iterdir() if p not in split_patients)
        if stray:
            report.problems.append(Problem(str(split_dir), f"stray file(s) at split level: {_names(stray)}", "warning"))
        problem = split_folder_problem(root, split_dir.name)
        if problem:
            report.problems.append(Problem(str(split_dir), problem))
        for p in split_patients:
            if p.name in seen:
                report.problems.append(Problem(
                    str(p), f"patient id {p.name!r} is also in {seen[p.name]}/ (patients must not cross splits)"))
            seen.setdefault(p.name, split_dir.name)
        patients.extend(split_patients)

    if not patients:
        report.problems.append(Problem(str(root), "dataset holds no patients"))
        return report
    if keys is None:
        keys = present_modalities(patients) or list(MODALITIES)
    report.keys = list(keys)
    sub = check_patients(patients, keys, progress=progress, workers=workers)
    report.problems.extend(sub.problems)
    report.patients_checked = sub.patients_checked
    return report
