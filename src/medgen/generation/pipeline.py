"""``medgen-generate``'s work: masks (stage 1, with the quality gate) -> images (stage 2) -> a dataset.

Determinism. Stage-1 candidate ``j`` draws its noise from ``sample_seed(seed, j, MASK_STREAM)``;
the accepted masks are the first ``num_images`` candidates, in candidate order, that pass the
gate. Sample ``q`` (mask ``q // K``, draw ``q % K`` with ``K = samples_per_mask``) draws from
``sample_seed(seed, q, IMAGE_STREAM)``. So the output depends on neither the batch size, nor the
number of processes, nor interruptions (up to bf16 rounding where batches change).

Resumability. Stage-1 results are kept in ``<out_dir>/.medgen/masks/*.npz`` (one file per
evaluated batch); a sample's preview is written before its folder, and the folder is renamed into
place only when complete, so a sample folder on disk means a finished sample. A restarted run reads
what exists, does the rest and writes any preview an older run left missing.
``<out_dir>/.medgen/settings.json`` records what determines the samples; a restart with other
settings is refused, naming them. ``<out_dir>/.medgen/status.json`` says whether the folder is
complete (:mod:`medgen.generation.status`); a run that stops early (a signal, an error) leaves it
and ``manifest.csv`` listing the samples done so far.

Distributed. Under ``torchrun``/SLURM, stage-1 candidates are evaluated in rounds of one batch per
rank (acceptance shared with one all-gather per round), stage-2 samples are sharded across ranks,
and rank 0 writes the manifest, pictures and exports at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medgen.core.constants import MASK_KEY
from medgen.core.distributed import DistInfo, any_rank, barrier
from medgen.core.paths import resolve_path
from medgen.core.precision import configure_backends
from medgen.core.fs import FolderLock, atomic_write
from medgen.core.signals import StopRequest, stop_signals
from medgen.data.nifti_dataset import DataError, load_volume, modality_path
from medgen.data.transforms import to_model_space
from medgen.diffusion.utils import sample_seed
from medgen.generation import gate as quality_gate
from medgen.generation import writer
from medgen.generation.models import GenerationError, Stage, check_pair, load_stage
from medgen.generation.status import GenerationStatus, write_status

log = logging.getLogger("medgen.generate")

MASK_STREAM = 11
IMAGE_STREAM = 12
#: settings that change the samples: a restart in the same out_dir must keep them
_DETERMINING = ("seg_sha256", "image_sha256", "masks_from", "masks_split", "samples_per_mask", "split", "seed",
                "seg_sampler", "image_sampler", "steps", "guidance_scale", "use_ema", "precision", "gate")
CONTACT_SHEET_SAMPLES = 64


@dataclass
class GenerationResult:
    """What a run produced (``status``: ``"done"`` or ``"stopped"`` by a signal)."""

    out_dir: Path
    status: str
    sample_ids: list[str]
    acceptance_rate: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.out_dir / "manifest.csv"

    @property
    def contact_sheet(self) -> Path:
        return self.out_dir / "contact_sheet.png"


@dataclass
class _Masks:
    """The masks stage 2 paints: ``[N, S, S]`` uint8, and per mask its manifest fields."""

    masks: np.ndarray
    rows: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    acceptance_rate: float | None


# ============================================================================ entry point
def run_generation(cfg: DictConfig, dist: DistInfo | None = None, progress: bool = True,
                   command: str | None = None) -> GenerationResult:
    """Generate (or continue generating) the dataset ``cfg`` describes (a validated generate config).
    ``command``: the command line that runs it, recorded for whoever finds the folder unfinished."""
    configure_backends()
    dist = dist or DistInfo(device=torch.device(cfg.device) if cfg.device else DistInfo().device)
    t_start = time.perf_counter()
    out = resolve_path(cfg.out_dir)
    state = out / ".medgen"
    image = load_stage(cfg.image_checkpoint, "image", "image_checkpoint", device=dist.device, use_ema=cfg.use_ema,
                       precision=cfg.precision, compile=cfg.compile, compile_mode=cfg.compile_mode)
    seg = None
    if cfg.seg_checkpoint is not None:
        seg = load_stage(cfg.seg_checkpoint, "seg", "seg_checkpoint", device=dist.device, use_ema=cfg.use_ema,
                         precision=cfg.precision, compile=cfg.compile, compile_mode=cfg.compile_mode)
    check_pair(seg, image, cfg.guidance_scale)
    samplers = {"seg": _sampler(cfg, "seg_sampler", seg), "image": _sampler(cfg, "image_sampler", image)}
    settings = _settings(cfg, seg, image, samplers)
    with _exclusive(state, dist):
        if dist.is_main:
            _claim(state, settings)
            _remove_partial_writes(out)
            keys = (*image.mode.image_keys, MASK_KEY)
            write_status(out, GenerationStatus(complete=False, done=_count_complete(out / cfg.split, keys),
                                               command=command))
        barrier(dist)
        return _run_stages(cfg, seg, image, samplers, settings, out, state, dist, progress, t_start, command)


def _run_stages(cfg: DictConfig, seg: Stage | None, image: Stage, samplers: dict[str, str | None],
                settings: dict[str, Any], out: Path, state: Path, dist: DistInfo, progress: bool,
                t_start: float, command: str | None) -> GenerationResult:
    seconds: dict[str, float] = {}
    status, masks, ids = "stopped", None, []
    try:
        with stop_signals(ctrl_c=True) as stop:
            t0 = time.perf_counter()
            if seg is not None:
                masks = _stage1(seg, cfg, samplers["seg"], state / "masks", dist, stop, progress)
            else:
                masks = _real_masks(cfg, image.image_size)
            seconds["masks"] = time.perf_counter() - t0
            if masks is not None:
                t0 = time.perf_counter()
                ids = _sample_ids(masks, cfg)
                done = _stage2(image, masks, ids, cfg, samplers["image"], out, dist, stop, progress)
                seconds["images"] = time.perf_counter() - t0
                status = "done" if done else "stopped"
        barrier(dist)
        if dist.is_main:
            if status == "done":
                _finish(out, masks, ids, cfg, image, settings)
                write_status(out, GenerationStatus(complete=True, done=len(ids), expected=len(ids), command=command))
            else:
                _record_partial(out, masks, ids, cfg, image, settings, command)
    except BaseException:
        if dist.is_main:  # an error (a full disk, say) or a second Ctrl-C: what is done is listed
            _record_partial(out, masks, ids, cfg, image, settings, command)
        raise
    barrier(dist)  # every rank leaves together: none exits while rank 0 still writes
    seconds["total"] = time.perf_counter() - t_start
    if dist.is_main:
        if status == "stopped":
            log.warning("stopped by signal before every sample was written: run the same command again to "
                        "continue in %s", out)
        else:
            log.info("wrote %d samples to %s in %.0f s", len(ids), out / cfg.split, seconds["total"])
    rate = masks.acceptance_rate if masks is not None else None
    return GenerationResult(out, status, [i for i, _ in ids] if status == "done" else [], rate, seconds)


def _count_complete(split_dir: Path, keys: Sequence[str]) -> int:
    if not split_dir.is_dir():
        return 0
    return sum(1 for p in split_dir.iterdir() if p.is_dir() and writer.is_complete(p, keys))


def _record_partial(out: Path, masks: _Masks | None, ids: list[tuple[str, int]], cfg: DictConfig, image: Stage,
                    settings: dict[str, Any], command: str | None) -> None:
    """After an early stop: ``manifest.csv`` of the samples done so far and ``status.json`` saying
    the folder is unfinished. Best effort: on a full disk this may fail too, and the error that
    stopped the run is the one reported."""
    split_dir = out / cfg.split
    keys = (*image.mode.image_keys, MASK_KEY)
    try:
        if masks is not None:
            done = {sid for sid, _ in ids if writer.is_complete(split_dir / sid, keys)}
            writer.write_manifest(out / "manifest.csv", _manifest_rows(masks, ids, cfg, settings, done))
            write_status(out, GenerationStatus(complete=False, done=len(done), expected=len(ids), command=command))
        else:
            if not (out / "manifest.csv").exists():
                writer.write_manifest(out / "manifest.csv", [])
            write_status(out, GenerationStatus(complete=False, done=_count_complete(split_dir, keys), command=command))
    except OSError as exc:
        log.warning("could not list the samples done so far: %s", exc)


def _sampler(cfg: DictConfig, key: str, stage: Stage | None) -> str | None:
    if stage is None:
        return None
    name = cfg[key] or cfg.sampler or stage.strategy.samplers[0]
    if name not in stage.strategy.samplers:
        which = key if cfg[key] else "sampler"
        raise GenerationError(f"{which}={name}: {stage.path} is a {stage.strategy.name!r} model, which samples with "
                              f"{list(stage.strategy.samplers)}")
    return name


def _settings(cfg: DictConfig, seg: Stage | None, image: Stage, samplers: dict[str, str | None]) -> dict[str, Any]:
    return {
        "seg_checkpoint": str(seg.path) if seg else None, "seg_sha256": seg.sha256 if seg else None,
        "image_checkpoint": str(image.path), "image_sha256": image.sha256,
        "masks_from": str(resolve_path(cfg.masks_from)) if cfg.masks_from else None,
        "masks_split": cfg.masks_split if cfg.masks_from else None,
        "num_images": cfg.num_images, "samples_per_mask": cfg.samples_per_mask, "split": cfg.split, "seed": cfg.seed,
        "seg_sampler": samplers["seg"], "image_sampler": samplers["image"], "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale, "use_ema": cfg.use_ema, "precision": cfg.precision,
        "gate": OmegaConf.to_container(cfg.gate) if seg else None,
        "image_keys": list(image.mode.image_keys), "image_size": image.image_size,
        "spacing": list(image.spacing or (seg.spacing if seg and seg.spacing else (1.0, 1.0, 1.0))),
    }


@contextmanager
def _exclusive(state: Path, dist: DistInfo) -> Iterator[None]:
    """One generation at a time per out_dir: the main rank holds a lock on ``.medgen/lock``."""
    if not dist.is_main:
        yield
        return
    with FolderLock(state.parent, "generation folder", f"{state.name}/lock"):
        yield


def _remove_partial_writes(out: Path) -> None:
    """Temporary files and folders an interrupted run left (``.<name>.tmp-<host>-<pid>-<token>``, or
    ``.<name>.tmp-<pid>`` from an older medgen): never complete. This run holds the folder's lock, so
    every one of them is a dead run's."""
    import shutil

    for path in out.glob("**/.*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _claim(state: Path, settings: dict[str, Any]) -> None:
    """Record the settings of this out_dir, or check that a restart keeps them."""
    path = state / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in _DETERMINING if old.get(k) != settings.get(k)]
        if changed:
            raise GenerationError(f"{state.parent} holds a generation with other settings ({'; '.join(changed)}); "
                                  "use another out_dir, or the same settings to continue it")
        log.info("continuing the generation in %s", state.parent)
    state.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))


def _generators(seed: int, indices: Sequence[int], stream: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, on the sampling device (drawing on the CPU and copying would
    cost ~10% of a GPU step for the ancestral samplers). PyTorch's CPU and CUDA generators differ,
    so the same seed gives other noise on a GPU than on the CPU."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i), stream)) for i in indices]


def _bar(total: int, initial: int, desc: str, dist: DistInfo, progress: bool):
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True,
                disable=not (progress and dist.is_main))


# ============================================================================ stage 1
def _stage1(seg: Stage, cfg: DictConfig, sampler: str, folder: Path, dist: DistInfo, stop: StopRequest,
            progress: bool) -> _Masks | None:
    """Masks until ``num_images`` pass the gate (None if stopped by a signal)."""
    n_wanted = int(cfg.num_images)
    max_attempts = cfg.gate.max_attempts or 20 * n_wanted
    folder.mkdir(parents=True, exist_ok=True)
    evaluated = _read_blocks(folder, keep_masks=False)  # candidate -> (area, components, smallest, accepted)
    with _bar(n_wanted, min(n_wanted, _accepted_prefix(evaluated)[1]), "masks", dist, progress) as bar:
        while True:
            prefix, accepted = _accepted_prefix(evaluated)
            bar.n = min(accepted, n_wanted)
            bar.set_postfix(accepted=f"{accepted}/{prefix}")
            bar.refresh()
            if accepted >= n_wanted:
                break
            if prefix >= max_attempts:
                raise GenerationError(
                    f"the quality gate accepted {accepted} of {prefix} generated masks ({100 * accepted / prefix:.1f}%), "
                    f"short of num_images={n_wanted} within gate.max_attempts={max_attempts}; loosen gate.* "
                    f"(min_area={cfg.gate.min_area}, max_area={cfg.gate.max_area}, max_components={cfg.gate.max_components}, "
                    f"min_component_pixels={cfg.gate.min_component_pixels}), raise gate.max_attempts, or train the seg "
                    "model longer")
            if any_rank(stop.requested, dist):
                return None
            queue = _next_candidates(evaluated, dist.world_size * cfg.batch_size)
            mine = queue[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size]
            results = _evaluate(seg, mine, cfg, sampler, folder, dist) if mine else {}
            for part in _gather(results, dist):
                evaluated.update(part)
    _, accepted = _accepted_prefix(evaluated)
    order = sorted(evaluated)
    chosen = [j for j in order if evaluated[j][3]][:n_wanted]
    last = chosen[-1]
    masks_by_candidate = _read_blocks(folder, keep_masks=True, wanted=set(chosen))
    rows, rejected = [], []
    for j in order:
        if j > last:
            break
        area, components, _, ok = evaluated[j]
        row = {"mask_source": f"candidate {j}", "mask_seed": sample_seed(cfg.seed, j, MASK_STREAM),
               "mask_area": f"{area:.6f}", "components": int(components), "accepted": bool(ok)}
        (rows if ok else rejected).append(row)
    rate = len(chosen) / (last + 1)
    if dist.is_main:
        log.info("quality gate: %d of %d masks accepted (%.1f%%)", len(chosen), last + 1, 100 * rate)
    masks = np.stack([masks_by_candidate[j] for j in chosen])
    return _Masks(masks, rows, rejected, rate)


def _evaluate(seg: Stage, candidates: list[int], cfg: DictConfig, sampler: str, folder: Path,
              dist: DistInfo) -> dict[int, tuple]:
    """Generate and gate ``candidates``; save them as one block file; return their verdicts."""
    x0 = seg.sample(None, _generators(cfg.seed, candidates, MASK_STREAM, seg.device), steps=cfg.steps, sampler=sampler,
                    batch_size=cfg.batch_size)
    masks = seg.mode.to_outputs(x0)[MASK_KEY][:, 0].cpu().numpy().astype(np.uint8)
    stats = quality_gate.measure(masks)
    ok = quality_gate.passes(stats, cfg.gate)
    path = folder / f"block_{candidates[0]:09d}_{len(candidates):05d}_r{dist.rank}.npz"
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, candidates=np.asarray(candidates, dtype=np.int64), masks=masks, area=stats.area,
                            components=stats.components, smallest=stats.smallest, accepted=ok)
    return {j: (float(stats.area[i]), int(stats.components[i]), int(stats.smallest[i]), bool(ok[i]))
            for i, j in enumerate(candidates)}


def _read_blocks(folder: Path, keep_masks: bool, wanted: set[int] | None = None) -> dict[int, Any]:
    """Stage-1 results on disk: ``{candidate: (area, components, smallest, accepted)}`` or, with
    ``keep_masks``, ``{candidate: mask}`` for the ``wanted`` candidates."""
    out: dict[int, Any] = {}
    for path in sorted(folder.glob("block_*.npz")):
        with np.load(path) as block:
            for i, j in enumerate(block["candidates"].tolist()):
                if keep_masks:
                    if j in wanted:
                        out[j] = block["masks"][i]
                else:
                    out[j] = (float(block["area"][i]), int(block["components"][i]), int(block["smallest"][i]),
                              bool(block["accepted"][i]))
    return out


def _accepted_prefix(evaluated: dict[int, tuple]) -> tuple[int, int]:
    """(length of the run of evaluated candidates 0, 1, 2, ..., accepted masks within it)."""
    n = accepted = 0
    while n in evaluated:
        accepted += evaluated[n][3]
        n += 1
    return n, accepted


def _next_candidates(evaluated: dict[int, tuple], count: int) -> list[int]:
    out, j = [], 0
    while len(out) < count:
        if j not in evaluated:
            out.append(j)
        j += 1
    return out


def _gather(results: dict[int, tuple], dist: DistInfo) -> list[dict[int, tuple]]:
    if not dist.distributed:
        return [results]
    parts: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(parts, results)
    return parts


# ============================================================================ masks_from
def _real_masks(cfg: DictConfig, image_size: int) -> _Masks:
    """The lesion slices of ``masks_split`` of a medgen dataset, at the image model's size."""
    from medgen.data.slices import SliceSpec, open_or_build_cache
    from medgen.data.splits import split_patients

    root = resolve_path(cfg.masks_from)
    if not root.is_dir():
        raise DataError(f"masks_from={cfg.masks_from}: {root} is not a folder")
    patients = split_patients(root, cfg.masks_split)
    if not patients:
        raise DataError(f"masks_from={cfg.masks_from}: no patients in {root / cfg.masks_split} "
                        f"(choose another masks_split)")
    spec = SliceSpec(keys=(MASK_KEY,), image_size=image_size, selection="lesion")
    cache = open_or_build_cache(patients, spec, resolve_path(cfg.cache_dir), desc=f"{cfg.masks_split} masks")
    n = len(cache) if cfg.num_images is None else min(int(cfg.num_images), len(cache))
    if n == 0:
        raise DataError(f"masks_from={cfg.masks_from}: no slice with a lesion in {root / cfg.masks_split}")
    if cfg.num_images is not None and n < cfg.num_images:
        log.warning("masks_from has %d lesion slices in %s/; generating for all of them (num_images=%d)", n,
                    cfg.masks_split, cfg.num_images)
    masks = (np.asarray(cache.data[:n, 0]) > 0.5).astype(np.uint8)
    stats = quality_gate.measure(masks)
    rows = [{"mask_source": f"{cfg.masks_split}/{cache.patient_ids[cache.patient_index[i]]}/z{int(cache.slice_index[i])}",
             "mask_area": f"{stats.area[i]:.6f}", "components": int(stats.components[i]), "accepted": True,
             "_id": f"{cache.patient_ids[cache.patient_index[i]]}_z{int(cache.slice_index[i]):03d}"}
            for i in range(n)]
    return _Masks(masks, rows, [], None)


# ============================================================================ stage 2
def _sample_ids(masks: _Masks, cfg: DictConfig) -> list[tuple[str, int]]:
    """``(sample id, mask index)`` for every sample, in sample order ``q = mask * K + draw``."""
    k = cfg.samples_per_mask
    out = []
    for i, row in enumerate(masks.rows):
        base = row.get("_id", f"syn_{i:06d}")
        out.extend((base if k == 1 else f"{base}_s{d}", i) for d in range(k))
    return out


def _stage2(image: Stage, masks: _Masks, ids: list[tuple[str, int]], cfg: DictConfig, sampler: str, out: Path,
            dist: DistInfo, stop: StopRequest, progress: bool) -> bool:
    """Paint every sample whose folder is not complete yet; False if stopped by a signal."""
    split_dir = out / cfg.split
    split_dir.mkdir(parents=True, exist_ok=True)
    keys = (*image.mode.image_keys, MASK_KEY)
    pending = [q for q, (sid, _) in enumerate(ids) if not writer.is_complete(split_dir / sid, keys)]
    mine = pending[dist.rank::dist.world_size]
    spacing = _spacing(image)
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    n_rounds = math.ceil(len(pending) / (cfg.batch_size * dist.world_size))
    with _bar(len(ids), len(ids) - len(pending), "images", dist, progress) as bar, \
            writer.BackgroundWrites(workers=min(4, os.cpu_count() or 1)) as writes:
        for r in range(n_rounds):
            if any_rank(stop.requested, dist):
                return False
            batch = batches[r] if r < len(batches) else []
            if batch:
                mask = torch.from_numpy(masks.masks[[ids[q][1] for q in batch]]).float()[:, None]
                x0 = image.sample(to_model_space(mask).to(image.device),
                                  _generators(cfg.seed, batch, IMAGE_STREAM, image.device), steps=cfg.steps,
                                  sampler=sampler, guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size)
                outputs = {k: v[:, 0].cpu().numpy() for k, v in image.mode.to_outputs(x0).items()}
                for b, q in enumerate(batch):
                    arrays = {k: outputs[k][b] for k in image.mode.image_keys}
                    arrays[MASK_KEY] = mask[b, 0].numpy()
                    writes.submit(_write, split_dir / ids[q][0], arrays, spacing, image.mode.image_keys,
                                  out / "previews" / f"{ids[q][0]}.png" if cfg.previews else None)
            bar.update(min(len(pending) - r * cfg.batch_size * dist.world_size, cfg.batch_size * dist.world_size))
    return True


def _write(folder: Path, arrays: dict[str, np.ndarray], spacing: Sequence[float], image_keys: Sequence[str],
           preview: Path | None) -> None:
    """One sample's preview, then its folder (a folder on disk is a finished sample, preview
    included): runs in a writer thread."""
    if preview is not None:
        writer.save_png(writer.render_sample(arrays, image_keys), preview)
    writer.write_sample(folder, arrays, spacing)


def _read_sample(folder: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """A written sample's planes ``{key: [S, S]}``, image keys and the mask."""
    return {k: load_volume(modality_path(folder, k))[0][..., 0] for k in (*keys, MASK_KEY)}


def _spacing(image: Stage) -> tuple[float, float, float]:
    if image.spacing is None:
        log.warning("%s records no voxel spacing (trained with an older medgen): writing 1 mm voxels", image.path)
        return (1.0, 1.0, 1.0)
    return image.spacing


# ============================================================================ the end
def _finish(out: Path, masks: _Masks, ids: list[tuple[str, int]], cfg: DictConfig, image: Stage,
            settings: dict[str, Any]) -> None:
    """Rank 0, once every sample exists: missing previews, uncertainty maps, contact sheet,
    manifest, nnU-Net export."""
    split_dir = out / cfg.split
    keys = image.mode.image_keys
    if cfg.previews:
        _repair_previews(out, [sid for sid, _ in ids], split_dir, keys)
    if cfg.samples_per_mask > 1:
        _uncertainty(out, split_dir, masks, ids, keys, _spacing(image))
    tiles = [writer.render_sample(_read_sample(split_dir / sid, keys), keys, scale=max(1, 128 // image.image_size))
             for sid, _ in ids[:CONTACT_SHEET_SAMPLES]]
    writer.save_png(writer.contact_sheet(tiles, columns=8 // len(keys)), out / "contact_sheet.png")
    writer.write_manifest(out / "manifest.csv", _manifest_rows(masks, ids, cfg, settings))
    if cfg.format == "nnunet":
        root = writer.export_nnunet(out, [split_dir / sid for sid, _ in ids], keys, cfg.nnunet.dataset_id,
                                    cfg.nnunet.name)
        log.info("nnU-Net v2 raw dataset: %s", root)


def _repair_previews(out: Path, sample_ids: Sequence[str], split_dir: Path, keys: Sequence[str]) -> None:
    """Previews of finished samples that an older medgen left without one (it wrote the folder first)."""
    missing = [sid for sid in sample_ids if not (out / "previews" / f"{sid}.png").is_file()]
    for sid in missing:
        writer.save_png(writer.render_sample(_read_sample(split_dir / sid, keys), keys),
                        out / "previews" / f"{sid}.png")
    if missing:
        log.info("wrote %d missing previews", len(missing))


def _manifest_rows(masks: _Masks, ids: list[tuple[str, int]], cfg: DictConfig, settings: dict[str, Any],
                   done: set[str] | None = None) -> list[dict[str, Any]]:
    """The manifest's rows: every sample (or those in ``done``), then the masks the gate rejected."""
    common = {"split": cfg.split, "seg_checkpoint": settings["seg_checkpoint"] or "",
              "seg_sha256": settings["seg_sha256"] or "", "image_checkpoint": settings["image_checkpoint"],
              "image_sha256": settings["image_sha256"], "seg_sampler": settings["seg_sampler"] or "",
              "image_sampler": settings["image_sampler"], "steps": cfg.steps, "guidance_scale": cfg.guidance_scale}
    rows = []
    for q, (sid, i) in enumerate(ids):
        if done is not None and sid not in done:
            continue
        row = {k: v for k, v in masks.rows[i].items() if not k.startswith("_")}
        rows.append({**common, **row, "id": sid, "image_seed": sample_seed(cfg.seed, q, IMAGE_STREAM)})
    return rows + [{**common, **row, "image_checkpoint": "", "image_sha256": "", "image_sampler": ""}
                   for row in masks.rejected]


def _uncertainty(out: Path, split_dir: Path, masks: _Masks, ids: list[tuple[str, int]], keys: Sequence[str],
                 spacing: Sequence[float]) -> None:
    """Per mask and image key: the per-pixel mean and standard deviation of its samples, as
    ``uncertainty/<mask id>/<key>_mean.nii.gz`` and ``<key>_std.nii.gz``, and a picture."""
    from medgen.data.nifti_dataset import save_volume

    by_mask: dict[int, list[str]] = {}
    for sid, i in ids:
        by_mask.setdefault(i, []).append(sid)
    affine = writer.slice_affine(spacing)
    for i, sids in by_mask.items():
        folder = out / "uncertainty" / sids[0].rsplit("_s", 1)[0]
        if (folder / "uncertainty.png").is_file():
            continue
        tiles = []
        for key in keys:
            stack = np.stack([load_volume(modality_path(split_dir / sid, key))[0][..., 0] for sid in sids])
            mean, std = stack.mean(axis=0), stack.std(axis=0)
            save_volume(folder / f"{key}_mean.nii.gz", mean[..., None], affine)
            save_volume(folder / f"{key}_std.nii.gz", std[..., None], affine)
            tiles += [writer.render_tile(mean, masks.masks[i]),
                      writer.render_tile(std / max(float(std.max()), 1e-6), masks.masks[i])]
        writer.save_png(writer.contact_sheet(tiles, columns=len(tiles)), folder / "uncertainty.png")
