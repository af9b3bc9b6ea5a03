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
moved aside, deleted and rebuilt, with a warning that names its folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from medgen.core.constants import MASK_KEY, PREPROCESSING_VERSION
from medgen.core.fs import remove_orphans, temporary_path
from medgen.data.nifti_dataset import DataError, modality_path
from medgen.data.parallel import ordered_map
from medgen.data.transforms import preprocess_image, preprocess_mask
from medgen.data.validate import Problem, Report, read_patient

log = logging.getLogger("medgen.data")

CACHE_DTYPE = np.float16
_DATA_FILE = "slices.bin"
_META_FILE = "meta.json"
_INDEX_FILE = "index.npz"
#: how :func:`cache_checksum` is computed, recorded with the checksum; a cache that records another
#: scheme, or none (built before caches checked themselves), is rebuilt
CHECKSUM_SCHEME = "sha256/index+meta+slices-64x64KiB-v1"
_SAMPLE_BLOCKS = 64  # evenly spaced, first and last block included
_SAMPLE_BLOCK_BYTES = 64 * 1024


class CacheCorrupt(DataError):
    """A slice cache folder that cannot be used; the message names the folder and the reason."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(f"slice cache {directory} cannot be used: {reason}")
        self.directory, self.reason = Path(directory), reason

    def __reduce__(self):
        return type(self), (self.directory, self.reason)


@dataclass(frozen=True)
class SliceSpec:
    """What goes into one slice cache. ``keys``: stored channels, images first then ``seg``."""

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

    def __post_init__(self) -> None:
        if self.selection not in ("lesion", "brain", "all"):
            raise ValueError(f"unknown slice selection {self.selection!r}")
        if self.selection == "brain" and not any(k != MASK_KEY for k in self.keys):
            raise ValueError("brain selection needs at least one image channel")

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if k != MASK_KEY)

    @classmethod
    def for_mode(cls, mode_cfg, data_cfg, image_size: int, selection: str) -> "SliceSpec":
        """The slices of a mode's keys (``cfg.mode``) with the selection its class declares
        (``slice_selection``): ``"lesion"`` keeps tumour-positive slices (every slice when
        ``data.seg_positive_only`` is false), ``"brain"`` slices where every image channel shows brain."""
        keys = tuple(dict.fromkeys([*mode_cfg.image_keys, *mode_cfg.cond_keys]))
        if selection == "lesion" and not data_cfg.seg_positive_only:
            selection = "all"
        return cls(
            keys=keys,
            image_size=int(image_size),
            selection=selection,
            min_lesion_pixels=max(1, int(data_cfg.min_lesion_pixels)),
            min_brain_fraction=float(data_cfg.min_brain_fraction),
            brain_intensity=float(data_cfg.brain_intensity),
            lower_percentile=float(data_cfg.lower_percentile),
            upper_percentile=float(data_cfg.upper_percentile),
        )


def source_files(patients: Sequence[Path], keys: Sequence[str]) -> list[Path]:
    return [modality_path(p, k) for p in patients for k in keys]


def fingerprint(patients: Sequence[Path], spec: SliceSpec) -> str:
    """sha256 of the source files' (absolute path, size, mtime) plus the spec and preprocessing version."""
    h = hashlib.sha256()
    h.update(json.dumps({"spec": asdict(spec), "version": PREPROCESSING_VERSION}, sort_keys=True).encode())
    for f in source_files(patients, spec.keys):
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


class SliceCache:
    """A built slice cache: ``data`` ``[N, C, S, S]`` float16 memmap plus per-slice index arrays.

    Opening checks the folder: readable metadata and index that agree, a slices file of the
    expected size, and the checksum recorded when the cache was completed.

    Raises:
        CacheCorrupt: any of these fails (the message names the folder and the reason).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        meta = self._read_meta()
        self.meta = meta
        try:
            self.keys: tuple[str, ...] = tuple(str(k) for k in meta["keys"])
            self.shape: tuple[int, ...] = tuple(int(n) for n in meta["shape"])
            self.patient_ids: list[str] = [str(p) for p in meta["patient_ids"]]
            #: median voxel size (mm) of a model slice, (x, y, z); None for caches built before it was recorded
            self.spacing: list[float] | None = meta.get("spacing")
            shape_ok = len(self.shape) == 4 and min(self.shape) >= 0 and self.shape[1] == len(self.keys)
            if not shape_ok or meta["dtype"] != np.dtype(CACHE_DTYPE).name:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CacheCorrupt(self.directory, f"{_META_FILE} does not describe a slice cache") from None
        try:
            with np.load(self.directory / _INDEX_FILE) as index:
                self.patient_index: np.ndarray = index["patient"]  # [N] index into patient_ids
                self.slice_index: np.ndarray = index["z"]  # [N] axial position in the source volume
                self.lesion_pixels: np.ndarray = index["lesion_pixels"]  # [N] (0 without a mask channel)
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{_INDEX_FILE} is missing") from None
        except Exception as exc:  # a truncated or overwritten zip fails in many ways: all mean unusable
            raise CacheCorrupt(self.directory, f"{_INDEX_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
        n = self.shape[0]
        arrays = (self.patient_index, self.slice_index, self.lesion_pixels)
        if any(a.shape != (n,) or a.dtype.kind not in "iu" for a in arrays) or (
                n and not 0 <= self.patient_index.min() <= self.patient_index.max() < len(self.patient_ids)):
            raise CacheCorrupt(self.directory, f"{_INDEX_FILE} does not match {_META_FILE}")
        expected = int(np.prod(self.shape)) * np.dtype(CACHE_DTYPE).itemsize
        try:
            size = (self.directory / _DATA_FILE).stat().st_size
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{_DATA_FILE} is missing") from None
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"{_DATA_FILE} is unreadable ({exc.strerror})") from None
        if size != expected:
            raise CacheCorrupt(self.directory, f"{_DATA_FILE} has {size} bytes, {expected} expected (truncated?)")
        recorded = meta.get("checksum")
        if not isinstance(recorded, dict) or recorded.get("scheme") != CHECKSUM_SCHEME:
            raise CacheCorrupt(self.directory, "it records no checksum (built by an older medgen)")
        try:
            actual = cache_checksum(self.directory, meta)
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"cannot read it to check it ({exc.strerror})") from None
        if actual != recorded.get("sha256"):
            raise CacheCorrupt(self.directory, "its contents do not match the checksum recorded when it was built")
        self._data: np.memmap | None = None

    def _read_meta(self) -> dict:
        try:
            meta = json.loads((self.directory / _META_FILE).read_text())
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{_META_FILE} is missing") from None
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"{_META_FILE} is unreadable ({exc.strerror})") from None
        except ValueError:  # not JSON, not UTF-8
            raise CacheCorrupt(self.directory, f"{_META_FILE} is not valid JSON") from None
        if not isinstance(meta, dict):
            raise CacheCorrupt(self.directory, f"{_META_FILE} does not describe a slice cache")
        return meta

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def data(self) -> np.ndarray:
        """The slices, opened lazily (so a pickled cache re-opens in each loader worker)."""
        if self._data is None:
            if self.shape[0] == 0:
                self._data = np.zeros(self.shape, dtype=CACHE_DTYPE)  # type: ignore[assignment]
            else:
                self._data = np.memmap(self.directory / _DATA_FILE, dtype=CACHE_DTYPE, mode="r", shape=self.shape)
        return self._data

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    @staticmethod
    def is_complete(directory: Path) -> bool:
        """Every file of a cache is there (meta.json, written last, holds the checksum); whether
        their contents are intact is what opening checks."""
        return all((Path(directory) / f).is_file() for f in (_DATA_FILE, _INDEX_FILE, _META_FILE))


def _sample_offsets(size: int) -> list[int]:
    """Offsets of the blocks of a slices file of ``size`` bytes that :func:`cache_checksum` reads:
    every block of a small file, else evenly spaced ones from the first to the last."""
    if size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
        return list(range(0, size, _SAMPLE_BLOCK_BYTES))
    last = size - _SAMPLE_BLOCK_BYTES
    return [last * i // (_SAMPLE_BLOCKS - 1) for i in range(_SAMPLE_BLOCKS)]


def cache_checksum(directory: Path, meta: dict) -> str:
    """sha256 of a cache folder's contents: all of index.npz, the metadata (canonical JSON without
    the checksum), the size of slices.bin and :data:`_SAMPLE_BLOCKS` blocks of it (the whole file
    when it is small). A warm start reads a few MB whatever the size of the cache; a file
    overwritten, truncated or swapped is caught, a change confined to unsampled bytes is not."""
    directory = Path(directory)
    h = hashlib.sha256(f"{CHECKSUM_SCHEME}\n".encode())
    h.update(hashlib.sha256((directory / _INDEX_FILE).read_bytes()).digest())
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    fd = os.open(directory / _DATA_FILE, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(f"{size}\n".encode())
        for offset in _sample_offsets(size):
            h.update(os.pread(fd, _SAMPLE_BLOCK_BYTES, offset))
    finally:
        os.close(fd)
    return h.hexdigest()


def cache_directory(cache_dir: Path, patients: Sequence[Path], spec: SliceSpec) -> Path:
    return Path(cache_dir) / "slices" / fingerprint(patients, spec)[:24]


def open_or_build_cache(
    patients: Sequence[Path],
    spec: SliceSpec,
    cache_dir: str | Path,
    validate: bool = True,
    progress: bool = True,
    desc: str = "slice cache",
    workers: int = 0,
) -> SliceCache:
    """Open the cache for (patients, spec) or build it, reading each source file once.

    Raises:
        DataError: no patients, or problems in the files (with ``validate``: every problem
            ``medgen-data check`` reports; without: missing, unreadable or disagreeing files),
            with the full report; nothing is left on disk then.
    """
    return open_or_build_caches([(patients, desc)], spec, Path(cache_dir), validate, progress, workers)[0]


def open_or_build_caches(groups: Sequence[tuple[Sequence[Path], str]], spec: SliceSpec, cache_dir: Path,
                         validate: bool, progress: bool, workers: int) -> list[SliceCache]:
    """One cache per ``(patients, desc)`` group. Existing caches are opened (and checked: one that
    fails is moved aside and rebuilt, with a warning). Missing caches are built into temporary
    folders and moved into place only when no file of any group has an error; otherwise every
    temporary folder is deleted and DataError carries the report of all groups. Temporary folders
    a killed run left behind are removed first."""
    groups = [([Path(p) for p in patients], desc) for patients, desc in groups]
    directories = [cache_directory(cache_dir, patients, spec) for patients, _ in groups]
    slices_dir = Path(cache_dir) / "slices"
    if slices_dir.is_dir():
        remove_orphans(sorted(slices_dir.glob(".*.tmp-*")))
    caches = [_open_checked(directory) for directory in directories]
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
            _move_into_place(tmp, directory)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    # a cache built just now is checked too (it may be another process's, finished first)
    return [cache if cache is not None else SliceCache(directory) for cache, directory in zip(caches, directories)]


def _open_checked(directory: Path) -> SliceCache | None:
    """The cache in ``directory`` if it passes its check; None when there is none, or when it
    failed (then, with a warning naming the folder and the reason, it is moved aside and deleted)."""
    try:
        seen = directory.lstat()
    except FileNotFoundError:
        return None
    try:
        return SliceCache(directory)
    except CacheCorrupt as exc:
        log.warning("%s; rebuilding it", exc)
        _discard(directory, seen)
        return None


def _discard(directory: Path, seen: os.stat_result) -> None:
    """Move the bad cache ``directory`` (as it was when ``seen``) out of the way, then delete it.
    Renaming first keeps the final name free for the rebuild at once, and a run killed while
    deleting leaves a temporary that the next run removes. If another process replaced the folder
    between the check and the rename, that new folder is put back rather than deleted."""
    aside = temporary_path(directory)
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return  # another process moved it first
    except OSError as exc:
        raise CacheCorrupt(directory, f"it failed its check and cannot be moved aside ({exc.strerror})") from None
    st = aside.lstat()
    if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) and _rename_back(aside, directory):
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _rename_back(aside: Path, directory: Path) -> bool:
    """Put a folder moved aside by mistake back in place; False if yet another one is there now
    (then the one aside is surplus)."""
    try:
        os.rename(aside, directory)
    except OSError:
        return False
    return True


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename the built ``tmp`` to ``directory`` (atomic). When another process finished the same
    cache first, keep that one if it passes its check, else replace it."""
    for attempt in range(3):
        try:
            os.replace(tmp, directory)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or attempt == 2:
                raise
        if _open_checked(directory) is not None:  # else it failed its check and is gone now
            return


@dataclass
class _PatientSlices:
    """What one patient contributes: its problems and, when it has no error, its selected slices."""

    problems: list[Problem]
    block: np.ndarray | None = None  # [k, C, S, S] float16
    z: np.ndarray | None = None  # [k] int32 axial positions
    lesion: np.ndarray | None = None  # [k] int32 lesion pixels per slice
    spacing: tuple[float, float, float] | None = None  # mm per model pixel (x, y) and slice thickness (z)


def _patient_slices(folder: Path, spec: SliceSpec, validate: bool = True, preprocess: bool = True) -> _PatientSlices:
    """Read each modality of one patient once; check it (``validate``); when it has no error
    (and ``preprocess``), preprocess the volumes and select the slices. A failure while
    preprocessing is returned as an error on the file it came from (the patient folder when no
    single file fails on its own), never raised from inside a library."""
    read = read_patient(folder, spec.keys, validate=validate, keep=preprocess)
    if not read.ok or not preprocess:
        return _PatientSlices(read.problems)
    try:
        block, z, lesion = preprocess_volumes(read.volumes, spec)
        key = spec.keys[0]
        spacing = model_spacing(read.affines[key], read.volumes[key].shape, spec.image_size)
    except Exception as exc:  # noqa: BLE001 - MONAI/torch/numpy raise many types; name the patient and file
        culprit = Path(folder)
        for k in spec.keys:  # the first file that fails on its own
            try:
                if k == MASK_KEY:
                    preprocess_mask(read.volumes[k], spec.image_size)
                else:
                    preprocess_image(read.volumes[k], spec.image_size, spec.lower_percentile, spec.upper_percentile)
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


def preprocess_volumes(volumes: dict[str, np.ndarray], spec: SliceSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's RAS volumes (``key -> [H, W, D]`` as :func:`load_volume` returns them) ->
    (selected slices ``[k, C, S, S]`` float16, their z indices, lesion pixels per slice)."""
    s = spec.image_size
    channels = np.stack(
        [
            preprocess_mask(volumes[k], s)
            if k == MASK_KEY
            else preprocess_image(volumes[k], s, spec.lower_percentile, spec.upper_percentile)
            for k in spec.keys
        ]
    )  # [C, S, S, D]
    keep = select_slices(channels, spec)
    block = np.ascontiguousarray(np.moveaxis(channels[..., keep], -1, 0), dtype=CACHE_DTYPE)
    if MASK_KEY in spec.keys:
        lesion = channels[spec.keys.index(MASK_KEY)][..., keep].sum(axis=(0, 1)).astype(np.int32)
    else:
        lesion = np.zeros(keep.size, dtype=np.int32)
    return block, keep.astype(np.int32), lesion


def _build(tmp: Path, patients: Sequence[Path], spec: SliceSpec, report: Report, *, validate: bool,
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
    with open(tmp / _DATA_FILE, "wb") as f:
        for i, result in enumerate(ordered_map(job, patients, workers, desc=f"building {desc}", progress=progress)):
            report.problems.extend(result.problems)
            if not report.ok or result.block is None:
                continue  # the build will fail; keep reading to report every problem
            f.write(result.block.tobytes())  # appended in patient order: [k, C, S, S]
            n += result.z.size
            patient_idx.append(np.full(result.z.size, i, dtype=np.int32))
            z_idx.append(result.z)
            lesion.append(result.lesion)
            spacings.append(result.spacing)
    report.patients_checked += len(patients)
    if not report.ok:
        return
    np.savez(
        tmp / _INDEX_FILE,
        patient=np.concatenate(patient_idx),
        z=np.concatenate(z_idx),
        lesion_pixels=np.concatenate(lesion),
    )
    meta = {
        "keys": list(spec.keys),
        "shape": [n, len(spec.keys), spec.image_size, spec.image_size],
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
    (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))  # last: the cache is complete with it
