"""Stage 2: the images painted on each mask, written as sample folders.

Sample ``q`` (mask ``q // K``, draw ``q % K`` with ``K = samples_per_mask``) draws its noise from
``sample_seed(seed, q, IMAGE_STREAM)``. A sample's preview is written before its folder, and the
folder is renamed into place only when complete, so a sample folder on disk means a finished
sample; a restarted run paints only the samples without one. Under ``torchrun``/SLURM the samples
are sharded across ranks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from medgen.core.constants import MASK_KEY
from medgen.core.distributed import DistInfo, any_rank
from medgen.core.signals import StopRequest
from medgen.data.nifti_dataset import load_volume, modality_path
from medgen.data.pictures import save_png
from medgen.data.space import SampleSpace
from medgen.data.transforms import to_model_space
from medgen.generation import writer
from medgen.generation.masks import progress_bar, sample_generators
from medgen.generation.models import Stage
from medgen.generation.records import Masks
from medgen.generation.requests import PaintRequest

IMAGE_STREAM = 12

#: a run's samples in sample order ``q = mask * K + draw``: ``(sample id, mask index)``
SampleIds = list[tuple[str, int]]


def sample_ids(masks: Masks, samples_per_mask: int) -> SampleIds:
    """``(sample id, mask index)`` for every sample, in sample order."""
    out = []
    for i, record in enumerate(masks.records):
        base = record.sample_name(i)
        out.extend((base if samples_per_mask == 1 else f"{base}_s{d}", i) for d in range(samples_per_mask))
    return out


def paint(image: Stage, masks: Masks, ids: SampleIds, request: PaintRequest, sampler: str, out: Path,
          dist: DistInfo, stop: StopRequest, progress: bool) -> bool:
    """Paint every sample whose folder is not complete yet; False if stopped by a signal."""
    split_dir = out / request.split
    split_dir.mkdir(parents=True, exist_ok=True)
    keys = (*image.mode.image_keys, MASK_KEY)
    pending = [q for q, (sid, _) in enumerate(ids) if not writer.is_complete(split_dir / sid, keys)]
    mine = pending[dist.rank::dist.world_size]
    size = request.sampling.batch_size
    batches = [mine[i:i + size] for i in range(0, len(mine), size)]
    n_rounds = math.ceil(len(pending) / (size * dist.world_size))
    with progress_bar(len(ids), len(ids) - len(pending), "images", dist, progress) as bar, \
            writer.BackgroundWrites(workers=min(4, os.cpu_count() or 1)) as writes:
        for r in range(n_rounds):
            if any_rank(stop.requested, dist):
                return False
            batch = batches[r] if r < len(batches) else []
            if batch:
                _paint_batch(image, masks, ids, batch, request, sampler, out, writes)
            bar.update(min(len(pending) - r * size * dist.world_size, size * dist.world_size))
    return True


def _paint_batch(image: Stage, masks: Masks, ids: SampleIds, batch: list[int], request: PaintRequest, sampler: str,
                 out: Path, writes: writer.BackgroundWrites) -> None:
    """Sample the images of the samples ``batch`` and hand their writes to ``writes``."""
    index = [ids[q][1] for q in batch]
    mask = torch.from_numpy(masks.masks[index]).float()[:, None]
    cond = torch.from_numpy(masks.conditions(image.mode.cond_keys, index))
    sampling = request.sampling
    x0 = image.sample(to_model_space(cond).to(image.device),
                      sample_generators(sampling.seed, batch, IMAGE_STREAM, image.device), steps=sampling.steps,
                      sampler=sampler, guidance_scale=request.guidance_scale, batch_size=sampling.batch_size)
    outputs = {k: v[:, 0].cpu().numpy() for k, v in image.mode.to_outputs(x0).items()}
    for b, q in enumerate(batch):
        arrays = {k: outputs[k][b] for k in image.mode.image_keys}
        arrays[MASK_KEY] = mask[b, 0].numpy()
        writes.submit(_write, out / request.split / ids[q][0], arrays, image.space, image.mode.image_keys,
                      out / "previews" / f"{ids[q][0]}.png" if request.previews else None)


def _write(folder: Path, arrays: dict[str, np.ndarray], space: SampleSpace, image_keys: Sequence[str],
           preview: Path | None) -> None:
    """One sample's preview, then its folder (a folder on disk is a finished sample, preview
    included), with the voxel size of ``space``: runs in a writer thread."""
    if preview is not None:
        save_png(writer.render_sample(arrays, image_keys, space), preview)
    writer.write_sample(folder, arrays, space.spacing)


def read_sample(folder: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """A written sample's arrays, image keys and the mask: ``{key: [S, S]}`` (a slice, written
    ``[S, S, 1]``) or ``{key: [X, Y, Z]}`` (a volume), as the file's sample space holds them."""
    out = {}
    for k in (*keys, MASK_KEY):
        volume = load_volume(modality_path(folder, k))[0]
        out[k] = volume.reshape(SampleSpace.of_file(volume.shape).shape)
    return out

