"""Where insertion's scans and lesion shapes come from.

:class:`Scans`: the scans of ``insert.split`` of the dataset ``insert.into``, read into a cache as for
training (per-volume intensity scaling to [0, 1], resized to the scans' size, the brain derived as
for the painter's training data): the brain slices of each patient (a slice painter), or each
patient's whole volume (a volume painter). :func:`seg_shapes`: lesion shapes a seg model draws.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.core.paths import resolve_path
from medgen.data.masks import is_lesion, lesion_labels
from medgen.data.nifti_dataset import DataError, present_modalities
from medgen.data.space import SampleSpace
from medgen.generation.insert_place import ShapeBank, bank_from_masks
from medgen.generation.masks import MASK_STREAM, item_spec, sample_generators, split_of
from medgen.generation.models import GenerationError, Stage
from medgen.generation.requests import InsertRequest

log = logging.getLogger("medgen.generate")

#: masks a seg model draws for insert.shapes=seg, at most (in batches), until it has this many shapes
SEG_SHAPES = 32
SEG_MASKS = 256


@dataclass
class Scans:
    """The source scans: an item cache (channels: ``keys``, ``seg``, ``brain``), the items lesions
    may go into, and the sample space they are read at."""

    cache: Any
    keys: tuple[str, ...]
    space: SampleSpace
    split: str
    root: str
    items: np.ndarray

    def __post_init__(self) -> None:
        brain = len(self.keys) + 1
        #: each item's brain voxels over the split's: drawing a scan by them, then a place uniformly in
        #: its brain, makes every brain voxel of the split equally likely (small brains are not favoured)
        voxels = np.asarray([np.count_nonzero(is_lesion(self.cache.data[int(i), brain])) for i in self.items], float)
        self.weights = voxels / voxels.sum() if voxels.sum() else np.full(len(self.items), 1 / len(self.items))

    def describe(self) -> str:
        return f"{self.split}/ of {self.root} ({len(self.items)} {self.space.unit}s of {self.space.describe()})"

    def source(self, i: int) -> str:
        """The manifest's ``source``: ``<split>/<patient>`` and, for a slice, ``/z<index>``."""
        patient = self.cache.patient_ids[self.cache.patient_index[i]]
        return f"{self.split}/{patient}" + self.space.either(f"/z{int(self.cache.slice_index[i])}", "")

    def images(self, i: int) -> np.ndarray:
        """``[C, *shape]`` float64 in [0, 1]: item ``i``'s images."""
        return np.asarray(self.cache.data[i, :len(self.keys)], dtype=np.float64)

    def masks(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i``'s lesion mask and brain (bool ``[*shape]``)."""
        data = self.cache.data[i]
        return is_lesion(data[len(self.keys)]), is_lesion(data[len(self.keys) + 1])

    def lesion_counts(self) -> tuple[int, ...]:
        """The lesions of each item with one (``lesion_counts.target=real``)."""
        with_lesion = np.flatnonzero(self.cache.lesion_pixels > 0)
        return tuple(lesion_labels(self.masks(int(i))[0])[1] for i in with_lesion)

    def lesion_bank(self, pad: int) -> ShapeBank:
        """Every lesion of the items as a shape (``pad`` > 0: with the images around it, for copying)."""
        with_lesion = np.flatnonzero(self.cache.lesion_pixels > 0)
        masks = np.stack([self.masks(int(i))[0] for i in with_lesion]) if len(with_lesion) else np.zeros((0,))
        images = np.stack([self.images(int(i)) for i in with_lesion]) if pad and len(with_lesion) else None
        return bank_from_masks(masks, [f"real {self.source(int(i))}" for i in with_lesion], self.space.mm, images, pad,
                               [self.patient(int(i)) for i in with_lesion])

    def patient(self, i: int) -> str:
        """The patient of item ``i``."""
        return self.cache.patient_ids[self.cache.patient_index[i]]


def open_scans(request: InsertRequest, stage: Stage | None, space: SampleSpace | None = None,
               key: str = "insert.into") -> Scans:
    """The scans of ``request.split`` at the painter's sample space (or ``insert.image_size``; or
    ``space``: another set's scans read as these), with its modalities (``insert.modalities`` for a
    copy painter without checkpoint); refusals name the key."""
    from medgen.data.slices import open_or_build_cache

    patients = split_of(request.into, request.split, key, "insert.split")
    root = resolve_path(request.into)
    keys = tuple(stage.mode.image_keys) if stage is not None else tuple(request.modalities)
    brain_from = stage.brain_from if stage is not None else keys[0]
    missing = [k for k in dict.fromkeys((*keys, brain_from, MASK_KEY)) if k not in present_modalities(patients, (k,))]
    if missing:
        raise DataError(f"{key}={request.into}: the scans of {request.split}/ have no {missing} "
                        f"({'the painter paints ' + str(list(keys)) if stage is not None else 'insert.modalities'}); "
                        "paint into a dataset with those files")
    space = _scan_space(request, stage) if space is None else SampleSpace(space.shape, None)
    method = request.brain_method or (stage.brain_method if stage is not None else "heuristic")
    spec = item_spec(space, (*keys, MASK_KEY, BRAIN_KEY), "brain", brain_from, method)
    cache = open_or_build_cache(patients, spec, resolve_path(request.cache_dir), desc=f"{request.split} scans")
    if cache.spacing is not None:
        space = space.with_spacing(cache.spacing)
    items = np.arange(len(cache))
    if len(items):
        items = items[[bool(is_lesion(cache.data[int(i), len(keys) + 1]).any()) for i in items]]
    if not len(items):
        raise DataError(f"{key}={request.into}: no brain {space.unit} in {root / request.split}")
    return Scans(cache, keys, space, request.split, str(request.into), items)


def _scan_space(request: InsertRequest, stage: Stage | None) -> SampleSpace:
    """The space scans are read at: ``insert.image_size``, else the painter's; a 2D painter and 3D
    scans (or the reverse) refused."""
    size = request.image_size
    if size is None:
        return stage.space
    shape = (int(size),) * 2 if isinstance(size, int) else tuple(int(n) for n in size)
    space = SampleSpace(shape, None)
    if stage is not None and space.dims != stage.space.dims:
        raise GenerationError(f"insert.image_size={size}: {space.describe()}, but image_checkpoint={stage.path} "
                              f"paints {stage.space.describe()}; give {stage.space.dims} size(s)")
    if stage is not None and space.shape != stage.space.shape:
        log.warning("insert.image_size=%s: the scans are read at another size than %s was trained at (%s), so its "
                    "pixels are another size than in training", size, stage.path, stage.space.describe())
    return space


def seg_shapes(seg: Stage, space: SampleSpace, seed: int, steps: int) -> ShapeBank:
    """Lesion shapes drawn by the seg model (``insert.shapes=seg``, ``steps`` sampler steps): masks in
    batches until :data:`SEG_SHAPES` lesions or :data:`SEG_MASKS` masks, each lesion named
    ``seg candidate <i>#<k>`` (every shape is resized into the class asked, so a few dozen do)."""
    if seg.space.dims != space.dims:
        raise GenerationError(f"seg_checkpoint={seg.path} draws {seg.space.describe()}; the scans are {space.describe()}")
    shapes, drawn, batch = [], 0, 16
    while len(shapes) < SEG_SHAPES and drawn < SEG_MASKS:
        index = list(range(drawn, drawn + batch))
        cond = None
        if seg.mode.lesion_conditioned:  # no class asked: every plane of each group -1
            none = torch.full((batch,), -1, dtype=torch.long)
            cond = seg.mode.lesion_condition(tuple(seg.space.shape), none, none).to(seg.device)
        x0 = seg.sample(cond, sample_generators(seed, index, MASK_STREAM, seg.device), steps=steps,
                        sampler=seg.strategy.samplers[0])
        masks = seg.mode.to_outputs(x0)[MASK_KEY][:, 0].cpu().numpy()
        shapes += bank_from_masks(masks, [f"seg candidate {i}" for i in index], seg.space.mm).shapes
        drawn += batch
    return ShapeBank(shapes)
