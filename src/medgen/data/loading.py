"""From slice caches to training batches: the dataset over a :class:`~medgen.data.slices.ItemCache`,
the resumable sampler, the loader, and :func:`build_data`, which gives a training run its
train loader and train/val caches (see docs/architecture.md, Data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medgen.core.constants import LESION_COUNT_KEY, LESION_MM_KEY
from medgen.data.nifti_dataset import DataError
from medgen.data.parallel import stopping_at_exit, worker_init_dying_with_parent
from medgen.data.slices import ItemCache, SliceSpec, fingerprint, open_or_build_caches
from medgen.data.space import SampleSpace
from medgen.data.volumes import VolumeSpec
from medgen.data.splits import split_patients

log = logging.getLogger("medgen.data")


class ItemDataset(Dataset):
    """2D training items from a :class:`ItemCache`: ``{key: [1, S, S] float32 in [0, 1]}``; with
    ``sizes``, also ``lesion_mm`` (the Feret diameter, mm, of the slice's largest lesion) and
    ``lesion_count`` (its number of lesions), ``[1]`` each."""

    def __init__(self, cache: ItemCache, sizes: bool = False):
        self.cache = cache
        self.measures = (cache.largest_mm, cache.lesion_count) if sizes else None

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        arr = np.asarray(self.cache.data[index], dtype=np.float32)  # [C, S, S]
        item = {k: torch.from_numpy(arr[c : c + 1].copy()) for c, k in enumerate(self.cache.keys)}
        if self.measures is not None:
            item[LESION_MM_KEY] = torch.tensor([self.measures[0][index]], dtype=torch.float32)
            item[LESION_COUNT_KEY] = torch.tensor([self.measures[1][index]], dtype=torch.float32)
        return item


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
    """A loader with a :class:`ResumableSampler` (also for one process); ``batch_size`` is per rank.
    Its (persistent) workers die with this process and are stopped when it exits."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last and world_size > 1)
    return stopping_at_exit(DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_dying_with_parent() if num_workers > 0 else None,
    ))


@dataclass
class DataBundle:
    """The training loader and the caches; validation reads ``val_cache`` directly (each slice
    exactly once, sharded across ranks: :mod:`medgen.diffusion.validation`)."""

    train: DataLoader
    train_cache: ItemCache
    val_cache: ItemCache | None
    fingerprint: str

    @property
    def lesion_sizes(self) -> list[float]:
        """The Feret diameter (mm) of the largest lesion of each training slice with a lesion."""
        return [float(d) for d in self.train_cache.largest_mm if d > 0]

    @property
    def lesion_counts(self) -> list[int]:
        """The lesions of each training slice with a lesion (in the order of :attr:`lesion_sizes`)."""
        return [int(n) for n in self.train_cache.lesion_count if n > 0]


def _selection_rule(spec: SliceSpec) -> str:
    """What a slice needs to be selected, in the words of the config keys that set it."""
    if spec.selection == "lesion":
        return (f"'lesion' selection keeps slices with at least {spec.min_lesion_pixels} mask pixel(s) "
                "(data.min_lesion_pixels; data.seg_positive_only=false keeps every slice)")
    if spec.selection == "brain":
        return (f"'brain' selection keeps slices where at least {spec.min_brain_fraction:.0%} of the pixels of every "
                f"image exceed {spec.brain_intensity} after normalisation to [0, 1] "
                "(data.min_brain_fraction, data.brain_intensity)")
    return "'all' selection, and the volumes have no slices"


def build_data(cfg, rank: int = 0, world_size: int = 1, progress: bool = True,
               barrier=None, *, selection: str, sizes: bool = False) -> DataBundle:
    """Train/val loaders for the configured mode from ``paths.data_dir`` (cache under ``paths.cache_dir``),
    with the slice ``selection`` the mode's class declares (``TrainingMode.slice_selection``); with
    ``sizes``, batches carry each slice's largest lesion diameter (a size-conditioned mask model).

    In a multi-process run, rank 0 builds the caches and the others wait on ``barrier()``.
    """
    from medgen.core.paths import resolve_path
    from medgen.data.nifti_dataset import folder_problem

    root = resolve_path(cfg.paths.data_dir)
    problem = folder_problem(root, "data folder")
    if problem and root.exists():
        raise DataError(f"paths.data_dir {root} {problem}; set paths.data_dir=... (or MEDGEN_DATA_DIR) to the "
                        "dataset root, the folder that holds train/")
    if problem:
        raise DataError(
            f"data folder {root} does not exist. Set paths.data_dir=... or MEDGEN_DATA_DIR, or make a "
            f"phantom dataset: medgen-data phantom --out {root} --subjects 20"
        )
    cache_dir = resolve_path(cfg.paths.cache_dir)
    space = SampleSpace.from_config(cfg)  # volumes: one item per patient, no selection
    spec = space.either(SliceSpec, VolumeSpec).for_mode(cfg.mode, cfg.data, space, selection)
    kind = space.unit
    d = cfg.data
    train_patients = split_patients(root, "train", d.val_fraction)
    val_patients = split_patients(root, "val", d.val_fraction)
    if not train_patients:
        raise DataError(f"{root / 'train'}: no patient folders (expected train/<patient>/{{{','.join(spec.keys)}}}.nii.gz)")

    show = progress and rank == 0
    if barrier is not None and world_size > 1 and rank != 0:
        barrier()
    # every missing cache is built (reading each file once, checked unless data.validate=false) before
    # any is kept: a problem in any file of train or val refuses the run with the full report
    groups = [(train_patients, f"train {kind} cache")] + ([(val_patients, f"val {kind} cache")] if val_patients else [])
    caches = open_or_build_caches(groups, spec, cache_dir, bool(d.validate), show, int(d.num_workers))
    train_cache, val_cache = caches[0], (caches[1] if val_patients else None)
    if barrier is not None and world_size > 1 and rank == 0:
        barrier()
    if len(train_cache) == 0:
        raise DataError(f"no training slices selected from {len(train_patients)} patient(s) of {root / 'train'} "
                        f"for mode {cfg.mode.name!r}: {_selection_rule(spec)}"
                        + ("" if d.validate else
                           f"; data.validate=false, so unreadable or non-finite (NaN) voxels were not reported: "
                           f"medgen-data check {root}"))
    if rank == 0 and (val_cache is None or len(val_cache) == 0):
        source = f"{root / 'val'}" if (root / "val").is_dir() else f"the validation share of {root / 'train'}"
        why = (f"0 selected from {len(val_patients)} patient(s) of {source} for mode {cfg.mode.name!r} "
               f"({spec.selection} selection)" if val_patients else
               f"{source} is empty (train/ holds {len(train_patients)} patient(s))")
        log.warning("no validation slices: %s; the validation loss cannot be computed (it is logged as nan) and "
                    "best.pt is not written; add validation patients whose slices pass the selection", why)

    per_rank = cfg.training.batch_size // world_size
    train_ds = ItemDataset(train_cache, sizes)
    if len(train_ds) < per_rank * world_size:
        raise DataError(
            f"only {len(train_ds)} training slices selected from {root / 'train'}, fewer than one batch "
            f"(training.batch_size={cfg.training.batch_size}); lower training.batch_size or add data")
    train = build_dataloader(train_ds, per_rank, shuffle=True, seed=cfg.seed, rank=rank,
                             world_size=world_size, num_workers=d.num_workers, drop_last=True)
    return DataBundle(train, train_cache, val_cache, fingerprint(train_patients + val_patients, spec))
