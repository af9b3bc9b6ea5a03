"""BrainMetShare PNG (Stanford BrainMetShare-3) -> medgen's layout.

One folder per patient (``Mets_005/``), optionally grouped in ``train/`` / ``val/`` / ``test/``.
Each patient folder holds channel folders ``0``, ``1``, ``2``, ``3`` and ``seg`` with one 8-bit
grayscale PNG per axial slice, named by slice index (``0.png``, ``1.png``, ... ``12.png``; ordered by
the integer, not lexically).

PNG orientation (fixed, and checked by the round-trip test). BrainMetShare slices are shown in
radiological convention: PNG row 0 is the patient's **anterior** side, PNG column 0 is the
patient's **right** side; slice index 0 is the most **inferior** slice. For a PNG slice
``png`` of shape ``[rows, cols]`` the RAS volume is therefore::

    volume[:, :, k] = png_k[::-1, ::-1].T        # shape [cols, rows, D]

i.e. voxel ``(i, j, k)`` is PNG pixel ``(row = rows-1-j, col = cols-1-i)`` of slice ``k``
(axis 0 runs right-ward, axis 1 anterior-ward, axis 2 superior-ward). The affine is
``diag(sx, sy, sz, 1)`` with ``spacing = (sx, sy, sz)`` in mm: ``sx`` between PNG columns
(left-right), ``sy`` between PNG rows (anterior-posterior), ``sz`` between slices. Reading
the volume back with :func:`medgen.data.preview.make_preview` shows the slices as in the PNGs.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from medgen.core.constants import MASK_KEY, SPLITS
from medgen.data.importers.common import (
    ImportFormatError,
    SourcePatient,
    check_dst,
    check_modality_targets,
    check_split_fractions,
    check_src,
    check_unique_ids,
    target_splits,
    warn_skipped,
    write_all,
)
from medgen.data.nifti_dataset import geometry_mismatches, list_patients, modality_path, save_volume
from medgen.data.masks import binarize_mask


#: BrainMetShare channel folder -> medgen modality
DEFAULT_PNG_MAPPING: dict[str, str] = {"0": "bravo", "1": "t1_pre", "2": "t1_gd", "3": "flair"}
#: name of the mask folder in a BrainMetShare patient folder
PNG_SEG_FOLDER = "seg"


def png_slice_to_ras(png: np.ndarray) -> np.ndarray:
    """One radiological PNG slice ``[rows, cols]`` -> the RAS in-plane array ``[cols, rows]``
    (see the module docstring: row 0 anterior, column 0 patient right)."""
    return np.ascontiguousarray(np.asarray(png)[::-1, ::-1].T)


def _slice_index(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def _list_slices(folder: Path, pid: str) -> list[Path]:
    """PNG files of one channel folder ordered by the integer in their name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    not_png = [p.name for p in files if p.suffix.lower() != ".png"]
    if not_png:
        raise ImportFormatError(f"patient {pid}: {folder} holds files that are not PNG slices: {not_png[:5]}")
    if not files:
        raise ImportFormatError(f"patient {pid}: channel folder {folder} holds no PNG slices")
    by_index: dict[int, Path] = {}
    for p in files:
        idx = _slice_index(p)
        if idx is None:
            raise ImportFormatError(f"patient {pid}: slice file {p} has no slice number in its name")
        if idx in by_index:
            raise ImportFormatError(f"patient {pid}: {by_index[idx].name} and {p.name} in {folder} are both slice {idx}")
        by_index[idx] = p
    return [by_index[i] for i in sorted(by_index)]


def _read_png(path: Path, pid: str) -> np.ndarray:
    """Raw grayscale values of one PNG as float32 ``[rows, cols]``."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            data = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImportFormatError(f"patient {pid}: cannot read {path}: {exc}") from None
    if mode in ("L", "1", "I", "F") or mode.startswith("I;16"):
        return data.astype(np.float32)
    if mode == "LA":
        return data[..., 0].astype(np.float32)
    if mode in ("RGB", "RGBA"):
        rgb = data[..., :3]
        if np.all(rgb == rgb[..., :1]):
            return rgb[..., 0].astype(np.float32)
        raise ImportFormatError(f"patient {pid}: {path} is a colour PNG; expected 8-bit grayscale")
    raise ImportFormatError(f"patient {pid}: {path} has PNG mode {mode!r}; expected 8-bit grayscale")


def _stack_png_channel(files: Sequence[Path], pid: str, folder: Path) -> np.ndarray:
    """Read the slices of one channel folder into a RAS volume ``[cols, rows, D]`` float32."""
    slices = [_read_png(f, pid) for f in files]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        first = slices[0].shape
        bad = next(f for f, s in zip(files, slices) if s.shape != first)
        raise ImportFormatError(
            f"patient {pid}: PNG sizes differ within {folder} ({files[0].name} is {first}, {bad.name} is {shapes - {first}})"
        )
    return np.stack([png_slice_to_ras(s) for s in slices], axis=-1).astype(np.float32)


def _png_mask_to_unit(volume: np.ndarray) -> np.ndarray:
    """seg PNG values (0/255 or 0/1) -> [0, 1]: divided by 255 when any value exceeds 1."""
    return volume / 255.0 if volume.size and float(volume.max()) > 1.0 else volume


def _png_patient_folders(src: Path) -> list[tuple[Path, str | None]]:
    """(patient folder, source split or None). ``src`` holds patient folders, or split folders."""
    split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
    if split_dirs:
        others = [p.name for p in list_patients(src) if p.name not in SPLITS]
        if others:
            warn_skipped(f"{src}: holds split folders, so these folders beside them are not imported: {others[:10]}")
        return [(p, d.name) for d in split_dirs for p in list_patients(d)]
    return [(p, None) for p in list_patients(src)]


def _png_slice_geometry(pid: str, channel_files: Mapping[str, Sequence[Path]], folder: Path) -> None:
    """Every channel must hold the same slice numbers; gaps in the numbering are warned about."""
    counts = {name: len(files) for name, files in channel_files.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{name}/: {n}" for name, n in counts.items())
        raise ImportFormatError(f"patient {pid}: slice counts differ between channel folders of {folder} ({detail})")
    index_sets = {name: [_slice_index(f) for f in files] for name, files in channel_files.items()}
    ref_name, ref = next(iter(index_sets.items()))
    for name, idx in index_sets.items():
        if idx != ref:
            raise ImportFormatError(
                f"patient {pid}: slice numbers in {folder / name} differ from those in {folder / ref_name}"
            )
    if ref and ref[-1] - ref[0] + 1 != len(ref):
        warn_skipped(f"patient {pid}: slice numbers in {folder} have gaps ({ref[0]}..{ref[-1]}, {len(ref)} files); "
              "slices are stacked in order without the missing ones")


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ImportFormatError(f"spacing must be three numbers in mm (e.g. 0.94,0.94,1.0), got {spacing!r}") from None
    if len(values) != 3 or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ImportFormatError(f"spacing must be three positive numbers in mm (e.g. 0.94,0.94,1.0), got {spacing!r}")
    return values  # type: ignore[return-value]


def import_brainmetshare_png(
    src: str | Path,
    dst: str | Path,
    mapping: Mapping[str, str] | None = None,
    spacing: Sequence[float] | None = None,
    split: Sequence[float] | None = None,
    seed: int = 0,
) -> int:
    """Import BrainMetShare PNG slices into ``dst/<split>/<patient>/<modality>.nii.gz``.

    Args:
        src: folder of patient folders, or a folder holding ``train/`` / ``val/`` / ``test/`` of
            patient folders (those split names are kept; source ``test/`` patients go to ``test/``).
        dst: new dataset root (must not hold patient folders yet).
        mapping: channel folder -> modality, replacing :data:`DEFAULT_PNG_MAPPING`
            (``0=bravo, 1=t1_pre, 2=t1_gd, 3=flair``); only mapped channels are imported.
        spacing: ``(sx, sy, sz)`` voxel size in mm (column, row, slice), default ``(1, 1, 1)``.
        split: ``(train, val, test)`` fractions for the patients that are not in a source
            ``test/`` or ``val/``; default: all into ``train/``.
        seed: seed of the patient-level split.

    Returns:
        the number of patients imported.

    Raises:
        ImportFormatError: bad arguments, missing channel folders, slice counts or PNG sizes that
            differ between channels, no patient with a ``seg`` folder, or a non-empty ``dst``.
        FolderBusy: another import is writing into ``dst`` (the message names that process).

    Patients without a ``seg`` folder (BrainMetShare's test set) are skipped with a warning.
    """
    src, dst = Path(src), Path(dst)
    check_src(src)
    channels = check_modality_targets(DEFAULT_PNG_MAPPING if mapping is None else mapping, "--map")
    if PNG_SEG_FOLDER in channels:
        raise ImportFormatError(f"--map: {PNG_SEG_FOLDER!r} is the mask folder, not an image channel")
    voxel = _check_spacing(spacing)
    fractions = check_split_fractions(split)
    check_dst(dst, src)

    patients = _source_patients(src, channels)
    check_unique_ids(patients)
    targets = target_splits(patients, fractions, seed)
    write_one = partial(_write_patient, affine=np.diag([*voxel, 1.0]))
    return write_all(patients, dst, targets, write_one, desc="import brainmetshare-png")


def _source_patients(src: Path, channels: Mapping[str, str]) -> list[SourcePatient]:
    """One :class:`SourcePatient` per patient folder under ``src`` with a mask folder (its slice
    files by modality, checked to agree between channels); the others are skipped with a warning."""
    if (src / PNG_SEG_FOLDER).is_dir() or any((src / c).is_dir() for c in channels):
        raise ImportFormatError(
            f"{src} looks like a single patient folder (it holds channel folders); pass the folder that holds the patients"
        )
    found = _png_patient_folders(src)
    if not found:
        raise ImportFormatError(f"{src} holds no patient folders (expected e.g. Mets_005/0/0.png ... or train/Mets_005/...)")

    patients: list[SourcePatient] = []
    no_seg: list[str] = []
    for folder, source_split in found:
        pid = folder.name
        if not (folder / PNG_SEG_FOLDER).is_dir():
            no_seg.append(f"{source_split}/{pid}" if source_split else pid)
            continue
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        for channel in channels:
            if not (folder / channel).is_dir():
                raise ImportFormatError(
                    f"patient {pid}: channel folder {folder / channel} is missing (folders present: {present})"
                )
        channel_files = {name: _list_slices(folder / name, pid) for name in [*channels, PNG_SEG_FOLDER]}
        _png_slice_geometry(pid, channel_files, folder)
        sources = {**{channels[c]: channel_files[c] for c in channels}, MASK_KEY: channel_files[PNG_SEG_FOLDER]}
        patients.append(SourcePatient(pid, source_split, folder, sources))

    if not patients:
        raise ImportFormatError(
            f"no patient under {src} has a {PNG_SEG_FOLDER}/ folder ({len(no_seg)} without: {no_seg[:5]}); "
            "medgen needs masks to train"
        )
    if no_seg:
        warn_skipped(f"skipped {len(no_seg)} patient(s) without a {PNG_SEG_FOLDER}/ folder (unusable for training): "
              + ", ".join(no_seg))
    return patients


def _write_patient(patient: SourcePatient, out_dir: Path, affine: np.ndarray) -> None:
    """Stack a patient's PNG slices into RAS volumes (of one size) and write them into ``out_dir``."""
    volumes: dict[str, tuple[Path, np.ndarray]] = {}
    for key, files in patient.sources.items():
        channel_dir = files[0].parent  # type: ignore[index]
        volumes[key] = channel_dir, _stack_png_channel(files, patient.pid, channel_dir)  # type: ignore[arg-type]
    for m in geometry_mismatches([(d, v.shape, affine) for d, v in volumes.values()]):
        raise ImportFormatError(f"patient {patient.pid}: PNG size in {m.path} differs from that in {m.reference} "
                                f"(RAS volumes {m.shape} vs {m.reference_shape})")
    for key, (_, volume) in volumes.items():
        if key == MASK_KEY:
            save_volume(modality_path(out_dir, key), binarize_mask(_png_mask_to_unit(volume)), affine, is_mask=True)
        else:
            save_volume(modality_path(out_dir, key), volume, affine)


