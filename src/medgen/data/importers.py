"""Convert public brain-metastasis releases into medgen's dataset layout (see docs/architecture.md, Data).

Two source formats:

* **BrainMetShare PNG** (Stanford BrainMetShare-3): one folder per patient (``Mets_005/``),
  optionally grouped in ``train/`` / ``val/`` / ``test/``. Each patient folder holds channel
  folders ``0``, ``1``, ``2``, ``3`` and ``seg`` with one 8-bit grayscale PNG per axial slice,
  named by slice index (``0.png``, ``1.png``, ... ``12.png``; ordered by the integer, not lexically).
* **nnU-Net raw**: ``imagesTr/<case>_<XXXX>.nii.gz`` (one file per channel), ``labelsTr/<case>.nii.gz``,
  optionally ``imagesTs/`` + ``labelsTs/`` and ``dataset.json``.

Output: ``DST/<split>/<patient>/<modality>.nii.gz`` written with :func:`save_volume`; only the
mapped modalities plus ``seg`` are written.

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

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, NIFTI_SUFFIX, SPLITS
from medgen.core.fs import FolderLock, remove_orphans, temporary_path
from medgen.data.nifti_dataset import (
    DataError,
    folder_problem,
    geometry_mismatches,
    list_patients,
    load_volume,
    modality_path,
    save_volume,
    volume_shape_problem,
)
from medgen.data.splits import assign_splits, parse_split
from medgen.data.transforms import binarize_mask

__all__ = [
    "DEFAULT_PNG_MAPPING",
    "ImportFormatError",
    "import_brainmetshare_png",
    "import_nnunet",
    "png_slice_to_ras",
]

#: BrainMetShare channel folder -> medgen modality
DEFAULT_PNG_MAPPING: dict[str, str] = {"0": "bravo", "1": "t1_pre", "2": "t1_gd", "3": "flair"}
#: name of the mask folder in a BrainMetShare patient folder
PNG_SEG_FOLDER = "seg"

_NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
_NNUNET_LABEL = re.compile(r"^(?P<case>.+)\.nii(\.gz)?$")


class ImportFormatError(DataError):
    """The source folder does not have the expected layout, or the import arguments are invalid;
    the message names the patient / file / argument."""


log = logging.getLogger("medgen.data")

#: the staging folders of an import live in the destination, named ``.medgen-import.tmp-<host>-<pid>-<token>``
#: (:func:`medgen.core.fs.temporary_path`), so a later import removes those a killed one left behind
_STAGING = "medgen-import"
#: the lock an import holds on its destination (another import into it fails at once, naming the holder)
_DESTINATION = "import destination"


def _warn(message: str) -> None:
    """Something in the source was skipped (e.g. patients without labels): a one-line warning on
    the ``medgen`` logger that names it."""
    log.warning(message)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


@dataclass
class _Patient:
    """One source patient: its id, the split it came from (``None``: to be assigned) and the
    source files per output key (``seg`` and image modalities)."""

    pid: str
    source_split: str | None
    folder: Path | None = None
    sources: dict[str, object] = field(default_factory=dict)


def _check_split_fractions(split: Sequence[float] | None) -> tuple[float, float, float] | None:
    """:func:`medgen.data.splits.parse_split` with its message as an :class:`ImportFormatError`."""
    if split is None:
        return None
    try:
        return parse_split(split, "split")
    except ValueError as exc:
        raise ImportFormatError(str(exc)) from None


def _check_dst(dst: Path, src: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise ImportFormatError(f"destination {dst} is a file, not a folder; choose a new folder")
    if dst.resolve() == src.resolve():
        raise ImportFormatError(f"destination {dst} is the source folder; choose a new folder")
    _check_dst_empty(dst)


def _check_dst_empty(dst: Path) -> None:
    existing = [p for s in SPLITS for p in list_patients(dst / s)]
    if existing:
        names = ", ".join(str(p.relative_to(dst)) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise ImportFormatError(
            f"destination {dst} already holds patient folders ({names}{more}); import into an empty folder"
        )


def _check_src(src: Path) -> None:
    problem = folder_problem(src, "source folder")
    if problem:
        raise ImportFormatError(f"source folder {src} does not exist" if not src.exists() else f"{src}: {problem}")


def _check_unique_ids(patients: Sequence[_Patient]) -> None:
    seen: dict[str, str | None] = {}
    for p in patients:
        if p.pid in seen:
            where = " and ".join(f"{s}/" if s else "the source root" for s in (seen[p.pid], p.source_split))
            raise ImportFormatError(f"patient {p.pid!r} appears twice (in {where}); patient ids must be unique")
        seen[p.pid] = p.source_split


def _target_splits(patients: Sequence[_Patient], split: tuple[float, float, float] | None, seed: int) -> dict[str, str]:
    """Output split per patient: source ``test/`` (and ``val/``) are kept; the others go to
    ``train/`` or, with ``split``, are assigned by :func:`medgen.data.splits.assign_splits`."""
    free = [p.pid for p in patients if p.source_split not in ("test", "val")]
    assigned = assign_splits(free, split, seed) if split is not None else {pid: "train" for pid in free}
    return {p.pid: assigned.get(p.pid, p.source_split or "train") for p in patients}


def _write_all(
    patients: Sequence[_Patient],
    dst: Path,
    targets: Mapping[str, str],
    write_one: Callable[[_Patient, Path], None],
    desc: str,
) -> int:
    """Write every patient into a hidden staging folder under ``dst`` and move the finished
    patient folders into place only when all succeeded (a failed import leaves ``dst`` as it was).

    The whole write holds an exclusive lock on ``dst`` (:class:`medgen.core.fs.FolderLock`): a second
    import into it fails at once with :class:`medgen.core.fs.FolderBusy`, naming the process that
    holds it. Under the lock ``dst`` is checked again to hold no patient folder (an import that
    finished meanwhile), and staging folders left by killed imports are removed.
    """
    with FolderLock(dst, _DESTINATION):
        _check_dst_empty(dst)  # again, now that no other import can write into it
        remove_orphans(sorted(dst.glob(f".{_STAGING}.tmp-*")) + sorted(dst.glob(f".{_STAGING}-[0-9]*")))
        staging = temporary_path(dst / _STAGING)
        try:
            for patient in tqdm(patients, desc=desc, unit="patient"):
                write_one(patient, staging / targets[patient.pid] / patient.pid)
            for patient in patients:
                final = dst / targets[patient.pid] / patient.pid
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / targets[patient.pid] / patient.pid, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return len(patients)


def _check_modality_targets(mapping: Mapping[str, str], what: str) -> dict[str, str]:
    """Mapping values must be distinct image modalities; returns a cleaned copy."""
    if not mapping:
        raise ImportFormatError(f"{what}: the channel mapping is empty; give e.g. 0=bravo")
    clean = {str(k).strip(): str(v).strip().lower() for k, v in mapping.items()}
    for channel, modality in clean.items():
        if modality == MASK_KEY:
            raise ImportFormatError(
                f"{what}: channel {channel!r} mapped to {MASK_KEY!r}; the mask comes from the labels, "
                f"map channels to image modalities {IMAGE_MODALITIES}"
            )
        if modality not in IMAGE_MODALITIES:
            raise ImportFormatError(
                f"{what}: channel {channel!r} mapped to unknown modality {modality!r}; known: {IMAGE_MODALITIES}"
            )
    targets = list(clean.values())
    dupes = sorted({m for m in targets if targets.count(m) > 1})
    if dupes:
        raise ImportFormatError(f"{what}: modality {dupes[0]!r} is the target of more than one channel")
    return clean


# --------------------------------------------------------------------------------------------
# BrainMetShare PNG
# --------------------------------------------------------------------------------------------


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
            _warn(f"{src}: holds split folders, so these folders beside them are not imported: {others[:10]}")
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
        _warn(f"patient {pid}: slice numbers in {folder} have gaps ({ref[0]}..{ref[-1]}, {len(ref)} files); "
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
    _check_src(src)
    channels = _check_modality_targets(DEFAULT_PNG_MAPPING if mapping is None else mapping, "--map")
    if PNG_SEG_FOLDER in channels:
        raise ImportFormatError(f"--map: {PNG_SEG_FOLDER!r} is the mask folder, not an image channel")
    voxel = _check_spacing(spacing)
    fractions = _check_split_fractions(split)
    _check_dst(dst, src)

    if (src / PNG_SEG_FOLDER).is_dir() or any((src / c).is_dir() for c in channels):
        raise ImportFormatError(
            f"{src} looks like a single patient folder (it holds channel folders); pass the folder that holds the patients"
        )
    found = _png_patient_folders(src)
    if not found:
        raise ImportFormatError(f"{src} holds no patient folders (expected e.g. Mets_005/0/0.png ... or train/Mets_005/...)")

    patients: list[_Patient] = []
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
        patients.append(_Patient(pid, source_split, folder, sources))

    if not patients:
        raise ImportFormatError(
            f"no patient under {src} has a {PNG_SEG_FOLDER}/ folder ({len(no_seg)} without: {no_seg[:5]}); "
            "medgen needs masks to train"
        )
    if no_seg:
        _warn(f"skipped {len(no_seg)} patient(s) without a {PNG_SEG_FOLDER}/ folder (unusable for training): "
              + ", ".join(no_seg))
    _check_unique_ids(patients)
    targets = _target_splits(patients, fractions, seed)
    affine = np.diag([*voxel, 1.0])

    def write_one(patient: _Patient, out_dir: Path) -> None:
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

    return _write_all(patients, dst, targets, write_one, desc="import brainmetshare-png")


# --------------------------------------------------------------------------------------------
# nnU-Net raw
# --------------------------------------------------------------------------------------------


def _scan_nnunet_images(folder: Path) -> dict[str, dict[int, Path]]:
    """``{case: {channel: path}}`` of an ``imagesTr``/``imagesTs`` folder."""
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = _NNUNET_IMAGE.match(p.name)
        if m is None:
            raise ImportFormatError(
                f"{p}: not an nnU-Net image file name (expected <case>_<4-digit channel>{NIFTI_SUFFIX})"
            )
        cases.setdefault(m["case"], {})[int(m["channel"])] = p
    return cases


def _scan_nnunet_labels(folder: Path) -> dict[str, Path]:
    labels: dict[str, Path] = {}
    if not folder.is_dir():
        return labels
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = _NNUNET_LABEL.match(p.name)
        if m is None:
            raise ImportFormatError(f"{p}: not an nnU-Net label file name (expected <case>{NIFTI_SUFFIX})")
        labels[m["case"]] = p
    return labels


def _parse_channel(key: str) -> int:
    text = str(key).strip()
    if not text.isdigit() or len(text) > 4:
        raise ImportFormatError(f"--map: channel {key!r} is not an nnU-Net channel number (e.g. 0 or 0000)")
    return int(text)


def _nnunet_mapping(src: Path, mapping: Mapping[str, str] | None) -> dict[int, str]:
    """channel number -> modality, from ``mapping`` or ``dataset.json``'s ``channel_names``."""
    if mapping is not None:
        clean = _check_modality_targets(mapping, "--map")
        out: dict[int, str] = {}
        for key, modality in clean.items():
            channel = _parse_channel(key)
            if channel in out:
                raise ImportFormatError(f"--map: channel {channel:04d} is given twice")
            out[channel] = modality
        return out
    meta = src / "dataset.json"
    hint = "give the channel mapping with --map, e.g. --map 0000=bravo,0001=t1_gd"
    if not meta.is_file():
        raise ImportFormatError(f"{src} has no dataset.json to read channel names from; {hint}")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ImportFormatError(f"{meta}: cannot read it as JSON ({exc}); {hint}") from None
    names = info.get("channel_names", info.get("modality")) if isinstance(info, dict) else None
    if not isinstance(names, dict) or not names:
        raise ImportFormatError(f"{meta} has no channel_names; {hint}")
    unknown = {k: v for k, v in names.items() if str(v).strip().lower() not in IMAGE_MODALITIES}
    if unknown:
        raise ImportFormatError(
            f"{meta}: channel names {unknown} are not medgen modalities {IMAGE_MODALITIES}; {hint}"
        )
    try:
        return {_parse_channel(k): m for k, m in _check_modality_targets(names, str(meta)).items()}
    except ImportFormatError as exc:
        raise ImportFormatError(f"{exc}; {hint}") from None


def _warn_ignore_label(src: Path) -> None:
    meta = src / "dataset.json"
    try:
        info = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        return
    labels = info.get("labels") if isinstance(info, dict) else None
    if isinstance(labels, dict) and any(str(k).lower() == "ignore" or str(v).lower() == "ignore" for k, v in labels.items()):
        _warn(f"{meta} declares an 'ignore' label; medgen counts every label > 0 as lesion, ignore voxels included")


def import_nnunet(
    src: str | Path,
    dst: str | Path,
    mapping: Mapping[str, str] | None = None,
    split: Sequence[float] | None = None,
    seed: int = 0,
) -> int:
    """Import an nnU-Net raw dataset folder into ``dst/<split>/<case>/<modality>.nii.gz``.

    Args:
        src: folder with ``imagesTr/<case>_<XXXX>.nii.gz``, ``labelsTr/<case>.nii.gz`` and
            optionally ``imagesTs/`` + ``labelsTs/`` and ``dataset.json``.
        dst: new dataset root (must not hold patient folders yet).
        mapping: channel (``"0000"`` or ``"0"``) -> modality. Without it, ``dataset.json``'s
            ``channel_names`` are used when every name is a medgen modality (case-insensitive).
        split: ``(train, val, test)`` fractions for the ``imagesTr`` cases; default all into ``train/``.
        seed: seed of the patient-level split.

    Returns:
        the number of cases imported.

    Raises:
        ImportFormatError: missing folders / files, no usable mapping, shape or affine mismatch
            between a case's channels and label, or a non-empty ``dst``.
        FolderBusy: another import is writing into ``dst`` (the message names that process).

    Labels become binary masks (lesion = label > 0). The source affines are kept (volumes are
    reoriented to RAS by :func:`load_volume`). ``imagesTs`` cases go to ``test/`` when their label
    exists in ``labelsTs/``; the others are skipped with a warning.
    """
    src, dst = Path(src), Path(dst)
    _check_src(src)
    if not (src / "imagesTr").is_dir():
        raise ImportFormatError(f"{src} has no imagesTr/ folder; is it an nnU-Net raw dataset folder?")
    if not (src / "labelsTr").is_dir():
        raise ImportFormatError(f"{src} has no labelsTr/ folder; medgen needs labels to train")
    channels = _nnunet_mapping(src, mapping)
    fractions = _check_split_fractions(split)
    _check_dst(dst, src)
    _warn_ignore_label(src)

    patients: list[_Patient] = []
    images_tr = _scan_nnunet_images(src / "imagesTr")
    labels_tr = _scan_nnunet_labels(src / "labelsTr")
    if not images_tr:
        raise ImportFormatError(f"{src / 'imagesTr'} holds no image files")
    unlabelled = sorted(set(images_tr) - set(labels_tr))
    if unlabelled:
        raise ImportFormatError(f"case {unlabelled[0]}: no label {src / 'labelsTr' / (unlabelled[0] + NIFTI_SUFFIX)}"
                                + (f" ({len(unlabelled)} cases without labels)" if len(unlabelled) > 1 else ""))
    orphans = sorted(set(labels_tr) - set(images_tr))
    if orphans:
        raise ImportFormatError(f"case {orphans[0]}: label {labels_tr[orphans[0]]} has no images in {src / 'imagesTr'}")
    groups: list[tuple[dict[str, dict[int, Path]], dict[str, Path], str | None, str]] = [(images_tr, labels_tr, None, "imagesTr")]

    if (src / "imagesTs").is_dir():
        images_ts = _scan_nnunet_images(src / "imagesTs")
        labels_ts = _scan_nnunet_labels(src / "labelsTs")
        skipped = sorted(set(images_ts) - set(labels_ts))
        if skipped:
            _warn(f"skipped {len(skipped)} imagesTs case(s) without a label in {src / 'labelsTs'}: " + ", ".join(skipped))
        groups.append(({c: images_ts[c] for c in images_ts if c in labels_ts}, labels_ts, "test", "imagesTs"))

    all_channels = {ch for images, _, _, _ in groups for case in images.values() for ch in case}
    unknown = sorted(set(channels) - all_channels)
    if unknown:
        raise ImportFormatError(
            f"--map: channel {unknown[0]:04d} does not exist in {src} (channels present: "
            f"{[f'{c:04d}' for c in sorted(all_channels)]})"
        )
    for images, labels, source_split, folder_name in groups:
        for case in sorted(images):
            patient = _Patient(case, source_split)
            for channel, modality in channels.items():
                if channel not in images[case]:
                    raise ImportFormatError(
                        f"case {case}: missing channel file {src / folder_name / f'{case}_{channel:04d}{NIFTI_SUFFIX}'}"
                    )
                patient.sources[modality] = images[case][channel]
            patient.sources[MASK_KEY] = labels[case]
            patients.append(patient)
    _check_unique_ids(patients)
    targets = _target_splits(patients, fractions, seed)

    def write_one(patient: _Patient, out_dir: Path) -> None:
        volumes: dict[str, tuple[Path, np.ndarray, np.ndarray]] = {}
        for key, path in patient.sources.items():
            try:
                volume, affine = load_volume(path)  # type: ignore[arg-type]
            except DataError as exc:  # not a grayscale volume; the message names the file
                raise ImportFormatError(f"case {patient.pid}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - nibabel raises many types; report the file
                raise ImportFormatError(f"case {patient.pid}: cannot read {path}: {type(exc).__name__}: {exc}") from None
            problem = volume_shape_problem(volume.shape)
            if problem:
                raise ImportFormatError(f"case {patient.pid}: {path}: {problem}")
            volumes[key] = path, volume, affine  # type: ignore[assignment]
        for m in geometry_mismatches([(path, v.shape, affine) for path, v, affine in volumes.values()]):
            if m.kind == "shape":
                raise ImportFormatError(
                    f"case {patient.pid}: {m.path} has shape {m.shape}, {m.reference} has {m.reference_shape}")
            raise ImportFormatError(f"case {patient.pid}: the affine of {m.path} differs from that of {m.reference} "
                                    f"(max difference {m.max_difference:.4g} mm)")
        for key, (_, volume, affine) in volumes.items():
            if key == MASK_KEY:
                save_volume(modality_path(out_dir, key), (volume > 0).astype(np.float32), affine, is_mask=True)
            else:
                save_volume(modality_path(out_dir, key), volume, affine)

    return _write_all(patients, dst, targets, write_one, desc="import nnunet")
