"""The arms of ``medgen-augment``: what each synthetic set adds, and who wins where.

An arm is the real train set plus one synthetic set. A set made by insertion (``medgen-generate
insert.into=...``: real scans with new lesions painted in, each sample with its ``region.nii.gz``)
adds only the lesions it painted: the components of a sample's mask that touch its region (the
placement keeps every new lesion apart from the scan's own). A whole-image set adds every lesion of
its masks. Both are counted from the files, per size bin at the real test split's pixel size, so
arms asked for the same lesions can be checked to hold them.

The verdicts are computed from the numbers of ``augmentation.json``: per bin with test lesions, the
arm with the highest mean lesion-wise sensitivity, and whether its lead over the next arm exceeds
the seed spread (the larger of the two arms' standard deviations over seeds); and each insertion arm
against each copy-paste arm and real alone.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgen.core.constants import MASK_KEY
from medgen.data.lesions import component_diameters
from medgen.data.masks import lesion_labels
from medgen.data.nifti_dataset import modality_path, read_volume

#: the file of an insertion sample that marks where it was painted
REGION = "region"
#: the copy-paste baseline's painter (insert.painter=copy)
COPY = "copy"


def is_insertion(samples: Sequence[Path]) -> bool:
    """A set made by insertion: its samples carry ``region.nii.gz``."""
    return bool(samples) and all(modality_path(p, REGION).is_file() for p in samples)


def painter_of(root: Path) -> str | None:
    """The painter of an insertion set, from its ``manifest.csv`` (None: no manifest or column)."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return None
    with manifest.open(newline="") as f:
        painters = {row.get("painter") for row in csv.DictReader(f)} - {None, ""}
    return "+".join(sorted(painters)) or None


def added_diameters(samples: Sequence[Path], spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Feret diameters (mm) of the lesions an insertion set painted: per sample, the components of
    its mask that touch its region. ``spacing`` is the pixel size (mm) of masks of ``shape`` (the
    test split's); a file of another shape is measured with the spacing scaled to it (same field of view)."""
    out = []
    for sample in samples:
        mask = _squeezed(read_volume(modality_path(sample, MASK_KEY))[0], len(spacing))
        region = _squeezed(read_volume(modality_path(sample, REGION))[0], len(spacing)) > 0.5
        labels, count = lesion_labels(mask)
        touching = np.unique(labels[region & (labels > 0)])
        sizes = np.asarray(spacing, np.float64) * np.asarray(shape[:mask.ndim], np.float64) / np.asarray(mask.shape)
        diameters = component_diameters(labels, count, sizes)
        out.extend(diameters[touching - 1].tolist())
    return np.asarray(out, np.float64)


def _squeezed(array: np.ndarray, ndim: int) -> np.ndarray:
    """``array`` without the trailing axes of size 1 beyond ``ndim`` (a slice stored as ``[H, W, 1]``)."""
    while array.ndim > ndim and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def verdicts(result: dict) -> list[str]:
    """One sentence per bin with test lesions (and ``all``): which arm has the highest mean
    lesion-wise sensitivity, and whether its lead over the next exceeds the seed spread."""
    out = []
    for b in [*result["bins"], "all"]:
        n = result["test_lesions"][b] if b != "all" else sum(result["test_lesions"].values())
        ranked = sorted(((s["mean"][b]["sensitivity"], s["std"][b]["sensitivity"], name)
                         for name, s in result["sets"].items() if s["mean"][b]["sensitivity"] is not None),
                        key=lambda r: -r[0])
        if not n or len(ranked) < 2:
            continue
        (m1, s1, first), (m2, s2, second) = ranked[:2]
        head = f"{b} ({n} test lesions): "
        if f"{m1:.2f}" == f"{m2:.2f}":  # as the sentence shows them
            out.append(head + f"{first} and {second} tie at sensitivity {m1:.2f} (two decimals).")
            continue
        spread = max(s1, s2)
        lead = m1 - m2
        out.append(head + f"{first} wins (sensitivity {m1:.2f} ± {s1:.2f}), {lead:.2f} ahead of {second} "
                   f"({m2:.2f} ± {s2:.2f}), " + (f"more than the seed spread ({spread:.2f})." if lead > spread else
                                                 f"within the seed spread ({spread:.2f}): no clear winner."))
    return out


def insertion_vs_copy(result: dict) -> list[dict]:
    """Per insertion arm (a painter other than copy) and bin with test lesions: its mean sensitivity
    beside real alone's and each copy-paste arm's, the differences, and the seed spread (the largest
    standard deviation of the arms compared)."""
    syn = result["synthetic"]
    inserted = [n for n, s in syn.items() if s.get("kind") == "insertion" and s.get("painter") != COPY]
    copies = [n for n, s in syn.items() if s.get("kind") == "insertion" and s.get("painter") == COPY]
    rows = []
    for name in inserted:
        for copy in copies or [None]:
            for b, n in result["test_lesions"].items():
                arms = {"real": "real", "insertion": f"real+{name}"} | ({"copy": f"real+{copy}"} if copy else {})
                mean = {k: result["sets"][v]["mean"][b]["sensitivity"] for k, v in arms.items()}
                std = {k: result["sets"][v]["std"][b]["sensitivity"] for k, v in arms.items()}
                if not n or any(v is None for v in mean.values()):
                    continue
                rows.append({"insertion": name, "copy": copy, "bin": b, "test_lesions": n, "mean": mean,
                             "minus_copy": mean["insertion"] - mean["copy"] if copy else None,
                             "minus_real": mean["insertion"] - mean["real"], "spread": max(std.values())})
    return rows


def comparison_table(rows: list[dict]) -> tuple[str, list[str], list[list[str]], str]:
    """The report's table of :func:`insertion_vs_copy`."""
    def diff(d: float | None, spread: float) -> str:
        return "-" if d is None else f"{d:+.2f}" + (" (> spread)" if abs(d) > spread else "")

    body = [[r["insertion"], r["copy"] or "-", r["bin"], str(r["test_lesions"]), f"{r['mean']['real']:.2f}",
             "-" if r["copy"] is None else f"{r['mean']['copy']:.2f}", f"{r['mean']['insertion']:.2f}",
             diff(r["minus_copy"], r["spread"]), diff(r["minus_real"], r["spread"]), f"{r['spread']:.2f}"]
            for r in rows]
    header = ["insertion set", "copy set", "bin", "test lesions", "real", "real+copy", "real+insertion",
              "insertion − copy", "insertion − real", "seed spread"]
    return ("Insertion against copy-paste", header, body,
            "Mean lesion-wise sensitivity over seeds per bin; the seed spread is the largest standard deviation "
            "over seeds of the arms in the row, and a difference beyond it is marked.")


def sets_table(result: dict) -> tuple[str, list[str], list[list[str]], str]:
    """The report's table of what each synthetic set holds and adds per bin."""
    names, unit = result["bins"], result["unit"]
    rows = [[name, s.get("kind", "whole image") + (f" ({s['painter']})" if s.get("painter") else ""), str(s["items"]),
             *(str(s.get("added", s["lesions"])[b]) for b in names), *(str(s["lesions"][b]) for b in names)]
            for name, s in result["synthetic"].items()]
    header = ["set", "made by", f"{unit}s", *(f"{b} added" for b in names), *(f"{b} in masks" for b in names)]
    return ("Synthetic sets", header, rows,
            "Lesions per size bin (Feret diameter at the real test split's pixel size), counted on each set's "
            "files: added are the lesions the set brings (an insertion set: the lesions it painted, the mask's "
            "components touching region.nii.gz; a whole-image set: every lesion of its masks); in masks counts "
            "every lesion, the scans' own included.")
