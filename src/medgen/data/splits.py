"""Patient-level dataset splits, in one place (see docs/architecture.md, Data).

* :func:`parse_split` reads and checks a ``(train, val, test)`` fraction triple: a sequence
  of numbers, or the command-line text ``"0.7,0.15,0.15"``;
* :func:`split_counts` turns the fractions into patients per split (largest remainder);
* :func:`split_indices` / :func:`assign_splits` draw the seeded patient-level assignment that
  ``medgen-data phantom`` and ``medgen-data import --split`` write to disk;
* :func:`split_patients` is what training reads: the ``train/``, ``val/``, ``test/`` folders,
  or, without ``val/``, a hash-based share of ``train/``;
* :func:`split_folder_problem` decides whether a split folder is usable, for both
  ``medgen-data check`` and training (an empty ``val/`` is an error to both, with one message).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medgen.core.constants import DEFAULT_SPLIT, SPLITS
from medgen.data.nifti_dataset import DataError, list_patients

__all__ = ["DEFAULT_SPLIT", "assign_splits", "parse_split", "split_counts", "split_folder_problem", "split_indices",
           "split_patients"]

#: how far the fractions' sum may be from 1
_SUM_TOLERANCE = 1e-6
_EXAMPLE = ",".join(f"{f:g}" for f in DEFAULT_SPLIT)


def parse_split(value: str | Sequence[float], name: str = "split") -> tuple[float, float, float]:
    """``(train, val, test)`` fractions from a sequence of three numbers or the text ``"0.7,0.15,0.15"``.

    Raises:
        ValueError: not three values, a value that is not a finite non-negative number, or a sum
            other than 1 (within 1e-6). The message starts with ``name`` (e.g. ``--split``) and
            shows the value given.
    """
    wanted = f"{name} wants three fractions (train, val, test) like {_EXAMPLE}"
    if isinstance(value, str):
        parts: list[object] = [p.strip() for p in value.split(",")]
    else:
        try:
            parts = list(value)
        except TypeError:
            raise ValueError(f"{wanted}, got {value!r}") from None
    if len(parts) != len(SPLITS):
        raise ValueError(f"{wanted}, got {value!r} ({len(parts)} value(s))")
    fractions: list[float] = []
    for split, part in zip(SPLITS, parts):
        try:
            fraction = float(part)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{wanted}, got {value!r}: the {split} fraction {part!r} is not a number") from None
        if not math.isfinite(fraction) or fraction < 0:
            raise ValueError(f"{wanted}, got {value!r}: the {split} fraction {part!r} is not a non-negative number")
        fractions.append(fraction)
    total = sum(fractions)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{name} wants three non-negative fractions summing to 1, got {value!r} (sum {total:g})")
    return fractions[0], fractions[1], fractions[2]


def split_counts(n: int, fractions: str | Sequence[float] = DEFAULT_SPLIT) -> tuple[int, int, int]:
    """Patients per split: ``fraction * n`` rounded by largest remainder, so the counts add up
    to ``n`` and a zero fraction gets nobody; ties go to the earlier split (train, val, test).

    Raises:
        ValueError: bad fractions (see :func:`parse_split`) or ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"the number of patients must be >= 0, got {n}")
    f = np.asarray(parse_split(fractions), dtype=np.float64)
    exact = f / f.sum() * n
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def split_indices(n: int, fractions: str | Sequence[float] = DEFAULT_SPLIT,
                  seed: int | np.random.SeedSequence | np.random.Generator = 0) -> np.ndarray:
    """Split of each of ``n`` items (0 train, 1 val, 2 test), ``int64 [n]``: a permutation drawn
    with ``numpy.random.default_rng(seed)`` is cut into :func:`split_counts` sized parts, and
    item ``perm[k]`` gets the split of part position ``k``."""
    counts = split_counts(n, fractions)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.repeat(np.arange(len(SPLITS)), counts)
    return out


def assign_splits(patient_ids: Iterable[str], fractions: str | Sequence[float] = DEFAULT_SPLIT,
                  seed: int | np.random.SeedSequence | np.random.Generator = 0) -> dict[str, str]:
    """Deterministic patient-level split ``{patient_id: "train"|"val"|"test"}``: the sorted ids
    assigned by :func:`split_indices`. Depends only on the set of ids, the fractions and the seed."""
    ids = sorted(set(patient_ids))
    return {pid: SPLITS[int(s)] for pid, s in zip(ids, split_indices(len(ids), fractions, seed))}


def _in_val(patient_id: str, fraction: float) -> bool:
    digest = hashlib.sha1(patient_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


_SPLIT_FOLDER_RULE = {
    "train": "train/ must be a folder of patient folders (train/<patient>/seg.nii.gz, ...)",
    "val": "val/ must be a folder of patient folders, or absent (then train/ is split by patient)",
    "test": "test/ must be a folder of patient folders, or absent",
}


def split_folder_problem(root: str | Path, split: str) -> str | None:
    """Why ``<root>/<split>`` cannot be used as a split folder, or None (a folder with patient
    folders, or no such entry: an absent ``val/`` means a patient-level split of ``train/``).

    The one decision for ``medgen-data check`` (an error on the split folder) and training
    (:func:`split_patients` raises it): an empty split folder, or a file where the folder belongs.
    """
    path = Path(root) / split
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        return f"is a file, not a split folder; {_SPLIT_FOLDER_RULE[split]}"
    if not list_patients(path):
        return f"split folder holds no patient folders; {_SPLIT_FOLDER_RULE[split]}"
    return None


def _refuse_unusable(root: Path, split: str) -> None:
    problem = split_folder_problem(root, split)
    if problem:
        raise DataError(f"{root / split}: {problem}")


def split_patients(root: str | Path, split: str, val_fraction: float = 0.15) -> list[Path]:
    """Patient folders of ``split``. Without ``val/``, a deterministic patient-level split of
    ``train/`` is used (by a hash of the patient id, so adding patients does not move others);
    at least one patient goes to each side when train/ has two or more.

    Raises:
        DataError: for ``train`` and ``val``, a ``train/`` or ``val/`` they are drawn from that
            :func:`split_folder_problem` refuses (``medgen-data check``'s message, after the folder's path).
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "test":
        return list_patients(root / split)
    _refuse_unusable(root, "val")  # whether val/ is there decides what both train and val are
    if (root / "val").is_dir():
        if split == "train":
            _refuse_unusable(root, "train")
        return list_patients(root / split)
    _refuse_unusable(root, "train")
    train = list_patients(root / "train")
    val = [p for p in train if _in_val(p.name, val_fraction)]
    if len(train) >= 2 and not val:
        val = [min(train, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())]
    if len(train) >= 2 and len(val) == len(train):
        val = val[:-1]
    val_set = set(val)
    return val if split == "val" else [p for p in train if p not in val_set]
