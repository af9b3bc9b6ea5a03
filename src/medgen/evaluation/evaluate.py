"""``medgen-evaluate``'s work: load both sets as slices, compute every metric, write the report.

Sets. The synthetic set is every slice of ``synthetic_dir`` (all splits). The real reference is
the lesion slices of ``real_dir``'s test split (its val split when test is empty), at the
synthetic set's image size and modalities; downstream models train on the lesion slices of its
train split. Lesion-wise figures use the whole reference split: its lesion slices and its
lesion-free slices that show brain (where false positives are counted). Distribution metrics use
at most ``max_images`` slices of each set (a seeded random subset). Each metric that cannot run
(no feature weights, no paired masks, a set too small for it) is reported as skipped with the
reason; the others still run.

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
from omegaconf import DictConfig, OmegaConf

from medgen.core import jsonio
from medgen.core.constants import MASK_KEY, SPLITS
from medgen.core.fs import FolderLock, atomic_write
from medgen.core.paths import resolve_path
from medgen.data.brain import brain_mask, brain_source, inside_counts
from medgen.data.masks import is_lesion
from medgen.data.nifti_dataset import list_patients, modality_path, present_modalities
from medgen.data.slices import SliceCache, SliceSpec, open_or_build_cache
from medgen.data.splits import split_patients
from medgen.evaluation import EvaluationError, downstream, lesionwise, metrics
from medgen.evaluation.config import size_bins
from medgen.evaluation.downstream import SliceSet
from medgen.evaluation.features import FeatureWeightsError, fid, kid, load_feature_network
from medgen.generation.records import SliceSource, parse_mask_source
from medgen.generation.status import incomplete_message, read_status

log = logging.getLogger("medgen.evaluate")

#: below this fraction of synthetic lesion pixels inside the brain of their image, the report warns
MIN_INSIDE_BRAIN = 0.99


# ============================================================================ the sets
def _slice_size(patient: Path, key: str) -> int:
    import nibabel as nib

    shape = nib.load(str(modality_path(patient, key))).shape
    return int(max(shape[:2]))


def as_slice_set(cache: SliceCache, indices: np.ndarray | None = None) -> SliceSet:
    data = np.asarray(cache.data if indices is None else cache.data[np.sort(indices)], dtype=np.float32)
    seg = cache.keys.index(MASK_KEY)
    images = data[:, [i for i, k in enumerate(cache.keys) if k != MASK_KEY]]
    return SliceSet(np.ascontiguousarray(images), is_lesion(data[:, seg]).astype(np.uint8))


def _subset(n: int, cap: int, seed: int) -> np.ndarray:
    idx = np.arange(n)
    return idx if n <= cap else np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


class Sets:
    """Both datasets as slice caches at one size and with one set of modalities."""

    def __init__(self, cfg: DictConfig, progress: bool = True):
        self.real_root, self.synthetic_root = resolve_path(cfg.real_dir), resolve_path(cfg.synthetic_dir)
        for key, root in (("real_dir", self.real_root), ("synthetic_dir", self.synthetic_root)):
            if not root.is_dir():
                raise EvaluationError(f"{key}={root}: no such folder")
        syn_patients = [p for s in SPLITS for p in list_patients(self.synthetic_root / s)]
        #: what the report should say before any number (an unfinished set, a set without lesions)
        self.warnings: list[str] = []
        status = read_status(self.synthetic_root)
        if status is not None and not status.complete:
            if not cfg.allow_partial:
                raise EvaluationError(f"synthetic_dir: {incomplete_message(self.synthetic_root, status, len(syn_patients))}")
            self.warnings.append(f"the synthetic set is an unfinished generation ({len(syn_patients)} samples done"
                                 + (f" of {status.expected}" if status.expected is not None else "")
                                 + "), evaluated as it is (allow_partial=true)")
        if not syn_patients:
            raise EvaluationError(f"synthetic_dir={self.synthetic_root}: empty set (no sample folders in "
                                  f"{', '.join(s + '/' for s in SPLITS)})")
        keys = present_modalities(syn_patients)
        if MASK_KEY not in keys or len(keys) < 2:
            raise EvaluationError(f"synthetic_dir={self.synthetic_root}: its samples hold {keys}; a paired set needs "
                                  f"seg and at least one image modality")
        self.image_keys = [k for k in keys if k != MASK_KEY]
        size = _slice_size(syn_patients[0], MASK_KEY)
        if cfg.image_size is not None and cfg.image_size != size:
            raise EvaluationError(f"image_size={cfg.image_size} but the synthetic slices in {self.synthetic_root} are "
                                  f"{size} px; the sets are compared at the synthetic set's size")
        self.image_size = size
        test_split = "test" if split_patients(self.real_root, "test") else "val"
        self.reference_split = test_split
        real = {s: split_patients(self.real_root, s, cfg.val_fraction) for s in ("train", "val", "test")}
        if not real[test_split]:
            raise EvaluationError(f"real_dir={self.real_root}: empty set (no patients in test/ or val/)")
        missing = [k for k in keys if k not in present_modalities(real[test_split])]
        if missing:
            raise EvaluationError(f"the synthetic set has {keys} but the real set ({self.real_root}) lacks {missing}")
        #: the real-trained segmenter of ``seg_net_checkpoint`` (on the CPU), checked before any work
        self.segmenter = downstream.load_segmenter(cfg.seg_net_checkpoint, self.image_keys, size, torch.device("cpu")) \
            if cfg.seg_net_checkpoint else None
        cache_dir = resolve_path(cfg.cache_dir)
        spec = SliceSpec(keys=tuple(self.image_keys) + (MASK_KEY,), image_size=size, selection="lesion")
        all_spec = SliceSpec(keys=spec.keys, image_size=size, selection="all")
        brain_spec = SliceSpec(keys=spec.keys, image_size=size, selection="brain", brain_intensity=cfg.brain_intensity)

        def cache(patients, selection_spec, desc):
            return open_or_build_cache(patients, selection_spec, cache_dir, progress=progress, desc=desc,
                                       workers=cfg.num_workers) if patients else None

        self.synthetic = cache(syn_patients, all_spec, "synthetic slices")
        self.synthetic_ids = [self.synthetic.patient_ids[i] for i in self.synthetic.patient_index]
        self.test = cache(real[test_split], spec, f"real {test_split} lesion slices")
        self.train = cache(real["train"], spec, "real train lesion slices")
        self.val = cache(real["val"], spec, "real val lesion slices") if test_split == "test" else None
        #: the reference split's brain slices, of which the lesion-free ones join the lesion-wise test
        self.test_brain = cache(real[test_split], brain_spec, f"real {test_split} brain slices") \
            if cfg.downstream else None
        for name, c in (("synthetic", self.synthetic), (f"real {test_split}", self.test)):
            if c is None or len(c) == 0:
                raise EvaluationError(f"the {name} set has no slices with a lesion to compare")
        self._cap, self._seed = cfg.max_images, cfg.seed
        self._samples: dict[str, SliceSet | None] = {}

    def warn(self, text: str) -> None:
        """A warning for the report, logged now."""
        log.warning("%s", text)
        self.warnings.append(text)

    def sample(self, name: str) -> SliceSet | None:
        """At most ``max_images`` slices of ``synthetic``, ``real`` (the reference split) or ``val``
        (None without a val reference): a seeded random subset, read once for every metric."""
        if name not in self._samples:
            cache, offset = {"synthetic": (self.synthetic, 0), "real": (self.test, 1), "val": (self.val, 2)}[name]
            self._samples[name] = None if cache is None else \
                as_slice_set(cache, _subset(len(cache), self._cap, self._seed + offset))
        return self._samples[name]


# ============================================================================ metrics
def _skip(reason: str, level: int = logging.WARNING) -> dict[str, str]:
    log.log(level, "skipped: %s", reason)
    return {"skipped": reason}


def _too_small(what: str, sizes: dict[str, int], minimum: int = 2) -> str | None:
    """The reason ``what`` cannot be computed when a set has fewer than ``minimum`` slices, else None."""
    small = [f"{name} {n}" for name, n in sizes.items() if n < minimum]
    return f"{what} needs at least {minimum} slices per set ({', '.join(small)})" if small else None


def distribution_metrics(sets: Sets, cfg: DictConfig) -> dict:
    syn, real = sets.sample("synthetic"), sets.sample("real")
    out: dict[str, Any] = {"slices": {"synthetic": len(syn), "real": len(real)},
                           "masks": metrics.compare_masks(real.masks, syn.masks), "intensity": {}, "diversity": {}}
    too_small = _too_small("MS-SSIM between random pairs", {"synthetic": len(syn), "real": len(real)})
    for c, key in enumerate(sets.image_keys):
        out["intensity"][key] = metrics.compare_intensities(real.images[:, c], syn.images[:, c], cfg.brain_intensity)
        out["diversity"][key] = {"synthetic_ms_ssim": metrics.pairwise_ms_ssim(syn.images[:, c], cfg.diversity_pairs, cfg.seed),
                                 "real_ms_ssim": metrics.pairwise_ms_ssim(real.images[:, c], cfg.diversity_pairs, cfg.seed)}
        if too_small:
            out["diversity"][key]["skipped"] = too_small
    if too_small:
        log.warning("skipped: %s", too_small)
    return out


def anatomy_metrics(sets: Sets, cfg: DictConfig) -> dict:
    """Where the lesions lie: the fraction of lesion pixels inside the brain of their own image
    (:mod:`medgen.data.brain`), synthetic and real; a warning below :data:`MIN_INSIDE_BRAIN`."""
    source = brain_source(sets.image_keys, cfg.brain_from)
    c = sets.image_keys.index(source)
    out: dict[str, Any] = {"brain_from": source, "inside_brain": {}, "lesion_pixels": {}}
    for name in ("synthetic", "real"):
        s = sets.sample(name)
        inside, total = inside_counts(s.masks, brain_mask(s.images[:, c]))
        out["inside_brain"][name] = inside / total if total else None
        out["lesion_pixels"][name] = total
    syn = out["inside_brain"]["synthetic"]
    if syn is not None and syn < MIN_INSIDE_BRAIN:
        real = out["inside_brain"]["real"] or 1
        sets.warn(f"{100 * (1 - syn):.1f}% of the synthetic lesion pixels lie outside the brain of their image "
                  f"(real {sets.reference_split}: {100 * (1 - real):.1f}%); generate with a seg model that draws the "
                  "brain (mode.image_keys=[seg,brain]) and gate.inside_brain=true")
    return out


def paired_metrics(sets: Sets) -> dict:
    """For sets made with ``masks_from``: synthetic vs the real images of the same masks."""
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
        if isinstance(source, SliceSource) and source.split == sets.reference_split:
            j = by_slice.get((source.patient, source.z))
            if j is not None:
                syn_idx.append(i)
                real_idx.append(j)
    if not syn_idx:
        return _skip(f"paired PSNR/SSIM: no synthetic sample was conditioned on a mask of the real "
                     f"{sets.reference_split} split (a set made with masks_from=<real_dir> masks_split=test has them)",
                     logging.INFO)
    syn = np.asarray(sets.synthetic.data[np.asarray(syn_idx)], np.float32)
    real = np.asarray(sets.test.data[np.asarray(real_idx)], np.float32)
    return {key: metrics.paired_fidelity(real[:, c], syn[:, c]) for c, key in enumerate(sets.image_keys)}


def feature_metrics(sets: Sets, cfg: DictConfig, device: torch.device) -> dict:
    """FID/KID of synthetic vs real test, and real val vs real test as the floor."""
    f = cfg.features
    too_small = _too_small("FID/KID", {"synthetic": len(sets.sample("synthetic")), "real": len(sets.sample("real"))})
    if too_small:
        return _skip(too_small)
    try:
        net = load_feature_network(f.network, device, f.batch_size, f.weights_path)
    except FeatureWeightsError as exc:
        return _skip(str(exc))
    out: dict[str, Any] = {"network": net.name}
    real, syn, val = sets.sample("real"), sets.sample("synthetic"), sets.sample("val")
    val = val if val is not None and len(val) >= 2 else None
    for c, key in enumerate(sets.image_keys):
        fr, fs = net.extract(torch.from_numpy(real.images[:, c:c + 1])), net.extract(torch.from_numpy(syn.images[:, c:c + 1]))
        kid_mean, kid_std = kid(fs, fr, f.kid_subsets, f.kid_subset_size, cfg.seed)
        entry = {"fid": fid(fs, fr), "kid_mean": kid_mean, "kid_std": kid_std, "n_real": len(fr), "n_synthetic": len(fs)}
        if val is not None:
            fv = net.extract(torch.from_numpy(val.images[:, c:c + 1]))
            entry["fid_real_val_vs_test"] = fid(fv, fr)
            entry["kid_real_val_vs_test"] = kid(fv, fr, f.kid_subsets, f.kid_subset_size, cfg.seed)[0]
            entry["n_real_val"] = len(fv)
        out[key] = entry
    return out


def segmentation_metrics(sets: Sets, cfg: DictConfig, out_dir: Path, device: torch.device, progress: bool) -> dict:
    """Conditioning adherence and the downstream experiment."""
    b = cfg.budget
    test, syn = as_slice_set(sets.test), as_slice_set(sets.synthetic)
    train = as_slice_set(sets.train) if sets.train is not None and len(sets.train) else None
    out: dict[str, Any] = {}
    adherence_net = sets.segmenter.to(device) if sets.segmenter is not None else None
    if cfg.downstream:
        if train is None:
            return {"downstream": _skip(f"no real train lesion slices in {sets.real_root / 'train'}")}
        kept: dict[str, Any] = {}

        def keep_first_real(name: str, seed: int, net) -> None:
            if name == "real" and seed == cfg.seeds[0]:
                kept["net"] = net
                downstream.save_segmenter(net, out_dir / "seg_net.pt", sets.image_keys, sets.image_size)

        lesion_test = whole_test_split(sets, test, cfg)
        out["downstream"] = downstream.downstream(
            train, syn, test, seeds=list(cfg.seeds), steps=b.steps, batch_size=b.batch_size,
            learning_rate=b.learning_rate, device=device, progress=progress, on_network=keep_first_real,
            lesions=lesion_test)
        out["downstream"]["budget"] = OmegaConf.to_container(b)
        out["lesions"] = _lesion_figures(out["downstream"], lesion_test, len(test), cfg, sets.warnings)
        adherence_net = adherence_net or kept.get("net")
    elif adherence_net is None and train is not None:
        adherence_net = downstream.train_segmenter(train, steps=b.steps, batch_size=b.batch_size,
                                                   learning_rate=b.learning_rate, seed=cfg.seeds[0], device=device,
                                                   desc="real seed", progress=progress)
        downstream.save_segmenter(adherence_net, out_dir / "seg_net.pt", sets.image_keys, sets.image_size)
    out["adherence"] = downstream.adherence(adherence_net, syn, test, device) if adherence_net is not None else \
        _skip("no real train slices to train the segmentation network on, and no seg_net_checkpoint")
    return out


def whole_test_split(sets: Sets, lesion_slices: SliceSet, cfg: DictConfig) -> lesionwise.LesionTest:
    """The whole reference split: its lesion slices, then its lesion-free brain slices."""
    brain = as_slice_set(sets.test_brain) if sets.test_brain is not None and len(sets.test_brain) else None
    free = brain.masks.reshape(len(brain), -1).max(1) == 0 if brain is not None else None
    whole = SliceSet.concat(lesion_slices, SliceSet(brain.images[free], brain.masks[free])) \
        if brain is not None and free.any() else lesion_slices
    spacing = sets.test.spacing
    if spacing is None:
        log.warning("the real slice cache records no voxel spacing: lesion diameters assume 1 mm pixels")
    return lesionwise.LesionTest(whole.images, whole.masks, tuple(spacing[:2]) if spacing else (1.0, 1.0),
                                 size_bins(cfg.lesions.bins), cfg.lesions.resamples)


def _lesion_figures(results: dict, test: lesionwise.LesionTest, lesion_slices: int, cfg: DictConfig,
                    warnings: list[str]) -> dict:
    """``metrics.json``'s ``lesions``: the test split's lesions per bin, each training set's
    lesion-wise figures (moved out of ``results``), and whether the real-trained yardstick can judge."""
    out: dict[str, Any] = {
        "bins": list(test.bins.names), "edges_mm": list(test.bins.edges), "spacing_mm": list(test.spacing),
        "test_slices": len(test.masks), "lesion_slices": lesion_slices,
        "lesion_free_slices": len(test.masks) - lesion_slices,
        "test_lesions": dict(zip(test.bins.names, test.lesion_counts().tolist())),
        "sets": {name: results[name].pop("lesions") for name in downstream.SETS}}
    if out["lesion_free_slices"] == 0:
        out["notes"] = ["the real reference split has no lesion-free brain slice: false positives are counted on "
                        "lesion slices only"]
    out["yardstick"] = lesionwise.yardstick(out["sets"]["real"], cfg.lesions.min_sensitivity, cfg.lesions.min_dice)
    if "warning" in out["yardstick"]:
        warnings.append(out["yardstick"]["warning"])
        log.warning("%s", out["yardstick"]["warning"])
    for name in downstream.SETS:
        m = out["sets"][name]["mean"]["all"]
        log.info("lesion-wise %-15s sensitivity %s, lesion Dice %s, false positives per slice %s", name,
                 *(f"{v:.3f}" if v is not None else "-" for v in (m["sensitivity"], m["dice"],
                                                                  m["false_positives_per_slice"])))
    return out


# ============================================================================ entry point
def evaluate(cfg: DictConfig, device: torch.device | None = None, progress: bool = True) -> dict:
    """Every metric for ``cfg`` (a validated evaluate config); writes ``metrics.json`` and the
    report into ``out_dir`` and returns the metrics."""
    from medgen.core.distributed import default_device

    device = device or (torch.device(cfg.device) if cfg.device else default_device())
    out_dir = resolve_path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a second evaluation into the same folder stops at once, naming the first
    with FolderLock(out_dir, "evaluation folder", ".medgen/lock"):
        return _evaluate(cfg, out_dir, device, progress)


def _evaluate(cfg: DictConfig, out_dir: Path, device: torch.device, progress: bool) -> dict:
    from medgen.evaluation.report import write_report

    t0 = time.perf_counter()
    sets = Sets(cfg, progress)
    if not is_lesion(sets.synthetic.data[:, sets.synthetic.keys.index(MASK_KEY)]).any():
        sets.warnings.append("the synthetic set has no lesion at all (every mask is empty): conditioning adherence "
                             "can only count false positives, and the downstream gain says nothing about lesions")
    for warning in sets.warnings:
        log.warning("%s", warning)
    result: dict[str, Any] = {
        "real_dir": str(sets.real_root), "synthetic_dir": str(sets.synthetic_root), "out_dir": str(out_dir),
        "image_size": sets.image_size,
        "modalities": sets.image_keys, "reference_split": sets.reference_split, "seed": cfg.seed}
    result["distribution"] = distribution_metrics(sets, cfg)
    result["anatomy"] = anatomy_metrics(sets, cfg)
    result["paired"] = paired_metrics(sets)
    result["features"] = feature_metrics(sets, cfg, device)
    result.update(segmentation_metrics(sets, cfg, out_dir, device, progress))
    result["warnings"] = sets.warnings
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_write(out_dir / "metrics.json") as tmp:
        tmp.write_text(jsonio.dumps(result, indent=1))
    write_report(out_dir, result, sets)
    return result

