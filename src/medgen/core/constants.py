"""Names and numbers shared across medgen: the dataset contract (see docs/architecture.md, Data)."""

from __future__ import annotations

#: every modality a patient folder holds; file name is ``<key>.nii.gz``
IMAGE_MODALITIES: tuple[str, ...] = ("bravo", "t1_pre", "t1_gd", "flair")
MASK_KEY: str = "seg"
#: the brain mask: a channel derived from an image when a slice cache is built (no file;
#: see :mod:`medgen.data.brain`)
BRAIN_KEY: str = "brain"
MODALITIES: tuple[str, ...] = IMAGE_MODALITIES + (MASK_KEY,)
#: every channel a mode may generate or be conditioned on
CHANNEL_KEYS: tuple[str, ...] = MODALITIES + (BRAIN_KEY,)
#: a training batch's entry for the Feret diameter (mm) of each slice's largest lesion (0: none), ``[B, 1]``;
#: present when the mode conditions on lesion sizes or counts
LESION_MM_KEY: str = "lesion_mm"
#: a training batch's entry for the number of lesions of each slice, ``[B, 1]``; present with ``lesion_mm``
LESION_COUNT_KEY: str = "lesion_count"
NIFTI_SUFFIX: str = ".nii.gz"

#: dataset splits, in this order
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: a voxel of ``seg`` is lesion when its value is above this threshold
MASK_THRESHOLD: float = 0.5

#: bump when slice extraction or preprocessing changes: invalidates every slice cache
PREPROCESSING_VERSION: int = 1

#: default (train, val, test) fractions of ``medgen-data phantom`` (see :mod:`medgen.data.splits`)
DEFAULT_SPLIT: tuple[float, float, float] = (0.7, 0.15, 0.15)

#: absolute tolerance (mm) when comparing two affines of one patient's volumes
AFFINE_ATOL: float = 1e-3
