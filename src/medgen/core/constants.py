"""Names and numbers shared across medgen (the data contract of DESIGN.md section 2)."""

from __future__ import annotations

#: every modality a patient folder holds; file name is ``<key>.nii.gz``
IMAGE_MODALITIES: tuple[str, ...] = ("bravo", "t1_pre", "t1_gd", "flair")
MASK_KEY: str = "seg"
MODALITIES: tuple[str, ...] = IMAGE_MODALITIES + (MASK_KEY,)
NIFTI_SUFFIX: str = ".nii.gz"

#: dataset splits, in this order
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: a voxel of ``seg`` is lesion when its value is above this threshold
MASK_THRESHOLD: float = 0.5

#: bump when slice extraction or preprocessing changes: invalidates every slice cache
PREPROCESSING_VERSION: int = 1

#: default split fractions for generated / imported datasets
DEFAULT_SPLIT: tuple[float, float, float] = (0.7, 0.15, 0.15)

#: environment variables that override the configured paths
ENV_DATA_DIR = "MEDGEN_DATA_DIR"
ENV_RUNS_DIR = "MEDGEN_RUNS_DIR"
ENV_CACHE_DIR = "MEDGEN_CACHE_DIR"
