"""Slice extraction per mode and the memory-mapped slice cache (DESIGN.md section 2).

The first run preprocesses every selected axial slice once and appends it to one
``float16`` array ``[N, C, S, S]`` on disk under ``<cache_dir>/slices/<fingerprint>/``.
The fingerprint covers the source files (path, size, mtime), the keys, the image size,
the selection/normalisation parameters and :data:`PREPROCESSING_VERSION`; any change
builds a new cache. Later runs open the array with ``np.memmap`` in well under a second,
and training memory does not grow with the dataset (pages are read on demand).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from medgen.core.constants import MASK_KEY, PREPROCESSING_VERSION
from medgen.data.nifti_dataset import DataError, NiFTIDataset, modality_path, split_patients
from medgen.data.parallel import ordered_map
from medgen.data.transforms import preprocess_image, preprocess_mask

CACHE_DTYPE = np.float16
_DATA_FILE = "slices.bin"
_META_FILE = "meta.json"
_INDEX_FILE = "index.npz"


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
    def for_mode(cls, mode_cfg, data_cfg, image_size: int) -> "SliceSpec":
        """Per-mode selection: seg keeps tumour-positive slices (unless ``data.seg_positive_only``
        is false: then every slice); bravo/dual keep slices where every image channel shows brain."""
        keys = tuple(dict.fromkeys([*mode_cfg.image_keys, *mode_cfg.cond_keys]))
        if mode_cfg.name == "seg" or list(keys) == [MASK_KEY]:
            selection = "lesion" if data_cfg.seg_positive_only else "all"
        else:
            selection = "brain"
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
    """A built slice cache: ``data`` ``[N, C, S, S]`` float16 memmap plus per-slice index arrays."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        meta = json.loads((self.directory / _META_FILE).read_text())
        self.meta = meta
        self.keys: tuple[str, ...] = tuple(meta["keys"])
        self.shape: tuple[int, ...] = tuple(meta["shape"])
        self.patient_ids: list[str] = list(meta["patient_ids"])
        index = np.load(self.directory / _INDEX_FILE)
        self.patient_index: np.ndarray = index["patient"]  # [N] index into patient_ids
        self.slice_index: np.ndarray = index["z"]  # [N] axial position in the source volume
        self.lesion_pixels: np.ndarray = index["lesion_pixels"]  # [N] (0 without a mask channel)
        self._data: np.memmap | None = None

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
        return (directory / _META_FILE).is_file() and (directory / _INDEX_FILE).is_file()


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
    """Open the cache for (patients, spec) or build it (validating the sources first)."""
    patients = [Path(p) for p in patients]
    directory = cache_directory(Path(cache_dir), patients, spec)
    if SliceCache.is_complete(directory):
        return SliceCache(directory)
    if not patients:
        raise DataError(f"no patients to build the {desc} from")
    if validate:
        validate_patients(patients, spec.keys, progress=progress, workers=workers)
    _build(directory, patients, spec, progress, desc, workers)
    return SliceCache(directory)


def validate_patients(patients: Sequence[Path], keys: Sequence[str], progress: bool = True, workers: int = 0) -> None:
    """Run ``medgen-data check``'s checks on exactly these files; refuse with its messages."""
    from medgen.data.validate import check_patients

    report = check_patients(patients, keys, progress=progress, workers=workers)
    if not report.ok:
        raise DataError("the dataset has problems; fix them and run again:\n" + report.format())


def _preprocess_patient(folder: Path, spec: SliceSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient -> (selected slices ``[k, C, S, S]`` float16, their z indices, lesion pixels per slice)."""
    item = NiFTIDataset([folder], spec.keys)[0]
    s = spec.image_size
    channels = np.stack(
        [
            preprocess_mask(item.volumes[k], s)
            if k == MASK_KEY
            else preprocess_image(item.volumes[k], s, spec.lower_percentile, spec.upper_percentile)
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


def _build(directory: Path, patients: Sequence[Path], spec: SliceSpec, progress: bool, desc: str,
           workers: int = 0) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        n = 0
        patient_idx: list[np.ndarray] = []
        z_idx: list[np.ndarray] = []
        lesion: list[np.ndarray] = []
        with open(tmp / _DATA_FILE, "wb") as f:
            results = ordered_map(partial(_preprocess_patient, spec=spec), patients, workers,
                                  desc=f"building {desc}", progress=progress)
            for i, (block, keep, lesion_pixels) in enumerate(results):
                f.write(block.tobytes())  # appended in patient order: [k, C, S, S]
                n += keep.size
                patient_idx.append(np.full(keep.size, i, dtype=np.int32))
                z_idx.append(keep)
                lesion.append(lesion_pixels)
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
            "preprocessing_version": PREPROCESSING_VERSION,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, directory)  # atomic; fails if another process finished first
        except OSError:
            if not SliceCache.is_complete(directory):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class SliceDataset(Dataset):
    """2D training items from a :class:`SliceCache`: ``{key: [1, S, S] float32 in [0, 1]}``."""

    def __init__(self, cache: SliceCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        arr = np.asarray(self.cache.data[index], dtype=np.float32)  # [C, S, S]
        return {k: torch.from_numpy(arr[c : c + 1].copy()) for c, k in enumerate(self.cache.keys)}


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch order depends only on (seed, epoch), and which can skip
    the first ``skip`` indices of an epoch (for resuming in the middle of an epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """A loader with a :class:`ResumableSampler` (also for one process); ``batch_size`` is per rank."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last and world_size > 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader | None
    train_cache: SliceCache
    val_cache: SliceCache | None
    fingerprint: str


def build_data(cfg, rank: int = 0, world_size: int = 1, progress: bool = True,
               barrier=None) -> DataBundle:
    """Train/val loaders for the configured mode from ``paths.data_dir`` (cache under ``paths.cache_dir``).

    In a multi-process run, rank 0 builds the caches and the others wait on ``barrier()``.
    """
    from medgen.core.paths import resolve_path

    root = resolve_path(cfg.paths.data_dir)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist. Set paths.data_dir=... or MEDGEN_DATA_DIR, or make a "
            f"phantom dataset: medgen-data phantom --out {root} --subjects 20"
        )
    cache_dir = resolve_path(cfg.paths.cache_dir)
    spec = SliceSpec.for_mode(cfg.mode, cfg.data, cfg.model.image_size)
    d = cfg.data
    train_patients = split_patients(root, "train", d.val_fraction)
    val_patients = split_patients(root, "val", d.val_fraction)
    if not train_patients:
        raise DataError(f"{root / 'train'}: no patient folders (expected train/<patient>/{{{','.join(spec.keys)}}}.nii.gz)")

    show = progress and rank == 0
    if barrier is not None and world_size > 1 and rank != 0:
        barrier()
    needs_build = [ps for ps in (train_patients, val_patients)
                   if ps and not SliceCache.is_complete(cache_directory(cache_dir, ps, spec))]
    if d.validate and needs_build:  # check everything this run uses before building anything
        validate_patients([p for ps in needs_build for p in ps], spec.keys, progress=show, workers=d.num_workers)

    def _open(patients, desc):
        return open_or_build_cache(patients, spec, cache_dir, validate=False, progress=show, desc=desc,
                                   workers=d.num_workers)

    train_cache = _open(train_patients, "train slice cache")
    val_cache = _open(val_patients, "val slice cache") if val_patients else None
    if barrier is not None and world_size > 1 and rank == 0:
        barrier()
    if len(train_cache) == 0:
        raise DataError(f"no training slices selected from {root / 'train'} for mode {cfg.mode.name!r} ({spec.selection} selection)")

    per_rank = cfg.training.batch_size // world_size
    train_ds = SliceDataset(train_cache)
    if len(train_ds) < per_rank * world_size:
        raise DataError(
            f"only {len(train_ds)} training slices selected from {root / 'train'}, fewer than one batch "
            f"(training.batch_size={cfg.training.batch_size}); lower training.batch_size or add data")
    train = build_dataloader(train_ds, per_rank, shuffle=True, seed=cfg.seed, rank=rank,
                             world_size=world_size, num_workers=d.num_workers, drop_last=True)
    val = None
    if val_cache is not None and len(val_cache):
        val = build_dataloader(SliceDataset(val_cache), per_rank, shuffle=False, seed=cfg.seed, rank=rank,
                               world_size=world_size, num_workers=0, drop_last=False)
    return DataBundle(train, val, train_cache, val_cache, fingerprint(train_patients + val_patients, spec))
