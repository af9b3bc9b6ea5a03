"""Insertion (``insert.into``): new lesions painted into real scans, at the sizes and counts asked.

Each of ``num_images`` samples is one real scan of ``insert.split`` (an axial slice, or a whole volume
for a volume painter) with new lesions: how many follows ``lesion_counts`` (per sample: the smallest
count of its class), the size class of every new lesion follows ``lesion_sizes`` (quotas over all
new lesions), both exact. Shapes come from the split's own lesions (or a seg model's), resized into
their class (:mod:`medgen.generation.insert_place`); each is placed uniformly where its region lies
in the brain and touches no lesion; a painter fills the regions (:mod:`medgen.generation.insert_paint`).

A sample folder holds the painted images, ``seg.nii.gz`` (the scan's own lesions and the new ones),
``region.nii.gz`` (where the painter was allowed to change the scan) and, with ``insert.keep_source``,
``source_<key>.nii.gz`` and ``source_seg.nii.gz``. Sample ``j``'s plan (scan, shapes, places) and noise
come from ``(seed, j)`` alone, so a restarted run paints only the samples not on disk and equals a
straight run. ``manifest.csv`` has one row per sample: the scan it came from (``source``) and per new
lesion its centre, diameter, class and shape's source.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medgen.core.constants import MASK_KEY
from medgen.core.distributed import DistInfo, any_rank, barrier
from medgen.core.fs import atomic_write
from medgen.core.paths import resolve_path
from medgen.core.signals import stop_signals
from medgen.data.lesions import SizeBins, feret_diameters
from medgen.data.masks import is_lesion, lesion_labels
from medgen.data.nifti_dataset import DataError
from medgen.data.pictures import contact_sheet, save_png, side_by_side
from medgen.data.space import SampleSpace
from medgen.diffusion.utils import sample_seed
from medgen.generation import writer
from medgen.generation.insert_paint import (PAINT_STREAM, Window, copy_into, paint_windows, painter_window,
                                            window_box)
from medgen.generation.insert_place import ShapeBank, grow, place, region_of, resize_to_class
from medgen.generation.insert_seams import SeamTally
from medgen.generation.insert_sources import Scans, open_scans, seg_shapes
from medgen.generation.images import read_sample
from medgen.generation.masks import progress_bar
from medgen.generation.models import GenerationError, Stage, load_stage
from medgen.generation.requests import GenerateRequest
from medgen.generation.run_folder import claim, exclusive, remove_partial_writes
from medgen.generation.sizes import ClassTarget, resolve_count_target, resolve_target
from medgen.generation.status import GenerationStatus, write_status

log = logging.getLogger("medgen.generate")

PLAN_STREAM = 13
#: scans tried for one sample before its lesions are declared not to fit
PLACE_TRIES = 20
SHEET_SAMPLES = 16
#: samples the seam and contrast figures of lesion_sizes.json are measured on
SEAM_SAMPLES = 256
REGION_KEY = "region"
#: the manifest of an insertion run
COLUMNS = ("id", "split", "source", "painter", "image_checkpoint", "image_sha256", "sampler", "steps", "seed",
           "existing_lesions", "new_lesions", "lesion_centres", "lesion_diameters_mm", "lesion_bins", "lesion_shapes",
           "inside_brain")


@dataclass
class NewLesion:
    """A planned lesion: its (resized) shape, size class and place."""

    shape: Any
    cls: int
    placed: Any


@dataclass
class Plan:
    """Sample ``index``: the scan it paints into (``item`` of the source) and its new lesions."""

    index: int
    item: int
    lesions: list[NewLesion]

    @property
    def name(self) -> str:
        return f"ins_{self.index:06d}"


@dataclass
class _Insertion:
    request: GenerateRequest
    stage: Stage | None
    scans: Scans
    bank: ShapeBank
    bins: SizeBins
    sizes: ClassTarget
    counts: ClassTarget
    out: Path
    sampler: str | None
    window: tuple[int, ...] | None

    @property
    def split_dir(self) -> Path:
        return self.out / self.request.output.split

    @property
    def keys(self) -> tuple[str, ...]:
        extra = tuple(f"source_{k}" for k in (*self.scans.keys, MASK_KEY)) if self.request.insert.keep_source else ()
        return (*self.scans.keys, MASK_KEY, REGION_KEY, *extra)


def run_insertion(request: GenerateRequest, dist: DistInfo, progress: bool, command: str | None) -> dict[str, Any]:
    """Paint the samples ``request`` asks for (those not on disk yet; under ``torchrun`` shared out
    over the ranks) and finish the folder. Returns ``{"status", "ids", "seconds", "sizes"}``."""
    t0 = time.perf_counter()
    run = _prepare(request, dist)
    plans = [_plan(run, j) for j in range(int(request.masks.num_images))]
    state, status = run.out / ".medgen", "stopped"
    with exclusive(state, dist):
        if dist.is_main:
            claim(state, _settings(run))
            remove_partial_writes(run.out)
            write_status(run.out, GenerationStatus(complete=False, done=_count_done(run, plans), command=command))
        barrier(dist)
        try:
            with stop_signals(ctrl_c=True) as stop:
                if _paint_pending(run, plans, dist, stop, progress):
                    status = "done"
            barrier(dist)
        finally:
            if dist.is_main:
                finished = [p for p in plans if writer.is_complete(run.split_dir / p.name, run.keys)]
                writer.write_manifest(run.out / "manifest.csv", [_row(run, p) for p in finished], COLUMNS)
                write_status(run.out, GenerationStatus(complete=status == "done", done=len(finished),
                                                       expected=len(plans), command=command))
        report = _finish(run, plans) if status == "done" and dist.is_main else None
    barrier(dist)
    if status == "done":
        log.info("painted %d new lesions into %d scans of %s in %.0f s (insert.painter=%s)",
                 sum(len(p.lesions) for p in plans), len(plans), run.scans.describe(), time.perf_counter() - t0,
                 request.insert.painter)
    else:
        log.warning("stopped before every sample was written: run the same command again to continue in %s", run.out)
    return {"status": status, "ids": [p.name for p in plans] if status == "done" else [],
            "seconds": {"total": time.perf_counter() - t0}, "sizes": report}


def _count_done(run: "_Insertion", plans: Sequence["Plan"]) -> int:
    return sum(writer.is_complete(run.split_dir / p.name, run.keys) for p in plans)


def _paint_pending(run: "_Insertion", plans: Sequence["Plan"], dist: DistInfo, stop: Any, progress: bool) -> bool:
    """Paint this rank's share of the samples not on disk, a batch at a time; False if stopped."""
    pending = [p for p in plans if not writer.is_complete(run.split_dir / p.name, run.keys)]
    mine, size = pending[dist.rank::dist.world_size], run.request.paint.sampling.batch_size
    rounds = -(-len(pending) // (size * dist.world_size))
    with progress_bar(len(plans), len(plans) - len(pending), "insertion", dist, progress) as bar:
        for r in range(rounds):
            if any_rank(stop.requested, dist):
                return False
            batch = mine[r * size:(r + 1) * size]
            if batch:
                _paint(run, batch)
            bar.update(min(len(pending) - r * size * dist.world_size, size * dist.world_size))
    return True


def _prepare(request: GenerateRequest, dist: DistInfo) -> _Insertion:
    """Load the painter (and the seg model for its shapes), open the scans, build the shape bank and
    the quotas; every refusal before anything is written."""
    ins, loading = request.insert, request.loading
    options = dict(device=dist.device, use_ema=loading.use_ema, precision=loading.precision, compile=loading.compile,
                   compile_mode=loading.compile_mode)
    stage = None if loading.image_checkpoint is None else load_stage(loading.image_checkpoint, "image",
                                                                    "image_checkpoint", **options)
    _check_painter(ins.painter, stage)
    scans = open_scans(ins, stage)
    window = None if stage is None or ins.painter == "copy" else painter_window(stage)
    if window is not None and any(w > n for w, n in zip(window, scans.space.shape)):
        raise GenerationError(f"image_checkpoint={stage.path} paints windows of {' x '.join(map(str, window))}, larger "
                              f"than the scans ({scans.describe()}); set insert.image_size to at least the window")
    bank, donors = _shape_bank(request, stage, scans, options)
    asked = request.masks
    n = int(asked.num_images)
    recorded = donors.lesion_counts()
    if not recorded and asked.counts.target == "real":
        raise GenerationError(f"lesion_counts.target=real takes the shares of the lesion counts of the scans, and "
                              f"{ins.split}/ has no lesion; give them, e.g. lesion_counts.target={{1: 1}}")
    counts = resolve_count_target(asked.counts, n, recorded, 10 ** 6)
    per_sample = np.asarray([_count_of(counts, counts.requested([j])[0]) for j in range(n)])
    sizes = resolve_target(asked.sizes, int(per_sample.sum()), scans.space, tuple(bank.diameters))
    _check_resolution(sizes, scans)
    sampler = None if stage is None or ins.painter == "copy" else (
        request.samplers.image_sampler or request.samplers.sampler or stage.strategy.samplers[0])
    if sampler is not None and sampler not in stage.strategy.samplers:
        raise GenerationError(f"image_sampler={sampler}: {stage.path} samples with {list(stage.strategy.samplers)}")
    return _Insertion(request, stage, scans, bank, sizes.bins, sizes, counts, resolve_path(request.output.out_dir),
                      sampler, window)


def _shape_bank(request: GenerateRequest, stage: Stage | None, scans: Scans, options: dict) -> tuple[ShapeBank, Scans]:
    """The shapes new lesions take (a seg model's, or the lesions of ``insert.shapes_from`` or of the
    scans themselves) and the scans they come from (the scans for a seg model's)."""
    ins, donors = request.insert, scans
    if ins.shapes == "seg":
        seg = load_stage(request.loading.seg_checkpoint, "seg", "seg_checkpoint", **options)
        bank = seg_shapes(seg, scans.space, request.paint.sampling.seed, request.paint.sampling.steps)
    else:
        if ins.shapes_from is not None:
            donors = open_scans(replace(ins, into=ins.shapes_from), stage, scans.space, "insert.shapes_from")
        bank = donors.lesion_bank(pad=ins.margin + 2 if ins.painter == "copy" else 0)
    if not len(bank):
        key = "insert.into" if ins.shapes_from is None else "insert.shapes_from"
        raise DataError(f"{key}={ins.shapes_from or ins.into}: no lesion in {ins.split}/ to take shapes from ("
                        + ("insert.painter=copy moves real lesions; " if ins.painter == "copy" else "")
                        + "insert.shapes_from=<an annotated medgen dataset> takes them from another set"
                        + ("" if ins.painter == "copy" else ", insert.shapes=seg from a seg_checkpoint") + ")")
    return bank, donors


def _check_resolution(sizes: ClassTarget, scans: Scans) -> None:
    """Every class asked holds a lesion of one voxel or more at the scans' voxel size."""
    one = float(feret_diameters(np.ones((1,) * scans.space.dims, dtype=bool), scans.space.mm)[0])
    for b, name in enumerate(sizes.bins.names):
        if sizes.counts[b] and b < len(sizes.bins.edges) and sizes.bins.edges[b] <= one:
            raise GenerationError(f"lesion_sizes.target asks for {name} lesions (< {sizes.bins.edges[b]:g} mm), but one "
                                  f"voxel of the scans ({scans.describe()}) measures {one:.1f} mm across; read them "
                                  "larger (insert.image_size) or ask for none of them")


def _check_painter(painter: str, stage: Stage | None) -> None:
    """The checkpoint suits ``insert.painter``."""
    if stage is None:
        return
    into_scans = bool(getattr(stage.mode, "paints_into_scans", False))
    if painter == "inpaint" and not into_scans:
        raise GenerationError(f"insert.painter=inpaint needs a mode=inpaint checkpoint; image_checkpoint={stage.path} is "
                              f"a {stage.mode.name!r} model: use insert.painter=repaint for it, or train mode=inpaint")
    if painter == "repaint" and into_scans:
        raise GenerationError(f"insert.painter=repaint paints with a mask -> image model (bravo, dual); "
                              f"image_checkpoint={stage.path} is a mode=inpaint model: use insert.painter=inpaint")


def _count_of(counts: ClassTarget, cls: int) -> int:
    """The lesions of count class ``cls``: its smallest count (1, 2, 3 or 4 of ``[1, 2, 3, 4]``)."""
    return 1 if cls == 0 else int(counts.bins.edges[cls - 1])


def _plan(run: _Insertion, j: int) -> Plan:
    """Sample ``j``'s scan and new lesions, from ``(seed, j)`` alone: a scan drawn in proportion to
    its brain's voxels, its lesions placed one by one (largest first); another scan when one does not fit, up to
    :data:`PLACE_TRIES`; a :class:`GenerationError` then."""
    rng = np.random.default_rng(sample_seed(run.request.paint.sampling.seed, j, PLAN_STREAM))
    first = int(sum(_count_of(run.counts, c) for c in run.counts.requested(range(j))))
    classes = [int(c) for c in run.sizes.requested(range(first, first + _count_of(run.counts,
                                                                                   run.counts.requested([j])[0])))]
    margin, spacing = run.request.insert.margin, run.scans.space.mm
    for _ in range(PLACE_TRIES):
        item = int(run.scans.items[rng.choice(len(run.scans.items), p=run.scans.weights)])
        seg, brain = run.scans.masks(item)
        taken, lesions = seg.copy(), []
        for cls in sorted(classes, key=lambda c: -c):
            shape = resize_to_class(run.bank.pick(run.bins, cls, rng, run.scans.patient(item)), run.bins, cls,
                                    spacing, rng, run.bank.diameters)
            placed = None
            if shape is not None:
                region, lesion = region_of(shape.mask, margin)
                placed = place(region, lesion, brain, taken, rng)
            if placed is None or (run.window and window_box(placed, brain.shape, run.window) is None):
                break
            taken[placed.box] |= placed.region
            lesions.append(NewLesion(shape, cls, placed))
        else:
            return Plan(j, item, lesions)
    names = ", ".join(run.bins.names[c] for c in classes)
    raise GenerationError(f"sample {j}: {len(classes)} new lesion(s) ({names}) with their regions (insert.margin="
                          f"{margin}) fit in none of {PLACE_TRIES} scans of {run.scans.describe()} (inside the brain, "
                          "apart from every lesion); ask for fewer or smaller lesions (lesion_counts, lesion_sizes)")


def _paint(run: _Insertion, plans: Sequence[Plan]) -> None:
    """Paint and write the samples ``plans``."""
    images, masks, brains, regions, sources = [], [], [], [], []
    for plan in plans:
        image = run.scans.images(plan.item)
        seg, brain = run.scans.masks(plan.item)
        sources.append((image.copy(), seg.copy()))
        region = np.zeros_like(seg)
        for lesion in plan.lesions:
            seg[lesion.placed.box] |= lesion.placed.lesion
            region[lesion.placed.box] |= lesion.placed.region
        images.append(image), masks.append(seg), brains.append(brain), regions.append(region)
    if run.request.insert.painter == "copy":
        for k, plan in enumerate(plans):
            for lesion in plan.lesions:
                copy_into(images[k], lesion.shape, lesion.placed, run.request.insert.margin)
    else:
        windows = [w for k, plan in enumerate(plans) for w in _windows(run, k, plan, brains[k].shape)]
        paint = run.request.paint
        painted = paint_windows(run.stage, run.request.insert.painter, images, masks, brains, windows,
                                paint.sampling.steps, run.sampler, paint.guidance_scale,
                                paint.sampling.batch_size) if windows else []
        for w, p in zip(windows, painted):
            target = images[w.sample][(slice(None), *w.box)]
            target[:, w.region] = p[:, w.region]
    for k, plan in enumerate(plans):
        images[k] = np.where(regions[k], images[k], sources[k][0])  # nothing outside the regions changes
        _write(run, plan, images[k], masks[k], regions[k], sources[k])


def _windows(run: _Insertion, k: int, plan: Plan, shape: Sequence[int]) -> list[Window]:
    """The windows that paint sample ``plan`` (``k``: its place in the batch): one centred on each
    lesion not yet covered, painting every region that lies wholly inside it; each region once."""
    out, covered = [], [False] * len(plan.lesions)
    seed = sample_seed(run.request.paint.sampling.seed, plan.index, PAINT_STREAM)
    for i, lesion in enumerate(plan.lesions):
        if covered[i]:
            continue
        box = window_box(lesion.placed, shape, run.window)
        region = np.zeros([b.stop - b.start for b in box], dtype=bool)
        for m, other in enumerate(plan.lesions):
            inside = all(b.start <= r.start and r.stop <= b.stop for b, r in zip(box, other.placed.box))
            if not covered[m] and inside:
                covered[m] = True
                local = tuple(slice(r.start - b.start, r.stop - b.start) for b, r in zip(box, other.placed.box))
                region[local] |= other.placed.region
        out.append(Window(k, box, region, sample_seed(seed, i, PAINT_STREAM)))
    return out


def _one_region(placed: Any, shape: Sequence[int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[placed.box] = placed.region
    return out


def _write(run: _Insertion, plan: Plan, image: np.ndarray, seg: np.ndarray, region: np.ndarray,
           source: tuple[np.ndarray, np.ndarray]) -> None:
    """One sample's preview (before | after), then its folder."""
    keys, space = run.scans.keys, run.scans.space
    arrays = {k: image[c].astype(np.float32) for c, k in enumerate(keys)}
    arrays[MASK_KEY], arrays[REGION_KEY] = seg.astype(np.float32), region.astype(np.float32)
    if run.request.insert.keep_source:
        arrays.update({f"source_{k}": source[0][c].astype(np.float32) for c, k in enumerate(keys)})
        arrays[f"source_{MASK_KEY}"] = source[1].astype(np.float32)
    if run.request.output.previews:
        save_png(before_after(source[0][0], source[1], image[0], seg, space), run.out / "previews" / f"{plan.name}.png")
    writer.write_sample(run.split_dir / plan.name, arrays, space.spacing)


def before_after(before: np.ndarray, before_seg: np.ndarray, after: np.ndarray, after_seg: np.ndarray,
                 space: SampleSpace, scale: int = 2) -> np.ndarray:
    """The scan as it was (its lesions outlined) beside the painted one (every lesion outlined); a
    volume's planes through its largest new lesion."""
    draw = writer.drawer(is_lesion(after_seg) & ~is_lesion(before_seg), space, scale)
    return side_by_side([draw(before, before_seg), draw(after, after_seg)], gap=4)


def _row(run: _Insertion, plan: Plan) -> dict[str, Any]:
    """The manifest row of a written sample."""
    stage, paint = run.stage, run.request.paint
    seg, brain = run.scans.masks(plan.item)
    lesions = plan.lesions
    new = np.zeros_like(seg)
    for lesion in lesions:
        new[lesion.placed.box] |= lesion.placed.lesion
    return {"id": plan.name, "split": run.request.output.split, "source": run.scans.source(plan.item),
            "painter": run.request.insert.painter, "image_checkpoint": "" if stage is None else str(stage.path),
            "image_sha256": "" if stage is None else stage.sha256, "sampler": run.sampler or "",
            "steps": "" if run.sampler is None else paint.sampling.steps,
            "seed": sample_seed(paint.sampling.seed, plan.index, PLAN_STREAM),
            "existing_lesions": lesion_labels(seg)[1], "new_lesions": len(lesions),
            "lesion_centres": ";".join(" ".join(map(str, lesion.placed.centre)) for lesion in lesions),
            "lesion_diameters_mm": ";".join(f"{lesion.shape.diameter:.1f}" for lesion in lesions),
            "lesion_bins": ";".join(run.bins.names[lesion.cls] for lesion in lesions),
            "lesion_shapes": ";".join(lesion.shape.source for lesion in lesions),
            "inside_brain": f"{(new & brain).sum() / max(1, new.sum()):.4f}"}


def _finish(run: _Insertion, plans: Sequence[Plan]) -> dict[str, Any]:
    """``lesion_sizes.json`` (the classes asked and painted) and ``contact_sheet.png`` (before | after)."""
    painted_sizes = np.bincount([lesion.cls for p in plans for lesion in p.lesions], minlength=len(run.bins.names))
    painted_counts = np.bincount([run.counts.bins.index(np.asarray([len(p.lesions)]))[0] for p in plans],
                                 minlength=len(run.counts.bins.names))
    report = {"what": "new lesions painted into real scans (insert.into)", "scans": run.scans.describe(),
              "painter": run.request.insert.painter,
              "sizes": {"bins": list(run.bins.names), "requested": run.sizes.counts.tolist(),
                        "painted": painted_sizes.tolist(), "source": run.sizes.source},
              "counts": {"classes": list(run.counts.bins.names), "requested": run.counts.counts.tolist(),
                         "painted": painted_counts.tolist(), "source": run.counts.source}}
    tiles, seams = [], SeamTally()
    for k, plan in enumerate(plans[:SEAM_SAMPLES]):
        folder = run.split_dir / plan.name
        before, seg = run.scans.images(plan.item)[0], run.scans.masks(plan.item)[0]
        after = read_sample(folder, (run.scans.keys[0], REGION_KEY))
        painted, union, region = after[run.scans.keys[0]], is_lesion(after[MASK_KEY]), is_lesion(after[REGION_KEY])
        seams.add(before, painted, region, union & ~seg, [grow(seg, run.request.insert.margin)], seg)
        if k < SHEET_SAMPLES:
            tiles.append(before_after(before, seg, painted, union, run.scans.space))
    report["seam"] = {"samples": min(len(plans), SEAM_SAMPLES), **seams.summary()}
    with atomic_write(run.out / "lesion_sizes.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    if tiles:
        save_png(contact_sheet(tiles, columns=run.scans.space.sheet_columns // 2), run.out / "contact_sheet.png")
    return report


def _settings(run: _Insertion) -> dict[str, Any]:
    """What ``.medgen/settings.json`` records (a restart must keep it)."""
    paint, stage = run.request.paint, run.stage
    return {"insert": run.request.insert.settings(), "image_sha256": None if stage is None else stage.sha256,
            "image_checkpoint": None if stage is None else str(stage.path), "num_images": run.request.masks.num_images,
            "split": paint.split, "seed": paint.sampling.seed, "image_sampler": run.sampler,
            "steps": paint.sampling.steps, "guidance_scale": paint.guidance_scale,
            "use_ema": run.request.loading.use_ema, "precision": run.request.loading.precision,
            "lesion_sizes": run.request.masks.sizes.settings(), "lesion_counts": run.request.masks.counts.settings(),
            "image_keys": list(run.scans.keys), "shape": list(run.scans.space.shape),
            "spacing": list(run.scans.space.mm)}

