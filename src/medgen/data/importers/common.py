"""What both importers share: the error type, the argument checks, split assignment and the
all-or-nothing write into the destination (staging folder, lock, orphan clean-up)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm import tqdm

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, SPLITS
from medgen.core.fs import FolderLock, remove_orphans, temporary_path
from medgen.data.nifti_dataset import DataError, folder_problem, list_patients
from medgen.data.splits import assign_splits, parse_split


class ImportFormatError(DataError):
    """The source folder does not have the expected layout, or the import arguments are invalid;
    the message names the patient / file / argument."""


log = logging.getLogger("medgen.data")

#: the staging folders of an import live in the destination, named ``.medgen-import.tmp-<host>-<pid>-<token>``
#: (:func:`medgen.core.fs.temporary_path`), so a later import removes those a killed one left behind
_STAGING = "medgen-import"
#: the lock an import holds on its destination (another import into it fails at once, naming the holder)
_DESTINATION = "import destination"


def warn_skipped(message: str) -> None:
    """Something in the source was skipped (e.g. patients without labels): a one-line warning on
    the ``medgen`` logger that names it."""
    log.warning(message)




@dataclass
class SourcePatient:
    """One source patient: its id, the split it came from (``None``: to be assigned) and the
    source files per output key (``seg`` and image modalities)."""

    pid: str
    source_split: str | None
    folder: Path | None = None
    sources: dict[str, object] = field(default_factory=dict)


def check_split_fractions(split: Sequence[float] | None) -> tuple[float, float, float] | None:
    """:func:`medgen.data.splits.parse_split` with its message as an :class:`ImportFormatError`."""
    if split is None:
        return None
    try:
        return parse_split(split, "split")
    except ValueError as exc:
        raise ImportFormatError(str(exc)) from None


def check_dst(dst: Path, src: Path) -> None:
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


def check_src(src: Path) -> None:
    problem = folder_problem(src, "source folder")
    if problem:
        raise ImportFormatError(f"source folder {src} does not exist" if not src.exists() else f"{src}: {problem}")


def check_unique_ids(patients: Sequence[SourcePatient]) -> None:
    seen: dict[str, str | None] = {}
    for p in patients:
        if p.pid in seen:
            where = " and ".join(f"{s}/" if s else "the source root" for s in (seen[p.pid], p.source_split))
            raise ImportFormatError(f"patient {p.pid!r} appears twice (in {where}); patient ids must be unique")
        seen[p.pid] = p.source_split


def target_splits(patients: Sequence[SourcePatient], split: tuple[float, float, float] | None, seed: int) -> dict[str, str]:
    """Output split per patient: source ``test/`` (and ``val/``) are kept; the others go to
    ``train/`` or, with ``split``, are assigned by :func:`medgen.data.splits.assign_splits`."""
    free = [p.pid for p in patients if p.source_split not in ("test", "val")]
    assigned = assign_splits(free, split, seed) if split is not None else {pid: "train" for pid in free}
    return {p.pid: assigned.get(p.pid, p.source_split or "train") for p in patients}


def write_all(
    patients: Sequence[SourcePatient],
    dst: Path,
    targets: Mapping[str, str],
    write_one: Callable[[SourcePatient, Path], None],
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


def check_modality_targets(mapping: Mapping[str, str], what: str) -> dict[str, str]:
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

