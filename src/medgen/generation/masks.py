"""Stage 1: the masks a run paints, sampled through the quality gate, or real ones (``masks_from``).

Candidate ``j`` draws its noise from ``sample_seed(seed, j, MASK_STREAM)``; the accepted masks
are the first ``num_images`` candidates, in candidate order, that pass the gate, whatever the
batch size or the number of processes. Each evaluated batch is kept as one block file in
``<out_dir>/.medgen/masks/`` (``block_<first>_<count>_r<rank>.npz``), so a restarted run
evaluates only the candidates no earlier run did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.core.distributed import DistInfo, any_rank
from medgen.core.fs import atomic_write
from medgen.core.paths import resolve_path
from medgen.core.signals import StopRequest
from medgen.data.masks import is_lesion
from medgen.data.nifti_dataset import DataError
from medgen.diffusion.utils import sample_seed
from medgen.generation import gate as quality_gate
from medgen.generation.models import GenerationError, Stage
from medgen.generation.records import Candidate, CandidateSource, MaskRecord, Masks, SliceSource

log = logging.getLogger("medgen.generate")

MASK_STREAM = 11


def sample_generators(seed: int, indices: Sequence[int], stream: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, on the sampling device (drawing on the CPU and copying would
    cost ~10% of a GPU step for the ancestral samplers). PyTorch's CPU and CUDA generators differ,
    so the same seed gives other noise on a GPU than on the CPU."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i), stream)) for i in indices]


def progress_bar(total: int, initial: int, desc: str, dist: DistInfo, progress: bool):
    """A progress bar of samples, shown on the main rank only."""
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True,
                disable=not (progress and dist.is_main))


# ============================================================================ sampled masks
def sample_masks(seg: Stage, cfg: DictConfig, sampler: str, folder: Path, dist: DistInfo, stop: StopRequest,
                 progress: bool) -> Masks | None:
    """Masks until ``num_images`` pass the gate (None if stopped by a signal); the evaluated
    candidates are kept in ``folder``."""
    n_wanted = int(cfg.num_images)
    max_attempts = cfg.gate.max_attempts or 20 * n_wanted
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.gate.enabled and cfg.gate.inside_brain and BRAIN_KEY not in seg.mode.image_keys and dist.is_main:
        log.warning("%s does not draw the brain with the lesions (mode.image_keys=%s): the gate cannot check "
                    "that they lie inside it; train the seg model with mode.image_keys=[seg,brain]", seg.path,
                    list(seg.mode.image_keys))
    evaluated = read_blocks(folder)
    with progress_bar(n_wanted, min(n_wanted, _accepted_prefix(evaluated)[1]), "masks", dist, progress) as bar:
        while True:
            prefix, accepted = _accepted_prefix(evaluated)
            bar.n = min(accepted, n_wanted)
            bar.set_postfix(accepted=f"{accepted}/{prefix}")
            bar.refresh()
            if accepted >= n_wanted:
                break
            if prefix >= max_attempts:
                raise _gate_failure(cfg, accepted, prefix, max_attempts)
            if any_rank(stop.requested, dist):
                return None
            queue = _next_candidates(evaluated, dist.world_size * cfg.batch_size)
            mine = queue[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size]
            results = _evaluate(seg, mine, cfg, sampler, folder, dist) if mine else {}
            for part in _gather(results, dist):
                evaluated.update(part)
    return _chosen(evaluated, n_wanted, cfg.seed, folder, dist)


def _gate_failure(cfg: DictConfig, accepted: int, tried: int, max_attempts: int) -> GenerationError:
    return GenerationError(
        f"the quality gate accepted {accepted} of {tried} generated masks ({100 * accepted / tried:.1f}%), "
        f"short of num_images={cfg.num_images} within gate.max_attempts={max_attempts}; loosen gate.* "
        f"(min_area={cfg.gate.min_area}, max_area={cfg.gate.max_area}, max_components={cfg.gate.max_components}, "
        f"min_component_pixels={cfg.gate.min_component_pixels}, inside_brain={cfg.gate.inside_brain}), raise "
        "gate.max_attempts, or train the seg model longer")


def _chosen(evaluated: dict[int, Candidate], n_wanted: int, seed: int, folder: Path, dist: DistInfo) -> Masks:
    """The first ``n_wanted`` accepted candidates, and the rejected ones before the last of them."""
    order = sorted(evaluated)
    chosen = [j for j in order if evaluated[j].accepted][:n_wanted]
    last = chosen[-1]
    with_masks = read_blocks(folder, with_masks=set(chosen))
    records, rejected = [], []
    for j in order:
        if j > last:
            break
        c = evaluated[j]
        record = MaskRecord(CandidateSource(j), c.stats.area, c.stats.components, c.accepted,
                            seed=sample_seed(seed, j, MASK_STREAM))
        (records if c.accepted else rejected).append(record)
    rate = len(chosen) / (last + 1)
    if dist.is_main:
        log.info("quality gate: %d of %d masks accepted (%.1f%%)", len(chosen), last + 1, 100 * rate)
    masks = np.stack([with_masks[j].mask for j in chosen])
    brains = [with_masks[j].brain for j in chosen]
    return Masks(masks, records, rejected, rate, None if any(b is None for b in brains) else np.stack(brains))


def _evaluate(seg: Stage, candidates: list[int], cfg: DictConfig, sampler: str, folder: Path,
              dist: DistInfo) -> dict[int, Candidate]:
    """Generate and gate ``candidates``; save them as one block file; return their verdicts."""
    x0 = seg.sample(None, sample_generators(cfg.seed, candidates, MASK_STREAM, seg.device), steps=cfg.steps,
                    sampler=sampler, batch_size=cfg.batch_size)
    outputs = {k: v[:, 0].cpu().numpy().astype(np.uint8) for k, v in seg.mode.to_outputs(x0).items()}
    masks, brains = outputs[MASK_KEY], outputs.get(BRAIN_KEY)
    stats = quality_gate.measure(masks, brains)
    ok = quality_gate.passes(stats, cfg.gate)
    path = folder / f"block_{candidates[0]:09d}_{len(candidates):05d}_r{dist.rank}.npz"
    extra = {} if brains is None else {"brains": brains}
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, candidates=np.asarray(candidates, dtype=np.int64), masks=masks, area=stats.area,
                            components=stats.components, smallest=stats.smallest, outside=stats.outside,
                            accepted=ok, **extra)
    return {j: Candidate(j, stats[i], bool(ok[i])) for i, j in enumerate(candidates)}


def read_blocks(folder: Path, with_masks: set[int] | None = None) -> dict[int, Candidate]:
    """The stage-1 candidates on disk by index: every one without its mask or, with
    ``with_masks``, those candidates with their masks (and brains, where the mask model drew them;
    blocks of a medgen before 0.2 hold no brain)."""
    out: dict[int, Candidate] = {}
    for path in sorted(folder.glob("block_*.npz")):
        with np.load(path) as block:
            n = block["candidates"].size
            outside = block["outside"] if "outside" in block.files else np.zeros(n, dtype=np.int64)
            stats = quality_gate.MaskStats(block["area"], block["components"], block["smallest"], outside)
            masks = block["masks"] if with_masks is not None else None
            brains = block["brains"] if with_masks is not None and "brains" in block.files else None
            for i, j in enumerate(block["candidates"].tolist()):
                if with_masks is None:
                    out[j] = Candidate(j, stats[i], bool(block["accepted"][i]))
                elif j in with_masks:
                    out[j] = Candidate(j, stats[i], bool(block["accepted"][i]), masks[i],
                                       None if brains is None else brains[i])
    return out


def _accepted_prefix(evaluated: dict[int, Candidate]) -> tuple[int, int]:
    """(length of the run of evaluated candidates 0, 1, 2, ..., accepted masks within it)."""
    n = accepted = 0
    while n in evaluated:
        accepted += evaluated[n].accepted
        n += 1
    return n, accepted


def _next_candidates(evaluated: dict[int, Candidate], count: int) -> list[int]:
    out, j = [], 0
    while len(out) < count:
        if j not in evaluated:
            out.append(j)
        j += 1
    return out


def _gather(results: dict[int, Candidate], dist: DistInfo) -> list[dict[int, Candidate]]:
    if not dist.distributed:
        return [results]
    parts: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(parts, results)
    return parts


# ============================================================================ masks_from
def real_masks(cfg: DictConfig, image_size: int, brain_from: str | None = None) -> Masks:
    """The lesion slices of ``masks_split`` of a medgen dataset, at the image model's size, with
    their brains derived from the image ``brain_from`` (None: no brain)."""
    from medgen.data.slices import SliceSpec, open_or_build_cache
    from medgen.data.splits import split_patients

    root = resolve_path(cfg.masks_from)
    if not root.is_dir():
        raise DataError(f"masks_from={cfg.masks_from}: {root} is not a folder")
    patients = split_patients(root, cfg.masks_split)
    if not patients:
        raise DataError(f"masks_from={cfg.masks_from}: no patients in {root / cfg.masks_split} "
                        f"(choose another masks_split)")
    keys = (MASK_KEY,) if brain_from is None else (MASK_KEY, BRAIN_KEY)
    spec = SliceSpec(keys=keys, image_size=image_size, selection="lesion", brain_from=brain_from or "bravo")
    cache = open_or_build_cache(patients, spec, resolve_path(cfg.cache_dir), desc=f"{cfg.masks_split} masks")
    n = len(cache) if cfg.num_images is None else min(int(cfg.num_images), len(cache))
    if n == 0:
        raise DataError(f"masks_from={cfg.masks_from}: no slice with a lesion in {root / cfg.masks_split}")
    if cfg.num_images is not None and n < cfg.num_images:
        log.warning("masks_from has %d lesion slices in %s/; generating for all of them (num_images=%d)", n,
                    cfg.masks_split, cfg.num_images)
    masks = is_lesion(cache.data[:n, 0]).astype(np.uint8)
    stats = quality_gate.measure(masks)
    records = [MaskRecord(SliceSource(cfg.masks_split, cache.patient_ids[cache.patient_index[i]],
                                      int(cache.slice_index[i])),
                          float(stats.area[i]), int(stats.components[i]), True)
               for i in range(n)]
    brains = None if brain_from is None else is_lesion(cache.data[:n, 1]).astype(np.uint8)
    return Masks(masks, records, [], None, brains)
