"""Targeted augmentation: do synthetic lesions of chosen sizes help a segmenter find real lesions of
those sizes?

The experiment (``medgen-augment``) takes one synthetic set per size target, all made by the same
two checkpoints (e.g. ``real``: the classes of the seg model's training slices; ``small``: tiny
and small lesions oversampled), and trains the downstream segmenter of ``medgen-evaluate`` (same
network, budget and seeds, :mod:`medgen.evaluation.downstream`) on the real train lesion slices
alone and on real + each synthetic set. Sets of volumes are used whole, as ``medgen-evaluate`` uses
them: the 3D segmenter, 3D lesions, figures per volume. Every network is scored lesion by lesion on the whole real
reference split (its lesion slices and lesion-free brain slices, :mod:`medgen.evaluation.lesionwise`):
sensitivity, lesion Dice and false positives per size bin, mean ± std over seeds. A set made by
insertion (real train scans with new lesions painted in) is used like any other; what each set adds
per bin, who wins in which bin and insertion against copy-paste come from :mod:`medgen.evaluation.arms`.

Written to ``out_dir``: ``augmentation.json`` (every figure, per seed too), ``augmentation.md`` /
``augmentation.html`` (the table, the lesions of each synthetic set per bin, the figure) and
``augmentation.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.core import jsonio
from medgen.core.constants import MASK_KEY, SPLITS
from medgen.core.fs import atomic_write
from medgen.data.lesions import feret_diameters
from medgen.data.nifti_dataset import list_patients, present_modalities
from medgen.data.space import SampleSpace
from medgen.evaluation import EvaluationError, arms, downstream, lesionwise, volumetric
from medgen.evaluation.downstream import ItemSet
from medgen.evaluation.evaluate import whole_test_split
from medgen.evaluation.report import lesion_figure, lesion_table, recorded_space, write_pages
from medgen.evaluation.scoring import brats_table
from medgen.evaluation.requests import EvaluationRequest, evaluation_request
from medgen.evaluation.sets import Sets, as_slice_set

log = logging.getLogger("medgen.evaluate")


def run_experiment(cfg: Any, synthetic_dirs: dict[str, Path], out_dir: Path, device: torch.device,
                   progress: bool = True) -> dict:
    """The experiment for the synthetic sets ``synthetic_dirs`` (name -> folder) against the real
    set of ``cfg`` (a validated evaluate config, read once into an
    :class:`~medgen.evaluation.requests.EvaluationRequest`: ``seeds``, ``budget``, ``lesions``,
    caches). Every network trains with the budget passed whole (steps, batch size, learning rate,
    precision). Returns what ``augmentation.json`` holds; ``out_dir`` gets nothing before the
    results are in (sets of different kinds are refused before any cache is built).
    """
    return experiment(evaluation_request(cfg), synthetic_dirs, out_dir, device, progress)


def experiment(request: EvaluationRequest, synthetic_dirs: dict[str, Path], out_dir: Path, device: torch.device,
               progress: bool = True) -> dict:
    """:func:`run_experiment` of a request."""
    check_same_kind(request, synthetic_dirs)
    sets = {name: Sets(request.sets.with_synthetic(folder), progress) for name, folder in synthetic_dirs.items()}
    _refuse_mixed({name: _kind(s.space, s.image_keys) for name, s in sets.items()})
    first = next(iter(sets.values()))
    space = first.space
    if first.train is None or len(first.train) == 0:
        raise EvaluationError(f"real_dir={first.real_root}: no train lesion {space.unit}s to train the segmenter on")
    train, test = as_slice_set(first.train), as_slice_set(first.test)
    lesion_test = whole_test_split(first, test, request.lesions)
    synthetic = {name: as_slice_set(s.synthetic) for name, s in sets.items()}
    groups = {"real": train, **{f"real+{name}": ItemSet.concat(train, syn) for name, syn in synthetic.items()}}
    results = {name: _train_and_score(name, data, space, lesion_test, request, device, progress)
               for name, data in groups.items()}
    result = {
        "real_dir": str(first.real_root), "reference_split": first.reference_split,
        "space": space.state_dict(), "unit": space.unit,
        "seeds": list(request.seeds), "budget": request.budget_record(),
        "bins": list(lesion_test.bins.names), "edges_mm": list(lesion_test.bins.edges),
        "spacing_mm": list(lesion_test.spacing), "test_items": len(lesion_test.masks), "lesion_items": len(test),
        "lesion_free_items": len(lesion_test.masks) - len(test),
        "test_lesions": dict(zip(lesion_test.bins.names, lesion_test.lesion_counts().tolist())),
        "synthetic": {name: _set_record(request, synthetic_dirs[name], syn, lesion_test, space)
                      for name, syn in synthetic.items()},
        "sets": results,
        "yardstick": lesionwise.yardstick(results["real"], request.lesions.min_sensitivity,
                                          request.lesions.min_dice)}
    result["verdicts"] = arms.verdicts(result)
    result["insertion_vs_copy"] = arms.insertion_vs_copy(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "augmentation.json") as tmp:
        tmp.write_text(jsonio.dumps(result, indent=1))
    write_augmentation_report(out_dir, result)
    return result


def _train_and_score(name: str, data: ItemSet, space: SampleSpace, lesion_test: lesionwise.LesionTest,
                     request: EvaluationRequest, device: torch.device, progress: bool) -> dict:
    """One training set's networks (one per seed), scored lesion by lesion."""
    per_seed = []
    for seed in request.seeds:
        net = downstream.train_segmenter(data, request.budget, space, seed=seed, device=device,
                                         desc=f"{name} seed {seed}", progress=progress)
        prediction = downstream.predict(net, lesion_test.images, space, device)
        per_seed.append({"seed": seed, **lesion_test.score(prediction, seed)})
    out = {"train_items": len(data), "per_seed": per_seed, **lesionwise.over_seeds(per_seed)}
    log.info("trained on %-20s sensitivity by size: %s", name, ", ".join(
        f"{k} {v['sensitivity']:.2f}" if v["sensitivity"] is not None else f"{k} -" for k, v in out["mean"].items()))
    return out


def check_same_kind(request: EvaluationRequest, synthetic_dirs: dict[str, Path]) -> None:
    """Refuse, from the sample headers and before any cache is built, synthetic sets that hold
    different kinds of data (2D slices and 3D volumes, other sizes, other modalities): the
    segmenter trains on real + each set, the real set read as each set is, so they cannot be
    stacked. Also refused: a missing folder, and a set with modalities the real set lacks.
    An :class:`~medgen.evaluation.EvaluationError` in one line naming the sets."""
    real_root = request.sets.real_dir
    real_keys = present_modalities([p for s in SPLITS for p in list_patients(real_root / s)])
    kinds = {}
    for name, folder in synthetic_dirs.items():
        root = request.sets.with_synthetic(folder).synthetic_dir
        if not root.is_dir():
            raise EvaluationError(f"synthetic set {name}={folder}: no such folder")
        samples = _samples(root)
        if not samples:
            continue  # Sets says why (an unfinished generation, or an empty set)
        keys = [k for k in present_modalities(samples) if k != MASK_KEY]
        missing = [k for k in keys if k not in real_keys]
        if real_keys and missing:
            raise EvaluationError(f"synthetic set {name}={folder} holds {'+'.join(keys)} but the real set "
                                  f"({real_root}) lacks {'+'.join(missing)}")
        # as medgen.evaluation.volumetric.space_of decides: volumes when more than one axial slice
        kinds[name] = _kind(SampleSpace.of_file(volumetric.sample_shape(samples[0]), dims=request.sets.spatial_dims),
                            keys)
    _refuse_mixed(kinds)


def _kind(space: SampleSpace, image_keys: list[str]) -> str:
    """What a set holds, in words: ``2D slices of 32 px, bravo`` or ``3D volumes of 32x32x16 voxels, bravo``."""
    return space.either(f"2D slices of {max(space.shape)} px", f"3D volumes of {space.tag} voxels") + \
        f", {'+'.join(image_keys)}"


def _refuse_mixed(kinds: dict[str, str]) -> None:
    if len(set(kinds.values())) > 1:
        raise EvaluationError("the synthetic sets hold different kinds of data (" + "; ".join(
            f"{name}: {kind}" for name, kind in kinds.items()) + "): each is stacked onto the real train set read "
            "the same way, so give sets of one kind (one medgen-augment run per kind)")


def _samples(root: Path) -> list[Path]:
    """The sample folders of a synthetic set."""
    return [p for s in SPLITS for p in list_patients(root / s)]


def _set_record(request: EvaluationRequest, folder: Path, data: ItemSet, test: lesionwise.LesionTest,
                space: SampleSpace) -> dict:
    """What a synthetic set holds (``lesions``: every lesion of its masks per bin) and adds (``added``:
    an insertion set's painted lesions, a whole-image set's every lesion; :mod:`medgen.evaluation.arms`)."""
    root = request.sets.with_synthetic(folder).synthetic_dir
    samples = _samples(root)
    lesions = _per_bin(test, [d for mask in data.masks for d in feret_diameters(mask, test.spacing)])
    record = {"dir": str(folder), "items": len(data), "kind": "whole image", "painter": None, "lesions": lesions,
              "added": lesions}
    if arms.is_insertion(samples):
        added = arms.added_diameters(samples, test.spacing, space.shape)
        record.update(kind="insertion", painter=arms.painter_of(root), added=_per_bin(test, added))
    return record


def _per_bin(test: lesionwise.LesionTest, diameters) -> dict[str, int]:
    """Lesions of Feret ``diameters`` (mm) per bin of the test split."""
    return dict(zip(test.bins.names, test.bins.counts(np.asarray(diameters, dtype=np.float64)).tolist()))


def write_augmentation_report(out_dir: Path, result: dict) -> tuple[Path, Path]:
    """``augmentation.md``/``.html`` and ``augmentation.png`` from :func:`run_experiment`'s result."""
    space = recorded_space(result)
    unit = space.unit
    tables = [arms.sets_table(result), lesion_table(result, space), brats_table(result["sets"], unit)]
    if result.get("insertion_vs_copy"):
        tables.insert(2, arms.comparison_table(result["insertion_vs_copy"]))
    notes = [f"Who wins — {v}" for v in result.get("verdicts", [])]
    notes += [] if "warning" not in result["yardstick"] else [f"Warning: {result['yardstick']['warning']}"]
    intro = (f"The downstream segmenter ({len(result['seeds'])} seeds, {result['budget']['steps']} steps) trained on the real "
             f"train lesion {unit}s of `{result['real_dir']}` alone and with each synthetic set added, scored lesion by "
             f"lesion on its whole {result['reference_split']} split. All numbers are in `augmentation.json`.")
    figure = lesion_figure(result, out_dir / "augmentation.png")
    return write_pages(out_dir, "augmentation", "medgen targeted augmentation", intro, notes, tables,
                       [("Lesion-wise segmentation by lesion size", figure)])
