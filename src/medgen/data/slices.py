"""Slice extraction per mode and the memory-mapped slice cache (see docs/architecture.md, Data).

The first run reads every source file once (:func:`medgen.data.validate.read_patient`: the
checks of ``medgen-data check`` run on the arrays just read), preprocesses every selected axial
slice and appends it to one ``float16`` array ``[N, C, S, S]`` on disk under
``<cache_dir>/slices/<fingerprint>/``; a dataset with problems is refused with the report of
``medgen-data check`` and leaves no cache behind.
The fingerprint covers the source files (path, size, mtime), the keys, the image size,
the selection/normalisation parameters and :data:`PREPROCESSING_VERSION`; any change
builds a new cache. Later runs open the array with ``np.memmap`` in well under a second,
and training memory does not grow with the dataset (pages are read on demand).

A cache is built in a temporary folder (a killed build's folder is removed by the next run) and
records a checksum when it is complete (:func:`cache_checksum`: all of the index and the metadata,
sampled blocks of the slices). Opening checks it; a cache that fails (or predates the checksum) is
moved aside, deleted and rebuilt, with a warning that names its folder. This module selects and
builds; :mod:`medgen.data.item_cache` holds the folder on disk (:class:`ItemCache`: opening and
checking it, replacing a bad one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar, Protocol, Sequence

import numpy as np

from medgen.core.constants import BRAIN_KEY, MASK_KEY, PREPROCESSING_VERSION
from medgen.core.fs import remove_orphans, temporary_path
from medgen.data.brain import brain_mask, brain_of
from medgen.data.nifti_dataset import DataError, modality_path
from medgen.data.parallel import ordered_map
from medgen.data.item_cache import (CACHE_DTYPE, CHECKSUM_SCHEME, DATA_FILE, INDEX_FILE, META_FILE, CacheCorrupt,
                                     ItemCache, cache_checksum, move_into_place, open_checked)
from medgen.data.transforms import preprocess_image, preprocess_mask
from medgen.data.validate import Problem, Report, read_patient

__all__ = ["CACHE_DTYPE", "CacheCorrupt", "CacheSpec", "ItemCache", "SliceSpec", "cache_checksum", "cache_directory",
           "fingerprint", "model_spacing", "open_or_build_cache", "open_or_build_caches", "preprocess_volumes",
           "select_slices", "source_files"]

log = logging.getLogger("medgen.data")


class CacheSpec(Protocol):
    """What a cache is built from and holds: :class:`SliceSpec` (axial slices ``[N, C, S, S]``) or
    :class:`medgen.data.volumes.VolumeSpec` (whole volumes ``[N, C, X, Y, Z]``). A dataclass whose
    fields (with :data:`PREPROCESSING_VERSION` and the source files) make the fingerprint."""

    keys: tuple[str, ...]
    brain_from: str
    brain_method: str
    folder: ClassVar[str]

    @property
    def file_keys(self) -> tuple[str, ...]: ...

    @property
    def item_shape(self) -> tuple[int, ...]: ...

    def patient_items(self, volumes: dict[str, np.ndarray],
                      affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]: ...

    def preprocess_file(self, key: str, volume: np.ndarray) -> None: ...


@dataclass(frozen=True)
class SliceSpec:
    """What goes into one slice cache. ``keys``: stored channels, images first then ``seg`` and
    ``brain`` (derived from the image ``brain_from`` and the lesion mask, see :mod:`medgen.data.brain`)."""

    keys: tuple[str, ...]
    image_size: int
    #: ``lesion`` keeps slices with >= min_lesion_pixels mask pixels; ``brain`` keeps slices
    #: where every image channel shows brain; ``all`` keeps every slice
    selection: str
    min_lesion_pixels: int = 1
    min_brain_fraction: float = 0.05
    brain_intensity: float = 0.1
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    #: the image modality the ``brain`` channel is derived from (read only when ``brain`` is stored)
    brain_from: str = "bravo"
    #: how the ``brain`` channel is derived (:data:`medgen.data.brain.BRAIN_METHODS`)
    brain_method: str = "heuristic"

    def __post_init__(self) -> None:
        if self.selection not in ("lesion", "brain", "all"):
            raise ValueError(f"unknown slice selection {self.selection!r}")
        if self.selection == "brain" and not any(k != MASK_KEY for k in self.keys):
            raise ValueError("brain selection needs at least one image channel")

    #: the folder under ``cache_dir`` its caches live in
    folder: ClassVar[str] = "slices"

    @property
    def image_keys(self) -> tuple[str, ...]:
        return image_keys(self.keys)

    @property
    def file_keys(self) -> tuple[str, ...]:
        """The modalities read from each patient folder: the stored ones, and ``brain_from`` for
        a derived ``brain`` channel."""
        return file_keys(self.keys, self.brain_from)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The spatial shape of one cached item: an ``S x S`` slice."""
        return (self.image_size, self.image_size)

    def patient_items(self, volumes: dict[str, np.ndarray],
                      affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
        """One patient's RAS volumes -> (its selected slices ``[k, C, S, S]``, their z indices,
        lesion pixels per slice, the voxel size of a model slice in mm)."""
        zooms = tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
        block, z, lesion = preprocess_volumes(volumes, self, zooms)
        return block, z, lesion, model_spacing(affine, volumes[self.file_keys[0]].shape, self.image_size)

    def preprocess_file(self, key: str, volume: np.ndarray) -> None:
        """Preprocess one file alone (to find the file a failing patient fails on)."""
        if key == MASK_KEY:
            preprocess_mask(volume, self.image_size)
        else:
            preprocess_image(volume, self.image_size, self.lower_percentile, self.upper_percentile)

    @classmethod
    def for_mode(cls, mode_cfg, data_cfg, space, selection: str) -> "SliceSpec":
        """The slices of ``space`` (a :class:`~medgen.data.space.SampleSpace`) of a mode's keys
        (``cfg.mode``) with the selection its class declares
        (``slice_selection``): ``"lesion"`` keeps tumour-positive slices (every slice when
        ``data.seg_positive_only`` is false), ``"brain"`` slices where every image channel shows brain.
        A ``brain`` key is derived from ``data.brain_from`` by ``data.brain_method``."""
        keys = tuple(dict.fromkeys([*mode_cfg.image_keys, *mode_cfg.cond_keys]))
        if selection == "lesion" and not data_cfg.seg_positive_only:
            selection = "all"
        return cls(
            keys=keys,
            image_size=space.size,
            selection=selection,
            min_lesion_pixels=max(1, int(data_cfg.min_lesion_pixels)),
            min_brain_fraction=float(data_cfg.min_brain_fraction),
            brain_intensity=float(data_cfg.brain_intensity),
            lower_percentile=float(data_cfg.lower_percentile),
            upper_percentile=float(data_cfg.upper_percentile),
            brain_from=str(data_cfg.brain_from),
            brain_method=str(data_cfg.brain_method),
        )


def image_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """The image modalities among stored channel ``keys`` (not ``seg``, not the derived ``brain``)."""
    return tuple(k for k in keys if k not in (MASK_KEY, BRAIN_KEY))


def file_keys(keys: Sequence[str], brain_from: str) -> tuple[str, ...]:
    """The modalities to read for stored channel ``keys``: the stored ones, and ``brain_from`` for
    a derived ``brain`` channel."""
    files = [k for k in keys if k != BRAIN_KEY]
    return tuple(dict.fromkeys(files + [brain_from] if BRAIN_KEY in keys else files))


def source_files(patients: Sequence[Path], keys: Sequence[str]) -> list[Path]:
    return [modality_path(p, k) for p in patients for k in keys]


def fingerprint(patients: Sequence[Path], spec: CacheSpec) -> str:
    """sha256 of the source files' (absolute path, size, mtime) plus the spec and preprocessing version."""
    h = hashlib.sha256()
    described = asdict(spec)
    if BRAIN_KEY not in spec.keys:  # caches without a brain channel keep their fingerprint
        del described["brain_from"]
    if BRAIN_KEY not in spec.keys or described["brain_method"] == "heuristic":  # as before the key existed
        del described["brain_method"]
    h.update(json.dumps({"spec": described, "version": PREPROCESSING_VERSION}, sort_keys=True).encode())
    for f in source_files(patients, spec.file_keys):
        try:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()


def select_slices(channels: np.ndarray, spec: SliceSpec) -> np.ndarray:
    """Indices of the axial slices to keep. ``channels``: ``[C, S, S, D]`` preprocessed, order = spec.keys."""
    depth = channels.shape[-1]
    if spec.selection == "all":
        return np.arange(depth)
    if spec.selection == "lesion":
        seg = channels[spec.keys.index(MASK_KEY)]
        return np.flatnonzero(seg.sum(axis=(0, 1)) >= spec.min_lesion_pixels)
    keep = np.ones(depth, dtype=bool)
    for key in spec.image_keys:
        img = channels[spec.keys.index(key)]
        keep &= (img > spec.brain_intensity).mean(axis=(0, 1)) >= spec.min_brain_fraction
    return np.flatnonzero(keep)


def cache_directory(cache_dir: Path, patients: Sequence[Path], spec: CacheSpec) -> Path:
    return Path(cache_dir) / spec.folder / fingerprint(patients, spec)[:24]


def open_or_build_cache(
    patients: Sequence[Path],
    spec: CacheSpec,
    cache_dir: str | Path,
    validate: bool = True,
    progress: bool = True,
    desc: str = "slice cache",
    workers: int = 0,
) -> ItemCache:
    """Open the cache for (patients, spec) or build it, reading each source file once.

    Raises:
        DataError: no patients, or problems in the files (with ``validate``: every problem
            ``medgen-data check`` reports; without: missing, unreadable or disagreeing files),
            with the full report; nothing is left on disk then.
    """
    return open_or_build_caches([(patients, desc)], spec, Path(cache_dir), validate, progress, workers)[0]


def open_or_build_caches(groups: Sequence[tuple[Sequence[Path], str]], spec: CacheSpec, cache_dir: Path,
                         validate: bool, progress: bool, workers: int) -> list[ItemCache]:
    """One cache per ``(patients, desc)`` group. Existing caches are opened (and checked: one that
    fails is moved aside and rebuilt, with a warning). Missing caches are built into temporary
    folders and moved into place only when no file of any group has an error; otherwise every
    temporary folder is deleted and DataError carries the report of all groups. Temporary folders
    a killed run left behind are removed first."""
    groups = [([Path(p) for p in patients], desc) for patients, desc in groups]
    directories = [cache_directory(cache_dir, patients, spec) for patients, _ in groups]
    slices_dir = Path(cache_dir) / spec.folder
    if slices_dir.is_dir():
        remove_orphans(sorted(slices_dir.glob(".*.tmp-*")))
    caches = [open_checked(directory) for directory in directories]
    report = Report()
    staged: list[tuple[Path, Path]] = []  # (temporary folder, final folder)
    try:
        for (patients, desc), directory, cache in zip(groups, directories, caches):
            if cache is not None:
                continue
            if not patients:
                raise DataError(f"no patients to build the {desc} from")
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(directory)  # names its owner: a later run removes it if this one is killed
            tmp.mkdir()
            staged.append((tmp, directory))
            # once an error is known the build fails: later patients are only checked
            _build(tmp, patients, spec, report, validate=validate, preprocess=report.ok, progress=progress,
                   desc=desc, workers=workers)
        if not report.ok:
            raise DataError("the dataset has problems; fix them and run again:\n" + report.format())
        for tmp, directory in staged:
            move_into_place(tmp, directory)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    # a cache built just now is checked too (it may be another process's, finished first)
    return [cache if cache is not None else ItemCache(directory) for cache, directory in zip(caches, directories)]


@dataclass
class _PatientSlices:
    """What one patient contributes: its problems and, when it has no error, its selected slices."""

    problems: list[Problem]
    block: np.ndarray | None = None  # [k, C, *item_shape] float16
    z: np.ndarray | None = None  # [k] int32 axial positions
    lesion: np.ndarray | None = None  # [k] int32 lesion pixels per slice
    spacing: tuple[float, float, float] | None = None  # mm per model pixel (x, y) and slice thickness (z)


def _patient_slices(folder: Path, spec: CacheSpec, validate: bool = True, preprocess: bool = True) -> _PatientSlices:
    """Read each modality of one patient once; check it (``validate``); when it has no error
    (and ``preprocess``), preprocess the volumes into the items of ``spec`` (slices or a volume).
    A failure while preprocessing is returned as an error on the file it came from (the patient
    folder when no single file fails on its own), never raised from inside a library."""
    read = read_patient(folder, spec.file_keys, validate=validate, keep=preprocess)
    if not read.ok or not preprocess:
        return _PatientSlices(read.problems)
    try:
        block, z, lesion, spacing = spec.patient_items(read.volumes, read.affines[spec.file_keys[0]])
    except Exception as exc:  # noqa: BLE001 - MONAI/torch/numpy raise many types; name the patient and file
        culprit = Path(folder)
        for k in spec.file_keys:  # the first file that fails on its own
            try:
                spec.preprocess_file(k, read.volumes[k])
            except Exception:  # noqa: BLE001
                culprit = modality_path(folder, k)
                break
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        problem = Problem(str(culprit), f"patient {Path(folder).name}: cannot preprocess for training "
                                        f"({type(exc).__name__}{': ' + text[:200] if text else ''})")
        return _PatientSlices(read.problems + [problem])
    return _PatientSlices(read.problems, block, z, lesion, spacing)


def model_spacing(affine: np.ndarray, shape: Sequence[int], image_size: int) -> tuple[float, float, float]:
    """Voxel size (mm) of a model slice cut from a RAS volume of ``shape`` and ``affine``: the
    in-plane spacing scaled by the square padding and the resize to ``image_size``, then the slice
    thickness."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    scale = max(shape[:2]) / image_size
    return (float(zooms[0] * scale), float(zooms[1] * scale), float(zooms[2]))


def preprocess_volumes(volumes: dict[str, np.ndarray], spec: SliceSpec, spacing: Sequence[float] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's RAS volumes (``key -> [H, W, D]`` as :func:`load_volume` returns them, voxel
    size ``spacing`` in mm) -> (selected slices ``[k, C, S, S]`` float16, their z indices, lesion
    pixels per slice). A ``brain`` channel by ``bet`` is found once in the whole volume as read
    (:func:`medgen.data.brain.brain_of`) and resized as the lesion mask is."""
    s = spec.image_size
    planes = {k: preprocess_mask(volumes[k], s) if k == MASK_KEY
              else preprocess_image(volumes[k], s, spec.lower_percentile, spec.upper_percentile)
              for k in spec.file_keys}  # [S, S, D] each
    if BRAIN_KEY in spec.keys and spec.brain_method != "heuristic":
        found = brain_of(volumes[spec.brain_from], spec.brain_method, spacing)
        brain = preprocess_mask(found.astype(np.float32), s) > 0
    elif BRAIN_KEY in spec.keys:
        brain = np.moveaxis(brain_mask(np.moveaxis(planes[spec.brain_from], -1, 0)), 0, -1)
    if BRAIN_KEY in spec.keys:
        if MASK_KEY in planes:  # a lesion is part of the brain
            brain |= planes[MASK_KEY] > 0
        planes[BRAIN_KEY] = brain.astype(np.float32)
    channels = np.stack([planes[k] for k in spec.keys])  # [C, S, S, D]
    keep = select_slices(channels, spec)
    block = np.ascontiguousarray(np.moveaxis(channels[..., keep], -1, 0), dtype=CACHE_DTYPE)
    if MASK_KEY in spec.keys:
        lesion = channels[spec.keys.index(MASK_KEY)][..., keep].sum(axis=(0, 1)).astype(np.int32)
    else:
        lesion = np.zeros(keep.size, dtype=np.int32)
    return block, keep.astype(np.int32), lesion


def _build(tmp: Path, patients: Sequence[Path], spec: CacheSpec, report: Report, *, validate: bool,
           preprocess: bool, progress: bool, desc: str, workers: int = 0) -> None:
    """Read every patient once (in ``workers`` processes), add its problems to ``report`` and,
    while the report has no error, append its slices to ``tmp``; complete ``tmp`` (index and
    meta) only when the report is still free of errors at the end."""
    n = 0
    patient_idx: list[np.ndarray] = []
    z_idx: list[np.ndarray] = []
    lesion: list[np.ndarray] = []
    spacings: list[tuple[float, float, float]] = []
    job = partial(_patient_slices, spec=spec, validate=validate, preprocess=preprocess)
    with open(tmp / DATA_FILE, "wb") as f:
        for i, result in enumerate(ordered_map(job, patients, workers, desc=f"building {desc}", progress=progress)):
            report.problems.extend(result.problems)
            if not report.ok or result.block is None:
                continue  # the build will fail; keep reading to report every problem
            f.write(result.block.tobytes())  # appended in patient order: [k, C, *item_shape]
            n += result.z.size
            patient_idx.append(np.full(result.z.size, i, dtype=np.int32))
            z_idx.append(result.z)
            lesion.append(result.lesion)
            spacings.append(result.spacing)
    report.patients_checked += len(patients)
    if not report.ok:
        return
    np.savez(
        tmp / INDEX_FILE,
        patient=np.concatenate(patient_idx),
        z=np.concatenate(z_idx),
        lesion_pixels=np.concatenate(lesion),
    )
    meta = {
        "keys": list(spec.keys),
        "shape": [n, len(spec.keys), *spec.item_shape],
        "dtype": np.dtype(CACHE_DTYPE).name,
        "patient_ids": [p.name for p in patients],
        "sources": [str(p) for p in patients],
        "spec": asdict(spec),
        # median voxel size of a model slice (mm): recorded in checkpoints, written into generated data
        "spacing": np.median(np.asarray(spacings), axis=0).tolist() if spacings else None,
        "preprocessing_version": PREPROCESSING_VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    meta = json.loads(json.dumps(meta))  # exactly what opening will read back, for the checksum
    meta["checksum"] = {"scheme": CHECKSUM_SCHEME, "sha256": cache_checksum(tmp, meta)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # last: the cache is complete with it
