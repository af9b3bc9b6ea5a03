"""nnU-Net raw -> medgen's layout: ``imagesTr/<case>_<XXXX>.nii.gz`` (one file per channel),
``labelsTr/<case>.nii.gz``, optionally ``imagesTs/`` + ``labelsTs/`` and ``dataset.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, NIFTI_SUFFIX
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
from medgen.data.nifti_dataset import PatientReader, modality_path, save_volume

_NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
_NNUNET_LABEL = re.compile(r"^(?P<case>.+)\.nii(\.gz)?$")


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
        clean = check_modality_targets(mapping, "--map")
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
        return {_parse_channel(k): m for k, m in check_modality_targets(names, str(meta)).items()}
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
        warn_skipped(f"{meta} declares an 'ignore' label; medgen counts every label > 0 as lesion, ignore voxels included")


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
    check_src(src)
    if not (src / "imagesTr").is_dir():
        raise ImportFormatError(f"{src} has no imagesTr/ folder; is it an nnU-Net raw dataset folder?")
    if not (src / "labelsTr").is_dir():
        raise ImportFormatError(f"{src} has no labelsTr/ folder; medgen needs labels to train")
    channels = _nnunet_mapping(src, mapping)
    fractions = check_split_fractions(split)
    check_dst(dst, src)
    _warn_ignore_label(src)
    patients = _source_patients(src, channels)
    check_unique_ids(patients)
    targets = target_splits(patients, fractions, seed)
    return write_all(patients, dst, targets, _write_case, desc="import nnunet")


def _case_groups(src: Path) -> list[tuple[dict[str, dict[int, Path]], dict[str, Path], str | None, str]]:
    """``(images, labels, split or None, folder name)`` of ``imagesTr`` (every case labelled, every
    label with images) and, if there, of the ``imagesTs`` cases that have a label in ``labelsTs``."""
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
            warn_skipped(f"skipped {len(skipped)} imagesTs case(s) without a label in {src / 'labelsTs'}: " + ", ".join(skipped))
        groups.append(({c: images_ts[c] for c in images_ts if c in labels_ts}, labels_ts, "test", "imagesTs"))
    return groups


def _source_patients(src: Path, channels: Mapping[int, str]) -> list[SourcePatient]:
    """One :class:`SourcePatient` per case to import, its files named by modality."""
    groups = _case_groups(src)
    all_channels = {ch for images, _, _, _ in groups for case in images.values() for ch in case}
    unknown = sorted(set(channels) - all_channels)
    if unknown:
        raise ImportFormatError(
            f"--map: channel {unknown[0]:04d} does not exist in {src} (channels present: "
            f"{[f'{c:04d}' for c in sorted(all_channels)]})"
        )
    patients: list[SourcePatient] = []
    for images, labels, source_split, folder_name in groups:
        for case in sorted(images):
            patient = SourcePatient(case, source_split)
            for channel, modality in channels.items():
                if channel not in images[case]:
                    raise ImportFormatError(
                        f"case {case}: missing channel file {src / folder_name / f'{case}_{channel:04d}{NIFTI_SUFFIX}'}"
                    )
                patient.sources[modality] = images[case][channel]
            patient.sources[MASK_KEY] = labels[case]
            patients.append(patient)
    return patients


def _write_case(patient: SourcePatient, out_dir: Path) -> None:
    """Read a case's files (each must be a readable 3D volume, all of one shape and affine) and
    write them into ``out_dir``; the label as a binary mask (lesion = label > 0)."""
    reader = PatientReader()
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, path in patient.sources.items():
        read = reader.read(path)  # type: ignore[arg-type]
        if read.problem:
            raise ImportFormatError(f"case {patient.pid}: {path}: {read.problem}")
        volumes[key] = read.data, read.affine
    for m in reader.mismatches():
        if m.kind == "shape":
            raise ImportFormatError(
                f"case {patient.pid}: {m.path} has shape {m.shape}, {m.reference} has {m.reference_shape}")
        raise ImportFormatError(f"case {patient.pid}: the affine of {m.path} differs from that of {m.reference} "
                                f"(max difference {m.max_difference:.4g} mm)")
    for key, (volume, affine) in volumes.items():
        if key == MASK_KEY:
            save_volume(modality_path(out_dir, key), (volume > 0).astype(np.float32), affine, is_mask=True)
        else:
            save_volume(modality_path(out_dir, key), volume, affine)
