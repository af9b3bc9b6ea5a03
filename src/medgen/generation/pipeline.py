"""``medgen-generate``'s work: masks (stage 1, with the quality gate) -> images (stage 2) -> a dataset.

The stages: :mod:`medgen.generation.masks` (sampled through the gate, or real ones from
``masks_from``) and :mod:`medgen.generation.images`; the output folder's lock, settings and
clean-up: :mod:`medgen.generation.run_folder`. This module runs them and finishes the set.

Determinism. The output depends on neither the batch size, nor the number of processes, nor
interruptions (up to bf16 rounding where batches change): every mask candidate and every sample
draws from its own seed.

Resumability. Stage-1 results are kept in ``<out_dir>/.medgen/masks/``, and a sample folder on
disk is a finished sample: a restarted run reads what exists, does the rest and writes any
preview a run with ``previews=false`` left missing. ``<out_dir>/.medgen/status.json`` says whether the folder is
complete (:mod:`medgen.generation.status`); a run that stops early (a signal, an error) leaves it
and ``manifest.csv`` listing the samples done so far.

Distributed. Under ``torchrun``/SLURM, stage-1 candidates are evaluated in rounds of one batch per
rank (acceptance shared with one all-gather per round), stage-2 samples are sharded across ranks,
and rank 0 writes the manifest, pictures and exports at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.core.distributed import DistInfo, barrier
from medgen.core.fs import atomic_write
from medgen.core.paths import resolve_path
from medgen.core.precision import configure_backends
from medgen.core.signals import stop_signals
from medgen.data.brain import brain_of, brain_source, inside_counts
from medgen.data.lesions import RANO_BM, feret_diameters
from medgen.data.pictures import contact_sheet, save_png
from medgen.data.space import SampleSpace
from medgen.diffusion.utils import sample_seed
from medgen.generation import gate as quality_gate
from medgen.generation import writer
from medgen.generation.config import ignored_keys
from medgen.generation.images import IMAGE_STREAM, SampleIds, paint, read_sample, sample_ids
from medgen.generation.masks import real_masks, sample_masks
from medgen.generation.models import GenerationError, Stage, check_pair, load_stage
from medgen.generation.records import Masks
from medgen.generation.requests import GenerateRequest, Samplers
from medgen.generation.sizes import (Targets, check_conditioning, hard_to_draw, pixel_edge, resolve_count_target,
                                    resolve_target)
from medgen.generation.run_folder import (claim, count_complete, exclusive, release_room, remove_partial_writes,
                                         reserve_room, run_settings)
from medgen.generation.status import GenerationStatus, write_status

log = logging.getLogger("medgen.generate")

CONTACT_SHEET_SAMPLES = 64


@dataclass
class GenerationResult:
    """What a run produced (``status``: ``"done"`` or ``"stopped"`` by a signal)."""

    out_dir: Path
    status: str
    sample_ids: list[str]
    acceptance_rate: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    #: with a size or count target: what ``lesion_sizes.json`` says (:func:`medgen.generation.masks.size_report`)
    sizes: dict[str, Any] | None = None

    @property
    def manifest(self) -> Path:
        return self.out_dir / "manifest.csv"

    @property
    def contact_sheet(self) -> Path:
        return self.out_dir / "contact_sheet.png"


@dataclass
class _Run:
    """One run's fixed parts, as the stages and the finishing read them."""

    request: GenerateRequest
    seg: Stage | None
    image: Stage
    samplers: dict[str, str | None]
    settings: dict[str, Any]
    out: Path
    dist: DistInfo
    command: str | None
    targets: Targets = Targets()

    @property
    def state(self) -> Path:
        return self.out / ".medgen"

    @property
    def split_dir(self) -> Path:
        return self.out / self.request.output.split

    @property
    def keys(self) -> tuple[str, ...]:
        """What each sample folder holds: the image keys and the mask."""
        return (*self.image.mode.image_keys, MASK_KEY)


# ============================================================================ entry point
def run_generation(cfg: DictConfig, dist: DistInfo | None = None, progress: bool = True,
                   command: str | None = None) -> GenerationResult:
    """Generate (or continue generating) the dataset ``cfg`` describes (a validated generate config).
    ``command``: the command line that runs it, recorded for whoever finds the folder unfinished.
    The only function that reads the config: the stages take its :class:`GenerateRequest`."""
    configure_backends()
    request = GenerateRequest.from_config(cfg)
    dist = dist or DistInfo(device=torch.device(cfg.device) if cfg.device else DistInfo().device)
    ignored = ignored_keys(cfg) if dist.is_main else []
    return _generate(request, dist, progress, command, ignored)


def _generate(request: GenerateRequest, dist: DistInfo, progress: bool, command: str | None,
              ignored: Sequence[str]) -> GenerationResult:
    t_start = time.perf_counter()
    if request.insert is not None:  # lesions painted into real scans
        from medgen.generation.insert import run_insertion

        for what in ignored:
            log.warning("%s: it has no effect in this run", what)
        done = run_insertion(request, dist, progress, command)
        return GenerationResult(resolve_path(request.output.out_dir), done["status"], done["ids"], None,
                                done["seconds"], done["sizes"])
    out, loading = resolve_path(request.output.out_dir), request.loading
    options = dict(device=dist.device, use_ema=loading.use_ema, precision=loading.precision, compile=loading.compile,
                   compile_mode=loading.compile_mode)
    image = load_stage(loading.image_checkpoint, "image", "image_checkpoint", **options)
    if image.mode.paints_into_scans:
        raise GenerationError(f"image_checkpoint={image.path} is a mode={image.mode.name} model: it paints lesions "
                              "into real scans; give insert.into=<a medgen dataset> (docs: Insertion), or a bravo/dual "
                              "model for whole images")
    seg = None
    if loading.seg_checkpoint is not None:
        seg = load_stage(loading.seg_checkpoint, "seg", "seg_checkpoint", **options)
    check_pair(seg, image, request.paint.guidance_scale)
    for what in ignored:
        log.warning("%s: it has no effect in this run", what)
    if seg is not None:
        request = _with_gate_defaults(request, image.space, dist)
    samplers = {"seg": _sampler(request.samplers, "seg_sampler", seg),
                "image": _sampler(request.samplers, "image_sampler", image)}
    run = _Run(request, seg, image, samplers, run_settings(request, seg, image, samplers), out, dist, command,
               _targets(request, seg, image, dist))
    with exclusive(run.state, dist):
        if dist.is_main:
            claim(run.state, run.settings)
            remove_partial_writes(out)
            reserve_room(run.state, (request.masks.num_images or 0) * request.paint.samples_per_mask)
            write_status(out, GenerationStatus(complete=False, done=count_complete(run.split_dir, run.keys),
                                               command=command))
        barrier(dist)
        return _run_stages(run, progress, t_start)


def _run_stages(run: _Run, progress: bool, t_start: float) -> GenerationResult:
    request, dist, space = run.request, run.dist, run.image.space
    seconds: dict[str, float] = {}
    status, masks, ids = "stopped", None, []
    try:
        with stop_signals(ctrl_c=True) as stop:
            t0 = time.perf_counter()
            if run.seg is not None:
                masks = sample_masks(run.seg, request.masks, run.samplers["seg"], run.state / "masks", dist, stop,
                                     progress, run.targets, space)
            else:
                masks = real_masks(request.real, request.masks.num_images, request.paint.sampling.seed, space,
                                   run.image.brain_from if BRAIN_KEY in run.image.mode.cond_keys else None,
                                   run.targets, run.image.brain_method)
            seconds["masks"] = time.perf_counter() - t0
            if masks is not None:
                t0 = time.perf_counter()
                ids = sample_ids(masks, request.paint.samples_per_mask)
                if dist.is_main and request.masks.num_images is None:  # masks_from: the count is known now
                    reserve_room(run.state, len(ids))
                done = paint(run.image, masks, ids, request.paint, run.samplers["image"], run.out, dist, stop,
                             progress)
                seconds["images"] = time.perf_counter() - t0
                status = "done" if done else "stopped"
        barrier(dist)
        if dist.is_main:
            if status == "done":
                _finish(run, masks, ids)
                write_status(run.out, GenerationStatus(complete=True, done=len(ids), expected=len(ids),
                                                       command=run.command))
                release_room(run.state)
            else:
                _record_partial(run, masks, ids)
    except BaseException:
        if dist.is_main:  # an error (a full disk, say) or a second Ctrl-C: what is done is listed
            _record_partial(run, masks, ids)
        raise
    barrier(dist)  # every rank leaves together: none exits while rank 0 still writes
    seconds["total"] = time.perf_counter() - t_start
    if dist.is_main:
        if status == "stopped":
            log.warning("stopped by signal before every sample was written: run the same command again to "
                        "continue in %s", run.out)
        else:
            log.info("wrote %d samples to %s in %.0f s", len(ids), run.split_dir, seconds["total"])
    rate = masks.acceptance_rate if masks is not None else None
    return GenerationResult(run.out, status, [i for i, _ in ids] if status == "done" else [], rate, seconds,
                            masks.size_report if masks is not None else None)


def _record_partial(run: _Run, masks: Masks | None, ids: SampleIds) -> None:
    """After an early stop: ``manifest.csv`` of the samples done so far and ``status.json`` saying
    the folder is unfinished, in the room the reserve held back (on a disk something else fills
    meanwhile this may still fail; the error that stopped the run is the one reported)."""
    out, command = run.out, run.command
    release_room(run.state)  # the room held back for this
    try:
        if masks is not None:
            done = {sid for sid, _ in ids if writer.is_complete(run.split_dir / sid, run.keys)}
            writer.write_manifest(out / "manifest.csv", _manifest_rows(run, masks, ids, done, _inside_brain(run, done)))
            write_status(out, GenerationStatus(complete=False, done=len(done), expected=len(ids), command=command))
        else:
            if not (out / "manifest.csv").exists():
                writer.write_manifest(out / "manifest.csv", [])
            write_status(out, GenerationStatus(complete=False, done=count_complete(run.split_dir, run.keys),
                                               command=command))
    except OSError as exc:
        log.warning("could not list the samples done so far: %s", exc)


def _with_gate_defaults(request: GenerateRequest, space: SampleSpace, dist: DistInfo) -> GenerateRequest:
    """``request`` with the gate's null rules set for masks of ``space``
    (:func:`medgen.generation.gate.with_defaults`), as settings.json records them."""
    given = request.masks.gate
    gate = quality_gate.with_defaults(given, space)
    if space.volumetric and dist.is_main and gate.enabled and given.min_component_pixels is None:
        log.info("gate.min_component_pixels=null: a lesion of fewer than %d voxel(s) of %s mm (a ball %g mm "
                 "across) is a speck", gate.min_component_pixels, " x ".join(f"{float(s):g}" for s in space.mm),
                 quality_gate.SPECK_BALL_MM)
    return request.with_gate(gate)


def _targets(request: GenerateRequest, seg: Stage | None, image: Stage, dist: DistInfo) -> Targets:
    """The size and count classes ``lesion_sizes`` and ``lesion_counts`` ask for. With a seg model:
    none for ``model``, or for ``real`` with the gate off, which keeps every mask (said once; other
    targets with the gate off are refused by :func:`medgen.generation.config.validate_generate_config`).
    With ``masks_from``: ``uniform`` or weights pick the real masks
    (:func:`medgen.generation.masks.real_masks`), ``real`` and ``model`` take them as they are."""
    asked, main, space = request.masks, dist.is_main, image.space
    if seg is None:
        return _real_targets(request, space, main)
    n = int(asked.num_images)
    sizes = counts = None
    if not asked.gate.enabled:  # uniform and weights were refused (generation.config); real is said, not dropped
        real = [key for key in ("lesion_sizes", "lesion_counts") if asked.target(key) == "real"]
        if real and main:
            log.info("gate.enabled=false keeps every mask drawn: %s (the gate meets the quotas)",
                     " and ".join(f"{key}.target=real is not applied" for key in real))
    else:
        sizes = resolve_target(asked.sizes, n, space, seg.training_sizes)
        counts = resolve_count_target(asked.counts, n, seg.training_counts, asked.gate.max_components)
    check_conditioning(seg.mode, seg.path, seg.cond_dropout, Targets(sizes, counts), asked.sizes.guidance)
    if sizes is not None and main:
        log.info("size classes requested (lesion_sizes.target=%s, largest lesion per mask): %s",
                 sizes.source, sizes.describe())
        small, edge = hard_to_draw(sizes, space), pixel_edge(space)
        if small:
            log.warning("lesion_sizes.target asks for %s lesions, under 4 %s of %.4g mm across: a seg model of %s "
                        "rarely draws them, so the run may stop at gate.max_attempts; ask for none of them (weights "
                        "per class) or train at a larger model.image_size", " and ".join(small),
                        space.either("pixels", "voxels (cube edge)"), edge, space.describe())
    if counts is not None and main:
        log.info("lesions per mask requested (lesion_counts.target=%s): %s", counts.source, counts.describe())
    return Targets(sizes, counts)


def _real_targets(request: GenerateRequest, space: SampleSpace, main: bool) -> Targets:
    """With ``masks_from``: the quotas (``uniform``, weights) the real masks are picked to meet."""
    asked = request.masks
    picks, n = asked.quota_keys(), asked.num_images
    sizes = resolve_target(asked.sizes, int(n), space, None) if "lesion_sizes" in picks else None
    counts = resolve_count_target(asked.counts, int(n), None, asked.gate.max_components) \
        if "lesion_counts" in picks else None
    targets = Targets(sizes, counts)
    if targets and main:
        log.info("masks_from: the real masks of %s/ are picked to meet %s", request.real.split, "; ".join(
            f"{t.key}.target={asked.target(t.key)} ({t.describe()})" for _, t in targets.items()))
    return targets


def _sampler(samplers: Samplers, key: str, stage: Stage | None) -> str | None:
    if stage is None:
        return None
    given = getattr(samplers, key)
    name = given or samplers.sampler or stage.strategy.samplers[0]
    if name not in stage.strategy.samplers:
        which = key if given else "sampler"
        raise GenerationError(f"{which}={name}: {stage.path} is a {stage.strategy.name!r} model, which samples with "
                              f"{list(stage.strategy.samplers)}")
    return name


# ============================================================================ the end
def _finish(run: _Run, masks: Masks, ids: SampleIds) -> None:
    """Rank 0, once every sample exists: missing previews, uncertainty maps, contact sheet,
    manifest, nnU-Net export."""
    output, out, split_dir, space = run.request.output, run.out, run.split_dir, run.image.space
    keys = run.image.mode.image_keys
    if output.previews:
        _repair_previews(out, [sid for sid, _ in ids], split_dir, keys, space)
    if run.request.paint.samples_per_mask > 1:
        _uncertainty(out, split_dir, masks, ids, keys, space)
    _contact_sheet(run, ids)
    inside = _inside_brain(run, [sid for sid, _ in ids])
    n_in, n_all = (sum(c[i] for c in inside.values()) for i in (0, 1))
    if n_all:
        log.info("lesion pixels inside the brain of their image: %.1f%% (%d of %d; the brain derived from %s as "
                 "for training data)", 100 * n_in / n_all, n_in, n_all,
                 brain_source(keys, run.image.brain_from))
    writer.write_manifest(out / "manifest.csv", _manifest_rows(run, masks, ids, inside=inside))
    if masks.size_report is not None:
        with atomic_write(out / "lesion_sizes.json") as tmp:
            tmp.write_text(json.dumps(masks.size_report, indent=1))
    if output.format == "nnunet":
        root = writer.export_nnunet(out, [split_dir / sid for sid, _ in ids], keys, output.nnunet_id,
                                    output.nnunet_name, space)
        log.info("nnU-Net v2 raw dataset: %s", root)


def _contact_sheet(run: _Run, ids: SampleIds) -> None:
    """``contact_sheet.png``: the first :data:`CONTACT_SHEET_SAMPLES` samples, slices at least 128
    pixels wide, 8 pictures a row; volumes (a quarter as many) as their three planes with the mask
    outlined, :attr:`~medgen.data.space.SampleSpace.sheet_columns` a row."""
    keys, split_dir, space = run.image.mode.image_keys, run.split_dir, run.image.space
    count, scale, outlined_only, columns = space.either(
        (CONTACT_SHEET_SAMPLES, max(1, 128 // space.size), False, space.sheet_columns // len(keys)),
        (CONTACT_SHEET_SAMPLES // 4, 2, True, space.sheet_columns))
    tiles = [writer.render_sample(read_sample(split_dir / sid, keys), keys, space, scale, outlined_only)
             for sid, _ in ids[:count]]
    save_png(contact_sheet(tiles, columns=columns), run.out / "contact_sheet.png")


def _inside_brain(run: _Run, sids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per finished sample: (its lesion pixels inside the brain of its image, its lesion pixels),
    the brain derived from the image as for training data (:func:`medgen.data.brain.brain_of`, by the
    training data's ``data.brain_method``)."""
    keys = run.image.mode.image_keys
    source = brain_source(keys, run.image.brain_from)
    out = {}
    for sid in tqdm(sids, desc="lesions inside the brain", unit="sample", dynamic_ncols=True, disable=len(sids) < 500):
        arrays = read_sample(run.split_dir / sid, keys)
        brain = brain_of(arrays[source], run.image.brain_method, run.image.space.spacing)
        out[sid] = inside_counts(arrays[MASK_KEY], brain)
    return out


def _repair_previews(out: Path, names: Sequence[str], split_dir: Path, keys: Sequence[str],
                     space: SampleSpace) -> None:
    """Previews of finished samples written without one (by a run of this folder with ``previews=false``,
    which does not change the samples)."""
    missing = [sid for sid in names if not (out / "previews" / f"{sid}.png").is_file()]
    for sid in missing:
        save_png(writer.render_sample(read_sample(split_dir / sid, keys), keys, space),
                 out / "previews" / f"{sid}.png")
    if missing:
        log.info("wrote %d missing previews", len(missing))


def _manifest_rows(run: _Run, masks: Masks, ids: SampleIds, done: set[str] | None = None,
                   inside: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """The manifest's rows: every sample (or those in ``done``), with the Feret diameter (mm) and
    RANO-BM size class of each of its lesions (in raster order) and the fraction of its lesion
    pixels inside the brain of its image (``inside``: the counts by sample), then the masks the
    gate rejected."""
    paint, settings = run.request.paint, run.settings
    common = {"split": paint.split, "seg_checkpoint": settings["seg_checkpoint"] or "",
              "seg_sha256": settings["seg_sha256"] or "", "image_checkpoint": settings["image_checkpoint"],
              "image_sha256": settings["image_sha256"], "seg_sampler": settings["seg_sampler"] or "",
              "image_sampler": settings["image_sampler"], "steps": paint.sampling.steps,
              "guidance_scale": paint.guidance_scale}
    spacing = run.image.space.mm
    sizes: dict[int, dict[str, str]] = {}  # mask index -> its lesions' fields (a mask may have several samples)
    rows = []
    for q, (sid, i) in enumerate(ids):
        if done is not None and sid not in done:
            continue
        if i not in sizes:
            d = feret_diameters(masks.masks[i], spacing)
            sizes[i] = {"lesion_diameters_mm": ";".join(f"{x:.1f}" for x in d),
                        "lesion_bins": ";".join(RANO_BM.names[b] for b in RANO_BM.index(d))}
        n_in, n_all = (inside or {}).get(sid, (0, 0))
        rows.append({**common, **masks.records[i].manifest_fields(), **sizes[i], "id": sid,
                     "image_seed": sample_seed(paint.sampling.seed, q, IMAGE_STREAM),
                     "inside_brain": f"{n_in / n_all:.4f}" if n_all else ""})
    return rows + [{**common, **record.manifest_fields(), "image_checkpoint": "", "image_sha256": "",
                    "image_sampler": ""} for record in masks.rejected]


def _uncertainty(out: Path, split_dir: Path, masks: Masks, ids: SampleIds, keys: Sequence[str],
                 space: SampleSpace) -> None:
    """Per mask and image key: the per-pixel (per-voxel) mean and standard deviation of its samples,
    as ``uncertainty/<mask id>/<key>_mean.nii.gz`` and ``<key>_std.nii.gz``, and a picture (a volume:
    its three planes through the largest lesion, mean and std a row per key)."""
    from medgen.data.nifti_dataset import save_volume

    by_mask: dict[int, list[str]] = {}
    for sid, i in ids:
        by_mask.setdefault(i, []).append(sid)
    affine = writer.slice_affine(space.spacing)
    for i, sids in by_mask.items():
        folder = out / "uncertainty" / sids[0].rsplit("_s", 1)[0]
        if (folder / "uncertainty.png").is_file():
            continue
        tiles, mask = [], masks.masks[i]
        draws = [read_sample(split_dir / sid, keys) for sid in sids]  # each file read once
        for key in keys:
            stack = np.stack([d[key] for d in draws])
            mean, std = stack.mean(axis=0), stack.std(axis=0)
            save_volume(folder / f"{key}_mean.nii.gz", writer.as_volume(mean), affine)
            save_volume(folder / f"{key}_std.nii.gz", writer.as_volume(std), affine)
            tiles += [space.picture(mean, mask), space.picture(std / max(float(std.max()), 1e-6), mask)]
        save_png(contact_sheet(tiles, columns=space.either(len(tiles), 2)), folder / "uncertainty.png")
