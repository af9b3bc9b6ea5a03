"""Lesion-wise segmentation figures per size bin: sensitivity, false positives, per-lesion Dice.

A slice's (or volume's) true lesions and predicted lesions are the connected components of its
masks (:func:`medgen.data.masks.lesion_labels`), each sized by its Feret diameter in mm
(:func:`medgen.data.lesions.feret_diameters`) and put in a bin of a :class:`SizeBins`.

- A true lesion is **found** when at least one predicted pixel overlaps it.
- Its **lesion Dice** is the Dice of the true lesion with the union of the predicted lesions
  that overlap it (0 when it is missed), so a lesion found by a prediction that bleeds over its
  neighbours scores low, and a lesion split in two predicted pieces scores as one.
- A predicted lesion that overlaps no true lesion is a **false positive**, binned by its own
  diameter; the figure is false-positive lesions per slice (all test slices count, lesion-free
  ones included).

Intervals are percentile bootstrap intervals over slices (each resample draws whole slices, so
lesions of one slice stay together: they are not independent).

Beside these, every scoring also gives the BraTS-METS 2023 challenge's lesion-wise scores
(:mod:`medgen.evaluation.bratsmets`: ``brats_mets`` in each summary), whose rules differ (a
dilated truth, a volume threshold, false positives in the denominator), so a result can be put
next to a published table.

Everything here takes volumes as well (a 3D set): masks ``[X, Y, Z]`` with a spacing of three
axes, 26-connected lesions, and the volume as the unit where this text says slice (false
positives per volume, bootstrap resamples of whole volumes); the keys keep their names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medgen.data.lesions import SizeBins, component_diameters
from medgen.data.masks import lesion_labels
from medgen.evaluation import bratsmets

#: the figures of each bin, in the order of :func:`summarize`'s tables
FIGURES = ("sensitivity", "dice", "false_positives_per_item")


@dataclass(frozen=True)
class LesionMatch:
    """What one slice's prediction did to its lesions."""

    diameters: np.ndarray  #: float64 [n_true], mm, in label order
    found: np.ndarray  #: bool [n_true]
    dice: np.ndarray  #: float64 [n_true], lesion Dice (0 for a missed lesion)
    false_positive_diameters: np.ndarray  #: float64 [n_fp], mm


@dataclass(frozen=True)
class TrueLesions:
    """The lesions of one true mask, labelled and measured once however many predictions meet them."""

    labels: np.ndarray  #: int32, :func:`~medgen.data.masks.lesion_labels` of the mask
    count: int
    diameters: np.ndarray  #: float64 [count], mm

    @classmethod
    def of(cls, truth: np.ndarray, spacing: Sequence[float]) -> TrueLesions:
        labels, count = lesion_labels(truth)
        return cls(labels, count, component_diameters(labels, count, spacing))


def match_lesions(truth: np.ndarray | TrueLesions, prediction: np.ndarray, spacing: Sequence[float]) -> LesionMatch:
    """Match the lesions of ``truth`` (a mask, or its :class:`TrueLesions`) and ``prediction``
    (masks of one slice ``[H, W]`` or volume, binarised by :func:`~medgen.data.masks.is_lesion`);
    ``spacing`` in mm per axis."""
    true = truth if isinstance(truth, TrueLesions) else TrueLesions.of(truth, spacing)
    pred_labels, n_pred = lesion_labels(prediction)
    # overlap[i, j]: pixels of true lesion i (1-based) in predicted lesion j (1-based); row/column 0 background
    overlap = np.zeros((true.count + 1, n_pred + 1), np.int64)
    np.add.at(overlap, (true.labels.ravel(), pred_labels.ravel()), 1)
    true_size = overlap.sum(1)[1:]
    pred_size = overlap.sum(0)[1:]
    hits = overlap[1:, 1:] > 0  # [n_true, n_pred]
    found = hits.any(1)
    matched_pred = (hits * pred_size[None, :]).sum(1)  # pixels of the predicted lesions touching each true one
    intersection = overlap[1:, 1:].sum(1)
    dice = np.where(found, 2 * intersection / np.maximum(true_size + matched_pred, 1), 0.0).astype(np.float64)
    fp = ~hits.any(0)
    pred_diameters = component_diameters(pred_labels, n_pred, spacing) if fp.any() else np.zeros(n_pred)
    return LesionMatch(diameters=true.diameters, found=found, dice=dice, false_positive_diameters=pred_diameters[fp])


def _per_slice_table(matches: Sequence[LesionMatch], bins: SizeBins) -> np.ndarray:
    """``[n_slices, 4, n_bins]``: true lesions, found lesions, summed lesion Dice, false positives."""
    table = np.zeros((len(matches), 4, len(bins)), np.float64)
    for i, m in enumerate(matches):
        b = bins.index(m.diameters)
        np.add.at(table[i, 0], b, 1)
        np.add.at(table[i, 1], b, m.found)
        np.add.at(table[i, 2], b, m.dice)
        np.add.at(table[i, 3], bins.index(m.false_positive_diameters), 1)
    return table


def _figures(sums: np.ndarray, n_slices: int) -> np.ndarray:
    """``sums`` ``[..., 4, n_bins]`` → sensitivity, mean lesion Dice, false positives per slice
    ``[..., 3, n_bins]`` (NaN where a bin has no true lesion)."""
    lesions = sums[..., 0, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([sums[..., 1, :] / lesions, sums[..., 2, :] / lesions, sums[..., 3, :] / n_slices], -2)


def summarize(matches: Sequence[LesionMatch], bins: SizeBins, resamples: int = 1000, seed: int = 0) -> dict:
    """Per bin and over all lesions: ``lesions`` (true lesions in the bin), ``sensitivity``,
    ``dice`` (mean lesion Dice) and ``false_positives_per_item``, each ``{"value", "ci95"}``
    (``None`` with the reason in ``"skipped"`` where the bin holds no true lesion)."""
    if not matches:
        raise ValueError("no slices to summarise")
    table = _per_slice_table(matches, bins)
    table = np.concatenate([table, table.sum(-1, keepdims=True)], -1)  # last column: every bin together
    n = len(matches)
    point = _figures(table.sum(0), n)
    rng = np.random.default_rng(seed)
    boot = _figures(table[rng.integers(0, n, size=(resamples, n))].sum(1), n)  # [resamples, 3, bins + 1]
    out = {"items": n, "bins": {}, "edges_mm": list(bins.edges)}
    for b, name in enumerate([*bins.names, None]):
        entry = {"lesions": int(table[:, 0, b].sum())}
        for k, key in enumerate(FIGURES):
            entry[key] = bratsmets.interval(point[k, b], boot[:, k, b])
        if entry["lesions"] == 0:
            entry["skipped"] = "no true lesion of this size in the test slices: sensitivity and Dice cannot be measured"
        if name is None:
            out["all"] = entry
        else:
            out["bins"][name] = entry
    return out


@dataclass
class LesionTest:
    """The whole real test split a segmenter is scored on lesion by lesion: ``images [N, C, S, S]``,
    ``masks [N, S, S]`` (its lesion slices and its lesion-free brain slices), the in-plane pixel
    spacing in mm of the masks' two axes, and the bins. Or volumes: ``images [N, C, X, Y, Z]``,
    ``masks [N, X, Y, Z]`` (lesion volumes, then lesion-free ones), the spacing of three axes."""

    images: np.ndarray
    masks: np.ndarray
    spacing: tuple[float, ...]
    bins: SizeBins
    resamples: int = 1000
    #: the volume of one voxel (mm³) for the challenge's volume threshold: for slices, pixel area ×
    #: slice thickness; None: the product of ``spacing``
    voxel_mm3: float | None = None

    def __post_init__(self) -> None:
        #: each test mask's lesions, labelled and measured once for every network scored
        self.truth = [TrueLesions.of(m, self.spacing) for m in self.masks]
        #: the same for the BraTS-METS rules (merged lesions, their regions and volumes)
        self.brats_truth = [bratsmets.TrueCase.of(m, self.spacing, self.voxel_mm3) for m in self.masks]

    def lesion_counts(self) -> np.ndarray:
        """How many true lesions each bin holds (int64 ``[len(bins)]``)."""
        return self.bins.counts(np.concatenate([t.diameters for t in self.truth]))

    def score(self, prediction: np.ndarray, seed: int) -> dict:
        """:func:`summarize` of ``prediction [N, S, S]`` (``[N, X, Y, Z]``) against the masks (intervals
        seeded by ``seed``)."""
        matches = [match_lesions(t, p, self.spacing) for t, p in zip(self.truth, prediction)]
        cases = [bratsmets.score_case(t, p, self.spacing) for t, p in zip(self.brats_truth, prediction)]
        return {**summarize(matches, self.bins, self.resamples, seed),
                "brats_mets": bratsmets.summarize_cases(cases, self.bins, self.resamples, seed)}


def bin_entry(summary: dict, name: str) -> dict:
    """The entry of bin ``name`` in a :func:`summarize` result (``"all"``: every bin together)."""
    return summary["all"] if name == "all" else summary["bins"][name]


def over_seeds(summaries: Sequence[dict]) -> dict:
    """Mean and standard deviation over seeds (ddof 1; 0 for one seed) of each figure of each bin
    and of ``all`` in :func:`summarize`'s results: ``{"mean": {bin: {figure: v}}, "std": ...}``;
    ``None`` where no seed could measure it; and ``brats_mets``, the same of the challenge's scores
    (``all``: :data:`~medgen.evaluation.bratsmets.FIGURES`; each bin: its lesion-wise Dice and HD95)."""
    out: dict = {"mean": {}, "std": {}}
    if all("brats_mets" in s for s in summaries):
        out["brats_mets"] = _brats_over_seeds([s["brats_mets"] for s in summaries])
    for name in [*summaries[0]["bins"], "all"]:
        entries = [bin_entry(s, name) for s in summaries]
        out["mean"][name], out["std"][name] = {}, {}
        for figure in FIGURES:
            out["mean"][name][figure], out["std"][name][figure] = _mean_std([e[figure]["value"] for e in entries])
    return out


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and standard deviation (ddof 1; 0 for one) of the measured ``values`` (None: not measured)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _brats_over_seeds(summaries: Sequence[dict]) -> dict:
    out: dict = {"mean": {"all": {}}, "std": {"all": {}}}
    for figure in bratsmets.FIGURES:
        out["mean"]["all"][figure], out["std"]["all"][figure] = _mean_std([s[figure]["value"] for s in summaries])
    for name in summaries[0]["bins"]:
        out["mean"][name], out["std"][name] = {}, {}
        for figure in ("lesionwise_dice", "lesionwise_hd95"):
            out["mean"][name][figure], out["std"][name][figure] = _mean_std(
                [s["bins"][name][figure]["value"] for s in summaries])
    return out


def yardstick(real: dict, min_sensitivity: float, min_dice: float) -> dict:
    """Whether the segmenter trained on real data (``real``: :func:`over_seeds` of its summaries)
    is good enough for its verdict on synthetic data to mean anything: over all lesion sizes its
    mean sensitivity must reach ``min_sensitivity`` and its mean lesion Dice ``min_dice``."""
    sensitivity, dice = real["mean"]["all"]["sensitivity"], real["mean"]["all"]["dice"]
    rule = (f"the real-trained network must find at least {min_sensitivity:.0%} of the real test lesions with a mean "
            f"lesion Dice of at least {min_dice:.2f}")
    if sensitivity is None:
        return {"ok": False, "rule": rule, "warning": "the real test split has no lesion: lesion-wise figures cannot "
                                                      "be measured, so the downstream verdict cannot be judged"}
    ok = sensitivity >= min_sensitivity and dice >= min_dice
    out = {"ok": bool(ok), "rule": rule, "sensitivity": sensitivity, "dice": dice}
    if not ok:
        out["warning"] = (f"the yardstick is too weak to judge: the segmenter trained on real data finds "
                          f"{sensitivity:.0%} of the real test lesions with a mean lesion Dice of {dice:.2f} ({rule}); "
                          f"its comparison of training sets is noise: raise budget.steps or use more real data")
    return out
