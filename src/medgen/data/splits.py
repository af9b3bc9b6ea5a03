"""Patient-level dataset splits, in one place (see docs/architecture.md, Data).

* :func:`parse_split` reads and checks a ``(train, val, test)`` fraction triple: a sequence
  of numbers, or the command-line text ``"0.7,0.15,0.15"``;
* :func:`split_counts` turns the fractions into patients per split (largest remainder);
* :func:`split_indices` / :func:`assign_splits` draw the seeded patient-level assignment that
  ``medgen-data phantom`` and ``medgen-data import --split`` write to disk;
* :func:`split_patients` is what training reads: the ``train/``, ``val/``, ``test/`` folders,
  or, without ``val/``, a hash-based share of ``train/``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medgen.core.constants import DEFAULT_SPLIT, SPLITS
from medgen.data.nifti_dataset import list_patients

__all__ = ["DEFAULT_SPLIT", "assign_splits", "parse_split", "split_counts", "split_indices", "split_patients"]

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


def split_patients(root: str | Path, split: str, val_fraction: float = 0.15) -> list[Path]:
    """Patient folders of ``split``. Without ``val/``, a deterministic patient-level split of
    ``train/`` is used (by a hash of the patient id, so adding patients does not move others);
    at least one patient goes to each side when train/ has two or more."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "test" or (root / "val").is_dir():
        return list_patients(root / split)
    train = list_patients(root / "train")
    val = [p for p in train if _in_val(p.name, val_fraction)]
    if len(train) >= 2 and not val:
        val = [min(train, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())]
    if len(train) >= 2 and len(val) == len(train):
        val = val[:-1]
    val_set = set(val)
    return val if split == "val" else [p for p in train if p not in val_set]
