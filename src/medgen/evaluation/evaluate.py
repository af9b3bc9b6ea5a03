"""``medgen-evaluate``'s work: load both sets as slices (or volumes), compute every metric, write the report.

Sets (:mod:`medgen.evaluation.sets`). The synthetic set is every slice of ``synthetic_dir`` (all
splits). The real reference is the lesion slices of ``real_dir``'s test split (its val split when
test is empty), at the synthetic set's image size and modalities; downstream models train on the
lesion slices of its train split. Lesion-wise figures use the whole reference split: its lesion
slices and its lesion-free slices that show brain (where false positives are counted). Distribution metrics use
at most ``max_images`` slices of each set (a seeded random subset). Each metric that cannot run
(no feature weights, no paired masks, a set too small for it) is reported as skipped with the
reason; the others still run.

A 3D synthetic set (samples ``[X, Y, Z]`` with ``Z > 1``) is compared as volumes at its shape, with
the same rules (volumes for slices, lesion volumes for lesion slices) and the same code; what
differs is in :mod:`medgen.evaluation.volumetric` (see ``docs/evaluation_3d.md``).

Refused before any work: a synthetic set whose ``medgen-generate`` run is unfinished (unless
``allow_partial``), and a ``seg_net_checkpoint`` trained on other modalities or another size.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from medgen.core import jsonio
from medgen.core.constants import MASK_KEY
from medgen.core.fs import FolderLock, atomic_write
from medgen.data.brain import brain_source, inside_counts
from medgen.data.masks import is_lesion
from medgen.data.space import SampleSpace
from medgen.evaluation import downstream, lesionwise, metrics, volumetric
from medgen.evaluation.downstream import ItemSet
from medgen.evaluation.features import FeatureWeightsError, fid, kid, load_feature_network
from medgen.evaluation.requests import EvaluationRequest, FeatureRequest, LesionRequest, evaluation_request
from medgen.evaluation.sets import Sets, as_slice_set
from medgen.generation.records import ItemSource, parse_mask_source

log = logging.getLogger("medgen.evaluate")

#: below this fraction of synthetic lesion pixels inside the brain of their image, the report warns
MIN_INSIDE_BRAIN = 0.99


# ============================================================================ metrics
def _skip(reason: str, level: int = logging.WARNING) -> dict[str, str]:
    log.log(level, "skipped: %s", reason)
    return {"skipped": reason}


def _too_small(what: str, sizes: dict[str, int], minimum: int = 2, unit: str = "slice") -> str | None:
    """The reason ``what`` cannot be computed when a set has fewer than ``minimum`` items, else None."""
    small = [f"{name} {n}" for name, n in sizes.items() if n < minimum]
    return f"{what} needs at least {minimum} {unit}s per set ({', '.join(small)})" if small else None


def distribution_metrics(sets: Sets, request: EvaluationRequest) -> dict:
    """Mask statistics, brain intensities and diversity of both samples (``items``: how many
    slices, or volumes, each holds)."""
    syn, real, space = sets.sample("synthetic"), sets.sample("real"), sets.space
    masks = metrics.compare_masks(real.masks, syn.masks, space.with_spacing(sets.spacing("real")),
                                  space.with_spacing(sets.spacing("synthetic")))
    out: dict[str, Any] = {"items": {"synthetic": len(syn), "real": len(real)}, "masks": masks, "intensity": {},
                           "diversity": {}}
    too_small = _too_small("MS-SSIM between random pairs", {"synthetic": len(syn), "real": len(real)}, unit=space.unit)
    pairs, seed = request.diversity_pairs, request.seed
    for c, key in enumerate(sets.image_keys):
        out["intensity"][key] = metrics.compare_intensities(real.images[:, c], syn.images[:, c],
                                                            request.brain_intensity)
        out["diversity"][key] = {"synthetic_ms_ssim": metrics.pairwise_ms_ssim(syn.images[:, c], space, pairs, seed),
                                 "real_ms_ssim": metrics.pairwise_ms_ssim(real.images[:, c], space, pairs, seed)}
        if too_small:
            out["diversity"][key]["skipped"] = too_small
    if too_small:
        log.warning("skipped: %s", too_small)
    return out


def anatomy_metrics(sets: Sets, request: EvaluationRequest) -> dict:
    """Where the lesions lie: the fraction of lesion pixels (voxels) inside the brain of their own
    image (:mod:`medgen.data.brain`; a volume's axial slice by axial slice), synthetic and real; a
    warning below :data:`MIN_INSIDE_BRAIN`."""
    source = brain_source(sets.image_keys, request.brain_from)
    c = sets.image_keys.index(source)
    out: dict[str, Any] = {"brain_from": source, "inside_brain": {}, "lesion_pixels": {}}
    for name in ("synthetic", "real"):
        s = sets.sample(name)
        inside, total = inside_counts(s.masks, volumetric.item_brains(s.images[:, c], sets.space))
        out["inside_brain"][name] = inside / total if total else None
        out["lesion_pixels"][name] = total
    syn = out["inside_brain"]["synthetic"]
    if syn is not None and syn < MIN_INSIDE_BRAIN:
        real = out["inside_brain"]["real"] or 1
        sets.warn(f"{100 * (1 - syn):.1f}% of the synthetic lesion {sets.space.element}s lie outside the brain of their image "
                  f"(real {sets.reference_split}: {100 * (1 - real):.1f}%); generate with a seg model that draws the "
                  "brain (mode.image_keys=[seg,brain]) and gate.inside_brain=true")
    return out


def paired_metrics(sets: Sets) -> dict:
    """For sets made with ``masks_from``: synthetic vs the real images of the same masks (slices, or
    the volumes of the same patients)."""
    manifest = sets.synthetic_root / "manifest.csv"
    if not manifest.is_file():
        return _skip(f"paired PSNR/SSIM: no manifest.csv in {sets.synthetic_root} (a medgen-generate set has one)",
                     logging.INFO)
    with open(manifest) as f:
        rows = {r["id"]: r for r in csv.DictReader(f) if r["id"]}
    by_slice = {(sets.test.patient_ids[p], int(z)): i for i, (p, z) in
                enumerate(zip(sets.test.patient_index, sets.test.slice_index))}
    syn_idx, real_idx = [], []
    for i, sid in enumerate(sets.synthetic_ids):
        source = parse_mask_source(rows.get(sid, {}).get("mask_source", ""))
        if isinstance(source, ItemSource) and source.split == sets.reference_split:
            j = by_slice.get((source.patient, 0 if source.z is None else source.z))
            if j is not None:
                syn_idx.append(i)
                real_idx.append(j)
    if not syn_idx:
        return _skip(f"paired PSNR/SSIM: no synthetic sample was conditioned on a mask of the real "
                     f"{sets.reference_split} split (a set made with masks_from=<real_dir> masks_split=test has them)",
                     logging.INFO)
    syn = np.asarray(sets.synthetic.data[np.asarray(syn_idx)], np.float32)
    real = np.asarray(sets.test.data[np.asarray(real_idx)], np.float32)
    return {key: metrics.paired_fidelity(real[:, c], syn[:, c], sets.space) for c, key in enumerate(sets.image_keys)}


def _distances(fs: np.ndarray, fr: np.ndarray, fv: np.ndarray | None, f: FeatureRequest, seed: int) -> dict:
    """FID/KID of features ``fs`` (synthetic) against ``fr`` (real), and of ``fv`` (real val) as the floor."""
    kid_mean, kid_std = kid(fs, fr, f.kid_subsets, f.kid_subset_size, seed)
    entry = {"fid": fid(fs, fr), "kid_mean": kid_mean, "kid_std": kid_std, "n_real": len(fr), "n_synthetic": len(fs)}
    if fv is not None:
        entry["fid_real_val_vs_test"] = fid(fv, fr)
        entry["kid_real_val_vs_test"] = kid(fv, fr, f.kid_subsets, f.kid_subset_size, seed)[0]
        entry["n_real_val"] = len(fv)
    return entry


def feature_metrics(sets: Sets, request: EvaluationRequest, device: torch.device) -> dict:
    """FID/KID of synthetic vs real test, and real val vs real test as the floor. In 3D the 2.5D
    figures: FID/KID of the slices of each plane (:func:`~medgen.evaluation.volumetric.plane_slices`)
    and their mean over the planes (``fid_2.5d``, ...)."""
    f, space = request.features, sets.space
    too_small = _too_small("FID/KID", {"synthetic": len(sets.sample("synthetic")), "real": len(sets.sample("real"))},
                           unit=space.unit)
    if too_small:
        return _skip(too_small)
    try:
        net = load_feature_network(f.network, device, f.batch_size, f.weights_path)
    except FeatureWeightsError as exc:
        return _skip(str(exc))
    out: dict[str, Any] = {"network": net.name}
    out.update(space.either({}, {"slices_per_plane": f.slices_per_plane, "plane_fraction": f.plane_fraction}))
    val = sets.sample("val")
    names = ("real", "synthetic") + (("val",) if val is not None and len(val) >= 2 else ())
    held = "no val reference" if val is None else f"{len(val)} val {space.unit}(s)"
    no_floor = None if "val" in names else \
        f"the floor (FID/KID of real val vs real test): {held} in {sets.real_root}, and it needs at least 2"

    def features(name: str, c: int) -> dict[str, np.ndarray]:
        images = sets.sample(name).images[:, c]
        if not space.volumetric:
            return {"": net.extract(torch.from_numpy(images[:, None]))}
        planes = volumetric.plane_slices(images, sets.spacing(name), f.slices_per_plane, f.plane_fraction)
        return {plane: net.extract(x) for plane, x in planes.items()}

    for c, key in enumerate(sets.image_keys):
        fr, fs, fv = (features(name, c) if name in names else None for name in ("real", "synthetic", "val"))
        per_plane = {p: _distances(fs[p], fr[p], None if fv is None else fv[p], f, request.seed) for p in fr}
        out[key] = per_plane[""] if not space.volumetric else volumetric.mean_over_planes(per_plane)
        if no_floor:
            out[key]["floor"] = {"skipped": no_floor}
    if no_floor:
        log.warning("skipped: %s", no_floor)
    return out


def segmentation_metrics(sets: Sets, request: EvaluationRequest, out_dir: Path, device: torch.device,
                         progress: bool) -> dict:
    """Conditioning adherence and the downstream experiment."""
    b, space, seeds = request.budget, sets.space, list(request.seeds)
    test, syn = as_slice_set(sets.test), as_slice_set(sets.synthetic)
    train = as_slice_set(sets.train) if sets.train is not None and len(sets.train) else None
    out: dict[str, Any] = {}
    adherence_net = sets.segmenter.to(device) if sets.segmenter is not None else None
    if request.downstream:
        if train is None:
            return {"downstream": _skip(f"no real train lesion {space.unit}s in {sets.real_root / 'train'}")}
        kept: dict[str, Any] = {}

        def keep_first_real(name: str, seed: int, net) -> None:
            if name == "real" and seed == seeds[0]:
                kept["net"] = net
                downstream.save_segmenter(net, out_dir / "seg_net.pt", sets.image_keys, space)

        lesion_test = whole_test_split(sets, test, request.lesions)
        nnunet = _nnunet_segmenter(sets, request, out_dir, device)
        out["downstream"] = downstream.downstream(train, syn, test, space, seeds=seeds, budget=b, device=device,
                                                  progress=progress, on_network=keep_first_real, lesions=lesion_test,
                                                  segment=nnunet)
        out["downstream"]["budget"] = request.budget_record() if nnunet is None else nnunet.budget()
        out["downstream"]["segmenter"] = {"name": "dynunet"} if nnunet is None else nnunet.record()
        out["lesions"] = _lesion_figures(out["downstream"], lesion_test, len(test), space, request.lesions,
                                         sets.warnings)
        adherence_net = adherence_net or kept.get("net")
    if adherence_net is None and train is not None:  # no downstream DynUNet to reuse
        adherence_net = downstream.train_segmenter(train, b, space, seed=seeds[0], device=device, desc="real seed",
                                                   progress=progress)
        downstream.save_segmenter(adherence_net, out_dir / "seg_net.pt", sets.image_keys, space)
    out["adherence"] = downstream.adherence(adherence_net, syn, test, space, device) if adherence_net is not None \
        else _skip("no real train slices to train the segmentation network on, and no seg_net_checkpoint")
    return out


def _nnunet_segmenter(sets: Sets, request: EvaluationRequest, out_dir: Path, device: torch.device):
    """The nnU-Net backend of the downstream experiment with ``segmenter=nnunet`` (folders under
    ``out_dir/nnunet``), else None (medgen's DynUNet)."""
    if request.segmenter != "nnunet":
        return None
    from medgen.evaluation.nnunet import NnunetSegmenter

    return NnunetSegmenter(request.nnunet, out_dir / "nnunet", sets.space, sets.image_keys, device.type)


def whole_test_split(sets: Sets, lesion_items: ItemSet, lesions: LesionRequest) -> lesionwise.LesionTest:
    """The whole reference split: its lesion slices, then its lesion-free brain slices (3D: its
    lesion volumes, then its lesion-free volumes; lesions are 26-connected, sized with 3 axes)."""
    brain = as_slice_set(sets.test_brain) if sets.test_brain is not None and len(sets.test_brain) else None
    free = brain.masks.reshape(len(brain), -1).max(1) == 0 if brain is not None else None
    whole = ItemSet.concat(lesion_items, ItemSet(brain.images[free], brain.masks[free])) \
        if brain is not None and free.any() else lesion_items
    if sets.space.spacing is None:
        log.warning("the real slice cache records no voxel spacing: lesion diameters assume 1 mm pixels")
    return lesionwise.LesionTest(whole.images, whole.masks, sets.space.mm, lesions.bins, lesions.resamples,
                                 voxel_mm3=float(np.prod(sets.space.spacing)) if sets.space.spacing is not None
                                 else None)  # slices: pixel area x thickness


def _lesion_figures(results: dict, test: lesionwise.LesionTest, lesion_items: int, space: SampleSpace,
                    lesions: LesionRequest, warnings: list[str]) -> dict:
    """``metrics.json``'s ``lesions``: the test split's lesions per bin, each training set's
    lesion-wise figures (moved out of ``results``), and whether the real-trained yardstick can judge.
    In 3D the ``*_slices`` counts are volumes (``unit``)."""
    out: dict[str, Any] = {"unit": space.unit,
        "bins": list(test.bins.names), "edges_mm": list(test.bins.edges), "spacing_mm": list(test.spacing),
        "test_items": len(test.masks), "lesion_items": lesion_items,
        "lesion_free_items": len(test.masks) - lesion_items,
        "test_lesions": dict(zip(test.bins.names, test.lesion_counts().tolist())),
        "sets": {name: results[name].pop("lesions") for name in downstream.SETS}}
    if out["lesion_free_items"] == 0:
        out["notes"] = [f"the real reference split has no lesion-free brain {out['unit']}: false positives are "
                        f"counted on lesion {out['unit']}s only"]
    out["yardstick"] = lesionwise.yardstick(out["sets"]["real"], lesions.min_sensitivity, lesions.min_dice)
    if "warning" in out["yardstick"]:
        warnings.append(out["yardstick"]["warning"])
        log.warning("%s", out["yardstick"]["warning"])
    for name in downstream.SETS:
        m = out["sets"][name]["mean"]["all"]
        sensitivity, dice, fp = (f"{v:.3f}" if v is not None else "-" for v in (m["sensitivity"], m["dice"],
                                                                                 m["false_positives_per_item"]))
        log.info("lesion-wise %-15s sensitivity %s, lesion Dice %s, false positives per %s %s", name, sensitivity,
                 dice, out["unit"], fp)
    return out


# ============================================================================ entry point
def evaluate(cfg: DictConfig, device: torch.device | None = None, progress: bool = True) -> dict:
    """Every metric for ``cfg`` (a validated evaluate config, read once into an
    :class:`~medgen.evaluation.requests.EvaluationRequest`); writes ``metrics.json`` and the report
    into ``out_dir`` and returns the metrics."""
    from medgen.core.distributed import default_device

    request = evaluation_request(cfg)
    device = device or (torch.device(request.device) if request.device else default_device())
    out_dir = request.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # a second evaluation into the same folder stops at once, naming the first
    with FolderLock(out_dir, "evaluation folder", ".medgen/lock"):
        return _evaluate(request, out_dir, device, progress)


def _evaluate(request: EvaluationRequest, out_dir: Path, device: torch.device, progress: bool) -> dict:
    from medgen.evaluation.report import write_report

    t0 = time.perf_counter()
    if request.downstream and request.segmenter == "nnunet":
        from medgen.evaluation.nnunet import find_python

        find_python(request.nnunet.python)  # a missing nnU-Net stops the evaluation now, not after the other metrics
    sets = Sets(request.sets, progress)
    if not is_lesion(sets.synthetic.data[:, sets.synthetic.keys.index(MASK_KEY)]).any():
        sets.warnings.append("the synthetic set has no lesion at all (every mask is empty): conditioning adherence "
                             "can only count false positives, and the downstream gain says nothing about lesions")
    for warning in sets.warnings:
        log.warning("%s", warning)
    space = sets.space
    result: dict[str, Any] = {
        "real_dir": str(sets.real_root), "synthetic_dir": str(sets.synthetic_root), "out_dir": str(out_dir),
        "space": space.state_dict(), "unit": space.unit,
        **space.either({}, {"spacing_mm": {name: list(sets.spacing(name)) for name in ("real", "synthetic")}}),
        "modalities": sets.image_keys, "reference_split": sets.reference_split, "seed": request.seed}
    result["distribution"] = distribution_metrics(sets, request)
    result["anatomy"] = anatomy_metrics(sets, request)
    result["paired"] = paired_metrics(sets)
    result["features"] = feature_metrics(sets, request, device)
    result.update(segmentation_metrics(sets, request, out_dir, device, progress))
    result["warnings"] = sets.warnings
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_write(out_dir / "metrics.json") as tmp:
        tmp.write_text(jsonio.dumps(result, indent=1))
    write_report(out_dir, result, sets)
    return result


