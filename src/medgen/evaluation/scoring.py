"""Scoring any segmenter's predictions (``medgen-score``), and the BraTS-METS tables of the reports.

:func:`score_folders` pairs the predicted masks of one folder with the true masks of another by
case name and scores each pair with the challenge's rules (:mod:`medgen.evaluation.bratsmets`)
and medgen's own lesion-wise figures (:mod:`medgen.evaluation.lesionwise`), the same code that
scores ``medgen-evaluate``'s segmenters.

A case is a NIfTI file ``<case>.nii.gz`` (or ``.nii``) of either folder, or, in a dataset folder of
medgen's layout, a patient folder ``<case>/seg.nii.gz``. A file of one slice (``[X, Y]`` or
``[X, Y, 1]``) is scored with the 2D rules, its voxel volume the pixel area times the slice
thickness its header records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medgen.core.constants import MASK_KEY
from medgen.data.lesions import SizeBins
from medgen.data.nifti_dataset import DataError, load_volume
from medgen.data.nifti_files import read_failure
from medgen.evaluation import EvaluationError, bratsmets, lesionwise

log = logging.getLogger("medgen.score")

SUFFIXES = (".nii.gz", ".nii")


def case_files(folder: Path) -> dict[str, Path]:
    """``{case: file}`` of a folder: its NIfTI files by name without the suffix, and the
    ``seg.nii.gz`` of each patient folder by the folder's name."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = next((path.name[: -len(s)] for s in SUFFIXES if path.name.endswith(s)), None)
        if path.is_file() and name:
            case, file = name, path
        elif path.is_dir() and any((path / f"{MASK_KEY}{s}").is_file() for s in SUFFIXES):
            case, file = path.name, next(path / f"{MASK_KEY}{s}" for s in SUFFIXES if (path / f"{MASK_KEY}{s}").is_file())
        else:
            continue
        if case in out:
            raise EvaluationError(f"{folder}: two files of case {case!r}: {out[case].name} and {file.name}")
        out[case] = file
    return out


@dataclass(frozen=True)
class Case:
    """One case's masks, read and checked: the array to score (2D for a slice), its spacing per
    array axis (mm) and the volume of one voxel (mm³)."""

    truth: np.ndarray
    prediction: np.ndarray
    spacing: tuple[float, ...]
    voxel_mm3: float


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The mask of ``path`` in RAS orientation (as medgen reads every volume) and its voxel size
    along each array axis (mm; three values, the third a slice's thickness)."""
    try:
        array, affine = load_volume(path)
    except DataError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many kinds for a file they cannot read
        raise EvaluationError(f"{path}: {read_failure(path, exc)}") from None
    if array.ndim not in (2, 3):
        raise EvaluationError(f"{path}: a mask of shape {list(array.shape)}; medgen-score takes one slice or volume")
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    return array, zooms


def read_case(name: str, pred: Path, truth: Path) -> Case:
    """The two masks of case ``name``, refused in one line naming both files when their shapes or
    spacings differ."""
    p, p_zooms = _read(pred)
    t, t_zooms = _read(truth)
    if p.shape != t.shape:
        raise EvaluationError(f"case {name}: {pred} is {list(p.shape)} but {truth} is {list(t.shape)}")
    if not np.allclose(p_zooms, t_zooms, rtol=1e-3, atol=1e-4):
        raise EvaluationError(f"case {name}: {pred} has voxels of {list(p_zooms)} mm but {truth} of {list(t_zooms)} mm")
    if t.ndim == 3 and t.shape[2] == 1:
        t, p = t[..., 0], p[..., 0]
    return Case(t, p, t_zooms[:t.ndim], float(np.prod(t_zooms)))


def pair_cases(pred_dir: Path, truth_dir: Path) -> list[tuple[str, Path, Path]]:
    """``(case, prediction file, truth file)`` for every case of both folders; a case in one folder
    only is refused in one line naming the cases."""
    for folder, what in ((pred_dir, "PRED_DIR"), (truth_dir, "TRUTH_DIR")):
        if not folder.is_dir():
            raise EvaluationError(f"{what} {folder}: not a folder")
    preds, truths = case_files(pred_dir), case_files(truth_dir)
    if not truths:
        raise EvaluationError(f"TRUTH_DIR {truth_dir}: no NIfTI mask (<case>.nii.gz, or <case>/seg.nii.gz)")
    for a, b, da, db in ((preds, truths, pred_dir, truth_dir), (truths, preds, truth_dir, pred_dir)):
        alone = sorted(set(a) - set(b))
        if alone:
            listed = ", ".join(a[c].name if a[c].parent == da else f"{c}/{a[c].name}" for c in alone[:5])
            raise EvaluationError(f"{da}: {len(alone)} case(s) without a match in {db}: {listed}"
                                  + (" ..." if len(alone) > 5 else ""))
    return [(c, preds[c], truths[c]) for c in sorted(truths)]


def _case_entry(case: Case, bins: SizeBins) -> tuple[dict, bratsmets.CaseScore, lesionwise.LesionMatch]:
    score = bratsmets.score_case(case.truth, case.prediction, case.spacing, case.voxel_mm3)
    match = lesionwise.match_lesions(case.truth, case.prediction, case.spacing)
    own = {}
    for b, name in enumerate(bins.names):
        in_bin = bins.index(match.diameters) == b
        own[name] = {"lesions": int(in_bin.sum()), "found": int(match.found[in_bin].sum()),
                     "lesion_dice": float(match.dice[in_bin].mean()) if in_bin.any() else None,
                     "false_positives": int((bins.index(match.false_positive_diameters) == b).sum())}
    return {**score.as_dict(), "medgen": own}, score, match


def score_folders(pred_dir: Path, truth_dir: Path, bins: SizeBins, resamples: int = 1000, seed: int = 0,
                  progress: bool = True) -> dict:
    """Every case of the two folders scored: ``cases`` (keyed by the prediction's file name under
    ``pred_dir``: the challenge's figures and medgen's per bin) and ``overall`` (``brats_mets``: means over cases with bootstrap intervals,
    per bin; ``medgen``: sensitivity, lesion Dice and false positives per case, per bin)."""
    pairs = pair_cases(pred_dir, truth_dir)
    cases, scores, matches, dims = {}, [], [], set()
    for name, pred, truth in tqdm(pairs, desc="scoring", unit="case", disable=not progress):
        case = read_case(name, pred, truth)
        dims.add(case.truth.ndim)
        cases[pred.relative_to(pred_dir).as_posix()], score, match = _case_entry(case, bins)
        scores.append(score)
        matches.append(match)
    if len(dims) > 1:
        raise EvaluationError(f"{pred_dir} and {truth_dir} mix slices and volumes: score them in two runs")
    overall = {"brats_mets": bratsmets.summarize_cases(scores, bins, resamples, seed),
               "medgen": lesionwise.summarize(matches, bins, resamples, seed)}
    return {"pred_dir": str(pred_dir), "truth_dir": str(truth_dir), "rules": RULES[dims.pop()],
            "bins": list(bins.names), "edges_mm": list(bins.edges), "cases": cases, "overall": overall}


RULES = {3: "BraTS-METS 2023 lesion-wise: 26-connected lesions, truth dilated once (generate_binary_structure(3, 2)), "
            "lesions <= 2 mm3 left out, false positives in the denominator, missed/false 374 mm",
         2: "BraTS-METS 2023 lesion-wise, 2D analogues per slice: 8-connected lesions, truth dilated once (3 x 3 "
            "square), lesions <= 2 mm3 (pixel area x slice thickness) left out, false positives in the denominator, "
            "missed/false 374 mm"}


# ============================================================================ tables
def _cell(mean: float | None, std: float | None, digits: int) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def brats_rows(sets: dict) -> Iterator[list[str]]:
    """Rows of the BraTS-METS table of ``sets`` (``{name: over_seeds result with brats_mets and
    per_seed}``): each set overall, then per size bin."""
    for name, s in sets.items():
        b, first = s["brats_mets"], s["per_seed"][0]["brats_mets"]
        m, sd = b["mean"]["all"], b["std"]["all"]
        yield [name, "all", _cell(m["lesionwise_dice"], sd["lesionwise_dice"], 3),
               _cell(m["lesionwise_hd95"], sd["lesionwise_hd95"], 1), _cell(m["legacy_dice"], sd["legacy_dice"], 3),
               f"{first['num_tp']} / {first['num_fp']} / {first['num_fn']}"]
        for bin_name, entry in first["bins"].items():
            m, sd = b["mean"][bin_name], b["std"][bin_name]
            yield [name, bin_name, _cell(m["lesionwise_dice"], sd["lesionwise_dice"], 3),
                   _cell(m["lesionwise_hd95"], sd["lesionwise_hd95"], 1), "",
                   f"{entry['num_tp']} / {entry['num_fp']} / {entry['num_fn']}"]


def brats_table(sets: dict, unit: str) -> tuple[str, list[str], list[list[str]], str]:
    """The report table of the challenge's scores of each training set (see :func:`brats_rows`)."""
    note = (f"The BraTS-METS 2023 challenge's lesion-wise scores, each {unit} a case (rules: docs, Scoring). "
            "Mean ± std over seeds of the mean over cases; per bin, over the cases with a lesion or a false positive "
            "in it. TP / FP / FN: the first seed's lesions found, false positives and lesions missed.")
    return ("BraTS-METS lesion-wise scores (real test split)",
            ["trained on", "size", "lesion-wise Dice", "lesion-wise HD95 (mm)", "legacy Dice", "TP / FP / FN"],
            list(brats_rows(sets)), note)


def brats_summary_lines(sets: dict) -> list[str]:
    """One line per training set: the challenge's lesion-wise Dice and HD95 (mean over seeds)."""
    lines = []
    for name, s in sets.items():
        m = s["brats_mets"]["mean"]["all"]
        value = "—" if m["lesionwise_dice"] is None else \
            f"{m['lesionwise_dice']:.3f} (HD95 {m['lesionwise_hd95']:.1f} mm)"
        lines.append(f"BraTS-METS lesion-wise Dice, trained on {name:<15} {value}")
    return lines


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``rows`` under ``header`` in aligned columns, for a terminal."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _ci(entry: dict, digits: int) -> str:
    if entry["value"] is None:
        return "—"
    low, high = entry["ci95"]
    return f"{entry['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def overall_lines(result: dict) -> list[str]:
    """What ``medgen-score`` prints: the challenge's figures over cases, then a table per size bin
    of both the challenge's and medgen's lesion-wise figures."""
    b, own = result["overall"]["brats_mets"], result["overall"]["medgen"]
    lines = [f"{b['cases']} cases; {result['rules']}",
             f"lesion-wise Dice {_ci(b['lesionwise_dice'], 3)}, lesion-wise HD95 {_ci(b['lesionwise_hd95'], 1)} mm, "
             f"legacy Dice {_ci(b['legacy_dice'], 3)} (mean over cases [bootstrap 95%])",
             f"lesions found {b['num_tp']}, false positives {b['num_fp']}, missed {b['num_fn']}, "
             f"left out (<= {bratsmets.VOLUME_THRESHOLD_MM3:g} mm3) {b['dropped_lesions']}"]
    header = ["size", "lesions", "TP / FP / FN", "lesion-wise Dice", "HD95 (mm)", "sensitivity", "lesion Dice",
              "false positives / case"]
    rows = [[name, str(e["lesions"]), f"{e['num_tp']} / {e['num_fp']} / {e['num_fn']}", _ci(e["lesionwise_dice"], 3),
             _ci(e["lesionwise_hd95"], 1), _ci(own["bins"][name]["sensitivity"], 3), _ci(own["bins"][name]["dice"], 3),
             _ci(own["bins"][name]["false_positives_per_item"], 2)] for name, e in b["bins"].items()]
    return [*lines, "", text_table(header, rows)]
