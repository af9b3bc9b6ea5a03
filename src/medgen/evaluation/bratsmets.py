"""The BraTS-METS 2023 lesion-wise scores, for one case and for a set of cases.

The challenge scores each case (a volume) by these rules, for a binary lesion mask (any voxel
:func:`~medgen.data.masks.is_lesion` counts, so a multi-label mask is its whole tumour):

1. Lesions are connected components of 26-connectivity (:func:`~medgen.data.masks.lesion_labels`).
2. The truth is dilated by one iteration of the structuring element of connectivity 2
   (``scipy.ndimage.generate_binary_structure(3, 2)``); true components that fall in one component
   of the dilated truth are merged into one lesion, whose region is that dilated component.
3. Every predicted component that overlaps a lesion's region counts for that lesion; the union of
   those is compared with the lesion: its Dice, and its HD95 (:func:`hd95`). A lesion no predicted
   component reaches scores Dice 0 and HD95 :data:`MISSED_HD95_MM`.
4. A predicted component that overlaps no lesion's region is a false positive, scoring Dice 0 and
   HD95 :data:`MISSED_HD95_MM`.
5. Lesions of volume (voxels × voxel volume in mm³) at most :data:`VOLUME_THRESHOLD_MM3` are
   dropped from numerator and denominator (a prediction that reaches one is still no false
   positive).
6. Lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false positives); the
   lesion-wise HD95 the same with HD95. A case with neither (an empty truth predicted empty) scores
   Dice 1 and HD95 0.
7. ``legacy_dice`` and ``legacy_hd95`` compare the whole masks (both empty: 1 and 0; one empty:
   HD95 :data:`MISSED_HD95_MM`). ``num_tp`` and ``num_fn`` count the kept lesions reached and
   missed, ``num_fp`` the false positives.

A set of slices is scored slice by slice with the 2D analogues: 8-connected lesions, the 3 × 3
square (``generate_binary_structure(2, 2)``) as the dilation, the pixel area times the slice
thickness as the voxel volume.

Over a set of cases (:func:`summarize_cases`), each figure is the mean over cases (the challenge
ranks on these), with a percentile bootstrap interval over cases; per size bin (lesions binned by
their Feret diameter, false positives by their own), a case's bin score applies rule 6 to the
lesions and false positives of that bin, and the bin's figure is the mean over the cases that have
either (a case with nothing in a bin says nothing about it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medgen.data.lesions import SizeBins, component_diameters
from medgen.data.masks import is_lesion, lesion_labels

#: the HD95 of a missed lesion, a false positive, or a whole mask compared with an empty one (mm)
MISSED_HD95_MM = 374.0
#: true lesions of at most this volume (mm³) are left out
VOLUME_THRESHOLD_MM3 = 2.0
#: iterations of the dilation that merges true lesions and widens their regions
DILATION_ITERATIONS = 1
#: the per-case figures, in the order of the tables
FIGURES = ("lesionwise_dice", "lesionwise_hd95", "legacy_dice", "legacy_hd95")
COUNTS = ("num_tp", "num_fp", "num_fn")


@dataclass(frozen=True)
class CaseScore:
    """The challenge's scores of one case, and the lesions behind them (for the size bins)."""

    lesionwise_dice: float
    lesionwise_hd95: float
    legacy_dice: float
    legacy_hd95: float
    num_tp: int
    num_fp: int
    num_fn: int
    lesion_dice: np.ndarray  #: float64 [kept lesions]
    lesion_hd95: np.ndarray  #: float64 [kept lesions], mm
    lesion_diameters: np.ndarray  #: float64 [kept lesions], Feret diameter in mm
    lesion_found: np.ndarray  #: bool [kept lesions]
    false_positive_diameters: np.ndarray  #: float64 [num_fp], mm
    dropped: int  #: true lesions at or below the volume threshold

    def as_dict(self) -> dict:
        """The challenge's figures of this case, as ``medgen-score`` writes them."""
        return {**{k: float(getattr(self, k)) for k in FIGURES}, **{k: int(getattr(self, k)) for k in COUNTS},
                "dropped_lesions": self.dropped}


def _edges(mask: np.ndarray) -> np.ndarray:
    """The surface of ``mask``: its voxels with a face neighbour outside it (or on the array's border)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """The 95th-percentile Hausdorff distance (mm) between the surfaces of two non-empty boolean
    masks: the 95th percentile of the distances from each surface voxel of one to the nearest of
    the other, the larger of the two directions (as MONAI's ``compute_hausdorff_distance`` with
    ``percentile=95``). Computed in the bounding box of both (one voxel wider), which holds every
    nearest voxel, so the figure is that of the whole arrays."""
    from scipy import ndimage

    both = a | b
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(both.astype(np.int8))[0])
    ea, eb = _edges(a[box]), _edges(b[box])
    spacing = tuple(float(s) for s in spacing)
    to_b = ndimage.distance_transform_edt(~eb, sampling=spacing)[ea]
    to_a = ndimage.distance_transform_edt(~ea, sampling=spacing)[eb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def _legacy(t: np.ndarray, p: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    nt, np_ = int(t.sum()), int(p.sum())
    if nt == 0 and np_ == 0:
        return 1.0, 0.0
    dice = 2.0 * int((t & p).sum()) / (nt + np_)
    return dice, (hd95(t, p, spacing) if nt and np_ else MISSED_HD95_MM)


@dataclass(frozen=True)
class TrueCase:
    """The truth side of rules 1, 2 and 5 for one mask, computed once however many predictions
    meet it."""

    mask: np.ndarray  #: bool, the lesion voxels
    regions: np.ndarray  #: int32, the dilated truth's components: each lesion's region (rule 2)
    lesions: np.ndarray  #: int32, the lesions: the true voxels labelled by their region
    count: int
    volume_mm3: np.ndarray  #: float64 [count]
    diameters: np.ndarray  #: float64 [count], Feret diameter in mm
    spacing: tuple[float, ...]

    @classmethod
    def of(cls, truth: np.ndarray, spacing: Sequence[float], voxel_mm3: float | None = None) -> TrueCase:
        """``truth`` (a volume or a slice), ``spacing`` in mm per array axis, ``voxel_mm3`` the
        volume of one voxel for rule 5 (default: the product of ``spacing``)."""
        from scipy import ndimage

        t = is_lesion(truth).astype(bool)
        voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64))) if voxel_mm3 is None else float(voxel_mm3)
        structure = ndimage.generate_binary_structure(t.ndim, 2)
        regions, count = lesion_labels(ndimage.binary_dilation(t, structure=structure, iterations=DILATION_ITERATIONS))
        lesions = np.where(t, regions, 0)
        volume = np.bincount(lesions.ravel(), minlength=count + 1)[1:] * voxel_mm3
        return cls(t, regions, lesions, count, volume.astype(np.float64),
                   component_diameters(lesions, count, spacing), tuple(float(x) for x in spacing))


def score_case(truth: np.ndarray | TrueCase, prediction: np.ndarray, spacing: Sequence[float],
               voxel_mm3: float | None = None) -> CaseScore:
    """The BraTS-METS scores of ``prediction`` against ``truth`` (masks of one case, a volume
    ``[X, Y, Z]`` or a slice ``[X, Y]``, or the truth's :class:`TrueCase`); ``spacing`` in mm per
    array axis; ``voxel_mm3`` the volume of one voxel for rule 5 (default: the product of
    ``spacing``; for a slice, give pixel area × slice thickness)."""
    from scipy import ndimage

    true = truth if isinstance(truth, TrueCase) else TrueCase.of(truth, spacing, voxel_mm3)
    t, p = true.mask, is_lesion(prediction).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and prediction {p.shape} differ in shape")
    legacy_dice, legacy_hd95 = _legacy(t, p, spacing)
    pred_labels, n_pred = lesion_labels(p)
    pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    reached = np.zeros(n_pred + 1, bool)
    dice, hd, found = np.zeros(true.count), np.zeros(true.count), np.zeros(true.count, bool)
    for k, box in enumerate(ndimage.find_objects(true.regions), start=1):
        hits = np.unique(pred_labels[box][true.regions[box] == k])
        hits = hits[hits != 0]
        reached[hits], found[k - 1] = True, len(hits) > 0
        if not len(hits):
            dice[k - 1], hd[k - 1] = 0.0, MISSED_HD95_MM
            continue
        lesion, matched = true.lesions == k, np.isin(pred_labels, hits)
        dice[k - 1] = 2.0 * int((matched & lesion).sum()) / (int(lesion.sum()) + int(pred_size[hits].sum()))
        hd[k - 1] = hd95(lesion, matched, spacing)
    kept = true.volume_mm3 > VOLUME_THRESHOLD_MM3
    false_positives = np.flatnonzero(~reached[1:]) + 1
    fp_diameters = component_diameters(pred_labels, n_pred, spacing)[false_positives - 1] if len(false_positives) \
        else np.zeros(0)
    n = int(kept.sum()) + len(false_positives)
    lw_dice = float(dice[kept].sum() / n) if n else 1.0
    lw_hd95 = float((hd[kept].sum() + MISSED_HD95_MM * len(false_positives)) / n) if n else 0.0
    return CaseScore(lw_dice, lw_hd95, legacy_dice, legacy_hd95, int((found & kept).sum()), len(false_positives),
                     int((~found & kept).sum()), dice[kept], hd[kept], true.diameters[kept], found[kept], fp_diameters,
                     int((~kept).sum()))


def _bin_table(cases: Sequence[CaseScore], bins: SizeBins) -> np.ndarray:
    """``[n_cases, 6, n_bins]``: per case and bin, the summed
    lesion Dice and HD95 of the kept lesions, their count, the false positives, the lesions reached
    and the lesions missed."""
    table = np.zeros((len(cases), 6, len(bins)), np.float64)
    for i, c in enumerate(cases):
        b, f = bins.index(c.lesion_diameters), bins.index(c.false_positive_diameters)
        for row, values in enumerate((c.lesion_dice, c.lesion_hd95, np.ones(len(b)), None, c.lesion_found,
                                      ~c.lesion_found)):
            if values is None:
                np.add.at(table[i, row], f, 1)
            else:
                np.add.at(table[i, row], b, np.asarray(values, np.float64))
    return table


def _bin_scores(table: np.ndarray) -> np.ndarray:
    """Rule 6 per case and bin: ``[..., 2, bins]`` lesion-wise Dice and HD95 (NaN where a case has
    neither a lesion nor a false positive in the bin)."""
    n = table[..., 2, :] + table[..., 3, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([table[..., 0, :] / n, (table[..., 1, :] + MISSED_HD95_MM * table[..., 3, :]) / n], -2)


def interval(value: float, boot: np.ndarray) -> dict:
    """``{"value", "ci95"}``: ``value`` and the percentile 95% interval of the finite ``boot``
    (a figure of each bootstrap resample); None where ``value`` could not be measured."""
    if not np.isfinite(value):
        return {"value": None, "ci95": None}
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {"value": float(value), "ci95": [float(low), float(high)]}


def _mean(values: np.ndarray, boot: np.ndarray) -> dict:
    """:func:`interval` of the mean of the finite ``values`` (None where no case has one)."""
    values = values[np.isfinite(values)]
    return interval(float(values.mean()) if len(values) else np.nan, boot)


def summarize_cases(cases: Sequence[CaseScore], bins: SizeBins, resamples: int = 1000, seed: int = 0) -> dict:
    """The figures of a set of cases: each of :data:`FIGURES` as the mean over cases with its
    bootstrap interval (``{"value", "ci95"}``), the summed :data:`COUNTS` and dropped lesions, and
    per size bin (module docstring) the lesion-wise Dice and HD95 with the cases that have something
    in the bin and the counts."""
    if not cases:
        raise ValueError("no cases to summarise")
    n = len(cases)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    case_figures = np.asarray([[getattr(c, k) for k in FIGURES] for c in cases], np.float64)  # [n, 4]
    boot = case_figures[picks].mean(1)  # [resamples, 4]
    out: dict = {"cases": n, **{k: _mean(case_figures[:, j], boot[:, j]) for j, k in enumerate(FIGURES)},
                 **{k: int(sum(getattr(c, k) for c in cases)) for k in COUNTS},
                 "dropped_lesions": int(sum(c.dropped for c in cases)), "bins": {}}
    table = _bin_table(cases, bins)
    scores = _bin_scores(table)  # [n, 2, bins]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a case in a bin: NaN
        boot_bins = np.nanmean(scores[picks], axis=1)  # [resamples, 2, bins]
    for b, name in enumerate(bins.names):
        out["bins"][name] = {"cases": int(np.isfinite(scores[:, 0, b]).sum()),
                 "lesionwise_dice": _mean(scores[:, 0, b], boot_bins[:, 0, b]),
                 "lesionwise_hd95": _mean(scores[:, 1, b], boot_bins[:, 1, b]),
                 "lesions": int(table[:, 2, b].sum()), "num_tp": int(table[:, 4, b].sum()),
                 "num_fp": int(table[:, 3, b].sum()), "num_fn": int(table[:, 5, b].sum())}
    return out
