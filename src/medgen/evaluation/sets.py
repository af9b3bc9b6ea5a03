"""The two sets ``medgen-evaluate`` compares, as caches at one size and with one set of modalities.

Sets. The synthetic set is every slice of ``synthetic_dir`` (all splits). The real reference is
the lesion slices of ``real_dir``'s test split (its val split when test is empty), at the
synthetic set's image size and modalities; downstream models train on the lesion slices of its
train split. Lesion-wise figures use the whole reference split: its lesion slices and its
lesion-free slices that show brain. A 3D synthetic set is compared as volumes with the same rules
(:mod:`medgen.evaluation.volumetric`).

Refused before any work: a synthetic set whose ``medgen-generate`` run is unfinished (unless
``allow_partial``), a ``seg_net_checkpoint`` trained on other modalities or another size, and a
3D set of a shape the downstream network cannot take.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medgen.core.constants import MASK_KEY, SPLITS
from medgen.data.masks import is_lesion
from medgen.data.nifti_dataset import list_patients, present_modalities
from medgen.data.slices import ItemCache, SliceSpec, open_or_build_cache
from medgen.data.space import SampleSpace
from medgen.data.splits import split_patients
from medgen.evaluation import EvaluationError, downstream, volumetric
from medgen.evaluation.downstream import ItemSet
from medgen.evaluation.requests import SetsRequest
from medgen.generation.status import incomplete_message, read_status

log = logging.getLogger("medgen.evaluate")


def as_slice_set(cache: ItemCache | volumetric.CacheSubset, indices: np.ndarray | None = None) -> ItemSet:
    """Items of a cache (all, or ``indices``) as float32 images and binary masks: slices, or volumes
    from a volume cache."""
    data = np.asarray(cache.data if indices is None else cache.data[np.sort(indices)], dtype=np.float32)
    seg = cache.keys.index(MASK_KEY)
    images = data[:, [i for i, k in enumerate(cache.keys) if k != MASK_KEY]]
    return ItemSet(np.ascontiguousarray(images), is_lesion(data[:, seg]).astype(np.uint8))


def _subset(n: int, cap: int, seed: int) -> np.ndarray:
    idx = np.arange(n)
    return idx if n <= cap else np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


class Sets:
    """Both datasets as caches at one size and with one set of modalities: slice caches for a 2D
    synthetic set, volume caches for a 3D one (:mod:`medgen.evaluation.volumetric`)."""

    def __init__(self, request: SetsRequest, progress: bool = True):
        self.real_root, self.synthetic_root = request.real_dir, request.synthetic_dir
        for key, root in (("real_dir", self.real_root), ("synthetic_dir", self.synthetic_root)):
            if not root.is_dir():
                raise EvaluationError(f"{key}={root}: no such folder")
        #: what the report should say before any number (an unfinished set, a set without lesions)
        self.warnings: list[str] = []
        syn_patients = self._synthetic_samples(request)
        keys = present_modalities(syn_patients)
        if MASK_KEY not in keys or len(keys) < 2:
            raise EvaluationError(f"synthetic_dir={self.synthetic_root}: its samples hold {keys}; a paired set needs "
                                  f"seg and at least one image modality")
        self.image_keys = [k for k in keys if k != MASK_KEY]
        #: the one sample space of the evaluation (the real reference's spacing once its cache is read)
        self.space = self._make_space(request, volumetric.sample_shape(syn_patients[0]))
        test_split = "test" if split_patients(self.real_root, "test") else "val"
        self.reference_split = test_split
        real = {s: split_patients(self.real_root, s, request.val_fraction) for s in ("train", "val", "test")}
        if not real[test_split]:
            raise EvaluationError(f"real_dir={self.real_root}: empty set (no patients in test/ or val/)")
        missing = [k for k in keys if k not in present_modalities(real[test_split])]
        if missing:
            raise EvaluationError(f"the synthetic set has {keys} but the real set ({self.real_root}) lacks {missing}")
        #: the real-trained segmenter of ``seg_net_checkpoint`` (on the CPU), checked before any work
        self.segmenter = downstream.load_segmenter(request.seg_net_checkpoint, self.image_keys, self.space,
                                                   torch.device("cpu")) if request.seg_net_checkpoint else None
        caches = self.space.either(self._slice_caches, self._volume_caches)(request, real, syn_patients, test_split,
                                                                             progress)
        self.synthetic, self.test, self.train, self.val = (caches[k] for k in ("synthetic", "test", "train", "val"))
        #: the reference split's brain slices (volumes), of which the lesion-free ones join the lesion-wise test
        self.test_brain = caches["test_brain"]
        self.synthetic_ids = [self.synthetic.patient_ids[i] for i in self.synthetic.patient_index]
        for name, c in (("synthetic", self.synthetic), (f"real {test_split}", self.test)):
            if c is None or len(c) == 0:
                raise EvaluationError(f"the {name} set has no {self.space.unit}s with a lesion to compare")
        self.space = self.space.with_spacing(self.test.spacing or None)
        self._cap, self._seed = request.max_images, request.seed
        self._samples: dict[str, ItemSet | None] = {}

    def _synthetic_samples(self, request: SetsRequest) -> list[Path]:
        """The sample folders of the synthetic set (all splits), checked: finished (or
        ``allow_partial``, with a warning) and not empty."""
        syn_patients = [p for s in SPLITS for p in list_patients(self.synthetic_root / s)]
        status = read_status(self.synthetic_root)
        if status is not None and not status.complete:
            if not request.allow_partial:
                raise EvaluationError(f"synthetic_dir: {incomplete_message(self.synthetic_root, status, len(syn_patients))}")
            self.warnings.append(f"the synthetic set is an unfinished generation ({len(syn_patients)} samples done"
                                 + (f" of {status.expected}" if status.expected is not None else "")
                                 + "), evaluated as it is (allow_partial=true)")
        if not syn_patients:
            raise EvaluationError(f"synthetic_dir={self.synthetic_root}: empty set (no sample folders in "
                                  f"{', '.join(s + '/' for s in SPLITS)})")
        return syn_patients

    def _make_space(self, request: SetsRequest, shape: tuple[int, ...]) -> SampleSpace:
        """The evaluation's space from the first sample's ``shape`` (:func:`volumetric.space_of`),
        checked against ``image_size`` and the downstream network."""
        space = volumetric.space_of(request.spatial_dims, shape, self.synthetic_root)
        size = int(max(space.shape[:2]))
        if request.image_size is not None and request.image_size != size:
            shown = space.either(f"{size} px", f"{space.tag} voxels")
            raise EvaluationError(f"image_size={request.image_size} but the synthetic {space.unit}s in "
                                  f"{self.synthetic_root} are {shown}; the sets are compared at the synthetic set's size")
        if space.volumetric:
            volumetric.check_volume_shape(space, self.synthetic_root)
        return space.either(SampleSpace((size, size)), space)  # slices are read square, at the larger side

    def spacing(self, name: str) -> tuple[float, ...]:
        """The voxel size (mm, x y z) of the set ``synthetic``, ``real`` or ``val``, as its cache
        records it (1 mm when it records none)."""
        cache = {"synthetic": self.synthetic, "real": self.test, "val": self.val}[name]
        return tuple(float(v) for v in cache.spacing) if cache is not None and cache.spacing else (1.0, 1.0, 1.0)

    def _slice_caches(self, request: SetsRequest, real: dict[str, list[Path]], syn_patients: list[Path],
                      test_split: str, progress: bool) -> dict[str, ItemCache | None]:
        """The slice caches of a 2D evaluation (the module docstring)."""
        size = self.space.size
        spec = SliceSpec(keys=tuple(self.image_keys) + (MASK_KEY,), image_size=size, selection="lesion")
        all_spec = SliceSpec(keys=spec.keys, image_size=size, selection="all")
        brain_spec = SliceSpec(keys=spec.keys, image_size=size, selection="brain",
                               brain_intensity=request.brain_intensity)

        def cache(patients, selection_spec, desc):
            return open_or_build_cache(patients, selection_spec, request.cache_dir, progress=progress, desc=desc,
                                       workers=request.num_workers) if patients else None

        return {"synthetic": cache(syn_patients, all_spec, "synthetic slices"),
                "test": cache(real[test_split], spec, f"real {test_split} lesion slices"),
                "train": cache(real["train"], spec, "real train lesion slices"),
                "val": cache(real["val"], spec, "real val lesion slices") if test_split == "test" else None,
                "test_brain": cache(real[test_split], brain_spec, f"real {test_split} brain slices")
                if request.downstream else None}

    def _volume_caches(self, request: SetsRequest, real: dict[str, list[Path]], syn_patients: list[Path],
                       test_split: str, progress: bool) -> dict:
        """The volume caches of a 3D evaluation (:func:`volumetric.volume_caches`)."""
        return volumetric.volume_caches({**real, "synthetic": syn_patients}, (*self.image_keys, MASK_KEY), self.space,
                                        request, test_split, progress)

    def warn(self, text: str) -> None:
        """A warning for the report, logged now."""
        log.warning("%s", text)
        self.warnings.append(text)

    def sample(self, name: str) -> ItemSet | None:
        """At most ``max_images`` slices (volumes) of ``synthetic``, ``real`` (the reference split) or ``val``
        (None without a val reference): a seeded random subset, read once for every metric."""
        if name not in self._samples:
            cache, offset = {"synthetic": (self.synthetic, 0), "real": (self.test, 1), "val": (self.val, 2)}[name]
            self._samples[name] = None if cache is None else \
                as_slice_set(cache, _subset(len(cache), self._cap, self._seed + offset))
        return self._samples[name]
